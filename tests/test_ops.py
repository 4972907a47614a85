"""Tests of normcy._ops (softmax, GELU, ReLU, fused bias + activation) against float64 NumPy.

Tolerances are the accuracy documented in normcy/src/nc_ops_kern.h:

- exp: <= 2 ulp relative (2.4e-7) on the normal range.
- GELU (erf and tanh): relative error <= 4e-7 * max(5, |a|) where ``a`` is the argument of
  the exponential inside (x^2/2 for erf, 2|u| for tanh): the only error that grows is the
  float32 rounding of that argument, in the far negative tail where |GELU| < 1e-4.
- softmax: relative 1e-6 + n * 1e-9 (float32 lane sums over a row of n).
"""
import math
import threading

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from normcy import _ops
from normcy._ops import bias_activation, bias_add, gelu, relu, softmax

F32 = np.float32
_erfc = np.vectorize(math.erfc, otypes=[np.float64])


# --------------------------------------------------------------------------- references
def ref_gelu(v):
    v = np.asarray(v, dtype=np.float64)
    return v * 0.5 * _erfc(-v / math.sqrt(2.0))


def ref_gelu_tanh(v):
    v = np.asarray(v, dtype=np.float64)
    u = math.sqrt(2.0 / math.pi) * (v + 0.044715 * v ** 3)
    # 0.5 v (1 + tanh u) == v / (1 + exp(-2u)), without cancellation for v < 0
    with np.errstate(over="ignore"):
        return v / (1.0 + np.exp(-2.0 * u))


def ref_relu(v):
    return np.maximum(np.asarray(v, dtype=np.float64), 0.0)


def act_rtol(v, act):
    v = np.abs(np.asarray(v, dtype=np.float64))
    if act == "gelu":
        return 4e-7 * np.maximum(5.0, v * v / 2)
    if act == "gelu_tanh":
        u = math.sqrt(2.0 / math.pi) * (v + 0.044715 * v ** 3)
        return 4e-7 * np.maximum(5.0, 2 * u)
    return np.zeros_like(v)


REFS = {"identity": lambda v: np.asarray(v, np.float64), "relu": ref_relu,
        "gelu": ref_gelu, "gelu_tanh": ref_gelu_tanh}


