"""Kernel-boundary hardening (issue 9): ndarray subclasses, bounded overlap checks, scalar parsing.

Policy under test (see README "Guarantees" and normcy/_arraychecks.pxd):

- An ndarray subclass instance is accepted and used as its buffer (a base-class view made in
  C): shapes, strides and sizes come from the C-level array, never from Python attributes a
  subclass can override, and no NumPy call at the boundary can dispatch to subclass code.
  A passed ``out`` is returned as the caller's object.  ``numpy.ma.MaskedArray`` is refused.
- Integers: anything ``operator.index`` accepts except bool; floats: finite real numbers
  (no strings, complex, bool); out-of-range values are ValueError, never OverflowError.

Calls that could corrupt memory if the boundary were wrong run in a child process, so that a
regression fails the test instead of crashing the test run.
"""
import math
import os
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

import normcy
from normcy import _validate

F32 = np.float32

# --------------------------------------------------------------------------- child processes
# Shared by the child processes: one call builder per public kernel.  Each builder takes
# `wrap` (applied to every array argument it names in `which`) and returns the call's result;
# the data are fixed by a seed, so a wrapped call must give exactly the unwrapped result.
_PRELUDE = r'''
import sys
import numpy as np
import normcy

F32 = np.float32


class Benign(np.ndarray):
    """An ordinary subclass (extra attribute, __array_finalize__)."""
    def __array_finalize__(self, obj):
        self.tag = getattr(obj, "tag", "benign")


class Liar(np.ndarray):
    """Overrides every Python-level attribute and method a boundary might consult."""
    @property
    def shape(self):
        s = np.ndarray.shape.__get__(self)
        return s[:-1] + (s[-1] + 64,) if len(s) else (64,)
    @property
    def strides(self):
        return tuple(8 * s for s in np.ndarray.strides.__get__(self))
    @property
    def size(self):
        return np.ndarray.size.__get__(self) + 1000
    @property
    def ndim(self):
        return np.ndarray.ndim.__get__(self) + 1
    @property
    def dtype(self):
        return np.dtype(np.float32)
    def __len__(self):
        return 10 ** 6
    def __array_function__(self, func, types, args, kwargs):
        return np.zeros(1, F32)          # any NumPy function "returns" a tiny array
    def transpose(self, *a):
        return np.zeros(1, F32)
    def reshape(self, *a, **k):
        return np.zeros(1, F32)
    def astype(self, *a, **k):
        return np.zeros(1, F32)
    def view(self, *a, **k):
        return np.zeros(1, F32)
    def copy(self, *a, **k):
        return np.zeros(1, F32)
    def __getitem__(self, i):
        return np.zeros(1, F32)
    def __setitem__(self, i, v):
        pass


def ident(a):
    return a


def data(seed, shape, dtype=F32):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


# name -> (argument names that are arrays, builder(wrap, which) -> result)
def _w(wrap, which, name, a):
    return wrap(a) if which is None or name in which else a


def b_layer_norm(wrap, which):
    x, w, b = data(1, (5, 33)), data(2, 33), data(3, 33)
    out = np.zeros((5, 33), F32)
    return normcy.layer_norm(_w(wrap, which, "x", x), _w(wrap, which, "weight", w),
                             _w(wrap, which, "bias", b), 1e-5, out=_w(wrap, which, "out", out))


def b_add_layer_norm(wrap, which):
    x, r, w, b, xb = data(1, (5, 33)), data(4, (5, 33)), data(2, 33), data(3, 33), data(5, 33)
    out, so = np.zeros((5, 33), F32), np.zeros((5, 33), F32)
    return normcy.add_layer_norm(_w(wrap, which, "x", x), _w(wrap, which, "residual", r),
                                 _w(wrap, which, "weight", w), _w(wrap, which, "bias", b), 1e-5,
                                 x_bias=_w(wrap, which, "x_bias", xb),
                                 out=_w(wrap, which, "out", out),
                                 sum_out=_w(wrap, which, "sum_out", so))


def b_rms_norm(wrap, which):
    x, w = data(1, (3, 4, 17)), data(2, 17)
    out = np.zeros((3, 4, 17), F32)
    return normcy.rms_norm(_w(wrap, which, "x", x), _w(wrap, which, "weight", w), 1e-6,
                           out=_w(wrap, which, "out", out))


def b_add_rms_norm(wrap, which):
    x, r, w = data(1, (5, 40))[:, ::2], data(4, (5, 20)), data(2, 20)
    out, so = np.zeros((5, 20), F32), np.zeros((5, 20), F32)
    return normcy.add_rms_norm(_w(wrap, which, "x", x), _w(wrap, which, "residual", r),
                               _w(wrap, which, "weight", w), 1e-6,
                               out=_w(wrap, which, "out", out),
                               sum_out=_w(wrap, which, "sum_out", so))


def b_batch_norm(wrap, which):
    # a transposed (non-contiguous) x takes the moveaxis / copy paths
    x = data(1, (6, 5, 4)).transpose(2, 1, 0)       # (4, 5, 6), channels on axis 1
    m, v, w, b = data(2, 5), np.abs(data(3, 5)) + 0.5, data(4, 5), data(5, 5)
    out = np.zeros((4, 5, 6), F32)
    return normcy.batch_norm(_w(wrap, which, "x", x), _w(wrap, which, "running_mean", m),
                             _w(wrap, which, "running_var", v), _w(wrap, which, "weight", w),
                             _w(wrap, which, "bias", b), 1e-5, axis=1,
                             out=_w(wrap, which, "out", out))


def b_fold_batch_norm(wrap, which):
    m, v, w, b = data(2, 7), np.abs(data(3, 7)) + 0.5, data(4, 7), data(5, 7)
    return normcy.fold_batch_norm(_w(wrap, which, "running_mean", m),
                                  _w(wrap, which, "running_var", v),
                                  _w(wrap, which, "weight", w), _w(wrap, which, "bias", b), 1e-5)


def b_fold_batch_norm_into_linear(wrap, which):
    W, bias = data(1, (7, 3)), data(6, 7)
    m, v, w, b = data(2, 7), np.abs(data(3, 7)) + 0.5, data(4, 7), data(5, 7)
    return normcy.fold_batch_norm_into_linear(
        _w(wrap, which, "weight", W), _w(wrap, which, "bias", bias),
        _w(wrap, which, "running_mean", m), _w(wrap, which, "running_var", v),
        _w(wrap, which, "bn_weight", w), _w(wrap, which, "bn_bias", b), 1e-5)


def b_softmax(wrap, which):
    x = data(1, (2, 3, 6, 9))
    mask = data(2, (6, 9))
    kpm = np.zeros((2, 1, 1, 9), bool)
    kpm[:, :, :, -2:] = True
    out = np.zeros((2, 3, 6, 9), F32)
    return normcy.softmax(_w(wrap, which, "x", x), scale=0.5, mask=_w(wrap, which, "mask", mask),
                          key_padding_mask=_w(wrap, which, "key_padding_mask", kpm),
                          is_causal=True, out=_w(wrap, which, "out", out))


def b_gelu(wrap, which):
    x = data(1, (4, 70))[:, ::3]
    out = np.zeros((4, 24), F32)
    return normcy.gelu(_w(wrap, which, "x", x), out=_w(wrap, which, "out", out))


def b_relu(wrap, which):
    x = data(1, (2, 68))
    out = np.zeros((2, 68), F32)
    return normcy.relu(_w(wrap, which, "x", x), out=_w(wrap, which, "out", out))


def b_bias_activation(wrap, which):
    x, b, r = data(1, (3, 50)), data(2, 50), data(3, (3, 50))
    out = np.zeros((3, 50), F32)
    return normcy.bias_activation(_w(wrap, which, "x", x), _w(wrap, which, "bias", b), "gelu",
                                  residual=_w(wrap, which, "residual", r),
                                  out=_w(wrap, which, "out", out))


def b_bias_add(wrap, which):
    x, b = data(1, (3, 50)), data(2, 50)
    out = np.zeros((3, 50), F32)
    return normcy.bias_add(_w(wrap, which, "x", x), _w(wrap, which, "bias", b),
                           out=_w(wrap, which, "out", out))


BUILDERS = {
    "layer_norm": (("x", "weight", "bias", "out"), b_layer_norm),
    "add_layer_norm": (("x", "residual", "weight", "bias", "x_bias", "out", "sum_out"),
                       b_add_layer_norm),
    "rms_norm": (("x", "weight", "out"), b_rms_norm),
    "add_rms_norm": (("x", "residual", "weight", "out", "sum_out"), b_add_rms_norm),
    "batch_norm": (("x", "running_mean", "running_var", "weight", "bias", "out"), b_batch_norm),
    "fold_batch_norm": (("running_mean", "running_var", "weight", "bias"), b_fold_batch_norm),
    "fold_batch_norm_into_linear": (("weight", "bias", "running_mean", "running_var",
                                     "bn_weight", "bn_bias"), b_fold_batch_norm_into_linear),
    "softmax": (("x", "mask", "key_padding_mask", "out"), b_softmax),
    "gelu": (("x", "out"), b_gelu),
    "relu": (("x", "out"), b_relu),
    "bias_activation": (("x", "bias", "residual", "out"), b_bias_activation),
    "bias_add": (("x", "bias", "out"), b_bias_add),
}


def as_tuple(r):
    return tuple(np.asarray(a) for a in r) if isinstance(r, tuple) else (np.asarray(r),)
'''

