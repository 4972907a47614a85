"""batch_norm (inference), fold_batch_norm, fold_batch_norm_into_linear vs float64 references."""
import numpy as np
import pytest

import normcy

F32 = np.float32
F64 = np.float64

# (shape, axis) pairs: channel axis 1 for (N,C), (N,C,L), NCHW, NCDHW; channels-last NHWC.
CASES = [
    ((7, 1), 1), ((7, 3), 1), ((5, 64), 1), ((64, 1000), 1), ((4, 3), -1),
    ((2, 3, 17), 1), ((3, 16, 1), 1), ((2, 5, 385), 1),
    ((2, 3, 5, 7), 1), ((1, 64, 9, 9), 1), ((2, 3, 5, 7), -3),
    ((2, 4, 3, 5, 6), 1),
    ((2, 5, 7, 3), -1), ((2, 5, 7, 3), 3), ((1, 9, 9, 64), -1), ((2, 5, 7, 33), 3),
    ((3, 17), 0), ((2, 3, 4), 2), ((2, 3, 4), 0),
    ((64, 256, 4, 4), 1), ((8, 16, 16, 96), -1),
]


def _ids(case):
    shape, axis = case
    return "x".join(map(str, shape)) + "_ax%d" % axis


def _stats(rng, c):
    mean = (0.5 * rng.standard_normal(c)).astype(F32)
    var = rng.uniform(0.2, 3.0, c).astype(F32)
    w = (1.0 + 0.2 * rng.standard_normal(c)).astype(F32)
    b = (0.3 * rng.standard_normal(c)).astype(F32)
    return mean, var, w, b


@pytest.mark.parametrize("case", CASES, ids=[_ids(c) for c in CASES])
@pytest.mark.parametrize("wb", [(True, True), (False, False), (True, False), (False, True)],
                         ids=["w+b", "none", "w", "b"])
def test_batch_norm_matches_reference(h, case, wb):
    shape, axis = case
    rng = h.rng_for("bn", shape, axis, wb)
    c = shape[axis]
    x = h.randn(rng, shape, scale=1.5)
    m, v, w, b = _stats(rng, c)
    w = w if wb[0] else None
    b = b if wb[1] else None
    x0 = x.copy()
    y = normcy.batch_norm(x, m, v, w, b, axis=axis)
    assert y is not x and not np.shares_memory(y, x)
    h.assert_close(y, h.ref_batch_norm(x, m, v, w, b, 1e-5, axis))
    np.testing.assert_array_equal(x, x0)
    # keyword form
    y2 = normcy.batch_norm(x, running_mean=m, running_var=v, weight=w, bias=b, eps=1e-5,
                           axis=axis)
    np.testing.assert_array_equal(y, y2)


def test_batch_norm_default_axis_is_1(h):
    rng = h.rng_for("bn-default")
    x = h.randn(rng, (2, 3, 4, 5))
    m, v, w, b = _stats(rng, 3)
    h.assert_close(normcy.batch_norm(x, m, v, w, b), h.ref_batch_norm(x, m, v, w, b, 1e-5, 1))


@pytest.mark.parametrize("eps", [0.0, 1e-3, 0.5])
def test_batch_norm_eps(h, eps):
    rng = h.rng_for("bn-eps", eps)
    x = h.randn(rng, (3, 4, 5))
    m, v, w, b = _stats(rng, 4)
    h.assert_close(normcy.batch_norm(x, m, v, w, b, eps),
                   h.ref_batch_norm(x, m, v, w, b, eps, 1))


@pytest.mark.parametrize("layout", ["channels_last_as_nchw", "neg", "sliced", "cols2",
                                    "fortran", "offset"])
