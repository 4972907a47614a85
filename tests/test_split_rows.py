"""Long rows cut among threads by chunks (fewer rows than threads, or uneven row counts),
and BatchNorm's large planes cut into pieces.

A call whose rows are few and long (at least 65536 floats) gives each thread a share of the
rows' chunks: the chunk statistics in parallel, each row's merge in chunk order, then the
outputs in parallel.  These tests hold that path to the bits of the one-thread call (which
runs whole rows), for every norm kind, add/sum_out/in-place variant, the streamed and the
cached outputs, the exact-double fallback rows and NaN rows; and to float64 NumPy.
"""
import numpy as np
import pytest

import normcy

from conftest import (F32, assert_close, call_norm, forced_streaming, ref_layer_norm,
                      ref_rms_norm, rng_for)

KINDS = ["layer_norm", "annotated", "rms_norm", "add_layer_norm", "add_rms_norm"]


def _run(kind, x, r, w, b, xb, nt, alias=None, with_sum=True):
    """One call on copies of the inputs; returns (y, sum_out or None)."""
    is_add = kind.startswith("add")
    xx = x.copy()
    rr = r.copy() if is_add else None
    out = xx if alias == "out_is_x" else np.full(x.shape, np.nan, F32)
    so = None
    if is_add and with_sum:
        so = rr if alias == "sum_out_is_residual" else np.full(x.shape, np.nan, F32)
    y = call_norm(kind, xx, rr, w, b, xb if is_add else None, out, so, nt)
    assert y is out
    return y.copy(), None if so is None else so.copy()


def _inputs(kind, shape, scale=1.0, loc=0.0):
    rng = rng_for("split", kind, shape, scale, loc)
    n = shape[-1]
    x = (rng.standard_normal(shape) * scale + loc).astype(F32)
    r = (rng.standard_normal(shape) * scale).astype(F32)
    w = rng.standard_normal(n).astype(F32)
    b = rng.standard_normal(n).astype(F32)
    xb = rng.standard_normal(n).astype(F32)
    return x, r, w, b, xb


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", [(1, 65536), (1, 100003), (2, 70001), (3, 66000),
                                   (2, 1, 65537), (5, 65600)])
@pytest.mark.parametrize("stream", [False, True])
def test_split_rows_match_one_thread(kind, shape, stream):
    x, r, w, b, xb = _inputs(kind, shape)
    with forced_streaming(0 if stream else 1 << 62):
        y1, s1 = _run(kind, x, r, w, b, xb, 1)
        for nt in (2, 3, 4, 7):
            y, s = _run(kind, x, r, w, b, xb, nt)
            np.testing.assert_array_equal(y, y1, err_msg="num_threads=%d" % nt)
            if s1 is not None:
                np.testing.assert_array_equal(s, s1, err_msg="num_threads=%d" % nt)
    # and the values: float64 NumPy
    s64 = x.astype(np.float64)
    if kind.startswith("add"):
        s64 = s64 + xb + r
        np.testing.assert_array_equal(s1, (x + xb) + r)
    if kind in ("rms_norm", "add_rms_norm"):
        ref = ref_rms_norm(s64, w, eps=1e-6)
    else:
        ref = ref_layer_norm(s64, w, b, eps=1e-6 if kind == "annotated" else 1e-5,
                             convention="annotated" if kind == "annotated" else "standard")
    assert_close(y1, ref)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("alias", ["out_is_x", "sum_out_is_residual", "no_sum_out"])
