# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False, cdivision=True
"""Memory-bound kernels of the Transformer block: masked + scaled softmax, GELU (exact erf and
tanh approximation), ReLU and fused bias + activation (+ residual).

Same conventions as the norm kernels: float32 activations (no silent casts), computation over
the last axis with any number of leading axes and any strides, the GIL released, rows spread
over OpenMP threads with a static schedule (serial for small work), each row computed by one
thread in a fixed order so that results are bit-for-bit independent of the thread count.
The SIMD row kernels (with their accuracy notes) live in ``src/nc_ops_kern.h`` (one SIMD vocabulary and dispatch: ``src/nc_api.h``).
"""
from libc.stdint cimport uint8_t
from libc.math cimport isfinite, sqrt, INFINITY
from libc.stdlib cimport malloc, free
from cython.parallel cimport prange

cimport numpy as cnp
import numpy as np

from normcy._parallel cimport resolve_threads
from normcy._arraychecks cimport (describe, shape_of, extent, identical_view, check_overlap, plain,
                                  same_shape, parse_f32_real, check_no_self_overlap)

cnp.import_array()
nc_stream_init()

cdef extern from "nc_api_ops.h" nogil:
    void nc_ops_act_row(const float *x, const float *bias, const float *res, float *out,
                        Py_ssize_t n, int act)
    void nc_ops_exp_row(const float *x, float *out, Py_ssize_t n)
    void nc_ops_softmax_row(const float *x, float *out, Py_ssize_t n, float scale,
                            const float *mask, const uint8_t *kpm, Py_ssize_t limit)
    void nc_ops_softmax_row2(const float *x0, const float *x1, float *out0, float *out1,
                             Py_ssize_t n, float scale, const float *mask0,
                             const float *mask1, const uint8_t *kpm0, const uint8_t *kpm1,
                             Py_ssize_t limit0, Py_ssize_t limit1)
    const char *nc_ops_isa()
    void nc_stream_init()
    int NCO_ACT_IDENTITY
    int NCO_ACT_RELU
    int NCO_ACT_GELU
    int NCO_ACT_GELU_TANH

DEF MAXD = 64
# Long rows are cut into segments of this many floats so that element-wise work on a few
# long rows still spreads over threads.
DEF SEG = 8192
# Chunks per thread of a parallel call (see run_chunks)
DEF CHUNKS_PER_THREAD = 8

_ACTIVATIONS = {
    None: NCO_ACT_IDENTITY,
    "identity": NCO_ACT_IDENTITY,
    "none": NCO_ACT_IDENTITY,
    "relu": NCO_ACT_RELU,
    "gelu": NCO_ACT_GELU,
    "gelu_tanh": NCO_ACT_GELU_TANH,
}

# ----------------------------------------------------------------------------------
# Row iteration over up to four operands that share the leading shape
# ----------------------------------------------------------------------------------

cdef struct RowIter:
    int nlead                      # leading dims (>= 1)
    int nops
    Py_ssize_t shape[MAXD]
    Py_ssize_t st[4][MAXD]         # byte strides of each operand's leading dims
    char *base[4]


cdef inline void it_seek(const RowIter *it, Py_ssize_t r, Py_ssize_t *idx, char **p) noexcept nogil:
    cdef int k, o
    cdef Py_ssize_t q
    for o in range(it.nops):
        p[o] = it.base[o]
    k = it.nlead - 1
    while k >= 0:
        q = r % it.shape[k]
        r = r // it.shape[k]
        idx[k] = q
        for o in range(it.nops):
            p[o] += q * it.st[o][k]
        k -= 1


cdef inline void it_next(const RowIter *it, Py_ssize_t *idx, char **p) noexcept nogil:
    cdef int k = it.nlead - 1, o
    while k >= 0:
        idx[k] += 1
        for o in range(it.nops):
            p[o] += it.st[o][k]
        if idx[k] < it.shape[k]:
            return
        for o in range(it.nops):
            p[o] -= it.st[o][k] * it.shape[k]
        idx[k] = 0
        k -= 1


cdef void it_init(RowIter *it, tuple shape, int nops) noexcept:
    """Leading shape = shape[:-1] (a 1-d array is one row)."""
    cdef int nd = len(shape), k
    it.nops = nops
    if nd <= 1:
        it.nlead = 1
        it.shape[0] = 1
        for k in range(4):
            it.st[k][0] = 0
        return
    it.nlead = nd - 1
    for k in range(nd - 1):
        it.shape[k] = shape[k]


cdef void it_operand(RowIter *it, int o, cnp.ndarray a) noexcept:
    """Operand o: an array whose shape equals the iteration shape (possibly broadcast)."""
    cdef int nd = cnp.PyArray_NDIM(a), k
    it.base[o] = <char *>cnp.PyArray_DATA(a)
    if nd <= 1:
        it.st[o][0] = 0
        return
    for k in range(nd - 1):
        it.st[o][k] = cnp.PyArray_STRIDES(a)[k]


