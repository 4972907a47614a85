"""The streaming-store path (outputs far larger than cache) gives bit-identical results."""
import numpy as np
import pytest

import normcy
from normcy import _norms

from conftest import call_norm

F32 = np.float32


@pytest.fixture
def streaming_always():
    old = _norms._set_streaming_threshold(0)
    try:
        yield
    finally:
        _norms._set_streaming_threshold(old)


@pytest.mark.parametrize("name", ["layer_norm", "annotated", "rms_norm", "add_layer_norm",
                                  "add_rms_norm"])
@pytest.mark.parametrize("shape", [(37, 64), (5, 1000), (3, 2500), (2, 3, 4099)])
@pytest.mark.parametrize("alias", [None, "out_is_x", "sum_out_is_residual"])
def test_streaming_matches_cached_path(name, shape, alias, streaming_always):
    rng = np.random.default_rng(hash((name, shape, alias)) % 2**32)
    x = rng.standard_normal(shape).astype(F32)
    r = rng.standard_normal(shape).astype(F32)
    d = shape[-1]
    w = rng.standard_normal(d).astype(F32)
    b = rng.standard_normal(d).astype(F32)
    xb = rng.standard_normal(d).astype(F32)
    is_add = name.startswith("add")
    results = []
    for threshold in (1 << 62, 0):   # cached path, then streaming path
        _norms._set_streaming_threshold(threshold)
        xx, rr = x.copy(), r.copy()
        out = xx if alias == "out_is_x" else np.full(shape, np.nan, F32)
        so = None
        if is_add:
            so = rr if alias == "sum_out_is_residual" else np.full(shape, np.nan, F32)
        y = call_norm(name, xx, rr if is_add else None, w, b, xb if is_add else None, out, so, 2)
        results.append((y.copy(), None if so is None else so.copy()))
    (y0, s0), (y1, s1) = results
    assert np.all(np.isfinite(y0))
    np.testing.assert_array_equal(y1, y0)
    if s0 is not None:
        np.testing.assert_array_equal(s1, s0)
        if alias != "sum_out_is_residual":
            np.testing.assert_array_equal(s0, x + xb + r)