@pytest.mark.parametrize("which", ["x", "out", "both"])
def test_batch_norm_non_contiguous(h, layout, which):
    shape = (3, 8, 5, 6)
    rng = h.rng_for("bn-nc", layout, which)
    m, v, w, b = _stats(rng, 8)

    def view(fill):
        if layout == "channels_last_as_nchw":
            base = np.empty((3, 5, 6, 8), F32)
            base[...] = fill(base.size).reshape(base.shape) if callable(fill) else fill
            vv = base.transpose(0, 3, 1, 2)
            idx = np.arange(base.size).reshape(base.shape).transpose(0, 3, 1, 2)
            cov = np.zeros(base.size, bool)
            cov[idx.reshape(-1)] = True
            return vv, base, cov.reshape(base.shape)
        lo = {"neg": "neg", "sliced": "rows2", "cols2": "cols2", "fortran": "fortran",
              "offset": "offset"}[layout]
        return h.make_view(shape, lo, fill)

    if which in ("x", "both"):
        x, _, _ = view(lambda n: rng.standard_normal(n))
    else:
        x = h.randn(rng, shape)
    if which in ("out", "both"):
        out, obase, ocov = view(h.SENTINEL)
    else:
        out = np.full(shape, h.SENTINEL, F32)
        obase, ocov = out, np.ones(shape, bool)
    x0 = x.copy()
    res = normcy.batch_norm(x, m, v, w, b, out=out)
    assert res is out
    h.assert_close(out, h.ref_batch_norm(x0, m, v, w, b, 1e-5, 1))
    h.assert_untouched(obase, ocov)
    np.testing.assert_array_equal(x, x0)


@pytest.mark.parametrize("layout", ["fortran", "hw_transposed", "cnhw", "nc_fortran"])
@pytest.mark.parametrize("centred", [False, True])
@pytest.mark.parametrize("in_place", [False, True])
def test_batch_norm_permuted_layouts_run_in_place_of_copies(h, layout, centred, in_place):
    """x and out laid out alike in another axis order (Fortran, transposed; np.empty_like
    keeps x's) run on the C-contiguous permutation of the axes: the contiguous call's bits
    at every thread count, nothing written outside out, and out=None keeps x's layout."""
    rng = h.rng_for("bn-perm", layout, centred, in_place)
    c = 6
    shape = (9, c) if layout == "nc_fortran" else (4, c, 70, 90)
    xc = (rng.standard_normal(shape) * 3).astype(F32)
    m = (rng.standard_normal(c) * (1e3 if centred else 0.1)).astype(F32)
    v = (rng.random(c) + 0.5).astype(F32)
    w, b = rng.standard_normal(c).astype(F32), rng.standard_normal(c).astype(F32)
    want = normcy.batch_norm(xc, m, v, w, b, num_threads=1)
    h.assert_close(want, h.ref_batch_norm(xc, m, v, w, b, 1e-5, 1))

    def laid(a):
        if layout in ("fortran", "nc_fortran"):
            return np.asfortranarray(a)
        perm = (0, 1, 3, 2) if layout == "hw_transposed" else (1, 0, 2, 3)
        return np.ascontiguousarray(a.transpose(perm)).transpose(np.argsort(perm))

    x = laid(xc)
    assert not x.flags.c_contiguous and np.array_equal(x, xc)
    with h.forced_parallel():
        for nt in (1, 2, 3):
            base = laid(np.full(shape, h.SENTINEL, F32))
            out = x.copy(order="K") if in_place else base
            y = normcy.batch_norm(out if in_place else x, m, v, w, b, out=out, num_threads=nt)
            assert y is out
            np.testing.assert_array_equal(out, want)
            y = normcy.batch_norm(x, m, v, w, b, num_threads=nt)
            np.testing.assert_array_equal(y, want)
            assert y.strides == x.strides


@pytest.mark.parametrize("case", [((4, 6, 3, 5), 1), ((4, 3, 5, 6), -1), ((9, 6), 1)],
                         ids=["nchw", "nhwc", "nc"])
def test_batch_norm_in_place_and_out(h, case):
    shape, axis = case
    rng = h.rng_for("bn-inplace", shape, axis)
    x = h.randn(rng, shape)
    m, v, w, b = _stats(rng, shape[axis])
    fresh = normcy.batch_norm(x, m, v, w, b, axis=axis)
    out = np.empty_like(x)
    assert normcy.batch_norm(x, m, v, w, b, axis=axis, out=out) is out
    np.testing.assert_array_equal(out, fresh)
    xi = x.copy()
    assert normcy.batch_norm(xi, m, v, w, b, axis=axis, out=xi) is xi
    np.testing.assert_array_equal(xi, fresh)
    # in place on a non-contiguous view
    base = np.full((shape[0] * 2,) + shape[1:], h.SENTINEL, F32)
    xv = base[::2]
    xv[...] = x
    normcy.batch_norm(xv, m, v, w, b, axis=axis, out=xv)
    h.assert_close(xv, h.ref_batch_norm(x, m, v, w, b, 1e-5, axis))
    assert np.all(base[1::2] == h.SENTINEL)


