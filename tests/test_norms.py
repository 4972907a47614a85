"""layer_norm, add_layer_norm, rms_norm, add_rms_norm against float64 NumPy references.

Covers shapes (odd widths, D=1, wide rows, 1-d/3-d/4-d), weight/bias present or
absent, out/sum_out aliasing, every argument non-contiguous, the numerical cases
from the foundation issue, and every bad-input case.
"""
import numpy as np
import pytest

import normcy

F32 = np.float32
F64 = np.float64

WIDTHS = [1, 2, 3, 17, 383, 384, 385, 768, 1000]
SHAPES = ([(5, d) for d in WIDTHS]
          + [(384,), (1,), (1000,), (3, 65536), (1, 65536), (2, 4097),
             (2, 3, 17), (4, 5, 384), (2, 3, 4, 33), (2, 1, 3, 385), (1, 1, 1, 1)])
WB = [(True, True), (False, False), (True, False), (False, True)]
WB_IDS = ["w+b", "none", "w", "b"]


def _ids(shape):
    return "x".join(map(str, shape))


# =========================================================================== layer_norm
# the unbiased std is undefined for D=1: that case has its own test (test_annotated_d1)
LN_CASES = [pytest.param(shape, conv, id=_ids(shape) + "-" + conv)
            for conv in ("standard", "annotated") for shape in SHAPES
            if not (conv == "annotated" and shape[-1] == 1)]


@pytest.mark.parametrize("shape,convention", LN_CASES)
@pytest.mark.parametrize("wb", WB, ids=WB_IDS)
def test_layer_norm_matches_reference(h, shape, convention, wb):
    rng = h.rng_for("ln", shape, convention, wb)
    x = h.randn(rng, shape, scale=2.0, loc=0.5)
    w, b = h.params(rng, shape[-1], *wb)
    x0 = x.copy()
    y = normcy.layer_norm(x, w, b, convention=convention)
    assert isinstance(y, np.ndarray) and y is not x
    assert not np.shares_memory(y, x)
    h.assert_close(y, h.ref_layer_norm(x, w, b, 1e-5, convention))
    np.testing.assert_array_equal(x, x0)  # input untouched


@pytest.mark.parametrize("eps", [0.0, 1e-5, 0.1, 3.0])
@pytest.mark.parametrize("convention", ["standard", "annotated"])
def test_layer_norm_eps_placement(h, eps, convention):
    # With std ~ 1 and large eps, sqrt(var+eps) and std_unbiased+eps differ a lot,
    # so a wrong convention or eps placement cannot hide.
    rng = h.rng_for("eps", eps, convention)
    x = h.randn(rng, (7, 20))
    w, b = h.params(rng, 20)
    y = normcy.layer_norm(x, w, b, eps, convention=convention)
    h.assert_close(y, h.ref_layer_norm(x, w, b, eps, convention))
    # keyword form too
    y2 = normcy.layer_norm(x, weight=w, bias=b, eps=eps, convention=convention)
    np.testing.assert_array_equal(y, y2)


def test_annotated_differs_from_standard(h):
    rng = h.rng_for("conv-diff")
    x = h.randn(rng, (4, 8))
    a = normcy.layer_norm(x, eps=0.1, convention="annotated")
    s = normcy.layer_norm(x, eps=0.1, convention="standard")
    assert np.max(np.abs(a.astype(F64) - s)) > 1e-2


def test_annotated_d1(h):
    # std_unbiased of one value is 0/0: PyTorch/Annotated Transformer give NaN.
    # Either that parity or a clear ValueError is acceptable; never a crash.
    x = np.ones((3, 1), F32)
    try:
        y = normcy.layer_norm(x, convention="annotated")
    except ValueError as e:
        assert "convention" in str(e) or "x" in str(e)
    else:
        assert y.shape == (3, 1) and y.dtype == F32
        assert np.all(np.isnan(y))


@pytest.mark.parametrize("name", ["layer_norm", "add_layer_norm", "rms_norm", "add_rms_norm"])
def test_many_dimensions(h, name):
    # 40-d input (NumPy 1.x: its maximum, 32) whose leading axes cannot be collapsed into
    # one (Fortran order)
    nd = 40 if np.lib.NumpyVersion(np.__version__) >= "2.0.0" else 32
    shape = (1,) * (nd - 20) + (2,) * 12 + (1,) * 7 + (5,)
    rng = h.rng_for("many-dims", name)
    base = h.randn(rng, shape[::-1])
    x = base.T
    r = h.randn(rng, shape)
    assert x.ndim == nd and not x.flags.c_contiguous
    y = _call(name, x, r, None, None, None)
    h.assert_close(y, _ref(h, name, np.array(x), r, None, None, None))
    out = np.empty(shape[::-1], F32).T
    assert _call(name, x, r, None, None, None, out=out) is out
    np.testing.assert_array_equal(out, y)


def test_layer_norm_zero_rows(h):
    x = np.empty((0, 16), F32)
    y = normcy.layer_norm(x)
    assert y.shape == (0, 16) and y.dtype == F32
    y = normcy.add_layer_norm(x, x.copy())
    assert y.shape == (0, 16)
    y = normcy.rms_norm(np.empty((3, 0, 5), F32))
    assert y.shape == (3, 0, 5)


# =========================================================================== add_layer_norm
ADD_SHAPES = [(5, 1), (5, 3), (4, 17), (3, 383), (3, 384), (2, 385), (2, 768), (3, 1000),
              (2, 65536), (384,), (2, 3, 17), (2, 2, 3, 385)]


@pytest.mark.parametrize("shape", ADD_SHAPES, ids=_ids)
@pytest.mark.parametrize("with_xbias", [False, True], ids=["nobias", "xbias"])
@pytest.mark.parametrize("wb", WB[:2], ids=WB_IDS[:2])
def test_add_layer_norm_matches_reference(h, shape, with_xbias, wb):
    rng = h.rng_for("aln", shape, with_xbias, wb)
    x = h.randn(rng, shape)
    r = h.randn(rng, shape, scale=3.0, loc=-1.0)
    xb = h.randn(rng, shape[-1], scale=0.5) if with_xbias else None
    w, b = h.params(rng, shape[-1], *wb)
    x0, r0 = x.copy(), r.copy()
    so = np.full(shape, h.SENTINEL, F32)
    y = normcy.add_layer_norm(x, r, w, b, x_bias=xb, sum_out=so)
    s = h.ref_sum(x, r, xb)
    h.assert_close(y, h.ref_layer_norm(s, w, b))
    _check_sum(so, x, r, xb)
    np.testing.assert_array_equal(x, x0)
    np.testing.assert_array_equal(r, r0)
    # without sum_out: same normalized output, bit for bit
    y2 = normcy.add_layer_norm(x, r, w, b, x_bias=xb)
    np.testing.assert_array_equal(y, y2)