def _offset_view(rows, n, offset, row_pad, fill):
    """A (rows, n) float32 view `offset` floats past a 64-byte boundary of a larger buffer,
    its rows `n + row_pad` floats apart; the buffer elsewhere holds `fill`."""
    ld = n + row_pad
    buf = np.full(rows * ld + 64, fill, F32)
    base = (-(buf.ctypes.data // 4)) % 16 + offset
    return buf, buf[base:base + rows * ld].reshape(rows, ld)[:, :n]


@pytest.mark.parametrize("name", ["add_layer_norm", "add_rms_norm", "layer_norm"])
@pytest.mark.parametrize("n", [64, 100, 1000, 1024, 2100])
@pytest.mark.parametrize("offset", [0, 1, 4, 15])
@pytest.mark.parametrize("row_pad", [0, 3, 16])
@pytest.mark.parametrize("nt", [1, 2, 3])
def test_streamed_rows_at_any_alignment(name, n, offset, row_pad, nt, streaming_always):
    """Streamed rows at every alignment and row spacing: the partial line that consecutive
    rows share is written once, complete, and nothing outside the outputs is touched."""
    rows = 7
    rng = np.random.default_rng(hash((name, n, offset, row_pad, nt)) % 2**32)
    x = rng.standard_normal((rows, n)).astype(F32)
    r = rng.standard_normal((rows, n)).astype(F32)
    w = rng.standard_normal(n).astype(F32)
    b = rng.standard_normal(n).astype(F32)
    is_add = name.startswith("add")
    ybuf, y = _offset_view(rows, n, offset, row_pad, -7.0)
    sbuf, so = _offset_view(rows, n, (offset + 5) % 16, row_pad, -9.0) if is_add else (None, None)
    call_norm(name, x, r if is_add else None, w, b, None, y, so, nt)
    _norms._set_streaming_threshold(1 << 62)
    y_ref = call_norm(name, x, r if is_add else None, w, b, None, None,
                  np.empty_like(x) if is_add else None, 1)
    np.testing.assert_array_equal(y, y_ref)
    assert np.all(_outside(ybuf, y) == -7.0)
    if is_add:
        np.testing.assert_array_equal(so, x + r)
        assert np.all(_outside(sbuf, so) == -9.0)


def _outside(buf, view):
    """The elements of `buf` that are not in the 2-D `view` of it."""
    mask = np.ones(buf.shape, bool)
    first = (view.__array_interface__["data"][0] - buf.ctypes.data) // 4
    rows, n = view.shape
    mask[first + np.add.outer(np.arange(rows) * (view.strides[0] // 4), np.arange(n))] = False
    return buf[mask]


def test_streaming_threshold_is_the_last_level_cache():
    """Calls touching an eighth more bytes than the last-level cache (lscpu's figure)
    stream; the threshold and the cache it came from are reported by show_config."""
    import glob
    import io

    info = _norms.streaming_info()
    sizes = []
    for d in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*/size"):
        txt = open(d).read().strip()
        sizes.append(int(txt[:-1]) * {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}[txt[-1]]
                     if txt[-1] in "KMG" else int(txt))
    expected = max(sizes) if sizes and max(sizes) >= 1 << 20 else 32 << 20
    assert info == {"min_bytes": expected + expected // 8, "llc_bytes": expected}
    buf = io.StringIO()
    normcy.show_config(file=buf)
    assert ("streamed outputs: calls touching >= %.3g MB (last-level cache %.3g MB)"
            % (info["min_bytes"] / 2**20, expected / 2**20)) in buf.getvalue()


@pytest.mark.parametrize("name", ["add_layer_norm", "add_rms_norm", "layer_norm", "rms_norm"])
@pytest.mark.parametrize("offset", [0, 4])
@pytest.mark.parametrize("n", [64, 300, 1024, 1025, 2100, 3072])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("nt", [1, 2])
def test_pipelined_rows_of_every_kind(name, offset, n, with_bias, nt, streaming_always):
    """The streamed norm pipeline (each row's moments computed while the previous row's
    outputs stream out; rows over 1024 floats chunk by chunk) gives the cached path's bits
    for rows of every kind, in any order: ordinary rows, rows whose mean dwarfs their spread
    (the two-pass moments), rows near float32's limits (the double-precision apply), tiny
    rows, a NaN row, and (long rows) a row whose later chunks sit far from its first values
    (their own two-pass moments, merged).  The plain norms get the sums
    s = (x + x_bias) + r as their input."""
    rng = np.random.default_rng(n * 10 + offset + with_bias + 7 * len(name))
    kinds = [lambda: rng.standard_normal(n),
             lambda: 1e4 + 1e-2 * rng.standard_normal(n),
             lambda: 1e37 * rng.standard_normal(n),
             lambda: np.full(n, 3.25),     # (plus r: not constant)
             lambda: np.zeros(n),
             lambda: 1e-41 * rng.standard_normal(n),
             lambda: np.where(np.arange(n) == 5, np.nan, rng.standard_normal(n)),
             lambda: np.where(np.arange(n) < 1000, rng.standard_normal(n),
                              1e4 + 1e-2 * rng.standard_normal(n))]
    order = [0, 1, 0, 2, 2, 0, 3, 4, 0, 5, 1, 6, 0, 2, 1, 0, 7, 7, 0]
    x = np.stack([kinds[k]() for k in order]).astype(F32)
    r = (0.5 * rng.standard_normal(x.shape)).astype(F32)
    r[order.index(2)] = 0.0          # keep the huge rows finite after the add
    w = rng.standard_normal(n).astype(F32)
    b = rng.standard_normal(n).astype(F32)
    xb = rng.standard_normal(n).astype(F32) if with_bias else None
    rows = len(order)
    outs = []
    for threshold in (1 << 62, 0):
        _norms._set_streaming_threshold(threshold)
        _, y = _offset_view(rows, n, offset, 0, -7.0)
        _, so = _offset_view(rows, n, offset, 0, -9.0)
        with np.errstate(all="ignore"):
            if name == "add_layer_norm":
                normcy.add_layer_norm(x, r, w, b, x_bias=xb, eps=0.0, out=y, sum_out=so,
                                      num_threads=nt)
            elif name == "add_rms_norm":
                normcy.add_rms_norm(x, r, w, x_bias=xb, eps=0.0, out=y, sum_out=so,
                                    num_threads=nt)
            else:
                so[...] = (x + xb) + r if with_bias else x + r
                if name == "layer_norm":
                    normcy.layer_norm(so, w, b, eps=0.0, out=y, num_threads=nt)
                else:
                    normcy.rms_norm(so, w, eps=0.0, out=y, num_threads=nt)
        outs.append((y.copy(), so.copy()))
    (y0, s0), (y1, s1) = outs
    np.testing.assert_array_equal(y1, y0)
    np.testing.assert_array_equal(s1, s0)
    ok = np.isfinite(y0).all(axis=1)
    np.testing.assert_array_equal(ok, np.array(order) != 6)   # only the NaN row is NaN
    assert np.isnan(y0[order.index(6)]).all()
    s64 = s0[ok].astype(np.float64)
    if name.endswith("layer_norm"):
        mu = s64.mean(-1, keepdims=True)
        ref = (s64 - mu) / np.sqrt(((s64 - mu) ** 2).mean(-1, keepdims=True)) * w + b
    else:
        ref = s64 / np.sqrt((s64 ** 2).mean(-1, keepdims=True)) * w
    np.testing.assert_allclose(y0[ok], ref, rtol=1e-4, atol=2e-4)


@pytest.mark.parametrize("layout", ["NCHW", "NHWC", "NC", "NCL"])
@pytest.mark.parametrize("c", [1, 3, 16, 37, 64])
@pytest.mark.parametrize("offset", [0, 5])
@pytest.mark.parametrize("centred", [False, True])
@pytest.mark.parametrize("in_place", [False, True])
def test_batch_norm_streamed_matches_cached(layout, c, offset, centred, in_place,
                                            streaming_always):
    """BatchNorm's streamed outputs (planes, or channels-last rows cut into lines wherever
    they fall) have the cached path's bits at every alignment, also in place, and nothing
    outside the output is written."""
    rng = np.random.default_rng(hash((layout, c, offset, centred, in_place)) % 2**32)
    shape = {"NCHW": (3, c, 5, 7), "NHWC": (3, 5, 7, c), "NC": (29, c), "NCL": (4, c, 23)}[layout]
    axis = -1 if layout == "NHWC" else 1
    n = int(np.prod(shape))
    buf = np.full(n + 64, -7.0, F32)
    base = (-(buf.ctypes.data // 4)) % 16 + offset
    x = rng.standard_normal(shape).astype(F32) * 3
    mean = (rng.standard_normal(c) * (1e3 if centred else 0.1)).astype(F32)
    var = (rng.random(c) + 0.5).astype(F32)
    w = rng.standard_normal(c).astype(F32)
    b = rng.standard_normal(c).astype(F32)
    _norms._set_streaming_threshold(1 << 62)
    ref = normcy.batch_norm(x, mean, var, w, b, axis=axis)
    for nt in (1, 2, 3):
        _norms._set_streaming_threshold(0)
        buf[:] = -7.0
        y = buf[base:base + n].reshape(shape)
        if in_place:
            y[...] = x
            normcy.batch_norm(y, mean, var, w, b, axis=axis, out=y, num_threads=nt)
        else:
            normcy.batch_norm(x, mean, var, w, b, axis=axis, out=y, num_threads=nt)
        np.testing.assert_array_equal(y, ref)
        assert np.all(buf[:base] == -7.0) and np.all(buf[base + n:] == -7.0)