# ----------------------------------------------------------------------------------
# Validation helpers
# ----------------------------------------------------------------------------------

cdef int check_f32(object a, str name) except -1:
    if not cnp.PyArray_Check(a):
        raise TypeError("%s must be a float32 numpy.ndarray, got %s" % (name, describe(a)))
    if cnp.PyArray_TYPE(<cnp.ndarray>a) != cnp.NPY_FLOAT32 or not cnp.PyArray_ISNOTSWAPPED(<cnp.ndarray>a):
        raise TypeError("%s must have dtype float32 (native byte order), got %s; "
                        "normcy does not cast activations" % (name, describe(a)))
    if not cnp.PyArray_ISALIGNED(<cnp.ndarray>a):
        # the row kernels load whole floats: an unaligned view is undefined behaviour in C
        raise ValueError("%s must be aligned (an unaligned float32 view was given: %s)"
                         % (name, describe(a)))
    return 0


cdef int check_x(object x) except -1:
    check_f32(x, "x")
    if cnp.PyArray_NDIM(<cnp.ndarray>x) == 0:
        raise ValueError("x must have at least one dimension, got a 0-d array")
    # an empty array of any shape is valid ((3, 0) as (0, 3)): the callers return the
    # (empty) output after validating the other arguments, before any kernel runs
    if cnp.PyArray_NDIM(<cnp.ndarray>x) > MAXD:
        raise ValueError("x has %d dimensions; at most %d are supported"
                         % (cnp.PyArray_NDIM(<cnp.ndarray>x), MAXD))
    return 0


cdef object prepare_out(object out, object x):
    """The output as a plain ndarray (see _arraychecks.plain), checked against x (C-level
    shapes); a new C-contiguous array when out is None."""
    cdef cnp.ndarray xa = <cnp.ndarray>x
    if out is None:
        return cnp.PyArray_EMPTY(cnp.PyArray_NDIM(xa), cnp.PyArray_DIMS(xa), cnp.NPY_FLOAT32, 0)
    check_f32(out, "out")
    out = plain(out, "out")
    if not same_shape(<cnp.ndarray>out, xa):
        raise ValueError("out must have the shape of x %s, got shape %s" % (shape_of(x), shape_of(out)))
    if not cnp.PyArray_ISWRITEABLE(<cnp.ndarray>out):
        raise ValueError("out is read-only (%s); pass a writeable array" % describe(out))
    check_no_self_overlap(<cnp.ndarray>out, "out")
    return out


cdef inline bint unit_last(cnp.ndarray a) noexcept:
    return cnp.PyArray_DIMS(a)[cnp.PyArray_NDIM(a) - 1] == 1 or \
        cnp.PyArray_STRIDES(a)[cnp.PyArray_NDIM(a) - 1] == 4


cdef object broadcast_last_unit(object m, tuple shape, str name, object dtype, int itemsize):
    """Broadcast a mask (a plain ndarray) to `shape` such that its last axis has unit stride."""
    cdef int nd = len(shape)
    try:
        mb = np.broadcast_to(m, shape)
    except ValueError:
        raise ValueError("%s of shape %s cannot be broadcast to the shape of x %s"
                         % (name, shape_of(m), shape)) from None
    if cnp.PyArray_STRIDES(<cnp.ndarray>mb)[nd - 1] != itemsize and shape[nd - 1] > 1:
        # materialize only the mask's own extent along the last axis
        m2 = m.reshape((1,) * (nd - cnp.PyArray_NDIM(<cnp.ndarray>m)) + shape_of(m))
        m2 = np.ascontiguousarray(np.broadcast_to(m2, shape_of(m2)[:nd - 1] + (shape[nd - 1],)),
                                  dtype=dtype)
        mb = np.broadcast_to(m2, shape)
    return mb


cdef int act_code(object activation) except -1:
    if activation is not None and not isinstance(activation, str):
        raise TypeError("activation must be None or a str ('identity', 'relu', 'gelu', "
                        "'gelu_tanh'), got %s" % type(activation).__name__)
    try:
        return _ACTIVATIONS[activation]
    except KeyError:
        raise ValueError("activation must be one of 'identity', 'relu', 'gelu', 'gelu_tanh', "
                         "got %r" % (activation,)) from None


ctypedef void (*chunk_body)(const void *job, Py_ssize_t i0, Py_ssize_t i1) noexcept nogil


cdef void run_chunks(chunk_body body, const void *job, Py_ssize_t n, int nt) noexcept nogil:
    """Items [0, n) of a job: serially, or in contiguous chunks (about CHUNKS_PER_THREAD per
    thread) that the threads take as they become free (dynamic schedule).  Equal static
    shares made the slowest core set the time: on the AMD EPYC VM one core at a time runs
    ~1.6x slower for 0.1-1 s (something else on the host shares it), and a 2-thread call
    then took as long as that core's half.  Every item is computed the same way whichever
    thread takes it (the same bits)."""
    cdef Py_ssize_t c, per, nch
    if nt <= 1:
        body(job, 0, n)
        return
    nch = min(n, <Py_ssize_t>nt * CHUNKS_PER_THREAD)
    per = (n + nch - 1) // nch
    nch = (n + per - 1) // per
    for c in prange(nch, schedule='dynamic', num_threads=nt):
        body(job, c * per, min((c + 1) * per, n))


