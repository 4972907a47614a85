"""normcy.PackedLinear (packed-weight GEMM with fused epilogues) and the fused attention
kernel, against float64 NumPy references; bitwise thread-count and batch invariance."""
import math

import os

import numpy as np
import pytest

import normcy
from normcy import PackedLinear
from normcy._gemm import attention, kernel_shape

F32 = np.float32
RNG = np.random.default_rng(20261128)


def _ref(x, w, b=None, act=None, res=None):
    y = x.astype(np.float64) @ w.astype(np.float64).T
    if b is not None:
        y = y + b
    if act == "relu":
        y = np.maximum(y, 0.0)
    elif act == "gelu":
        y = 0.5 * y * (1.0 + np.vectorize(math.erf)(y / math.sqrt(2.0)))
    elif act == "gelu_tanh":
        y = 0.5 * y * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (y + 0.044715 * y ** 3)))
    if res is not None:
        y = y + res
    return y


def _tol(x, w):
    # error bound of a float32 dot product of length K: ~K * eps * sum |x_k w_k|
    k = x.shape[-1]
    mag = np.abs(x.astype(np.float64)) @ np.abs(w.astype(np.float64)).T
    return 2.0 * k * np.finfo(F32).eps * mag + 1e-30


def _check(y, ref, tol, msg=""):
    err = np.abs(y.astype(np.float64) - ref)
    assert np.all(err <= tol + 2e-7 * np.abs(ref)), "%s max excess %g" % (
        msg, float(np.max(err - tol - 2e-7 * np.abs(ref))))


NK = [(1, 1), (3, 17), (17, 3), (383, 385), (385, 383), (64, 384)]


@pytest.mark.parametrize("n,k", NK)
def test_every_row_count_matches_float64(n, k):
    w = RNG.standard_normal((n, k)).astype(F32)
    b = RNG.standard_normal(n).astype(F32)
    lin = PackedLinear(w, b)
    for m in list(range(1, 71)) + [128]:
        x = RNG.standard_normal((m, k)).astype(F32)
        y = lin(x)
        assert y.shape == (m, n) and y.dtype == F32
        _check(y, _ref(x, w, b), _tol(x, w), "m=%d n=%d k=%d" % (m, n, k))


def test_large_m():
    w = RNG.standard_normal((384, 384)).astype(F32)
    x = RNG.standard_normal((4096, 384)).astype(F32)
    y = PackedLinear(w)(x)
    _check(y, _ref(x, w), _tol(x, w))


@pytest.mark.parametrize("act", [None, "relu", "gelu", "gelu_tanh"])
@pytest.mark.parametrize("with_res", [False, True])
def test_epilogues(act, with_res):
    n, k, m = 385, 67, 29
    w = (RNG.standard_normal((n, k)) / 4).astype(F32)
    b = RNG.standard_normal(n).astype(F32)
    x = RNG.standard_normal((m, k)).astype(F32)
    res = RNG.standard_normal((m, n)).astype(F32) if with_res else None
    y = PackedLinear(w, b)(x, activation=act, residual=res)
    ref = _ref(x, w, b, act, res)
    # activation error: documented relative accuracy of the element-wise kernels (<= 2e-6
    # here) on top of the dot-product bound (the activations' slopes are <= 1.13)
    tol = 1.2 * _tol(x, w) + 2e-6 * np.abs(ref) + 1e-6
    _check(y, ref, tol, "act=%s res=%s" % (act, with_res))


