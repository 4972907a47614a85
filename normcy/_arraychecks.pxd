# Array checks shared by normcy's kernel modules (inline: compiled into each module).
cimport numpy as cnp


cdef inline tuple _shp(object a):
    return tuple((<object>a).shape)


cdef inline str _desc(object a):
    if isinstance(a, cnp.ndarray):
        return "array of shape %s and dtype %s" % (_shp(a), (<object>a).dtype)
    return "object of type %s" % type(a).__name__


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


cdef inline int check_overlap(cnp.ndarray outa, str oname, object ina, str iname, bint allow_identical) except -1:
    """Reject an output that partially overlaps an input (identical views may be allowed)."""
    cdef Py_ssize_t lo1, hi1, lo2, hi2
    if ina is None:
        return 0
    extent(outa, &lo1, &hi1)
    extent(<cnp.ndarray>ina, &lo2, &hi2)
    if lo1 >= hi2 or lo2 >= hi1 or lo1 == hi1 or lo2 == hi2:
        return 0
    if allow_identical and identical_view(outa, <cnp.ndarray>ina):
        return 0
    if identical_view(outa, <cnp.ndarray>ina):
        raise ValueError("%s must not be the same array as %s" % (oname, iname))
    from numpy import shares_memory
    if not shares_memory(outa, ina):
        return 0   # interleaved but disjoint (e.g. even/odd columns)
    raise ValueError("%s partially overlaps %s; an output may be the very same array as an "
                     "input (in place) but must not overlap it otherwise" % (oname, iname))