KERNELS = ("layer_norm", "add_layer_norm", "rms_norm", "add_rms_norm", "batch_norm",
           "fold_batch_norm", "fold_batch_norm_into_linear", "softmax", "gelu", "relu",
           "bias_activation", "bias_add")


def run_child(body, timeout=120):
    """Run the prelude + `body` in a fresh interpreter; it must print OK and exit 0."""
    code = _PRELUDE + textwrap.dedent(body)
    # the very same normcy as this process (not a source tree in the current directory)
    env = dict(os.environ)
    pkg_parent = os.path.dirname(os.path.dirname(os.path.abspath(normcy.__file__)))
    env["PYTHONPATH"] = pkg_parent + (os.pathsep + env["PYTHONPATH"]
                                      if env.get("PYTHONPATH") else "")
    try:
        p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           timeout=timeout, env=env, cwd=os.path.dirname(os.path.abspath(__file__)))
    except subprocess.TimeoutExpired as e:  # pragma: no cover - a hang is the failure
        pytest.fail("child hung for %d s: %s" % (timeout, e))
    assert p.returncode == 0 and p.stdout.strip().endswith("OK"), (
        "child exited with %d (negative: killed by a signal, i.e. a crash)\n--- stdout\n%s\n"
        "--- stderr\n%s" % (p.returncode, p.stdout[-3000:], p.stderr[-3000:]))
    return p.stdout


