# Array and scalar checks shared by normcy's kernel modules (inline: compiled into each module).
#
# Boundary rules (issue 9):
# - Shapes, strides, sizes and dtypes of arrays come from the C-level array struct
#   (PyArray_NDIM / PyArray_DIMS / PyArray_STRIDES / PyArray_DESCR), never from Python
#   attributes, which an ndarray subclass can override.
# - An ndarray subclass is accepted and used as its buffer: `plain()` turns it into a base-class
#   view made in C (as np.asarray would, but no subclass code runs), so no later NumPy call on it
#   can dispatch to the subclass (__array_function__, transpose, view, astype, ...).
#   numpy.ma.MaskedArray is refused (TypeError): computing on its data would ignore the mask.
# - Scalars go through the helpers of normcy._validate (TypeError / ValueError naming the
#   argument, never OverflowError); a plain float is checked inline with the same rules.
cimport numpy as cnp
from cpython.float cimport PyFloat_AS_DOUBLE
from libc.math cimport isfinite

cdef extern from "numpy/arrayobject.h":
    # PyArray_View(arr, NULL, &PyArray_Type): a base-class view; __array_finalize__ is not called
    object _nc_base_view "PyArray_View" (cnp.ndarray arr, void *descr, void *pytype)


cdef inline tuple shape_of(object a):
    """The shape, from the C-level dimensions for an ndarray (any subclass)."""
    cdef int k
    if cnp.PyArray_Check(a):
        return tuple([cnp.PyArray_DIMS(<cnp.ndarray>a)[k]
                      for k in range(cnp.PyArray_NDIM(<cnp.ndarray>a))])
    return tuple((<object>a).shape)


cdef inline str describe(object a):
    if isinstance(a, cnp.ndarray):
        return "array of shape %s and dtype %s" % (shape_of(a),
                                                  <object>cnp.PyArray_DESCR(<cnp.ndarray>a))
    return "object of type %s" % type(a).__name__


cdef inline object plain(object a, str name):
    """`a` unchanged unless it is an ndarray subclass instance; then a base-class ndarray view
    of the same buffer, made in C (its shape, strides and flags are the C-level ones)."""
    if not cnp.PyArray_Check(a) or cnp.PyArray_CheckExact(a):
        return a
    import sys
    ma = sys.modules.get("numpy.ma")
    if ma is not None and isinstance(a, ma.MaskedArray):
        raise TypeError("%s is a numpy.ma.MaskedArray (%s); normcy kernels would ignore its "
                        "mask: pass np.ma.getdata(%s) or a filled array"
                        % (name, describe(a), name))
    return _nc_base_view(<cnp.ndarray>a, NULL, <void *>cnp.ndarray)


cdef inline double parse_eps(object v, str name) except? -1.0:
    """A finite float >= 0 (normcy._validate.as_float rules; plain floats checked inline)."""
    cdef double e
    if type(v) is float:
        e = PyFloat_AS_DOUBLE(v)
        if isfinite(e) and e >= 0.0:
            return e
    from normcy._validate import as_float
    return as_float(v, name, minimum=0.0)


cdef inline double parse_f32_real(object v, str name) except? -1.0:
    """A float finite in float32 (normcy._validate.as_float(float32=True) rules)."""
    cdef double e
    if type(v) is float:
        e = PyFloat_AS_DOUBLE(v)
        if -3.4028234663852886e38 <= e <= 3.4028234663852886e38:
            return e
    from normcy._validate import as_float
    return as_float(v, name, float32=True)


cdef inline void extent(cnp.ndarray a, Py_ssize_t *lo, Py_ssize_t *hi) noexcept:
    cdef int k
    cdef Py_ssize_t s, l = <Py_ssize_t>cnp.PyArray_DATA(a), h
    h = l
    for k in range(cnp.PyArray_NDIM(a)):
        if cnp.PyArray_DIMS(a)[k] == 0:
            lo[0] = l
            hi[0] = l
            return
        s = cnp.PyArray_STRIDES(a)[k] * (cnp.PyArray_DIMS(a)[k] - 1)
        if s >= 0:
            h += s
        else:
            l += s
    lo[0] = l
    hi[0] = h + cnp.PyArray_ITEMSIZE(a)


