# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False, cdivision=True
"""Normalization kernels: LayerNorm, fused add + LayerNorm, RMSNorm, BatchNorm (inference).

Argument checking happens here, in typed Cython, at the boundary (a 1x384 call costs about
a microsecond all in); the row kernels live in ``src/nc_norm_kern.h`` (explicit SIMD with
run-time ISA dispatch).  Rows are spread over OpenMP threads with a static schedule; each
row is computed by one thread in a fixed order, so results do not depend on the thread
count.  Long rows that whole rows would share out unevenly (fewer rows than threads) are
cut into chunks instead (run_split): each chunk's statistics, by any thread, are the ones
the whole-row kernel computes, merged in chunk order, so the bits are the same.
"""
from libc.stdlib cimport malloc, free
from libc.string cimport memcpy
from libc.math cimport sqrt, isfinite, fabs
from cython.parallel cimport prange, parallel

cimport numpy as cnp
import numpy as np

from normcy._parallel cimport resolve_threads
from normcy._validate import refuse_masked, user_stacklevel
from normcy._arraychecks cimport (shape_of, describe, extent, identical_view, check_overlap, plain,
                                  parse_eps, check_no_self_overlap)

cnp.import_array()

cdef extern from "nc_api_norms.h" nogil:
    void nc_moments(const float *x, const float *xb, const float *r, float *d,
                    Py_ssize_t n, double *mean_out, double *m2_out)
    void nc_ln_apply(const float *s, float *y, const float *w, const float *b,
                     Py_ssize_t n, float mhi, float mlo, float scale)
    double nc_sumsq(const float *x, const float *xb, const float *r, float *d, Py_ssize_t n)
    void nc_scale_apply(const float *s, float *y, const float *w, Py_ssize_t n, float scale)
    void nc_ln_apply2(const float *s0, const float *s1, float *y0, float *y1, const float *w,
                      const float *b, Py_ssize_t n, float mhi0, float mlo0, float scale0,
                      float mhi1, float mlo1, float scale1)
    void nc_scale_apply2(const float *s0, const float *s1, float *y0, float *y1,
                         const float *w, Py_ssize_t n, float scale0, float scale1)
    float nc_moments_shift(const float *x, const float *xb, const float *r, Py_ssize_t n)
    void nc_moments_part(const float *x, const float *xb, const float *r, float *d,
                         Py_ssize_t n, float K, Py_ssize_t c0, Py_ssize_t c1, double *cm)
    void nc_moments_merge(const double *cm, Py_ssize_t n, double *mean, double *m2)
    void nc_sumsq_part(const float *x, const float *xb, const float *r, float *d,
                       Py_ssize_t n, Py_ssize_t c0, Py_ssize_t c1, double *cq)
    void nc_ln_apply_d(const float *s, float *y, const float *w, const float *b, Py_ssize_t n,
                       double mean, double scale)
    void nc_scale_apply_d(const float *s, float *y, const float *w, Py_ssize_t n, double scale)
    void nc_affine_scalar(const float *x, float *y, Py_ssize_t n, float m, float a, float b,
                          int centred)
    void nc_affine_rows(const float *x, float *y, const float *m, const float *a,
                        const float *b, Py_ssize_t n, Py_ssize_t nrows)
    const char *nc_isa()
    const char *nc_isa_name()
    const char *nc_isa_cap()
    int nc_isa_cap_invalid()
    int nc_isa_vbytes()
    const char *nc_isa_supported()
    void nc_stream_init()
    ctypedef struct nc_carry:
        float *line
        Py_ssize_t fill
    void nc_stream_row(float *dst, const float *src, Py_ssize_t n, nc_carry *c)
    void nc_stream_flush(nc_carry *c)
    void nc_ln_apply_stream(const float *s, float *y, const float *w, const float *b,
                            Py_ssize_t n, float mhi, float mlo, float scale, nc_carry *c)
    void nc_scale_apply_stream(const float *s, float *y, const float *w, Py_ssize_t n,
                               float scale, nc_carry *c)
    ctypedef struct nc_fuse:
        const float *x
        const float *xb
        const float *r
        const float *px
        const float *pr
        float *d
        const float *sa
        float *ya
        float *soa
        nc_carry *cy
        nc_carry *cs
        const float *w
        const float *b
        int rms
        Py_ssize_t n
        float mhi
        float mlo
        float scale
        double mean
        double m2
    void nc_stream_fused(nc_fuse *f)
    void nc_affine_scalar_stream(const float *x, float *y, Py_ssize_t n, float m, float a,
                                 float b, int centred, nc_carry *c)
    void nc_affine_rows_stream(const float *x, float *y, const float *m2, const float *a2,
                               const float *b2, Py_ssize_t n, Py_ssize_t nrows, nc_carry *c)
    void nc_stream_fence()
    int NC_HAVE_STREAM
    int NC_HAVE_CLONES
    int NC_CHUNK

DEF MAXD = 64

nc_stream_init()

def _llc_bytes():
    """The last-level cache's size: the largest cache of CPU 0 in Linux's sysfs (what lscpu
    reports; glibc's sysconf reported the host's 384 MB in a VM given a 32 MB L3), else
    32 MB."""
    import glob
    best = 0
    for d in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*"):
        try:
            with open(d + "/size") as f:
                txt = f.read().strip().upper()
        except OSError:
            continue
        num = txt.rstrip("KMG")
        if num.isdigit():
            best = max(best, int(num) * {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30,
                                         "": 1}[txt[len(num):]])
    return best if best >= (1 << 20) else 32 << 20


cdef Py_ssize_t _llc = _llc_bytes()
# A call that touches at least this many bytes (its operands: inputs and outputs) writes
# its outputs with non-temporal (streaming) stores: by the time it returns, its first
# outputs have been evicted from the last-level cache anyway, and streaming saves the
# read-for-ownership of every output line (a quarter of add_layer_norm's traffic).  An
# eighth above the cache's size: a call of exactly its size still finds part of its data
# cached when repeated (AMD EPYC Zen 5, 32 MB L3, one process A/B, three rounds, two
# threads: add_layer_norm 4096x768 (37.7 MB) 661 us streamed vs 818 cached; batch_norm
# 4096x1024 (33.5 MB) 397 vs 321; NHWC 32x56x56x64 (51 MB) 709 vs 900).
cdef Py_ssize_t _stream_min_bytes = _llc + _llc // 8


cdef inline bint streams(Py_ssize_t array_bytes, const void *a, const void *b,
                         const void *c=NULL, const void *d=NULL) noexcept:
    """Whether a call streams its outputs: it touches (inputs and outputs) arrays a..d (NULL:
    none) of array_bytes each, an array passed twice (out=x, residual=x) counting once."""
    cdef const void *p[4]
    cdef int k, m, n = 0
    p[0] = a
    p[1] = b
    p[2] = c
    p[3] = d
    for k in range(4):
        if p[k] == NULL:
            continue
        for m in range(k):
            if p[m] == p[k]:
                break
        else:
            n += 1
    return NC_HAVE_STREAM and n * array_bytes >= _stream_min_bytes

def _cap_ignored_reason():
    """Why NORMCY_MAX_ISA was ignored ("" if it was not)."""
    if nc_isa_cap_invalid() == 2:
        return "this build has a single kernel variant"
    if nc_isa_cap_invalid():
        return "no such variant (use avx512, avx2, sse2 or generic)"
    return ""


if nc_isa_cap_invalid():
    import warnings as _warnings
    _warnings.warn("NORMCY_MAX_ISA=%r ignored: %s; using %s"
                   % ((<bytes>nc_isa_cap()).decode(), _cap_ignored_reason(),
                      (<bytes>nc_isa()).decode()),
                   RuntimeWarning, stacklevel=user_stacklevel())


def _set_streaming_threshold(nbytes):
    """Set the bytes a call touches from which it streams its outputs; returns the old one."""
    global _stream_min_bytes
    old = _stream_min_bytes
    _stream_min_bytes = max(0, int(nbytes))
    return old

# KIND_LN, KIND_LN_ANNOTATED, KIND_RMS: declared in _norms.pxd

# ----------------------------------------------------------------------------------
# Array descriptors
# ----------------------------------------------------------------------------------

cdef struct Operand:
    char *data
    int nlead                    # collapsed leading dims
    Py_ssize_t shape[MAXD]
    Py_ssize_t strides[MAXD]     # bytes
    Py_ssize_t cstride           # stride of the last axis, bytes


cdef inline char *row_ptr(const Operand *op, Py_ssize_t i) noexcept nogil:
    cdef int k
    cdef char *p = op.data
    cdef Py_ssize_t q
    if op.nlead == 1:
        return p + i * op.strides[0]
    k = op.nlead - 1
    while k >= 0:
        q = i % op.shape[k]
        i = i // op.shape[k]
        p += q * op.strides[k]
        k -= 1
    return p


cdef void fill_operand(Operand *op, cnp.ndarray a) noexcept:
    """Describe `a` as rows over its last axis, collapsing leading dims where possible."""
    cdef int nd = cnp.PyArray_NDIM(a)
    cdef cnp.npy_intp *sh = cnp.PyArray_DIMS(a)
    cdef cnp.npy_intp *st = cnp.PyArray_STRIDES(a)
    cdef int k, m
    op.data = <char *>cnp.PyArray_DATA(a)
    op.cstride = st[nd - 1]
    m = 0
    if nd == 1:
        op.nlead = 1
        op.shape[0] = 1
        op.strides[0] = 0
        return
    for k in range(nd - 1):
        if sh[k] == 1:
            continue
        if m > 0 and op.strides[m - 1] == st[k] * sh[k]:
            op.shape[m - 1] *= sh[k]
            op.strides[m - 1] = st[k]
        else:
            op.shape[m] = sh[k]
            op.strides[m] = st[k]
            m += 1
    if m == 0:
        op.shape[0] = 1
        op.strides[0] = 0
        m = 1
    op.nlead = m