def test_every_public_kernel_is_covered():
    """Every public array function (classes are covered by the fuzzer's targets)."""
    public = {n for n in normcy.__all__ if callable(getattr(normcy, n))
              and not isinstance(getattr(normcy, n), type)
              and n not in ("get_num_threads", "set_num_threads", "fork_serial", "show_config")}
    assert public == set(KERNELS)


# --------------------------------------------------------------------------- issue 9, item 1
def test_issue_reproduction_out_subclass_with_lying_shape():
    """The reported heap overflow: out's Python shape claims 64 more columns than its buffer."""
    run_child(r'''
    class L(np.ndarray):
        @property
        def shape(self):
            s = np.ndarray.shape.__get__(self)
            return s[:-1] + (s[-1] + 64,)

    x = np.ones((2, 68), F32)
    calls = {
        "relu": lambda o: normcy.relu(x, out=o),
        "gelu": lambda o: normcy.gelu(x, out=o),
        "softmax": lambda o: normcy.softmax(x, out=o),
        "bias_add": lambda o: normcy.bias_add(x, np.zeros(68, F32), out=o),
        "bias_activation": lambda o: normcy.bias_activation(x, np.zeros(68, F32), "relu", out=o),
        "layer_norm": lambda o: normcy.layer_norm(x, out=o),
        "rms_norm": lambda o: normcy.rms_norm(x, out=o),
        "add_layer_norm": lambda o: normcy.add_layer_norm(x, x, out=o),
        "add_rms_norm": lambda o: normcy.add_rms_norm(x, x, out=o),
        "batch_norm": lambda o: normcy.batch_norm(x, np.zeros(68), np.ones(68), axis=-1, out=o),
    }
    for name, call in calls.items():
        buf = np.full(2 * 4 + 64, 7.0, F32)      # guard values after the 2x4 out
        o = buf[:8].reshape(2, 4).view(L)
        try:
            call(o)
        except ValueError as e:
            assert "out must have the shape of x (2, 68)" in str(e), (name, e)
            assert "(2, 4)" in str(e), (name, e)
        else:
            raise AssertionError("%s accepted an out of real shape (2, 4)" % name)
        assert np.all(buf == 7.0), name   # nothing written, not even inside out
    print("OK")
    ''')


@pytest.mark.parametrize("name", KERNELS)
def test_benign_subclass_works_like_ndarray(name):
    """Every array argument a Benign subclass: the result is bit-identical to plain arrays,
    and a passed out is returned as the caller's object (subclass kept)."""
    run_child(r'''
    names, build = BUILDERS[%r]
    want = as_tuple(build(ident, None))
    got = build(lambda a: a.view(Benign), None)
    for g, w in zip(as_tuple(got), want):
        assert g.shape == w.shape and g.dtype == w.dtype, (g.shape, w.shape)
        assert np.array_equal(g, w, equal_nan=True)
    if "out" in names:
        assert isinstance(got, Benign) and got.tag == "benign", type(got)
    print("OK")
    ''' % name)


@pytest.mark.parametrize("name", KERNELS)
def test_malicious_subclass_is_used_as_its_buffer(name):
    """A subclass that lies about shape/strides/size/ndim and hijacks every NumPy function
    and method: in each argument position alone, and in all at once, the call either gives
    exactly the plain-array result (the real buffer is used) or a TypeError/ValueError."""
    run_child(r'''
    names, build = BUILDERS[%r]
    want = as_tuple(build(ident, None))
    positions = [(n,) for n in names] + [None]
    outcomes = []
    for which in positions:
        try:
            got = build(lambda a: a.view(Liar), which)
        except (TypeError, ValueError) as e:
            outcomes.append((which, type(e).__name__))
            continue
        for g, w in zip(as_tuple(got), want):
            assert g.shape == w.shape, (which, g.shape, w.shape)
            assert np.array_equal(g, w, equal_nan=True), which
        outcomes.append((which, "same result"))
    print(outcomes)
    print("OK")
    ''' % name)


