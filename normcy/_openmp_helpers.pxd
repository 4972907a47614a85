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

    /* A team barrier for the stages of one parallel region (the encoder layers' QKV ->
       attention -> projections), which spins before it sleeps.  libgomp's own barrier
       spins GOMP_SPINCOUNT times (normcy sets 1000 at import: a few microseconds, see
       normcy/__init__.py) and then sleeps in the kernel; waking a sleeping thread cost
       ~100 us on the 2-vCPU AMD EPYC VM, as long as some stages of a batch-1 layer.
       Here a waiting thread polls with a pause instruction NC_TEAM_SPINS times (~30 ns
       each on that machine, ~50 ns on Skylake-SP: 120-200 us), and only then sleeps
       (Linux: a futex on the shared sense word, woken by the last thread to arrive; other
       systems: sched_yield() polling), so that an oversubscribed machine still gets its
       cores back.  Sense-reversing: the last thread to arrive resets the count and flips
       the shared sense with a release store; the others see it with an acquire load, so
       every thread's writes before the barrier are visible to every thread after it
       (what the stages need).  While more than one of these calls runs in the process
       (several Python threads calling the model at once: more threads than cores), a
       waiter spins only NC_TEAM_SPINS_SHARED times (a few microseconds) before it sleeps:
       the long spin measured 40% slower there (3 Python threads x 2 OpenMP threads on 2
       cores, MiniLM batch 1), the cores it burns being the ones the awaited threads need;
       with the short one, as fast as libgomp's barrier.  Alone, the long spin made the
       batch-1 forward 3.5-9% faster (in-process A/B against libgomp's barrier).  The
       sleeper count and the sense are accessed sequentially consistently on both sides
       (a waiter announces itself before its last look at the sense; the releaser flips
       the sense before it looks for sleepers), so no wake-up is lost.  shared:
       zero-initialized, one per parallel region; each thread holds its own nc_team. */
    #if defined(__GNUC__)
    #include <sched.h>
    #if defined(__linux__)
    #include <unistd.h>
    #include <limits.h>
    #include <sys/syscall.h>
    #include <linux/futex.h>
    #endif
    #define NC_TEAM_SPINS 4096
    #define NC_TEAM_SPINS_SHARED 100
    /* calls of this module's team kernels in flight (nc_team_enter / nc_team_leave) */
    static int nc_team_calls = 0;
    static inline void nc_team_enter(void)
    { __atomic_add_fetch(&nc_team_calls, 1, __ATOMIC_RELAXED); }
    static inline void nc_team_leave(void)
    { __atomic_sub_fetch(&nc_team_calls, 1, __ATOMIC_RELAXED); }
    #if defined(__x86_64__) || defined(__i386__)
    #define NC_CPU_RELAX() __builtin_ia32_pause()
    #elif defined(__aarch64__)
    #define NC_CPU_RELAX() __asm__ __volatile__("yield")
    #else
    #define NC_CPU_RELAX() ((void)0)
    #endif
    typedef struct { int count; int sense; int sleepers; } nc_team_shared;
    typedef struct { nc_team_shared *sh; int nt; int sense; } nc_team;
    static inline void nc_team_init(nc_team *tm, nc_team_shared *sh, int nt)
    { tm->sh = sh; tm->nt = nt; tm->sense = 0; }
    static inline void nc_team_sleep(nc_team_shared *sh, int s)
    {
        /* sleep while the sense still has its old value (1 - s) */
    #if defined(__linux__)
        syscall(SYS_futex, &sh->sense, FUTEX_WAIT_PRIVATE, 1 - s, NULL, NULL, 0);
    #else
        (void)sh; (void)s;
        sched_yield();
    #endif
    }
    static inline void nc_team_barrier(nc_team *tm)
    {
        nc_team_shared *sh = tm->sh;
        if (tm->nt <= 1) return;
        int s = 1 - tm->sense;
        tm->sense = s;
        if (__atomic_add_fetch(&sh->count, 1, __ATOMIC_ACQ_REL) == tm->nt) {
            __atomic_store_n(&sh->count, 0, __ATOMIC_RELAXED);
            __atomic_store_n(&sh->sense, s, __ATOMIC_SEQ_CST);
    #if defined(__linux__)
            if (__atomic_load_n(&sh->sleepers, __ATOMIC_SEQ_CST) > 0)
                syscall(SYS_futex, &sh->sense, FUTEX_WAKE_PRIVATE, INT_MAX, NULL, NULL, 0);
    #endif
            return;
        }
        const int lim = __atomic_load_n(&nc_team_calls, __ATOMIC_RELAXED) > 1
                        ? NC_TEAM_SPINS_SHARED : NC_TEAM_SPINS;
        for (int spins = 0; spins < lim; spins++) {
            if (__atomic_load_n(&sh->sense, __ATOMIC_ACQUIRE) == s) return;
            NC_CPU_RELAX();
        }
        while (__atomic_load_n(&sh->sense, __ATOMIC_ACQUIRE) != s) {
            __atomic_add_fetch(&sh->sleepers, 1, __ATOMIC_SEQ_CST);
            if (__atomic_load_n(&sh->sense, __ATOMIC_SEQ_CST) != s) nc_team_sleep(sh, s);
            __atomic_sub_fetch(&sh->sleepers, 1, __ATOMIC_SEQ_CST);
        }
    }
    /* the next unclaimed chunk of a job shared by a team (dynamic scheduling inside one
       parallel region; the stage's barrier publishes the chunks' results) */
    static inline ptrdiff_t nc_claim(ptrdiff_t *next)
    { return __atomic_fetch_add(next, 1, __ATOMIC_RELAXED); }
    #else
    static inline ptrdiff_t nc_claim(ptrdiff_t *next)
    {
        ptrdiff_t c;
        _Pragma("omp atomic capture")
        c = (*next)++;
        return c;
    }
    /* other compilers: OpenMP's barrier */
    typedef struct { int unused; } nc_team_shared;
    typedef struct { int nt; } nc_team;
    static inline void nc_team_init(nc_team *tm, nc_team_shared *sh, int nt)
    { (void)sh; tm->nt = nt; }
    static inline void nc_team_barrier(nc_team *tm) { if (tm->nt > 1) nc_omp_barrier(); }
    static inline void nc_team_enter(void) {}
    static inline void nc_team_leave(void) {}
    #endif
    """
    bint NC_HAVE_OPENMP
    int omp_get_thread_num() noexcept nogil
    int omp_get_max_threads() noexcept nogil
    int omp_get_num_threads() noexcept nogil
    void nc_omp_barrier() noexcept nogil
    ctypedef struct nc_team_shared:
        pass
    ctypedef struct nc_team:
        pass
    void nc_team_init(nc_team *tm, nc_team_shared *sh, int nt) noexcept nogil
    void nc_team_barrier(nc_team *tm) noexcept nogil
    void nc_team_enter() noexcept nogil
    Py_ssize_t nc_claim(Py_ssize_t *next) noexcept nogil
    void nc_team_leave() noexcept nogil