# ----------------------------------------------------------------------------------
# Softmax
# ----------------------------------------------------------------------------------

cdef struct SoftmaxJob:
    RowIter it                     # operands: 0 x, 1 out, 2 mask, 3 key padding mask
    Py_ssize_t n
    Py_ssize_t nrows
    float scale
    bint has_mask
    bint has_kpm
    bint causal


cdef void softmax_rows(const SoftmaxJob *j, Py_ssize_t r0, Py_ssize_t r1) noexcept nogil:
    cdef Py_ssize_t idx[MAXD]
    cdef char *p[4]
    cdef Py_ssize_t r, limit = j.n
    if r0 >= r1:
        return
    cdef char *q[4]
    cdef Py_ssize_t limit1 = j.n
    it_seek(&j.it, r0, idx, p)
    r = r0
    # rows in pairs: the two-row kernel overlaps one row's serial reductions with the other
    # row's vector work (same results as one row at a time)
    while r + 1 < r1:
        if j.causal:
            limit = idx[j.it.nlead - 1] + 1
        q[0] = p[0]
        q[1] = p[1]
        q[2] = p[2]
        q[3] = p[3]
        it_next(&j.it, idx, p)
        if j.causal:
            limit1 = idx[j.it.nlead - 1] + 1
        nc_ops_softmax_row2(<const float *>q[0], <const float *>p[0], <float *>q[1],
                            <float *>p[1], j.n, j.scale,
                            <const float *>q[2] if j.has_mask else NULL,
                            <const float *>p[2] if j.has_mask else NULL,
                            <const uint8_t *>q[3] if j.has_kpm else NULL,
                            <const uint8_t *>p[3] if j.has_kpm else NULL, limit, limit1)
        it_next(&j.it, idx, p)
        r += 2
    if r < r1:
        if j.causal:
            limit = idx[j.it.nlead - 1] + 1
        nc_ops_softmax_row(<const float *>p[0], <float *>p[1], j.n, j.scale,
                           <const float *>p[2] if j.has_mask else NULL,
                           <const uint8_t *>p[3] if j.has_kpm else NULL, limit)


cdef void softmax_body(const void *job, Py_ssize_t r0, Py_ssize_t r1) noexcept nogil:
    softmax_rows(<const SoftmaxJob *>job, r0, r1)


