# OpenMP shim: every Cython module cimports OpenMP through here, so a build
# without OpenMP still compiles (prange then runs serially, and these calls
# return the serial answers).
cdef extern from *:
    """
    #ifdef _OPENMP
    #include <omp.h>
    #define NC_HAVE_OPENMP 1
    /* an orphaned barrier: binds to the innermost enclosing parallel region */
    static inline void nc_omp_barrier(void) { _Pragma("omp barrier") }
    #else
    static inline void nc_omp_barrier(void) {}
    #define NC_HAVE_OPENMP 0
    static inline int omp_get_thread_num(void) { return 0; }
    static inline int omp_get_max_threads(void) { return 1; }
    static inline int omp_get_num_threads(void) { return 1; }
    #endif
    """
    bint NC_HAVE_OPENMP
    int omp_get_thread_num() noexcept nogil
    int omp_get_max_threads() noexcept nogil
    int omp_get_num_threads() noexcept nogil
    void nc_omp_barrier() noexcept nogil
