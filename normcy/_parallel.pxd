# Thread-count policy shared by all normcy kernel modules.
#
# resolve_threads(num_threads, work) returns how many threads a kernel should use
# for `work` units (roughly: float32 elements touched).  It returns 1 when the work
# is too small to pay for a parallel region, when OpenMP is unavailable, or in a
# child forked after the parent ran an OpenMP region (GNU libgomp would hang).
# A return value > 1 records that an OpenMP region is about to run.
cdef int resolve_threads(object num_threads, Py_ssize_t work, Py_ssize_t max_parallel) except -1
cdef int default_threads() noexcept nogil
