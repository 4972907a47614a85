"""The streaming-store path (outputs far larger than cache) gives bit-identical results."""
import numpy as np
import pytest

import normcy
from normcy import _norms

F32 = np.float32


@pytest.fixture
def streaming_always():
    old = _norms._set_streaming_threshold(0)
    try:
        yield
    finally:
        _norms._set_streaming_threshold(old)


def _call(name, x, r, w, b, xb, out, sum_out, nt):
    if name == "layer_norm":
        return normcy.layer_norm(x, w, b, out=out, num_threads=nt)
    if name == "annotated":
        return normcy.layer_norm(x, w, b, 1e-6, out=out, convention="annotated", num_threads=nt)
    if name == "rms_norm":
        return normcy.rms_norm(x, w, out=out, num_threads=nt)
    if name == "add_layer_norm":
        return normcy.add_layer_norm(x, r, w, b, x_bias=xb, out=out, sum_out=sum_out,
                                     num_threads=nt)
    return normcy.add_rms_norm(x, r, w, x_bias=xb, out=out, sum_out=sum_out, num_threads=nt)


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
        y = _call(name, xx, rr if is_add else None, w, b, xb if is_add else None, out, so, 2)
        results.append((y.copy(), None if so is None else so.copy()))
    (y0, s0), (y1, s1) = results
    assert np.all(np.isfinite(y0))
    np.testing.assert_array_equal(y1, y0)
    if s0 is not None:
        np.testing.assert_array_equal(s1, s0)
        if alias != "sum_out_is_residual":
            np.testing.assert_array_equal(s0, x + xb + r)