cdef struct NormJob:
    Operand x
    Operand r
    Operand so
    Operand y
    const float *xb
    const float *w
    const float *b
    Py_ssize_t n
    Py_ssize_t nrows
    int kind
    int has_r
    int has_so
    int gather
    int stream
    double eps


cdef struct RowState:
    const float *src     # the normalized values' source: s (stored) or x
    float *yp            # output row
    double mean
    double m2            # sum of squared deviations (LayerNorm) or of squares (RMSNorm)
    double scale


cdef inline void row_moments(const NormJob *j, const float *xp, const float *rp, float *d,
                             float *yp, RowState *st) noexcept nogil:
    """Moments of one contiguous row; when adding, s = (x + xb) + r is stored into d."""
    st.yp = yp
    if j.kind == KIND_RMS:
        st.m2 = nc_sumsq(xp, j.xb, rp, d, j.n)
        st.mean = 0.0
    else:
        nc_moments(xp, j.xb, rp, d, j.n, &st.mean, &st.m2)
    st.src = <const float *>d if j.has_r else xp


cdef inline void row_finish(const NormJob *j, RowState *st) noexcept nogil:
    """The row's scale from its moments (a ~60-cycle division/square-root chain)."""
    if j.kind == KIND_RMS or j.kind == KIND_LN:
        st.scale = 1.0 / sqrt(st.m2 / <double>j.n + j.eps)
    else:
        st.scale = 1.0 / (sqrt(st.m2 / <double>(j.n - 1)) + j.eps)


cdef inline void row_stats(const NormJob *j, const float *xp, const float *rp, float *d,
                           float *yp, RowState *st) noexcept nogil:
    """Statistics of one contiguous row; when adding, s = (x + xb) + r is stored into d."""
    row_moments(j, xp, rp, d, yp, st)
    row_finish(j, st)


cdef inline void split_mean(const RowState *st, float *mhi, float *mlo) noexcept nogil:
    """The row mean as an unevaluated float32 pair mhi + mlo (the apply kernels' input)."""
    mhi[0] = <float>st.mean
    mlo[0] = <float>(st.mean - <double>mhi[0])


cdef inline void row_apply(const NormJob *j, const RowState *st, Py_ssize_t c0,
                           Py_ssize_t ln, float *y) noexcept nogil:
    """Output elements [c0, c0 + ln) of the row into y (y[0] is element c0)."""
    cdef float mhi, mlo
    cdef const float *w = j.w + c0 if j.w != NULL else NULL
    cdef const float *b = j.b + c0 if j.b != NULL else NULL
    if not (1e-30 < st.scale < 1e30):
        # |x| near FLT_MAX or subnormal rows with eps = 0: exact double path
        if j.kind == KIND_RMS:
            nc_scale_apply_d(st.src + c0, y, w, ln, st.scale)
        else:
            nc_ln_apply_d(st.src + c0, y, w, b, ln, st.mean, st.scale)
    elif j.kind == KIND_RMS:
        nc_scale_apply(st.src + c0, y, w, ln, <float>st.scale)
    else:
        split_mean(st, &mhi, &mlo)
        nc_ln_apply(st.src + c0, y, w, b, ln, mhi, mlo, <float>st.scale)


cdef inline void fast_moments(const NormJob *j, Py_ssize_t i, RowState *st) noexcept nogil:
    """Contiguous row i; s goes into sum_out, or into out (normalized there in place)."""
    cdef float *yp = <float *>row_ptr(&j.y, i)
    cdef const float *rp = NULL
    cdef float *d = NULL
    if j.has_r:
        rp = <const float *>row_ptr(&j.r, i)
        d = <float *>row_ptr(&j.so, i) if j.has_so else yp
    row_moments(j, <const float *>row_ptr(&j.x, i), rp, d, yp, st)


cdef inline void fast_apply(const NormJob *j, const RowState *st) noexcept nogil:
    row_apply(j, st, 0, j.n, st.yp)


cdef inline void emit_range(const NormJob *j, const RowState *st, Py_ssize_t c0,
                            Py_ssize_t c1, float *chunk, nc_carry *cy) noexcept nogil:
    """Output elements [c0, c1) of a row streamed out from its statistics (s at st.src)."""
    cdef Py_ssize_t ln
    cdef float mhi, mlo
    cdef const float *w = j.w + c0 if j.w != NULL else NULL
    cdef const float *b = j.b + c0 if j.b != NULL else NULL
    if plain_scale(st):
        # straight from the registers to y (row_apply's float kernels, streamed)
        if j.kind == KIND_RMS:
            nc_scale_apply_stream(st.src + c0, st.yp + c0, w, c1 - c0, <float>st.scale, cy)
        else:
            split_mean(st, &mhi, &mlo)
            nc_ln_apply_stream(st.src + c0, st.yp + c0, w, b, c1 - c0, mhi, mlo,
                               <float>st.scale, cy)
        return
    while c0 < c1:
        ln = c1 - c0
        if ln > NC_CHUNK:
            ln = NC_CHUNK
        row_apply(j, st, c0, ln, chunk)
        nc_stream_row(st.yp + c0, chunk, ln, cy)
        c0 += ln


cdef inline void emit_row(const NormJob *j, const RowState *st, Py_ssize_t i, float *chunk,
                          nc_carry *cy, nc_carry *cs) noexcept nogil:
    """Row i's outputs streamed out from its statistics (s stored at st.src when adding)."""
    if j.has_so:
        nc_stream_row(<float *>row_ptr(&j.so, i), st.src, j.n, cs)
    emit_range(j, st, 0, j.n, chunk, cy)


cdef void stream_rows(const NormJob *j, Py_ssize_t r0, Py_ssize_t r1,
                      float *scratch) noexcept nogil:
    """Contiguous rows [r0, r1) whose outputs are far larger than cache: s is formed in the
    L1-resident scratch and the outputs are streamed out (no read-for-ownership of them),
    each output through its own carry, so the line two consecutive rows share goes out as
    one streamed line.  The rows are pipelined: each row's moments are computed in the loop
    that streams the previous row's outputs (nc_stream_fused, chunk by chunk for rows
    longer than NC_CHUNK; the same bits as one row at a time).  scratch: 2 n + NC_CHUNK
    floats.  The caller fences once, after its last row."""
    cdef Py_ssize_t n = j.n, i
    cdef float *buf_a = scratch
    cdef float *buf_b = scratch + n
    cdef float *chunk = scratch + 2 * n
    cdef float *tb
    cdef RowState st[2]
    cdef int p = 0
    cdef nc_carry cy
    cdef nc_carry cs
    cdef nc_fuse f
    cy.line = NULL
    cy.fill = 0
    cs.line = NULL
    cs.fill = 0
    if r1 <= r0:
        return
    f.rms = j.kind == KIND_RMS
    f.xb = j.xb
    f.w = j.w
    f.b = j.b if j.kind != KIND_RMS else NULL
    f.n = n
    f.cy = &cy
    f.cs = &cs
    row_stats(j, <const float *>row_ptr(&j.x, r0),
              <const float *>row_ptr(&j.r, r0) if j.has_r else NULL,
              buf_a if j.has_r else NULL, <float *>row_ptr(&j.y, r0), &st[0])
    for i in range(r0 + 1, r1):
        # st[p]: row i - 1, its s at st[p].src (buf_a when adding, else its row of x);
        # row i's s goes to buf_b
        if plain_scale(&st[p]):
            f.x = <const float *>row_ptr(&j.x, i)
            f.r = <const float *>row_ptr(&j.r, i) if j.has_r else NULL
            # the next row's x and r are prefetched as this one streams (one thread,
            # add_layer_norm 16384x1024 + sum_out in NumPy's layout: 31-36 -> 37-41
            # GB/s, builds alternated; two or four rows ahead measured no better)
            f.px = <const float *>row_ptr(&j.x, i + 1) if i + 1 < r1 else NULL
            f.pr = <const float *>row_ptr(&j.r, i + 1) if j.has_r and i + 1 < r1 else NULL
            f.d = buf_b if j.has_r else NULL
            f.sa = st[p].src
            f.ya = st[p].yp
            f.soa = <float *>row_ptr(&j.so, i - 1) if j.has_so else NULL
            split_mean(&st[p], &f.mhi, &f.mlo)     # (unused by RMSNorm: mean 0)
            f.scale = <float>st[p].scale
            nc_stream_fused(&f)
            st[1 - p].mean = f.mean
            st[1 - p].m2 = f.m2
            st[1 - p].src = <const float *>buf_b if j.has_r else f.x
            st[1 - p].yp = <float *>row_ptr(&j.y, i)
            row_finish(j, &st[1 - p])
        else:
            emit_row(j, &st[p], i - 1, chunk, &cy, &cs)
            row_stats(j, <const float *>row_ptr(&j.x, i),
                      <const float *>row_ptr(&j.r, i) if j.has_r else NULL,
                      buf_b if j.has_r else NULL, <float *>row_ptr(&j.y, i), &st[1 - p])
        p = 1 - p
        tb = buf_a
        buf_a = buf_b
        buf_b = tb
    emit_row(j, &st[p], r1 - 1, chunk, &cy, &cs)
    nc_stream_flush(&cs)
    nc_stream_flush(&cy)


# Rows gathered per block when some operand has a non-unit last-axis stride: a block of
# each operand is ~128 KB (in L2), at most GATHER_MAX_ROWS rows.
DEF GATHER_BLOCK_FLOATS = 32768
DEF GATHER_MAX_ROWS = 64