def test_masked_arrays_are_refused():
    x = np.ma.masked_array(np.ones((2, 3), F32), mask=[[0, 1, 0], [0, 0, 0]])
    for call in (lambda: normcy.relu(x), lambda: normcy.layer_norm(x),
                 lambda: normcy.softmax(x), lambda: normcy.batch_norm(x, np.zeros(3), np.ones(3))):
        with pytest.raises(TypeError, match="x is a numpy.ma.MaskedArray"):
            call()
    with pytest.raises(TypeError, match="out is a numpy.ma.MaskedArray"):
        normcy.gelu(np.ones((2, 3), F32), out=np.ma.masked_array(np.zeros((2, 3), F32)))


# --------------------------------------------------------------------------- issue 9, item 3
# 14-dimensional views of one buffer whose overlap NumPy cannot decide within the work bound
# (each view alone is provably free of self-overlap: its sorted strides are super-increasing)
_HARD_STRIDES = [78, 3520, 304, 18, 100932, 8, 36, 20391, 7978, 1303, 4, 43051, 601, 148]
_HARD_OFFSET = 541


def _hard_pair():
    from numpy.lib.stride_tricks import as_strided
    buf = np.zeros(sum(_HARD_STRIDES) + _HARD_OFFSET + 1, F32)
    st = tuple(4 * s for s in _HARD_STRIDES)
    x = as_strided(buf, (2,) * 14, st)
    out = as_strided(buf[_HARD_OFFSET:], (2,) * 14, st)
    return buf, x, out


def test_overlap_check_is_bounded():
    buf, x, out = _hard_pair()
    # the premise: NumPy gives up on this pair within the bound normcy uses
    with pytest.raises(np.exceptions.TooHardError):
        np.shares_memory(x, out, max_work=_validate.OVERLAP_MAX_WORK)
    before = buf.copy()
    for call in (lambda: normcy.relu(x, out=out), lambda: normcy.softmax(x, out=out),
                 lambda: normcy.bias_activation(x, None, "gelu", residual=x, out=out),
                 lambda: normcy.layer_norm(x, out=out), lambda: normcy.add_rms_norm(x, x, out=out),
                 lambda: normcy.batch_norm(x, np.zeros(2), np.ones(2), out=out)):
        t = time.perf_counter()
        with pytest.raises(ValueError, match="cannot tell within the work bound whether out"):
            call()
        assert time.perf_counter() - t < 2.0
    assert np.array_equal(buf, before)   # refused before anything was written


def test_overlap_check_still_exact_for_easy_cases():
    buf = np.arange(40, dtype=F32)
    even, odd = buf[0::2].reshape(4, 5), buf[1::2].reshape(4, 5)
    normcy.relu(even, out=odd)            # interleaved but disjoint: accepted
    np.testing.assert_array_equal(odd, np.maximum(even, 0))
    b2 = np.zeros(20, F32)
    with pytest.raises(ValueError, match="partially overlaps"):
        normcy.relu(b2[:12].reshape(3, 4), out=b2[4:16].reshape(3, 4))


def test_outputs_with_internally_overlapping_elements_are_refused():
    """A writeable zero-stride (or as_strided) out would make the result depend on the
    write order (and on the thread schedule): refused; inputs may be broadcast views."""
    from numpy.lib.stride_tricks import as_strided
    x = np.random.default_rng(3).standard_normal((4, 6)).astype(F32)
    row = np.zeros(6, F32)
    out0 = as_strided(row, (4, 6), (0, 4))                  # 4 rows aliasing one
    assert out0.flags.writeable
    overl = as_strided(np.zeros(30, F32), (4, 6), (12, 4))  # rows 3 apart, 6 long
    for out in (out0, overl):
        for call in (lambda: normcy.relu(x, out=out), lambda: normcy.softmax(x, out=out),
                     lambda: normcy.layer_norm(x, out=out),
                     lambda: normcy.add_layer_norm(x, x, sum_out=out),
                     lambda: normcy.batch_norm(x, np.zeros(6), np.ones(6), axis=-1, out=out)):
            with pytest.raises(ValueError, match="internally overlapping"):
                call()
    # a broadcast input is fine
    xb = np.broadcast_to(x[0], (4, 6))
    np.testing.assert_array_equal(normcy.relu(xb), np.maximum(np.asarray(xb), 0))
    # unusual but alias-free layouts are accepted
    base = np.zeros((6, 8), F32)
    np.testing.assert_array_equal(normcy.relu(x, out=base[:4, ::-1][:, :6]), np.maximum(x, 0))
    np.testing.assert_array_equal(normcy.relu(x.T.copy(), out=base.T[:6, :4]),
                                  np.maximum(x.T, 0))


