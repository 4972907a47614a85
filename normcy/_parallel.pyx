# cython: language_level=3
"""Thread-count policy and fork safety shared by every normcy kernel module."""
import os

from normcy._openmp_helpers cimport NC_HAVE_OPENMP, omp_get_max_threads

# Below this many float32 elements of work, a call runs serially: starting an OpenMP
# region (waking the pool, the barrier at its end) costs a few microseconds, more than
# the whole kernel on such inputs.
DEF_MIN_PARALLEL_WORK = 20000
# Each extra thread must get at least this much work.
DEF_MIN_WORK_PER_THREAD = 10000

# Thread counts above this are capped (set_num_threads and per-call num_threads alike).
cdef int _MAX_THREADS = 4096
cdef Py_ssize_t _min_parallel_work = DEF_MIN_PARALLEL_WORK
cdef Py_ssize_t _min_work_per_thread = DEF_MIN_WORK_PER_THREAD
cdef int _default_threads = 1
cdef int _omp_used = 0        # this process has started an OpenMP region
cdef int _fork_serial = 0     # forked after the parent used OpenMP: stay serial
cdef int _foreign_gomp = 0    # at the last fork, another loaded library used libgomp


def _cgroup_cpu_limit():
    """CPU quota of this process's cgroup (v2 ``cpu.max`` or v1 cfs files), or None."""
    try:
        with open("/sys/fs/cgroup/cpu.max") as f:
            quota, period = f.read().split()[:2]
        if quota != "max":
            q, p = int(quota), int(period)
            if q > 0 and p > 0:
                return max(1, -(-q // p))
    except (OSError, ValueError):
        pass
    try:
        with open("/sys/fs/cgroup/cpu/cpu.cfs_quota_us") as f:
            q = int(f.read())
        with open("/sys/fs/cgroup/cpu/cpu.cfs_period_us") as f:
            p = int(f.read())
        if q > 0 and p > 0:
            return max(1, -(-q // p))
    except (OSError, ValueError):
        pass
    return None


def _parse_env_threads(name):
    v = os.environ.get(name)
    if v is None or not v.strip():
        return None
    # OMP_NUM_THREADS may be a list ("4,2" for nested levels): take the first.
    first = v.split(",")[0].strip()
    # plain ASCII digits only (int() would also take "1_0" and other scripts' digits)
    n = int(first) if first.isascii() and first.isdigit() else 0
    if n >= 1:
        return n
    if name == "NORMCY_NUM_THREADS":     # libgomp itself complains about OMP_NUM_THREADS
        import warnings
        warnings.warn("NORMCY_NUM_THREADS=%r is not a positive integer; ignored" % v,
                      RuntimeWarning, stacklevel=2)
    return None


def available_cpus():
    """CPUs this process may run on: affinity mask, capped by the cgroup CPU quota."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    lim = _cgroup_cpu_limit()
    if lim is not None:
        n = min(n, lim)
    return max(1, n)


def _initial_threads():
    for name in ("NORMCY_NUM_THREADS", "OMP_NUM_THREADS"):
        n = _parse_env_threads(name)     # checked (a typo warns) in every build
        if n is not None:
            return n if NC_HAVE_OPENMP else 1
    return available_cpus() if NC_HAVE_OPENMP else 1


def get_num_threads():
    """Return the default number of threads normcy kernels use.

    The initial value comes from ``NORMCY_NUM_THREADS``, then ``OMP_NUM_THREADS``,
    then the number of CPUs this process may run on (affinity mask and cgroup CPU
    quota aware).  It is 1 when normcy was built without OpenMP, and in a process
    forked after its parent ran a parallel region (see ``fork_serial``).

    Returns
    -------
    int
    """
    if _fork_serial:
        return 1
    return _default_threads


def set_num_threads(n):
    """Set the default number of threads for all later calls (process wide).

    A per-call ``num_threads=`` argument overrides this without touching it.

    Parameters
    ----------
    n : int
        Number of threads, at least 1.  Without OpenMP, values above 1 are
        accepted and ignored (kernels run serially).
    """
    global _default_threads
    from normcy._validate import as_int
    n = as_int(n, "num_threads", minimum=1)
    # without OpenMP every kernel runs serially: the default stays 1 (checked all the same)
    _default_threads = <int>min(n, _MAX_THREADS) if NC_HAVE_OPENMP else 1


def fork_serial():
    """True if this process was forked after an OpenMP thread pool may have started.

    GNU libgomp's thread pool does not survive ``fork()``: a child that starts a
    parallel region can hang forever.  normcy therefore runs every kernel serially
    in a child forked after its parent ran a parallel normcy call, or while another
    loaded library that uses libgomp (PyTorch, for one) was present, since that library
    may have started the shared pool (correct results, one core).  Start workers with
    the ``spawn``/``forkserver`` methods, or fork before the first large call (and before
    importing such a library), to keep all cores in worker processes.
    """
    return bool(_fork_serial)


cdef void _before_fork() noexcept nogil:
    # the parent, just before fork(): the loader's list of objects can be read safely here
    # (not in the child, where another thread may have held the loader's lock)
    global _foreign_gomp
    if not _omp_used and NC_HAVE_OPENMP:
        _foreign_gomp = nc_foreign_gomp_user()


cdef void _after_fork_in_child() noexcept nogil:
    # runs in the child of every fork() of this process (os.fork, multiprocessing, and a
    # fork() called from C code that Python's os.register_at_fork hooks never see)
    global _fork_serial
    if _omp_used or _foreign_gomp:
        _fork_serial = 1


cdef extern from *:
    """
    #if defined(_WIN32)
    static int nc_at_fork(void (*prepare)(void), void (*child)(void))
    { (void)prepare; (void)child; return 0; }
    #else
    #include <pthread.h>
    static int nc_at_fork(void (*prepare)(void), void (*child)(void))
    { return pthread_atfork(prepare, NULL, child); }
    #endif

    /* Is a library other than normcy's own extension modules, which may start GNU
       libgomp's (process-wide, shared) thread pool, loaded?  Any loaded ELF object that
       is not in normcy's package directory and lists a libgomp among its DT_NEEDED
       entries counts (PyTorch's libtorch_cpu, ...).  glibc on Linux only; elsewhere 0. */
    static char nc_own_dir[4096];
    #if defined(__linux__) && defined(__GLIBC__)
    #include <link.h>
    #include <string.h>
    static int nc_gomp_cb(struct dl_phdr_info *info, size_t size, void *data)
    {
        const ElfW(Dyn) *dyn = NULL, *d;
        const char *strtab = NULL;
        int i;
        (void)size;
        if (info->dlpi_name && nc_own_dir[0] &&
            strncmp(info->dlpi_name, nc_own_dir, strlen(nc_own_dir)) == 0)
            return 0;                                   /* one of normcy's modules */
        for (i = 0; i < info->dlpi_phnum; i++)
            if (info->dlpi_phdr[i].p_type == PT_DYNAMIC)
                dyn = (const ElfW(Dyn) *)(info->dlpi_addr + info->dlpi_phdr[i].p_vaddr);
        if (dyn == NULL)
            return 0;
        for (d = dyn; d->d_tag != DT_NULL; d++)
            if (d->d_tag == DT_STRTAB) {
                ElfW(Addr) a = d->d_un.d_ptr;
                /* glibc relocates the dynamic entries of loaded objects in place; the
                   vDSO's (and any other left unrelocated) are offsets */
                if (a < info->dlpi_addr)
                    a += info->dlpi_addr;
                strtab = (const char *)a;
            }
        if (strtab == NULL)
            return 0;
        for (d = dyn; d->d_tag != DT_NULL; d++)
            if (d->d_tag == DT_NEEDED && strncmp(strtab + d->d_un.d_val, "libgomp", 7) == 0) {
                *(int *)data = 1;
                return 1;                               /* found: stop */
            }
        return 0;
    }
    static int nc_foreign_gomp_user(void)
    {
        int found = 0;
        dl_iterate_phdr(nc_gomp_cb, &found);
        return found;
    }
    #else
    static int nc_foreign_gomp_user(void) { return 0; }
    #endif
    static void nc_set_own_dir(const char *d)
    {
        strncpy(nc_own_dir, d, sizeof nc_own_dir - 1);
        nc_own_dir[sizeof nc_own_dir - 1] = 0;
    }
    """
    int nc_at_fork(void (*prepare)() noexcept nogil, void (*child)() noexcept nogil) nogil
    int nc_foreign_gomp_user() noexcept nogil
    void nc_set_own_dir(const char *d) noexcept


def _foreign_gomp_user():
    """Whether another loaded library uses libgomp now (what a fork would find)."""
    return bool(nc_foreign_gomp_user())


def _set_parallel_thresholds(min_parallel_work=None, min_work_per_thread=None):
    """Tune the serial/parallel switch-over (for benchmarks and tests)."""
    global _min_parallel_work, _min_work_per_thread
    old = (_min_parallel_work, _min_work_per_thread)
    if min_parallel_work is not None:
        _min_parallel_work = max(0, int(min_parallel_work))
    if min_work_per_thread is not None:
        _min_work_per_thread = max(1, int(min_work_per_thread))
    return old


cdef int default_threads() noexcept nogil:
    if _fork_serial:
        return 1
    return _default_threads


cdef int resolve_threads(object num_threads, Py_ssize_t work, Py_ssize_t max_parallel) except -1:
    global _omp_used
    cdef Py_ssize_t nt, cap
    if num_threads is None:
        nt = _default_threads
    else:
        # normcy._validate.as_int rules (any integer type but bool, >= 1), the plain-int
        # case inline; a count above _MAX_THREADS is the cap (it is only an upper bound)
        if type(num_threads) is not int:
            from normcy._validate import as_int
            num_threads = as_int(num_threads, "num_threads", minimum=1)
        if num_threads < 1:
            raise ValueError("num_threads must be >= 1 or None, got %d" % num_threads)
        nt = _MAX_THREADS if num_threads > _MAX_THREADS else num_threads
    if nt <= 1 or _fork_serial or not NC_HAVE_OPENMP:
        return 1
    if work < _min_parallel_work:
        return 1
    cap = work // _min_work_per_thread
    if cap < nt:
        nt = cap
    if max_parallel < nt:
        nt = max_parallel
    if nt <= 1:
        return 1
    _omp_used = 1
    return <int>nt


_default_threads = <int>min(_initial_threads(), _MAX_THREADS)
def _register_own_dir():
    # normcy's extension modules, as the loader names them (the path Python's import
    # system passed to dlopen, which is __file__'s)
    cdef bytes d = os.fsencode(os.path.dirname(os.path.abspath(__file__)) + os.sep)
    nc_set_own_dir(d)


_register_own_dir()
if nc_at_fork(_before_fork, _after_fork_in_child) != 0:
    raise ImportError("normcy: pthread_atfork failed (no memory?)")
