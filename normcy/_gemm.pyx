# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False, cdivision=True
"""Packed-weight GEMM with fused epilogues, and fused attention.

``PackedLinear(weight, bias)`` packs a ``torch.nn.Linear``-layout weight (out_features,
in_features) once into the column panels that the SIMD micro-kernel streams
(``src/nc_gemm_kern.h``: layout, cache blocking and the determinism argument are described
there); calling it computes ``act(x @ weight.T + bias) (+ residual)`` in one pass.

Arguments are checked here, once; the C kernels hold no validation.  Work is spread over
normcy's own OpenMP pool: over column panels when there are few rows, over row blocks when
there are many, serially when the work is small.  Every output element is one FMA chain over
k in a fixed order whatever the thread count or the other rows of the call, so results are
bit-identical for every thread count and every batch composition.
"""
from libc.stdlib cimport malloc, free
from libc.string cimport memset
from libc.stdint cimport uint8_t, uintptr_t
from cython.parallel cimport prange
cimport numpy as cnp
import numpy as np
import operator

from normcy._parallel cimport resolve_threads
from normcy._openmp_helpers cimport (omp_get_thread_num, nc_gate, nc_gate_init,
                                      nc_gate_done, nc_gate_wait, nc_team_enter,
                                      nc_team_leave, nc_claim, nc_ranges, nc_ranges_init,
                                      nc_ranges_next)
from normcy._norms cimport KIND_LN, KIND_RMS, norm_rows, as_param
from normcy._arraychecks cimport (describe, shape_of, check_no_self_overlap, check_overlap, plain,
                                  parse_eps, disjoint)

cnp.import_array()

cdef extern from "nc_api_gemm.h" nogil:
    void nc_stream_init()
    void nc_gemm_run(const float *x, Py_ssize_t ldx, const float *wp, Py_ssize_t N,
                     Py_ssize_t K, const float *bias, const float *res, Py_ssize_t ldr,
                     float *y, Py_ssize_t ldy, int act, Py_ssize_t m0, Py_ssize_t m1,
                     Py_ssize_t p0, Py_ssize_t p1, Py_ssize_t pnext)
    void nc_gemm_pack(const float *w, Py_ssize_t ldw, Py_ssize_t N, Py_ssize_t K, float *wp)
    Py_ssize_t nc_gemm_nr()
    Py_ssize_t nc_gemm_mr()
    double nc_fma_loop(Py_ssize_t iters)
    Py_ssize_t nc_gemm_kc(Py_ssize_t K)
    long nc_l1d()
    Py_ssize_t nc_gemm_mc(Py_ssize_t K, Py_ssize_t rows)
    int nc_isa_vbytes()
    void nc_attention_head(const float *q, Py_ssize_t ldq, const float *bq, const float *kt,
                           Py_ssize_t ldk,
                           const float *v, Py_ssize_t ldv, float *out, Py_ssize_t ldo,
                           Py_ssize_t L, Py_ssize_t dh, Py_ssize_t klen, int causal,
                           const float *mask, Py_ssize_t ldm, const uint8_t *kpm,
                           float *scores)
    int NCO_ACT_IDENTITY
    int NCO_ACT_RELU
    int NCO_ACT_GELU
    int NCO_ACT_GELU_TANH

nc_stream_init()

_ACTIVATIONS = {
    None: NCO_ACT_IDENTITY, "identity": NCO_ACT_IDENTITY, "none": NCO_ACT_IDENTITY,
    "relu": NCO_ACT_RELU, "gelu": NCO_ACT_GELU, "gelu_tanh": NCO_ACT_GELU_TANH,
}

# Below this many multiply-adds a call runs on the calling thread (a parallel region costs
# about 1-2 us; 2^17 FMAs take ~10 us on one AVX2 core).
DEF SERIAL_FMAS = 131072
# With at least this many rows per thread the work is split by rows, else by column panels
# (ROWS_PER_THREAD_WIDE when every thread gets at least PANELS_PER_THREAD panels; see
# split_by_rows).
DEF ROWS_PER_THREAD = 48
DEF ROWS_PER_THREAD_WIDE = 192
DEF PANELS_PER_THREAD = 8
# PackedLinear's default eps (the default object itself is not checked again on each call)
cdef object _EPS_DEFAULT = 1e-5

# chunks per thread that a team claims dynamically (gemm_plan, the attention's blocks)
DEF CHUNKS_PER_THREAD = 4


cdef int _act_code(object activation) except -1:
    if activation is not None and not isinstance(activation, str):
        raise TypeError("activation must be None or a str ('relu', 'gelu', 'gelu_tanh'), got "
                        "%s" % type(activation).__name__)
    try:
        return _ACTIVATIONS[activation]
    except KeyError:
        raise ValueError("activation must be one of None, 'relu', 'gelu', 'gelu_tanh', got %r"
                         % (activation,)) from None


cdef int _check_operand(object a, str name, tuple shape, bint output) except -1:
    """A float32 ndarray of the given shape; an output must be writeable and must not
    overlap itself."""
    if not isinstance(a, np.ndarray):
        raise TypeError("%s must be a numpy.ndarray or None, got %s" % (name, type(a).__name__))
    if (<cnp.ndarray>a).dtype != np.float32:
        raise TypeError("%s must be float32, got %s" % (name, describe(a)))
    if shape_of(a) != shape:
        raise ValueError("%s must have shape %s, got %s" % (name, shape, describe(a)))
    if output:
        if not cnp.PyArray_ISWRITEABLE(<cnp.ndarray>a):
            raise ValueError("%s must be writeable, got a read-only %s" % (name, describe(a)))
        check_no_self_overlap(<cnp.ndarray>a, name)
    return 0


cdef inline bint _rows_view_ok(cnp.ndarray a) noexcept:
    """2-D with unit stride along the last axis and a non-negative row stride."""
    return (cnp.PyArray_NDIM(a) == 2 and
            (cnp.PyArray_DIMS(a)[1] <= 1 or cnp.PyArray_STRIDES(a)[1] == 4) and
            cnp.PyArray_STRIDES(a)[0] >= 0 and cnp.PyArray_STRIDES(a)[0] % 4 == 0 and
            (<uintptr_t>cnp.PyArray_DATA(a)) % 4 == 0)


cdef cnp.ndarray _as_rows(object a, Py_ssize_t width):
    """A (rows, width) float32 view of `a` (..., width) with unit last stride, or a
    C-contiguous copy where no such view exists (inputs only)."""
    cdef cnp.ndarray r = <cnp.ndarray>np.reshape(a, (-1, width))
    if not _rows_view_ok(r):
        r = <cnp.ndarray>np.ascontiguousarray(r)
    return r


cdef object _rows_view_or_none(cnp.ndarray a, Py_ssize_t rows, Py_ssize_t width):
    """A (rows, width) view of `a` that writes through to it, or None."""
    v = a.view(np.ndarray)
    try:
        v.shape = (rows, width)
    except AttributeError:
        return None
    return v if _rows_view_ok(<cnp.ndarray>v) else None


cdef struct Rows:
    # an operand seen as rows: M rows of `width` floats, ld floats apart
    char *data
    Py_ssize_t M
    Py_ssize_t ld


cdef inline bint _plain_rows(object a, Py_ssize_t width, bint output, Rows *r) noexcept:
    """Whether `a` is, as it stands, a valid (..., width) operand of the fast call path (and
    then its rows in r): an exact ndarray of native float32 with at least one row, either
    C-contiguous (any leading axes) or 2-D with unit last stride (_rows_view_ok); an output
    also writeable with rows that cannot alias each other.  False sends the call through
    the general path, which converts what it can and raises the errors."""
    if not cnp.PyArray_CheckExact(a):
        return False
    cdef cnp.ndarray v = <cnp.ndarray>a
    cdef int nd = cnp.PyArray_NDIM(v)
    if (nd < 1 or cnp.PyArray_DIMS(v)[nd - 1] != width or width < 1
            or cnp.PyArray_TYPE(v) != cnp.NPY_FLOAT or not cnp.PyArray_ISNOTSWAPPED(v)):
        return False
    if output and not cnp.PyArray_ISWRITEABLE(v):
        return False
    r.data = <char *>cnp.PyArray_DATA(v)
    r.M = cnp.PyArray_SIZE(v) // width
    if r.M < 1:
        return False
    if cnp.PyArray_IS_C_CONTIGUOUS(v) and (<uintptr_t>r.data) % 4 == 0:
        r.ld = width
        return True
    if nd != 2 or not _rows_view_ok(v):
        return False
    r.ld = cnp.PyArray_STRIDES(v)[0] // 4
    return not output or r.M == 1 or r.ld >= width


