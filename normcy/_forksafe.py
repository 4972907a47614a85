"""A lock that a forked child gets back unlocked (package-internal).

A ``threading.Lock`` held by another thread at ``fork()`` stays held forever in the child,
where that thread does not exist: a child forked while a server thread was inside
``SentenceEncoder.encode`` hung in its first ``encode``.  The kernels' own fork safety
(normcy._parallel) cannot help with a Python lock, so the locks that guard normcy's shared
objects are :class:`ForkSafeLock` objects, re-created in the child by an
``os.register_at_fork`` hook.  (The object the lock guarded may have been mid-update in the
parent's other thread; what normcy guards with it, an encoder's reusable workspaces and a
load-once cache, is overwritten by the next call or filled again.)
"""
import os
import threading
import weakref

__all__ = ["ForkSafeLock"]

_LOCKS = weakref.WeakSet()


class ForkSafeLock:
    """A non-reentrant lock (``with lock:``) that is unlocked again in a forked child.
    Copies and unpickled objects are new, unlocked locks."""

    __slots__ = ("_lock", "__weakref__")

    def __init__(self):
        self._lock = threading.Lock()
        _LOCKS.add(self)

    def __enter__(self):
        self._lock.acquire()
        return self

    def __exit__(self, *exc):
        self._lock.release()

    def locked(self):
        return self._lock.locked()

    def _reset(self):
        self._lock = threading.Lock()

    def __reduce__(self):
        return (ForkSafeLock, ())


def _after_fork_in_child():
    for lock in list(_LOCKS):
        lock._reset()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
