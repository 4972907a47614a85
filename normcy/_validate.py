"""Argument parsing shared by every public normcy entry point (kernels and model constructors).

One helper for integers, one for real numbers, and the bounded overlap test.  Errors are
``TypeError`` (wrong kind of object) or ``ValueError`` (right kind, bad value) and name the
argument; no other exception type (``OverflowError`` in particular) escapes.

The Cython kernels call these on their slow path only: a plain ``int`` / ``float`` is
checked inline there with the same rules (see ``_arraychecks.pxd``).
"""
import math
import operator
import sys

import numpy as np

__all__ = ["as_int", "as_float", "as_weight", "check_no_overlap", "refuse_masked",
           "base_array", "OVERLAP_MAX_WORK"]

# Upper bound on the effort ``np.shares_memory`` may spend deciding whether an output and
# an input overlap (the exact problem is NP-hard in the number of dimensions: two
# 14-dimensional views of one buffer took 33 s unbounded).  About 55 ns per unit of work
# measured on the CI machine: <= ~6 ms per call.  Past the bound the answer is "maybe",
# and the call is refused (see check_no_overlap).
OVERLAP_MAX_WORK = 100_000

# Real numbers are floats, ints and NumPy scalars of those kinds (anything with __float__
# that is not one of these kinds is refused below).
_FLT_MAX = float(np.finfo(np.float32).max)
_NOT_REAL = (str, bytes, bytearray, complex, np.complexfloating, bool, np.bool_)


def as_int(value, name, minimum=None, maximum=None):
    """``operator.index(value)`` as a Python int, range-checked.

    Accepts every integer type (``int``, NumPy integers, objects with ``__index__``) except
    ``bool``: ``True`` as a size, axis or thread count is almost certainly a mistake.

    Raises
    ------
    TypeError
        `value` is not an integer (float, str, None, bool, ...).
    ValueError
        `value` is below `minimum` or above `maximum` (any size: no OverflowError).
    """
    if isinstance(value, (bool, np.bool_)):
        raise TypeError("%s must be an integer, got bool %r" % (name, value))
    try:
        v = operator.index(value)
    except TypeError:
        raise TypeError("%s must be an integer, got %s" % (name, type(value).__name__)) from None
    if minimum is not None and v < minimum:
        raise ValueError("%s must be >= %d, got %d" % (name, minimum, v))
    if maximum is not None and v > maximum:
        raise ValueError("%s must be <= %d, got %d" % (name, maximum, v))
    return v


def as_float(value, name, minimum=None, maximum=None, float32=False):
    """`value` as a finite Python float, range-checked.

    Accepts ``float``, ``int`` and NumPy real scalars (and 0-d real arrays); refuses strings
    (``"1e-5"``), complex numbers and bools with ``TypeError``.  Non-finite values, values
    too large for a double (``10**400``) and, with ``float32=True``, values that are not
    finite in float32 are refused with ``ValueError``.
    """
    if isinstance(value, _NOT_REAL) or (isinstance(value, np.ndarray)
                                        and (value.ndim != 0 or value.dtype.kind not in "fiu")):
        raise TypeError("%s must be a real number, got %s" % (name, _kind(value)))
    try:
        v = float(value)
    except OverflowError:
        raise ValueError("%s must be finite, got %s (out of the range of a double)"
                         % (name, _short(value))) from None
    except (TypeError, ValueError):
        raise TypeError("%s must be a real number, got %s" % (name, _kind(value))) from None
    if not math.isfinite(v):
        raise ValueError("%s must be finite, got %s" % (name, _short(value)))
    if float32 and abs(v) > _FLT_MAX:
        raise ValueError("%s must be finite in float32 (|%s| <= %g), got %s"
                         % (name, name, _FLT_MAX, _short(value)))
    if minimum is not None and v < minimum:
        raise ValueError("%s must be >= %r, got %s" % (name, minimum, _short(value)))
    if maximum is not None and v > maximum:
        raise ValueError("%s must be <= %r, got %s" % (name, maximum, _short(value)))
    return v


