# OpenMP shim: every Cython module cimports OpenMP through here, so a build
# without OpenMP still compiles (prange then runs serially, and these calls
# return the serial answers).
cdef extern from *:
    """
    #ifdef _OPENMP
    #include <omp.h>
    #define NC_HAVE_OPENMP 1
    #else
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