def test_batch_norm_strided_parameters(h):
    rng = h.rng_for("bn-params")
    x = h.randn(rng, (2, 7, 3, 3))
    m, v, w, b = _stats(rng, 7)
    ms, vs, ws, bs = [_neg_strided(a) for a in (m, v, w, b)]
    h.assert_close(normcy.batch_norm(x, ms, vs, ws, bs), h.ref_batch_norm(x, m, v, w, b))
    for a in (m, v, w, b):
        a.flags.writeable = False
    x.flags.writeable = False
    h.assert_close(normcy.batch_norm(x, m, v, w, b), h.ref_batch_norm(x, m, v, w, b))


def _neg_strided(a):
    base = np.empty(2 * a.size, F32)
    base[::-2] = a
    return base[::-2]


def test_batch_norm_nan_isolated(h):
    rng = h.rng_for("bn-nan")
    x = h.randn(rng, (4, 8, 16, 16))
    m, v, w, b = _stats(rng, 8)
    clean = normcy.batch_norm(x, m, v, w, b)
    for bad in (np.nan, np.inf):
        xd = x.copy()
        xd[1, 3, 5, 7] = bad
        for nt in (1, 2, None):
            y = normcy.batch_norm(xd, m, v, w, b, num_threads=nt)
            mask = np.ones(x.shape, bool)
            mask[1, 3, 5, 7] = False
            assert np.array_equal(y[mask], clean[mask])
            assert not np.isfinite(y[1, 3, 5, 7])


def test_batch_norm_extreme_magnitudes(h):
    rng = h.rng_for("bn-extreme")
    for scale, var_scale in ((1e18, 1e36), (1e-30, 1e-36)):
        x = (rng.standard_normal((3, 4, 10)) * scale).astype(F32)
        m = (rng.standard_normal(4) * scale).astype(F32)
        v = (rng.uniform(0.5, 2.0, 4) * var_scale).astype(F32)
        assert np.all(v > 0) and np.all(np.isfinite(v))
        w = np.ones(4, F32)
        b = np.zeros(4, F32)
        y = normcy.batch_norm(x, m, v, w, b, 0.0)
        assert np.all(np.isfinite(y))
        ref = h.ref_batch_norm(x, m, v, w, b, 0.0)
        # outputs are O(1) resp. O(1e-12): relative accuracy only
        np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


@pytest.mark.parametrize("layout", ["nchw", "nhwc", "nc"])
@pytest.mark.parametrize("mean,std", [(1e4, 1.0), (1e4, 0.1), (1e5, 1.0), (1e6, 10.0),
                                      (-3e4, 0.5), (3e7, 4.0)])