def _check_sum(so, x, r, xb):
    if xb is None:
        # the issue: with no x_bias, sum_out equals NumPy's float32 x + residual bit for bit
        assert np.array_equal(so, np.add(x, r)), "sum_out != np.add(x, residual)"
    else:
        exact = x.astype(F64) + xb.astype(F64) + r.astype(F64)
        mag = np.abs(x.astype(F64)) + np.abs(xb.astype(F64)) + np.abs(r.astype(F64))
        # two float32 additions: at most 2 roundings of <= 0.5 ulp of the magnitudes
        bound = 2.0 * np.spacing(mag.astype(F32)).astype(F64)
        assert np.all(np.abs(so.astype(F64) - exact) <= bound)


# =========================================================================== rms_norm
@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
@pytest.mark.parametrize("with_w", [True, False], ids=["w", "now"])
def test_rms_norm_matches_reference(h, shape, with_w):
    rng = h.rng_for("rms", shape, with_w)
    x = h.randn(rng, shape, scale=2.0, loc=0.3)
    w, _ = h.params(rng, shape[-1], with_w, False)
    x0 = x.copy()
    y = normcy.rms_norm(x, w)
    assert y is not x
    h.assert_close(y, h.ref_rms_norm(x, w))
    np.testing.assert_array_equal(x, x0)


@pytest.mark.parametrize("eps", [0.0, 1e-6, 0.5])
def test_rms_norm_eps(h, eps):
    rng = h.rng_for("rms-eps", eps)
    x = h.randn(rng, (6, 33), scale=0.7)
    w, _ = h.params(rng, 33)
    h.assert_close(normcy.rms_norm(x, w, eps), h.ref_rms_norm(x, w, eps))
    h.assert_close(normcy.rms_norm(x, weight=w, eps=eps), h.ref_rms_norm(x, w, eps))


@pytest.mark.parametrize("shape", ADD_SHAPES, ids=_ids)
@pytest.mark.parametrize("with_xbias", [False, True], ids=["nobias", "xbias"])
@pytest.mark.parametrize("with_w", [True, False], ids=["w", "now"])
def test_add_rms_norm_matches_reference(h, shape, with_xbias, with_w):
    rng = h.rng_for("arms", shape, with_xbias, with_w)
    x = h.randn(rng, shape)
    r = h.randn(rng, shape, scale=3.0, loc=-1.0)
    xb = h.randn(rng, shape[-1], scale=0.5) if with_xbias else None
    w, _ = h.params(rng, shape[-1], with_w, False)
    x0, r0 = x.copy(), r.copy()
    so = np.full(shape, h.SENTINEL, F32)
    y = normcy.add_rms_norm(x, r, w, x_bias=xb, sum_out=so)
    h.assert_close(y, h.ref_rms_norm(h.ref_sum(x, r, xb), w))
    _check_sum(so, x, r, xb)
    np.testing.assert_array_equal(x, x0)
    np.testing.assert_array_equal(r, r0)
    np.testing.assert_array_equal(y, normcy.add_rms_norm(x, r, w, x_bias=xb))


def test_add_default_eps_values(h):
    # defaults: 1e-5 for LayerNorm, 1e-6 for RMSNorm (visible with tiny-variance rows)
    rng = h.rng_for("defeps")
    x = h.randn(rng, (4, 64), scale=3e-3)
    r = np.zeros_like(x)
    np.testing.assert_allclose(normcy.layer_norm(x), h.ref_layer_norm(x, eps=1e-5),
                               rtol=1e-5, atol=2e-5)
    np.testing.assert_allclose(normcy.add_layer_norm(x, r), h.ref_layer_norm(x, eps=1e-5),
                               rtol=1e-5, atol=2e-5)
    np.testing.assert_allclose(normcy.rms_norm(x), h.ref_rms_norm(x, eps=1e-6),
                               rtol=1e-5, atol=2e-5)
    np.testing.assert_allclose(normcy.add_rms_norm(x, r), h.ref_rms_norm(x, eps=1e-6),
                               rtol=1e-5, atol=2e-5)


# =========================================================================== out / in place
def _call(name, x, r, w, b, xb, **kw):
    if name == "layer_norm":
        return normcy.layer_norm(x, w, b, **kw)
    if name == "rms_norm":
        return normcy.rms_norm(x, w, **kw)
    if name == "add_layer_norm":
        return normcy.add_layer_norm(x, r, w, b, x_bias=xb, **kw)
    if name == "add_rms_norm":
        return normcy.add_rms_norm(x, r, w, x_bias=xb, **kw)
    raise AssertionError(name)


def _ref(h, name, x, r, w, b, xb):
    if name == "layer_norm":
        return h.ref_layer_norm(x, w, b)
    if name == "rms_norm":
        return h.ref_rms_norm(x, w)
    s = h.ref_sum(x, r, xb)
    if name == "add_layer_norm":
        return h.ref_layer_norm(s, w, b)
    return h.ref_rms_norm(s, w)


ALL = ["layer_norm", "add_layer_norm", "rms_norm", "add_rms_norm"]
ADD = ["add_layer_norm", "add_rms_norm"]


@pytest.mark.parametrize("name", ALL)
def test_out_given_and_in_place(h, name):
    rng = h.rng_for("out", name)
    shape = (9, 385)
    x = h.randn(rng, shape)
    r = h.randn(rng, shape)
    w, b = h.params(rng, shape[-1])
    expected = _ref(h, name, x, r, w, b, None)
    fresh = _call(name, x, r, w, b, None)
    out = np.full(shape, h.SENTINEL, F32)
    res = _call(name, x, r, w, b, None, out=out)
    assert res is out
    np.testing.assert_array_equal(out, fresh)
    h.assert_close(out, expected)
    # in place: out is x
    xi = x.copy()
    res = _call(name, xi, r, w, b, None, out=xi)
    assert res is xi
    np.testing.assert_array_equal(xi, fresh)
    # in place through a different view object of exactly the same memory
    xi = x.copy()
    alias = xi[...]
    assert alias is not xi
    res = _call(name, xi, r, w, b, None, out=alias)
    assert res is alias
    np.testing.assert_array_equal(xi, fresh)


