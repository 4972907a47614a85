"""Inputs at the edges of float32's range still give finite, correct results."""
import numpy as np
import pytest

import normcy

F32 = np.float32


def _ref_ln(x, eps):
    x64 = x.astype(np.float64)
    mu = x64.mean(-1, keepdims=True)
    return (x64 - mu) / np.sqrt(((x64 - mu) ** 2).mean(-1, keepdims=True) + eps)


def _ref_rms(x, eps):
    x64 = x.astype(np.float64)
    return x64 / np.sqrt((x64 ** 2).mean(-1, keepdims=True) + eps)


@pytest.mark.parametrize("scale", [1e36, 3e37, 1e-40, 1e-44])
@pytest.mark.parametrize("nt", [1, 2])
def test_extreme_magnitudes_eps_zero(scale, nt):
    rng = np.random.default_rng(7)
    x = (rng.standard_normal((8, 1000)) * scale).astype(F32)
    assert np.all(np.isfinite(x)) and np.any(x != 0)
    np.testing.assert_allclose(normcy.layer_norm(x, eps=0.0, num_threads=nt), _ref_ln(x, 0.0),
                               rtol=1e-5, atol=2e-5)
    np.testing.assert_allclose(normcy.rms_norm(x, eps=0.0, num_threads=nt), _ref_rms(x, 0.0),
                               rtol=1e-5, atol=2e-5)


def test_values_near_float_max():
    x = np.array([[3e38, -3e38], [3.4e38, 3.4e38 * 0.5]], F32)
    np.testing.assert_allclose(normcy.layer_norm(x), _ref_ln(x, 1e-5), atol=2e-5)
    np.testing.assert_allclose(normcy.rms_norm(x), _ref_rms(x, 1e-6), rtol=1e-5)


def test_extremes_on_streaming_path():
    from normcy import _norms

    old = _norms._set_streaming_threshold(0)
    try:
        x = (np.random.default_rng(1).standard_normal((4, 256)) * 1e37).astype(F32)
        np.testing.assert_allclose(normcy.layer_norm(x, eps=0.0), _ref_ln(x, 0.0), atol=2e-5)
        np.testing.assert_allclose(normcy.rms_norm(x, eps=0.0), _ref_rms(x, 0.0), rtol=1e-5)
    finally:
        _norms._set_streaming_threshold(old)