def test_leading_axes_and_strides():
    n, k = 40, 33
    w = RNG.standard_normal((n, k)).astype(F32)
    lin = PackedLinear(w)
    x = RNG.standard_normal((3, 5, k)).astype(F32)
    y = lin(x)
    assert y.shape == (3, 5, n)
    _check(y.reshape(15, n), _ref(x.reshape(15, k), w), _tol(x.reshape(15, k), w))
    # non-contiguous x (every other row, reversed, and a transposed view)
    big = RNG.standard_normal((20, 2 * k)).astype(F32)
    for xv in (big[::2, :k], big[::-1, ::2][:, :k], np.asfortranarray(big[:, :k])):
        _check(lin(xv), _ref(np.ascontiguousarray(xv), w), _tol(xv, w))
    # strided out: computed into a temporary, written through
    outbig = np.zeros((10, 2 * n), F32)
    xv = big[:10, :k]
    got = lin(xv, out=outbig[:, ::2])
    assert got.base is not None
    _check(outbig[:, ::2], _ref(xv, w), _tol(xv, w))
    assert np.all(outbig[:, 1::2] == 0)
    # strided weight (packing copies it)
    wbig = RNG.standard_normal((n, 2 * k)).astype(F32)
    _check(PackedLinear(wbig[:, ::2])(x[0]), _ref(x[0], wbig[:, ::2]), _tol(x[0], wbig[:, ::2]))
    # zero rows
    assert lin(np.zeros((0, k), F32)).shape == (0, n)


@pytest.mark.parametrize("k", [48, 2000])
def test_out_and_residual_aliasing(k):
    # k = 2000 is more than one K block on every variant and L1 size (partial sums go
    # through out, so a residual that is out itself must be read before it is overwritten)
    n = 48
    w = RNG.standard_normal((n, k)).astype(F32)
    b = RNG.standard_normal(n).astype(F32)
    lin = PackedLinear(w, b)
    x = RNG.standard_normal((9, k)).astype(F32)
    r = RNG.standard_normal((9, n)).astype(F32)
    ref = _ref(x, w, b, None, r)
    r2 = r.copy()
    got = lin(x, residual=r2, out=r2)          # in place into the residual: allowed
    assert got is r2
    _check(r2, ref, _tol(x, w))
    with pytest.raises(ValueError, match="out"):
        lin(x, out=x)                          # out over x: rejected
    buf = RNG.standard_normal((10, n)).astype(F32)
    with pytest.raises(ValueError, match="overlap"):
        lin(x, residual=buf[1:], out=buf[:9])  # partial overlap with the residual


def test_nan_inf_propagate():
    w = np.ones((20, 8), F32)
    x = np.ones((3, 8), F32)
    x[1, 2] = np.nan
    x[2, 3] = np.inf
    y = PackedLinear(w)(x)
    assert np.all(y[0] == 8.0)
    assert np.all(np.isnan(y[1]))
    assert np.all(np.isposinf(y[2]))


@pytest.mark.parametrize("n,k", [(1152, 384), (384, 1536), (17, 5)])
def test_bitwise_thread_and_batch_invariance(n, k):
    w = RNG.standard_normal((n, k)).astype(F32)
    b = RNG.standard_normal(n).astype(F32)
    lin = PackedLinear(w, b)
    x = RNG.standard_normal((64, k)).astype(F32)
    full = lin(x, activation="gelu")
    for nt in (1, 2, 3, 4):
        assert np.array_equal(lin(x, activation="gelu", num_threads=nt), full)
    for m in range(1, 65):
        i = (7 * m) % m
        part = lin(x[:m], activation="gelu")
        assert np.array_equal(part, full[:m]), m
        assert np.array_equal(lin(x[i:i + 1], activation="gelu")[0], full[i]), m