def softmax(x, *, scale=None, mask=None, key_padding_mask=None, is_causal=False, out=None,
            num_threads=None):
    """Masked, scaled softmax over the last axis (numerically safe).

    Computes ``softmax(x * scale + mask)`` over the last axis after setting the positions
    selected by `key_padding_mask` (and, with `is_causal`, the positions above the diagonal)
    to ``-inf``.  The row maximum is subtracted before exponentiation.  A row whose every
    position is masked gives zeros, never NaN.

    Parameters
    ----------
    x : ndarray of float32, shape (..., n)
        Logits (e.g. attention scores of shape (batch, heads, queries, keys)).  Any strides.
    scale : float, optional
        Multiplies `x` before the mask is added (default 1).  Must be finite.
    mask : ndarray of float, optional
        Additive mask broadcastable to ``x.shape`` (NumPy rules), e.g. ``(queries, keys)``;
        ``-inf`` masks a position out.  Converted to float32.
    key_padding_mask : ndarray of bool, optional
        Broadcastable to ``x.shape``; True marks a position that must get zero weight.  For
        PyTorch's (batch, keys) padding mask and 4-d scores pass
        ``key_padding_mask[:, None, None, :]``.
    is_causal : bool, optional
        Query ``i`` (the index along axis -2) may only attend to keys ``j <= i`` (top-left
        aligned, as ``torch.nn.functional.scaled_dot_product_attention``).  Needs
        ``x.ndim >= 2``.
    out : ndarray of float32, optional
        Output with the shape of `x`; may be `x` itself (in place).
    num_threads : int, optional
        Threads for this call (default: ``normcy.get_num_threads()``).

    Returns
    -------
    ndarray of float32
        `out` if given, else a new array.
    """
    cdef SoftmaxJob j
    cdef double s
    cdef int nt
    cdef object out_arg = out
    check_x(x)
    x = plain(x, "x")
    cdef tuple shape = shape_of(x)
    cdef int nd = len(shape)
    s = 1.0 if scale is None else parse_f32_real(scale, "scale")
    if not isinstance(is_causal, (bool, np.bool_)):
        raise TypeError("is_causal must be a bool, got %s" % type(is_causal).__name__)
    causal = bool(is_causal)
    if causal and nd < 2:
        raise ValueError("is_causal=True needs x with at least 2 dimensions (queries, keys), "
                         "got shape %s" % (shape,))
    mb = None
    if mask is not None:
        if not isinstance(mask, np.ndarray):
            raise TypeError("mask must be a float numpy.ndarray, got %s" % describe(mask))
        mask = plain(mask, "mask")
        if mask.dtype.kind != "f":
            raise TypeError("mask must be a floating-point array (additive mask), got %s; "
                            "use key_padding_mask for a boolean mask" % describe(mask))
        if cnp.PyArray_NDIM(<cnp.ndarray>mask) > nd:
            raise ValueError("mask of shape %s cannot be broadcast to the shape of x %s"
                             % (shape_of(mask), shape))
        if (mask.dtype != np.float32 or not mask.dtype.isnative
                or not cnp.PyArray_ISALIGNED(<cnp.ndarray>mask)):
            mask = mask.astype(np.float32)     # a copy: native, aligned
        mb = broadcast_last_unit(mask, shape, "mask", np.float32, 4)
    kb = None
    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, np.ndarray):
            raise TypeError("key_padding_mask must be a bool numpy.ndarray, got %s"
                            % describe(key_padding_mask))
        key_padding_mask = plain(key_padding_mask, "key_padding_mask")
        if key_padding_mask.dtype != np.bool_:
            raise TypeError("key_padding_mask must have dtype bool (True = masked out), got %s"
                            % describe(key_padding_mask))
        if cnp.PyArray_NDIM(<cnp.ndarray>key_padding_mask) > nd:
            raise ValueError("key_padding_mask of shape %s cannot be broadcast to the shape of "
                             "x %s" % (shape_of(key_padding_mask), shape))
        kb = broadcast_last_unit(key_padding_mask, shape, "key_padding_mask", np.bool_, 1)
    out = prepare_out(out, x)
    check_overlap(<cnp.ndarray>out, "out", x, "x", True)
    check_overlap(<cnp.ndarray>out, "out", mask, "mask", False)
    check_overlap(<cnp.ndarray>out, "out", key_padding_mask, "key_padding_mask", False)
    if cnp.PyArray_SIZE(<cnp.ndarray>x) == 0:
        resolve_threads(num_threads, 0, 0)    # validates num_threads
        return out if out_arg is None else out_arg   # the caller's object, not its plain view
    # The row kernel wants unit stride along the last axis.
    xs = x if unit_last(<cnp.ndarray>x) else np.ascontiguousarray(x)
    target = out
    if not unit_last(<cnp.ndarray>out):
        target = np.empty(shape, dtype=np.float32)
    it_init(&j.it, shape, 4)
    it_operand(&j.it, 0, <cnp.ndarray>xs)
    it_operand(&j.it, 1, <cnp.ndarray>target)
    j.has_mask = mb is not None
    j.has_kpm = kb is not None
    if j.has_mask:
        it_operand(&j.it, 2, <cnp.ndarray>mb)
    else:
        it_operand(&j.it, 2, <cnp.ndarray>xs)
    if j.has_kpm:
        it_operand(&j.it, 3, <cnp.ndarray>kb)
    else:
        it_operand(&j.it, 3, <cnp.ndarray>xs)
    j.n = shape[nd - 1]
    j.nrows = cnp.PyArray_SIZE(<cnp.ndarray>x) // j.n
    j.scale = <float>s
    j.causal = causal
    nt = resolve_threads(num_threads, cnp.PyArray_SIZE(<cnp.ndarray>x), j.nrows)
    with nogil:
        run_chunks(softmax_body, &j, j.nrows, nt)
    if target is not out:
        np.copyto(out, target)
    return out if out_arg is None else out_arg


# ----------------------------------------------------------------------------------
# Element-wise: bias + activation (+ residual)
# ----------------------------------------------------------------------------------

cdef struct ActJob:
    RowIter it                     # operands: 0 x, 1 out, 2 residual
    Py_ssize_t n
    Py_ssize_t nrows
    Py_ssize_t segs                # segments per row
    Py_ssize_t ntasks
    const float *bias
    bint has_res
    int act


cdef void act_tasks(const ActJob *j, Py_ssize_t t0, Py_ssize_t t1) noexcept nogil:
    cdef Py_ssize_t idx[MAXD]
    cdef char *p[4]
    cdef Py_ssize_t t, row, seg, c0, c1
    if t0 >= t1:
        return
    row = t0 // j.segs
    seg = t0 - row * j.segs
    it_seek(&j.it, row, idx, p)
    for t in range(t0, t1):
        c0 = seg * SEG
        c1 = min(c0 + SEG, j.n)
        nc_ops_act_row(<const float *>p[0] + c0,
                       j.bias + c0 if j.bias != NULL else NULL,
                       <const float *>p[2] + c0 if j.has_res else NULL,
                       <float *>p[1] + c0, c1 - c0, j.act)
        seg += 1
        if seg == j.segs:
            seg = 0
            it_next(&j.it, idx, p)


