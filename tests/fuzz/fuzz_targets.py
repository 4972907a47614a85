"""Fuzz targets: one generator per public normcy function.

A generator takes a :class:`Ctx` and returns a :class:`Call`.  It builds a valid call, with
every argument passed through ``ctx.maybe(name, valid, bad_pool)``, which replaces it with a
malformed value from the pool (plus generic junk) with the call's mutation probability.  The
call may raise only TypeError/ValueError; if it returns, ``check`` compares the result with a
float64 reference computed from copies of the inputs taken before the call.

Adding a public function (e.g. ``normcy.PackedLinear``): write a generator and register it::

    @target("PackedLinear")
    def _packed_linear(c):
        n, k = c.dim(), c.dim()
        w = c.maybe("weight", c.f32((n, k)), _bad_arrays(c, (n, k)))
        ws = snap(w)
        def check(layer):
            x = np.ones((2, k), F32)
            assert_result(layer(x), f64(x) @ f64(ws).T, 1e-5 * (1 + abs(f64(ws)).sum(1)))
        return c.call(normcy.PackedLinear, (w,), {}, check)

tests/test_fuzz.py fails while a callable in ``normcy.__all__`` has no target here (the model
classes listed in ``NOT_FUZZED`` there excepted).
"""
import math

import numpy as np

import normcy

from fuzz_arena import LAYOUTS

F32 = np.float32
F64 = np.float64
RTOL, ATOL = 1e-5, 2e-5          # tests/conftest.py: normalized float32 outputs of O(1)

TARGETS = {}


def target(name):
    def deco(fn):
        TARGETS[name] = fn
        return fn
    return deco


# --------------------------------------------------------------------------- subclasses
class Benign(np.ndarray):
    def __array_finalize__(self, obj):
        self.tag = getattr(obj, "tag", "benign")


class Liar(np.ndarray):
    """Lies about its shape/size/strides and hijacks NumPy functions and methods."""
    @property
    def shape(self):
        s = np.ndarray.shape.__get__(self)
        return s[:-1] + (s[-1] + 64,) if len(s) else (64,)

    @property
    def size(self):
        return np.ndarray.size.__get__(self) + 4096

    @property
    def strides(self):
        return tuple(2 * s for s in np.ndarray.strides.__get__(self))

    def __array_function__(self, func, types, args, kwargs):
        return np.zeros(1, F32)

    def transpose(self, *a):
        return np.zeros(1, F32)

    def reshape(self, *a, **k):
        return np.zeros(1, F32)

    def astype(self, *a, **k):
        return np.zeros(1, F32)


# --------------------------------------------------------------------------- bad values
class _Weird:
    def __repr__(self):
        return "<weird>"


GENERIC_BAD = [None, "1", b"1", 1.5, 7, -3, True, [1, 2], (1,), {}, _Weird(), 1j,
               np.float32(1), 10 ** 30, -10 ** 30, float("nan"), float("inf")]
BAD_EPS = [-1, -1e-30, float("nan"), float("inf"), -float("inf"), 10 ** 400, -10 ** 400,
           "1e-5", 1e-5 + 0j, np.complex64(1), True, np.bool_(False), [1e-5],
           np.array([1e-5]), np.float32(1e-5), np.int64(0), 0]
BAD_THREADS = [0, -1, 10 ** 30, -10 ** 30, np.int64(2), np.uint8(3), np.int64(-1), 2.0,
               np.float64(2), "2", True, np.bool_(True), 2 ** 63, 2 ** 64 + 1, 4097]
BAD_AXIS = [2 ** 40, -2 ** 40, 2 ** 63, -2 ** 63 - 1, np.int64(2 ** 62), np.int8(-1), True,
            1.0, "1", None, 5, -6, np.uint64(2 ** 64 - 1)]
BAD_CHOICE = ["", "RELU", "gelu ", None, 1, b"relu", "standard\0", ["relu"], "tanh", "none"]
BAD_SCALE = [10 ** 400, -10 ** 400, 1e39, -1e39, float("nan"), float("inf"), "2", 2j, True,
             [2.0], np.float64(3.5e38), 0, 0.0, -1.0, np.int64(3), np.float32(0.5)]