@pytest.mark.parametrize("name", ADD)
@pytest.mark.parametrize("with_xbias", [False, True], ids=["nobias", "xbias"])
@pytest.mark.parametrize("out_kind,sum_kind", [
    (o, s) for o in (None, "new", "x", "residual") for s in (None, "new", "x", "residual")
    # out and sum_out the very same array has no defined result: not a user case
    if not (o in ("x", "residual") and o == s)])
def test_add_aliasing_combinations(h, name, with_xbias, out_kind, sum_kind):
    rng = h.rng_for("alias", name, with_xbias, out_kind, sum_kind)
    shape = (7, 383)
    x0 = h.randn(rng, shape)
    r0 = h.randn(rng, shape, scale=2.0)
    xb = h.randn(rng, shape[-1]) if with_xbias else None
    w, b = h.params(rng, shape[-1])
    expected = _ref(h, name, x0, r0, w, b, xb)
    s_expected = h.ref_sum(x0, r0, xb)
    fresh = _call(name, x0, r0, w, b, xb)
    x, r = x0.copy(), r0.copy()
    pick = {None: None, "x": x, "residual": r}
    out = np.full(shape, h.SENTINEL, F32) if out_kind == "new" else pick[out_kind]
    so = np.full(shape, h.SENTINEL, F32) if sum_kind == "new" else pick[sum_kind]
    res = _call(name, x, r, w, b, xb, out=out, sum_out=so)
    if out is not None:
        assert res is out
    h.assert_close(res, expected)
    np.testing.assert_array_equal(res, fresh)
    if so is not None:
        if xb is None:
            assert np.array_equal(so, np.add(x0, r0))
        else:
            _check_sum(so, x0, r0, xb)
    # inputs that are neither out nor sum_out are untouched
    if out_kind != "x" and sum_kind != "x":
        np.testing.assert_array_equal(x, x0)
    if out_kind != "residual" and sum_kind != "residual":
        np.testing.assert_array_equal(r, r0)


@pytest.mark.parametrize("name", ADD)
def test_add_x_is_residual(h, name):
    rng = h.rng_for("xisr", name)
    x = h.randn(rng, (5, 40))
    w, b = h.params(rng, 40)
    x0 = x.copy()
    so = np.empty_like(x)
    y = _call(name, x, x, w, b, None, sum_out=so)
    assert np.array_equal(so, np.add(x0, x0))
    h.assert_close(y, _ref(h, name, x0, x0, w, b, None))
    # ... and even written back into that same array
    y = _call(name, x, x, w, b, None, sum_out=x)
    assert np.array_equal(x, np.add(x0, x0))


# =========================================================================== layouts
@pytest.mark.parametrize("name,which", [
    (n, w) for n in ALL for w in ("x", "residual", "out", "sum_out", "all")
    if n in ADD or w not in ("residual", "sum_out")])
@pytest.mark.parametrize("layout", ["offset", "rows2", "cols2", "negcols2", "pad",
                                    "fortran", "swap", "neg"])
def test_non_contiguous_arguments(h, name, layout, which):
    shape = (6, 5, 33)
    rng = h.rng_for("layout", name, layout, which)

    def lay(arg, fill):
        lo = layout if which in (arg, "all") else "c"
        return h.make_view(shape, lo, fill)

    x, _, _ = lay("x", lambda n: rng.standard_normal(n))
    r, _, _ = lay("residual", lambda n: 2.0 * rng.standard_normal(n))
    out, obase, ocov = lay("out", h.SENTINEL)
    so, sbase, scov = lay("sum_out", h.SENTINEL)
    w, b = h.params(rng, shape[-1])
    xb = h.randn(rng, shape[-1])
    if which == "all":
        w = _strided_1d(w, rng)
        b = _strided_1d(b, rng)
        xb = _strided_1d(xb, rng)
    x0, r0 = x.copy(), r.copy()
    kw = dict(out=out)
    if name in ADD:
        kw["sum_out"] = so
    res = _call(name, x, r, w, b, xb if name in ADD else None, **kw)
    assert res is out
    h.assert_close(out, _ref(h, name, x0, r0, w, b, xb))
    h.assert_untouched(obase, ocov)
    if name in ADD:
        _check_sum(so, x0, r0, xb)
        h.assert_untouched(sbase, scov)
    np.testing.assert_array_equal(x, x0)
    np.testing.assert_array_equal(r, r0)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("layout", ["fortran", "cols2", "negcols2", "swap", "neg"])
@pytest.mark.parametrize("shape", [(150, 40), (3, 50, 40), (70, 8192), (5, 700)])
def test_gathered_rows_have_the_contiguous_bits(h, name, layout, shape):
    """Operands with a non-unit last-axis stride go through blocks of gathered rows (both
    loop orders: rows innermost for column-major views, elements innermost otherwise;
    several blocks, a partial last one): every output has the contiguous call's bits, at
    every thread count, in place too, and nothing outside the outputs is written."""
    rng = h.rng_for("gather-bits", name, layout, shape)
    x, _, _ = h.make_view(shape, layout, lambda n: rng.standard_normal(n))
    r, _, _ = h.make_view(shape, layout, lambda n: 2.0 * rng.standard_normal(n))
    w, b = h.params(rng, shape[-1])
    xb = h.randn(rng, shape[-1]) if name in ADD else None
    xc, rc = np.ascontiguousarray(x), np.ascontiguousarray(r)
    kw = {"sum_out": np.empty(shape, F32)} if name in ADD else {}
    want = _call(name, xc, rc, w, b, xb, **kw)
    want_sum = kw.get("sum_out")
    with h.forced_parallel():       # small calls too: a block per thread
        for nt in (1, 2, 3):
            out, obase, ocov = h.make_view(shape, layout, h.SENTINEL)
            kw = {}
            if name in ADD:
                so, sbase, scov = h.make_view(shape, layout, h.SENTINEL)
                kw["sum_out"] = so
            _call(name, x, r, w, b, xb, out=out, num_threads=nt, **kw)
            np.testing.assert_array_equal(out, want)
            h.assert_untouched(obase, ocov)
            if name in ADD:
                np.testing.assert_array_equal(so, want_sum)
                h.assert_untouched(sbase, scov)
            xx = h.make_view(shape, layout, 0.0)[0]    # in place, same layout
            xx[...] = x
            _call(name, xx, r, w, b, xb, out=xx, num_threads=nt)
            np.testing.assert_array_equal(xx, want)