cdef void act_body(const void *job, Py_ssize_t t0, Py_ssize_t t1) noexcept nogil:
    act_tasks(<const ActJob *>job, t0, t1)


cdef object _elementwise(object x, object bias, int act, object residual, object out,
                         object num_threads):
    cdef ActJob j
    cdef int nt
    cdef cnp.ndarray ba
    cdef object out_arg = out
    check_x(x)
    x = plain(x, "x")
    cdef tuple shape = shape_of(x)
    cdef Py_ssize_t n = shape[len(shape) - 1]
    ba_obj = None
    if bias is not None:
        if not isinstance(bias, np.ndarray):
            try:
                bias = np.asarray(bias)
            except Exception:
                raise TypeError("bias must be a 1-d float array, got %s" % describe(bias)) from None
        bias = plain(bias, "bias")
        if bias.dtype.kind not in "fiu" or bias.dtype == np.bool_:
            raise TypeError("bias must be a 1-d float array, got %s" % describe(bias))
        if cnp.PyArray_NDIM(<cnp.ndarray>bias) != 1 or cnp.PyArray_DIMS(<cnp.ndarray>bias)[0] != n:
            raise ValueError("bias must have shape (%d,) (the last axis of x), got shape %s"
                             % (n, shape_of(bias)))
        ba_obj = np.ascontiguousarray(bias, dtype=np.float32)
        if not cnp.PyArray_ISALIGNED(<cnp.ndarray>ba_obj):
            ba_obj = ba_obj.copy()             # the kernels load whole floats
    if residual is not None:
        check_f32(residual, "residual")
        residual = plain(residual, "residual")
        if not same_shape(<cnp.ndarray>residual, <cnp.ndarray>x):
            raise ValueError("residual must have the shape of x %s, got shape %s"
                             % (shape, shape_of(residual)))
    out = prepare_out(out, x)
    check_overlap(<cnp.ndarray>out, "out", x, "x", True)
    check_overlap(<cnp.ndarray>out, "out", residual, "residual", True)
    check_overlap(<cnp.ndarray>out, "out", bias, "bias", False)
    if cnp.PyArray_SIZE(<cnp.ndarray>x) == 0:
        resolve_threads(num_threads, 0, 0)    # validates num_threads
        return out if out_arg is None else out_arg   # the caller's object, not its plain view
    xs = x if unit_last(<cnp.ndarray>x) else np.ascontiguousarray(x)
    rs = None
    if residual is not None:
        rs = residual if unit_last(<cnp.ndarray>residual) else np.ascontiguousarray(residual)
    target = out
    if not unit_last(<cnp.ndarray>out):
        target = np.empty(shape, dtype=np.float32)
    it_init(&j.it, shape, 3)
    it_operand(&j.it, 0, <cnp.ndarray>xs)
    it_operand(&j.it, 1, <cnp.ndarray>target)
    it_operand(&j.it, 2, <cnp.ndarray>(rs if rs is not None else xs))
    j.has_res = rs is not None
    if ba_obj is not None:
        ba = <cnp.ndarray>ba_obj
        j.bias = <const float *>cnp.PyArray_DATA(ba)
    else:
        j.bias = NULL
    j.n = n
    j.nrows = cnp.PyArray_SIZE(<cnp.ndarray>x) // n
    j.segs = (n + SEG - 1) // SEG
    j.ntasks = j.nrows * j.segs
    j.act = act
    nt = resolve_threads(num_threads, cnp.PyArray_SIZE(<cnp.ndarray>x), j.ntasks)
    with nogil:
        run_chunks(act_body, &j, j.ntasks, nt)
    if target is not out:
        np.copyto(out, target)
    return out if out_arg is None else out_arg


def bias_activation(x, bias=None, activation="identity", *, residual=None, out=None,
                    num_threads=None):
    """Fused ``activation(x + bias) + residual`` over the last axis.

    Parameters
    ----------
    x : ndarray of float32, shape (..., n)
        Input, e.g. the output of a matmul that ran without its bias.  Any strides.
    bias : array_like, shape (n,), optional
        Added to every row before the activation (converted to float32).
    activation : {"identity", "relu", "gelu", "gelu_tanh"}, optional
        ``"gelu"`` is the exact erf form, ``"gelu_tanh"`` the tanh approximation
        (PyTorch ``approximate="tanh"``, Hugging Face ``gelu_new``).  None means identity.
    residual : ndarray of float32, shape of `x`, optional
        Added after the activation.  May be the same array as `out`.
    out : ndarray of float32, optional
        Output with the shape of `x`; may be `x` (or `residual`) itself.
    num_threads : int, optional
        Threads for this call (default: ``normcy.get_num_threads()``).

    Returns
    -------
    ndarray of float32
        `out` if given, else a new array.
    """
    return _elementwise(x, bias, act_code(activation), residual, out, num_threads)


def bias_add(x, bias, *, out=None, num_threads=None):
    """``x + bias`` over the last axis (``bias_activation`` with the identity)."""
    return _elementwise(x, bias, NCO_ACT_IDENTITY, None, out, num_threads)