def test_batch_norm_large_mean_small_spread(h, layout, mean, std):
    """Outputs of order 1 from inputs far from zero: the centred evaluation keeps ~1 ulp,
    where x * scale + shift (the fold) would lose |shift| * 6e-8 to cancellation (6.8e-3 at
    mean 1e4, std 0.1)."""
    rng = h.rng_for("bn-offset", layout, mean, std)
    c = 19
    m = (mean * (1 + 0.01 * rng.standard_normal(c))).astype(F32)
    v = (std * rng.uniform(0.5, 2.0, c)).astype(F32) ** 2
    w = (1.0 + 0.2 * rng.standard_normal(c)).astype(F32)
    b = (0.3 * rng.standard_normal(c)).astype(F32)
    shape, axis = {"nchw": ((3, c, 5, 7), 1), "nhwc": ((3, 5, 7, c), -1),
                   "nc": ((64, c), 1)}[layout]
    bshape = [1] * len(shape)
    bshape[axis] = c
    x = (m.reshape(bshape) + std * 2 * rng.standard_normal(shape)).astype(F32)
    eps = 1e-5
    ref = h.ref_batch_norm(x, m, v, w, b, eps, axis)
    d = np.abs(ref - b.astype(F64).reshape(bshape))
    # scale rounded to float32 once (6e-8 of |y - b|), x - mean exact (Sterbenz: x is
    # within a factor of 2 of the mean), one rounding of the fused multiply-add
    bound = 1.3e-7 * d + 6e-8 * np.abs(ref) + 1e-38
    for params in ((m, v, w, b), tuple(p.astype(F64) for p in (m, v, w, b))):
        for nt in (1, 2):
            y = normcy.batch_norm(x, *params, eps, axis=axis, num_threads=nt)
            err = np.abs(y - ref)
            assert np.all(err <= bound), (err.max(), (err / bound).max())
    # a float64 mean between float32 values: its remainder moves into the bias
    m64 = m.astype(F64) + std * 1e-3
    ref = h.ref_batch_norm(x, m64, v, w, b, eps, axis)
    y = normcy.batch_norm(x, m64, v.astype(F64), w, b, eps, axis=axis)
    bound = 1.3e-7 * np.abs(ref - b.astype(F64).reshape(bshape)) + 1.2e-7 * np.abs(ref) + 1e-38
    assert np.all(np.abs(y - ref) <= bound)


def test_batch_norm_variance_plus_eps_must_be_positive(h):
    x = np.ones((2, 3, 4), F32)
    m = np.zeros(3, F32)
    for v, eps in ((np.array([1, 0, 1], F32), 0.0), (np.array([1, np.nan, 1], F32), 1e-5),
                   (np.array([1, -2e-5, 1], F32), 1e-5), (np.array([1, -np.inf, 1], F32), 1e-5)):
        for vv in (v, v.astype(F64), v.tolist()):
            with pytest.raises(ValueError, match=r"running_var \+ eps must be > 0.*channel 1"):
                normcy.batch_norm(x, m, vv, eps=eps)
            with pytest.raises(ValueError, match=r"running_var \+ eps must be > 0.*channel 1"):
                normcy.fold_batch_norm(m, vv, eps=eps)
            with pytest.raises(ValueError, match=r"running_var \+ eps must be > 0.*channel 1"):
                normcy.fold_batch_norm_into_linear(np.ones((3, 2), F32), None, m, vv, None,
                                                   None, eps)
    # a slightly negative running_var that eps lifts above zero is computed, as in PyTorch
    v = np.array([1, -1e-6, 1], F32)
    y = normcy.batch_norm(x, m, v, eps=1e-5)
    np.testing.assert_allclose(y, h.ref_batch_norm(x, m, v, None, None, 1e-5, 1), rtol=1e-6)
    scale, shift = normcy.fold_batch_norm(m, v, eps=1e-5)
    assert np.all(np.isfinite(scale)) and np.all(np.isfinite(shift))


def test_batch_norm_zero_batch(h):
    m, v, w, b = _stats(h.rng_for("bn0"), 3)
    y = normcy.batch_norm(np.empty((0, 3, 4), F32), m, v, w, b)
    assert y.shape == (0, 3, 4) and y.dtype == F32


# ------------------------------------------------------------------------ bad input
def _good():
    x = np.ones((2, 3, 4), F32)
    m = np.zeros(3, F32)
    v = np.ones(3, F32)
    return x, m, v


def test_batch_norm_bad_x():
    x, m, v = _good()
    for bad in (x.tolist(), None, 1.0):
        with pytest.raises(TypeError, match=r"\bx\b"):
            normcy.batch_norm(bad, m, v)
    for dt in (np.float64, np.float16, np.int32):
        with pytest.raises(TypeError, match=r"\bx\b") as ei:
            normcy.batch_norm(x.astype(dt), m, v)
        assert np.dtype(dt).name in str(ei.value)
    with pytest.raises(ValueError, match=r"\bx\b"):
        normcy.batch_norm(np.array(1.0, F32), m, v, axis=0)


@pytest.mark.parametrize("axis", [3, 4, -4, -5, 100])
def test_batch_norm_axis_out_of_range(axis):
    x, m, v = _good()
    with pytest.raises(ValueError, match="axis"):
        normcy.batch_norm(x, m, v, axis=axis)