def user_stacklevel():
    """The ``warnings.warn`` stacklevel, for the function calling this one, of the first
    frame outside normcy and the import machinery: a warning raised while ``import normcy``
    runs then names the user's import line.  (Called from Cython code, which has no frames
    of its own, the count starts at the topmost Python frame, as warn's does.)"""
    f = sys._getframe(1)
    level = 1
    while f is not None:
        fn = f.f_code.co_filename
        if not (fn.startswith("<frozen importlib") or "importlib" + "/" in fn
                or f.f_globals.get("__name__", "").split(".")[0] == "normcy"):
            return level
        f = f.f_back
        level += 1
    return 1


def refuse_masked(value, name):
    """TypeError for a ``numpy.ma.MaskedArray``: its mask would be ignored."""
    if isinstance(value, np.ma.MaskedArray):
        raise TypeError("%s must not be a masked array (its mask would be ignored)" % name)


def base_array(value):
    """An ndarray subclass instance as a base-class view of its buffer (the C-level shape,
    strides and dtype; no method or ``__array_function__`` of the subclass runs, then or
    in any later NumPy call on the view), as the kernels' ``plain()`` makes it; anything
    else unchanged.  For the model layer's boundary (layers, stacks, BertModel), after
    ``refuse_masked``."""
    if isinstance(value, np.ndarray) and type(value) is not np.ndarray:
        return np.ndarray.view(value, type=np.ndarray)
    return value


def as_weight(value, name, shape, copy=True):
    """A state-dict entry as a new contiguous float32 array of the expected shape (with
    copy=False: the entry itself when it already is one, e.g. for a loader that hands it on
    to a layer which copies or packs it).

    Raises TypeError for a non-numeric array, ValueError for a wrong shape or a NaN/Inf
    (model weights are checked once, at load).
    """
    refuse_masked(value, name)
    try:
        a = np.asarray(value)
    except Exception as exc:  # pragma: no cover - exotic objects
        raise TypeError("%s must be an array, got %s" % (name, type(value).__name__)) from exc
    if a.dtype.kind not in "fiu" or a.dtype == np.bool_:
        raise TypeError("%s must be a float array, got dtype %s" % (name, a.dtype))
    if tuple(a.shape) != tuple(shape):
        raise ValueError("%s must have shape %s, got %s" % (name, tuple(shape), tuple(a.shape)))
    a = (np.array(a, dtype=np.float32, order="C", copy=True) if copy
         else np.ascontiguousarray(a, dtype=np.float32))
    if not np.all(np.isfinite(a)):
        raise ValueError("%s contains NaN or Inf" % name)
    return a


def check_no_overlap(out, oname, other, iname):
    """Raise ValueError unless `out` and `other` (plain ndarrays) provably share no memory.

    The exact test runs with ``max_work=OVERLAP_MAX_WORK``; when NumPy gives up
    (``TooHardError``), the call is refused rather than risk writing into an input while it
    is read: pass a copy (``np.ascontiguousarray``) of one of them.
    """
    try:
        shared = np.shares_memory(out, other, max_work=OVERLAP_MAX_WORK)
    except np.exceptions.TooHardError:
        raise ValueError(
            "cannot tell within the work bound whether %s (shape %s, strides %s) overlaps %s "
            "(shape %s, strides %s): they are views of one buffer with too many dimensions "
            "to check; pass a contiguous copy of one of them"
            % (oname, out.shape, out.strides, iname, other.shape, other.strides)) from None
    if shared:
        raise ValueError("%s partially overlaps %s; an output may be the very same array as "
                         "an input (in place) but must not overlap it otherwise"
                         % (oname, iname))


def _kind(value):
    if isinstance(value, np.ndarray):
        return "array of shape %s and dtype %s" % (value.shape, value.dtype)
    if isinstance(value, (str, bytes)):
        return "%s %s" % (type(value).__name__, _short(value))
    return type(value).__name__


def _short(value):
    r = repr(value)
    return r if len(r) <= 40 else r[:37] + "..."