def gelu(x, *, approximate="none", out=None, num_threads=None):
    """GELU, ``x * Phi(x)``.

    Parameters
    ----------
    x : ndarray of float32
        Input, any shape and strides.
    approximate : {"none", "tanh"}, optional
        ``"none"``: exact, with the Gaussian CDF from erf (PyTorch's default).
        ``"tanh"``: ``0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))``.
    out : ndarray of float32, optional
        Output with the shape of `x`; may be `x` itself.
    num_threads : int, optional
        Threads for this call.

    Returns
    -------
    ndarray of float32

    Notes
    -----
    Accuracy against float64, for every float32 `x`: the exact GELU's relative error is at
    most ``4e-7 * max(5, x**2 / 2)`` (measured: 4.5e-7 for x > 0, 4.8e-7 on [-2, 0], 8.7e-6
    near x = -13); Phi comes from erfc, so negative inputs do not lose precision to the
    cancellation in ``1 + erf(x / sqrt(2))`` (PyTorch's float32 ``F.gelu`` returns 0 for
    x <= -6 and is 4% off at x = -5).  For |x| > 13.16 the result is `x` (x > 0) or -0
    (x < 0, where the true value is below 1.2e-38 in magnitude).  ``"tanh"``: relative
    error at most ``4e-7 * max(5, 2 |u|)``, u the tanh argument, down to x = -10.06; below
    it the result is -0 (the true value is below 2.3e-38 in magnitude).  NaN gives NaN,
    -inf gives -0, +inf gives +inf.
    """
    if not isinstance(approximate, str):
        raise TypeError("approximate must be 'none' or 'tanh', got %s"
                        % type(approximate).__name__)
    if approximate == "none":
        act = NCO_ACT_GELU
    elif approximate == "tanh":
        act = NCO_ACT_GELU_TANH
    else:
        raise ValueError("approximate must be 'none' or 'tanh', got %r" % (approximate,))
    return _elementwise(x, None, act, None, out, num_threads)


def relu(x, *, out=None, num_threads=None):
    """ReLU, ``max(x, 0)`` (NaN stays NaN).

    Parameters
    ----------
    x : ndarray of float32
        Input, any shape and strides.
    out : ndarray of float32, optional
        Output with the shape of `x`; may be `x` itself.
    num_threads : int, optional
        Threads for this call.

    Returns
    -------
    ndarray of float32
    """
    return _elementwise(x, None, NCO_ACT_RELU, None, out, num_threads)


def _exp(x, *, out=None):
    """The vectorized float32 exp used by softmax and GELU (exposed for accuracy tests)."""
    cdef RowIter it
    check_x(x)
    x = plain(x, "x")
    xs = np.ascontiguousarray(x).reshape(-1)
    res = np.empty(shape_of(xs), dtype=np.float32)
    cdef float *src = <float *>cnp.PyArray_DATA(<cnp.ndarray>xs)
    cdef float *dst = <float *>cnp.PyArray_DATA(<cnp.ndarray>res)
    cdef Py_ssize_t n = cnp.PyArray_SIZE(<cnp.ndarray>xs)
    with nogil:
        nc_ops_exp_row(src, dst, n)
    res = res.reshape(shape_of(x))
    if out is not None:
        plain(out, "out")[...] = res
        return out
    return res


def kernel_isa():
    """The SIMD variant of the ops kernels that runs on this CPU."""
    return nc_ops_isa().decode()


# ----------------------------------------------------------------------------------
# Attention head split (private: used by normcy.transformer)
# ----------------------------------------------------------------------------------

cdef void split_block(const float *src, Py_ssize_t ld, const float *bq, float *q, float *kt,
                      float *v, Py_ssize_t S, Py_ssize_t dh, Py_ssize_t H, Py_ssize_t hh) noexcept nogil:
    """One (sequence, head) block: src points at the sequence's first row of qkv."""
    cdef Py_ssize_t s, d
    cdef const float *row
    cdef const float *b = bq + hh * dh
    cdef float *qo
    cdef float *vo
    for s in range(S):
        row = src + s * ld + hh * dh
        qo = q + s * dh
        vo = v + s * dh
        for d in range(dh):
            qo[d] = row[d] + b[d]
        for d in range(dh):
            vo[d] = row[2 * H + d]
        for d in range(dh):
            kt[d * S + s] = row[H + d]