def _strided_1d(v, rng):
    """The same values as a non-contiguous (negative, step -2) view."""
    base = np.empty(2 * v.size, F32)
    base[::-2] = v
    view = base[::-2]
    assert not view.flags.c_contiguous and np.array_equal(view, v)
    return view


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("layout", ["rows2", "fortran", "neg", "cols2"])
def test_in_place_non_contiguous(h, name, layout):
    shape = (11, 47)
    rng = h.rng_for("inplace-nc", name, layout)
    x, base, cov = h.make_view(shape, layout, lambda n: rng.standard_normal(n))
    base[~cov] = h.SENTINEL
    r = h.randn(rng, shape)
    w, b = h.params(rng, shape[-1])
    x0 = x.copy()
    res = _call(name, x, r, w, b, None, out=x)
    assert res is x
    h.assert_close(x, _ref(h, name, x0, r, w, b, None))
    h.assert_untouched(base, cov)


@pytest.mark.parametrize("name", ADD)
@pytest.mark.parametrize("layout", ["rows2", "fortran", "negcols2"])
@pytest.mark.parametrize("target", ["x", "residual"])
def test_sum_out_is_input_non_contiguous(h, name, layout, target):
    shape = (9, 31)
    rng = h.rng_for("sumalias-nc", name, layout, target)
    x, _, _ = h.make_view(shape, layout, lambda n: rng.standard_normal(n))
    r, _, _ = h.make_view(shape, layout, lambda n: rng.standard_normal(n))
    w, b = h.params(rng, shape[-1])
    x0, r0 = x.copy(), r.copy()
    so = x if target == "x" else r
    y = _call(name, x, r, w, b, None, sum_out=so)
    assert np.array_equal(so, np.add(x0, r0))
    h.assert_close(y, _ref(h, name, x0, r0, w, b, None))


@pytest.mark.parametrize("name", ALL)
def test_broadcast_zero_stride_inputs(h, name):
    # read-only, stride-0 views (np.broadcast_to) are legitimate inputs
    rng = h.rng_for("bcast", name)
    row = h.randn(rng, 29)
    x = np.broadcast_to(row, (4, 3, 29))
    r = np.broadcast_to(h.randn(rng, (3, 1)), (4, 3, 29))
    w = np.broadcast_to(np.float32(1.5), (29,))
    b = np.broadcast_to(np.float32(-0.25), (29,))
    assert not x.flags.writeable
    y = _call(name, x, r, w, b, None)
    h.assert_close(y, _ref(h, name, np.array(x), np.array(r), np.array(w), np.array(b), None))


@pytest.mark.parametrize("name", ALL)
def test_read_only_inputs(h, name):
    rng = h.rng_for("ro", name)
    x = h.randn(rng, (5, 19))
    r = h.randn(rng, (5, 19))
    w, b = h.params(rng, 19)
    xb = h.randn(rng, 19)
    for a in (x, r, w, b, xb):
        a.flags.writeable = False
    xb_ = xb if name in ADD else None
    y = _call(name, x, r, w, b, xb_)
    h.assert_close(y, _ref(h, name, x, r, w, b, xb_))


@pytest.mark.parametrize("name", ALL)
def test_unusual_dtype_objects(h, name):
    """Misaligned or byte-swapped float32 data: a correct result or a clear error,
    never a crash or a silently wrong answer."""
    rng = h.rng_for("odd", name)
    shape = (4, 13)
    vals = h.randn(rng, shape)
    r = h.randn(rng, shape)
    expected = _ref(h, name, vals, r, None, None, None)
    # misaligned by one byte
    raw = bytearray(vals.nbytes + 1)
    mis = np.frombuffer(raw, dtype=F32, offset=1, count=vals.size).reshape(shape)
    mis[...] = vals
    assert not mis.flags.aligned
    # byte-swapped float32
    swapped = vals.astype(">f4")
    for x in (mis, swapped):
        try:
            y = _call(name, x, r, None, None, None)
        except (TypeError, ValueError) as e:
            assert "x" in str(e)
        else:
            h.assert_close(y, expected)


# =========================================================================== large outputs
# Outputs beyond the caches may take a separate code path (streaming stores); force it on
# small inputs through the private threshold hook and check everything again.
STREAM_SHAPES = [(7, 64), (5, 100), (3, 1025), (2, 4097), (4, 3, 385), (65,)]


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("shape", STREAM_SHAPES, ids=_ids)
@pytest.mark.parametrize("out_kind", ["none", "new", "offset", "in_place"])
def test_streaming_path(h, name, shape, out_kind):
    rng = h.rng_for("stream", name, shape, out_kind)
    x0 = h.randn(rng, shape, loc=0.5)
    r = h.randn(rng, shape)
    w, b = h.params(rng, shape[-1])
    xb = h.randn(rng, shape[-1]) if name in ADD else None
    expected = _ref(h, name, x0, r, w, b, xb)
    plain = _call(name, x0, r, w, b, xb)
    with h.forced_streaming():
        for nt in (1, 2, 3):
            x = x0.copy()
            obase = ocov = None
            if out_kind == "none":
                out = None
            elif out_kind == "new":
                out = np.full(shape, h.SENTINEL, F32)
            elif out_kind == "offset":  # output start not 16/32/64-byte aligned
                out, obase, ocov = h.make_view(shape, "offset", h.SENTINEL)
            else:
                out = x
            kw = {} if out is None else {"out": out}
            so = None
            if name in ADD:
                so, sbase, scov = h.make_view(shape, "offset", h.SENTINEL)
                kw["sum_out"] = so
            with h.forced_parallel():
                y = _call(name, x, r, w, b, xb, num_threads=nt, **kw)
            if out is not None:
                assert y is out
            h.assert_close(y, expected)
            np.testing.assert_array_equal(y, plain)
            if obase is not None:
                h.assert_untouched(obase, ocov)
            if so is not None:
                _check_sum(so, x0, r, xb)
                h.assert_untouched(sbase, scov)