cdef inline Py_ssize_t gather_rows(Py_ssize_t n, Py_ssize_t nrows, int nt) noexcept nogil:
    """Rows per gathered block for nrows rows of n floats on nt threads: about
    GATHER_BLOCK_FLOATS per operand, at most GATHER_MAX_ROWS, and at least one block per
    thread (64 rows of 500 floats in one block would leave the other threads idle)."""
    cdef Py_ssize_t b = GATHER_BLOCK_FLOATS // n
    b = 1 if b < 1 else (GATHER_MAX_ROWS if b > GATHER_MAX_ROWS else b)
    if b * nt > nrows:
        b = (nrows + nt - 1) // nt
    return b


cdef void copy_rows(const Operand *op, Py_ssize_t i0, Py_ssize_t nb, Py_ssize_t n,
                    float *buf, bint into) noexcept nogil:
    """Rows [i0, i0 + nb) of op (nb <= GATHER_MAX_ROWS) copied into buf (nb x n,
    contiguous) when `into`, else buf copied out to them.  When neighbouring rows lie closer
    together than neighbouring elements of a row (a column-major array, a transposed view),
    the loop over the rows is the inner one: it then reads (or writes) neighbouring memory,
    where a row at a time touched a new cache line per element (layer_norm of a
    Fortran-ordered 4096x768 array: 3.9 ms row by row)."""
    cdef char *p[GATHER_MAX_ROWS]
    cdef Py_ssize_t b, k, cs = op.cstride, rs
    cdef char *q
    for b in range(nb):
        p[b] = row_ptr(op, i0 + b)
    rs = p[1] - p[0] if nb > 1 else 0
    if nb > 1 and (rs if rs >= 0 else -rs) < (cs if cs >= 0 else -cs):
        for k in range(n):
            if into:
                for b in range(nb):
                    buf[b * n + k] = (<const float *>(p[b] + k * cs))[0]
            else:
                for b in range(nb):
                    (<float *>(p[b] + k * cs))[0] = buf[b * n + k]
        return
    for b in range(nb):
        if cs == 4:
            if into:
                memcpy(buf + b * n, p[b], <size_t>n * sizeof(float))
            else:
                memcpy(p[b], buf + b * n, <size_t>n * sizeof(float))
            continue
        q = p[b]
        if into:
            for k in range(n):
                buf[b * n + k] = (<const float *>(q + k * cs))[0]
        else:
            for k in range(n):
                (<float *>(q + k * cs))[0] = buf[b * n + k]


cdef void norm_block(const NormJob *j, Py_ssize_t i0, Py_ssize_t nb,
                     float *scratch) noexcept nogil:
    """Rows [i0, i0 + nb) through scratch (3 nb n floats): some operand has a non-unit
    last-axis stride.  The block's x (and r) are gathered into contiguous rows, each row
    computed there as the contiguous path computes it (the same bits), and y (and the
    sum) scattered back.  Every operand's block is read before any is written, and blocks
    are disjoint rows, so an output identical to an input is safe."""
    cdef Py_ssize_t n = j.n, b
    cdef float *gx = scratch
    cdef float *gr = scratch + nb * n
    cdef float *gd = scratch + 2 * nb * n
    cdef RowState st
    copy_rows(&j.x, i0, nb, n, gx, 1)
    if j.has_r:
        copy_rows(&j.r, i0, nb, n, gr, 1)
    for b in range(nb):
        row_stats(j, gx + b * n, gr + b * n if j.has_r else NULL,
                  gd + b * n if j.has_r else NULL, gx + b * n, &st)
        row_apply(j, &st, 0, n, gx + b * n)
    copy_rows(&j.y, i0, nb, n, gx, 0)
    if j.has_so:
        copy_rows(&j.so, i0, nb, n, gd, 0)


cdef inline bint plain_scale(const RowState *st) noexcept nogil:
    """The row's scale is in float32's comfortable range (the float apply kernels)."""
    return 1e-30 < st.scale < 1e30


cdef inline void apply_pair(const NormJob *j, const RowState *a,
                            const RowState *b) noexcept nogil:
    """Both rows' outputs in one loop (one load of weight/bias per two rows); each element
    is computed exactly as row_apply computes it."""
    cdef float mhi0, mlo0, mhi1, mlo1
    if not (plain_scale(a) and plain_scale(b)):
        fast_apply(j, a)
        fast_apply(j, b)
    elif j.kind == KIND_RMS:
        nc_scale_apply2(a.src, b.src, a.yp, b.yp, j.w, j.n, <float>a.scale, <float>b.scale)
    else:
        split_mean(a, &mhi0, &mlo0)
        split_mean(b, &mhi1, &mlo1)
        nc_ln_apply2(a.src, b.src, a.yp, b.yp, j.w, j.b, j.n, mhi0, mlo0, <float>a.scale,
                     mhi1, mlo1, <float>b.scale)


DEF PIPE_MAX_FLOATS = 65536


cdef void run_rows(const NormJob *j, Py_ssize_t r0, Py_ssize_t r1) noexcept nogil:
    """Contiguous rows [r0, r1), software-pipelined two rows at a time (in cache).

    The statistics of rows i, i+1 are computed before rows i-2, i-1 are written, so each
    row's serial tail (horizontal sums, division, square root: ~150 cycles per row, measured
    on AVX2 from the cost of 384- vs 768-wide rows) overlaps the independent work of its
    neighbours instead of stalling the core.  Each row is computed exactly as alone
    (bit-identical results whatever the row count, pairing or thread count).  Rows are
    distinct memory (partial overlaps are rejected at the boundary; an output identical to
    its input is read row i before row i is written).
    """
    cdef RowState st[4]
    cdef Py_ssize_t i = r0
    cdef int p = 0, q
    if not j.has_r and (r1 - r0) * j.n > PIPE_MAX_FLOATS:
        # more rows than the L2 holds, without an add: one row at a time, statistics then
        # output.  The pipeline's gain is hiding the serial tail of in-cache rows; on rows
        # streamed from L3 or memory it measured slower (AMD EPYC, one process A/B:
        # layer_norm / rms_norm 4096x768 7-23% at one and two threads, 512x768 within 5%)
        for i in range(r0, r1):
            fast_moments(j, i, &st[0])
            row_finish(j, &st[0])
            fast_apply(j, &st[0])
        return
    if r1 - r0 < 2:
        if r1 > r0:
            fast_moments(j, r0, &st[0])
            row_finish(j, &st[0])
            fast_apply(j, &st[0])
        return
    fast_moments(j, i, &st[0])
    fast_moments(j, i + 1, &st[1])
    row_finish(j, &st[0])
    row_finish(j, &st[1])
    i += 2
    while i + 1 < r1:
        q = 2 - p
        fast_moments(j, i, &st[q])
        fast_moments(j, i + 1, &st[q + 1])
        row_finish(j, &st[q])
        row_finish(j, &st[q + 1])
        apply_pair(j, &st[p], &st[p + 1])
        p = q
        i += 2
    if i < r1:
        q = 2 - p
        fast_moments(j, i, &st[q])
        row_finish(j, &st[q])
        apply_pair(j, &st[p], &st[p + 1])
        fast_apply(j, &st[q])
    else:
        apply_pair(j, &st[p], &st[p + 1])


cdef void norm_rows(int kind, const float *src, Py_ssize_t lds, float *dst, Py_ssize_t ldd,
                    Py_ssize_t nrows, Py_ssize_t n, const float *w, const float *b,
                    double eps) noexcept nogil:
    """Rows i < nrows of src (row stride lds floats, unit element stride) normalized into
    dst (stride ldd; dst may equal src), as layer_norm / rms_norm compute them."""
    cdef NormJob j
    j.kind = kind
    j.xb = NULL
    j.w = w
    j.b = b
    j.n = n
    j.eps = eps
    j.has_r = 0
    j.has_so = 0
    j.x.data = <char *>src
    j.x.nlead = 1
    j.x.strides[0] = lds * <Py_ssize_t>sizeof(float)
    j.y.data = <char *>dst
    j.y.nlead = 1
    j.y.strides[0] = ldd * <Py_ssize_t>sizeof(float)
    run_rows(&j, 0, nrows)


# Rows at least this long may be cut among threads by chunks (run_split): a row's two
# passes then cost more than the second parallel region and the merge (AMD EPYC Zen 5, two
# threads, bench/ab_builds.py --kernel norms against whole rows per thread, quiet machine:
# 1x32768 0.94-1.27x, 1x65536 1.22-1.65x, 1x131072 1.71-1.85x).
DEF SPLIT_MIN_N = 65536
# Streamed rows longer than this go through run_split too, at any thread count: the
# pipeline of stream_rows keeps two rows of s in a scratch of 2 n floats, and glibc maps
# an allocation over 32 MB afresh on every call (add_layer_norm 1x4194304 streamed at
# 5.7 GB/s through it, 22 GB/s through run_split).  Below, the pipeline is as fast or
# faster (one thread, AMD EPYC Zen 5: 2x2097152 1.00x, 4x1048576 0.93x, 64x131072 0.71x
# through run_split).
DEF STREAM_PIPE_MAX_N = 2097152
DEF CHUNK_FLOATS = 1024     # NC_CHUNK (checked at import): split_part's stack scratch
if NC_CHUNK != CHUNK_FLOATS:
    raise ImportError("normcy: NC_CHUNK is %d, _norms.pyx assumes %d" % (NC_CHUNK, CHUNK_FLOATS))


