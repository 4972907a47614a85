# Package-level C interface of normcy._norms, for the other kernel modules (cimport).
#
# norm_rows normalizes contiguous rows with exactly the arithmetic of layer_norm / rms_norm
# (same moments, same apply kernels, same guards), so a fused caller (the GEMM's residual +
# norm epilogue) gives the bits the separate kernels give.  No validation: callers check
# shapes, strides and dtypes at their own boundary (as_param for the per-feature vectors).
cimport numpy as cnp

cdef enum:
    KIND_LN = 0
    KIND_LN_ANNOTATED = 1
    KIND_RMS = 2

cdef void norm_rows(int kind, const float *src, Py_ssize_t lds, float *dst, Py_ssize_t ldd,
                    Py_ssize_t nrows, Py_ssize_t n, const float *w, const float *b,
                    double eps) noexcept nogil
cdef object as_param(object p, Py_ssize_t n, str name)