@pytest.mark.parametrize("name", ADD)
@pytest.mark.parametrize("sum_kind", ["x", "residual"])
def test_streaming_sum_out_aliases_input(h, name, sum_kind):
    rng = h.rng_for("stream-alias", name, sum_kind)
    shape = (6, 1030)
    x0, r0 = h.randn(rng, shape), h.randn(rng, shape)
    w, b = h.params(rng, shape[-1])
    plain = _call(name, x0, r0, w, b, None)
    with h.forced_streaming():
        x, r = x0.copy(), r0.copy()
        so = x if sum_kind == "x" else r
        out = r if sum_kind == "x" else x   # the other input receives the output
        y = _call(name, x, r, w, b, None, out=out, sum_out=so)
    assert y is out
    assert np.array_equal(so, np.add(x0, r0))
    np.testing.assert_array_equal(y, plain)


@pytest.mark.parametrize("name", ALL)
def test_really_large_output(h, name):
    """A 48 MiB output (takes the large-output path by default): spot-check rows
    against the reference and the thread-count invariance."""
    rng = h.rng_for("large", name)
    shape = (3072, 4096)
    x = np.empty(shape, F32)
    x[...] = h.randn(rng, (1, shape[1]))
    x[::7] += h.randn(rng, (1, shape[1]), scale=3.0)
    x[::5] *= F32(0.5)
    r = np.empty(shape, F32)
    r[...] = h.randn(rng, (shape[0], 1))
    w, b = h.params(rng, shape[1])
    y1 = _call(name, x, r, w, b, None, num_threads=1)
    y2 = _call(name, x, r, w, b, None, num_threads=2)
    assert np.array_equal(y1, y2)
    rows = np.arange(0, shape[0], 61)
    h.assert_close(y1[rows], _ref(h, name, x[rows], r[rows], w, b, None))


