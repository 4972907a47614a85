"""Return the C heap's free memory to the operating system after a model load.

Loading a model makes and drops many temporary arrays (the checkpoint's tensors, float64
intermediates, the unpacked copies of weights that end up packed). glibc's allocator keeps
freed blocks below its (growing) mmap threshold in the process heap, where holes between
live blocks are never given back: after ``SentenceEncoder.from_pretrained()`` of
all-MiniLM-L6-v2 the process held ~70 MB of freed heap (RSS 218 MB; 147 MB after
``malloc_trim(0)``, which took ~5 ms). A server that runs one process per core pays that
per process. Other C libraries (musl, macOS, Windows) have no ``malloc_trim``: nothing is
done there.
"""
import ctypes
import sys

_trim = None
_looked = False


def _malloc_trim():
    global _trim, _looked
    if not _looked:
        # _looked only after _trim is set: a thread that sees it True finds the function
        # (two first callers may both look it up: harmless)
        f = None
        if sys.platform.startswith("linux"):
            try:
                f = ctypes.CDLL(None).malloc_trim
                f.argtypes = [ctypes.c_size_t]
                f.restype = ctypes.c_int
            except (OSError, AttributeError):
                f = None
        _trim = f
        _looked = True
    return _trim


def release_free_heap():
    """Give free heap memory back to the OS (glibc ``malloc_trim(0)``).

    Returns
    -------
    bool
        True if the C library has ``malloc_trim`` and it was called.
    """
    f = _malloc_trim()
    if f is None:
        return False
    f(0)
    return True