cdef inline bint identical_view(cnp.ndarray a, cnp.ndarray b) noexcept:
    cdef int k
    if cnp.PyArray_DATA(a) != cnp.PyArray_DATA(b) or cnp.PyArray_NDIM(a) != cnp.PyArray_NDIM(b):
        return False
    for k in range(cnp.PyArray_NDIM(a)):
        if cnp.PyArray_DIMS(a)[k] != cnp.PyArray_DIMS(b)[k]:
            return False
        if cnp.PyArray_DIMS(a)[k] > 1 and cnp.PyArray_STRIDES(a)[k] != cnp.PyArray_STRIDES(b)[k]:
            return False
    return True


cdef inline bint disjoint(cnp.ndarray a, cnp.ndarray b) noexcept:
    """Whether the byte extents of two arrays do not meet (an empty array meets nothing)."""
    cdef Py_ssize_t lo1, hi1, lo2, hi2
    extent(a, &lo1, &hi1)
    extent(b, &lo2, &hi2)
    return lo1 >= hi2 or lo2 >= hi1 or lo1 == hi1 or lo2 == hi2


cdef inline int check_overlap(cnp.ndarray outa, str oname, object ina, str iname, bint allow_identical) except -1:
    """Reject an output that partially overlaps an input (identical views may be allowed)."""
    if ina is None or disjoint(outa, <cnp.ndarray>ina):
        return 0
    if allow_identical and identical_view(outa, <cnp.ndarray>ina):
        return 0
    if identical_view(outa, <cnp.ndarray>ina):
        raise ValueError("%s must not be the same array as %s" % (oname, iname))
    # interleaved views (e.g. even/odd columns) may still be disjoint: the exact test, with a
    # work bound (refused with ValueError when NumPy gives up: see normcy._validate)
    from normcy._validate import check_no_overlap
    check_no_overlap(plain(outa, oname), oname, plain(ina, iname), iname)
    return 0


cdef inline bint same_shape(cnp.ndarray a, cnp.ndarray b) noexcept:
    """Equal C-level shapes."""
    cdef int k
    if cnp.PyArray_NDIM(a) != cnp.PyArray_NDIM(b):
        return False
    for k in range(cnp.PyArray_NDIM(a)):
        if cnp.PyArray_DIMS(a)[k] != cnp.PyArray_DIMS(b)[k]:
            return False
    return True


cdef inline int check_no_self_overlap(cnp.ndarray a, str name) except -1:
    """Refuse an output whose elements may alias each other (a zero stride along an axis of
    length > 1, or as_strided layouts): its result would depend on the write order.  The
    test is the usual sufficient one: with the axes sorted by |stride|, each stride must
    step past the whole extent of the smaller ones."""
    cdef int nd = cnp.PyArray_NDIM(a), k, m, j
    cdef Py_ssize_t st[64]
    cdef Py_ssize_t dm[64]
    cdef Py_ssize_t s, d, span
    m = 0
    for k in range(nd):
        d = cnp.PyArray_DIMS(a)[k]
        if d == 0:
            return 0                      # no elements: nothing can alias
        if d == 1:
            continue
        s = cnp.PyArray_STRIDES(a)[k]
        if s < 0:
            s = -s
        # insertion sort by |stride| (at most 64 axes)
        j = m
        while j > 0 and st[j - 1] > s:
            st[j] = st[j - 1]
            dm[j] = dm[j - 1]
            j -= 1
        st[j] = s
        dm[j] = d
        m += 1
    span = cnp.PyArray_ITEMSIZE(a)
    for k in range(m):
        if st[k] < span:
            raise ValueError("%s has internally overlapping elements (%s with strides %s); pass "
                             "an output whose elements are distinct in memory"
                             % (name, describe(a), tuple([cnp.PyArray_STRIDES(a)[j]
                                                       for j in range(nd)])))
        span = st[k] * (dm[k] - 1) + span
    return 0