def test_unaligned_float32_views_are_refused_by_every_kernel():
    """Found by the fuzzer under UBSan (misaligned float loads in the ops kernels): the ops
    now refuse unaligned views as the norm kernels always did."""
    raw = np.zeros(4 * 12 + 1, np.uint8)
    xu = raw[1:].view(F32).reshape(3, 4)
    assert not xu.flags.aligned
    x = np.ones((3, 4), F32)
    for call in (lambda: normcy.relu(xu), lambda: normcy.gelu(x, out=xu),
                 lambda: normcy.softmax(xu), lambda: normcy.bias_add(xu, np.zeros(4)),
                 lambda: normcy.bias_activation(x, None, "relu", residual=xu),
                 lambda: normcy.layer_norm(xu), lambda: normcy.rms_norm(x, out=xu),
                 lambda: normcy.batch_norm(xu, np.zeros(4), np.ones(4), axis=-1)):
        with pytest.raises(ValueError, match="must be aligned"):
            call()
    # small parameters (bias, weight, mask) are copied to aligned memory instead
    bu = np.zeros(4 * 4 + 1, np.uint8)[1:].view(F32)
    bu[:] = [1.0, -2.0, 3.0, 0.5]
    assert not bu.flags.aligned
    want = x + np.array([1.0, -2.0, 3.0, 0.5], F32)
    np.testing.assert_array_equal(normcy.bias_add(x, bu), want)
    np.testing.assert_array_equal(normcy.layer_norm(x, bu, bu),
                                  normcy.layer_norm(x, bu.copy(), bu.copy()))
    np.testing.assert_array_equal(normcy.softmax(x, mask=bu),
                                  normcy.softmax(x, mask=bu.copy()))


# --------------------------------------------------------------------------- issue 9, item 4
def _x():
    return np.random.default_rng(0).standard_normal((64, 40)).astype(F32)


_NT_CALLS = {
    "layer_norm": lambda x, **k: normcy.layer_norm(x, **k),
    "add_layer_norm": lambda x, **k: normcy.add_layer_norm(x, x, **k),
    "rms_norm": lambda x, **k: normcy.rms_norm(x, **k),
    "add_rms_norm": lambda x, **k: normcy.add_rms_norm(x, x, **k),
    "batch_norm": lambda x, **k: normcy.batch_norm(x, np.zeros(40), np.ones(40), **k),
    "softmax": lambda x, **k: normcy.softmax(x, **k),
    "gelu": lambda x, **k: normcy.gelu(x, **k),
    "relu": lambda x, **k: normcy.relu(x, **k),
    "bias_activation": lambda x, **k: normcy.bias_activation(x, np.ones(40), "relu", **k),
    "bias_add": lambda x, **k: normcy.bias_add(x, np.ones(40), **k),
}


@pytest.mark.parametrize("name", sorted(_NT_CALLS))
def test_num_threads_any_integer_type_and_size(name):
    call, x = _NT_CALLS[name], _x()
    want = call(x, num_threads=1)
    for nt in (10 ** 30, np.int64(2), np.uint8(3), np.int32(1), 4097):
        np.testing.assert_array_equal(call(x, num_threads=nt), want, err_msg=repr(nt))
    for bad in (0, -1, -10 ** 30, np.int64(-2)):
        with pytest.raises(ValueError, match="num_threads"):
            call(x, num_threads=bad)
    for bad in (True, 2.0, "2", np.float64(2.0), [2]):
        with pytest.raises(TypeError, match="num_threads"):
            call(x, num_threads=bad)


@pytest.mark.parametrize("name", sorted(_NT_CALLS))
def test_num_threads_validated_on_empty_input_too(name):
    x = np.zeros((0, 40), F32)
    assert _NT_CALLS[name](x, num_threads=2).shape == (0, 40)
    with pytest.raises(ValueError, match="num_threads"):
        _NT_CALLS[name](x, num_threads=0)
    with pytest.raises(TypeError, match="num_threads"):
        _NT_CALLS[name](x, num_threads="2")


def test_set_num_threads_same_rules(restore_num_threads):
    normcy.set_num_threads(10 ** 30)
    assert normcy.get_num_threads() == 4096       # the documented cap
    normcy.set_num_threads(np.uint16(3))
    assert normcy.get_num_threads() == 3
    for bad, exc in ((True, TypeError), (2.0, TypeError), (-10 ** 30, ValueError)):
        with pytest.raises(exc, match="num_threads"):
            normcy.set_num_threads(bad)
    assert normcy.get_num_threads() == 3


_EPS_CALLS = {
    "layer_norm": lambda eps: normcy.layer_norm(_x(), eps=eps),
    "add_layer_norm": lambda eps: normcy.add_layer_norm(_x(), _x(), eps=eps),
    "rms_norm": lambda eps: normcy.rms_norm(_x(), eps=eps),
    "add_rms_norm": lambda eps: normcy.add_rms_norm(_x(), _x(), eps=eps),
    "batch_norm": lambda eps: normcy.batch_norm(_x(), np.zeros(40), np.ones(40), eps=eps),
    "fold_batch_norm": lambda eps: normcy.fold_batch_norm(np.zeros(3), np.ones(3), eps=eps),
    "fold_batch_norm_into_linear": lambda eps: normcy.fold_batch_norm_into_linear(
        np.ones((3, 2), F32), None, np.zeros(3), np.ones(3), eps=eps),
    "TransformerEncoderLayer": lambda eps: normcy.TransformerEncoderLayer(
        8, 2, 16, layer_norm_eps=eps),
}