def ref_softmax(x, scale=1.0, mask=None, kpm=None, is_causal=False):
    v = np.asarray(x, dtype=np.float64) * np.float64(F32(scale))
    if mask is not None:
        v = v + np.asarray(mask, dtype=np.float64)
    v = np.broadcast_to(v, x.shape).copy()
    if kpm is not None:
        v[np.broadcast_to(kpm, x.shape)] = -np.inf
    if is_causal:
        q, k = x.shape[-2], x.shape[-1]
        v[..., np.triu(np.ones((q, k), dtype=bool), 1)] = -np.inf
    m = v.max(axis=-1, keepdims=True)
    dead = np.isneginf(m)
    e = np.exp(v - np.where(dead, 0.0, m))
    s = e.sum(axis=-1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(dead, 0.0, e / s)


def assert_softmax_close(y, ref, n, logits=None):
    """``logits``: the scaled + masked logits; float32 rounding of a logit v (0.5 ulp, i.e.
    up to 6e-8 |v| absolute in the exponent) is inherent to float32 softmax, so the
    tolerance grows with the logits' magnitude."""
    assert y.dtype == F32
    assert not np.isnan(y).any()
    rel = 1e-6 + n * 1e-9
    if logits is not None:
        v = np.abs(np.where(np.isfinite(logits), logits, 0.0))
        rel = rel + 1.2e-7 * (v + v.max(axis=-1, keepdims=True))
    tol = rel * ref + 1e-12
    assert np.all(np.abs(y - ref) <= tol), np.abs(y - ref).max()


# --------------------------------------------------------------------------- exp
def test_exp_accuracy_and_specials():
    x = np.linspace(-110.0, 89.0, 400_003).astype(F32)
    y = _ops._exp(x)
    ref = np.exp(x.astype(np.float64))
    inside = (x >= -86.5) & (ref <= np.finfo(F32).max)
    rel = np.abs(y[inside] - ref[inside]) / ref[inside]
    assert rel.max() <= 2.4e-7
    assert np.all(y[x < -86.5] == 0)          # flushed: true values < 2.7e-38
    assert np.all(y[x > 88.73] == np.inf)
    sp = _ops._exp(np.array([np.nan, -np.inf, np.inf, 0.0, -0.0, -200.0], F32))
    assert np.isnan(sp[0])
    np.testing.assert_array_equal(sp[1:], [0.0, np.inf, 1.0, 1.0, 0.0])


# --------------------------------------------------------------------------- activations
def _act_grid():
    return np.concatenate([np.linspace(-10, 10, 200_001), np.linspace(-1e-3, 1e-3, 2001),
                           [-1e-30, 1e-30, 0.0]]).astype(F32)


@pytest.mark.parametrize("act", ["gelu", "gelu_tanh"])
def test_gelu_accuracy_dense_grid(act):
    x = _act_grid()
    y = gelu(x, approximate="none" if act == "gelu" else "tanh")
    ref = REFS[act](x)
    err = np.abs(y.astype(np.float64) - ref)
    assert np.all(err <= act_rtol(x, act) * np.abs(ref) + 1e-38)


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_specials(approximate):
    x = np.array([np.nan, -np.inf, np.inf, 0.0, -0.0, 3e38, -3e38, 1e20, -1e20], F32)
    y = gelu(x, approximate=approximate)
    assert np.isnan(y[0])
    np.testing.assert_array_equal(y[1:], np.where(x[1:] > 0, x[1:], F32(0)))
    assert np.signbit(y[1])     # the limit at -inf is -0


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_bits_do_not_depend_on_position(approximate):
    # A row's whole groups of vectors go through the software-pipelined loop (the exact
    # GELU's two stages interleaved), its rest one vector or a partial vector at a time:
    # every value must come out with the same bits wherever it sits in a row.  (A NaN stays
    # a NaN; its sign bit follows the operand order the compiler picked for a product, which
    # may differ between the two loops.)
    rng = np.random.default_rng(12)
    v = np.concatenate([rng.standard_normal(53) * 3, rng.standard_normal(8) * 12,
                        [0.0, -0.0, np.inf, -np.inf, np.nan, 1e-30, -1e-30, 20.0, -20.0,
                         3e38, -3e38]]).astype(F32)
    m = v.size
    alone = np.array([gelu(v[i:i + 1], approximate=approximate)[0] for i in range(m)], F32)
    for n in (1, 5, 8, 31, 64, 100, 203):
        idx = (np.arange(m)[:, None] + np.arange(n)[None, :]) % m
        y, want = gelu(v[idx], approximate=approximate), alone[idx]
        nan = np.isnan(want)
        np.testing.assert_array_equal(np.isnan(y), nan)
        np.testing.assert_array_equal(y.view(np.int32)[~nan], want.view(np.int32)[~nan])


def test_relu_exact():
    x = np.array([np.nan, -np.inf, np.inf, -1.5, 0.0, 2.5, -1e-40, 1e-40], F32)
    y = relu(x)
    assert np.isnan(y[0])
    np.testing.assert_array_equal(y[1:], np.maximum(x[1:], 0))
    r = np.random.default_rng(0).standard_normal((37, 19)).astype(F32)
    np.testing.assert_array_equal(relu(r), np.maximum(r, 0))


def _check_bias_act(x, bias, act, residual, y):
    v = x.astype(np.float64)
    if bias is not None:
        v = (x + bias).astype(np.float64)        # the kernel rounds x + bias to float32
    a = REFS[act](v)
    tol = act_rtol(v, act) * np.abs(a) + 1e-37
    if residual is not None:
        a = a + residual.astype(np.float64)
        tol = tol + 2.4e-7 * (np.abs(a) + np.abs(residual))
    else:
        tol = tol + (2.4e-7 * np.abs(a) if act == "identity" else 0.0)
    assert y.shape == x.shape and y.dtype == F32
    assert np.all(np.abs(y - a) <= tol), np.abs(y - a).max()


@pytest.mark.parametrize("act", ["identity", "relu", "gelu", "gelu_tanh"])
@pytest.mark.parametrize("shape", [(1,), (5,), (3, 1), (4, 17), (2, 3, 33), (3, 8200), (2, 20000)])
def test_bias_activation_matches_reference(act, shape):
    rng = np.random.default_rng(hash((act, shape)) % 2**32)
    x = (rng.standard_normal(shape) * 3).astype(F32)
    bias = rng.standard_normal(shape[-1]).astype(F32)
    res = rng.standard_normal(shape).astype(F32)
    _check_bias_act(x, None, act, None, bias_activation(x, None, act))
    _check_bias_act(x, bias, act, None, bias_activation(x, bias, act))
    _check_bias_act(x, bias, act, res, bias_activation(x, bias, act, residual=res))
    # in place on x, and accumulating into the residual
    x2 = x.copy()
    assert bias_activation(x2, bias, act, out=x2) is x2
    _check_bias_act(x, bias, act, None, x2)
    r2 = res.copy()
    assert bias_activation(x, bias, act, residual=r2, out=r2) is r2
    _check_bias_act(x, bias, act, res, r2)


@pytest.mark.parametrize("act", ["relu", "gelu", "gelu_tanh"])
def test_bias_activation_strided(act):
    rng = np.random.default_rng(1)
    base = (rng.standard_normal((40, 70)) * 3).astype(F32)
    x = base[::2, 3:40:2]                       # non-contiguous last axis
    xt = base[:33, :20].T                       # transposed
    xn = base[::-3, ::-1][:, :29]               # negative strides
    for arr in (x, xt, xn):
        bias = rng.standard_normal(arr.shape[-1]).astype(F32)
        res = rng.standard_normal(arr.shape).astype(F32)
        _check_bias_act(arr, bias, act, res, bias_activation(arr, bias, act, residual=res))
        big = np.zeros((arr.shape[0], 2 * arr.shape[1]), F32)
        out = big[:, ::2]
        bias_activation(arr, bias, act, residual=res, out=out)
        _check_bias_act(arr, bias, act, res, out)
        assert np.all(big[:, 1::2] == 0)          # nothing written between the columns


def test_bias_activation_strided_row_view_in_place():
    """The Q slice of a packed (rows, 3d) projection, updated in place."""
    rng = np.random.default_rng(2)
    qkv = rng.standard_normal((9, 3 * 24)).astype(F32)
    keep = qkv.copy()
    b = rng.standard_normal(24).astype(F32)
    q = qkv[:, :24]
    bias_add(q, b, out=q)
    np.testing.assert_array_equal(qkv[:, :24], keep[:, :24] + b)
    np.testing.assert_array_equal(qkv[:, 24:], keep[:, 24:])


def test_gelu_relu_wrappers_match_bias_activation():
    x = np.random.default_rng(3).standard_normal((6, 50)).astype(F32)
    np.testing.assert_array_equal(gelu(x), bias_activation(x, None, "gelu"))
    np.testing.assert_array_equal(gelu(x, approximate="tanh"), bias_activation(x, None, "gelu_tanh"))
    np.testing.assert_array_equal(relu(x), bias_activation(x, None, "relu"))
    np.testing.assert_array_equal(bias_add(x, x[0]), x + x[0])
    y = x.copy()
    assert gelu(y, out=y) is y
    np.testing.assert_array_equal(y, gelu(x))


@pytest.mark.parametrize("shape", [(0, 7), (3, 0), (2, 0, 5), (0,), (2, 3, 0)])
def test_empty_arrays(shape):
    """An empty array of any shape gives an empty result (as NumPy and PyTorch), after the
    other arguments are checked; an empty last axis is no error for element-wise ops or
    softmax (torch.softmax of a (3, 0) tensor is (3, 0))."""
    x = np.zeros(shape, F32)
    n = shape[-1]
    for f in (gelu, relu, softmax, lambda a, **k: bias_activation(a, np.zeros(n, F32), "gelu", **k)):
        y = f(x)
        assert y.shape == shape and y.dtype == F32
        o = np.full(shape, 1, F32)
        assert f(x, out=o) is o
    if len(shape) >= 2:
        assert softmax(x, is_causal=True, mask=np.zeros(shape[-2:], F32)).shape == shape
    with pytest.raises(ValueError, match="out must have the shape"):
        gelu(x, out=np.zeros(shape + (1,), F32))
    with pytest.raises(ValueError, match="bias must have shape"):
        bias_activation(x, np.zeros(n + 1, F32))
    with pytest.raises(ValueError, match="num_threads"):
        relu(x, num_threads=-5)


# --------------------------------------------------------------------------- softmax
@pytest.mark.parametrize("n", [1, 2, 15, 16, 17, 64, 128, 333, 1000])
def test_softmax_rows(n):
    rng = np.random.default_rng(n)
    x = (rng.standard_normal((5, n)) * 4).astype(F32)
    assert_softmax_close(softmax(x), ref_softmax(x), n)
    assert_softmax_close(softmax(x, scale=0.125), ref_softmax(x, 0.125), n)
    # huge common offsets are harmless (max subtraction)
    assert_softmax_close(softmax(x + F32(1e4)), ref_softmax(x + F32(1e4)), n, logits=x)


def test_softmax_masks_4d():
    rng = np.random.default_rng(5)
    B, H, S = 3, 4, 21
    x = (rng.standard_normal((B, H, S, S)) * 3).astype(F32)
    mask = rng.standard_normal((S, S)).astype(F32)
    mask[rng.random((S, S)) < 0.3] = -np.inf
    kpm = np.zeros((B, S), bool)
    kpm[1, 15:] = True
    kpm[2, :] = True                                        # all keys padded
    k4 = kpm[:, None, None, :]
    cases = [dict(mask=mask), dict(kpm=k4), dict(is_causal=True),
             dict(mask=mask, kpm=k4, is_causal=True), dict(kpm=k4, is_causal=True)]
    for c in cases:
        y = softmax(x, scale=0.3, mask=c.get("mask"), key_padding_mask=c.get("kpm"),
                    is_causal=c.get("is_causal", False))
        ref = ref_softmax(x, 0.3, c.get("mask"), c.get("kpm"), c.get("is_causal", False))
        assert_softmax_close(y, ref, S)
        dead = ~np.any(ref > 0, axis=-1)
        assert np.all(y[dead] == 0)                          # fully masked rows: zeros
        if "kpm" in c:
            assert np.all(y[2] == 0)
            assert np.all(y[1][..., 15:] == 0)               # padded keys get exactly 0


def test_softmax_fully_masked_by_additive_inf_and_causal_rectangular():
    x = np.random.default_rng(6).standard_normal((4, 6)).astype(F32)
    m = np.zeros((4, 6), F32)
    m[1] = -np.inf
    y = softmax(x, mask=m)
    assert np.all(y[1] == 0) and not np.isnan(y).any()
    np.testing.assert_allclose(y[[0, 2, 3]].sum(-1), 1.0, rtol=1e-6)
    # is_causal on a (queries, keys) block with more keys than queries: top-left aligned
    yc = softmax(x, is_causal=True)
    assert_softmax_close(yc, ref_softmax(x, is_causal=True), 6)
    assert np.all(yc[0, 1:] == 0) and yc[0, 0] == 1


def test_softmax_broadcast_mask_shapes_and_dtypes():
    rng = np.random.default_rng(7)
    x = rng.standard_normal((2, 3, 5, 8)).astype(F32)
    for m in (rng.standard_normal(8), rng.standard_normal((5, 1)), rng.standard_normal((2, 1, 1, 8)),
              rng.standard_normal((3, 5, 8))[:, :, ::-1]):
        y = softmax(x, mask=m)                               # float64 masks are converted
        assert_softmax_close(y, ref_softmax(x, mask=m.astype(F32)), 8)
    kb = rng.random((5, 8)) < 0.3
    kb[:, 0] = False
    assert_softmax_close(softmax(x, key_padding_mask=kb), ref_softmax(x, kpm=kb), 8)
    kcol = rng.random((5, 1)) < 0.5                           # broadcast along the row
    y = softmax(x, key_padding_mask=kcol)
    assert_softmax_close(y, ref_softmax(x, kpm=kcol), 8)


def test_softmax_strided_in_place_and_out():
    rng = np.random.default_rng(8)
    base = rng.standard_normal((6, 40, 40)).astype(F32)
    x = base.transpose(0, 2, 1)[:, ::2]                     # last axis not contiguous
    ref = ref_softmax(x, 0.5)
    assert_softmax_close(softmax(x, scale=0.5), ref, 40)
    out = np.full((6, 20, 80), 7.0, F32)[:, :, ::2]
    assert softmax(x, scale=0.5, out=out) is out
    assert_softmax_close(out, ref, 40)
    y = np.ascontiguousarray(x)
    assert softmax(y, scale=0.5, out=y) is y                 # in place
    assert_softmax_close(y, ref, 40)
    xs = x.copy()
    assert softmax(x, scale=0.5, out=x) is x                 # in place, strided
    assert_softmax_close(x, ref_softmax(xs, 0.5), 40)


def test_softmax_nan_stays_in_its_row():
    x = np.random.default_rng(9).standard_normal((4, 33)).astype(F32)
    x[2, 5] = np.nan
    y = softmax(x)
    assert np.isnan(y[2]).all()
    assert not np.isnan(y[[0, 1, 3]]).any()
    assert_softmax_close(y[[0, 1, 3]], ref_softmax(x[[0, 1, 3]]), 33)
    # a NaN logit at a masked position is ignored
    k = np.zeros(33, bool)
    k[5] = True
    assert not np.isnan(softmax(x, key_padding_mask=k)).any()


@pytest.mark.parametrize("n", [16, 40, 128, 131])
def test_softmax_wide_logit_ranges(n):
    # Rows whose scaled logits span less than 86.5 take the exponential without its
    # underflow clamp, wider rows the clamped one: both must match float64, and positions
    # more than 86.5 below the maximum must give exactly 0
    rng = np.random.default_rng(n)
    for span in (1.0, 80.0, 86.0, 87.0, 100.0, 300.0, 1e6):
        x = (rng.random((6, n)) * span - span).astype(F32)
        x[:, 3] = 0.0
        y = softmax(x)
        assert_softmax_close(y, ref_softmax(x), n)
        below = x.astype(np.float64) - x.max(axis=-1, keepdims=True) < -86.6
        assert np.all(y[below] == 0)                  # exp below -86.5 is 0 by design
        assert np.all(np.isfinite(y))


@pytest.mark.parametrize("rows", [1, 2, 3, 7, 8])
@pytest.mark.parametrize("n", [1, 9, 32, 128, 131])
def test_softmax_row_alone_equals_row_in_block(rows, n):
    # rows go through the kernel in pairs (the two-row kernel) and a last one alone: a row's
    # bits must not depend on its neighbour or on its place in the pairing
    rng = np.random.default_rng(rows * 1000 + n)
    x = (rng.standard_normal((rows, n)) * 3).astype(F32)
    x[rows // 2, 0] = -np.inf
    mask = rng.standard_normal((rows, n)).astype(F32)
    mask[rows - 1] = -np.inf                                 # a fully masked last row
    kpm = rng.random((rows, n)) < 0.25
    for kw in (dict(), dict(mask=mask), dict(key_padding_mask=kpm), dict(is_causal=True),
               dict(mask=mask, key_padding_mask=kpm, is_causal=True)):
        whole = softmax(x, scale=0.7, **kw)
        for r in range(rows):
            part = {k: (v[r:r + 1] if isinstance(v, np.ndarray) else v) for k, v in kw.items()}
            if kw.get("is_causal"):
                # causal limit is the row's index along axis -2: keep the block, take row r
                alone = softmax(x[:r + 1], scale=0.7,
                                **{k: (v[:r + 1] if isinstance(v, np.ndarray) else v)
                                   for k, v in kw.items()})[r]
            else:
                alone = softmax(x[r:r + 1], scale=0.7, **part)[0]
            np.testing.assert_array_equal(whole[r], alone)
        for nt in (1, 2, 3):
            np.testing.assert_array_equal(softmax(x, scale=0.7, num_threads=nt, **kw), whole)


@settings(max_examples=40, deadline=None)
@given(shape=st.lists(st.integers(1, 9), min_size=1, max_size=3).map(tuple),
       n=st.integers(1, 70), scale=st.floats(0.01, 4.0), causal=st.booleans(),
       transpose=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_softmax_property(shape, n, scale, causal, transpose, seed):
    rng = np.random.default_rng(seed)
    full = shape + (n,)
    if transpose:
        x = (rng.standard_normal(full[::-1]) * 5).astype(F32).T
    else:
        x = (rng.standard_normal(full) * 5).astype(F32)
    kpm = rng.random(full) < 0.2
    y = softmax(x, scale=scale, key_padding_mask=kpm, is_causal=causal)
    assert_softmax_close(y, ref_softmax(x, scale, kpm=kpm, is_causal=causal), n,
                         logits=x * np.float64(F32(scale)))
    sums = y.astype(np.float64).sum(-1)
    assert np.all((np.abs(sums - 1) < 1e-5) | (sums == 0))


# --------------------------------------------------------------------------- threads
def test_thread_count_invariance_bitwise():
    rng = np.random.default_rng(10)
    s = (rng.standard_normal((8, 6, 64, 64)) * 3).astype(F32)
    kpm = (rng.random((8, 64)) < 0.2)[:, None, None, :]
    a = (rng.standard_normal((300, 1536)) * 3).astype(F32)
    b = rng.standard_normal(1536).astype(F32)
    ref_s = softmax(s, scale=0.2, key_padding_mask=kpm, is_causal=True, num_threads=1)
    ref_a = {act: bias_activation(a, b, act, num_threads=1) for act in ("gelu", "gelu_tanh", "relu")}
    for nt in (2, 3, 4):
        np.testing.assert_array_equal(
            softmax(s, scale=0.2, key_padding_mask=kpm, is_causal=True, num_threads=nt), ref_s)
        for act, r in ref_a.items():
            np.testing.assert_array_equal(bias_activation(a, b, act, num_threads=nt), r)


def test_concurrent_python_threads():
    rng = np.random.default_rng(11)
    xs = [(rng.standard_normal((16, 4, 48, 48)) * 2).astype(F32) for _ in range(4)]
    refs = [softmax(x, num_threads=1) for x in xs]
    grefs = [gelu(x, num_threads=1) for x in xs]
    errors = []

    def work(i):
        try:
            for _ in range(5):
                np.testing.assert_array_equal(softmax(xs[i]), refs[i])
                np.testing.assert_array_equal(gelu(xs[i]), grefs[i])
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


# --------------------------------------------------------------------------- bad input
def test_bad_inputs_raise_clear_errors():
    x = np.zeros((3, 4), F32)
    with pytest.raises(TypeError, match="x must be a float32"):
        softmax([[1.0, 2.0]])
    with pytest.raises(TypeError, match="float32"):
        softmax(x.astype(np.float64))
    with pytest.raises(TypeError, match="float32"):
        gelu(x.astype(np.float16))
    with pytest.raises(TypeError, match="float32"):
        softmax(x.astype(">f4"))
    with pytest.raises(ValueError, match="0-d"):
        softmax(np.array(1.0, F32))
    with pytest.raises(ValueError, match="out must have the shape"):
        softmax(x, out=np.zeros((3, 5), F32))
    with pytest.raises(TypeError, match="out must have dtype float32"):
        softmax(x, out=np.zeros((3, 4)))
    ro = np.zeros((3, 4), F32)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        gelu(x, out=ro)
    buf = np.zeros(20, F32)
    with pytest.raises(ValueError, match="partially overlaps"):
        softmax(buf[:12].reshape(3, 4), out=buf[4:16].reshape(3, 4))
    with pytest.raises(TypeError, match="mask must be a floating-point"):
        softmax(x, mask=np.zeros((3, 4), np.int32))
    with pytest.raises(TypeError, match="mask must be a float numpy"):
        softmax(x, mask=[[0.0] * 4])
    with pytest.raises(ValueError, match="cannot be broadcast"):
        softmax(x, mask=np.zeros((2, 4), F32))
    with pytest.raises(ValueError, match="cannot be broadcast"):
        softmax(x, mask=np.zeros((1, 1, 3, 4), F32))
    with pytest.raises(TypeError, match="key_padding_mask must have dtype bool"):
        softmax(x, key_padding_mask=np.zeros(4, np.int64))
    with pytest.raises(ValueError, match="cannot be broadcast"):
        softmax(x, key_padding_mask=np.zeros(5, bool))
    with pytest.raises(ValueError, match="is_causal"):
        softmax(np.zeros(4, F32), is_causal=True)
    with pytest.raises(ValueError, match="scale must be finite"):
        softmax(x, scale=np.inf)
    with pytest.raises(ValueError, match="scale must be finite"):
        softmax(x, scale=1e39)
    with pytest.raises(TypeError, match="scale must be a real number"):
        softmax(x, scale="2")
    with pytest.raises(ValueError, match="activation must be one of"):
        bias_activation(x, None, "swish")
    with pytest.raises(ValueError, match="bias must have shape \\(4,\\)"):
        bias_activation(x, np.zeros(3, F32))
    with pytest.raises(TypeError, match="bias must be a 1-d float array"):
        bias_activation(x, np.array(["a"] * 4))
    with pytest.raises(TypeError, match="residual must have dtype float32"):
        bias_activation(x, residual=np.zeros((3, 4)))
    with pytest.raises(ValueError, match="residual must have the shape"):
        bias_activation(x, residual=np.zeros((4, 4), F32))
    with pytest.raises(ValueError, match="approximate"):
        gelu(x, approximate="fast")
    with pytest.raises(ValueError, match="num_threads"):
        gelu(x, num_threads=0)
    with pytest.raises(TypeError, match="num_threads"):
        gelu(x, num_threads="2")
    with pytest.raises(ValueError, match="out must have the shape"):
        bias_activation(x, x[0], out=x[0:1])
    row = np.zeros(4, F32)
    with pytest.raises(ValueError, match="must not be the same array as bias"):
        bias_activation(row, row, out=row)


def test_kernel_isa_reported():
    assert isinstance(_ops.kernel_isa(), str) and _ops.kernel_isa()