# =========================================================================== numerics
@pytest.mark.parametrize("d", [17, 384, 1000, 4096])
@pytest.mark.parametrize("name", ALL)
def test_large_mean_small_std(h, d, name):
    # Rows with mean 1e4 and std 1: E[x^2]-E[x]^2 in float32 would be garbage
    # (1e8 has an ulp of 8).  The inputs are exactly representable float32 values;
    # compare with the float64 reference on those exact values.
    rng = h.rng_for("bigmean", d, name)
    x = h.randn(rng, (8, d), loc=1e4)
    r = h.randn(rng, (8, d), scale=0.5)
    w, b = h.params(rng, d)
    y = _call(name, x, r, w, b, None)
    exp = _ref(h, name, x, r, w, b, None)
    h.assert_close(y, exp, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("convention", ["standard", "annotated"])
@pytest.mark.parametrize("value", [0.0, 1.0, 0.1, -3.7, 1e4 + 0.3, 123456.79, 1e18, -1e-30])
@pytest.mark.parametrize("d", [2, 3, 384, 1000])
def test_constant_rows_give_bias(h, convention, value, d):
    rng = h.rng_for("const", convention, value, d)
    w, b = h.params(rng, d)
    x = np.full((3, d), value, F32)
    x[1] = h.randn(rng, d)  # one ordinary row in between
    y = normcy.layer_norm(x, w, b, convention=convention)
    for i in (0, 2):
        # exactly `bias` up to float32 rounding of w*0 + b
        np.testing.assert_allclose(y[i], b, rtol=2 ** -22, atol=1e-7)
    h.assert_close(y[1], h.ref_layer_norm(x[1], w, b, 1e-5, convention))
    # no weight/bias: exactly zero (up to rounding)
    y = normcy.layer_norm(x, convention=convention)
    np.testing.assert_allclose(y[[0, 2]], 0.0, atol=1e-7)
    # fused add path: a constant sum
    xx = np.full((2, d), value, F32)
    y = normcy.add_layer_norm(xx, np.zeros_like(xx), w, b)
    np.testing.assert_allclose(y, np.broadcast_to(b, y.shape), rtol=2 ** -22, atol=1e-7)


@pytest.mark.parametrize("scale", [1e18, 1e-30])
@pytest.mark.parametrize("eps_kind", ["default", "zero"])
@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("d", [3, 384, 1000, 4096])
def test_extreme_magnitudes(h, scale, eps_kind, name, d):
    # |x| ~ 1e18: squares are ~1e36, a float32 sum of squares over 1000 values
    # overflows (max 3.4e38).  |x| ~ 1e-30: squares underflow to 0 in float32.
    rng = h.rng_for("extreme", scale, eps_kind, name, d)
    x = (rng.standard_normal((6, d)) * scale).astype(F32)
    r = (rng.standard_normal((6, d)) * scale).astype(F32)
    w, b = h.params(rng, d)
    kw = {} if eps_kind == "default" else {"eps": 0.0}
    eps = {"layer_norm": 1e-5, "add_layer_norm": 1e-5, "rms_norm": 1e-6,
           "add_rms_norm": 1e-6}[name] if eps_kind == "default" else 0.0
    y = _call(name, x, r, w, b, None, **kw)
    s = h.ref_sum(x, r) if name in ADD else x
    if "layer" in name:
        exp = h.ref_layer_norm(s, w, b, eps)
    else:
        exp = h.ref_rms_norm(s, w, eps)
    h.assert_close(y, exp)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("d", [8, 383, 384])
@pytest.mark.parametrize("wb", WB, ids=WB_IDS)
def test_each_row_as_alone_bitwise(h, name, d, wb):
    """Rows are processed two at a time and software-pipelined (a row's statistics before
    the previous pair is written): every row of a block, at every block size, position,
    pairing and thread count, is bit-identical to the same row normalized alone, including
    rows that take the double-precision path (tiny values with eps = 0) next to rows that
    do not."""
    rng = h.rng_for("rowalone", name, d, wb)
    rows = [h.randn(rng, (1, d)) for _ in range(4)]
    rows.append((rng.standard_normal((1, d)) * 1e-33).astype(F32))    # scale > 1e30
    rows.append((rng.standard_normal((1, d)) * 1e18).astype(F32))
    rows.append(np.full((1, d), 2.5, F32))                              # constant row
    rows += [h.randn(rng, (1, d), scale=10.0, loc=100.0) for _ in range(3)]
    x = np.concatenate(rows)[rng.permutation(len(rows))]
    r = h.randn(rng, x.shape)
    w, b = h.params(rng, d, *wb)
    xb = h.randn(rng, d, scale=0.5) if name in ADD else None
    kw = {"eps": 0.0}
    alone = np.concatenate([_call(name, x[i:i + 1], r[i:i + 1], w, b, xb, num_threads=1, **kw)
                            for i in range(len(x))])
    for m in range(1, len(x) + 1):
        for lo in (0, len(x) - m):
            for nt in (1, 2, 3):
                got = _call(name, x[lo:lo + m], r[lo:lo + m], w, b, xb, num_threads=nt, **kw)
                np.testing.assert_array_equal(got.view(np.int32),
                                              alone[lo:lo + m].view(np.int32),
                                              err_msg="%d rows from %d, %d threads"
                                              % (m, lo, nt))


@pytest.mark.parametrize("name", ALL + ["annotated"])
def test_many_rows_each_as_alone_bitwise(h, name):
    """More rows than one thread keeps in cache (rows x width > 65536 floats per thread):
    the norms without an add go one row at a time instead of the two-row pipeline; every
    row is still bit-identical to the same row alone, at every thread count (the threads'
    shares straddle the switch: 300 x 384 per thread at one thread, 100 x 384 at three)."""
    rng = h.rng_for("manyrows", name)
    d = 384
    x = h.randn(rng, (300, d), scale=3.0, loc=1.0)
    x[17] *= np.float32(1e-33)          # double-precision path (scale > 1e30 with eps = 0)
    x[18] = 2.5                         # constant row
    x[101] *= np.float32(1e18)
    r = h.randn(rng, x.shape)
    w, b = h.params(rng, d, True, True)
    xb = h.randn(rng, d, scale=0.5) if name in ADD else None
    kw = {"eps": 0.0}
    call = _call
    if name == "annotated":
        def call(_n, x, r, w, b, xb, **kw):
            return normcy.layer_norm(x, w, b, convention="annotated", **kw)
    alone = np.concatenate([call(name, x[i:i + 1], r[i:i + 1], w, b, xb, num_threads=1, **kw)
                            for i in range(len(x))])
    for nt in (1, 2, 3):
        got = call(name, x, r, w, b, xb, num_threads=nt, **kw)
        np.testing.assert_array_equal(got.view(np.int32), alone.view(np.int32),
                                      err_msg="%d threads" % nt)


@pytest.mark.parametrize("name,where", [(n, w) for n in ALL for w in ("x", "residual")
                                        if n in ADD or w == "x"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("shape", [(9, 384), (64, 1000), (5, 65536)], ids=_ids)
def test_nan_inf_row_isolated(h, name, bad, where, shape):
    rng = h.rng_for("naninf", name, bad, where, shape)
    x = h.randn(rng, shape)
    r = h.randn(rng, shape)
    w, b = h.params(rng, shape[-1])
    clean = _call(name, x, r, w, b, None)
    dirty_rows = [0, shape[0] // 2, shape[0] - 1]
    for row in dirty_rows:
        xd, rd = x.copy(), r.copy()
        (xd if where == "x" else rd)[row, shape[-1] // 3] = bad
        for nt in (1, 2, None):
            y = _call(name, xd, rd, w, b, None, num_threads=nt)
            keep = np.ones(shape[0], bool)
            keep[row] = False
            assert np.array_equal(y[keep], clean[keep]), (row, nt)
            # the poisoned row itself is not finite (it can't be "normalized")
            assert not np.all(np.isfinite(y[row]))


# =========================================================================== bad input
X_RE = r"\bx\b"


def _good(name, d=8):
    x = np.ones((3, d), F32)
    x[:, 0] = 2.0
    r = np.zeros((3, d), F32)
    return x, r


@pytest.mark.parametrize("name", ALL)
def test_bad_x_type(name):
    x, r = _good(name)
    for bad in (x.tolist(), None, "abc", 3.0):
        with pytest.raises(TypeError, match=X_RE):
            _call(name, bad, r, None, None, None)
    # a NumPy scalar is not an array either (TypeError), or is 0-d (ValueError)
    with pytest.raises((TypeError, ValueError), match=X_RE):
        _call(name, np.float32(1.0), r, None, None, None)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("dtype", [np.float64, np.float16, np.int32, np.int64, np.complex64,
                                   np.bool_])
def test_bad_x_dtype(name, dtype):
    x, r = _good(name)
    with pytest.raises(TypeError, match=X_RE) as ei:
        _call(name, x.astype(dtype), r, None, None, None)
    assert np.dtype(dtype).name in str(ei.value)


@pytest.mark.parametrize("name", ADD)
@pytest.mark.parametrize("dtype", [np.float64, np.float16, np.int32])
def test_bad_residual_dtype(name, dtype):
    x, r = _good(name)
    with pytest.raises(TypeError, match=r"\bresidual\b") as ei:
        _call(name, x, r.astype(dtype), None, None, None)
    assert np.dtype(dtype).name in str(ei.value)
    with pytest.raises(TypeError, match=r"\bresidual\b"):
        _call(name, x, r.tolist(), None, None, None)
    with pytest.raises(TypeError, match=r"\bresidual\b"):
        _call(name, x, None, None, None, None)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("dtype", [np.float64, np.float16, np.int32])
def test_bad_out_dtype(name, dtype):
    x, r = _good(name)
    out = np.zeros(x.shape, dtype)
    with pytest.raises(TypeError, match=r"\bout\b") as ei:
        _call(name, x, r, None, None, None, out=out)
    assert np.dtype(dtype).name in str(ei.value)
    assert np.all(out == 0)
    with pytest.raises(TypeError, match=r"\bout\b"):
        _call(name, x, r, None, None, None, out=x.tolist())


@pytest.mark.parametrize("name", ADD)
def test_bad_sum_out(name):
    x, r = _good(name)
    with pytest.raises(TypeError, match=r"\bsum_out\b"):
        _call(name, x, r, None, None, None, sum_out=np.zeros(x.shape, F64))
    with pytest.raises(TypeError, match=r"\bsum_out\b"):
        _call(name, x, r, None, None, None, sum_out=x.tolist())
    with pytest.raises(ValueError, match=r"\bsum_out\b"):
        _call(name, x, r, None, None, None, sum_out=np.zeros((3, 9), F32))
    ro = np.zeros(x.shape, F32)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match=r"\bsum_out\b"):
        _call(name, x, r, None, None, None, sum_out=ro)


@pytest.mark.parametrize("name", ALL)
def test_bad_weight_bias_shape(name):
    x, r = _good(name, d=8)
    for bad in (np.ones(7, F32), np.ones(9, F32), np.ones((2, 8), F32), np.ones((3, 8), F32)):
        with pytest.raises(ValueError, match=r"\bweight\b"):
            _call(name, x, r, bad, None, None)
        if "layer" in name:
            with pytest.raises(ValueError, match=r"\bbias\b"):
                _call(name, x, r, None, bad, None)
        if name in ADD:
            with pytest.raises(ValueError, match=r"\bx_bias\b"):
                _call(name, x, r, None, None, bad)


@pytest.mark.parametrize("name", ALL)
def test_float32_parameters_accepted(h, name):
    # float32 weight/bias/x_bias arrays are the normal case; also non-contiguous
    x, r = _good(name, d=6)
    x = x + np.arange(6, dtype=F32)
    w = np.linspace(0.5, 2, 6).astype(F32)
    b = np.linspace(-1, 1, 6).astype(F32)
    xb = np.linspace(0, 1, 6).astype(F32)
    xb_ = xb if name in ADD else None
    h.assert_close(_call(name, x, r, w, b, xb_), _ref(h, name, x, r, w, b, xb_))


@pytest.mark.parametrize("name", ADD)
def test_shape_mismatch_x_residual(name):
    x, r = _good(name, d=8)
    for bad in (np.zeros((3, 9), F32), np.zeros((4, 8), F32), np.zeros((1, 8), F32),
                np.zeros((8,), F32), np.zeros((1, 3, 8), F32)):
        with pytest.raises(ValueError, match=r"\bresidual\b|\bx\b"):
            _call(name, x, bad, None, None, None)


@pytest.mark.parametrize("name", ALL)
def test_bad_out_shape_and_read_only(name):
    x, r = _good(name)
    for bad in (np.zeros((3, 9), F32), np.zeros((4, 8), F32), np.zeros((24,), F32),
                np.zeros((1, 3, 8), F32)):
        with pytest.raises(ValueError, match=r"\bout\b"):
            _call(name, x, r, None, None, None, out=bad)
    ro = np.zeros(x.shape, F32)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match=r"\bout\b"):
        _call(name, x, r, None, None, None, out=ro)
    with pytest.raises(ValueError, match=r"\bout\b"):
        _call(name, x, r, None, None, None, out=np.broadcast_to(np.zeros(8, F32), x.shape))
    # read-only x as its own out
    xr = x.copy()
    xr.flags.writeable = False
    with pytest.raises(ValueError, match=r"\bout\b"):
        _call(name, xr, r, None, None, None, out=xr)


@pytest.mark.parametrize("name", ALL)
def test_zero_length_axis_and_0d(name):
    for shape in [(3, 0), (0,), (2, 3, 0)]:
        x = np.zeros(shape, F32)
        with pytest.raises(ValueError, match=X_RE):
            _call(name, x, x.copy(), None, None, None)
    x = np.array(1.0, F32)
    with pytest.raises(ValueError, match=X_RE):
        _call(name, x, x.copy(), None, None, None)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("eps", [-1e-5, -1.0, float("nan"), float("inf"), -float("inf")])
def test_bad_eps(name, eps):
    x, r = _good(name)
    with pytest.raises(ValueError, match=r"\beps\b"):
        _call(name, x, r, None, None, None, eps=eps)


@pytest.mark.parametrize("name", ALL)
def test_eps_not_a_number(name):
    x, r = _good(name)
    for bad in ("abc", None, [1e-5]):
        with pytest.raises(TypeError, match=r"\beps\b"):
            _call(name, x, r, None, None, None, eps=bad)


def test_unknown_convention():
    x, _ = _good("layer_norm")
    for conv in ("foo", "Standard ", "", "torch"):
        with pytest.raises(ValueError, match="convention"):
            normcy.layer_norm(x, convention=conv)
    with pytest.raises((TypeError, ValueError), match="convention"):
        normcy.layer_norm(x, convention=None)


@pytest.mark.parametrize("name", ALL)
def test_bad_num_threads(name):
    x, r = _good(name)
    for bad in (0, -1):
        with pytest.raises(ValueError, match="num_threads"):
            _call(name, x, r, None, None, None, num_threads=bad)
    for bad in ("2", 2.0):
        with pytest.raises(TypeError, match="num_threads"):
            _call(name, x, r, None, None, None, num_threads=bad)


# ----------------------------------------------------------------- overlap rejection
@pytest.mark.parametrize("name", ALL)
def test_partial_overlap_out_x_rejected(name):
    buf = np.arange(10 * 8, dtype=F32).reshape(10, 8) / 7
    r = np.ones((9, 8), F32)
    x, out = buf[:-1], buf[1:]
    before = buf.copy()
    with pytest.raises(ValueError, match=r"overlap|\bout\b"):
        _call(name, x, r, None, None, None, out=out)
    np.testing.assert_array_equal(buf, before)
    # the other direction, and a one-element shift inside rows
    with pytest.raises(ValueError, match=r"overlap|\bout\b"):
        _call(name, buf[1:], r, None, None, None, out=buf[:-1])
    flat = np.arange(9 * 8 + 1, dtype=F32)
    with pytest.raises(ValueError, match=r"overlap|\bout\b"):
        _call(name, flat[:-1].reshape(9, 8), r, None, None, None,
              out=flat[1:].reshape(9, 8))


@pytest.mark.parametrize("name", ADD)
def test_partial_overlap_add_rejected(name):
    buf = np.arange(10 * 8, dtype=F32).reshape(10, 8) / 7
    other = np.ones((9, 8), F32)
    before = buf.copy()
    # out vs residual
    with pytest.raises(ValueError, match=r"overlap|\bout\b"):
        _call(name, other, buf[:-1], None, None, None, out=buf[1:])
    # sum_out vs x, sum_out vs residual
    with pytest.raises(ValueError, match=r"overlap|\bsum_out\b"):
        _call(name, buf[:-1], other, None, None, None, sum_out=buf[1:])
    with pytest.raises(ValueError, match=r"overlap|\bsum_out\b"):
        _call(name, other, buf[1:], None, None, None, sum_out=buf[:-1])
    np.testing.assert_array_equal(buf, before)


@pytest.mark.parametrize("name", ADD)
def test_partial_overlap_between_outputs_rejected(name):
    # out and sum_out partially overlapping: the result would depend on write order
    # (and thus on the thread count).  It must be rejected.
    buf = np.zeros((10, 8), F32)
    x = np.random.default_rng(0).standard_normal((9, 8)).astype(F32)
    r = np.ones((9, 8), F32)
    with pytest.raises(ValueError, match=r"overlap|\bout\b|\bsum_out\b"):
        _call(name, x, r, None, None, None, out=buf[1:], sum_out=buf[:-1])


@pytest.mark.parametrize("name", ALL)
def test_out_overlapping_parameters_rejected_or_correct(h, name):
    # out covering the weight/bias/x_bias storage: an input changes while it is read
    d = 8
    rng = h.rng_for("ovp", name)
    x = h.randn(rng, (4, d))
    r = h.randn(rng, (4, d))
    for target in ("weight", "bias", "x_bias"):
        if target == "bias" and "rms" in name:
            continue
        if target == "x_bias" and name not in ADD:
            continue
        buf = np.empty((4, d), F32)
        vec = (1.0 + 0.1 * rng.standard_normal(d)).astype(F32)
        buf[2] = vec
        w = b = xb = None
        if target == "weight":
            w = buf[2]
        elif target == "bias":
            b = buf[2]
        else:
            xb = buf[2]
        expected = _ref(h, name, x, r, None if w is None else vec,
                        None if b is None else vec, None if xb is None else vec)
        try:
            _call(name, x, r, w, b, xb, out=buf)
        except ValueError as e:
            assert "overlap" in str(e) or target in str(e) or "out" in str(e)
        else:
            h.assert_close(buf, expected)


@pytest.mark.parametrize("name", ALL)
def test_interleaved_or_reversed_views_of_x(h, name):
    """Views of x's own buffer that are not x itself: either rejected with a
    ValueError or computed correctly (as if inputs were read first)."""
    rng = h.rng_for("interleave", name)
    r = h.randn(rng, (6, 10))
    cases = []
    base = h.randn(rng, (6, 20))
    cases.append((base[:, ::2], base[:, 1::2], base))          # disjoint, interleaved
    base = h.randn(rng, (6, 10))
    cases.append((base, base[::-1], base))                     # same memory, rows reversed
    base = h.randn(rng, (6, 10))
    cases.append((base, base[:, ::-1], base))                  # same memory, cols reversed
    base = h.randn(rng, (10, 10))
    cases.append((base, base.T, base))                         # transposed onto itself
    for x, out, b in cases:
        x0 = np.array(x)
        rr = r if x.shape == r.shape else h.randn(rng, x.shape)
        expected = _ref(h, name, x0, rr, None, None, None)
        try:
            res = _call(name, x, rr, None, None, None, out=out)
        except ValueError as e:
            assert "overlap" in str(e) or "out" in str(e)
        else:
            assert res is out
            h.assert_close(out, expected)


@pytest.mark.parametrize("kind", ["layer_norm", "annotated", "add_layer_norm", "rms_norm",
                                  "add_rms_norm", "batch_norm_nhwc", "batch_norm_nchw"])
@pytest.mark.parametrize("n", [83, 96])
def test_row_result_independent_of_output_alignment(kind, n):
    # The apply loops peel scalar elements until the output reaches a vector boundary, so
    # an element goes through the scalar code or the vector code depending on where the
    # output starts.  Both must round identically (the fused multiply-adds are explicit,
    # nc_simd.h's ncv_fma / nc_fmaf, and the build disables the compiler's own contraction),
    # else a row's result would depend on its position in a batch.  Rows go two at a time
    # through one loop when both outputs are equally misaligned (n = 96), one at a time
    # otherwise (n = 83); five rows: two pairs and a lone row.
    rng = np.random.default_rng(11)
    x = (rng.standard_normal((5, n)) * 3 + 1).astype(np.float32)
    r = rng.standard_normal((5, n)).astype(np.float32)
    w = rng.standard_normal(n).astype(np.float32)
    b = rng.standard_normal(n).astype(np.float32)
    c = 5
    xc = (rng.standard_normal((2, c, 3, n))).astype(np.float32)
    m, v = rng.standard_normal(c).astype(np.float32), (rng.random(c) + 0.5).astype(np.float32)
    wc, bc = rng.standard_normal(c).astype(np.float32), rng.standard_normal(c).astype(np.float32)

    def run(out):
        if kind == "layer_norm":
            return normcy.layer_norm(x, w, b, out=out)
        if kind == "annotated":
            return normcy.layer_norm(x, w, b, out=out, convention="annotated")
        if kind == "add_layer_norm":
            return normcy.add_layer_norm(x, r, w, b, out=out)
        if kind == "rms_norm":
            return normcy.rms_norm(x, w, out=out)
        if kind == "add_rms_norm":
            return normcy.add_rms_norm(x, r, w, out=out)
        if kind == "batch_norm_nhwc":   # channels last: per-element scale and shift
            return normcy.batch_norm(x, np.zeros(n, np.float32), np.ones(n, np.float32), w, b,
                                     axis=-1, out=out)
        return normcy.batch_norm(xc, m, v, wc, bc, out=out)   # one scale/shift per plane

    shape = x.shape if kind != "batch_norm_nchw" else xc.shape
    ref = None
    for off in range(16):
        buf = np.full(int(np.prod(shape)) + 16, np.nan, np.float32)
        out = buf[off:off + int(np.prod(shape))].reshape(shape)
        got = run(out)
        assert got is out or np.shares_memory(got, out)
        if ref is None:
            ref = out.copy()
        else:
            assert np.array_equal(out.view(np.int32), ref.view(np.int32)), off
