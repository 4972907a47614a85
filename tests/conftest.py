"""Shared fixtures for the normcy core kernel tests.

The float64 NumPy references in here are deliberately naive: they are the
definitions from the documentation, evaluated in float64, and nothing else.

Tolerances (float32 outputs of O(1) magnitude)
----------------------------------------------
A normalized value ``y = (x - mean) * rstd * w + b`` goes through ~5 float32
roundings (<= 0.5 ulp = 6e-8 relative each) plus the error of the row
statistics.  Accumulated in float64 (or blocked/pairwise float32) those are
~1e-7..1e-6 relative.  ``rtol=1e-5, atol=2e-5`` therefore leaves a safety
factor of >= 10 for a correct kernel while still catching any real mistake
(wrong eps placement, biased/unbiased mix-up, a dropped bias, a race, ...).
"""
import contextlib
import os
import sys
import types

import numpy as np
import pytest

import normcy

F32 = np.float32
F64 = np.float64

RTOL = 1e-5
ATOL = 2e-5


# --------------------------------------------------------------------------- references
def _f64(a):
    return None if a is None else np.asarray(a, dtype=F64)


def ref_layer_norm(x, weight=None, bias=None, eps=1e-5, convention="standard"):
    s = _f64(x)
    mean = s.mean(axis=-1, keepdims=True)
    d = s - mean
    if convention == "standard":
        var = (d * d).mean(axis=-1, keepdims=True)
        y = d / np.sqrt(var + eps)
    elif convention == "annotated":
        n = s.shape[-1]
        std = np.sqrt((d * d).sum(axis=-1, keepdims=True) / (n - 1))
        y = d / (std + eps)
    else:  # pragma: no cover
        raise AssertionError(convention)
    if weight is not None:
        y = y * _f64(weight)
    if bias is not None:
        y = y + _f64(bias)
    return y


def ref_rms_norm(x, weight=None, eps=1e-6):
    s = _f64(x)
    ms = (s * s).mean(axis=-1, keepdims=True)
    y = s / np.sqrt(ms + eps)
    if weight is not None:
        y = y * _f64(weight)
    return y


def ref_sum(x, residual, x_bias=None):
    """The float32 residual stream ``(x + x_bias) + residual`` exactly as NumPy rounds it."""
    x = np.asarray(x)
    if x_bias is None:
        return np.add(x, residual, dtype=F32)
    return np.add(np.add(x, np.asarray(x_bias, dtype=F32), dtype=F32), residual, dtype=F32)


def ref_batch_norm(x, mean, var, weight=None, bias=None, eps=1e-5, axis=1):
    s = _f64(x)
    ax = axis % s.ndim
    shape = [1] * s.ndim
    shape[ax] = s.shape[ax]
    y = (s - _f64(mean).reshape(shape)) / np.sqrt(_f64(var).reshape(shape) + eps)
    if weight is not None:
        y = y * _f64(weight).reshape(shape)
    if bias is not None:
        y = y + _f64(bias).reshape(shape)
    return y


def assert_close(actual, expected, rtol=RTOL, atol=ATOL, err_msg=""):
    actual = np.asarray(actual)
    assert actual.dtype == F32, actual.dtype
    assert actual.shape == np.shape(expected), (actual.shape, np.shape(expected))
    assert np.all(np.isfinite(actual)), "non-finite values in output"
    np.testing.assert_allclose(actual.astype(F64), expected, rtol=rtol, atol=atol,
                               err_msg=err_msg)


# --------------------------------------------------------------------------- layouts
# A layout turns a (writable, C-contiguous) base array into a view of the requested
# logical shape.  The same function applied to an index array tells which base
# elements the view covers, so tests can check that nothing outside `out` was written.
LAYOUTS = ("c", "offset", "rows2", "cols2", "negcols2", "pad", "fortran", "swap", "neg")


def _base_shape(shape, layout):
    shape = tuple(shape)
    nd = len(shape)
    if layout in ("c", "neg", "offset"):
        return shape
    if layout == "rows2":
        if nd < 2:
            return shape[:-1] + (2 * shape[-1],)
        return shape[:-2] + (2 * shape[-2], shape[-1])
    if layout in ("cols2", "negcols2"):
        return shape[:-1] + (2 * shape[-1],)
    if layout == "pad":
        return shape[:-1] + (shape[-1] + 3,)
    if layout == "fortran":
        return shape[::-1]
    if layout == "swap":
        if nd < 2:
            return shape
        return shape[:-2] + (shape[-1], shape[-2])
    raise AssertionError(layout)


def _apply_layout(base, shape, layout):
    nd = len(shape)
    if layout == "c":
        return base
    if layout == "neg":
        return base[(slice(None, None, -1),) * nd]
    if layout == "rows2":
        if nd < 2:
            return base[::2]
        return base[..., ::2, :]
    if layout == "cols2":
        return base[..., ::2]
    if layout == "negcols2":
        return base[..., ::-2]
    if layout == "pad":
        return base[..., 1:shape[-1] + 1]
    if layout == "fortran":
        return base.T
    if layout == "swap":
        if nd < 2:
            return base
        return np.swapaxes(base, -1, -2)
    raise AssertionError(layout)