@pytest.mark.parametrize("name", sorted(_EPS_CALLS))
def test_eps_parsing(name):
    call = _EPS_CALLS[name]
    argname = "layer_norm_eps" if name == "TransformerEncoderLayer" else "eps"
    for ok in (1e-5, 0, 1, np.float32(1e-3), np.float64(1e-5), np.int64(1), np.array(1e-5)):
        call(ok)
    for bad in (10 ** 400, -10 ** 400, float("inf"), float("nan"), -1e-5, -1):
        with pytest.raises(ValueError, match=r"\b%s\b" % argname):
            call(bad)
    for bad in ("1e-5", b"1", 1e-5 + 0j, np.complex128(1e-5), True, None, [1e-5],
                np.array([1e-5])):
        with pytest.raises(TypeError, match=r"\b%s\b" % argname):
            call(bad)


def test_transformer_layer_norm_eps_value_is_used():
    layer = normcy.TransformerEncoderLayer(8, 2, 16, layer_norm_eps=np.float32(0.25))
    assert layer.layer_norm_eps == float(np.float32(0.25))
    layer = normcy.TransformerEncoderLayer(np.int64(8), np.int8(2), np.uint16(16))
    assert (layer.d_model, layer.nhead, layer.dim_feedforward) == (8, 2, 16)
    with pytest.raises(TypeError, match="d_model"):
        normcy.TransformerEncoderLayer(8.0, 2, 16)
    with pytest.raises(TypeError, match="nhead"):
        normcy.TransformerEncoderLayer(8, True, 16)
    for name, args in (("d_model", (10 ** 30, 1, 4)), ("dim_feedforward", (8, 2, 2 ** 31))):
        with pytest.raises(ValueError, match=name):
            normcy.TransformerEncoderLayer(*args)


def test_transformer_encoder_final_norm_eps_parsing():
    layer = normcy.TransformerEncoderLayer(8, 2, 16)
    w, b = np.ones(8, F32), np.zeros(8, F32)
    enc = normcy.TransformerEncoder([layer],
                                    norm={"weight": w, "bias": b, "eps": np.float32(1e-3)})
    assert enc.norm[2] == float(np.float32(1e-3))
    for bad, exc in (("1e-5", TypeError), (True, TypeError), (10 ** 400, ValueError),
                     (-1.0, ValueError), (float("nan"), ValueError)):
        with pytest.raises(exc, match="final norm eps"):
            normcy.TransformerEncoder([layer], norm={"weight": w, "bias": b, "eps": bad})


def test_softmax_scale_parsing():
    x = _x()
    want = normcy.softmax(x, scale=2.0)
    np.testing.assert_array_equal(normcy.softmax(x, scale=2), want)
    np.testing.assert_array_equal(normcy.softmax(x, scale=np.int64(2)), want)
    np.testing.assert_array_equal(normcy.softmax(x, scale=np.float32(2)), want)
    for bad in (10 ** 400, -10 ** 400, 1e39, float("nan"), -float("inf")):
        with pytest.raises(ValueError, match="scale must be finite"):
            normcy.softmax(x, scale=bad)
    for bad in ("2", 2j, True, [2.0]):
        with pytest.raises(TypeError, match="scale must be a real number"):
            normcy.softmax(x, scale=bad)


def test_batch_norm_axis_parsing():
    x = np.random.default_rng(1).standard_normal((4, 3, 5)).astype(F32)
    m, v = np.zeros(3), np.ones(3) * 2
    want = normcy.batch_norm(x, m, v, axis=1)
    for ax in (np.int64(1), np.int8(-2), np.uint32(1), -2):
        np.testing.assert_array_equal(normcy.batch_norm(x, m, v, axis=ax), want)
    for bad in (2 ** 40, -2 ** 40, 2 ** 70, 3, -4, np.int64(2 ** 62)):
        with pytest.raises(ValueError, match="axis"):
            normcy.batch_norm(x, m, v, axis=bad)
    for bad in (True, 1.0, "1", None):
        with pytest.raises(TypeError, match="axis"):
            normcy.batch_norm(x, m, v, axis=bad)