cdef inline void _rows_of(cnp.ndarray a, Rows *r) noexcept:
    """The rows of a (rows, width) view with unit last stride (_rows_view_ok)."""
    r.data = <char *>cnp.PyArray_DATA(a)
    r.M = cnp.PyArray_DIMS(a)[0]
    r.ld = cnp.PyArray_STRIDES(a)[0] // 4


cdef inline bint _same_leading(cnp.ndarray a, cnp.ndarray b) noexcept:
    """Equal number of axes and equal sizes along all but the last."""
    cdef int k, nd = cnp.PyArray_NDIM(a)
    if cnp.PyArray_NDIM(b) != nd:
        return False
    for k in range(nd - 1):
        if cnp.PyArray_DIMS(a)[k] != cnp.PyArray_DIMS(b)[k]:
            return False
    return True


cdef struct RowChunks:
    # rows [0, M) of a stage in chunks any thread of the team may claim (rows_plan)
    Py_ssize_t M
    Py_ssize_t next
    Py_ssize_t chunk
    Py_ssize_t nchunks
    nc_gate gate


cdef void rows_plan(RowChunks *r, Py_ssize_t M, int nt) noexcept nogil:
    """Up to 4 chunks of rows per thread (at least one row each); set before the team
    starts.  A row's result does not depend on the chunk it is in."""
    cdef Py_ssize_t n = 4 * <Py_ssize_t>nt
    r.M = M
    r.chunk = (M + n - 1) // n if M > 0 else 1
    if r.chunk < 1:
        r.chunk = 1
    r.nchunks = (M + r.chunk - 1) // r.chunk
    r.next = 0
    nc_gate_init(&r.gate, <int>r.nchunks)


cdef inline int rows_next(RowChunks *r, Py_ssize_t *a, Py_ssize_t *b) noexcept nogil:
    """The next unclaimed chunk [a, b) of r's rows (1), or none left (0)."""
    cdef Py_ssize_t c = nc_claim(&r.next)
    if c >= r.nchunks:
        return 0
    a[0] = c * r.chunk
    b[0] = a[0] + r.chunk if a[0] + r.chunk < r.M else r.M
    return 1


cdef struct GemmJob:
    const float *x
    Py_ssize_t ldx
    const float *wp
    Py_ssize_t N
    Py_ssize_t K
    const float *bias
    const float *res
    Py_ssize_t ldr
    float *y
    Py_ssize_t ldy
    int act
    Py_ssize_t M
    Py_ssize_t npanels
    Py_ssize_t mr
    bint by_rows
    # dynamic schedule, set by gemm_plan before the team starts: by rows, the team claims
    # chunks of rows through `next`; by panels, grains of `grain` panels from `ranges`
    Py_ssize_t next
    Py_ssize_t chunk
    Py_ssize_t nchunks
    nc_ranges ranges
    Py_ssize_t grain
    nc_gate gate              # units not yet done: chunks (by rows) or panels
    # fused norm epilogue (norm < 0: none): rows of y normalized into z; split by panels,
    # after the gate, in chunks of rows claimed through nrows
    int norm
    const float *nw
    const float *nb
    double eps
    float *z
    Py_ssize_t ldz
    RowChunks nrows


cdef inline void gemm_rows(const GemmJob *j, Py_ssize_t a, Py_ssize_t b) noexcept nogil:
    """Rows [a, b), every panel; with the norm epilogue, row block by row block (each block
    normalized while it is still in cache: nc_gemm_mc rows, the GEMM's own row block)."""
    cdef Py_ssize_t c, e, mc
    if j.norm < 0:
        nc_gemm_run(j.x, j.ldx, j.wp, j.N, j.K, j.bias, j.res, j.ldr, j.y, j.ldy,
                    j.act, a, b, 0, j.npanels, -1)
        return
    mc = nc_gemm_mc(j.K, b - a)   # nc_gemm_run's own row blocks
    c = a
    while c < b:
        e = c + mc if c + mc < b else b
        nc_gemm_run(j.x, j.ldx, j.wp, j.N, j.K, j.bias, j.res, j.ldr, j.y, j.ldy,
                    j.act, c, e, 0, j.npanels, -1)
        norm_rows(j.norm, j.y + c * j.ldy, j.ldy, j.z + c * j.ldz, j.ldz, e - c, j.N,
                  j.nw, j.nb, j.eps)
        c = e


cdef inline bint split_by_rows(Py_ssize_t M, Py_ssize_t npanels, int nt) noexcept nogil:
    """Whether a team of nt threads splits an M-row GEMM by rows (each thread streams every
    panel of the weights for its rows) or by column panels (each thread streams its panels
    once for all the rows).  By rows from ROWS_PER_THREAD rows per thread, or from
    ROWS_PER_THREAD_WIDE when the weights give every thread at least PANELS_PER_THREAD
    panels: split by rows, each thread streamed all the weights from L3 for its share, and
    M = 96..256 ran 1.14-1.38x slower than split by panels (2 threads, AMD EPYC VM,
    N x K = 1152x384, 384x384, 1536x384, 384x1536; in-process A/B, medians of 31); from
    384 rows on the two were within 0.98-1.09x, and at 4096 by rows was 2-10% faster."""
    if nt <= 1:
        return True
    if npanels >= <Py_ssize_t>PANELS_PER_THREAD * nt:
        return M >= <Py_ssize_t>ROWS_PER_THREAD_WIDE * nt
    return M >= <Py_ssize_t>ROWS_PER_THREAD * nt


cdef void gemm_plan(GemmJob *j, int nt) noexcept nogil:
    """The work a team of nt threads claims (set before it starts).

    By rows: k chunks per thread, k up to CHUNKS_PER_THREAD, of whole micro-tiles of rows,
    claimed in any order.  A chunk of rows streams every panel once, so it keeps at least
    ~64 rows (a row chunk of 12 would stream the weights 4x as often as a thread's share).

    By panels (few rows): one range of consecutive column panels per thread, claimed from
    its front a grain at a time, and the back of the fullest range taken by any thread whose
    own range is empty (nc_ranges_next).  A thread works through consecutive panels, so each
    panel's tiles prefetch the next one (ranges of 9 panels handed out as separate chunks
    started cold four times as often and made the MiniLM batch-1 forward ~6% slower), and a
    late or slow thread costs one grain, not its share: a worker woken from sleep at the
    start of the parallel region, or one core of a shared machine running slower, kept the
    other waiting at the end of the stage (up to ~8% of a batch-1 MiniLM forward on the AMD
    EPYC VM, when stages still ended at a barrier).  A grain is ~64K FMAs of work (one
    panel of 16 columns at 11+ rows and K = 384), and whole groups of four panels for a
    single row (nc_gemm_run's GEMV path takes four at a time).  One thread: one chunk.
    Each part of the job has a gate (nc_gate) counting its units not yet done: the GEMM's
    chunks or panels, and the norm epilogue's row chunks."""
    cdef Py_ssize_t units, k, per, n, g
    if j.by_rows:
        units = (j.M + j.mr - 1) // j.mr
        per = (64 + j.mr - 1) // j.mr
        k = units // (<Py_ssize_t>nt * per) if nt > 1 else 1
        if k > CHUNKS_PER_THREAD:
            k = CHUNKS_PER_THREAD
        if k < 1:
            k = 1
        n = <Py_ssize_t>nt * k if nt > 1 else 1
        if n > units:
            n = units
        if n < 1:
            n = 1
        j.chunk = (units + n - 1) // n
        j.nchunks = (units + j.chunk - 1) // j.chunk
        j.next = 0
        nc_gate_init(&j.gate, <int>j.nchunks)
        return
    per = j.M * j.K * nc_gemm_nr()      # FMAs of one panel
    g = (65536 + per - 1) // per if per > 0 else 1
    if j.M == 1:
        g = (g + 3) // 4 * 4
    j.grain = g if g > 0 else 1
    nc_ranges_init(&j.ranges, j.npanels, nt)
    nc_gate_init(&j.gate, <int>j.npanels)
    if j.norm >= 0:
        rows_plan(&j.nrows, j.M, nt)