def test_batch_norm_bad_axis_type():
    x, m, v = _good()
    for bad in (1.5, "1", None):
        with pytest.raises((TypeError, ValueError), match="axis"):
            normcy.batch_norm(x, m, v, axis=bad)


@pytest.mark.parametrize("arg", ["running_mean", "running_var", "weight", "bias"])
def test_batch_norm_bad_param_shape(arg):
    x, m, v = _good()
    kw = dict(running_mean=m, running_var=v, weight=np.ones(3, F32), bias=np.zeros(3, F32))
    for bad in (np.ones(2, F32), np.ones(4, F32), np.ones((1, 3), F32), np.ones((3, 1), F32)):
        kw2 = dict(kw)
        kw2[arg] = bad
        with pytest.raises(ValueError, match=r"\b%s\b" % arg):
            normcy.batch_norm(x, **kw2)
    # shape matching another axis but not the channel axis
    kw2 = dict(kw)
    kw2[arg] = np.ones(4, F32)
    with pytest.raises(ValueError, match=r"\b%s\b" % arg):
        normcy.batch_norm(x, axis=1, **kw2)


@pytest.mark.parametrize("eps", [-1e-5, float("nan"), float("inf")])
def test_batch_norm_bad_eps(eps):
    x, m, v = _good()
    with pytest.raises(ValueError, match=r"\beps\b"):
        normcy.batch_norm(x, m, v, eps=eps)


def test_batch_norm_bad_out():
    x, m, v = _good()
    with pytest.raises(TypeError, match=r"\bout\b"):
        normcy.batch_norm(x, m, v, out=np.zeros(x.shape, F64))
    with pytest.raises(TypeError, match=r"\bout\b"):
        normcy.batch_norm(x, m, v, out=x.tolist())
    with pytest.raises(ValueError, match=r"\bout\b"):
        normcy.batch_norm(x, m, v, out=np.zeros((2, 3, 5), F32))
    ro = np.zeros(x.shape, F32)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match=r"\bout\b"):
        normcy.batch_norm(x, m, v, out=ro)


def test_batch_norm_partial_overlap_rejected():
    buf = np.arange(5 * 3 * 4, dtype=F32).reshape(5, 3, 4)
    _, m, v = _good()
    before = buf.copy()
    with pytest.raises(ValueError, match=r"overlap|\bout\b"):
        normcy.batch_norm(buf[:-1], m, v, out=buf[1:])
    np.testing.assert_array_equal(buf, before)
    flat = np.arange(2 * 3 * 4 + 1, dtype=F32)
    with pytest.raises(ValueError, match=r"overlap|\bout\b"):
        normcy.batch_norm(flat[1:].reshape(2, 3, 4), m, v, out=flat[:-1].reshape(2, 3, 4))


def test_batch_norm_bad_num_threads():
    x, m, v = _good()
    with pytest.raises(ValueError, match="num_threads"):
        normcy.batch_norm(x, m, v, num_threads=0)
    with pytest.raises(TypeError, match="num_threads"):
        normcy.batch_norm(x, m, v, num_threads="2")


# ------------------------------------------------------------------------ fold_batch_norm
@pytest.mark.parametrize("c", [1, 3, 64, 1000])
def test_fold_batch_norm(h, c):
    rng = h.rng_for("fold", c)
    m, v, w, b = _stats(rng, c)
    m = m * 10
    eps = 1e-3
    m0, v0, w0, b0 = m.copy(), v.copy(), w.copy(), b.copy()
    scale, shift = normcy.fold_batch_norm(m, v, w, b, eps)
    assert scale.shape == (c,) and shift.shape == (c,)
    assert scale.dtype == F32 and shift.dtype == F32
    s64 = w.astype(F64) / np.sqrt(v.astype(F64) + eps)
    sh64 = b.astype(F64) - m.astype(F64) * s64
    # a handful of float32 roundings of the terms involved
    np.testing.assert_allclose(scale, s64, rtol=1e-6, atol=0)
    bound = 1e-6 * (np.abs(b) + np.abs(m.astype(F64) * s64))
    assert np.all(np.abs(shift - sh64) <= bound)
    # y = x * scale + shift reproduces batch_norm
    x = h.randn(rng, (5, c, 3), scale=2.0)
    bshape = (1, c, 1)
    y = x.astype(F64) * scale.astype(F64).reshape(bshape) + shift.astype(F64).reshape(bshape)
    ref = h.ref_batch_norm(x, m, v, w, b, eps, 1)
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=2e-5 * (1 + np.abs(m).max()))
    for a, a0 in ((m, m0), (v, v0), (w, w0), (b, b0)):
        np.testing.assert_array_equal(a, a0)


