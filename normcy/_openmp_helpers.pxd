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
    #else
    #define NC_HAVE_OPENMP 0
    static inline int omp_get_thread_num(void) { return 0; }
    static inline int omp_get_max_threads(void) { return 1; }
    static inline int omp_get_num_threads(void) { return 1; }
    #endif

    /* Stage gates: how the threads of one parallel region wait for a stage's work (the
       encoder layers' QKV -> attention -> projections -> norms) before the next stage.
       A stage's work is a fixed set of units that any thread may claim (nc_claim,
       nc_ranges_next); the gate counts the units not yet done, and a thread waits at it
       until that count is zero - not until every thread has arrived, as a barrier would.
       A thread that never got to run in a stage (a worker woken late, or one whose vCPU
       the host has put on the same core as the caller's) holds the others up only for
       the units it has claimed and not finished, not for its whole share: on the 2-vCPU
       AMD EPYC (Zen 5) VM, whose host packs a lightly loaded VM's two vCPUs onto one core,
       a batch-1 MiniLM forward with a 20 ms pause before it took 6.5 ms with a barrier
       between stages (1.1 ms back to back, 1.7 ms single-threaded after the same pause).
       Each thread adds the units it finished to the gate once, when it finds nothing
       left to claim (nc_gate_done: release); a waiting thread sees zero with an acquire
       load, so every unit's writes are visible to every thread after the gate.  A waiter
       polls with a pause instruction NC_TEAM_SPINS times (~30 ns each on the Zen 3 VM,
       ~50 ns on Skylake-SP: 120-200 us) and only then sleeps (Linux: a futex on the
       count, woken by the thread that brings it to zero; other systems: sched_yield()
       polling), so that an oversubscribed machine still gets its cores back.  libgomp's
       own barrier sleeps after GOMP_SPINCOUNT polls (normcy sets 1000 at import, a few
       microseconds: see normcy/__init__.py), and waking a sleeping thread cost ~100 us
       on the Zen 3 VM, as long as some stages of a batch-1 layer; the long spin made the
       batch-1 forward 3.5-9% faster there.  While more than one of these calls runs in
       the process (several Python threads calling the model at once: more threads than
       cores), a waiter polls only NC_TEAM_SPINS_SHARED times (a few microseconds): the
       long spin measured 40% slower there (3 Python threads x 2 OpenMP threads on 2
       cores, MiniLM batch 1), the cores it burns being the ones the awaited threads need.
       The sleeper count and the unit count are accessed sequentially consistently on
       both sides (a waiter announces itself before its last look at the count; the
       thread that brings the count to zero looks for sleepers after it), so no wake-up is
       lost.  A gate is set (nc_gate_init) before the parallel region starts. */
    typedef struct { int left; int sleepers; } nc_gate;
    static inline void nc_gate_init(nc_gate *g, int units) { g->left = units; g->sleepers = 0; }
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
    /* n units of the gate's stage done by the calling thread */
    static inline void nc_gate_done(nc_gate *g, int n)
    {
        if (n <= 0) return;
        if (__atomic_sub_fetch(&g->left, n, __ATOMIC_SEQ_CST) == 0) {
    #if defined(__linux__)
            if (__atomic_load_n(&g->sleepers, __ATOMIC_SEQ_CST) > 0)
                syscall(SYS_futex, &g->left, FUTEX_WAKE_PRIVATE, INT_MAX, NULL, NULL, 0);
    #endif
        }
    }
    /* wait until every unit of the gate's stage is done */
    static inline void nc_gate_wait(nc_gate *g)
    {
        const int lim = __atomic_load_n(&nc_team_calls, __ATOMIC_RELAXED) > 1
                        ? NC_TEAM_SPINS_SHARED : NC_TEAM_SPINS;
        for (int spins = 0; spins < lim; spins++) {
            if (__atomic_load_n(&g->left, __ATOMIC_ACQUIRE) == 0) return;
            NC_CPU_RELAX();
        }
        for (;;) {
            int v = __atomic_load_n(&g->left, __ATOMIC_SEQ_CST);
            if (v == 0) return;
            __atomic_add_fetch(&g->sleepers, 1, __ATOMIC_SEQ_CST);
            v = __atomic_load_n(&g->left, __ATOMIC_SEQ_CST);
            if (v != 0) {
    #if defined(__linux__)
                /* returns at once if the count has changed since v was read */
                syscall(SYS_futex, &g->left, FUTEX_WAIT_PRIVATE, v, NULL, NULL, 0);
    #else
                sched_yield();
    #endif
            }
            __atomic_sub_fetch(&g->sleepers, 1, __ATOMIC_SEQ_CST);
        }
    }
    /* the next unclaimed chunk of a job shared by a team (dynamic scheduling inside one
       parallel region; the stage's gate publishes the chunks' results) */
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
    /* other compilers: OpenMP atomics, and polling with a flush */
    static inline void nc_gate_done(nc_gate *g, int n)
    {
        if (n <= 0) return;
        _Pragma("omp atomic")
        g->left -= n;
    }
    static inline void nc_gate_wait(nc_gate *g)
    {
        for (;;) {
            int v;
            _Pragma("omp atomic read")
            v = g->left;
            if (v == 0) break;
        }
        _Pragma("omp flush")
    }
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
    ctypedef struct nc_gate:
        int left
    void nc_gate_init(nc_gate *g, int units) noexcept nogil
    void nc_gate_done(nc_gate *g, int n) noexcept nogil
    void nc_gate_wait(nc_gate *g) noexcept nogil
    void nc_team_enter() noexcept nogil
    Py_ssize_t nc_claim(Py_ssize_t *next) noexcept nogil
    ctypedef struct nc_ranges:
        int n
    void nc_ranges_init(nc_ranges *r, Py_ssize_t nunits, int n) noexcept nogil
    bint nc_ranges_next(nc_ranges *r, int own, Py_ssize_t g, Py_ssize_t *a, Py_ssize_t *b,
                        Py_ssize_t *hint) noexcept nogil
    void nc_team_leave() noexcept nogil