cdef void gemm_part(GemmJob *j) noexcept nogil:
    """The calling thread's work, claimed until none is left: chunks of whole rows (by_rows;
    the norm epilogue included), or grains of column panels for every row (the norm
    epilogue then runs after the gate, gemm_team); see gemm_plan.  Dynamic: equal static
    shares made the slowest core set the time (on the AMD EPYC VM one core at a time runs
    ~1.6x slower for 0.1-1 s).  Each output element is computed the same way by any thread
    (the same bits).  The units done are added to j.gate once, at the end."""
    cdef Py_ssize_t c, a, b, hint
    cdef int own, done = 0
    if j.by_rows:
        while True:
            c = nc_claim(&j.next)
            if c >= j.nchunks:
                break
            a = c * j.chunk * j.mr
            b = (c + 1) * j.chunk * j.mr
            if b > j.M:
                b = j.M
            if a < b:
                gemm_rows(j, a, b)
            done += 1
        nc_gate_done(&j.gate, done)
        return
    own = omp_get_thread_num()
    while nc_ranges_next(&j.ranges, own, j.grain, &a, &b, &hint):
        nc_gemm_run(j.x, j.ldx, j.wp, j.N, j.K, j.bias, j.res, j.ldr, j.y, j.ldy,
                    j.act, 0, j.M, a, b, hint)
        done += <int>(b - a)
    nc_gate_done(&j.gate, done)


cdef void norm_part(int kind, RowChunks *r, const float *x, Py_ssize_t ldx, float *y,
                    Py_ssize_t ldy, Py_ssize_t d, const float *w, const float *b,
                    double eps) noexcept nogil:
    """The calling thread's chunks of a row-norm stage (claimed until none is left), then
    its count added to r's gate."""
    cdef Py_ssize_t a0, a1
    cdef int done = 0
    while rows_next(r, &a0, &a1):
        norm_rows(kind, x + a0 * ldx, ldx, y + a0 * ldy, ldy, a1 - a0, d, w, b, eps)
        done += 1
    nc_gate_done(&r.gate, done)


cdef void gemm_team(GemmJob *j) noexcept nogil:
    """The calling thread's part of the GEMM; with the norm epilogue and a split by panels,
    the wait for every panel (j.gate), then chunks of rows of the norm.  gemm_gate(j): the
    gate after which the whole job is done."""
    gemm_part(j)
    if j.norm >= 0 and not j.by_rows:
        nc_gate_wait(&j.gate)
        norm_part(j.norm, &j.nrows, j.y, j.ldy, j.z, j.ldz, j.N, j.nw, j.nb, j.eps)


cdef inline nc_gate *gemm_gate(GemmJob *j) noexcept nogil:
    """The gate that closes job j (its norm's rows, or its GEMM units)."""
    if j.norm >= 0 and not j.by_rows:
        return &j.nrows.gate
    return &j.gate


cdef void gemm_exec(GemmJob *j, int nt) noexcept nogil:
    cdef Py_ssize_t t
    if nt <= 1:
        j.by_rows = True
        gemm_rows(j, 0, j.M)
        return
    gemm_plan(j, nt)
    if j.norm < 0 or j.by_rows:
        for t in prange(nt, schedule='static', num_threads=nt):
            gemm_part(j)
        return
    # few rows, split by panels: every panel of a row must be done before it is
    # normalized, so the norm's rows are claimed after the GEMM's gate (one parallel
    # region for both)
    nc_team_enter()
    for t in prange(nt, schedule='static', num_threads=nt):
        gemm_team(j)
    nc_team_leave()