def _split_heads(qkv, bq, q, kt, v, Py_ssize_t nseq, Py_ssize_t S, Py_ssize_t nhead,
                 num_threads=None):
    """Copy packed projections into head-major buffers for batched attention matmuls.

    qkv : (nseq*S, 3H) float32 C-contiguous rows ``[q | k | v]`` (row stride may exceed 3H
    when it is a row slice); bq : (H,) added to q.  Writes q (nseq, h, S, dh),
    kt (nseq, h, dh, S) (keys transposed) and v (nseq, h, S, dh), all C-contiguous.
    """
    if not cnp.PyArray_Check(qkv) or cnp.PyArray_NDIM(<cnp.ndarray>qkv) != 2 or nhead < 1:
        raise ValueError("_split_heads: bad qkv %s" % describe(qkv))
    cdef cnp.ndarray a = <cnp.ndarray>plain(qkv, "qkv")
    cdef Py_ssize_t H = a.shape[1] // 3
    cdef Py_ssize_t dh = H // nhead
    cdef Py_ssize_t ld = a.strides[0] // 4
    if (a.ndim != 2 or a.shape[0] != nseq * S or a.shape[1] != 3 * H or a.strides[1] != 4
            or a.dtype != np.float32 or H % nhead):
        raise ValueError("_split_heads: bad qkv %s" % describe(qkv))
    for name, arr, shp in (("q", q, (nseq, nhead, S, dh)), ("kt", kt, (nseq, nhead, dh, S)),
                           ("v", v, (nseq, nhead, S, dh)), ("bq", bq, (H,))):
        if (not isinstance(arr, np.ndarray) or arr.dtype != np.float32
                or shape_of(arr) != shp or not cnp.PyArray_IS_C_CONTIGUOUS(<cnp.ndarray>arr)):
            raise ValueError("_split_heads: %s must be C-contiguous float32 %s, got %s"
                             % (name, shp, describe(arr)))
    cdef const float *src = <const float *>cnp.PyArray_DATA(a)
    cdef const float *pb = <const float *>cnp.PyArray_DATA(<cnp.ndarray>bq)
    cdef float *pq = <float *>cnp.PyArray_DATA(<cnp.ndarray>q)
    cdef float *pk = <float *>cnp.PyArray_DATA(<cnp.ndarray>kt)
    cdef float *pv = <float *>cnp.PyArray_DATA(<cnp.ndarray>v)
    cdef Py_ssize_t nblk = nseq * nhead, i, bs, hh, blk = S * dh
    cdef int nt = resolve_threads(num_threads, 3 * nseq * S * H, nblk)
    with nogil:
        if nt <= 1:
            for i in range(nblk):
                bs = i // nhead
                hh = i - bs * nhead
                split_block(src + bs * S * ld, ld, pb, pq + i * blk, pk + i * blk,
                            pv + i * blk, S, dh, H, hh)
        else:
            for i in prange(nblk, schedule='static', num_threads=nt):
                bs = i // nhead
                hh = i - bs * nhead
                split_block(src + bs * S * ld, ld, pb, pq + i * blk, pk + i * blk,
                            pv + i * blk, S, dh, H, hh)


# ----------------------------------------------------------------------------------
# Sentence-embedding pooling (package-internal: normcy.sentence)
# ----------------------------------------------------------------------------------

#: Pooling mode codes, in normcy.sentence.POOLING_MODES' order
POOL_CLS, POOL_MAX, POOL_MEAN, POOL_MEAN_SQRT_LEN, POOL_WEIGHTED_MEAN, POOL_LAST = range(6)


cdef void pool_row(const float *h, Py_ssize_t n, Py_ssize_t s0, Py_ssize_t H, int mode,
                   double *acc, float *dst) noexcept nogil:
    """One sequence's pooled vector: h = its (S, H) rows, n = its valid tokens (the first
    n rows), of which rows [s0, n) are pooled (s0 > 0: a prompt's tokens left out, as
    sentence-transformers' include_prompt=False zeroes them in the attention mask; none
    left when s0 >= n).  Sums in float64, in token order, rounded to float32 once (as the
    reference normcy.sentence._pool); max propagates NaN (as numpy's max)."""
    cdef Py_ssize_t t, k
    cdef double den
    cdef float m, v
    if mode == 0:        # cls: the first pooled row (the first row when none is left)
        t = s0 if s0 < n else 0
        for k in range(H):
            dst[k] = h[t * H + k]
    elif mode == 5:      # last token
        for k in range(H):
            dst[k] = h[(n - 1) * H + k] if n > s0 else 0.0
    elif mode == 1:      # max
        if n <= s0:
            for k in range(H):
                dst[k] = -INFINITY
            return
        for k in range(H):
            dst[k] = h[s0 * H + k]
        for t in range(s0 + 1, n):
            for k in range(H):
                v = h[t * H + k]
                m = dst[k]
                if v > m or v != v:
                    m = v
                dst[k] = m
    else:                # the means: sum_t w_t h_t / den
        for k in range(H):
            acc[k] = 0.0
        if mode == 4:    # weights t + 1: the positions', prompt or not
            den = 0.0
            for t in range(s0, n):
                den += <double>(t + 1)
                for k in range(H):
                    acc[k] += <double>(t + 1) * <double>h[t * H + k]
            if den < 1e-9:
                den = 1e-9
        else:
            den = <double>(n - s0) if n > s0 else 1e-9
            for t in range(s0, n):
                for k in range(H):
                    acc[k] += <double>h[t * H + k]
            if mode == 3:
                den = sqrt(den)
        for k in range(H):
            dst[k] = <float>(acc[k] / den)