# --------------------------------------------------------------------------- issue 9, item 8
@pytest.mark.parametrize("arg", ["bias", "bn_weight", "bn_bias", "running_mean", "running_var"])
@pytest.mark.parametrize("bad", [np.ones(3, complex), np.ones(3, bool), np.array(["a"] * 3)])
def test_fold_into_linear_refuses_complex_and_bool_parameters(arg, bad):
    kw = dict(weight=np.ones((3, 2), F32), bias=np.zeros(3, F32), running_mean=np.zeros(3),
              running_var=np.ones(3), bn_weight=np.ones(3), bn_bias=np.zeros(3))
    kw[arg] = bad
    with pytest.raises(TypeError, match=r"\b%s\b must be a 1-d float array" % arg):
        normcy.fold_batch_norm_into_linear(**kw)
    # the same rule as fold_batch_norm's
    with pytest.raises(TypeError, match="bias must be a 1-d float array"):
        normcy.fold_batch_norm(np.zeros(3), np.ones(3), None, bad)


def test_fold_into_linear_required_and_odd_parameters():
    W = np.ones((3, 2), F32)
    for arg in ("running_mean", "running_var"):
        kw = dict(weight=W, bias=None, running_mean=np.zeros(3), running_var=np.ones(3))
        kw[arg] = None
        with pytest.raises(TypeError, match=arg):
            normcy.fold_batch_norm_into_linear(**kw)
    with pytest.raises((TypeError, ValueError), match="bias"):
        normcy.fold_batch_norm_into_linear(W, [[1.0], [1.0, 2.0], 3.0], np.zeros(3), np.ones(3))

    class Flaky:
        """__array__ answers (3,) the first time and (5,) afterwards."""
        calls = 0

        def __array__(self, dtype=None, copy=None):
            Flaky.calls += 1
            return np.ones(3 if Flaky.calls == 1 else 5, dtype or np.float64)

    Wf, bf = normcy.fold_batch_norm_into_linear(W, Flaky(), np.zeros(3), np.ones(3), eps=0.0)
    np.testing.assert_array_equal(bf, np.ones(3, F32))
    np.testing.assert_array_equal(Wf, W)


def test_fold_into_linear_weight_dtype_is_a_type_error():
    for bad in (np.ones((3, 2), complex), np.ones((3, 2), bool)):
        with pytest.raises(TypeError, match="weight must be a float array"):
            normcy.fold_batch_norm_into_linear(bad, None, np.zeros(3), np.ones(3))


# --------------------------------------------------------------------------- the helpers
def test_validate_helpers_name_the_argument():
    v = _validate.as_int(np.int16(5), "n")
    assert v == 5 and type(v) is int
    with pytest.raises(ValueError, match="foo must be <= 3"):
        _validate.as_int(10 ** 40, "foo", maximum=3)
    with pytest.raises(TypeError, match="foo must be an integer"):
        _validate.as_int(np.bool_(True), "foo")
    assert _validate.as_float(np.float16(0.5), "bar") == 0.5
    assert math.isfinite(_validate.as_float(3.4e38, "bar", float32=True))
    with pytest.raises(ValueError, match="bar must be finite in float32"):
        _validate.as_float(3.5e38, "bar", float32=True)


# --------------------------------------------------------------------------- memory bounds
def test_temporary_memory_is_bounded():
    """NumPy temporaries a kernel call allocates (tracemalloc sees NumPy's allocations, not the
    norm kernels' C scratch of at most 3 rows per thread): none beyond O(features) for
    operands with a unit-stride last axis and an out; at most one copy per strided operand."""
    import tracemalloc

    rng = np.random.default_rng(0)
    x = rng.standard_normal((512, 512)).astype(F32)
    xs = rng.standard_normal((512, 1024)).astype(F32)[:, ::2]     # strided last axis
    out = np.empty_like(x)
    outT = np.empty_like(x).T.copy().T                               # F-ordered out
    w = np.ones(512, F32)
    calls = {
        "layer_norm": lambda x, **k: normcy.layer_norm(x, w, w, **k),
        "add_layer_norm": lambda x, **k: normcy.add_layer_norm(x, x, w, w, **k),
        "rms_norm": lambda x, **k: normcy.rms_norm(x, w, **k),
        "add_rms_norm": lambda x, **k: normcy.add_rms_norm(x, x, w, **k),
        "batch_norm": lambda x, **k: normcy.batch_norm(x, w, w, axis=-1, **k),
        "softmax": lambda x, **k: normcy.softmax(x, **k),
        "gelu": lambda x, **k: normcy.gelu(x, **k),
        "relu": lambda x, **k: normcy.relu(x, **k),
        "bias_activation": lambda x, **k: normcy.bias_activation(x, w, "gelu", residual=x, **k),
        "bias_add": lambda x, **k: normcy.bias_add(x, w, **k),
    }
    small = 64 * 1024
    for name, call in sorted(calls.items()):
        call(x, out=out)          # warm up (first-call allocations, caches)
        copies = 2 if name in ("bias_activation", "batch_norm") else 1
        for xin, o, bound in ((x, out, small), (xs, out, copies * x.nbytes + small),
                              (x, outT, x.nbytes + small)):
            tracemalloc.start()
            try:
                call(xin, out=o)
                peak = tracemalloc.get_traced_memory()[1]
            finally:
                tracemalloc.stop()
            assert peak <= bound, (name, xin.strides, o.strides, peak, bound)