cdef class PackedLinear:
    """A linear layer whose weight is packed once for normcy's GEMM micro-kernel.

    ``y = act(x @ weight.T + bias) (+ residual)``, with the weight in ``torch.nn.Linear``
    layout, optionally followed by a LayerNorm or RMSNorm of each output row in the same
    call (``norm=``: a Transformer sub-layer's residual add + norm, computed while the rows
    are in cache).  The packing happens here, once (for the SIMD variant chosen at import);
    calls stream the packed panels.

    Parameters
    ----------
    weight : numpy.ndarray
        float32, shape (out_features, in_features), any strides.
    bias : numpy.ndarray or None
        float32, shape (out_features,).

    Notes
    -----
    Results are bit-identical for every thread count, and each row's result does not
    depend on the other rows of the call (batch invariance).
    """

    cdef readonly Py_ssize_t in_features
    cdef readonly Py_ssize_t out_features
    cdef cnp.ndarray _packed
    cdef cnp.ndarray _bias
    cdef const float *_wp
    cdef Py_ssize_t _nr

    def __init__(self, weight, bias=None):
        # immutable once made: a second __init__ (another thread may be inside a call,
        # reading the packed panels without the GIL) would free what that call reads
        if self._packed is not None:
            raise TypeError("PackedLinear.__init__ may run only once (a PackedLinear is "
                            "immutable); make a new PackedLinear instead")
        weight = plain(weight, "weight")
        bias = plain(bias, "bias")
        if not isinstance(weight, np.ndarray):
            raise TypeError("weight must be a numpy.ndarray, got %s" % type(weight).__name__)
        if weight.dtype != np.float32:
            raise TypeError("weight must be float32, got %s" % describe(weight))
        if weight.ndim != 2:
            raise ValueError("weight must be 2-D (out_features, in_features), got %s"
                             % describe(weight))
        cdef Py_ssize_t N = weight.shape[0], K = weight.shape[1]
        if N < 1 or K < 1:
            raise ValueError("weight must have out_features >= 1 and in_features >= 1, got %s"
                             % describe(weight))
        if bias is not None:
            if not isinstance(bias, np.ndarray):
                raise TypeError("bias must be a numpy.ndarray or None, got %s"
                                % type(bias).__name__)
            if bias.dtype != np.float32:
                raise TypeError("bias must be float32, got %s" % describe(bias))
            if bias.shape != (N,):
                raise ValueError("bias must have shape (%d,) to match weight %s, got %s"
                                 % (N, weight.shape, describe(bias)))
            bias_c = np.ascontiguousarray(bias).copy()
        else:
            bias_c = None
        # only the packed panels are kept (the weight itself is unpacked from them on
        # request: .weight, pickling), so a model holds its matrices once
        cdef cnp.ndarray wc = <cnp.ndarray>np.ascontiguousarray(weight)
        cdef Py_ssize_t nr = nc_gemm_nr()
        cdef Py_ssize_t npan = (N + nr - 1) // nr
        cdef Py_ssize_t total = npan * K * nr
        # 64-byte aligned buffer: every panel row is then aligned for the vector loads
        raw = np.empty(total + 16, dtype=np.float32)
        off = ((-raw.ctypes.data) % 64) // 4
        cdef cnp.ndarray packed = raw[off:off + total]
        cdef const float *w = <const float *>cnp.PyArray_DATA(wc)
        cdef float *wp = <float *>cnp.PyArray_DATA(packed)
        with nogil:
            nc_gemm_pack(w, K, N, K, wp)
        # the object's state is set only here, when nothing can fail any more
        self._bias = bias_c
        self.in_features = K
        self.out_features = N
        self._nr = nr
        self._packed = packed
        self._wp = <const float *>wp

    @property
    def weight(self):
        """The weight (out_features, in_features): a new read-only array, unpacked from the
        packed panels (the packing only moves values, so these are the weight's bits)."""
        cdef Py_ssize_t N = self.out_features, K = self.in_features, nr = self._nr
        cdef cnp.ndarray w = np.empty((N, K), dtype=np.float32)
        cdef float *dst = <float *>cnp.PyArray_DATA(w)
        cdef const float *src = self._wp
        cdef Py_ssize_t n, k, p, jj
        with nogil:
            for n in range(N):
                p = n // nr
                jj = n - p * nr
                for k in range(K):
                    dst[n * K + k] = src[(p * K + k) * nr + jj]
        w.setflags(write=False)
        return w

    @property
    def bias(self):
        """The bias (out_features,) or None (a copy)."""
        return None if self._bias is None else self._bias.copy()

    def __repr__(self):
        return "PackedLinear(in_features=%d, out_features=%d, bias=%s)" % (
            self.in_features, self.out_features, self._bias is not None)

    def __reduce__(self):
        return (PackedLinear, (self.weight, self.bias))

    cdef int _run(self, const Rows *x, const Rows *r, const Rows *g, const Rows *z,
                  int act, int nkind, object nw, object nb, double neps,
                  object num_threads) except -1:
        """The GEMM of validated row operands: x, residual r (or NULL), GEMM output g,
        normalized output z (g itself without a norm)."""
        cdef Py_ssize_t M = x.M
        cdef GemmJob j
        j.x = <const float *>x.data
        j.ldx = x.ld
        j.wp = self._wp
        j.N = self.out_features
        j.K = self.in_features
        j.bias = <const float *>cnp.PyArray_DATA(self._bias) if self._bias is not None else NULL
        j.res = <const float *>r.data if r != NULL else NULL
        j.ldr = r.ld if r != NULL else 0
        j.y = <float *>g.data
        j.ldy = g.ld
        j.act = act
        j.norm = nkind
        j.nw = <const float *>cnp.PyArray_DATA(nw) if nw is not None else NULL
        j.nb = <const float *>cnp.PyArray_DATA(nb) if nb is not None else NULL
        j.eps = neps
        j.z = <float *>z.data
        j.ldz = z.ld
        j.M = M
        j.npanels = (self.out_features + self._nr - 1) // self._nr
        j.mr = nc_gemm_mr()
        cdef Py_ssize_t fmas = M * self.out_features * self.in_features
        cdef int nt = resolve_threads(num_threads, fmas // 8 if fmas >= SERIAL_FMAS else 0,
                                      max(j.npanels, (M + j.mr - 1) // j.mr))
        j.by_rows = split_by_rows(M, j.npanels, nt)
        if not j.by_rows and j.npanels < nt:
            nt = <int>j.npanels
        with nogil:
            gemm_exec(&j, nt)
        return 0

    def __call__(self, x, *, activation=None, residual=None, norm=None, norm_weight=None,
                 norm_bias=None, eps=_EPS_DEFAULT, sum_out=None, out=None, num_threads=None):
        """``act(x @ weight.T + bias) (+ residual)``, optionally normalized row by row.

        Parameters
        ----------
        x : numpy.ndarray
            float32, shape (..., in_features), any strides.
        activation : {None, 'relu', 'gelu', 'gelu_tanh'}
            Applied to ``x @ weight.T + bias`` ('gelu' is the exact erf form).
        residual : numpy.ndarray, optional
            float32, shape (..., out_features) (same leading shape as x), added after the
            activation.
        norm : {None, 'layer_norm', 'rms_norm'}
            Fused epilogue: the rows ``s = act(x @ weight.T + bias) (+ residual)`` are
            normalized over their out_features values while they are in cache, exactly as
            :func:`normcy.layer_norm` / :func:`normcy.rms_norm` would normalize ``s`` (the
            same bits), so ``out = layer_norm(s, norm_weight, norm_bias, eps)``: a post-LN
            Transformer's ``LN(x + F(x))`` in one call.
        norm_weight, norm_bias : array_like, shape (out_features,), optional
            The norm's scale and shift (``norm_bias`` only for 'layer_norm'); None for none.
        eps : float, default 1e-5
            The norm's epsilon (inside the square root).
        sum_out : numpy.ndarray, optional
            float32, shape (..., out_features): receives ``s`` before the norm (what a
            pre-LN model carries on as its residual stream).  Only with `norm`; must not
            overlap x or out.
        out : numpy.ndarray, optional
            float32, shape (..., out_features); may be `residual` itself, must not overlap x.
        num_threads : int, optional
            Threads for this call (default: normcy's setting; small work runs serially).

        Returns
        -------
        numpy.ndarray
            `out`, or a new C-contiguous array.
        """
        if self._wp == NULL:
            raise TypeError("this PackedLinear was never initialized (made with __new__ "
                            "without __init__)")
        cdef int act = _act_code(activation)
        cdef Rows xw, yw, rw
        cdef Rows *rp = NULL
        cdef cnp.npy_intp fdims[32]
        cdef int fk, xnd
        cdef bint fast
        if eps is not _EPS_DEFAULT:
            parse_eps(eps, "eps")       # also when no norm uses it: a bad value is an error
        if (norm is None and sum_out is None and norm_weight is None and norm_bias is None
                and _plain_rows(x, self.in_features, False, &xw)
                and (residual is None or
                     (_plain_rows(residual, self.out_features, False, &rw)
                      and _same_leading(<cnp.ndarray>residual, <cnp.ndarray>x)))):
            # The fast path (call overhead ~0.25 us instead of ~1.5 us: a 1 x 8 x 8 call on
            # the AMD EPYC Zen 5): x, out and the residual valid as they stand (C-contiguous
            # with any leading axes, or 2-D rows), out disjoint from both, no norm.  Anything
            # else, errors and in-place residuals included, takes the general path below.
            if residual is not None:
                rp = &rw
            xnd = cnp.PyArray_NDIM(<cnp.ndarray>x)
            if out is None and xnd <= 32:
                for fk in range(xnd - 1):
                    fdims[fk] = cnp.PyArray_DIMS(<cnp.ndarray>x)[fk]
                fdims[xnd - 1] = self.out_features
                out = cnp.PyArray_EMPTY(xnd, fdims, cnp.NPY_FLOAT, 0)
                yw.data = <char *>cnp.PyArray_DATA(<cnp.ndarray>out)
                yw.M = xw.M
                yw.ld = self.out_features
                fast = True
            else:
                fast = (out is not None and _plain_rows(out, self.out_features, True, &yw)
                        and _same_leading(<cnp.ndarray>out, <cnp.ndarray>x)
                        and disjoint(<cnp.ndarray>out, <cnp.ndarray>x)
                        and (rp == NULL or disjoint(<cnp.ndarray>out, <cnp.ndarray>residual)))
            if fast:
                self._run(&xw, rp, &yw, &yw, act, -1, None, None, 0.0, num_threads)
                return out
        cdef object caller_out = out
        cdef int nkind = -1
        cdef double neps = 0.0
        cdef object nw = None, nb = None
        x = plain(x, "x")
        residual = plain(residual, "residual")
        out = plain(out, "out")
        sum_out = plain(sum_out, "sum_out")
        if norm is not None:
            if norm == "layer_norm":
                nkind = KIND_LN
            elif norm == "rms_norm":
                nkind = KIND_RMS
            else:
                raise ValueError("norm must be None, 'layer_norm' or 'rms_norm', got %r"
                                 % (norm,))
            neps = parse_eps(eps, "eps")
            nw = as_param(norm_weight, self.out_features, "norm_weight")
            nb = as_param(norm_bias, self.out_features, "norm_bias")
            if nb is not None and nkind == KIND_RMS:
                raise ValueError("norm_bias is only for norm='layer_norm' (rms_norm has no "
                                 "shift)")
        elif norm_weight is not None or norm_bias is not None or sum_out is not None:
            raise ValueError("norm_weight, norm_bias and sum_out need norm='layer_norm' or "
                             "'rms_norm'")

        if not isinstance(x, np.ndarray):
            raise TypeError("x must be a numpy.ndarray, got %s" % type(x).__name__)
        if (<cnp.ndarray>x).dtype != np.float32:
            raise TypeError("x must be float32, got %s" % describe(x))
        cdef int nd = cnp.PyArray_NDIM(<cnp.ndarray>x)
        if nd < 1 or cnp.PyArray_DIMS(<cnp.ndarray>x)[nd - 1] != self.in_features:
            raise ValueError("x must have shape (..., %d), got %s" % (self.in_features, describe(x)))
        cdef tuple oshape = shape_of(x)[:nd - 1] + (self.out_features,)
        cdef Py_ssize_t M = 1, k
        for k in range(nd - 1):
            M *= cnp.PyArray_DIMS(<cnp.ndarray>x)[k]
        if residual is not None:
            _check_operand(residual, "residual", oshape, False)
        if out is None:
            out = np.empty(oshape, dtype=np.float32)
        else:
            _check_operand(out, "out", oshape, True)
            check_overlap(<cnp.ndarray>out, "out", x, "x", False)
            check_overlap(<cnp.ndarray>out, "out", residual, "residual", True)
        if sum_out is not None:
            _check_operand(sum_out, "sum_out", oshape, True)
            check_overlap(<cnp.ndarray>sum_out, "sum_out", x, "x", False)
            check_overlap(<cnp.ndarray>sum_out, "sum_out", residual, "residual", True)
            check_overlap(<cnp.ndarray>sum_out, "sum_out", out, "out", False)
        if nkind >= 0:
            check_overlap(<cnp.ndarray>out, "out", nw, "norm_weight", False)
            check_overlap(<cnp.ndarray>out, "out", nb, "norm_bias", False)
            if sum_out is not None:
                check_overlap(<cnp.ndarray>sum_out, "sum_out", nw, "norm_weight", False)
                check_overlap(<cnp.ndarray>sum_out, "sum_out", nb, "norm_bias", False)
        if M == 0:
            resolve_threads(num_threads, 0, 1)     # checked as for any other call
            return out if caller_out is None else caller_out
        cdef cnp.ndarray xr = _as_rows(x, self.in_features)
        cdef cnp.ndarray rr = _as_rows(residual, self.out_features) if residual is not None else None
        cdef object yv = _rows_view_or_none(<cnp.ndarray>out, M, self.out_features)
        cdef cnp.ndarray yr, sr = None
        cdef bint copy_back = False, sum_back = False
        if yv is not None:
            yr = <cnp.ndarray>yv
        else:
            # no (M, N) view with unit last stride: compute into a temporary
            copy_back = True
            yr = <cnp.ndarray>np.empty((M, self.out_features), dtype=np.float32)
        if sum_out is not None:
            sv = _rows_view_or_none(<cnp.ndarray>sum_out, M, self.out_features)
            if sv is not None:
                sr = <cnp.ndarray>sv
            else:
                sum_back = True
                sr = <cnp.ndarray>np.empty((M, self.out_features), dtype=np.float32)
        # the GEMM writes s into sum_out when there is one (the norm then reads it from
        # there into out), else into out (normalized in place)
        cdef cnp.ndarray gr = sr if sr is not None else yr
        if (rr is not None and nc_gemm_kc(self.in_features) < self.in_features
                and np.may_share_memory(rr, gr)):
            # partial sums of the K blocks go through the output: keep the residual apart
            rr = <cnp.ndarray>np.array(rr, copy=True)
        cdef Rows gw, zw
        _rows_of(xr, &xw)
        _rows_of(gr, &gw)
        _rows_of(yr, &zw)
        if rr is not None:
            _rows_of(rr, &rw)
        self._run(&xw, &rw if rr is not None else NULL, &gw, &zw, act, nkind, nw, nb, neps,
                  num_threads)
        if copy_back:
            np.copyto(out, yr.reshape(oshape))
        if sum_back:
            np.copyto(sum_out, sr.reshape(oshape))
        return out if caller_out is None else caller_out


cdef struct AttnJob:
    const float *qkv
    Py_ssize_t ld
    const float *bq
    float *ctx
    Py_ssize_t ldc
    Py_ssize_t L
    Py_ssize_t H
    Py_ssize_t nhead
    Py_ssize_t dh
    int causal
    const float *mask
    Py_ssize_t m_sb
    Py_ssize_t m_sh
    Py_ssize_t m_ld
    const uint8_t *kpm
    Py_ssize_t k_ld
    Py_ssize_t nblk
    Py_ssize_t next           # the next unclaimed block (attn_part)


cdef inline Py_ssize_t attn_ldk(Py_ssize_t L) noexcept nogil:
    """Row stride of K^T for the attention kernel: L rounded up to four of the chosen
    variant's vectors (nc_isa_vbytes() floats), since its score loops read whole vectors."""
    cdef Py_ssize_t q = nc_isa_vbytes()
    return (L + q - 1) // q * q


cdef void attn_block(const AttnJob *j, Py_ssize_t blk, float *buf,
                     Py_ssize_t lk) noexcept nogil:
    """One (sequence, head): K transposed (row stride lk; the padding past L is zero from
    attn_part) and V gathered into buf (compact: the projection rows are 3H floats apart,
    which maps V's rows onto a few L1 sets), attention into ctx (q and its bias are read in
    place)."""
    cdef Py_ssize_t bs = blk // j.nhead, hh = blk - (blk // j.nhead) * j.nhead
    cdef Py_ssize_t L = j.L, dh = j.dh, s0, s1, s, d
    cdef float *kt = buf
    cdef float *v = buf + lk * dh
    cdef float *scores = v + L * dh
    cdef const float *base = j.qkv + bs * L * j.ld + hh * dh
    cdef const float *kr = base + j.H
    cdef const uint8_t *kp = NULL
    cdef const float *mk = NULL
    # K^T in blocks of 8 keys: each pass reads 8 rows and writes 8 consecutive floats of
    # every row of kt
    s0 = 0
    while s0 < L:
        s1 = s0 + 8 if s0 + 8 < L else L
        for d in range(dh):
            for s in range(s0, s1):
                kt[d * lk + s] = kr[s * j.ld + d]
        s0 = s1
    for s in range(L):
        for d in range(dh):
            v[s * dh + d] = kr[j.H + s * j.ld + d]
    if j.mask != NULL:
        mk = j.mask + bs * j.m_sb + hh * j.m_sh
    if j.kpm != NULL:
        kp = j.kpm + bs * j.k_ld
    nc_attention_head(base, j.ld, j.bq + hh * dh, kt, lk, v, dh,
                      j.ctx + bs * L * j.ldc + hh * dh, j.ldc, L, dh, L, j.causal, mk, j.m_ld,
                      kp, scores)


cdef inline Py_ssize_t attn_scratch_floats(Py_ssize_t L, Py_ssize_t dh) noexcept nogil:
    """Floats of one thread's attention scratch for sequences of length <= L (K^T, V, the
    score rows of a tile of up to nc_gemm_mr() queries and their biased q), rounded up to
    whole 64-byte lines so that the threads' slices of one allocation share no cache
    line."""
    cdef Py_ssize_t lk = attn_ldk(L)
    cdef Py_ssize_t mr = nc_gemm_mr()
    if mr < 2:
        mr = 2
    return (lk * dh + L * dh + mr * (lk + dh) + 15) // 16 * 16


cdef int attn_part(AttnJob *j, float *buf) noexcept nogil:
    """The calling thread's (sequence, head) blocks, claimed one at a time from j.next (zero
    before the team starts) until none is left (dynamic, as gemm_part), in its own scratch
    buf (attn_scratch_floats(j.L, j.dh) floats at least, allocated by the caller before the
    parallel region so that a failed allocation is an error, not unwritten heads).  Returns
    the number of blocks it did."""
    cdef Py_ssize_t i, lk = attn_ldk(j.L)
    cdef bint zeroed = False
    cdef int done = 0
    while True:
        i = nc_claim(&j.next)
        if i >= j.nblk:
            return done
        if not zeroed:
            # K^T's padding columns: zero once (the blocks overwrite columns < L only)
            memset(buf, 0, lk * j.dh * sizeof(float))
            zeroed = True
        attn_block(j, i, buf, lk)
        done += 1


def attention(qkv, bq, ctx, Py_ssize_t nseq, Py_ssize_t L, Py_ssize_t nhead, *,
              mask=None, key_padding_mask=None, bint is_causal=False, num_threads=None):
    """Fused multi-head attention on packed projections (package-internal: normcy.transformer).

    qkv : (nseq*L, 3H) float32 rows ``[q | k | v]`` with unit last stride, q already scaled
    (its bias `bq` (H,) is added here; the key bias cancels in the softmax and the value bias
    is folded into the output projection by the caller).  ctx : (nseq*L, H) float32 output
    rows (unit last stride).  mask : additive float32 broadcastable to (nseq, nhead, L, L)
    with unit last stride, or None; key_padding_mask : (nseq, L) bool/uint8 (True = masked)
    or None.  One task per (sequence, head), spread over threads; scores stay in cache.
    """
    cdef cnp.ndarray a = <cnp.ndarray>qkv
    cdef cnp.ndarray c = <cnp.ndarray>ctx
    cdef Py_ssize_t H
    if nseq < 0 or L < 0:
        raise ValueError("attention: nseq and L must be >= 0, got %d and %d" % (nseq, L))
    if (not isinstance(qkv, np.ndarray) or a.dtype != np.float32 or a.ndim != 2
            or a.shape[1] % 3 or a.shape[0] != nseq * L or not _rows_view_ok(a)):
        raise ValueError("attention: bad qkv %s" % describe(qkv))
    H = a.shape[1] // 3
    if nhead < 1 or H % nhead:
        raise ValueError("attention: nhead %d does not divide %d" % (nhead, H))
    if (not isinstance(ctx, np.ndarray) or c.dtype != np.float32 or c.ndim != 2
            or c.shape[0] != nseq * L or c.shape[1] != H or not _rows_view_ok(c)
            or not c.flags.writeable):
        raise ValueError("attention: bad ctx %s" % describe(ctx))
    check_overlap(c, "ctx", a, "qkv", False)    # q, k and v are read as ctx is written
    if (not isinstance(bq, np.ndarray) or bq.dtype != np.float32 or bq.shape != (H,)
            or not bq.flags.c_contiguous):
        raise ValueError("attention: bad bq %s" % describe(bq))
    cdef AttnJob j
    j.qkv = <const float *>cnp.PyArray_DATA(a)
    j.ld = a.strides[0] // 4
    j.bq = <const float *>cnp.PyArray_DATA(<cnp.ndarray>bq)
    j.ctx = <float *>cnp.PyArray_DATA(c)
    j.ldc = c.strides[0] // 4
    j.L = L
    j.H = H
    j.nhead = nhead
    j.dh = H // nhead
    j.causal = 1 if is_causal else 0
    j.mask = NULL
    j.kpm = NULL
    j.m_sb = j.m_sh = j.m_ld = j.k_ld = 0
    cdef cnp.ndarray m, kp
    if mask is not None:
        m = <cnp.ndarray>np.broadcast_to(mask, (nseq, nhead, L, L))
        if m.dtype != np.float32 or (L > 1 and m.strides[3] != 4):
            m = <cnp.ndarray>np.ascontiguousarray(np.broadcast_to(mask, (nseq, nhead, L, L)),
                                                  dtype=np.float32)
        j.mask = <const float *>cnp.PyArray_DATA(m)
        j.m_sb = m.strides[0] // 4
        j.m_sh = m.strides[1] // 4
        j.m_ld = m.strides[2] // 4
    if key_padding_mask is not None:
        kp = <cnp.ndarray>np.ascontiguousarray(key_padding_mask, dtype=np.uint8)
        if kp.ndim != 2 or kp.shape[0] != nseq or kp.shape[1] != L:
            raise ValueError("attention: bad key_padding_mask %s" % describe(key_padding_mask))
        j.kpm = <const uint8_t *>cnp.PyArray_DATA(kp)
        j.k_ld = L
    j.nblk = nseq * nhead
    j.next = 0
    cdef Py_ssize_t t
    cdef int nt = resolve_threads(num_threads, nseq * L * L * H // 8 + 1, j.nblk)
    if j.nblk == 0:
        return
    cdef Py_ssize_t per = attn_scratch_floats(L, j.dh)
    cdef float *scratch = <float *>malloc(nt * per * sizeof(float))
    if scratch == NULL:
        raise MemoryError("attention: could not allocate %d bytes of scratch"
                          % (nt * per * sizeof(float)))
    try:
        with nogil:
            if nt <= 1:
                attn_part(&j, scratch)
            else:
                for t in prange(nt, schedule='static', num_threads=nt):
                    attn_part(&j, scratch + t * per)
    finally:
        free(scratch)


# ----------------------------------------------------------------- one encoder layer
cdef struct LayerJob:
    # the four GEMMs (their fused epilogues included), in order
    GemmJob qkv
    GemmJob o
    GemmJob f1
    GemmJob f2
    # pre-LN: x normalized into xn before the QKV projection (pre_kind < 0: post-LN), in
    # chunks of rows
    int pre_kind
    RowChunks prows
    const float *x
    float *xn
    Py_ssize_t M
    Py_ssize_t d
    const float *pw
    const float *pb
    double eps
    # attention, one job per group of equal-length sequences; each thread's scratch is
    # ascratch + t * ascratch_per (allocated before the parallel region)
    AttnJob *attn
    Py_ssize_t ngroups
    nc_gate agate             # attention blocks not yet done, all groups
    float *ascratch
    Py_ssize_t ascratch_per


cdef void layer_team(LayerJob *L, int t) noexcept nogil:
    """Thread t of the team: every stage of the layer, each after the gate of the one
    before (each stage reads what the whole team wrote in the one before; the caller waits
    at gemm_gate(&L.f2) before anything reads the layer's output)."""
    cdef Py_ssize_t g
    cdef int done = 0
    if L.pre_kind >= 0:
        norm_part(L.pre_kind, &L.prows, L.x, L.d, L.xn, L.d, L.d, L.pw, L.pb, L.eps)
        nc_gate_wait(&L.prows.gate)
    gemm_team(&L.qkv)
    nc_gate_wait(gemm_gate(&L.qkv))
    for g in range(L.ngroups):
        done += attn_part(&L.attn[g], L.ascratch + t * L.ascratch_per)
    nc_gate_done(&L.agate, done)
    nc_gate_wait(&L.agate)
    gemm_team(&L.o)
    nc_gate_wait(gemm_gate(&L.o))
    gemm_team(&L.f1)
    nc_gate_wait(gemm_gate(&L.f1))
    gemm_team(&L.f2)


cdef void gemm_job(GemmJob *j, PackedLinear lin, const float *x, Py_ssize_t M, int act,
                   const float *res, float *y, int norm, const float *nw, const float *nb,
                   double eps, float *z, int nt) noexcept:
    """A job on C-contiguous (M, K) x and (M, N) res / y / z (z: the norm's output)."""
    j.x = x
    j.ldx = lin.in_features
    j.wp = lin._wp
    j.N = lin.out_features
    j.K = lin.in_features
    j.bias = <const float *>cnp.PyArray_DATA(lin._bias) if lin._bias is not None else NULL
    j.res = res
    j.ldr = lin.out_features
    j.y = y
    j.ldy = lin.out_features
    j.act = act
    j.M = M
    j.npanels = (lin.out_features + lin._nr - 1) // lin._nr
    j.mr = nc_gemm_mr()
    j.by_rows = split_by_rows(M, j.npanels, nt)
    j.norm = norm
    j.nw = nw
    j.nb = nb
    j.eps = eps
    j.z = z
    j.ldz = lin.out_features
    gemm_plan(j, nt)


cdef inline const float *_fptr(cnp.ndarray a) noexcept:
    return <const float *>NULL if a is None else <const float *>cnp.PyArray_DATA(a)


cdef class EncoderLayerKernel:
    """One Transformer encoder layer (post-LN or pre-LN) in a single compiled call: the
    QKV projection, the fused attention, the output projection with its residual + norm
    epilogue, and the feed-forward GEMMs, all in one OpenMP parallel region with a gate
    between stages (nc_gate: the next stage starts once every unit of this one is done;
    private: normcy.transformer builds it from its prepared weights).

    The operations and their order are exactly those of the layer's stage-by-stage path
    (the same kernels on the same rows), so the results are the same bits.
    """
    cdef PackedLinear lqkv, lo, l1, l2
    cdef cnp.ndarray bq, n1w, n1b, n2w, n2b
    cdef int kind, act
    cdef bint pre
    cdef double eps
    cdef Py_ssize_t d, f, nhead
    cdef Py_ssize_t fmas_per_row

    def __init__(self, PackedLinear lin_qkv, bq, PackedLinear lin_o, PackedLinear lin_1,
                 PackedLinear lin_2, norm1, norm2, double eps, str norm, activation,
                 bint norm_first, Py_ssize_t nhead):
        if self.lqkv is not None:
            raise TypeError("EncoderLayerKernel.__init__ may run only once")
        for lin in (lin_qkv, lin_o, lin_1, lin_2):
            if (<PackedLinear>lin)._wp == NULL:
                raise TypeError("EncoderLayerKernel: an uninitialized PackedLinear")
        cdef Py_ssize_t d = lin_o.out_features, f = lin_1.out_features
        if (lin_qkv.in_features != d or lin_qkv.out_features != 3 * d
                or lin_o.in_features != d or lin_1.in_features != d
                or lin_2.in_features != f or lin_2.out_features != d
                or nhead < 1 or d % nhead):
            raise ValueError("EncoderLayerKernel: inconsistent layer shapes")
        self.lqkv, self.lo, self.l1, self.l2 = lin_qkv, lin_o, lin_1, lin_2
        self.bq = <cnp.ndarray>np.ascontiguousarray(bq, dtype=np.float32)
        if self.bq.shape[0] != d or self.bq.ndim != 1:
            raise ValueError("EncoderLayerKernel: bq must have shape (%d,)" % d)
        if norm == "layer":
            self.kind = KIND_LN
        elif norm == "rms":
            self.kind = KIND_RMS
        else:
            raise ValueError("EncoderLayerKernel: norm must be 'layer' or 'rms'")
        self.n1w = as_param(norm1[0], d, "norm1.weight")
        self.n1b = as_param(norm1[1], d, "norm1.bias")
        self.n2w = as_param(norm2[0], d, "norm2.weight")
        self.n2b = as_param(norm2[1], d, "norm2.bias")
        self.eps = eps
        self.act = _act_code(activation)
        self.pre = norm_first
        self.d, self.f, self.nhead = d, f, nhead
        self.fmas_per_row = d * (3 * d + d + 2 * f)

    def run(self, x, qkv, ctx, mid, hid, out, list groups, num_threads=None, xn=None, *,
            key_padding_mask=None, mask=None, bint is_causal=False):
        """x (M, d) -> out (M, d).  Workspaces (C-contiguous float32, distinct buffers):
        qkv (M, 3d), ctx (M, d), hid (M, f), mid (M, d): post-LN x1 = norm1(x + attn),
        pre-LN s = x + attn; pre-LN also xn (M, d) (norm1(x), then norm2(s)).  groups:
        (row_offset, n_seq, seq_len) of the sequences.  Masks as for run_layers (queries
        whose every key is masked need the caller's stage-by-stage path)."""
        return run_layers([self], x, [out], qkv, ctx, mid, hid, groups, num_threads, xn,
                          key_padding_mask=key_padding_mask, mask=mask, is_causal=is_causal)

    cdef void _fill(self, LayerJob *J, AttnJob *A, const float *xp, float *outp, float *qkvp,
                    float *ctxp, float *midp, float *hidp, float *xnp, Py_ssize_t M,
                    list groups, int nt):
        """The jobs of this layer on these buffers (checked by the caller)."""
        cdef Py_ssize_t d = self.d, g, off, nseq, L
        J.x = xp
        J.xn = xnp
        J.M = M
        J.d = d
        J.eps = self.eps
        J.pre_kind = self.kind if self.pre else -1
        J.pw = _fptr(self.n1w)
        J.pb = _fptr(self.n1b)
        # pre-LN: xn = norm1(x); qkv = xn W; s = x + attn (mid), xn = norm2(s);
        #         hid = act(xn W1); out = s + hid W2
        # post-LN: qkv = x W; x1 = norm1(x + attn) (mid); hid = act(x1 W1);
        #          out = norm2(x1 + hid W2)
        cdef const float *qin = <const float *>xnp if self.pre else xp
        cdef float *onorm_out = xnp if self.pre else midp
        cdef const float *f1in = xnp if self.pre else midp
        cdef cnp.ndarray ow = self.n2w if self.pre else self.n1w
        cdef cnp.ndarray ob = self.n2b if self.pre else self.n1b
        gemm_job(&J.qkv, self.lqkv, qin, M, NCO_ACT_IDENTITY, NULL, qkvp, -1, NULL, NULL,
                 0.0, NULL, nt)
        gemm_job(&J.o, self.lo, ctxp, M, NCO_ACT_IDENTITY, xp, midp, self.kind, _fptr(ow),
                 _fptr(ob), self.eps, onorm_out, nt)
        gemm_job(&J.f1, self.l1, f1in, M, self.act, NULL, hidp, -1, NULL, NULL, 0.0, NULL, nt)
        if self.pre:
            gemm_job(&J.f2, self.l2, hidp, M, NCO_ACT_IDENTITY, midp, outp, -1, NULL, NULL,
                     0.0, NULL, nt)
        else:
            gemm_job(&J.f2, self.l2, hidp, M, NCO_ACT_IDENTITY, midp, outp, self.kind,
                     _fptr(self.n2w), _fptr(self.n2b), self.eps, outp, nt)
        J.ngroups = len(groups)
        J.attn = A
        if self.pre:
            rows_plan(&J.prows, M, nt)
        cdef Py_ssize_t nblk = 0
        for g in range(J.ngroups):
            off, nseq, L = groups[g]
            A[g].qkv = qkvp + off * 3 * d
            A[g].ld = 3 * d
            A[g].bq = <const float *>cnp.PyArray_DATA(self.bq)
            A[g].ctx = ctxp + off * d
            A[g].ldc = d
            A[g].L = L
            A[g].H = d
            A[g].nhead = self.nhead
            A[g].dh = d // self.nhead
            A[g].causal = 0
            A[g].mask = NULL
            A[g].m_sb = A[g].m_sh = A[g].m_ld = A[g].k_ld = 0
            A[g].kpm = NULL
            A[g].nblk = nseq * self.nhead
            A[g].next = 0
            nblk += A[g].nblk
        nc_gate_init(&J.agate, <int>nblk)


def run_layers(list kernels, x, list outs, qkv, ctx, mid, hid, list groups, num_threads=None,
               xn=None, *, key_padding_mask=None, mask=None, bint is_causal=False):
    """Layers kernels[0], kernels[1], ... in sequence, all in one OpenMP parallel region
    (package-internal: normcy.transformer).  Layer l reads x (l = 0) or outs[l-1] and writes
    outs[l]; consecutive layers may ping-pong between two buffers, x's included.  The
    workspaces are shared by the layers (see EncoderLayerKernel.run); every kernel must
    have the same shapes and the same norm placement.  Returns outs[-1].

    Attention masks: is_causal (every group); key_padding_mask (n_seq, L) bool or uint8,
    True = masked key, and mask, additive float32 broadcastable to (n_seq, 1, L, L) with
    unit last stride (these two with one group (0, n_seq, L) only).  As in the stage-by-stage path, a query whose every
    key is masked gets zero attention weights; the caller must not use this path for such
    queries (the layer then takes the folded value bias off their rows, which needs the
    output projection without its fused epilogue)."""
    cdef Py_ssize_t nl = len(kernels), l, g, ng, off, nseq, L, M, d, f
    cdef EncoderLayerKernel k0, k
    if nl < 1 or len(outs) != nl:
        raise ValueError("run_layers: need one output per layer, got %d kernels and %d "
                         "outputs" % (nl, len(outs)))
    k0 = <EncoderLayerKernel?>kernels[0]
    for l in range(nl):
        k = <EncoderLayerKernel?>kernels[l]
        if k.d != k0.d or k.f != k0.f or k.pre != k0.pre:
            raise ValueError("run_layers: the layers differ in shape or norm placement")
    d, f = k0.d, k0.f
    if not isinstance(x, np.ndarray) or (<cnp.ndarray>x).ndim != 2:
        raise ValueError("EncoderLayerKernel.run: x must be 2-D, got %s" % describe(x))
    M = (<cnp.ndarray>x).shape[0]
    _layer_buf(x, "x", M, d, False)
    _layer_buf(qkv, "qkv", M, 3 * d, True)
    _layer_buf(ctx, "ctx", M, d, True)
    _layer_buf(mid, "mid", M, d, True)
    _layer_buf(hid, "hid", M, f, True)
    for l in range(nl):
        _layer_buf(outs[l], "out", M, d, True)
    if k0.pre:
        _layer_buf(xn, "xn", M, d, True)
    else:
        xn = None
    # the workspaces overlap nothing; each layer's output does not overlap its input (x is
    # read by the first layer only: later layers may write over it)
    ws = (qkv, ctx, mid, hid, xn)
    _layer_distinct(ws + (x, outs[0]))
    for l in range(1, nl):
        _layer_distinct(ws + (outs[l - 1], outs[l]))
    ng = len(groups)
    cdef Py_ssize_t covered = 0
    for g in range(ng):
        off, nseq, L = groups[g]
        if off != covered or nseq < 1 or L < 1 or nseq * L > M - off:
            raise ValueError("EncoderLayerKernel.run: groups must tile the %d rows, got %r"
                             % (M, groups))
        covered = off + nseq * L
    if covered != M:
        raise ValueError("EncoderLayerKernel.run: groups must tile the %d rows, got %r"
                         % (M, groups))
    cdef bint masked = key_padding_mask is not None or mask is not None
    cdef cnp.ndarray kp = None
    cdef list masks = []
    if masked:
        if ng != 1:
            raise ValueError("run_layers: masks need a single group of equal-length "
                             "sequences, got %r" % (groups,))
        nseq, L = groups[0][1], groups[0][2]
        if key_padding_mask is not None:
            kp = <cnp.ndarray>np.ascontiguousarray(key_padding_mask, dtype=np.uint8)
            if kp.ndim != 2 or kp.shape[0] != nseq or kp.shape[1] != L:
                raise ValueError("run_layers: key_padding_mask must have shape (%d, %d), "
                                 "got %s" % (nseq, L, describe(key_padding_mask)))
        if mask is not None:
            views = {}      # one view per head count (the layers may differ in it)
            for l in range(nl):
                h = (<EncoderLayerKernel>kernels[l]).nhead
                if h not in views:
                    views[h] = _attn_mask_view(mask, nseq, h, L)
                masks.append(views[h])
    if M == 0:
        return outs[nl - 1]
    for l in range(nl):   # a stage's units are counted in an int (nc_gate)
        if M * (<EncoderLayerKernel>kernels[l]).nhead > 2147483647:
            raise ValueError("run_layers: %d rows x %d heads is more (sequence, head) blocks "
                             "than one call can count; split the batch"
                             % (M, (<EncoderLayerKernel>kernels[l]).nhead))
    cdef Py_ssize_t mr = nc_gemm_mr()
    cdef Py_ssize_t units = max((k0.l1.out_features + k0.l1._nr - 1) // k0.l1._nr,
                                (M + mr - 1) // mr)
    cdef int nt = resolve_threads(num_threads, M * k0.fmas_per_row // 8, units)
    cdef Py_ssize_t lmax = 0
    for g in range(ng):
        lmax = max(lmax, <Py_ssize_t>groups[g][2])
    cdef Py_ssize_t per = 0
    for l in range(nl):   # the layers may differ in their number of heads
        per = max(per, attn_scratch_floats(lmax, d // (<EncoderLayerKernel>kernels[l]).nhead))
    cdef LayerJob *J = <LayerJob *>malloc(nl * sizeof(LayerJob))
    cdef AttnJob *A = <AttnJob *>malloc(nl * (ng if ng else 1) * sizeof(AttnJob))
    cdef float *scratch = <float *>malloc(nt * per * sizeof(float))
    cdef int t
    try:
        if J == NULL or A == NULL or scratch == NULL:
            raise MemoryError("run_layers: could not allocate %d bytes of scratch"
                              % (nt * per * sizeof(float)))
        for l in range(nl):
            k = <EncoderLayerKernel>kernels[l]
            k._fill(&J[l], A + l * ng,
                    <const float *>cnp.PyArray_DATA(<cnp.ndarray>(x if l == 0 else outs[l - 1])),
                    <float *>cnp.PyArray_DATA(<cnp.ndarray>outs[l]),
                    <float *>cnp.PyArray_DATA(<cnp.ndarray>qkv),
                    <float *>cnp.PyArray_DATA(<cnp.ndarray>ctx),
                    <float *>cnp.PyArray_DATA(<cnp.ndarray>mid),
                    <float *>cnp.PyArray_DATA(<cnp.ndarray>hid),
                    <float *>cnp.PyArray_DATA(<cnp.ndarray>xn) if xn is not None else NULL,
                    M, groups, nt)
            J[l].ascratch = scratch
            J[l].ascratch_per = per
            if masked:
                _set_masks(&A[l * ng], kp, masks[l] if masks else None)
            if is_causal:
                for g in range(ng):
                    A[l * ng + g].causal = 1
        with nogil:
            nc_team_enter()
            if nt <= 1:
                layers_team(J, nl, 0)
            else:
                for t in prange(nt, schedule='static', num_threads=nt):
                    layers_team(J, nl, t)
            nc_team_leave()
    finally:
        free(J)
        free(A)
        free(scratch)
    return outs[nl - 1]


cdef cnp.ndarray _attn_mask_view(mask, Py_ssize_t nseq, Py_ssize_t nhead, Py_ssize_t L):
    """An additive mask as a float32 (nseq, nhead, L, L) view with unit last stride (a
    contiguous copy when the given strides do not allow one)."""
    cdef cnp.ndarray m
    try:
        m = <cnp.ndarray>np.broadcast_to(mask, (nseq, nhead, L, L))
    except ValueError:
        raise ValueError("attention mask %s does not broadcast to (%d, %d, %d, %d)"
                         % (describe(mask), nseq, nhead, L, L)) from None
    if m.dtype != np.float32 or (L > 1 and m.strides[3] != 4):
        m = <cnp.ndarray>np.ascontiguousarray(m, dtype=np.float32)
    return m


cdef void _set_masks(AttnJob *a, cnp.ndarray kp, cnp.ndarray m):
    """The masks of an attention job (checked by the caller; the arrays outlive the job)."""
    if kp is not None:
        a.kpm = <const uint8_t *>cnp.PyArray_DATA(kp)
        a.k_ld = kp.shape[1]
    if m is not None:
        a.mask = <const float *>cnp.PyArray_DATA(m)
        a.m_sb = m.strides[0] // 4
        a.m_sh = m.strides[1] // 4
        a.m_ld = m.strides[2] // 4


cdef void layers_team(LayerJob *J, Py_ssize_t nl, int t) noexcept nogil:
    """Thread t of the team: the layers in order, each after the last gate of the one
    before."""
    cdef Py_ssize_t l
    for l in range(nl):
        if l:
            nc_gate_wait(gemm_gate(&J[l - 1].f2))
        layer_team(&J[l], t)


cdef int _layer_buf(object a, str name, Py_ssize_t rows, Py_ssize_t cols,
                    bint output) except -1:
    """A C-contiguous float32 (rows, cols) array (writeable if an output)."""
    if (not isinstance(a, np.ndarray) or (<cnp.ndarray>a).dtype != np.float32
            or shape_of(a) != (rows, cols) or not cnp.PyArray_IS_C_CONTIGUOUS(<cnp.ndarray>a)
            or (<uintptr_t>cnp.PyArray_DATA(<cnp.ndarray>a)) % 4 != 0):
        raise ValueError("EncoderLayerKernel.run: %s must be a C-contiguous float32 array "
                         "of shape (%d, %d), got %s" % (name, rows, cols, describe(a)))
    if output and not cnp.PyArray_ISWRITEABLE(<cnp.ndarray>a):
        raise ValueError("EncoderLayerKernel.run: %s must be writeable" % name)
    return 0


cdef int _layer_distinct(tuple bufs) except -1:
    """The (contiguous) buffers must not overlap one another."""
    cdef Py_ssize_t i, k, n = len(bufs)
    cdef uintptr_t a0, a1, b0, b1
    for i in range(n):
        if bufs[i] is None:
            continue
        a0 = <uintptr_t>cnp.PyArray_DATA(<cnp.ndarray>bufs[i])
        a1 = a0 + <uintptr_t>cnp.PyArray_NBYTES(<cnp.ndarray>bufs[i])
        for k in range(i + 1, n):
            if bufs[k] is None:
                continue
            b0 = <uintptr_t>cnp.PyArray_DATA(<cnp.ndarray>bufs[k])
            b1 = b0 + <uintptr_t>cnp.PyArray_NBYTES(<cnp.ndarray>bufs[k])
            if a0 < b1 and b0 < a1:
                raise ValueError("EncoderLayerKernel.run: buffers %d and %d overlap" % (i, k))
    return 0


def kernel_shape():
    """(MR, NR) of the GEMM micro-kernel of the SIMD variant in use."""
    return int(nc_gemm_mr()), int(nc_gemm_nr())


def kernel_blocking():
    """(L1 data cache bytes as detected, largest K block) of the GEMM in use: the packed
    panel's K x NR slice is cut into blocks of at most that many k (24 KB slices, 48 KB
    with an L1 of 48 KB or more)."""
    return int(nc_l1d()), int(nc_gemm_kc(1 << 20))


def fma_peak(double seconds=0.2):
    """Measured single-thread FP32 FMA throughput (GFLOP/s) of the SIMD variant in use:
    the best of several timed runs of 12 independent vector FMA chains (the bench's
    reference for the GEMM's fraction of peak)."""
    import time
    cdef Py_ssize_t iters = 1 << 16, lanes = nc_gemm_nr() // 2
    cdef double t0, dt, best = 0.0, sink = 0.0
    t_end = time.perf_counter() + seconds
    while True:
        t0 = time.perf_counter()
        with nogil:
            sink += nc_fma_loop(iters)
        dt = time.perf_counter() - t0
        if dt > 0:
            best = max(best, 2.0 * 12 * lanes * iters / dt / 1e9)
        if dt < 2e-3:
            iters *= 2
        if time.perf_counter() > t_end:
            break
    if sink != sink:      # keeps the result observable
        best = -best
    return best