cdef void l2_normalize_row(float *x, Py_ssize_t n) noexcept nogil:
    """x / max(||x||, 1e-12) with the norm and the quotient in float64 (NaN propagates)."""
    cdef Py_ssize_t k
    cdef double s = 0.0
    for k in range(n):
        s += <double>x[k] * <double>x[k]
    s = sqrt(s)
    if s < 1e-12:
        s = 1e-12
    for k in range(n):
        x[k] = <float>(<double>x[k] / s)


def pool_normalize(hidden, lengths, tuple modes, Py_ssize_t normalize=0, Py_ssize_t start=0):
    """Pool token embeddings into sentence embeddings, then L2-normalize them `normalize`
    times (package-internal: normcy.sentence).

    hidden : (B, S, H) float32, C-contiguous; lengths : (B,) int64, the valid (leading)
    tokens of each sequence, 0..S; modes : pooling mode codes (POOL_*), concatenated in
    this order; start : the first token pooled (a prompt's tokens before it are left out;
    see pool_row).  Returns (B, len(modes) * H) float32.  One compiled pass instead of a few
    NumPy calls per mode and per normalization (~100 us per batch-1 sentence, cold, on the
    AMD EPYC VM); the same arithmetic as the NumPy reference normcy.sentence._pool and
    _l2_normalize (float64 sums in token order; the norm's float64 sum may be ordered
    differently from NumPy's einsum).
    """
    if (not isinstance(hidden, np.ndarray) or hidden.dtype != np.float32 or hidden.ndim != 3
            or not cnp.PyArray_IS_C_CONTIGUOUS(<cnp.ndarray>hidden)):
        raise ValueError("pool_normalize: hidden must be a C-contiguous float32 (B, S, H) "
                         "array, got %s" % describe(hidden))
    cdef cnp.ndarray hs = <cnp.ndarray>hidden
    cdef Py_ssize_t B = hs.shape[0], S = hs.shape[1], H = hs.shape[2]
    if (not isinstance(lengths, np.ndarray) or lengths.dtype != np.int64
            or shape_of(lengths) != (B,) or not cnp.PyArray_IS_C_CONTIGUOUS(<cnp.ndarray>lengths)):
        raise ValueError("pool_normalize: lengths must be a contiguous int64 array of shape "
                         "(%d,), got %s" % (B, describe(lengths)))
    cdef Py_ssize_t nm = len(modes), i, b, j
    if nm < 1 or nm > 6 or normalize < 0 or start < 0:
        raise ValueError("pool_normalize: bad modes %r / normalize %d / start %d"
                         % (modes, normalize, start))
    cdef int codes[6]
    for i in range(nm):
        codes[i] = modes[i]
        if codes[i] < 0 or codes[i] > 5:
            raise ValueError("pool_normalize: unknown pooling mode code %r" % (modes[i],))
    cdef const long long *ln = <const long long *>cnp.PyArray_DATA(<cnp.ndarray>lengths)
    for b in range(B):
        if ln[b] < 0 or ln[b] > S:
            raise ValueError("pool_normalize: lengths[%d] = %d is outside [0, %d]"
                             % (b, ln[b], S))
    cdef cnp.ndarray out = np.empty((B, nm * H), dtype=np.float32)
    cdef double *acc = <double *>malloc((H if H > 0 else 1) * sizeof(double))
    if acc == NULL:
        raise MemoryError()
    cdef const float *hp = <const float *>cnp.PyArray_DATA(hs)
    cdef float *op = <float *>cnp.PyArray_DATA(out)
    with nogil:
        for b in range(B):
            for j in range(nm):
                pool_row(hp + b * S * H, ln[b], start, H, codes[j], acc, op + (b * nm + j) * H)
            for i in range(normalize):
                l2_normalize_row(op + b * nm * H, nm * H)
    free(acc)
    return out


def l2_normalize_rows(x, Py_ssize_t times=1):
    """x[i] / max(||x[i]||, 1e-12) for each row of a C-contiguous float32 (B, D) array, in
    place, `times` times (package-internal: normcy.sentence); float64 norm and quotient."""
    if (not isinstance(x, np.ndarray) or x.dtype != np.float32 or x.ndim != 2
            or not cnp.PyArray_IS_C_CONTIGUOUS(<cnp.ndarray>x)
            or not cnp.PyArray_ISWRITEABLE(<cnp.ndarray>x)):
        raise ValueError("l2_normalize_rows: x must be a writeable C-contiguous float32 "
                         "(B, D) array, got %s" % describe(x))
    cdef cnp.ndarray xa = <cnp.ndarray>x
    cdef Py_ssize_t B = xa.shape[0], D = xa.shape[1], b, i
    cdef float *p = <float *>cnp.PyArray_DATA(xa)
    with nogil:
        for b in range(B):
            for i in range(times):
                l2_normalize_row(p + b * D, D)
    return x