def test_fold_batch_norm_none_weight_bias(h):
    rng = h.rng_for("fold-none")
    m, v, _, _ = _stats(rng, 5)
    try:
        scale, shift = normcy.fold_batch_norm(m, v, None, None, 1e-5)
    except (TypeError, ValueError) as e:  # a documented refusal is acceptable
        assert "weight" in str(e) or "bias" in str(e)
        return
    s64 = 1.0 / np.sqrt(v.astype(F64) + 1e-5)
    np.testing.assert_allclose(scale, s64, rtol=1e-6)
    np.testing.assert_allclose(shift, -m.astype(F64) * s64, rtol=1e-6, atol=1e-7)


def test_fold_batch_norm_bad_input():
    m = np.zeros(3, F32)
    v = np.ones(3, F32)
    w = np.ones(3, F32)
    b = np.zeros(3, F32)
    with pytest.raises(ValueError, match="running_var"):
        normcy.fold_batch_norm(m, np.ones(4, F32), w, b, 1e-5)
    with pytest.raises(ValueError, match=r"\bweight\b"):
        normcy.fold_batch_norm(m, v, np.ones(2, F32), b, 1e-5)
    with pytest.raises(ValueError, match=r"\bbias\b"):
        normcy.fold_batch_norm(m, v, w, np.ones((3, 1), F32), 1e-5)
    for eps in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match=r"\beps\b"):
            normcy.fold_batch_norm(m, v, w, b, eps)


# ------------------------------------------------------------------------ fold into linear
def _fold_bound(x, wf, bf, b, m, scale, beta):
    """Rounding bound for comparing the folded layer with linear->BN (both in float64
    from float32 parameters): a few ulp of every magnitude that enters."""
    x = np.abs(x.astype(F64))
    mag = x @ np.abs(wf.astype(F64)).T + np.abs(b) * np.abs(scale) + np.abs(m * scale) \
        + np.abs(beta)
    return 1e-6 * mag + 1e-12