def make_view(shape, layout, fill):
    """Return ``(view, base, covered_mask)``; ``view`` has ``shape`` and dtype float32.

    ``fill`` is either a callable ``fill(size) -> values`` for the base array, or a
    scalar sentinel.
    """
    shape = tuple(shape)
    if layout == "offset":
        n = int(np.prod(shape, dtype=np.int64))
        base = np.empty(n + 1, dtype=F32)
        _fill(base, fill)
        view = base[1:].reshape(shape)
        idx = np.arange(n + 1)[1:].reshape(shape)
    else:
        bshape = _base_shape(shape, layout)
        base = np.empty(bshape, dtype=F32)
        _fill(base, fill)
        view = _apply_layout(base, shape, layout)
        idx = _apply_layout(np.arange(base.size).reshape(bshape), shape, layout)
    assert view.shape == shape, (layout, view.shape, shape)
    assert view.size == 0 or np.shares_memory(view, base)
    covered = np.zeros(base.size, dtype=bool)
    covered[idx.reshape(-1)] = True
    return view, base, covered.reshape(base.shape)


def _fill(base, fill):
    if callable(fill):
        base[...] = np.asarray(fill(base.size), dtype=F32).reshape(base.shape)
    else:
        base[...] = fill


SENTINEL = np.float32(-7777.25)


def assert_untouched(base, covered):
    outside = base[~covered]
    assert np.all(outside == SENTINEL), "kernel wrote outside of `out`"


def call_norm(name, x, r, w, b, xb, out, sum_out, nt):
    """One call of the norm kernel `name` (layer_norm, annotated, rms_norm, add_layer_norm,
    add_rms_norm) with the arguments that kind takes (r, xb, sum_out: the fused adds)."""
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


# --------------------------------------------------------------------------- thread helpers
@contextlib.contextmanager
def forced_parallel(min_parallel_work=0, min_work_per_thread=1):
    """Make every call eligible for a parallel region (exercises the OpenMP paths on
    small inputs).  No-op if the private tuning hook is not there."""
    from normcy import _parallel

    setter = getattr(_parallel, "_set_parallel_thresholds", None)
    if setter is None:
        yield False
        return
    old = setter(min_parallel_work, min_work_per_thread)
    try:
        yield True
    finally:
        setter(*old)


@contextlib.contextmanager
def forced_streaming(min_bytes=0):
    """Route every eligible call through the large-output (non-temporal store) path.
    No-op if the private hook is not there."""
    from normcy import _norms

    setter = getattr(_norms, "_set_streaming_threshold", None)
    if setter is None:
        yield False
        return
    old = setter(min_bytes)
    try:
        yield True
    finally:
        setter(old)


def rng_for(*key):
    """Deterministic generator from an arbitrary hashable key (stable across runs)."""
    return np.random.default_rng(_stable_seed(key))


def _stable_seed(key):
    import zlib

    return zlib.crc32(repr(key).encode())


def randn(rng, shape, scale=1.0, loc=0.0):
    return (rng.standard_normal(shape) * scale + loc).astype(F32)


def params(rng, d, with_weight=True, with_bias=True):
    w = (1.0 + 0.1 * rng.standard_normal(d)).astype(F32) if with_weight else None
    b = (0.1 * rng.standard_normal(d)).astype(F32) if with_bias else None
    return w, b


# wait_child(pid, timeout): a forked child's exit code, or 99 after killing it if it hung;
# for the child interpreters of the fork tests (a source string: they run it themselves)
WAIT_CHILD_SRC = """
def wait_child(pid, timeout=60):
    deadline = time.monotonic() + timeout
    while True:
        p, status = os.waitpid(pid, os.WNOHANG)
        if p:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            print("CHILD HUNG")
            return 99
        time.sleep(0.02)
"""


def normcy_pythonpath_env(extra=None, drop=()):
    """Environment for a child interpreter that imports the very same normcy."""
    env = dict(os.environ)
    for k in drop:
        env.pop(k, None)
    pkg_parent = os.path.dirname(os.path.dirname(os.path.abspath(normcy.__file__)))
    env["PYTHONPATH"] = pkg_parent + (os.pathsep + env["PYTHONPATH"]
                                      if env.get("PYTHONPATH") else "")
    if extra:
        env.update(extra)
    return env


H = types.SimpleNamespace(
    ref_layer_norm=ref_layer_norm,
    ref_rms_norm=ref_rms_norm,
    ref_sum=ref_sum,
    ref_batch_norm=ref_batch_norm,
    assert_close=assert_close,
    make_view=make_view,
    assert_untouched=assert_untouched,
    forced_parallel=forced_parallel,
    forced_streaming=forced_streaming,
    rng_for=rng_for,
    randn=randn,
    params=params,
    normcy_pythonpath_env=normcy_pythonpath_env,
    LAYOUTS=LAYOUTS,
    SENTINEL=SENTINEL,
    RTOL=RTOL,
    ATOL=ATOL,
    python=sys.executable,
)


@pytest.fixture(scope="session")
def h():
    """Reference implementations and array helpers (see module docstring)."""
    return H


@pytest.fixture
def restore_num_threads():
    """Restore the process-wide default thread count after a test changes it."""
    old = normcy.get_num_threads()
    yield old
    normcy.set_num_threads(old)