@pytest.mark.parametrize("stream", [False, True])
def test_split_rows_in_place(kind, alias, stream):
    if alias != "out_is_x" and not kind.startswith("add"):
        pytest.skip("sum_out belongs to the fused add")
    shape = (3, 70000)
    x, r, w, b, xb = _inputs(kind, shape)
    with forced_streaming(0 if stream else 1 << 62):
        ref = _run(kind, x, r, w, b, xb, 1, alias=None, with_sum=alias != "no_sum_out")
        for nt in (2, 4):
            got = _run(kind, x, r, w, b, xb, nt, alias=alias, with_sum=alias != "no_sum_out")
            np.testing.assert_array_equal(got[0], ref[0])
            if got[1] is not None:
                np.testing.assert_array_equal(got[1], ref[1])


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("case", ["offset_mean", "huge", "tiny_eps0", "nan_late", "inf_first",
                                  "constant"])
def test_split_rows_extreme_values(kind, case):
    """Rows whose statistics take the robust or exact-double paths, and non-finite rows:
    the same bits at every thread count (a NaN in the second thread's chunks still makes
    its whole row NaN)."""
    shape = (2, 70000)
    loc, scale, eps = 0.0, 1.0, None
    if case == "offset_mean":
        loc = 3e4
    elif case == "huge":
        scale = 3e37
    elif case == "tiny_eps0":
        scale, eps = 1e-38, 0.0
    x, r, w, b, xb = _inputs(kind, shape, scale, loc)
    if kind.startswith("add") and case in ("huge", "tiny_eps0"):
        r *= 0
        xb *= 0
    if case == "nan_late":
        x[0, 69000] = np.nan
    elif case == "inf_first":
        x[1, 0] = np.inf
    elif case == "constant":
        x[:] = 7.25
        r[:] = 0
        xb[:] = 0

    def call(nt):
        xx = x.copy()
        if eps is None:
            return call_norm(kind, xx, r.copy(), w, b, xb, None, None, nt)
        if kind in ("rms_norm",):
            return normcy.rms_norm(xx, w, eps, num_threads=nt)
        if kind == "add_rms_norm":
            return normcy.add_rms_norm(xx, r.copy(), w, eps, x_bias=xb, num_threads=nt)
        if kind == "add_layer_norm":
            return normcy.add_layer_norm(xx, r.copy(), w, b, eps, x_bias=xb, num_threads=nt)
        return normcy.layer_norm(xx, w, b, eps, num_threads=nt,
                                 convention="annotated" if kind == "annotated" else "standard")

    y1 = call(1)
    for nt in (2, 3):
        np.testing.assert_array_equal(call(nt), y1, err_msg="num_threads=%d" % nt)
    if case == "nan_late":
        assert np.all(np.isnan(y1[0])) and np.all(np.isfinite(y1[1]))
    elif case in ("huge", "tiny_eps0", "offset_mean"):
        assert np.all(np.isfinite(y1))
        if kind in ("layer_norm", "add_layer_norm") and case != "offset_mean":
            s = x.astype(np.float64) + (xb + r if kind.startswith("add") else 0)
            assert_close(y1, ref_layer_norm(s, w, b, eps=eps if eps is not None else 1e-5))