@pytest.mark.parametrize("n,k", [(1152, 384), (384, 1536), (33, 7)])
def test_panel_ranges_with_stealing_are_bitwise_serial(n, k):
    """Few rows are split by column panels: one range per thread, grains claimed from its
    front, empty-handed threads taking grains from the back of the fullest range.  Teams
    larger than the number of ranges (16) or of panels, and several Python threads at once
    (more OpenMP threads than cores, so that threads fall behind and get robbed), give
    the serial bits for every row count, epilogue included."""
    import threading
    w = RNG.standard_normal((n, k)).astype(F32)
    b = RNG.standard_normal(n).astype(F32)
    lin = PackedLinear(w, b)
    for m in (1, 2, 5, 17, 40, 200, 500):   # 200: by panels up to 2 threads, 500: by rows
        x = RNG.standard_normal((m, k)).astype(F32)
        r = RNG.standard_normal((m, n)).astype(F32)
        one = lin(x, activation="gelu", residual=r, num_threads=1)
        for nt in (2, 3, 5, 16, 17, 24):
            assert np.array_equal(lin(x, activation="gelu", residual=r, num_threads=nt), one), (m, nt)
    x = RNG.standard_normal((17, k)).astype(F32)
    one = lin(x, activation="gelu", num_threads=1)
    bad = []

    def work(nt):
        for _ in range(20):
            if not np.array_equal(lin(x, activation="gelu", num_threads=nt), one):
                bad.append(nt)

    ts = [threading.Thread(target=work, args=(nt,)) for nt in (2, 3, 4, 2)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not bad


def _norm_ref(s, kind, g, b, eps):
    s = s.astype(np.float64)
    if kind == "layer_norm":
        mu = s.mean(-1, keepdims=True)
        y = (s - mu) / np.sqrt(((s - mu) ** 2).mean(-1, keepdims=True) + eps)
    else:
        y = s / np.sqrt((s * s).mean(-1, keepdims=True) + eps)
    y = y * g
    return y + b if b is not None else y


@pytest.mark.parametrize("kind", ["layer_norm", "rms_norm"])
@pytest.mark.parametrize("n,k", [(384, 384), (384, 1536), (17, 5), (385, 383)])
def test_fused_residual_norm_epilogue(kind, n, k):
    """s = x W^T + b + r, then the row norm, in one call: within float32 rounding of the
    float64 reference, and bit for bit what the separate norm kernels give on s, for every
    thread count and row count (by panels with few rows, by rows with many)."""
    w = (RNG.standard_normal((n, k)) / math.sqrt(k)).astype(F32)
    b = RNG.standard_normal(n).astype(F32)
    lin = PackedLinear(w, b)
    g = RNG.standard_normal(n).astype(F32)
    beta = RNG.standard_normal(n).astype(F32) if kind == "layer_norm" else None
    eps = 1e-5
    for m in (1, 2, 7, 20, 70, 300):
        x = RNG.standard_normal((m, k)).astype(F32)
        r = RNG.standard_normal((m, n)).astype(F32)
        s_sep = lin(x, residual=r)
        if kind == "layer_norm":
            sep = normcy.layer_norm(s_sep, g, beta, eps)
        else:
            sep = normcy.rms_norm(s_sep, g, eps)
        ref = _norm_ref(_ref(x, w, b, res=r), kind, g, beta, eps)
        for nt in (1, 2, 3):
            so = np.full((m, n), np.nan, F32)
            y = lin(x, residual=r, norm=kind, norm_weight=g, norm_bias=beta, eps=eps,
                    sum_out=so, num_threads=nt)
            assert np.array_equal(so, s_sep), (m, nt)
            assert np.array_equal(y, sep), (m, nt)
            y2 = lin(x, residual=r, norm=kind, norm_weight=g, norm_bias=beta, eps=eps,
                     num_threads=nt)
            assert np.array_equal(y2, sep), (m, nt)
        # against float64: the error of s (dot-product rounding bound + the sum's
        # rounding) divided by the row's scale (std, or rms), plus float32 rounding
        s64 = _ref(x, w, b, res=r)
        err_s = (_tol(x, w) + 2 * np.finfo(F32).eps * np.abs(s64)).max(-1, keepdims=True)
        if kind == "layer_norm":
            scale = s64.std(-1, keepdims=True)
        else:
            scale = np.sqrt((s64 * s64).mean(-1, keepdims=True))
        err = np.abs(y.astype(np.float64) - ref)
        assert np.all(err <= np.abs(g) * (3 * err_s / scale + 1e-6) + 1e-6 * np.abs(ref))


def test_fused_norm_in_place_and_strided():
    n, k = 64, 48
    w = RNG.standard_normal((n, k)).astype(F32)
    lin = PackedLinear(w, RNG.standard_normal(n).astype(F32))
    g = RNG.standard_normal(n).astype(F32)
    x = RNG.standard_normal((3, 5, k)).astype(F32)
    r = RNG.standard_normal((3, 5, n)).astype(F32)
    want = normcy.layer_norm(lin(x, residual=r), g, None, 1e-6)
    # out is the residual itself
    rr = r.copy()
    got = lin(x, residual=rr, norm="layer_norm", norm_weight=g, eps=1e-6, out=rr)
    assert got is rr and np.array_equal(rr, want)
    # strided out and sum_out (no (rows, n) view): computed aside, copied back
    big = np.zeros((3, 5, 2 * n), F32)
    sbig = np.zeros((3, 5, 2 * n), F32)
    got = lin(x, residual=r, norm="layer_norm", norm_weight=g, eps=1e-6,
              out=big[..., ::2], sum_out=sbig[..., 1::2])
    assert np.array_equal(big[..., ::2], want) and np.all(big[..., 1::2] == 0)
    assert np.array_equal(sbig[..., 1::2], lin(x, residual=r))


def test_fused_norm_bad_arguments():
    lin = PackedLinear(np.ones((4, 3), F32))
    x = np.ones((2, 3), F32)
    with pytest.raises(ValueError, match="norm must be"):
        lin(x, norm="batch_norm")
    with pytest.raises(ValueError, match="norm_weight must have shape \\(4,\\)"):
        lin(x, norm="layer_norm", norm_weight=np.ones(3, F32))
    with pytest.raises(ValueError, match="norm_bias"):
        lin(x, norm="rms_norm", norm_bias=np.ones(4, F32))
    with pytest.raises(ValueError, match="need norm"):
        lin(x, sum_out=np.empty((2, 4), F32))
    with pytest.raises(ValueError, match="eps"):
        lin(x, norm="layer_norm", eps=-1.0)
    with pytest.raises(ValueError, match="sum_out must have shape"):
        lin(x, norm="layer_norm", sum_out=np.empty((2, 3), F32))
    o = np.empty((2, 4), F32)
    with pytest.raises(ValueError, match="sum_out"):
        lin(x, norm="layer_norm", out=o, sum_out=o)
    with pytest.raises(TypeError, match="sum_out"):
        lin(x, norm="layer_norm", sum_out=np.empty((2, 4)))


def test_bad_arguments():
    w = np.ones((4, 3), F32)
    with pytest.raises(TypeError, match="weight"):
        PackedLinear(w.astype(np.float64))
    with pytest.raises(TypeError, match="weight"):
        PackedLinear([[1.0]])
    with pytest.raises(ValueError, match="weight"):
        PackedLinear(np.ones(3, F32))
    with pytest.raises(ValueError, match="weight"):
        PackedLinear(np.ones((0, 3), F32))
    with pytest.raises(ValueError, match="bias"):
        PackedLinear(w, np.ones(3, F32))
    with pytest.raises(TypeError, match="bias"):
        PackedLinear(w, np.ones(4, np.float64))
    lin = PackedLinear(w, np.ones(4, F32))
    with pytest.raises(TypeError, match="x"):
        lin(np.ones((2, 3), np.float64))
    with pytest.raises(ValueError, match=r"x must have shape \(\.\.\., 3\)"):
        lin(np.ones((2, 4), F32))
    with pytest.raises(ValueError, match="activation"):
        lin(np.ones((2, 3), F32), activation="tanh")
    with pytest.raises(ValueError, match="residual"):
        lin(np.ones((2, 3), F32), residual=np.ones((2, 3), F32))
    with pytest.raises(ValueError, match="out"):
        lin(np.ones((2, 3), F32), out=np.ones((3, 4), F32))
    with pytest.raises(TypeError, match="out"):
        lin(np.ones((2, 3), F32), out=np.ones((2, 4), np.float64))
    ro = np.ones((2, 4), F32)
    ro.setflags(write=False)
    with pytest.raises(ValueError, match="writeable"):
        lin(np.ones((2, 3), F32), out=ro)
    with pytest.raises(ValueError, match="num_threads"):
        lin(np.ones((2, 3), F32), num_threads=0)



def test_fast_call_path_same_bits_and_same_errors():
    """x, out and a residual that are valid as they stand (C-contiguous with any leading
    axes, or 2-D row views) take a short call path; everything beside it (other strides,
    subclasses, byte order, aliasing, in-place residuals) takes the general one.  Same bits
    either way, and the general path's errors for what the short one refuses."""
    w = RNG.standard_normal((40, 24), dtype=F32)
    b = RNG.standard_normal(40, dtype=F32)
    lin = PackedLinear(w, b)
    x = RNG.standard_normal((5, 24), dtype=F32)
    xg = np.zeros((1, 5, 30), F32)[..., :24]     # 3-D, not contiguous: the general path
    xg[0] = x
    ref = lin(xg)[0]
    for act in (None, "relu", "gelu"):
        r = lin(xg, activation=act)[0]
        assert np.array_equal(lin(x, activation=act), r)
        o = np.full((5, 40), np.nan, F32)
        assert lin(x, activation=act, out=o) is o and np.array_equal(o, r)
    # C-contiguous leading axes stay on the short path, out given or not; 1-D x too
    x3 = np.ascontiguousarray(np.stack([x, x[::-1]]))
    r3 = np.stack([ref, ref[::-1]])
    assert np.array_equal(lin(x3), r3) and lin(x3).shape == (2, 5, 40)
    o3 = np.zeros((2, 5, 40), F32)
    assert lin(x3, out=o3) is o3 and np.array_equal(o3, r3)
    with pytest.raises(ValueError, match="out must have shape"):
        lin(x3, out=np.zeros((5, 2, 40), F32))   # same size, other leading axes
    assert np.array_equal(lin(x[2]), ref[2]) and lin(x[2]).shape == (40,)
    # a residual beside x: short path; in place (out is the residual): the general one
    res = RNG.standard_normal((5, 40), dtype=F32)
    resg = np.zeros((1, 5, 50), F32)[..., :40]
    resg[0] = res
    rref = lin(xg, activation="gelu", residual=resg)[0]
    assert np.array_equal(lin(x, activation="gelu", residual=res), rref)
    o = np.zeros((5, 40), F32)
    assert lin(x, activation="gelu", residual=res, out=o) is o and np.array_equal(o, rref)
    r2 = res.copy()
    assert lin(x, activation="gelu", residual=r2, out=r2) is r2 and np.array_equal(r2, rref)
    buf2 = np.zeros((6, 40), F32)
    with pytest.raises(ValueError, match="overlap"):
        lin(x, residual=buf2[1:], out=buf2[:5])
    with pytest.raises(ValueError, match="residual"):
        lin(x, residual=np.zeros((5, 1, 40), F32))
    # row-strided x and out (unit last stride) stay on the short path; equal bits
    xs = np.zeros((5, 30), F32)
    xs[:, :24] = x
    os_ = np.zeros((5, 50), F32)
    assert lin(xs[:, :24], out=os_[:, :40]) is not None
    assert np.array_equal(os_[:, :40], ref) and not os_[:, 40:].any()
    # big-endian float32 and a subclass: the general path, same results or errors
    xb = x.astype(">f4")
    with pytest.raises(TypeError, match="x must be float32"):
        lin(xb)
    ob = np.zeros((5, 40), ">f4")
    with pytest.raises(TypeError, match="out must be float32"):
        lin(x, out=ob)

    class Sub(np.ndarray):
        pass

    assert np.array_equal(lin(x.view(Sub)), ref)
    assert np.array_equal(lin(x[0]), ref[0])
    # outputs the short path must refuse: overlapping x, self-overlapping, read-only,
    # wrong row count
    buf = np.zeros((5, 64), F32)
    with pytest.raises(ValueError, match="out"):
        lin(buf[:, :24], out=buf[:, 10:50])
    zero_stride = np.lib.stride_tricks.as_strided(np.zeros(40, F32), (5, 40), (0, 4))
    with pytest.raises(ValueError, match="out"):
        lin(x, out=zero_stride)
    ro = np.zeros((5, 40), F32)
    ro.setflags(write=False)
    with pytest.raises(ValueError, match="writeable"):
        lin(x, out=ro)
    with pytest.raises(ValueError, match="out"):
        lin(x, out=np.zeros((4, 40), F32))
    # zero rows
    assert lin(np.zeros((0, 24), F32)).shape == (0, 40)

@pytest.mark.parametrize("N,K", [(1, 1), (17, 5), (40, 384), (33, 7)])
def test_weight_unpacked_bit_exact(N, K):
    # PackedLinear keeps only the packed panels; .weight unpacks them: the given weight's
    # bits (signed zeros, NaN payloads, infinities, subnormals), a new read-only array each
    # time, independent of the array it was built from
    w = RNG.standard_normal((N, K)).astype(F32)
    special = np.array([-0.0, np.inf, -np.inf, 1e-45, -3e-39], F32)
    flat = w.reshape(-1)
    flat[:min(flat.size, 5)] = special[:min(flat.size, 5)]
    if flat.size > 5:
        flat.view(np.uint32)[5] = 0x7FC01234          # a NaN with a payload
    src = w.copy()
    lin = PackedLinear(src)
    src[...] = 7.0
    a, b = lin.weight, lin.weight
    assert a is not b and not a.flags.writeable and a.shape == (N, K) and a.dtype == F32
    assert np.array_equal(a.view(np.uint32), w.view(np.uint32))
    # from a strided (non-contiguous) weight too
    wt = np.asfortranarray(w)
    assert np.array_equal(PackedLinear(wt).weight.view(np.uint32), w.view(np.uint32))


def test_repr_properties_pickle():
    import pickle
    w = RNG.standard_normal((5, 3)).astype(F32)
    lin = PackedLinear(w, np.arange(5, dtype=F32))
    assert lin.in_features == 3 and lin.out_features == 5
    assert "in_features=3" in repr(lin)
    assert np.array_equal(lin.weight, w) and not lin.weight.flags.writeable
    x = RNG.standard_normal((4, 3)).astype(F32)
    lin2 = pickle.loads(pickle.dumps(lin))
    assert np.array_equal(lin2(x), lin(x))
    mr, nr = kernel_shape()
    assert mr >= 1 and nr % 4 == 0
    import copy
    lin3 = copy.deepcopy(lin)
    assert np.array_equal(lin3(x), lin(x))


def test_immutable_after_init():
    """A second __init__ would free the packed panels that a call in another thread reads
    without the GIL: refused, and a failed first __init__ leaves no half-made object."""
    w = RNG.standard_normal((64, 32)).astype(F32)
    lin = PackedLinear(w, np.ones(64, F32))
    x = RNG.standard_normal((3, 32)).astype(F32)
    y = lin(x)
    with pytest.raises(TypeError, match="only once"):
        lin.__init__(w * 2)
    with pytest.raises(TypeError, match="only once"):
        lin.__init__(np.broadcast_to(F32(1), (1, 2 ** 40)), np.zeros(1, F32))
    assert np.array_equal(lin(x), y) and np.array_equal(lin.bias, np.ones(64, F32))
    raw = PackedLinear.__new__(PackedLinear)
    with pytest.raises(TypeError, match="never initialized"):
        raw(np.zeros((4, 0), F32))
    with open("/proc/self/maps") if os.path.exists("/proc/self/maps") else open(os.devnull) as f:
        asan = "libasan" in f.read()
    if not asan:        # AddressSanitizer aborts on a failed 4 TB allocation instead
        with pytest.raises((MemoryError, ValueError)):
            raw.__init__(np.broadcast_to(F32(1), (1, 2 ** 40)), np.zeros(1, F32))
    with pytest.raises(TypeError, match="never initialized"):
        raw(x)
    raw.__init__(w)                      # a failed __init__ left nothing behind
    np.testing.assert_array_equal(raw(x), PackedLinear(w)(x))


# ----------------------------------------------------------------- fused attention
def _attn_ref(qkv, bq, nseq, L, h, mask=None, kpm=None, causal=False):
    H = qkv.shape[1] // 3
    dh = H // h
    q = (qkv[:, :H] + bq).astype(np.float64).reshape(nseq, L, h, dh).transpose(0, 2, 1, 3)
    k = qkv[:, H:2 * H].astype(np.float64).reshape(nseq, L, h, dh).transpose(0, 2, 1, 3)
    v = qkv[:, 2 * H:].astype(np.float64).reshape(nseq, L, h, dh).transpose(0, 2, 1, 3)
    s = q @ k.transpose(0, 1, 3, 2)
    if mask is not None:
        s = s + mask
    if kpm is not None:
        s = np.where(kpm[:, None, None, :], -np.inf, s)
    if causal:
        s = np.where(np.triu(np.ones((L, L), bool), 1), -np.inf, s)
    mx = s.max(axis=-1, keepdims=True)
    mx = np.where(np.isfinite(mx), mx, 0.0)
    e = np.exp(s - mx)
    den = e.sum(axis=-1, keepdims=True)
    p = np.where(den > 0, e / np.where(den > 0, den, 1.0), 0.0)
    o = p @ v
    return o.transpose(0, 2, 1, 3).reshape(nseq * L, H)


@pytest.mark.parametrize("L", [1, 5, 16, 33, 130])
@pytest.mark.parametrize("case", ["plain", "causal", "kpm", "mask", "all"])
@pytest.mark.parametrize("dh", [8, 32, 64])
def test_attention_matches_float64(L, case, dh):
    # dh = 32, 64 without a causal or additive mask: query tiles through the GEMM
    # micro-kernel (dh a multiple of its panel width); otherwise the row-pair loop
    nseq, h = 3, 4
    H = h * dh
    qkv = RNG.standard_normal((nseq * L, 3 * H)).astype(F32)
    # q "already scaled" by 1/sqrt(dh), as the layers pass it: scores of order one
    qkv[:, :H] *= F32(1.0 / math.sqrt(dh))
    bq = (RNG.standard_normal(H) / math.sqrt(dh)).astype(F32)
    mask = kpm = None
    causal = case in ("causal", "all")
    if case in ("kpm", "all"):
        kpm = RNG.random((nseq, L)) < 0.3
        kpm[0, :] = True                       # one sequence fully padded: zeros
    if case in ("mask", "all"):
        mask = RNG.standard_normal((nseq, 1, L, L)).astype(F32)
    ctx = np.full((nseq * L, H), np.nan, F32)
    attention(qkv, bq, ctx, nseq, L, h, mask=mask, key_padding_mask=kpm, is_causal=causal)
    ref = _attn_ref(qkv, bq, nseq, L, h, mask, kpm, causal)
    np.testing.assert_allclose(ctx, ref, rtol=1e-5, atol=2e-6)
    # rows are independent of the thread count, bit for bit
    ctx2 = np.empty_like(ctx)
    attention(qkv, bq, ctx2, nseq, L, h, mask=mask, key_padding_mask=kpm, is_causal=causal,
              num_threads=1)
    assert np.array_equal(ctx, ctx2, equal_nan=True)


@pytest.mark.parametrize("L", [3, 7, 33, 64, 131])
@pytest.mark.parametrize("case", ["plain", "mask", "kpm"])
def test_attention_query_row_independent_of_its_pairing(L, case):
    # Query rows go through the kernel in pairs (one K^T sweep and one two-row softmax for
    # both) and, for odd L, the last row alone.  A row's output depends only on its own
    # query and on K, V: moving a query to another position (the first row of a pair, the
    # second, or the lone last row) must move its output bit for bit.
    nseq, h, dh = 1, 2, 32
    H = h * dh
    rng = np.random.default_rng(L)
    qkv = rng.standard_normal((nseq * L, 3 * H)).astype(F32)
    bq = rng.standard_normal(H).astype(F32)
    mask = kpm = None
    if case == "mask":
        mask = np.broadcast_to(rng.standard_normal((1, 1, 1, L)).astype(F32), (1, 1, L, L))
    if case == "kpm":
        kpm = rng.random((nseq, L)) < 0.3
        kpm[0, 0] = False
    ctx = np.empty((nseq * L, H), F32)
    attention(qkv, bq, ctx, nseq, L, h, mask=mask, key_padding_mask=kpm)
    perm = np.roll(np.arange(L), 1)           # every query moves by one position
    qkv2 = qkv.copy()
    qkv2[:, :H] = qkv[perm, :H]
    ctx2 = np.empty_like(ctx)
    attention(qkv2, bq, ctx2, nseq, L, h, mask=mask, key_padding_mask=kpm)
    np.testing.assert_array_equal(ctx2, ctx[perm])


def test_attention_refuses_negative_sizes_and_ctx_overlapping_qkv():
    # package-internal, but still a boundary: sizes whose product matches the rows while
    # each is negative, and a ctx that is part of qkv, are refused, not run
    qkv = np.zeros((6, 12), F32)
    bq = np.zeros(4, F32)
    ctx = np.full((6, 4), 5.0, F32)
    with pytest.raises(ValueError, match="nseq and L must be >= 0"):
        attention(qkv, bq, ctx, -2, -3, 2)
    with pytest.raises(ValueError, match="ctx partially overlaps qkv"):
        attention(qkv, bq, qkv[:, 4:8], 2, 3, 2)
    assert np.all(ctx == 5.0) and np.all(qkv == 0.0)
    attention(qkv, bq, ctx, 2, 3, 2)
    assert np.all(ctx == 0.0)


def test_packed_linear_is_exported():
    assert normcy.PackedLinear is PackedLinear
    assert "PackedLinear" in normcy.__all__


@pytest.mark.parametrize("act", ["relu", "gelu", "gelu_tanh"])
@pytest.mark.parametrize("N", [16, 33, 100])
def test_activation_epilogue_is_the_row_kernel_bit_for_bit(act, N):
    # The fused epilogue computes act(acc + b) (+ r) per element, whole tiles at a time;
    # it must give exactly what the GEMM without bias followed by normcy's bias_activation
    # and a residual add gives (full and partial panels, every row count of a tile).
    from normcy._ops import bias_activation
    rng = np.random.default_rng(N)
    K = 37
    w = rng.standard_normal((N, K)).astype(F32)
    b = rng.standard_normal(N).astype(F32)
    for M in (1, 5, 6, 7, 13, 50):
        x = (rng.standard_normal((M, K)) * 2).astype(F32)
        r = rng.standard_normal((M, N)).astype(F32)
        acc = PackedLinear(w)(x)
        want = bias_activation(acc, b, act) + r
        got = PackedLinear(w, b)(x, activation=act, residual=r)
        np.testing.assert_array_equal(got, want)