def test_attention_scratch_allocation_failure_is_a_memory_error():
    """The fused attention's per-thread scratch is allocated before any work: when the
    allocation fails (here: an address-space limit just above what the process holds) the call
    raises MemoryError instead of returning with heads unwritten, and works again once memory
    is back."""
    if not sys.platform.startswith("linux"):
        pytest.skip("uses RLIMIT_AS and /proc/self/status")
    with open("/proc/self/maps") as f:
        if "libasan" in f.read():
            # AddressSanitizer reserves terabytes of shadow address space and aborts on an
            # allocation failure instead of returning NULL
            pytest.skip("an address-space limit cannot be tested under AddressSanitizer")
    run_child(r'''
    import resource
    from normcy import _gemm
    rng = np.random.default_rng(0)
    L, H = 8192, 64                       # one head of 64: ~4 MB of scratch per thread
    qkv = rng.standard_normal((L, 3 * H)).astype(F32)
    bq = np.zeros(H, F32)
    ctx = np.full((L, H), np.nan, F32)
    want = np.empty_like(ctx)
    _gemm.attention(qkv[:16], bq, want[:16], 1, 16, 1, num_threads=1)   # warm, small
    vm = [int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmSize:")][0]
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (vm * 1024 + 256 * 1024, hard))
    try:
        _gemm.attention(qkv, bq, ctx, 1, L, 1, num_threads=1)
    except MemoryError as e:
        assert "scratch" in str(e), e
    else:
        raise AssertionError("no MemoryError under the address-space limit")
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
    _gemm.attention(qkv, bq, ctx, 1, L, 1, num_threads=1)
    _gemm.attention(qkv, bq, want, 1, L, 1, num_threads=1)
    assert not np.isnan(ctx).any() and np.array_equal(ctx, want)
    print("OK")
    ''')


# ------------------------------------------------------------------ found in session 19
def test_masked_parameters_are_refused_too():
    x = np.ones((2, 4), np.float32)
    m = np.ma.masked_array(np.array([100, 1, 1, 1], np.float32), mask=[1, 0, 0, 0])
    for call in (lambda: normcy.layer_norm(x, m), lambda: normcy.layer_norm(x, None, m),
                 lambda: normcy.rms_norm(x, m), lambda: normcy.add_layer_norm(x, x, m),
                 lambda: normcy.add_layer_norm(x, x, x_bias=m),
                 lambda: normcy.add_rms_norm(x, x, m),
                 lambda: normcy.batch_norm(x, m, np.ones(4, np.float32), axis=-1),
                 lambda: normcy.batch_norm(x, np.zeros(4, np.float32), m, axis=-1),
                 lambda: normcy.fold_batch_norm(m, np.ones(4, np.float32)),
                 lambda: normcy.fold_batch_norm_into_linear(np.ones((4, 3), np.float32), None,
                                                            m, np.ones(4, np.float32)),
                 lambda: normcy.PackedLinear(np.ones((4, 4), np.float32))(
                     x, norm="layer_norm", norm_weight=m)):
        with pytest.raises(TypeError, match="masked array"):
            call()


def test_argument_kinds_are_type_errors():
    x = np.ones((2, 3), np.float32)
    for bad in ("False", None, np.array([True, False]), 1):
        with pytest.raises(TypeError, match="is_causal must be a bool"):
            normcy.softmax(x, is_causal=bad)
    with pytest.raises(TypeError, match="approximate"):
        normcy.gelu(x, approximate=True)
    with pytest.raises(TypeError, match="activation"):
        normcy.bias_activation(x, np.zeros(3, np.float32), ["relu"])
    lin = normcy.PackedLinear(np.ones((3, 3), np.float32))
    with pytest.raises(TypeError, match="activation"):
        lin(x, activation=["relu"])
    with pytest.raises(TypeError, match="eps"):
        lin(x, eps="abc")
    empty = np.zeros((0, 3), np.float32)
    for bad, exc in ((0, ValueError), (-5, ValueError), ("x", TypeError), (True, TypeError)):
        with pytest.raises(exc, match="num_threads"):
            lin(empty, num_threads=bad)
    assert lin(empty, num_threads=2).shape == (0, 3)


def test_elementwise_ops_take_numpys_64_dimensions():
    nd = 64 if np.lib.NumpyVersion(np.__version__) >= "2.0.0" else 32   # NumPy 1.x: 32
    x = np.arange(6, dtype=np.float32).reshape((1,) * (nd - 2) + (2, 3))
    for f in (normcy.relu, normcy.gelu, lambda a: normcy.softmax(a),
              lambda a: normcy.bias_add(a, np.ones(3, np.float32))):
        y = f(x)
        assert y.shape == x.shape
    np.testing.assert_array_equal(normcy.relu(x), np.maximum(x, 0))