@pytest.mark.parametrize("offset", [0, 1, 5, 15])
@pytest.mark.parametrize("kind", ["layer_norm", "add_layer_norm", "add_rms_norm"])
def test_split_rows_write_only_their_output(offset, kind):
    """Outputs a few floats past a cache line, rows padded: nothing outside `out` (or
    `sum_out`) is written, streamed or not, and the bits are the one-thread call's."""
    rows, n, pad = 3, 66000, 5
    x, r, w, b, xb = _inputs(kind, (rows, n))
    is_add = kind.startswith("add")
    for stream in (False, True):
        with forced_streaming(0 if stream else 1 << 62):
            got = []
            for nt in (1, 2, 3):
                ld = n + pad
                buf = np.full(rows * ld + 64, -7.0, F32)
                base = (-(buf.ctypes.data // 4)) % 16 + offset
                out = buf[base:base + rows * ld].reshape(rows, ld)[:, :n]
                sbuf = np.full(rows * ld + 64, -7.0, F32)
                so = sbuf[base:base + rows * ld].reshape(rows, ld)[:, :n] if is_add else None
                call_norm(kind, x, r if is_add else None, w, b, xb if is_add else None, out, so,
                      nt)
                mask = np.zeros(buf.shape, bool)
                mask[base:base + rows * ld].reshape(rows, ld)[:, :n] = True
                assert np.all(buf[~mask] == -7.0)
                if is_add:
                    assert np.all(sbuf[~mask] == -7.0)
                got.append((out.copy(), None if so is None else so.copy()))
            for y, s in got[1:]:
                np.testing.assert_array_equal(y, got[0][0])
                if s is not None:
                    np.testing.assert_array_equal(s, got[0][1])


def test_split_rows_from_many_python_threads():
    """Concurrent split calls (each with its own team) give the serial bits."""
    from concurrent.futures import ThreadPoolExecutor

    x, r, w, b, xb = _inputs("add_layer_norm", (1, 200000))
    ref = normcy.add_layer_norm(x, r, w, b, x_bias=xb, num_threads=1)

    def one(_):
        return normcy.add_layer_norm(x, r, w, b, x_bias=xb, num_threads=2)

    with ThreadPoolExecutor(6) as ex:
        for y in ex.map(one, range(24)):
            np.testing.assert_array_equal(y, ref)


@pytest.mark.parametrize("shape", [(1, 1, 300007), (1, 3, 512, 512), (2, 3, 65536),
                                   (1, 2, 65537)])
@pytest.mark.parametrize("centred", [False, True])
@pytest.mark.parametrize("offset", [0, 3])
@pytest.mark.parametrize("in_place", [False, True])
def test_batch_norm_large_planes_cut_into_pieces(shape, centred, offset, in_place):
    """Planes over 65536 floats are shared among threads in pieces: every thread count,
    streamed or cached, gives the same bits, within float64 NumPy's result, and writes
    nothing outside `out` (at any alignment)."""
    from conftest import ref_batch_norm

    rng = rng_for("bn-pieces", shape, centred)
    c = shape[1]
    x = (rng.standard_normal(shape) * 3).astype(F32)
    mean = (rng.standard_normal(c) * (1e3 if centred else 0.1)).astype(F32)
    var = (rng.random(c) + 0.5).astype(F32)
    w = rng.standard_normal(c).astype(F32)
    b = rng.standard_normal(c).astype(F32)
    n = x.size
    ref = normcy.batch_norm(x, mean, var, w, b, num_threads=1)
    assert_close(ref, ref_batch_norm(x, mean, var, w, b, 1e-5, 1))
    for stream in (False, True):
        with forced_streaming(0 if stream else 1 << 62):
            for nt in (1, 2, 3, 5):
                buf = np.full(n + 64, -7.0, F32)
                base = (-(buf.ctypes.data // 4)) % 16 + offset
                y = buf[base:base + n].reshape(shape)
                if in_place:
                    y[...] = x
                    normcy.batch_norm(y, mean, var, w, b, out=y, num_threads=nt)
                else:
                    normcy.batch_norm(x, mean, var, w, b, out=y, num_threads=nt)
                np.testing.assert_array_equal(y, ref, err_msg="num_threads=%d" % nt)
                assert np.all(buf[:base] == -7.0) and np.all(buf[base + n:] == -7.0)


@pytest.mark.parametrize("kind", KINDS)
def test_streamed_rows_too_long_for_the_pipeline(kind):
    """Streamed rows over 2097152 floats take the chunked path even on one thread (the
    pipeline's scratch would be 16 MB and more): the cached path's bits."""
    x, r, w, b, xb = _inputs(kind, (1, 2097152 + 17))
    with forced_streaming(1 << 62):
        ref = _run(kind, x, r, w, b, xb, 1)
    with forced_streaming(0):
        for nt in (1, 2):
            got = _run(kind, x, r, w, b, xb, nt)
            np.testing.assert_array_equal(got[0], ref[0])
            if ref[1] is not None:
                np.testing.assert_array_equal(got[1], ref[1])