def _bad_arrays(c, shape, w=False):
    """Malformed stand-ins for a float32 array of `shape` (factories: built on demand);
    w: an output (what the call may write; some of these are valid outputs)."""
    n = shape[-1] if shape else 1
    return [
        lambda: c.arena.array(shape, F64, scale=c.scale, writable=w),
        lambda: c.arena.array(shape, np.float16, writable=w),
        lambda: c.arena.array(shape, np.int32, writable=w),
        lambda: c.arena.array(shape, bool, writable=w),
        lambda: c.arena.array(shape, np.complex64, writable=w),
        lambda: c.arena.array(shape, ">f4", writable=w),
        lambda: c.arena.array(shape, "U3", writable=w),
        lambda: np.array(1.0, F32),
        lambda: c.arena.array(tuple(shape[:-1]) + (0,), writable=w),
        lambda: c.arena.array(tuple(shape[:-1]) + (n + 1,), writable=w),
        lambda: c.arena.array((2,) + tuple(shape), writable=w),
        lambda: c.arena.array(tuple(shape[1:]) or (n + 2,), writable=w),
        lambda: np.zeros(shape, F32).tolist() if np.prod(shape) < 200 else None,
        lambda: c.arena.unaligned_f32(shape, writable=w),
        lambda: np.ones((1,) * 32 + (n,), F32),
        lambda: np.ones((1,) * 63 + (n,), F32),
        lambda: c.arena.array(tuple(shape[:-1]) + (max(1, n // 2),), writable=w).view(Liar),
        lambda: np.ma.masked_array(np.ones(shape, F32)),
        lambda: np.broadcast_to(c.arena.array((n,)), shape),
        lambda: np.lib.stride_tricks.as_strided(c.arena.array((n,), writable=w), shape,
                                                (0,) * (len(shape) - 1) + (4,)),
    ]


def _bad_vecs(c, n):
    return [
        lambda: c.arena.array((n + 1,)),
        lambda: c.arena.array((max(n - 1, 0),)),
        lambda: c.arena.array((1, n)),
        lambda: c.arena.array((n,), np.complex128),
        lambda: c.arena.array((n,), bool),
        lambda: c.arena.array((n,), "U2"),
        lambda: np.array([object()] * n),
        lambda: c.arena.array((n,), np.float16),
        lambda: c.arena.array((n,), ">f8"),
        lambda: c.arena.array((n,), np.int64),
        lambda: [1.0] * n,
        lambda: [[1.0] * n],
        lambda: c.arena.array((n,)).view(Liar),
        lambda: np.ma.masked_array(np.ones(n, F32), mask=[True] + [False] * (n - 1)),
        lambda: 1.0,
    ]


# --------------------------------------------------------------------------- the context
class Call:
    def __init__(self, fn, args, kwargs, check=None, out=None, cleanup=None):
        self.fn, self.args, self.kwargs = fn, args, kwargs
        self.check, self.out, self.cleanup = check, out, cleanup


class Ctx:
    def __init__(self, rng, arena):
        self.rng = rng
        self.arena = arena
        r = rng.random()
        self.p_bad = 0.0 if r < 0.4 else (0.08 if r < 0.8 else 0.3)
        self.scale = float(rng.choice([1.0, 1.0, 3.0]))
        self.mutated = []

    # ---- random choices
    def pick(self, seq):
        return seq[int(self.rng.integers(len(seq)))]

    def maybe(self, name, good, pool):
        if self.p_bad and self.rng.random() < self.p_bad:
            self.mutated.append(name)
            v = self.pick(list(pool) + GENERIC_BAD)
            return v() if callable(v) and not isinstance(v, type) else v
        return good

    def dim(self):
        return int(self.pick([1, 2, 3, 4, 5, 7, 8, 16, 17, 31, 33, 64, 65, 100, 257]))

    def shape(self, min_nd=1, max_nd=4):
        nd = int(self.rng.integers(min_nd, max_nd + 1))
        lead = [int(self.pick([0, 1, 1, 2, 2, 3, 4, 5, 7])) if self.rng.random() < 0.9
                else 1 for _ in range(nd - 1)]
        if self.rng.random() < 0.02:          # the long-row (segmented) paths
            return tuple(lead[:1]) + (int(self.pick([8193, 9000, 20000])),)
        return tuple(lead) + (self.dim(),)

    def wrap(self, a):
        """Sometimes present an array as a subclass instance."""
        r = self.rng.random()
        if not isinstance(a, np.ndarray) or type(a) is not np.ndarray:
            return a
        if r < 0.08:
            return a.view(Benign)
        if r < 0.12:
            return a.view(Liar)
        return a

    def f32(self, shape, writable=False, layout=None):
        layout = layout or self.pick(LAYOUTS)
        return self.wrap(self.arena.array(shape, F32, layout, self.scale, writable))

    def vec(self, n, optional=True, dtype=None):
        if optional and self.rng.random() < 0.25:
            return None
        r = self.rng.random()
        if r < 0.6:
            return self.wrap(self.arena.array((n,), dtype or F32, self.pick(LAYOUTS)))
        if r < 0.75:
            return self.arena.array((n,), F64)
        if r < 0.85:
            return self.arena.array((n,), np.int16)
        return [float(v) for v in self.rng.standard_normal(n)]

    def eps(self):
        return self.pick([1e-5, 1e-5, 1e-6, 1e-3, 0.1, 1.0, np.float32(1e-5), np.float64(1e-6)])

    def threads(self):
        return self.pick([None, None, 1, 2, 3, np.int64(2)])

    def x_and_out(self, shape, allow_inplace=True):
        """(x, out, mode): out None, a fresh array, x itself, an interleaved disjoint view,
        a partially overlapping view, or malformed."""
        mode = self.pick(["none", "none", "none", "fresh", "fresh", "inplace", "interleaved",
                          "overlap", "bad"])
        if mode == "inplace" and allow_inplace:
            x = self.f32(shape, writable=True)
            return x, x, mode
        if mode in ("interleaved", "overlap") and shape[-1] >= 2:
            if mode == "interleaved":
                base = self.arena.array(tuple(shape[:-1]) + (2 * shape[-1],), F32, "c",
                                        self.scale, True)
                return self.wrap(base[..., 0::2]), self.wrap(base[..., 1::2]), mode
            base = self.arena.array(tuple(shape[:-1]) + (shape[-1] + 1,), F32, "c",
                                    self.scale, True)
            return self.wrap(base[..., :-1]), self.wrap(base[..., 1:]), mode
        x = self.f32(shape)
        if mode == "fresh":
            return x, self.f32(shape, writable=True), mode
        if mode == "bad":
            bad = self.pick(_bad_arrays(self, shape, True)
                            + [lambda: _readonly(self.arena.array(shape))])
            return x, bad(), mode
        return x, None, "none"

    def call(self, fn, args, kwargs, check=None, out=None, cleanup=None):
        return Call(fn, args, kwargs, check, out, cleanup)


def _readonly(a):
    a.flags.writeable = False
    return a


def snap(v):
    """A plain copy of an array argument (its real buffer: np.asarray ignores subclass
    overrides), taken before the call; other values unchanged."""
    if isinstance(v, np.ndarray):
        return np.array(np.asarray(v), copy=True)
    return v


def f64(v):
    return None if v is None else np.asarray(v, dtype=F64)


# --------------------------------------------------------------------------- comparisons
def assert_result(y, ref, tol, out=None, shape=None):
    """y is out (when given), float32 with ref's shape, same NaN pattern, |y - ref| <= tol."""
    if out is not None:
        assert y is out, "the result is not the out object passed in"
    y = np.asarray(y)
    assert y.dtype == F32, y.dtype
    assert y.shape == np.shape(ref), (y.shape, np.shape(ref))
    y = y.astype(F64)
    nan_y, nan_r = np.isnan(y), np.isnan(ref)
    assert np.array_equal(nan_y, nan_r), "NaN pattern differs: %d vs %d NaNs" % (
        nan_y.sum(), nan_r.sum())
    ok = ~nan_r
    err = np.abs(np.where(ok, y, 0) - np.where(ok, ref, 0))
    same_inf = np.isinf(ref) & (y == ref)
    tol = np.broadcast_to(tol, np.shape(ref))
    bad = (err > tol) & ok & ~same_inf
    assert not bad.any(), "max |y - ref| %.3g where tol %.3g (%d elements)" % (
        err[bad].max(), tol[bad][np.argmax(err[bad])], bad.sum())


def assert_close_any(y, ref, tol):
    """Any float dtype: same NaN pattern, the same infinities, finite values within tol
    (a finite reference beyond y's dtype range may give inf)."""
    y = np.asarray(y).astype(F64)
    ref = np.broadcast_to(ref, y.shape)
    assert np.array_equal(np.isnan(y), np.isnan(ref)), "NaN pattern differs"
    fin = np.isfinite(ref)
    assert np.array_equal(y[np.isinf(ref)], ref[np.isinf(ref)]), "infinities differ"
    tol = np.broadcast_to(tol, y.shape)
    err = np.abs(y[fin] - ref[fin])
    assert np.all(err <= tol[fin]), "max error %.3g" % (err.max() if err.size else 0)


def ref_ln(s, w, b, eps, convention="standard"):
    s = f64(s)
    mean = s.mean(axis=-1, keepdims=True)
    d = s - mean
    if convention == "standard":
        y = d / np.sqrt((d * d).mean(axis=-1, keepdims=True) + eps)
    else:
        y = d / (np.sqrt((d * d).sum(axis=-1, keepdims=True) / (s.shape[-1] - 1)) + eps)
    if w is not None:
        y = y * f64(w)
    if b is not None:
        y = y + f64(b)
    return y


def ref_rms(s, w, eps):
    s = f64(s)
    y = s / np.sqrt((s * s).mean(axis=-1, keepdims=True) + eps)
    return y if w is None else y * f64(w)


def norm_tol(ref):
    return ATOL + RTOL * np.abs(ref)


# --------------------------------------------------------------------------- norms
def _norm_target(name):
    is_add = name.startswith("add_")
    is_ln = "layer" in name
    fn = getattr(normcy, name)

    def gen(c):
        shape = c.shape()
        n = shape[-1]
        x, out, mode = c.x_and_out(shape)
        residual = None
        if is_add:
            residual = c.maybe("residual", c.f32(shape, writable=(mode == "inplace")),
                               _bad_arrays(c, shape))
        x = c.maybe("x", x, _bad_arrays(c, shape))
        out = c.maybe("out", out, _bad_arrays(c, shape, True)) if mode != "bad" else out
        w = c.maybe("weight", c.vec(n), _bad_vecs(c, n))
        b = c.maybe("bias", c.vec(n), _bad_vecs(c, n)) if is_ln else None
        eps = c.maybe("eps", c.eps(), BAD_EPS)
        nt = c.maybe("num_threads", c.threads(), BAD_THREADS)
        kw = {"out": out, "num_threads": nt}
        conv = "standard"
        if name == "layer_norm":
            conv = c.maybe("convention", c.pick(["standard", "standard", "annotated"]),
                           BAD_CHOICE)
            kw["convention"] = conv
        sum_out = None
        if is_add:
            xb = c.maybe("x_bias", c.vec(n), _bad_vecs(c, n))
            kw["x_bias"] = xb
            so_mode = c.pick(["none", "none", "fresh", "residual", "x"])
            if so_mode == "fresh":
                sum_out = c.f32(shape, writable=True)
            elif so_mode == "residual" and mode == "inplace":
                sum_out = residual
            sum_out = c.maybe("sum_out", sum_out, _bad_arrays(c, shape, True))
            kw["sum_out"] = sum_out
            args = (x, residual, w, b, eps) if is_ln else (x, residual, w, eps)
        else:
            args = (x, w, b, eps) if is_ln else (x, w, eps)
        xs, rs, ws, bs = snap(x), snap(residual), snap(w), snap(b)
        xbs = snap(kw.get("x_bias"))

        def check(y):
            s = xs
            if is_add:
                s = xs if xbs is None else np.add(xs, np.asarray(xbs, F32), dtype=F32)
                s = np.add(s, rs, dtype=F32)
                if sum_out is not None:
                    got = np.asarray(sum_out)
                    if xbs is None:
                        assert np.array_equal(got, s, equal_nan=True), "sum_out != x + residual"
                    else:
                        assert_result(sum_out, f64(s), 2.4e-7 * np.abs(f64(s)) + 1e-30)
            e = float(eps)
            ref = ref_ln(s, ws, bs, e, conv) if is_ln else ref_rms(s, ws, e)
            assert_result(y, ref, norm_tol(ref), out=out)
        return c.call(fn, args, kw, check)
    return gen


for _n in ("layer_norm", "add_layer_norm", "rms_norm", "add_rms_norm"):
    target(_n)(_norm_target(_n))


@target("batch_norm")
def _batch_norm(c):
    shape = c.shape(1, 4)
    nd = len(shape)
    axis = c.pick([1, 1, -1, 0]) if nd > 1 else c.pick([0, -1])
    ch = shape[axis]
    x, out, mode = c.x_and_out(shape)
    x = c.maybe("x", x, _bad_arrays(c, shape))
    m = c.maybe("running_mean", c.vec(ch, optional=False), _bad_vecs(c, ch))
    v = c.maybe("running_var", np.abs(c.arena.array((ch,))) + c.pick([0.1, 1.0, 0.0]),
                _bad_vecs(c, ch) + [lambda: -np.ones(ch)])
    w = c.maybe("weight", c.vec(ch), _bad_vecs(c, ch))
    b = c.maybe("bias", c.vec(ch), _bad_vecs(c, ch))
    eps = c.maybe("eps", c.eps(), BAD_EPS)
    axis = c.maybe("axis", axis, BAD_AXIS)
    nt = c.maybe("num_threads", c.threads(), BAD_THREADS)
    snaps = [snap(a) for a in (x, m, v, w, b)]

    def check(y):
        xs, ms, vs, ws, bs = snaps
        ax = int(axis) % xs.ndim
        bshape = [1] * xs.ndim
        bshape[ax] = xs.shape[ax]
        e = float(eps)
        scale = 1.0 / np.sqrt(f64(vs) + e)
        if ws is not None:
            scale = scale * f64(ws)
        shift = -f64(ms) * scale + (0.0 if bs is None else f64(bs))
        ref = f64(xs) * scale.reshape(bshape) + shift.reshape(bshape)
        big = np.abs(f64(xs) * scale.reshape(bshape)) + np.abs(f64(ms) * scale).reshape(bshape)
        assert_result(y, ref, ATOL * (1 + big) + RTOL * np.abs(ref), out=out)
    return c.call(normcy.batch_norm, (x, m, v, w, b, eps), {"axis": axis, "out": out,
                                                             "num_threads": nt}, check)


@target("fold_batch_norm")
def _fold(c):
    ch = c.dim()
    m = c.maybe("running_mean", c.vec(ch, optional=False), _bad_vecs(c, ch))
    v = c.maybe("running_var", np.abs(c.arena.array((ch,))) + c.pick([0.1, 0.0]),
                _bad_vecs(c, ch) + [lambda: -np.ones(ch)])
    w = c.maybe("weight", c.vec(ch), _bad_vecs(c, ch))
    b = c.maybe("bias", c.vec(ch), _bad_vecs(c, ch))
    eps = c.maybe("eps", c.eps(), BAD_EPS)
    snaps = [snap(a) for a in (m, v, w, b)]

    def check(res):
        ms, vs, ws, bs = snaps
        scale, shift = res
        s = (1.0 if ws is None else f64(ws)) / np.sqrt(f64(vs) + float(eps))
        s = np.broadcast_to(s, (ch,))
        sh = (0.0 if bs is None else f64(bs)) - f64(ms) * s
        assert_result(scale, s, 2.4e-7 * np.abs(s) + 1e-37)
        assert_result(shift, sh, 2.4e-7 * (np.abs(sh) + np.abs(f64(ms) * s)) + 1e-37)
    return c.call(normcy.fold_batch_norm, (m, v, w, b, eps), {}, check)


@target("fold_batch_norm_into_linear")
def _fold_linear(c):
    co, ci = c.dim(), c.pick([1, 3, 8])
    wdt = c.pick([F32, F32, F64, np.float16, np.int32])
    W = c.maybe("weight", c.arena.array((co, ci) + c.pick([(), (1, 1), (2,)]), wdt),
                _bad_arrays(c, (co, ci)))
    bias = c.maybe("bias", c.vec(co), _bad_vecs(c, co))
    m = c.maybe("running_mean", c.vec(co, optional=False), _bad_vecs(c, co))
    v = c.maybe("running_var", np.abs(c.arena.array((co,))) + 0.1, _bad_vecs(c, co))
    g = c.maybe("bn_weight", c.vec(co), _bad_vecs(c, co))
    beta = c.maybe("bn_bias", c.vec(co), _bad_vecs(c, co))
    eps = c.maybe("eps", c.eps(), BAD_EPS)
    snaps = [snap(a) for a in (W, bias, m, v, g, beta)]

    def check(res):
        Ws, bs, ms, vs, gs, betas = snaps
        Wn, bn = res
        Ws = np.asarray(Ws)
        odt = Ws.dtype if Ws.dtype.kind == "f" else np.dtype(F32)
        assert Wn.dtype == odt and bn.dtype == odt, (Wn.dtype, bn.dtype, odt)
        s = (1.0 if gs is None else f64(gs)) / np.sqrt(f64(vs) + float(eps))
        s = np.broadcast_to(s, (co,))
        wref = f64(Ws) * s.reshape((co,) + (1,) * (Ws.ndim - 1))
        bref = ((0.0 if bs is None else f64(bs)) - f64(ms)) * s + (0.0 if betas is None
                                                                  else f64(betas))
        u = 4 * float(np.finfo(odt).eps)
        mag = (np.abs(0.0 if bs is None else f64(bs)) + np.abs(f64(ms))) * np.abs(s) \
            + np.abs(0.0 if betas is None else f64(betas))
        tiny = float(np.finfo(odt).smallest_subnormal)     # rounding near zero
        assert_close_any(Wn, wref, u * np.abs(wref) + tiny)
        assert_close_any(bn, bref, u * mag + tiny)
    return c.call(normcy.fold_batch_norm_into_linear, (W, bias, m, v, g, beta, eps), {}, check)


# --------------------------------------------------------------------------- ops
_erfc = np.vectorize(math.erfc, otypes=[F64])


def ref_act(v, act):
    v = f64(v)
    if act == "relu":
        return np.maximum(v, 0.0)
    if act == "gelu":
        return v * 0.5 * _erfc(-v / math.sqrt(2.0))
    if act == "gelu_tanh":
        u = math.sqrt(2.0 / math.pi) * (v + 0.044715 * v ** 3)
        with np.errstate(over="ignore"):
            return v / (1.0 + np.exp(-2.0 * u))
    return v


def act_tol(v, a, act):
    v = np.abs(f64(v))
    if act == "gelu":
        r = 4e-7 * np.maximum(5.0, v * v / 2)
    elif act == "gelu_tanh":
        u = math.sqrt(2.0 / math.pi) * (v + 0.044715 * v ** 3)
        r = 4e-7 * np.maximum(5.0, 2 * u)
    else:
        r = 0.0
    return r * np.abs(a) + 1e-37


ACTS = {None: None, "identity": None, "none": None, "relu": "relu", "gelu": "gelu",
        "gelu_tanh": "gelu_tanh"}


def _elementwise_target(name):
    def gen(c):
        shape = c.shape()
        n = shape[-1]
        x, out, mode = c.x_and_out(shape)
        x = c.maybe("x", x, _bad_arrays(c, shape))
        out = c.maybe("out", out, _bad_arrays(c, shape, True)) if mode != "bad" else out
        nt = c.maybe("num_threads", c.threads(), BAD_THREADS)
        kw = {"out": out, "num_threads": nt}
        bias = residual = None
        if name == "relu":
            fn, args, act = normcy.relu, (x,), "relu"
        elif name == "gelu":
            approx = c.maybe("approximate", c.pick(["none", "tanh"]), BAD_CHOICE)
            kw["approximate"] = approx
            fn, args, act = normcy.gelu, (x,), ("gelu_tanh" if approx == "tanh" else "gelu")
        elif name == "bias_add":
            bias = c.maybe("bias", c.vec(n, optional=False), _bad_vecs(c, n))
            fn, args, act = normcy.bias_add, (x, bias), None
        else:
            bias = c.maybe("bias", c.vec(n), _bad_vecs(c, n))
            activation = c.maybe("activation", c.pick(list(ACTS)), BAD_CHOICE)
            if mode != "inplace" and c.rng.random() < 0.5:
                residual = c.f32(shape)
            elif mode == "inplace" and c.rng.random() < 0.3:
                residual = x
            residual = c.maybe("residual", residual, _bad_arrays(c, shape))
            kw["residual"] = residual
            fn, args = normcy.bias_activation, (x, bias, activation)
            act = ACTS.get(activation) if isinstance(activation, (str, type(None))) else None
        xs, bs, rs = snap(x), snap(bias), snap(residual)

        def check(y):
            v = f64(xs)
            if bs is not None:
                v = f64(np.add(xs, np.asarray(bs, F32), dtype=F32))
            a = ref_act(v, act)
            tol = act_tol(v, a, act)
            if rs is not None:
                a = a + f64(rs)
                tol = tol + 2.4e-7 * (np.abs(a) + np.abs(f64(rs)))
            elif act is None:
                tol = tol + 2.4e-7 * np.abs(a)
            assert_result(y, a, tol, out=out)
        return c.call(fn, args, kw, check)
    return gen


for _n in ("relu", "gelu", "bias_add", "bias_activation"):
    target(_n)(_elementwise_target(_n))


def ref_softmax(x, scale, mask, kpm, causal):
    v = f64(x) * F64(F32(scale))
    if mask is not None:
        v = v + f64(np.asarray(mask, F32))
    v = np.broadcast_to(v, x.shape).copy()
    if kpm is not None:
        v[np.broadcast_to(kpm, x.shape)] = -np.inf
    if causal:
        q, k = x.shape[-2], x.shape[-1]
        v[..., np.triu(np.ones((q, k), dtype=bool), 1)] = -np.inf
    m = v.max(axis=-1, keepdims=True)
    dead = np.isneginf(m)
    with np.errstate(invalid="ignore", over="ignore"):
        e = np.exp(v - np.where(dead, 0.0, m))
        s = e.sum(axis=-1, keepdims=True)
        return np.where(dead, 0.0, e / s), v


@target("softmax")
def _softmax(c):
    shape = c.shape(1, 4)
    n = shape[-1]
    x, out, mode = c.x_and_out(shape)
    x = c.maybe("x", x, _bad_arrays(c, shape))
    out = c.maybe("out", out, _bad_arrays(c, shape, True)) if mode != "bad" else out
    scale = c.maybe("scale", c.pick([None, None, 0.125, 1.0, 2, np.float32(0.5)]), BAD_SCALE)
    mask = kpm = None
    if c.rng.random() < 0.4:
        k = int(c.rng.integers(1, len(shape) + 1))
        mshape = tuple(1 if c.rng.random() < 0.3 else s for s in shape[-k:])
        mask = c.arena.array(mshape, c.pick([F32, F32, F64, np.float16]), c.pick(LAYOUTS))
        if mask.size and c.rng.random() < 0.3:
            mask.reshape(-1)[:1] = -np.inf if mask.flags.c_contiguous else 0
    mask = c.maybe("mask", mask, _bad_arrays(c, shape))
    if c.rng.random() < 0.3:
        k = int(c.rng.integers(1, len(shape) + 1))
        kshape = tuple(1 if c.rng.random() < 0.4 else s for s in shape[-k:])
        kpm = c.arena.array(kshape, bool, c.pick(LAYOUTS))
    kpm = c.maybe("key_padding_mask", kpm, _bad_arrays(c, shape))
    causal = c.maybe("is_causal", len(shape) >= 2 and c.rng.random() < 0.3,
                     [True, 1, np.bool_(True), "yes", 0])
    nt = c.maybe("num_threads", c.threads(), BAD_THREADS)
    xs, ms, ks = snap(x), snap(mask), snap(kpm)

    def check(y):
        sc = 1.0 if scale is None else float(scale)
        ref, logits = ref_softmax(xs, sc, ms, ks, bool(causal))
        rel = 1e-6 + n * 1e-9
        lv = np.abs(np.where(np.isfinite(logits), logits, 0.0))
        rel = rel + 1.2e-7 * (lv + lv.max(axis=-1, keepdims=True))
        assert not np.isnan(np.asarray(y)).any() or np.isnan(xs).any()
        assert_result(y, ref, rel * ref + 1e-12, out=out)
    return c.call(normcy.softmax, (x,), {"scale": scale, "mask": mask,
                                         "key_padding_mask": kpm, "is_causal": causal,
                                         "out": out, "num_threads": nt}, check)


# --------------------------------------------------------------------------- threads, models
@target("set_num_threads")
def _set_threads(c):
    before = normcy.get_num_threads()
    n = c.maybe("num_threads", c.pick([1, 2, 3, 8, np.int64(2), 10 ** 30]), BAD_THREADS)

    def check(res):
        assert res is None
        want = 1 if normcy.fork_serial() else min(int(n), 4096)
        assert normcy.get_num_threads() == want, (normcy.get_num_threads(), want)

    def cleanup():
        normcy.set_num_threads(before)
    return c.call(normcy.set_num_threads, (n,), {}, check, cleanup=cleanup)


@target("get_num_threads")
def _get_threads(c):
    def check(res):
        assert type(res) is int and 1 <= res <= 4096
    return c.call(normcy.get_num_threads, (), {}, check)


@target("TransformerEncoderLayer")
def _layer(c):
    small = [1, 2, 4, np.int64(2), 0, -1, 2.0, "4", True, None]
    nhead = c.maybe("nhead", c.pick([1, 2, 4]), small)
    d = c.maybe("d_model", 8, small + [7, np.uint8(8)])
    f = c.maybe("dim_feedforward", c.pick([4, 16]), small)
    kw = {"activation": c.maybe("activation", c.pick(["relu", "gelu", "gelu_tanh"]),
                                BAD_CHOICE),
          "norm_first": bool(c.rng.random() < 0.5),
          "layer_norm_eps": c.maybe("layer_norm_eps", c.eps(), BAD_EPS),
          "norm": c.maybe("norm", c.pick(["layer", "rms"]), BAD_CHOICE)}

    def check(layer):
        assert layer.layer_norm_eps == float(kw["layer_norm_eps"])
        x = np.random.default_rng(0).standard_normal((3, 1, layer.d_model)).astype(F32)
        y = layer(x)
        assert y.shape == x.shape and np.all(np.isfinite(y))
    return c.call(normcy.TransformerEncoderLayer, (d, nhead, f), kw, check)


@target("PackedLinear")
def _packed_linear(c):
    """PackedLinear(weight, bias)(x, activation=, residual=, out=, num_threads=)."""
    shape = c.shape()
    k = shape[-1]
    n = c.dim()
    oshape = tuple(shape[:-1]) + (n,)
    w = c.maybe("weight", c.f32((n, k)), _bad_arrays(c, (n, k)))
    b = c.maybe("bias", c.vec(n), _bad_vecs(c, n))
    x = c.maybe("x", c.f32(shape), _bad_arrays(c, shape))
    out = c.f32(oshape, writable=True) if c.rng.random() < 0.4 else None
    out = c.maybe("out", out, _bad_arrays(c, oshape, True))
    residual = c.f32(oshape) if c.rng.random() < 0.4 else None
    if out is not None and residual is None and c.rng.random() < 0.3:
        residual = out                      # in place into the residual: allowed
    residual = c.maybe("residual", residual, _bad_arrays(c, oshape))
    activation = c.maybe("activation", c.pick(list(ACTS)), BAD_CHOICE)
    nt = c.maybe("num_threads", c.threads(), BAD_THREADS)
    ws, bs, xs, rs = snap(w), snap(b), snap(x), snap(residual)

    def run(weight, bias, x, *, activation, residual, out, num_threads):
        return normcy.PackedLinear(weight, bias)(x, activation=activation, residual=residual,
                                                 out=out, num_threads=num_threads)

    def check(y):
        xw = f64(xs) @ f64(ws).T
        # a float32 dot product of length k: |error| <= k eps sum |x_i w_i| (fixed order)
        mag = np.abs(f64(xs)) @ np.abs(f64(ws)).T
        v = xw if bs is None else xw + f64(np.asarray(bs, F32))
        act = ACTS.get(activation) if isinstance(activation, (str, type(None))) else None
        a = ref_act(v, act)
        tol = act_tol(v, a, act) + 1.2 * (k + 2) * 6e-8 * (mag + np.abs(v)) + 1e-30
        if rs is not None:
            a = a + f64(rs)
            tol = tol + 2.4e-7 * (np.abs(a) + np.abs(f64(rs)))
        assert_result(y, a, tol, out=out)
    return c.call(run, (w, b, x), {"activation": activation, "residual": residual, "out": out,
                                   "num_threads": nt}, check)


@target("PackedLinear.norm")
def _packed_linear_norm(c):
    """PackedLinear(...)(x, residual=, norm=, norm_weight=, norm_bias=, eps=, sum_out=, out=):
    the fused residual + norm epilogue gives the bits of the separate kernels."""
    shape = c.shape()
    k = shape[-1]
    n = c.dim()
    oshape = tuple(shape[:-1]) + (n,)
    w = c.f32((n, k))
    b = c.f32((n,)) if c.rng.random() < 0.7 else None
    x = c.f32(shape)
    kind = c.maybe("norm", c.pick(["layer_norm", "rms_norm"]), BAD_CHOICE)
    g = c.maybe("norm_weight", c.vec(n), _bad_vecs(c, n))
    beta = c.maybe("norm_bias", c.vec(n) if kind == "layer_norm" else None, _bad_vecs(c, n))
    eps = c.maybe("eps", c.eps(), BAD_EPS)
    residual = c.maybe("residual", c.f32(oshape) if c.rng.random() < 0.7 else None,
                       _bad_arrays(c, oshape))
    out = c.maybe("out", c.f32(oshape, writable=True) if c.rng.random() < 0.5 else None,
                  _bad_arrays(c, oshape, True))
    sum_out = c.maybe("sum_out", c.f32(oshape, writable=True) if c.rng.random() < 0.4
                      else None, _bad_arrays(c, oshape, True))
    nt = c.maybe("num_threads", c.threads(), BAD_THREADS)
    ws, bs, xs, rs, gs, betas = snap(w), snap(b), snap(x), snap(residual), snap(g), snap(beta)
    lin = normcy.PackedLinear(w, b)

    def run(x, *, residual, norm, norm_weight, norm_bias, eps, sum_out, out, num_threads):
        return lin(x, residual=residual, norm=norm, norm_weight=norm_weight,
                   norm_bias=norm_bias, eps=eps, sum_out=sum_out, out=out,
                   num_threads=num_threads)

    def check(y):
        s = normcy.PackedLinear(ws, bs)(xs, residual=rs)
        if sum_out is not None:
            assert np.array_equal(np.asarray(sum_out), s, equal_nan=True), "sum_out != s"
        if kind == "layer_norm":
            ref = normcy.layer_norm(s, gs, betas, float(eps))
        else:
            ref = normcy.rms_norm(s, gs, float(eps))
        assert np.array_equal(np.asarray(y), ref, equal_nan=True), "fused norm != separate"
    return c.call(run, (x,), {"residual": residual, "norm": kind, "norm_weight": g,
                              "norm_bias": beta, "eps": eps, "sum_out": sum_out, "out": out,
                              "num_threads": nt}, check)