cdef inline bint split_rows(const NormJob *j, int nt) noexcept nogil:
    """Whether run_split takes the call: long contiguous rows that whole rows would spread
    unevenly over nt threads (fewer rows than threads, or one thread with an extra row
    costing more than an eighth of the time), and streamed rows too long for stream_rows."""
    cdef Py_ssize_t most
    if j.gather:
        return 0
    if j.stream and j.n > STREAM_PIPE_MAX_N:
        return 1
    if nt <= 1 or j.n < SPLIT_MIN_N:
        return 0
    most = (j.nrows + nt - 1) // nt
    return most * nt * 8 > j.nrows * 9


cdef void split_part(const NormJob *j, Py_ssize_t nch, Py_ssize_t k0, Py_ssize_t k1,
                     double *cm, RowState *st, bint moments) noexcept nogil:
    """Chunks [k0, k1) of the call's rows (chunk k: row k // nch, elements from
    (k % nch) * NC_CHUNK): their statistics into cm (moments; st[i].mean holds row i's
    shift) or their outputs from st."""
    cdef Py_ssize_t i, c, ce, c0, c1
    cdef float *yp
    cdef float *d
    cdef const float *rp
    cdef const float *xp
    cdef nc_carry cy
    cdef float chunk[CHUNK_FLOATS]
    cy.line = NULL
    cy.fill = 0
    while k0 < k1:
        i = k0 // nch
        c = k0 - i * nch
        ce = nch if c + (k1 - k0) > nch else c + (k1 - k0)
        c0 = c * NC_CHUNK
        c1 = ce * NC_CHUNK
        if c1 > j.n:
            c1 = j.n
        if moments:
            xp = <const float *>row_ptr(&j.x, i)
            rp = NULL
            d = NULL
            if j.has_r:
                rp = <const float *>row_ptr(&j.r, i)
                d = <float *>row_ptr(&j.so, i) if j.has_so else <float *>row_ptr(&j.y, i)
            if j.kind == KIND_RMS:
                nc_sumsq_part(xp, j.xb, rp, d, j.n, c0, c1, cm + k0)
            else:
                nc_moments_part(xp, j.xb, rp, d, j.n, <float>st[i].mean, c0, c1, cm + 2 * k0)
        elif j.stream:
            emit_range(j, &st[i], c0, c1, chunk, &cy)
        else:
            row_apply(j, &st[i], c0, c1 - c0, st[i].yp + c0)
        k0 += ce - c
    if not moments and j.stream:
        nc_stream_flush(&cy)
        nc_stream_fence()   # this thread's streamed outputs, before the join