@pytest.mark.parametrize("out_f,in_f", [(1, 1), (3, 5), (64, 384), (384, 96)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_fold_into_linear(h, out_f, in_f, with_bias):
    rng = h.rng_for("fold-lin", out_f, in_f, with_bias)
    W = (rng.standard_normal((out_f, in_f)) / np.sqrt(in_f)).astype(F32)
    bias = h.randn(rng, out_f) if with_bias else None
    m, v, g, beta = _stats(rng, out_f)
    eps = 1e-3
    saved = [a.copy() for a in (W, m, v, g, beta)]
    Wf, bf = normcy.fold_batch_norm_into_linear(W, bias, m, v, g, beta, eps)
    assert Wf.shape == W.shape and bf.shape == (out_f,)
    assert Wf.dtype == F32 and bf.dtype == F32
    for a, a0 in zip((W, m, v, g, beta), saved):
        np.testing.assert_array_equal(a, a0)  # inputs untouched
    x = h.randn(rng, (17, in_f))
    b64 = np.zeros(out_f) if bias is None else bias.astype(F64)
    lin = x.astype(F64) @ W.astype(F64).T + b64
    ref = h.ref_batch_norm(lin, m, v, g, beta, eps, 1)
    folded = x.astype(F64) @ Wf.astype(F64).T + bf.astype(F64)
    scale = g.astype(F64) / np.sqrt(v.astype(F64) + eps)
    bound = _fold_bound(x, Wf, bf, b64, m.astype(F64), scale, beta.astype(F64))
    assert np.all(np.abs(folded - ref) <= bound), np.max(np.abs(folded - ref) / bound)


@pytest.mark.parametrize("with_bias", [True, False])
def test_fold_into_conv1x1(h, with_bias):
    rng = h.rng_for("fold-conv", with_bias)
    co, ci = 12, 7
    W = (rng.standard_normal((co, ci, 1, 1)) / np.sqrt(ci)).astype(F32)
    bias = h.randn(rng, co) if with_bias else None
    m, v, g, beta = _stats(rng, co)
    Wf, bf = normcy.fold_batch_norm_into_linear(W, bias, m, v, g, beta)  # default eps 1e-5
    assert Wf.shape == (co, ci, 1, 1) and bf.shape == (co,)
    assert Wf.dtype == F32
    x = h.randn(rng, (2, ci, 5, 4))
    b64 = np.zeros(co) if bias is None else bias.astype(F64)

    def conv1x1(x, w, b):
        return np.einsum("oi,nihw->nohw", w[:, :, 0, 0].astype(F64), x.astype(F64)) \
            + b.reshape(1, -1, 1, 1)

    ref = h.ref_batch_norm(conv1x1(x, W, b64), m, v, g, beta, 1e-5, 1)
    folded = conv1x1(x, Wf, bf.astype(F64))
    np.testing.assert_allclose(folded, ref, rtol=1e-5, atol=1e-5)
    # and normcy.batch_norm on the float32 conv output agrees with the folded layer
    y = normcy.batch_norm(conv1x1(x, W, b64).astype(F32), m, v, g, beta)
    np.testing.assert_allclose(y, folded, rtol=1e-5, atol=2e-5)


def test_fold_into_linear_bad_shapes():
    W = np.ones((4, 3), F32)
    m, v = np.zeros(4, F32), np.ones(4, F32)
    with pytest.raises(ValueError, match="running_mean"):
        normcy.fold_batch_norm_into_linear(W, None, np.zeros(3, F32), v, None, None)
    with pytest.raises(ValueError, match=r"\bbias\b"):
        normcy.fold_batch_norm_into_linear(W, np.zeros(3, F32), m, v, None, None)
    with pytest.raises(ValueError, match="bn_weight"):
        normcy.fold_batch_norm_into_linear(W, None, m, v, np.ones(5, F32), None)
    with pytest.raises(ValueError, match=r"\beps\b"):
        normcy.fold_batch_norm_into_linear(W, None, m, v, None, None, -1.0)


@pytest.mark.parametrize("spread", ["small_means", "large_means"])
def test_batch_norm_same_bits_in_every_layout(h, spread):
    """The form (folded or centred) is chosen from the parameters alone: NCHW, NHWC, a
    strided view and every thread count give the same bits; with small means the result is
    exactly the fold's x * scale + shift (fused)."""
    rng = h.rng_for("bn-layout-bits", spread)
    c = 24
    m, v, w, b = _stats(rng, c)
    if spread == "large_means":
        m = (m + 50.0).astype(F32)
    x = h.randn(rng, (3, c, 5, 7), scale=2.0) + (m.reshape(1, c, 1, 1) if spread ==
                                                  "large_means" else 0)
    x = x.astype(F32)
    ref = normcy.batch_norm(x, m, v, w, b, num_threads=1)
    nhwc = normcy.batch_norm(np.ascontiguousarray(x.transpose(0, 2, 3, 1)), m, v, w, b,
                             axis=-1, num_threads=2)
    np.testing.assert_array_equal(nhwc.transpose(0, 3, 1, 2), ref)
    big = np.zeros((3, c, 5, 14), F32)
    big[..., ::2] = x
    np.testing.assert_array_equal(normcy.batch_norm(big[..., ::2], m, v, w, b), ref)
    np.testing.assert_array_equal(normcy.batch_norm(x, m, v, w, b, num_threads=3), ref)
    if spread == "small_means":
        scale, shift = normcy.fold_batch_norm(m, v, w, b)
        sc, sh = scale.reshape(1, c, 1, 1), shift.reshape(1, c, 1, 1)
        from normcy import _norms
        if _norms.isa_info()["name"] == "baseline":     # SSE2: no FMA, two roundings
            want = (x * sc) + sh
        else:                                           # a fused multiply-add: one
            want = (x.astype(F64) * sc.astype(F64) + sh.astype(F64)).astype(F32)
        np.testing.assert_array_equal(ref, want)
