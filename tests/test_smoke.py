"""Smoke checks of the installed package: it imports, reports its build, and computes."""
import io

import numpy as np
import pytest

import normcy


def test_show_config_reports_build():
    buf = io.StringIO()
    normcy.show_config(file=buf)
    text = buf.getvalue()
    assert normcy.__version__ in text
    assert "OpenMP" in text and "kernel variant" in text and "BLAS" in text


def test_layer_norm_matches_float64_reference():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((33, 385)).astype(np.float32)
    w = rng.standard_normal(385).astype(np.float32)
    b = rng.standard_normal(385).astype(np.float32)
    x64 = x.astype(np.float64)
    mu = x64.mean(-1, keepdims=True)
    ref = (x64 - mu) / np.sqrt(((x64 - mu) ** 2).mean(-1, keepdims=True) + 1e-5) * w + b
    np.testing.assert_allclose(normcy.layer_norm(x, w, b), ref, rtol=0, atol=2e-5)


def test_serial_build_by_accident_warns(monkeypatch):
    """A build that fell back to serial kernels (no OpenMP found) says so at import; one
    built serial on purpose (NORMCY_DISABLE_OPENMP=1) does not."""
    import types
    import warnings
    fake = types.SimpleNamespace(openmp=False, openmp_disabled=False,
                                 openmp_detail="compile/link failed: omp.h not found")
    monkeypatch.setattr(normcy, "_read_build_info", lambda: fake)
    with pytest.warns(RuntimeWarning, match="built without OpenMP .*omp.h not found"):
        normcy._warn_if_serial_by_accident()
    fake.openmp_disabled = True
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        normcy._warn_if_serial_by_accident()
