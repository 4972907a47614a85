# OpenMP shim: every Cython module cimports OpenMP through here, so a build
# without OpenMP still compiles (prange then runs serially, and these calls
# return the serial answers).
cdef extern from *:
    """
    #include <stddef.h>
    #include <stdint.h>
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

    /* Ranges with stealing: dynamic scheduling that keeps each thread on consecutive
       units.  A job's units (e.g. a GEMM's column panels) are cut into up to
       NC_RANGES_MAX contiguous ranges, one per thread; a thread claims grains from the
       front of its own range, in order (so it can prefetch the unit after the one it
       works on), and once its range is empty it takes grains from the back of the range
       with the most units left.  Every unit is claimed exactly once: a range's front and
       back are one 64-bit word (front in the low half), changed by compare-and-swap.  The
       words are 128 bytes apart, so that a thread claiming from its own range touches a
       cache line no other thread writes until it steals.  A late or slow thread (a core
       woken from sleep, or one running slower on a shared machine) costs the team at most
       one grain instead of its whole share. */
    #define NC_RANGES_MAX 16
    #define NC_RANGE_STRIDE 16
    typedef struct { int64_t w[NC_RANGES_MAX * NC_RANGE_STRIDE]; int n; } nc_ranges;
    /* cut units [0, nunits) into n (<= NC_RANGES_MAX) ranges; before the team starts */
    static inline void nc_ranges_init(nc_ranges *r, ptrdiff_t nunits, int n)
    {
        if (n > NC_RANGES_MAX) n = NC_RANGES_MAX;
        if (n > nunits) n = (int)nunits;
        if (n < 1) n = 1;
        r->n = n;
        for (int i = 0; i < n; i++) {
            uint64_t f = (uint64_t)(nunits * i / n), b = (uint64_t)(nunits * (i + 1) / n);
            r->w[i * NC_RANGE_STRIDE] = (int64_t)(f | (b << 32));
        }
    }
    static inline int64_t nc_range_load(int64_t *w)
    {
    #if defined(__GNUC__)
        return __atomic_load_n(w, __ATOMIC_RELAXED);
    #else
        int64_t v;
        _Pragma("omp atomic read")
        v = *w;
        return v;
    #endif
    }
    static inline int nc_range_cas(int64_t *w, int64_t old, int64_t val)
    {
    #if defined(__GNUC__)
        return __atomic_compare_exchange_n(w, &old, val, 0, __ATOMIC_RELAXED,
                                           __ATOMIC_RELAXED);
    #else
        int ok = 0;
        _Pragma("omp critical(nc_ranges)")
        { if (*w == old) { *w = val; ok = 1; } }
        return ok;
    #endif
    }
    /* up to g units from range i: from its front (back = 0) or its back (back = 1);
       [*a, *b) on success (returns 1), 0 when the range is empty */
    static inline int nc_range_take(nc_ranges *r, int i, ptrdiff_t g, int back,
                                    ptrdiff_t *a, ptrdiff_t *b)
    {
        int64_t *w = &r->w[i * NC_RANGE_STRIDE];
        for (;;) {
            int64_t v = nc_range_load(w);
            ptrdiff_t f = (ptrdiff_t)(uint32_t)v, e = (ptrdiff_t)((uint64_t)v >> 32);
            if (f >= e) return 0;
            ptrdiff_t n = e - f < g ? e - f : g;
            int64_t nv = back ? (int64_t)((uint64_t)f | ((uint64_t)(e - n) << 32))
                              : (int64_t)((uint64_t)(f + n) | ((uint64_t)e << 32));
            if (nc_range_cas(w, v, nv)) {
                if (back) { *a = e - n; *b = e; } else { *a = f; *b = f + n; }
                return 1;
            }
        }
    }
    /* units left in range i (a snapshot), and its current front / back */
    static inline ptrdiff_t nc_range_left(nc_ranges *r, int i, ptrdiff_t *f, ptrdiff_t *e)
    {
        int64_t v = nc_range_load(&r->w[i * NC_RANGE_STRIDE]);
        *f = (ptrdiff_t)(uint32_t)v;
        *e = (ptrdiff_t)((uint64_t)v >> 32);
        return *e > *f ? *e - *f : 0;
    }
    /* the next grain for a thread whose own range is `own` (-1: none): its own front
       first, then the back of the fullest other range.  *hint: the unit this thread will
       most likely start on next (-1: none), for prefetching. */
    static inline int nc_ranges_next(nc_ranges *r, int own, ptrdiff_t g, ptrdiff_t *a,
                                     ptrdiff_t *b, ptrdiff_t *hint)
    {
        ptrdiff_t f, e;
        if (own >= 0 && own < r->n && nc_range_take(r, own, g, 0, a, b)) {
            nc_range_left(r, own, &f, &e);
            *hint = *b < e ? *b : -1;
            return 1;
        }
        for (;;) {
            int best = -1;
            ptrdiff_t most = 0;
            for (int i = 0; i < r->n; i++) {
                ptrdiff_t left = nc_range_left(r, i, &f, &e);
                if (left > most) { most = left; best = i; }
            }
            if (best < 0) return 0;
            if (nc_range_take(r, best, g, 1, a, b)) {
                nc_range_left(r, best, &f, &e);
                *hint = *a > f ? (*a - g > f ? *a - g : f) : -1;
                return 1;
            }
        }
    }
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
    ctypedef struct nc_ranges:
        int n
    void nc_ranges_init(nc_ranges *r, Py_ssize_t nunits, int n) noexcept nogil
    bint nc_ranges_next(nc_ranges *r, int own, Py_ssize_t g, Py_ssize_t *a, Py_ssize_t *b,
                        Py_ssize_t *hint) noexcept nogil
    void nc_team_leave() noexcept nogil