cdef int run_split(NormJob *j, int nt) except -1:
    """Long rows cut among nt threads by chunks of NC_CHUNK floats: the chunks' statistics
    (in parallel), each row's merge (serial, in chunk order), then the outputs (in
    parallel).  The chunk statistics and their merge are nc_moments' / nc_sumsq's own, so
    every output has the bits it has when its row runs whole on one thread.  With the
    add, s is stored into sum_out, else into out (as run_rows does)."""
    cdef Py_ssize_t nch = (j.n + NC_CHUNK - 1) // NC_CHUNK
    cdef Py_ssize_t total = j.nrows * nch, i, k, t
    cdef double *cm = <double *>malloc(<size_t>(2 * total) * sizeof(double))
    cdef RowState *st = <RowState *>malloc(<size_t>j.nrows * sizeof(RowState))
    cdef double acc
    if cm == NULL or st == NULL:
        free(cm)
        free(st)
        raise MemoryError("normcy: could not allocate the per-chunk statistics of %d rows"
                          % j.nrows)
    with nogil:
        if j.kind != KIND_RMS:
            # each row's shift, before any thread stores s (into x or r when in place)
            for i in range(j.nrows):
                st[i].mean = nc_moments_shift(
                    <const float *>row_ptr(&j.x, i), j.xb,
                    <const float *>row_ptr(&j.r, i) if j.has_r else NULL, j.n)
        if nt <= 1:
            split_part(j, nch, 0, total, cm, st, 1)
        else:
            for t in prange(nt, schedule='static', num_threads=nt):
                split_part(j, nch, total * t // nt, total * (t + 1) // nt, cm, st, 1)
        for i in range(j.nrows):
            st[i].yp = <float *>row_ptr(&j.y, i)
            if j.has_r:
                st[i].src = <const float *>row_ptr(&j.so, i) if j.has_so else st[i].yp
            else:
                st[i].src = <const float *>row_ptr(&j.x, i)
            if j.kind == KIND_RMS:
                acc = 0.0       # nc_sumsq's sum: chunk by chunk, in order, from 0.0
                for k in range(i * nch, (i + 1) * nch):
                    acc = acc + cm[k]
                st[i].mean = 0.0
                st[i].m2 = acc
            else:
                nc_moments_merge(cm + 2 * i * nch, j.n, &st[i].mean, &st[i].m2)
            row_finish(j, &st[i])
        if nt <= 1:
            split_part(j, nch, 0, total, cm, st, 0)
        else:
            for t in prange(nt, schedule='static', num_threads=nt):
                split_part(j, nch, total * t // nt, total * (t + 1) // nt, cm, st, 0)
    free(cm)
    free(st)
    return 0


cdef int run_norm_job(NormJob *j, int nt) except -1:
    cdef Py_ssize_t i
    cdef float *scratch = NULL
    cdef int failed = 0
    cdef Py_ssize_t gb = 0, nblk = 0                     # gathered blocks: rows, count
    cdef size_t scratch_bytes = 0
    cdef bint need_scratch = j.gather or j.stream
    cdef Py_ssize_t npairs = (j.nrows + 1) // 2
    cdef Py_ssize_t t
    if j.nrows == 0:
        return 0
    if split_rows(j, nt):
        return run_split(j, nt)
    if nt > j.nrows:
        nt = <int>j.nrows   # whole rows: no more threads than rows (long rows allowed more)
    if j.stream:
        scratch_bytes = <size_t>(2 * j.n + NC_CHUNK) * sizeof(float)    # stream_rows
    elif j.gather:
        gb = gather_rows(j.n, j.nrows, nt)
        nblk = (j.nrows + gb - 1) // gb
        scratch_bytes = <size_t>(3 * gb * j.n) * sizeof(float)          # norm_block
    if not need_scratch:
        # contiguous rows, cached outputs: the common case; each thread takes a run of
        # whole row pairs (as a static schedule over pairs would) and pipelines it
        if nt <= 1:
            with nogil:
                run_rows(j, 0, j.nrows)
        elif npairs >= nt:
            with nogil:
                for t in prange(nt, schedule='static', num_threads=nt):
                    run_rows(j, 2 * (npairs * t // nt),
                             min(j.nrows, 2 * (npairs * (t + 1) // nt)))
        else:
            # fewer row pairs than threads (a few long rows): runs of single rows, or the
            # pairs left threads idle (layer_norm 2x1048576 took as long at two threads as
            # at one: both rows went to the same thread); the same bits either way
            with nogil:
                for t in prange(nt, schedule='static', num_threads=nt):
                    run_rows(j, j.nrows * t // nt, j.nrows * (t + 1) // nt)
        return 0
    if j.stream:
        # each thread streams a run of consecutive rows (the carries join them)
        if nt <= 1:
            with nogil:
                scratch = <float *>malloc(scratch_bytes)
                if scratch == NULL:
                    failed = 1
                else:
                    stream_rows(j, 0, j.nrows, scratch)
                    nc_stream_fence()
                    free(scratch)
        else:
            with nogil:
                for t in prange(nt, schedule='static', num_threads=nt):
                    scratch = <float *>malloc(scratch_bytes)
                    if scratch == NULL:
                        failed += 1     # a reduction: seen after the loop
                    else:
                        stream_rows(j, j.nrows * t // nt, j.nrows * (t + 1) // nt, scratch)
                        nc_stream_fence()   # this thread's streamed rows, before the join
                        free(scratch)
    elif nt <= 1:
        with nogil:
            scratch = <float *>malloc(scratch_bytes)
            if scratch == NULL:
                failed = 1
            else:
                for i in range(nblk):
                    norm_block(j, i * gb, min(gb, j.nrows - i * gb), scratch)
                free(scratch)
    else:
        with nogil, parallel(num_threads=nt):
            scratch = <float *>malloc(scratch_bytes)
            for i in prange(nblk, schedule='static'):
                if scratch != NULL:
                    norm_block(j, i * gb, min(gb, j.nrows - i * gb), scratch)
                else:
                    failed += 1     # a reduction (a plain assignment here is private)
            free(scratch)
    if failed:
        raise MemoryError("normcy: could not allocate %d bytes of scratch" % scratch_bytes)
    return 0


# ----------------------------------------------------------------------------------
# Validation helpers
# ----------------------------------------------------------------------------------

cdef int check_f32_array(object a, str name) except -1:
    if not cnp.PyArray_Check(a):
        raise TypeError("%s must be a float32 numpy.ndarray, got %s" % (name, describe(a)))
    if cnp.PyArray_TYPE(<cnp.ndarray>a) != cnp.NPY_FLOAT32:
        raise TypeError("%s must have dtype float32, got %s (normcy never casts activations "
                        "silently; convert with .astype(np.float32))" % (name, describe(a)))
    if not cnp.PyArray_ISNOTSWAPPED(<cnp.ndarray>a):
        raise TypeError("%s must be native-endian float32, got %s" % (name, describe(a)))
    if not cnp.PyArray_ISALIGNED(<cnp.ndarray>a):
        raise ValueError("%s must be aligned (an unaligned float32 view was given: %s)"
                         % (name, describe(a)))
    plain(a, name)   # refuses numpy.ma.MaskedArray (other subclasses: C-level fields only)
    return 0


cdef int check_same_shape(cnp.ndarray a, cnp.ndarray ref, str name, str refname) except -1:
    cdef int nd = cnp.PyArray_NDIM(ref)
    cdef int k
    if cnp.PyArray_NDIM(a) != nd:
        raise ValueError("%s must have the shape of %s %s, got shape %s"
                         % (name, refname, shape_of(ref), shape_of(a)))
    for k in range(nd):
        if cnp.PyArray_DIMS(a)[k] != cnp.PyArray_DIMS(ref)[k]:
            raise ValueError("%s must have the shape of %s %s, got shape %s"
                             % (name, refname, shape_of(ref), shape_of(a)))
    return 0


cdef int check_writeable(cnp.ndarray a, str name) except -1:
    if not cnp.PyArray_ISWRITEABLE(a):
        raise ValueError("%s is read-only (%s); pass a writeable array" % (name, describe(a)))
    check_no_self_overlap(a, name)
    return 0


cdef object as_param(object p, Py_ssize_t n, str name):
    """A small per-feature parameter as a contiguous float32 (n,) array, or None."""
    cdef cnp.ndarray a
    if p is None:
        return None
    if cnp.PyArray_Check(p) and not cnp.PyArray_CheckExact(p):
        refuse_masked(p, name)      # subclasses only: a plain ndarray pays nothing
    if (cnp.PyArray_Check(p) and cnp.PyArray_TYPE(<cnp.ndarray>p) == cnp.NPY_FLOAT32
            and cnp.PyArray_NDIM(<cnp.ndarray>p) == 1 and cnp.PyArray_ISCARRAY_RO(<cnp.ndarray>p)
            and cnp.PyArray_ISNOTSWAPPED(<cnp.ndarray>p)):
        a = <cnp.ndarray>p
    else:
        try:
            arr = np.asarray(p)
        except Exception as exc:
            raise TypeError("%s must be a 1-d float array, got %s" % (name, describe(p))) from exc
        if arr.dtype.kind not in "fiu" or arr.dtype == np.bool_:
            raise TypeError("%s must be a 1-d float array, got %s" % (name, describe(arr)))
        a = np.ascontiguousarray(arr, dtype=np.float32)
        if not cnp.PyArray_ISALIGNED(a):
            a = a.copy()                       # the kernels load whole floats
    if cnp.PyArray_NDIM(a) != 1 or cnp.PyArray_DIMS(a)[0] != n:
        raise ValueError("%s must have shape (%d,), got shape %s" % (name, n, shape_of(a)))
    return a


cdef double check_eps(object eps) except? -1.0:
    """normcy._validate.as_float(eps, "eps", minimum=0) (plain floats checked inline)."""
    return parse_eps(eps, "eps")


cdef cnp.ndarray check_x(object x, str name):
    check_f32_array(x, name)
    cdef cnp.ndarray a = <cnp.ndarray>x
    if cnp.PyArray_NDIM(a) == 0:
        raise ValueError("%s must have at least 1 dimension (normalization is over the last "
                         "axis), got a 0-d array" % name)
    if cnp.PyArray_DIMS(a)[cnp.PyArray_NDIM(a) - 1] == 0:
        raise ValueError("%s has a zero-length last axis (shape %s); cannot normalize over it"
                         % (name, shape_of(a)))
    return a


cdef cnp.ndarray prepare_out(object out, cnp.ndarray x, str name):
    cdef cnp.ndarray o
    if out is None:
        return <cnp.ndarray>cnp.PyArray_EMPTY(cnp.PyArray_NDIM(x), cnp.PyArray_DIMS(x),
                                                cnp.NPY_FLOAT32, 0)
    check_f32_array(out, name)
    o = <cnp.ndarray>out
    check_same_shape(o, x, name, "x")
    check_writeable(o, name)
    return o


# ----------------------------------------------------------------------------------
# Shared driver for the four row-norm functions
# ----------------------------------------------------------------------------------

cdef object _norm(int kind, object x, object residual, object weight, object bias, object eps,
                  object x_bias, object out, object sum_out, object num_threads, bint is_add):
    cdef NormJob j
    cdef cnp.ndarray xa, ra = None, oa, sa = None
    cdef object w, b, xb
    cdef Py_ssize_t n, nrows
    cdef int nd, k, nt
    xa = check_x(x, "x")
    nd = cnp.PyArray_NDIM(xa)
    n = cnp.PyArray_DIMS(xa)[nd - 1]
    if is_add:
        check_f32_array(residual, "residual")
        ra = <cnp.ndarray>residual
        check_same_shape(ra, xa, "residual", "x")
    j.eps = check_eps(eps)
    if kind == KIND_LN_ANNOTATED and n < 2:
        raise ValueError("convention='annotated' uses the unbiased std, which needs at least "
                         "2 features; x has shape %s" % (shape_of(xa),))
    w = as_param(weight, n, "weight")
    b = as_param(bias, n, "bias")
    xb = as_param(x_bias, n, "x_bias")
    oa = prepare_out(out, xa, "out")
    if sum_out is not None:
        check_f32_array(sum_out, "sum_out")
        sa = <cnp.ndarray>sum_out
        check_same_shape(sa, xa, "sum_out", "x")
        check_writeable(sa, "sum_out")
    if out is not None:
        check_overlap(oa, "out", xa, "x", True)
        check_overlap(oa, "out", ra, "residual", True)
        check_overlap(oa, "out", w, "weight", False)
        check_overlap(oa, "out", b, "bias", False)
        check_overlap(oa, "out", xb, "x_bias", False)
    if sa is not None:
        check_overlap(sa, "sum_out", xa, "x", True)
        check_overlap(sa, "sum_out", ra, "residual", True)
        check_overlap(sa, "sum_out", oa, "out", False)
        check_overlap(sa, "sum_out", w, "weight", False)
        check_overlap(sa, "sum_out", b, "bias", False)
        check_overlap(sa, "sum_out", xb, "x_bias", False)
    nrows = 1
    for k in range(nd - 1):
        nrows *= cnp.PyArray_DIMS(xa)[k]
    j.n = n
    j.nrows = nrows
    j.kind = kind
    j.has_r = is_add
    j.has_so = sa is not None
    j.xb = <const float *>cnp.PyArray_DATA(<cnp.ndarray>xb) if xb is not None else NULL
    j.w = <const float *>cnp.PyArray_DATA(<cnp.ndarray>w) if w is not None else NULL
    j.b = <const float *>cnp.PyArray_DATA(<cnp.ndarray>b) if b is not None else NULL
    fill_operand(&j.x, xa)
    fill_operand(&j.y, oa)
    j.gather = j.x.cstride != 4 or j.y.cstride != 4
    if is_add:
        fill_operand(&j.r, ra)
        j.gather = j.gather or j.r.cstride != 4
    if sa is not None:
        fill_operand(&j.so, sa)
        j.gather = j.gather or j.so.cstride != 4
    if n == 1:
        j.gather = 0   # a single element per row is always "contiguous"
    # Calls that touch more memory than the last-level cache holds stream their outputs
    j.stream = (not j.gather and n >= 64
                and streams(nrows * n * <Py_ssize_t>sizeof(float), j.x.data, j.y.data,
                            j.r.data if is_add else NULL, j.so.data if j.has_so else NULL))
    # long contiguous rows can be cut among threads by chunks (run_split)
    nt = resolve_threads(num_threads, nrows * n,
                         nrows if j.gather or n < SPLIT_MIN_N else nrows * (n // NC_CHUNK))
    run_norm_job(&j, nt)
    return oa


def layer_norm(x, weight=None, bias=None, eps=1e-5, *, out=None, convention="standard",
               num_threads=None):
    """Layer normalization over the last axis.

    ``y = (x - mean) / sqrt(var + eps) * weight + bias`` with the biased variance
    (``convention="standard"``, PyTorch's ``layer_norm``), or
    ``y = weight * (x - mean) / (std_unbiased + eps) + bias``
    (``convention="annotated"``, the "Annotated Transformer" variant).

    Parameters
    ----------
    x : ndarray of float32, shape (..., D)
        Input; any number of leading axes, any strides.
    weight, bias : array_like of shape (D,), optional
        Elementwise affine parameters (``None``: 1 and 0).
    eps : float, default 1e-5
        Added to the variance (standard) or the std (annotated); finite and >= 0.
    out : ndarray of float32, shape (..., D), optional
        Output buffer; may be ``x`` itself (in place).
    convention : {"standard", "annotated"}
    num_threads : int, optional
        Threads for this call only (default: :func:`normcy.get_num_threads`).

    Returns
    -------
    ndarray of float32
        ``out`` if given, else a new C-contiguous array.
    """
    cdef int kind
    if convention == "standard":
        kind = KIND_LN
    elif convention == "annotated":
        kind = KIND_LN_ANNOTATED
    else:
        raise ValueError("convention must be 'standard' or 'annotated', got %r" % (convention,))
    return _norm(kind, x, None, weight, bias, eps, None, out, None, num_threads, False)


def add_layer_norm(x, residual, weight=None, bias=None, eps=1e-5, *, x_bias=None, out=None,
                   sum_out=None, num_threads=None):
    """Fused residual add + LayerNorm: ``s = (x + x_bias) + residual``, ``y = LN(s)``.

    One pass over memory: ``s`` is formed row by row in cache and normalized there.

    Parameters
    ----------
    x, residual : ndarray of float32, shape (..., D)
        ``x`` is typically a sub-layer's output, ``residual`` the residual stream.
    weight, bias : array_like of shape (D,), optional
        LayerNorm affine parameters.
    eps : float, default 1e-5
    x_bias : array_like of shape (D,), optional
        Bias of the linear layer that produced ``x``, fused here so the matmul can run
        without it.
    out : ndarray of float32, optional
        Receives ``LN(s)``; may be ``x`` or ``residual`` itself.
    sum_out : ndarray of float32, optional
        Receives ``s`` (the updated residual stream pre-LN models need); may be ``x`` or
        ``residual`` itself.  Without ``x_bias`` it equals NumPy's ``x + residual`` bit
        for bit.
    num_threads : int, optional

    Returns
    -------
    ndarray of float32
        ``out`` if given, else a new array.
    """
    return _norm(KIND_LN, x, residual, weight, bias, eps, x_bias, out, sum_out, num_threads, True)


def rms_norm(x, weight=None, eps=1e-6, *, out=None, num_threads=None):
    """RMS normalization over the last axis: ``y = x / sqrt(mean(x**2) + eps) * weight``.

    Parameters
    ----------
    x : ndarray of float32, shape (..., D)
    weight : array_like of shape (D,), optional
    eps : float, default 1e-6
    out : ndarray of float32, optional
        May be ``x`` itself.
    num_threads : int, optional

    Returns
    -------
    ndarray of float32
    """
    return _norm(KIND_RMS, x, None, weight, None, eps, None, out, None, num_threads, False)


def add_rms_norm(x, residual, weight=None, eps=1e-6, *, x_bias=None, out=None, sum_out=None,
                 num_threads=None):
    """Fused residual add + RMSNorm: ``s = (x + x_bias) + residual``, ``y = RMSNorm(s)``.

    Parameters
    ----------
    x, residual : ndarray of float32, shape (..., D)
    weight : array_like of shape (D,), optional
    eps : float, default 1e-6
    x_bias : array_like of shape (D,), optional
    out, sum_out : ndarray of float32, optional
        As in :func:`add_layer_norm`.
    num_threads : int, optional

    Returns
    -------
    ndarray of float32
    """
    return _norm(KIND_RMS, x, residual, weight, None, eps, x_bias, out, sum_out, num_threads, True)


# ----------------------------------------------------------------------------------
# BatchNorm (inference)
# ----------------------------------------------------------------------------------

def fold_batch_norm(running_mean, running_var, weight=None, bias=None, eps=1e-5):
    """Fold inference-mode BatchNorm into a per-channel affine map.

    ``batch_norm(x) ~= x * scale + shift`` (per channel) with
    ``scale = weight / sqrt(running_var + eps)`` and ``shift = bias - running_mean * scale``,
    computed in float64, for use where the map must be one multiply-add (e.g. folded into
    another layer).  ``x * scale + shift`` loses digits to cancellation when
    ``|running_mean|`` is large against ``sqrt(running_var)`` (about ``|shift| * 6e-8``
    absolute); :func:`batch_norm` then evaluates the centred
    ``(x - running_mean) * scale + bias`` instead.

    Parameters
    ----------
    running_mean, running_var : array_like of shape (C,)
    weight, bias : array_like of shape (C,), optional
    eps : float, default 1e-5

    Returns
    -------
    scale, shift : ndarray of float32, shape (C,)
    """
    cdef double e = check_eps(eps)
    mean = param64(running_mean, "running_mean", -1)
    c = mean.shape[0]
    var = param64(running_var, "running_var", c)
    _check_var(var, e)
    w = param64(weight, "weight", c) if weight is not None else 1.0
    b = param64(bias, "bias", c) if bias is not None else 0.0
    scale = w / np.sqrt(var + e)
    shift = b - mean * scale
    return (np.ascontiguousarray(scale, dtype=np.float32),
            np.ascontiguousarray(np.broadcast_to(shift, (c,)), dtype=np.float32))


def param64(p, name, Py_ssize_t c):
    refuse_masked(p, name)
    try:
        a = np.asarray(p)
    except Exception as exc:
        raise TypeError("%s must be a 1-d float array, got %s" % (name, describe(p))) from exc
    if a.dtype.kind not in "fiu" or a.dtype == np.bool_:
        raise TypeError("%s must be a 1-d float array, got %s" % (name, describe(a)))
    if a.ndim != 1 or (c >= 0 and a.shape[0] != c):
        raise ValueError("%s must have shape (%s,), got shape %s"
                         % (name, "C" if c < 0 else c, shape_of(a)))
    return a.astype(np.float64)


def _check_var(var, double e):
    """running_var + eps must be positive (and not NaN) in every channel: the channel's
    1 / sqrt(running_var + eps) is otherwise inf or NaN.  A slightly negative running_var
    that eps lifts above zero is accepted, as PyTorch computes it."""
    bad = np.flatnonzero(~(var + e > 0))
    if bad.size:
        k = int(bad[0])
        raise ValueError("running_var + eps must be > 0 in every channel; channel %d has "
                         "running_var = %r, eps = %r" % (k, float(var[k]), e))


cdef tuple _bn_params(object running_mean, object running_var, object weight, object bias,
                      object eps, Py_ssize_t c):
    """The kernel's per-channel float32 (C,) arrays (mean, scale, bias): the centred form
    y = (x - mean) * scale + bias, or, with mean None, the folded y = x * scale + shift.
    Folded when every |running_mean| <= 2 sqrt(running_var + eps), where its error stays
    within ~3 ulps of |weight| and it streams one parameter array fewer; centred otherwise,
    where the fold's large shift would cancel (see nc_norm_kern.h).  Scale and shift are
    computed in float64 and rounded once; float32 parameters take a C loop (no NumPy
    temporaries) and are used as given where possible; for the centred form a mean that is
    not a float32 value is split into its float32 value m32 and the rest, which moves into
    the bias: bias + (m32 - mean) * scale."""
    cdef double e, a, mk
    cdef cnp.ndarray sc, sh
    cdef const float *m
    cdef const float *v
    cdef const float *w = NULL
    cdef const float *b = NULL
    cdef float *ps
    cdef float *pb
    cdef Py_ssize_t k
    cdef bint centred = False
    cdef cnp.npy_intp dim = c
    if not (_is_f32_vec(running_mean, c) and _is_f32_vec(running_var, c)
            and (weight is None or _is_f32_vec(weight, c))
            and (bias is None or _is_f32_vec(bias, c))):
        # each parameter converted once (an object's __array__ is not asked twice)
        e = check_eps(eps)
        mean = param64(running_mean, "running_mean", c)
        var = param64(running_var, "running_var", c)
        _check_var(var, e)
        w64 = param64(weight, "weight", c) if weight is not None else None
        b64 = param64(bias, "bias", c) if bias is not None else None
        if bool(np.all(np.abs(mean) <= 2.0 * np.sqrt(var + e))):
            return (None,) + fold_batch_norm(mean, var, w64, b64, e)
        scale = np.broadcast_to((w64 if w64 is not None else 1.0) / np.sqrt(var + e), (c,))
        b64 = b64 if b64 is not None else np.zeros(c)
        m32 = mean.astype(np.float32)
        b64 = b64 + (m32.astype(np.float64) - mean) * scale
        return (m32, np.ascontiguousarray(scale, dtype=np.float32),
                np.ascontiguousarray(b64, dtype=np.float32))
    e = check_eps(eps)
    m = <const float *>cnp.PyArray_DATA(<cnp.ndarray>running_mean)
    v = <const float *>cnp.PyArray_DATA(<cnp.ndarray>running_var)
    if weight is not None:
        w = <const float *>cnp.PyArray_DATA(<cnp.ndarray>weight)
    if bias is not None:
        b = <const float *>cnp.PyArray_DATA(<cnp.ndarray>bias)
    for k in range(c):
        if not (<double>v[k] + e > 0):
            _check_var(np.asarray(running_var, dtype=np.float64), e)
        if fabs(<double>m[k]) > 2.0 * sqrt(<double>v[k] + e):
            centred = True
    sc = <cnp.ndarray>cnp.PyArray_EMPTY(1, &dim, cnp.NPY_FLOAT32, 0)
    ps = <float *>cnp.PyArray_DATA(sc)
    if centred:
        for k in range(c):
            ps[k] = <float>((w[k] if w != NULL else 1.0) / sqrt(<double>v[k] + e))
        if bias is None:
            bias = cnp.PyArray_ZEROS(1, &dim, cnp.NPY_FLOAT32, 0)
        return running_mean, sc, bias
    sh = <cnp.ndarray>cnp.PyArray_EMPTY(1, &dim, cnp.NPY_FLOAT32, 0)
    pb = <float *>cnp.PyArray_DATA(sh)
    for k in range(c):
        a = (w[k] if w != NULL else 1.0) / sqrt(<double>v[k] + e)
        ps[k] = <float>a
        pb[k] = <float>((b[k] if b != NULL else 0.0) - <double>m[k] * a)
    return None, sc, sh


cdef bint _is_f32_vec(object p, Py_ssize_t c) noexcept:
    # exactly an ndarray: subclasses (a masked array among them) take param64's checks
    return (cnp.PyArray_CheckExact(p) and cnp.PyArray_TYPE(<cnp.ndarray>p) == cnp.NPY_FLOAT32
            and cnp.PyArray_NDIM(<cnp.ndarray>p) == 1 and cnp.PyArray_DIMS(<cnp.ndarray>p)[0] == c
            and cnp.PyArray_ISCARRAY_RO(<cnp.ndarray>p) and cnp.PyArray_ISNOTSWAPPED(<cnp.ndarray>p))


cdef struct BNJob:
    const char *x
    char *y
    const float *m
    const float *a
    const float *b
    Py_ssize_t outer, c, inner
    Py_ssize_t rpb   # rows of C per work item (channels last)
    Py_ssize_t pp    # planes: work items per plane (pieces of BN_PIECE floats)
    int rows     # 1: rows of C (channels last); 0: planes of `inner`
    int stream   # outputs streamed (bn_items_stream)
    const float *m2  # channels last, streamed: m, a, b repeated to C + 16 values
    const float *a2
    const float *b2


# Planes longer than this are cut into pieces of this many floats (a multiple of a cache
# line), so that a few large planes (1x3x1024x1024) still give every thread an even share.
DEF BN_PIECE = 65536


cdef inline Py_ssize_t bn_piece(const BNJob *j, Py_ssize_t p, Py_ssize_t *ln) noexcept nogil:
    """Planes: item p's first element (plane p // pp, piece p % pp) and length."""
    cdef Py_ssize_t q = p // j.pp, k = p - q * j.pp
    ln[0] = min(BN_PIECE, j.inner - k * BN_PIECE) if j.pp > 1 else j.inner
    return q * j.inner + k * BN_PIECE


cdef void bn_item(const BNJob *j, Py_ssize_t p) noexcept nogil:
    cdef Py_ssize_t ch, r0, e0, ln
    if j.rows:
        r0 = p * j.rpb
        nc_affine_rows(<const float *>j.x + r0 * j.c, <float *>j.y + r0 * j.c, j.m, j.a, j.b,
                       j.c, min(j.rpb, j.outer - r0))
    else:
        ch = (p // j.pp) % j.c
        e0 = bn_piece(j, p, &ln)
        nc_affine_scalar(<const float *>j.x + e0, <float *>j.y + e0, ln,
                         j.m[ch] if j.m != NULL else 0.0, j.a[ch], j.b[ch], j.m != NULL)


cdef void bn_items_stream(const BNJob *j, Py_ssize_t p0, Py_ssize_t p1) noexcept nogil:
    """Items [p0, p1) with streamed outputs: consecutive items are consecutive memory, so
    one carry joins them (nc_stream_row); flushed and fenced at the end."""
    cdef nc_carry cr
    cdef Py_ssize_t p, ch, r0, r1, e0, ln
    cr.line = NULL
    cr.fill = 0
    if j.rows:
        r0 = p0 * j.rpb
        r1 = min(p1 * j.rpb, j.outer)
        if r1 > r0:
            nc_affine_rows_stream(<const float *>j.x + r0 * j.c, <float *>j.y + r0 * j.c,
                                  j.m2, j.a2, j.b2, j.c, r1 - r0, &cr)
    else:
        for p in range(p0, p1):
            ch = (p // j.pp) % j.c
            e0 = bn_piece(j, p, &ln)
            nc_affine_scalar_stream(<const float *>j.x + e0, <float *>j.y + e0, ln,
                                    j.m[ch] if j.m != NULL else 0.0, j.a[ch], j.b[ch],
                                    j.m != NULL, &cr)
    nc_stream_flush(&cr)
    nc_stream_fence()


def batch_norm(x, running_mean, running_var, weight=None, bias=None, eps=1e-5, *, axis=1,
               out=None, num_threads=None):
    """Inference-mode BatchNorm with running statistics.

    ``y = (x - running_mean) / sqrt(running_var + eps) * weight + bias`` per channel,
    with ``scale = weight / sqrt(running_var + eps)`` (float64, rounded once).  When some
    channel's ``|running_mean|`` exceeds ``2 * sqrt(running_var + eps)`` the call evaluates
    the centred ``fma(x - running_mean[c], scale[c], bias[c])``, accurate to about an ulp of
    the output even for means far from zero, where the folded ``x * scale + shift``
    (:func:`fold_batch_norm`) cancels (6.8e-3 off at mean 1e4, std 0.1); otherwise the
    folded form, within ~3 ulps of ``|weight|`` there and one parameter stream cheaper.
    The choice depends on the parameters only: every layout and thread count gives the
    same bits.

    Parameters
    ----------
    x : ndarray of float32
        (N, C), (N, C, L), NCHW, NCDHW with ``axis=1``; channels-last (NHWC, ...) with
        ``axis=-1``.  Any strides: a Fortran-ordered or transposed array with ``out`` laid
        out alike (``out=None`` gives one) runs as fast as a contiguous one; other
        layouts go through a contiguous copy.
    running_mean, running_var : array_like of shape (C,)
    weight, bias : array_like of shape (C,), optional
    eps : float, default 1e-5
    axis : int, default 1
        The channel axis.
    out : ndarray of float32, optional
        May be ``x`` itself.
    num_threads : int, optional

    Returns
    -------
    ndarray of float32
    """
    cdef cnp.ndarray xa, oa, xv, ov
    cdef BNJob j
    cdef int nd, ax, nt
    cdef Py_ssize_t c, k, outer, inner, items, work
    cdef object out_arg = out
    check_f32_array(x, "x")
    # a subclass is used as its buffer: no later NumPy call (moveaxis, empty_like, ...) may
    # dispatch to subclass code
    xa = <cnp.ndarray>plain(x, "x")
    nd = cnp.PyArray_NDIM(xa)
    if nd == 0:
        raise ValueError("x must have at least 1 dimension, got a 0-d array")
    if type(axis) is not int:
        from normcy._validate import as_int
        axis = as_int(axis, "axis")
    if axis < -nd or axis >= nd:
        raise ValueError("axis %d is out of range for x of shape %s" % (axis, shape_of(xa)))
    ax = axis
    if ax < 0:
        ax += nd
    c = cnp.PyArray_DIMS(xa)[ax]
    if c == 0:
        raise ValueError("x has zero channels along axis %d (shape %s)" % (ax, shape_of(xa)))
    mean32, scale, bias32 = _bn_params(running_mean, running_var, weight, bias, eps, c)
    if out is not None:
        oa = <cnp.ndarray>plain(prepare_out(out, xa, "out"), "out")
    else:
        oa = np.empty_like(xa)
    if out is not None:
        check_overlap(oa, "out", xa, "x", True)
    outer = extent_before(xa, ax)
    inner = extent_after(xa, ax)
    if outer * inner == 0:
        resolve_threads(num_threads, 0, 0)    # validates num_threads
        return oa if out_arg is None else out_arg
    if cnp.PyArray_IS_C_CONTIGUOUS(xa) and cnp.PyArray_IS_C_CONTIGUOUS(oa):
        xv, ov = xa, oa
        j.rows = inner == 1
    else:
        xv = np.moveaxis(xa, ax, -1)
        ov = np.moveaxis(oa, ax, -1)
        perm = sorted(range(nd), key=lambda k: (-abs(xa.strides[k]), k))
        if cnp.PyArray_IS_C_CONTIGUOUS(xv) and cnp.PyArray_IS_C_CONTIGUOUS(ov):
            j.rows = 1
            outer = outer * inner
            inner = 1
        elif (xa.transpose(perm).flags.c_contiguous
              and oa.transpose(perm).flags.c_contiguous):
            # x and out laid out alike in another axis order (Fortran-ordered, transposed;
            # np.empty_like keeps x's): the kernels run on the C-contiguous permutation,
            # whose channel axis is ax's new place (BatchNorm is element-wise: the same bits)
            xv = xa.transpose(perm)
            ov = oa.transpose(perm)
            ax = perm.index(ax)
            outer = extent_before(xv, ax)
            inner = extent_after(xv, ax)
            j.rows = inner == 1
        else:
            # General strides: compute on a contiguous copy, then write back.
            tmp = batch_norm(np.ascontiguousarray(xa), running_mean, running_var, weight, bias,
                             eps, axis=ax, num_threads=num_threads)
            np.copyto(oa, tmp)
            return oa if out_arg is None else out_arg
    j.x = <const char *>cnp.PyArray_DATA(xv)
    j.y = <char *>cnp.PyArray_DATA(ov)
    j.m = <const float *>cnp.PyArray_DATA(<cnp.ndarray>mean32) if mean32 is not None else NULL
    j.a = <const float *>cnp.PyArray_DATA(<cnp.ndarray>scale)
    j.b = <const float *>cnp.PyArray_DATA(<cnp.ndarray>bias32)
    j.outer = outer
    j.c = c
    j.inner = inner
    # channels last: blocks of an even number of rows (~16K floats; pairs share their
    # parameter loads), at least two rows
    j.rpb = max(2, min(256, (16384 // c) & ~1))
    j.pp = (inner + BN_PIECE - 1) // BN_PIECE if inner > BN_PIECE else 1
    items = (outer + j.rpb - 1) // j.rpb if j.rows else outer * c * j.pp
    work = outer * c * inner
    # as the norms: a call that touches more than the last-level cache streams its output
    j.stream = streams(work * <Py_ssize_t>sizeof(float), j.x, j.y)
    j.m2 = j.a2 = j.b2 = NULL
    if j.stream and j.rows:
        m2 = np.resize(mean32, c + 16) if mean32 is not None else None
        a2 = np.resize(scale, c + 16)
        b2 = np.resize(bias32, c + 16)
        j.m2 = <const float *>cnp.PyArray_DATA(<cnp.ndarray>m2) if m2 is not None else NULL
        j.a2 = <const float *>cnp.PyArray_DATA(<cnp.ndarray>a2)
        j.b2 = <const float *>cnp.PyArray_DATA(<cnp.ndarray>b2)
    nt = resolve_threads(num_threads, work, items)
    _run_bn(&j, items, nt)
    return oa if out_arg is None else out_arg


cdef inline Py_ssize_t extent_before(cnp.ndarray a, int ax) noexcept:
    """The product of a's dimensions before axis ax."""
    cdef Py_ssize_t e = 1
    cdef int k
    for k in range(ax):
        e *= cnp.PyArray_DIMS(a)[k]
    return e


cdef inline Py_ssize_t extent_after(cnp.ndarray a, int ax) noexcept:
    """The product of a's dimensions after axis ax."""
    cdef Py_ssize_t e = 1
    cdef int k
    for k in range(ax + 1, cnp.PyArray_NDIM(a)):
        e *= cnp.PyArray_DIMS(a)[k]
    return e


cdef void _run_bn(const BNJob *j, Py_ssize_t items, int nt) noexcept:
    cdef Py_ssize_t p
    cdef int t
    if j.stream:
        # each thread streams a run of consecutive items (their carry joins them)
        if nt <= 1:
            with nogil:
                bn_items_stream(j, 0, items)
        else:
            with nogil:
                for t in prange(nt, schedule='static', num_threads=nt):
                    bn_items_stream(j, items * t // nt, items * (t + 1) // nt)
        return
    if nt <= 1:
        with nogil:
            for p in range(items):
                bn_item(j, p)
    else:
        with nogil:
            for p in prange(items, schedule='static', num_threads=nt):
                bn_item(j, p)


def isa_info():
    """Which SIMD variant runs: a dict (name, detail, vector_bytes, cap, cap_invalid, supported)."""
    return {
        "name": (<bytes>nc_isa_name()).decode(),
        "detail": (<bytes>nc_isa()).decode(),
        "vector_bytes": nc_isa_vbytes(),
        "cap": (<bytes>nc_isa_cap()).decode(),
        "cap_invalid": bool(nc_isa_cap_invalid()),
        "cap_ignored_reason": _cap_ignored_reason(),
        "supported": (<bytes>nc_isa_supported()).decode().split(","),
    }


def kernel_isa():
    """Name of the SIMD kernel variant selected for this CPU."""
    return (<bytes>nc_isa()).decode()


def have_runtime_dispatch():
    return bool(NC_HAVE_CLONES)


def streaming_info():
    """When the norms and BatchNorm stream their outputs: a dict (min_bytes: the bytes a
    call must touch, llc_bytes: the last-level cache size it was taken from)."""
    return {"min_bytes": int(_stream_min_bytes), "llc_bytes": int(_llc)}


# ----------------------------------------------------------------------------------
# BERT embeddings (package-internal: normcy.bert)
# ----------------------------------------------------------------------------------

cdef int _index_rows(object a, str name, Py_ssize_t T, const long long **p) except -1:
    """An index array for embed_layer_norm: None (p = NULL), or C-contiguous int64 (T,)."""
    if a is None:
        p[0] = NULL
        return 0
    if (not cnp.PyArray_Check(a) or cnp.PyArray_TYPE(<cnp.ndarray>a) != cnp.NPY_INT64
            or shape_of(a) != (T,) or not cnp.PyArray_ISCARRAY_RO(<cnp.ndarray>a)):
        raise ValueError("embed_layer_norm: %s must be a C-contiguous int64 array of shape "
                         "(%d,), got %s" % (name, T, describe(a)))
    p[0] = <const long long *>cnp.PyArray_DATA(<cnp.ndarray>a)
    return 0


cdef int _table(object a, str name, Py_ssize_t H) except -1:
    if (not cnp.PyArray_Check(a) or cnp.PyArray_TYPE(<cnp.ndarray>a) != cnp.NPY_FLOAT32
            or cnp.PyArray_NDIM(<cnp.ndarray>a) != 2 or cnp.PyArray_DIMS(<cnp.ndarray>a)[1] != H
            or not cnp.PyArray_ISCARRAY_RO(<cnp.ndarray>a)
            or cnp.PyArray_DIMS(<cnp.ndarray>a)[0] < 1):
        raise ValueError("embed_layer_norm: %s must be a C-contiguous float32 (rows, %d) "
                         "table, got %s" % (name, H, describe(a)))
    return 0


cdef Py_ssize_t _first_outside(const long long *p, Py_ssize_t T, long long lim) noexcept nogil:
    """The first i with p[i] outside [0, lim), or -1."""
    cdef Py_ssize_t i
    for i in range(T):
        if p[i] < 0 or p[i] >= lim:
            return i
    return -1


cdef void embed_rows(const long long *ids, const long long *pids, const long long *tids,
                     Py_ssize_t period, const float *word, const float *pos,
                     const float *typ, float *out, Py_ssize_t r0, Py_ssize_t r1,
                     Py_ssize_t H, const float *w, const float *b, double eps) noexcept nogil:
    """Rows [r0, r1): out[r] = (word[ids[r]] + typ[t_r]) + pos[p_r] in float32, then the
    rows normalized in place (norm_rows: layer_norm's arithmetic)."""
    cdef Py_ssize_t r, k
    cdef const float *wr
    cdef const float *pr
    cdef const float *tr
    cdef float *o
    for r in range(r0, r1):
        wr = word + ids[r] * H
        pr = pos + (pids[r] if pids != NULL else r % period) * H
        tr = typ + (tids[r] * H if tids != NULL else 0)
        o = out + r * H
        for k in range(H):
            o[k] = (wr[k] + tr[k]) + pr[k]
    norm_rows(KIND_LN, out + r0 * H, H, out + r0 * H, H, r1 - r0, H, w, b, eps)


def embed_layer_norm(ids, word, pos, types, weight, bias, eps, out, *, positions=None,
                     Py_ssize_t period=0, type_ids=None, num_threads=None):
    """BERT's embedding layer in one pass (package-internal: normcy.bert).

    ``out[r] = LayerNorm((word[ids[r]] + types[t_r]) + pos[p_r])``, the sums in float32 in
    Hugging Face's order and the LayerNorm exactly layer_norm's (so the same bits as
    ``add_layer_norm(word[ids] + types[t], pos[p], ...)``), for the T rows of out.

    ids : C-contiguous int64 (T,); positions : C-contiguous int64 (T,), or None for
    ``p_r = r % period``; type_ids : C-contiguous int64 (T,), or None for ``t_r = 0``.
    word, pos, types : C-contiguous float32 (rows, H) tables; weight, bias : (H,);
    out : C-contiguous float32 (T, H).  An index outside its table raises ValueError
    naming input_ids / token_type_ids / positions and the range of values given.
    """
    if (not cnp.PyArray_Check(out) or cnp.PyArray_TYPE(<cnp.ndarray>out) != cnp.NPY_FLOAT32
            or cnp.PyArray_NDIM(<cnp.ndarray>out) != 2
            or not cnp.PyArray_ISCARRAY(<cnp.ndarray>out)):
        raise ValueError("embed_layer_norm: out must be a writeable C-contiguous float32 "
                         "(T, H) array, got %s" % describe(out))
    cdef Py_ssize_t T = cnp.PyArray_DIMS(<cnp.ndarray>out)[0]
    cdef Py_ssize_t H = cnp.PyArray_DIMS(<cnp.ndarray>out)[1]
    _table(word, "word", H)
    _table(pos, "pos", H)
    _table(types, "types", H)
    cdef const long long *pi
    cdef const long long *pp
    cdef const long long *pt
    _index_rows(ids, "ids", T, &pi)
    if pi == NULL:
        raise ValueError("embed_layer_norm: ids must be given")
    _index_rows(positions, "positions", T, &pp)
    _index_rows(type_ids, "type_ids", T, &pt)
    if pp == NULL and period < 1:
        raise ValueError("embed_layer_norm: give positions or a period >= 1")
    cdef Py_ssize_t V = cnp.PyArray_DIMS(<cnp.ndarray>word)[0]
    cdef Py_ssize_t P = cnp.PyArray_DIMS(<cnp.ndarray>pos)[0]
    cdef Py_ssize_t TV = cnp.PyArray_DIMS(<cnp.ndarray>types)[0]
    if pp == NULL and period > P:
        raise ValueError("embed_layer_norm: period %d exceeds the %d positions" % (period, P))
    cdef Py_ssize_t bad_i, bad_p = -1, bad_t = -1
    with nogil:
        bad_i = _first_outside(pi, T, V)
        if pp != NULL:
            bad_p = _first_outside(pp, T, P)
        if pt != NULL:
            bad_t = _first_outside(pt, T, TV)
    if bad_i >= 0:
        raise ValueError("input_ids must lie in [0, %d), got values in [%d, %d]"
                         % (V, np.min(ids), np.max(ids)))
    if bad_t >= 0:
        raise ValueError("token_type_ids must lie in [0, %d), got values in [%d, %d]"
                         % (TV, np.min(type_ids), np.max(type_ids)))
    if bad_p >= 0:
        raise ValueError("positions must lie in [0, %d), got values in [%d, %d]"
                         % (P, np.min(positions), np.max(positions)))
    w = as_param(weight, H, "weight")
    b = as_param(bias, H, "bias")
    cdef double e = check_eps(eps)
    cdef const float *pw = <const float *>cnp.PyArray_DATA(<cnp.ndarray>w) if w is not None else NULL
    cdef const float *pb = <const float *>cnp.PyArray_DATA(<cnp.ndarray>b) if b is not None else NULL
    cdef const float *tw = <const float *>cnp.PyArray_DATA(<cnp.ndarray>word)
    cdef const float *tp = <const float *>cnp.PyArray_DATA(<cnp.ndarray>pos)
    cdef const float *tt = <const float *>cnp.PyArray_DATA(<cnp.ndarray>types)
    cdef float *po = <float *>cnp.PyArray_DATA(<cnp.ndarray>out)
    cdef int nt = resolve_threads(num_threads, T * H, T)
    cdef Py_ssize_t c, nch
    if T == 0:
        return out
    with nogil:
        if nt <= 1:
            embed_rows(pi, pp, pt, period, tw, tp, tt, po, 0, T, H, pw, pb, e)
        else:
            nch = nt * 4 if nt * 4 < T else T
            for c in prange(nch, schedule='dynamic', num_threads=nt):
                embed_rows(pi, pp, pt, period, tw, tp, tt, po, T * c // nch,
                           T * (c + 1) // nch, H, pw, pb, e)
    return out
