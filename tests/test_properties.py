"""Property-based tests (hypothesis): random shapes, memory layouts (sliced, strided,
transposed, negative strides, misaligned-by-one-element offsets), aliasing, thread counts.

Every example is checked against the float64 reference, and re-run serially to check the
bit-for-bit thread-count invariance on the very same layout.
"""
import contextlib

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import normcy

F32 = np.float32
F64 = np.float64

SETTINGS = settings(max_examples=100, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

LAYOUTS = ["c", "offset", "rows2", "cols2", "negcols2", "pad", "fortran", "swap", "neg"]
widths = st.one_of(st.integers(1, 40),
                   st.sampled_from([63, 64, 65, 127, 128, 129, 255, 256, 257, 383, 384, 385]))


@st.composite
def row_shapes(draw, max_lead_nd=3):
    nlead = draw(st.integers(0, max_lead_nd))
    lead = draw(st.lists(st.integers(0, 5), min_size=nlead, max_size=nlead))
    # keep the element count modest
    d = draw(widths)
    return tuple(lead) + (d,)


def _values(draw, label):
    """A deterministic fill function: calling make_view twice gives identical arrays."""
    seed = draw(st.integers(0, 2 ** 32 - 1), label=label + "_seed")
    scale = draw(st.sampled_from([1e-2, 1.0, 30.0]), label=label + "_scale")
    loc = draw(st.sampled_from([0.0, 1.0, -20.0]), label=label + "_loc")
    return lambda n: np.random.default_rng(seed).standard_normal(n) * scale + loc


def _param(draw, rng, d, label, lo=0.5, hi=1.5):
    kind = draw(st.sampled_from(["none", "c", "neg", "list64"]), label=label)
    if kind == "none":
        return None, None
    v = rng.uniform(lo, hi, d).astype(F32)
    if kind == "c":
        return v, v
    if kind == "neg":
        base = np.empty(2 * d, F32)
        base[::-2] = v
        return base[::-2], v
    return [float(t) for t in v], v  # array-like parameters are accepted (small, converted)


def _threads(draw):
    """(num_threads, mode): mode forces the parallel and/or the large-output code paths
    on small inputs (through private threshold hooks)."""
    return (draw(st.sampled_from([None, 1, 2, 3]), label="num_threads"),
            draw(st.sampled_from(["default", "parallel", "stream", "parallel+stream"]),
                 label="mode"))


def _call_with_threads(h, fn, nt, mode):
    with contextlib.ExitStack() as stack:
        if "parallel" in mode:
            stack.enter_context(h.forced_parallel())
        if "stream" in mode:
            stack.enter_context(h.forced_streaming())
        return fn(nt)


# =========================================================================== layer_norm / rms
def _row_norm_case(h, draw, fn):
    shape = draw(row_shapes())
    d = shape[-1]
    rng = np.random.default_rng(draw(st.integers(0, 1000)))
    w, w_ref = _param(draw, rng, d, "weight")
    if fn == "layer_norm":
        convention = draw(st.sampled_from(["standard", "annotated"]) if d >= 2
                          else st.just("standard"))
        eps = draw(st.sampled_from([1e-5, 1e-2, 1.0]))
        b, b_ref = _param(draw, rng, d, "bias", -1.0, 1.0)
    else:
        eps = draw(st.sampled_from([1e-6, 1e-3, 0.5]))
    xl = draw(st.sampled_from(LAYOUTS), label="x_layout")
    ol = draw(st.sampled_from(LAYOUTS), label="out_layout")
    fill = _values(draw, "x")
    out_kind = draw(st.sampled_from(["none", "new", "in_place"]))

    def run(nt):
        x, _, _ = h.make_view(shape, xl, fill)
        obase = ocov = None
        if out_kind == "none":
            out = None
        elif out_kind == "new":
            out, obase, ocov = h.make_view(shape, ol, h.SENTINEL)
        else:
            out = x
        x0 = x.copy()
        if fn == "layer_norm":
            y = normcy.layer_norm(x, w, b, eps, out=out, convention=convention,
                                  num_threads=nt)
        else:
            y = normcy.rms_norm(x, w, eps, out=out, num_threads=nt)
        if out is not None:
            assert y is out
        if out_kind != "in_place":
            np.testing.assert_array_equal(x, x0)
        if obase is not None:
            h.assert_untouched(obase, ocov)
        return x0, y

    nt, mode = _threads(draw)
    x0, y = _call_with_threads(h, run, nt, mode)
    if fn == "layer_norm":
        expected = h.ref_layer_norm(x0, w_ref, b_ref, eps, convention)
    else:
        expected = h.ref_rms_norm(x0, w_ref, eps)
    h.assert_close(y, expected)
    # the very same call configuration on one thread: identical bits
    _, y1 = run(1)
    assert np.array_equal(y, y1)


@SETTINGS
@given(data=st.data())
def test_layer_norm_property(h, data):
    _row_norm_case(h, data.draw, "layer_norm")


@SETTINGS
@given(data=st.data())
def test_rms_norm_property(h, data):
    _row_norm_case(h, data.draw, "rms_norm")


# =========================================================================== fused add
@SETTINGS
@given(data=st.data())
@pytest.mark.parametrize("fn", ["add_layer_norm", "add_rms_norm"])
def test_add_norm_property(h, fn, data):
    draw = data.draw
    shape = draw(row_shapes())
    d = shape[-1]
    xl = draw(st.sampled_from(LAYOUTS), label="x_layout")
    rl = draw(st.sampled_from(LAYOUTS), label="r_layout")
    xfill, rfill = _values(draw, "x"), _values(draw, "r")
    rng = np.random.default_rng(draw(st.integers(0, 1000)))
    w, w_ref = _param(draw, rng, d, "weight")
    b, b_ref = _param(draw, rng, d, "bias", -1.0, 1.0)
    xb, xb_ref = _param(draw, rng, d, "x_bias", -2.0, 2.0)
    kinds = ["none", "new", "x", "residual"]
    out_kind = draw(st.sampled_from(kinds), label="out")
    sum_kind = draw(st.sampled_from(kinds), label="sum_out")
    assume(not (out_kind in ("x", "residual") and out_kind == sum_kind))
    ol = draw(st.sampled_from(LAYOUTS), label="out_layout")
    sl = draw(st.sampled_from(LAYOUTS), label="sum_layout")

    def run(nt):
        x, _, _ = h.make_view(shape, xl, xfill)
        r, _, _ = h.make_view(shape, rl, rfill)
        x0, r0 = x.copy(), r.copy()

        def target(kind, layout):
            if kind == "none":
                return None, None, None
            if kind == "x":
                return x, None, None
            if kind == "residual":
                return r, None, None
            return h.make_view(shape, layout, h.SENTINEL)

        out, obase, ocov = target(out_kind, ol)
        so, sbase, scov = target(sum_kind, sl)
        if fn == "add_layer_norm":
            y = normcy.add_layer_norm(x, r, w, b, x_bias=xb, out=out, sum_out=so,
                                      num_threads=nt)
        else:
            y = normcy.add_rms_norm(x, r, w, x_bias=xb, out=out, sum_out=so, num_threads=nt)
        if out is not None:
            assert y is out
        for base, cov in ((obase, ocov), (sbase, scov)):
            if base is not None:
                h.assert_untouched(base, cov)
        if out_kind != "x" and sum_kind != "x":
            np.testing.assert_array_equal(x, x0)
        if out_kind != "residual" and sum_kind != "residual":
            np.testing.assert_array_equal(r, r0)
        return x0, r0, y, so

    nt, mode = _threads(draw)
    x0, r0, y, so = _call_with_threads(h, run, nt, mode)
    s = h.ref_sum(x0, r0, xb_ref)
    if fn == "add_layer_norm":
        expected = h.ref_layer_norm(s, w_ref, b_ref, 1e-5)
    else:
        expected = h.ref_rms_norm(s, w_ref, 1e-6)
    h.assert_close(y, expected)
    if so is not None:
        if xb is None:
            assert np.array_equal(so, np.add(x0, r0))
        else:
            bound = 2.0 * np.spacing((np.abs(x0) + np.abs(xb_ref) + np.abs(r0)).astype(F32))
            exact = x0.astype(F64) + xb_ref.astype(F64) + r0.astype(F64)
            assert np.all(np.abs(so.astype(F64) - exact) <= bound)
    # same configuration, one thread: identical bits (output and sum_out)
    _, _, y1, so1 = run(1)
    assert np.array_equal(y, y1)
    if so is not None:
        assert np.array_equal(so, so1)


# =========================================================================== batch_norm
@SETTINGS
@given(data=st.data())
def test_batch_norm_property(h, data):
    draw = data.draw
    nd = draw(st.integers(1, 5))
    shape = tuple(draw(st.lists(st.integers(1, 6), min_size=nd, max_size=nd)))
    axis = draw(st.integers(-nd, nd - 1))
    if nd >= 2 and draw(st.booleans()):
        # sometimes zero-size along a non-channel axis (an empty batch)
        zero = draw(st.sampled_from([k for k in range(nd) if k != axis % nd]))
        shape = shape[:zero] + (0,) + shape[zero + 1:]
    c = shape[axis]
    x, _, _ = h.make_view(shape, draw(st.sampled_from(LAYOUTS)), _values(draw, "x"))
    rng = np.random.default_rng(draw(st.integers(0, 1000)))
    m = rng.standard_normal(c).astype(F32)
    v = rng.uniform(0.1, 4.0, c).astype(F32)
    w, w_ref = _param(draw, rng, c, "weight")
    b, b_ref = _param(draw, rng, c, "bias", -1.0, 1.0)
    eps = draw(st.sampled_from([0.0, 1e-5, 0.1]))
    out_kind = draw(st.sampled_from(["none", "new", "in_place"]))
    x0 = x.copy()
    out, obase, ocov = (h.make_view(shape, draw(st.sampled_from(LAYOUTS)), h.SENTINEL)
                        if out_kind == "new" else (x if out_kind == "in_place" else None,
                                                   None, None))
    nt, mode = _threads(draw)
    serial = normcy.batch_norm(x0, m, v, w, b, eps, axis=axis, num_threads=1)
    y = _call_with_threads(
        h, lambda n: normcy.batch_norm(x, m, v, w, b, eps, axis=axis, out=out, num_threads=n),
        nt, mode)
    if out is not None:
        assert y is out
    h.assert_close(y, h.ref_batch_norm(x0, m, v, w_ref, b_ref, eps, axis))
    if obase is not None:
        h.assert_untouched(obase, ocov)
    # BatchNorm is elementwise: identical bits whatever the layout or thread count
    assert np.array_equal(y, serial)


# =========================================================================== aliasing
@SETTINGS
@given(n=st.integers(1, 6), d=st.integers(1, 40), a=st.integers(0, 30), b=st.integers(0, 30),
       fn=st.sampled_from(["layer_norm", "rms_norm", "add_layer_norm", "add_rms_norm",
                           "batch_norm"]),
       which=st.sampled_from(["out", "sum_out"]))
def test_flat_buffer_overlap_property(h, n, d, a, b, fn, which):
    """x and an output are windows of one flat buffer: identical -> in place; disjoint ->
    ordinary; any other overlap -> ValueError and nothing written."""
    if which == "sum_out" and not fn.startswith("add"):
        which = "out"
    size = n * d
    flat = np.random.default_rng(a * 131 + b).standard_normal(size + 31).astype(F32)
    x = flat[a:a + size].reshape(n, d)
    o = flat[b:b + size].reshape(n, d)
    x0 = x.copy()
    r = np.full((n, d), 0.5, F32)
    m = np.zeros(d, F32)
    v = np.ones(d, F32)

    def call():
        kw = {which: o}
        if fn == "layer_norm":
            return normcy.layer_norm(x, **kw)
        if fn == "rms_norm":
            return normcy.rms_norm(x, **kw)
        if fn == "add_layer_norm":
            return normcy.add_layer_norm(x, r, **kw)
        if fn == "add_rms_norm":
            return normcy.add_rms_norm(x, r, **kw)
        return normcy.batch_norm(x, m, v, axis=-1, **kw)

    partial = a != b and abs(a - b) < size
    if partial:
        before = flat.copy()
        with pytest.raises(ValueError, match="overlap|out"):
            call()
        np.testing.assert_array_equal(flat, before)
        return
    y = call()
    if fn == "layer_norm":
        exp = h.ref_layer_norm(x0)
    elif fn == "rms_norm":
        exp = h.ref_rms_norm(x0)
    elif fn == "batch_norm":
        exp = h.ref_batch_norm(x0, m, v, axis=-1)
    else:
        s = h.ref_sum(x0, r)
        exp = h.ref_layer_norm(s) if fn == "add_layer_norm" else h.ref_rms_norm(s)
    if which == "out":
        assert y is o
        h.assert_close(o, exp)
    else:
        h.assert_close(y, exp)
        assert np.array_equal(o, np.add(x0, r))


@SETTINGS
@given(data=st.data())
def test_nan_row_isolation_property(h, data):
    draw = data.draw
    shape = draw(row_shapes(max_lead_nd=2))
    assume(int(np.prod(shape[:-1])) >= 2)
    fn = draw(st.sampled_from(["layer_norm", "rms_norm", "add_layer_norm", "add_rms_norm"]))
    x, _, _ = h.make_view(shape, draw(st.sampled_from(LAYOUTS)), _values(draw, "x"))
    r = np.ones(shape, F32)
    rows = x.reshape(-1, shape[-1]) if x.flags.c_contiguous else None
    bad_row = draw(st.integers(0, int(np.prod(shape[:-1])) - 1))
    col = draw(st.integers(0, shape[-1] - 1))
    val = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
    nt, mode = _threads(draw)

    def call(arr, n):
        if fn == "layer_norm":
            return normcy.layer_norm(arr, num_threads=n)
        if fn == "rms_norm":
            return normcy.rms_norm(arr, num_threads=n)
        if fn == "add_layer_norm":
            return normcy.add_layer_norm(arr, r, num_threads=n)
        return normcy.add_rms_norm(arr, r, num_threads=n)

    clean = call(x, 1)
    idx = np.unravel_index(bad_row, shape[:-1]) + (col,)
    xd = x.copy() if rows is None else x  # keep the layout when we can
    saved = xd[idx]
    xd[idx] = val
    dirty = _call_with_threads(h, lambda n: call(xd, n), nt, mode)
    xd[idx] = saved
    keep = np.ones(shape[:-1], bool)
    keep[idx[:-1]] = False
    assert np.array_equal(dirty[keep], clean[keep])
