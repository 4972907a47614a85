"""Norm-kernel suites (layer_norm, add_layer_norm[+sum], rms_norm, add_rms_norm, batch_norm)
and the memory-bandwidth ceiling."""
import numpy as np

from _common import Impl, measure

# 4096x4096: rows of an LLM's width (RMSNorm's home), far larger than the caches;
# 1x4194304: one row, which normcy cuts among its threads
LN_SHAPES_FULL = [(1, 384), (1, 768), (32, 384), (4096, 384), (4096, 768), (16384, 1024),
                  (4096, 4096), (64, 8192), (2, 1048576), (1, 4194304)]
# --quick: add_layer_norm at the four shapes of the issue-3 targets, the others at two
# arrays at least this large get in-row copy references (NormBench._copy_refs)
IN_ROW_COPY_BYTES = 48 << 20
LN_SHAPES_QUICK = {"add_layer_norm": [(1, 384), (32, 384), (4096, 768), (16384, 1024)],
                   "*": [(32, 384), (4096, 768)]}
# (label, shape, channel axis)
BN_CASES = [("NCHW 32x64x56x56", (32, 64, 56, 56), 1),
            ("NHWC 32x56x56x64", (32, 56, 56, 64), 3),
            ("NC 4096x1024", (4096, 1024), 1)]

LN_EPS = 1e-5
RMS_EPS = 1e-6
BN_EPS = 1e-5

SUITES = {
    "layer_norm": {
        "title": "layer_norm: y = (x − mean) / sqrt(var + eps) · w + b",
        "formula": "bytes = 8·N·H + 8·H (read x, write y, read w and b)",
        "ort_op": "LayerNormalization (opset 17)",
        "torch": "F.layer_norm(x, (H,), w, b)",
        "numpy": "(x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + eps) * w + b",
        "bytes": lambda N, H: 8 * N * H + 8 * H,
    },
    "layer_norm_t": {
        "title": "layer_norm of a transposed view: x = X.T, X a C-ordered (H, N) array",
        "formula": "bytes = 8·N·H + 8·H (read x, write y (C-ordered), read w and b)",
        "ort_op": "none (its sessions take contiguous inputs)",
        "torch": "F.layer_norm(x, (H,), w, b) on the non-contiguous tensor",
        "numpy": "the layer_norm expression on the view",
        "bytes": lambda N, H: 8 * N * H + 8 * H,
    },
    "add_layer_norm": {
        "title": "add_layer_norm: y = LN(x + r) · w + b",
        "formula": "bytes = 12·N·H + 8·H (read x and r, write y, read w and b)",
        "ort_op": "com.microsoft SkipLayerNormalization, input (1, N, H)",
        "torch": "F.layer_norm(x + r, (H,), w, b)",
        "numpy": "s = x + r, then the layer_norm expression on s",
        "bytes": lambda N, H: 12 * N * H + 8 * H,
    },
    "add_layer_norm_sum": {
        "title": "add_layer_norm + sum_out: y = LN(x + r) · w + b, s = x + r also written",
        "formula": "bytes = 16·N·H + 8·H (read x and r, write y and s, read w and b)",
        "ort_op": "com.microsoft SkipLayerNormalization with its input_skip_bias_sum output",
        "torch": "torch.add(x, r, out=s); F.layer_norm(s, (H,), w, b)",
        "numpy": "s = x + r, then the layer_norm expression on s",
        "bytes": lambda N, H: 16 * N * H + 8 * H,
    },
    "rms_norm": {
        "title": "rms_norm: y = x / sqrt(mean(x²) + eps) · w",
        "formula": "bytes = 8·N·H + 4·H (read x, write y, read w)",
        "ort_op": "RMSNormalization (opset 23)",
        "torch": "F.rms_norm(x, (H,), w)",
        "numpy": "x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w",
        "bytes": lambda N, H: 8 * N * H + 4 * H,
    },
    "add_rms_norm": {
        "title": "add_rms_norm: y = RMSNorm(x + r) · w",
        "formula": "bytes = 12·N·H + 4·H (read x and r, write y, read w)",
        "ort_op": "com.microsoft SkipSimplifiedLayerNormalization, input (1, N, H)",
        "torch": "F.rms_norm(x + r, (H,), w)",
        "numpy": "s = x + r, then the rms_norm expression on s",
        "bytes": lambda N, H: 12 * N * H + 4 * H,
    },
    "batch_norm": {
        "title": "batch_norm (inference): y = (x − mean_c) / sqrt(var_c + eps) · w_c + b_c",
        "formula": "bytes = 8·numel + 16·C (read x, write y, read 4 per-channel vectors)",
        "ort_op": "BatchNormalization (opset 15; NCHW / NC only, ORT has no NHWC CPU kernel)",
        "torch": "F.batch_norm(x, mean, var, w, b, training=False); NHWC = channels_last NCHW view",
        "numpy": "(x - mean[c]) / np.sqrt(var[c] + eps) * w[c] + b[c] with broadcasting",
        "bytes": None,
    },
}
NORM_SUITES = list(SUITES)


# --------------------------------------------------------------------------------------
# user-style NumPy baselines and float64 references
# --------------------------------------------------------------------------------------
def np_layer_norm(x, w, b, eps):
    mean = x.mean(axis=-1, keepdims=True)
    var = x.var(axis=-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * w + b


def np_rms_norm(x, w, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def ref_ln(s, w, b, eps):
    s = s.astype(np.float64)
    m = s.mean(-1, keepdims=True)
    v = ((s - m) ** 2).mean(-1, keepdims=True)
    return (s - m) / np.sqrt(v + eps) * w + b


def ref_rms(s, w, eps):
    s = s.astype(np.float64)
    return s / np.sqrt((s * s).mean(-1, keepdims=True) + eps) * w


def _bshape(ndim, axis):
    sh = [1] * ndim
    sh[axis] = -1
    return tuple(sh)


# --------------------------------------------------------------------------------------
# ONNX Runtime one-node models
# --------------------------------------------------------------------------------------
class OrtFactory:
    def __init__(self, ort):
        import onnx
        from onnx import TensorProto, helper, numpy_helper
        self.numpy_helper = numpy_helper
        self.ort = ort
        self.onnx = onnx
        self.helper = helper
        self.TP = TensorProto

    def model(self, op, inputs, outputs, inits, attrs, domain="", opset=17):
        h = self.helper
        node = h.make_node(op, [n for n, _ in inputs] + [n for n, _ in inits],
                           [n for n, _ in outputs], domain=domain or None, **attrs)
        vi = lambda n, shp: h.make_tensor_value_info(n, self.TP.FLOAT, list(shp))
        graph = h.make_graph(
            [node], "normcy_bench_" + op,
            [vi(n, a.shape) for n, a in inputs],
            [vi(n, a.shape) for n, a in outputs if n],
            [self.numpy_helper.from_array(np.ascontiguousarray(a), n) for n, a in inits])
        opsets = [h.make_opsetid("", opset)]
        if domain:
            opsets.append(h.make_opsetid(domain, 1))
        m = h.make_model(graph, opset_imports=opsets, producer_name="normcy-bench")
        m.ir_version = min(m.ir_version, 10)
        return m.SerializeToString()

    def session(self, model_bytes, threads):
        ort = self.ort
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3
        return ort.InferenceSession(model_bytes, so, providers=["CPUExecutionProvider"])

    def impls(self, model_bytes, feeds, outs, threads, nbytes):
        """io-binding (inputs and preallocated outputs bound once) and plain run."""
        ort = self.ort
        sess = self.session(model_bytes, threads)
        io = sess.io_binding()
        keep = []
        for n, a in feeds.items():
            v = ort.OrtValue.ortvalue_from_numpy(a)
            keep.append(v)
            io.bind_ortvalue_input(n, v)
        for n, a in outs.items():
            v = ort.OrtValue.ortvalue_from_numpy(a)
            keep.append(v)
            io.bind_ortvalue_output(n, v)
        names = list(outs)
        run_io = sess.run_with_iobinding

        def call_io():
            run_io(io)

        def get_io():
            run_io(io)
            _ = keep
            return tuple(outs.values())

        def call_run():
            return sess.run(names, feeds)

        def get_run():
            return tuple(sess.run(names, feeds))

        return [Impl("ort-iobind", call_io, get=get_io, nbytes=nbytes, family="ort", threads=threads),
                Impl("ort-run", call_run, get=get_run, nbytes=nbytes, family="ort", threads=threads)]


# --------------------------------------------------------------------------------------
# rows
# --------------------------------------------------------------------------------------
def _subset(shape, max_elems=1 << 20, rows=64):
    """Indices along axis 0 at which outputs are checked (all of them for small arrays)."""
    n0 = shape[0]
    if int(np.prod(shape)) <= max_elems or n0 <= 2:
        return np.arange(n0)
    per = int(np.prod(shape[1:]))
    k = max(2, min(rows, max_elems // max(1, per)))
    return np.unique(np.linspace(0, n0 - 1, k).astype(np.intp))


def _check_factory(refs, shape, idx, tol=1e-4):
    """refs: float64 references at rows ``idx`` (axis 0) of arrays of ``shape``; every output
    is reshaped to ``shape`` and compared there. Records the max abs error.  The tolerance
    (outputs are O(1): standard-normal inputs) is 50x the float32 errors seen and 5x below
    what a different eps gives (1e-5 vs 1e-3: 5e-4)."""
    def check(name, got):
        if not isinstance(got, (tuple, list)):
            got = (got,)
        errs = []
        for g, r in zip(got, refs):
            g = g.numpy() if hasattr(g, "numpy") and not isinstance(g, np.ndarray) else np.asarray(g)
            g = g.reshape(shape)[idx]
            errs.append(float(np.max(np.abs(g.astype(np.float64) - r))))
        e = max(errs)
        return {"max_abs_err": e, "check_ok": bool(e <= tol)}
    return check


class NormBench:
    def __init__(self, ctx):
        self.ctx = ctx
        self.nc = ctx.nc
        self.torch = ctx.torch
        self.ortf = OrtFactory(ctx.ort) if ctx.ort is not None else None
        self._data_key = None
        self._data = None

    # ---- data -----------------------------------------------------------------------
    def _ln_data(self, N, H):
        key = ("ln", N, H)
        if self._data_key != key:
            self._data = None
            rng = np.random.default_rng(1234 + N + H)
            d = {
                "x": rng.standard_normal((N, H), dtype=np.float32),
                "r": rng.standard_normal((N, H), dtype=np.float32),
                "w": (1.0 + 0.1 * rng.standard_normal(H)).astype(np.float32),
                "b": (0.1 * rng.standard_normal(H)).astype(np.float32),
                "out": np.empty((N, H), np.float32),
                "sum": np.empty((N, H), np.float32),
                "refs": {},
            }
            d["xT"] = np.ascontiguousarray(d["x"].T).T   # x's values, column-major
            if self.torch is not None:
                t = self.torch
                for k in ("x", "r", "w", "b", "out", "sum", "xT"):
                    d["t_" + k] = t.from_numpy(d[k])
            self._data_key, self._data = key, d
        return self._data

    def _bn_data(self, shape, axis):
        key = ("bn", shape, axis)
        if self._data_key != key:
            self._data = None
            C = shape[axis]
            rng = np.random.default_rng(99 + C)
            d = {
                "x": rng.standard_normal(shape, dtype=np.float32),
                "rm": (0.1 * rng.standard_normal(C)).astype(np.float32),
                "rv": rng.uniform(0.5, 1.5, C).astype(np.float32),
                "w": (1.0 + 0.1 * rng.standard_normal(C)).astype(np.float32),
                "b": (0.1 * rng.standard_normal(C)).astype(np.float32),
                "out": np.empty(shape, np.float32),
                "refs": {},
            }
            self._data_key, self._data = key, d
        return self._data

    def release(self):
        self._data_key = self._data = None

    # ---- thread helpers -------------------------------------------------------------
    def _torch_pre(self, T):
        torch = self.torch

        def pre():
            if torch.get_num_threads() != T:
                torch.set_num_threads(T)
        return pre

    def _normcy_variants(self, T, make_call, nbytes):
        """[(name, Impl)] for normcy at num_threads=T and (on the default-threads row) auto."""
        out = []
        nc = self.nc
        if nc is None:
            return out
        if T == self.ctx.normcy_default_threads:
            out.append(Impl("normcy", make_call(None), nbytes=nbytes, family="normcy", threads=T,
                            note="default num_threads (auto choice)"))
        out.append(Impl("normcy nt=%d" % T, make_call(T), nbytes=nbytes, family="normcy", threads=T))
        if T == self.ctx.normcy_default_threads and T != 1:
            # one thread measured beside the auto choice, among the same competitors (their
            # thread pools at T threads, spinning or not): what the auto-choice target uses
            out.append(Impl("normcy nt=1", make_call(1), nbytes=nbytes, family="normcy", threads=1))
        return out

    def _copy_refs(self, x, T):
        """Copies of an array of x's size, timed among this row's implementations (family
        "copy": references, not competitors): the copy bandwidth side by side with the row's
        figures.  On the shared VMs the machine's bandwidth moves between phases (a 2-thread
        copy measured 45 GB/s and 75 GB/s in one run), so a ceiling measured at other
        moments is not comparable."""
        return copy_impls(self.torch, x, np.empty_like(x), (T,), prefix="copy ",
                          family="copy")

    # ---- layer-norm family ----------------------------------------------------------
    def ln_row(self, suite, N, H, T):
        d = self._ln_data(N, H)
        spec = SUITES[suite]
        nbytes = spec["bytes"](N, H)
        x, r, w, b, out, s = d["x"], d["r"], d["w"], d["b"], d["out"], d["sum"]
        nc, torch = self.nc, self.torch
        impls = []
        refs = d["refs"].get(suite)
        idx = _subset(x.shape)
        xs, rs = x[idx], r[idx]
        if suite in ("layer_norm", "layer_norm_t"):
            # layer_norm_t: what a user passing a transposed array gets (x's values, so the
            # same references; ONNX Runtime's sessions take contiguous inputs only)
            xin, key = (x, "x") if suite == "layer_norm" else (d["xT"], "xT")
            if refs is None:
                refs = (ref_ln(xs, w, b, LN_EPS),)

            def mk(nt):
                f = nc.layer_norm
                if nt is None:
                    return lambda: f(xin, w, b, LN_EPS, out=out)
                return lambda: f(xin, w, b, LN_EPS, out=out, num_threads=nt)
            impls += self._normcy_variants(T, mk, nbytes)
            impls.append(Impl("numpy", lambda: np_layer_norm(xin, w, b, LN_EPS), nbytes=nbytes,
                              family="numpy", threads=1))
            if torch is not None:
                F = torch.nn.functional
                xt, wt, bt = d["t_" + key], d["t_w"], d["t_b"]
                impls.append(Impl("torch", lambda: F.layer_norm(xt, (H,), wt, bt, LN_EPS),
                                  pre=self._torch_pre(T), nbytes=nbytes, family="torch", threads=T))
            if self.ortf is not None and suite == "layer_norm":
                y = np.empty_like(x)
                mb = self.ortf.model("LayerNormalization", [("X", x)], [("Y", y)],
                                     [("W", w), ("B", b)], {"axis": -1, "epsilon": LN_EPS}, opset=17)
                impls += self.ortf.impls(mb, {"X": x}, {"Y": y}, T, nbytes)
        elif suite in ("add_layer_norm", "add_layer_norm_sum"):
            with_sum = suite.endswith("_sum")
            if refs is None:
                s64 = xs.astype(np.float64) + rs
                refs = (ref_ln(s64, w, b, LN_EPS),) + ((s64,) if with_sum else ())

            def mk(nt):
                f = nc.add_layer_norm
                kw = {"out": out}
                if with_sum:
                    kw["sum_out"] = s
                if nt is not None:
                    kw["num_threads"] = nt
                if with_sum:
                    return lambda: (f(x, r, w, b, LN_EPS, **kw), s)
                return lambda: f(x, r, w, b, LN_EPS, **kw)
            impls += self._normcy_variants(T, mk, nbytes)
            if with_sum:
                def np_call():
                    s_ = x + r
                    return np_layer_norm(s_, w, b, LN_EPS), s_
            else:
                def np_call():
                    return np_layer_norm(x + r, w, b, LN_EPS)
            impls.append(Impl("numpy", np_call, nbytes=nbytes, family="numpy", threads=1))
            if torch is not None:
                F = torch.nn.functional
                xt, rt, wt, bt, st = d["t_x"], d["t_r"], d["t_w"], d["t_b"], d["t_sum"]
                if with_sum:
                    tadd = torch.add

                    def t_call():
                        tadd(xt, rt, out=st)
                        return F.layer_norm(st, (H,), wt, bt, LN_EPS), st
                else:
                    def t_call():
                        return F.layer_norm(xt + rt, (H,), wt, bt, LN_EPS)
                impls.append(Impl("torch", t_call, pre=self._torch_pre(T), nbytes=nbytes,
                                  family="torch", threads=T))
            if self.ortf is not None:
                x3, r3 = x.reshape(1, N, H), r.reshape(1, N, H)
                y3 = np.empty_like(x3)
                outs = [("Y", y3)]
                onames = ["Y"]
                if with_sum:
                    s3 = np.empty_like(x3)
                    outs = [("Y", y3), ("", None), ("", None), ("S", s3)]
                outs_nodes = [(n, a) for n, a in outs]
                mb = self.ortf.model("SkipLayerNormalization", [("X", x3), ("R", r3)],
                                     outs_nodes, [("W", w), ("B", b)], {"epsilon": LN_EPS},
                                     domain="com.microsoft", opset=17)
                od = {"Y": y3}
                if with_sum:
                    od["S"] = s3
                impls += self.ortf.impls(mb, {"X": x3, "R": r3}, od, T, nbytes)
                del onames
        elif suite == "rms_norm":
            if refs is None:
                refs = (ref_rms(xs, w, RMS_EPS),)

            def mk(nt):
                f = nc.rms_norm
                if nt is None:
                    return lambda: f(x, w, RMS_EPS, out=out)
                return lambda: f(x, w, RMS_EPS, out=out, num_threads=nt)
            impls += self._normcy_variants(T, mk, nbytes)
            impls.append(Impl("numpy", lambda: np_rms_norm(x, w, RMS_EPS), nbytes=nbytes,
                              family="numpy", threads=1))
            if torch is not None:
                F = torch.nn.functional
                xt, wt = d["t_x"], d["t_w"]
                impls.append(Impl("torch", lambda: F.rms_norm(xt, (H,), wt, RMS_EPS),
                                  pre=self._torch_pre(T), nbytes=nbytes, family="torch", threads=T))
            if self.ortf is not None:
                y = np.empty_like(x)
                try:
                    mb = self.ortf.model("RMSNormalization", [("X", x)], [("Y", y)], [("W", w)],
                                         {"axis": -1, "epsilon": RMS_EPS}, opset=23)
                    self.ortf.session(mb, 1)
                except Exception:
                    # older ORT: the contrib SimplifiedLayerNormalization (default domain)
                    mb = self.ortf.model("SimplifiedLayerNormalization", [("X", x)], [("Y", y)],
                                         [("W", w)], {"axis": -1, "epsilon": RMS_EPS}, opset=17)
                impls += self.ortf.impls(mb, {"X": x}, {"Y": y}, T, nbytes)
        elif suite == "add_rms_norm":
            if refs is None:
                refs = (ref_rms(xs.astype(np.float64) + rs, w, RMS_EPS),)

            def mk(nt):
                f = nc.add_rms_norm
                if nt is None:
                    return lambda: f(x, r, w, RMS_EPS, out=out)
                return lambda: f(x, r, w, RMS_EPS, out=out, num_threads=nt)
            impls += self._normcy_variants(T, mk, nbytes)
            impls.append(Impl("numpy", lambda: np_rms_norm(x + r, w, RMS_EPS), nbytes=nbytes,
                              family="numpy", threads=1))
            if torch is not None:
                F = torch.nn.functional
                xt, rt, wt = d["t_x"], d["t_r"], d["t_w"]
                impls.append(Impl("torch", lambda: F.rms_norm(xt + rt, (H,), wt, RMS_EPS),
                                  pre=self._torch_pre(T), nbytes=nbytes, family="torch", threads=T))
            if self.ortf is not None:
                x3, r3 = x.reshape(1, N, H), r.reshape(1, N, H)
                y3 = np.empty_like(x3)
                mb = self.ortf.model("SkipSimplifiedLayerNormalization", [("X", x3), ("R", r3)],
                                     [("Y", y3)], [("W", w)], {"epsilon": RMS_EPS},
                                     domain="com.microsoft", opset=17)
                impls += self.ortf.impls(mb, {"X": x3, "R": r3}, {"Y": y3}, T, nbytes)
        else:
            raise ValueError(suite)
        d["refs"][suite] = refs
        if 4 * N * H >= IN_ROW_COPY_BYTES:
            impls += self._copy_refs(x, T)
        res, noise = measure(impls, self.ctx.cfg, check=_check_factory(refs, x.shape, idx))
        return self._row(suite, "%dx%d" % (N, H), (N, H), T, nbytes, res, noise)

    # ---- batch norm -----------------------------------------------------------------
    def bn_row(self, label, shape, axis, T):
        d = self._bn_data(shape, axis)
        x, rm, rv, w, b, out = d["x"], d["rm"], d["rv"], d["w"], d["b"], d["out"]
        C = shape[axis]
        nbytes = 8 * x.size + 16 * C
        sh = _bshape(x.ndim, axis)
        refs = d["refs"].get("bn")
        idx = _subset(x.shape)
        if refs is None:
            x64 = x[idx].astype(np.float64)
            refs = ((x64 - rm.reshape(sh)) / np.sqrt(rv.reshape(sh).astype(np.float64) + BN_EPS)
                    * w.reshape(sh) + b.reshape(sh),)
            d["refs"]["bn"] = refs
        nc, torch = self.nc, self.torch
        impls = []

        def mk(nt):
            f = nc.batch_norm
            if nt is None:
                return lambda: f(x, rm, rv, w, b, BN_EPS, axis=axis, out=out)
            return lambda: f(x, rm, rv, w, b, BN_EPS, axis=axis, out=out, num_threads=nt)
        impls += self._normcy_variants(T, mk, nbytes)
        rmb, rvb, wb, bb = rm.reshape(sh), rv.reshape(sh), w.reshape(sh), b.reshape(sh)
        impls.append(Impl("numpy", lambda: (x - rmb) / np.sqrt(rvb + BN_EPS) * wb + bb,
                          nbytes=nbytes, family="numpy", threads=1))
        if torch is not None:
            F = torch.nn.functional
            tx = torch.from_numpy(x)
            if axis == x.ndim - 1 and x.ndim == 4:
                tx = tx.permute(0, 3, 1, 2)      # NHWC buffer viewed as channels_last NCHW
                back = lambda y: y.permute(0, 2, 3, 1).numpy()
            else:
                back = lambda y: y.numpy()
            trm, trv, tw, tb = (torch.from_numpy(a) for a in (rm, rv, w, b))
            call = lambda: F.batch_norm(tx, trm, trv, tw, tb, False, 0.0, BN_EPS)
            impls.append(Impl("torch", call, get=lambda: back(call()), pre=self._torch_pre(T),
                              nbytes=nbytes, family="torch", threads=T))
        if self.ortf is not None and axis == 1:
            y = np.empty_like(x)
            mb = self.ortf.model("BatchNormalization", [("X", x)], [("Y", y)],
                                 [("S", w), ("B", b), ("M", rm), ("V", rv)],
                                 {"epsilon": BN_EPS}, opset=15)
            impls += self.ortf.impls(mb, {"X": x}, {"Y": y}, T, nbytes)
        res, noise = measure(impls, self.ctx.cfg, check=_check_factory(refs, x.shape, idx))
        return self._row("batch_norm", label, shape, T, nbytes, res, noise)

    # ---- common ---------------------------------------------------------------------
    def _row(self, suite, case, shape, T, nbytes, res, noise):
        ref = "normcy" if "normcy" in res else "normcy nt=%d" % T
        return {"suite": suite, "case": case, "shape": list(shape), "threads": T,
                "bytes": nbytes, "impls": res, "ref": ref if ref in res else None,
                "noise_other_cpu_share": noise}


# --------------------------------------------------------------------------------------
# bandwidth ceiling
# --------------------------------------------------------------------------------------
def copy_impls(torch, a, c, threads_list, prefix="", family=None):
    """Copies of `a` into `c`: NumPy's one-thread ``np.copyto`` and PyTorch's ``copy_`` at
    each thread count (named ``prefix + "numpy copyto"`` / ``prefix + "torch copy_ {T}T"``;
    `family`: the implementations' family, default their library's; another family makes
    them references that the row's output check skips)."""
    out = [Impl(prefix + "numpy copyto", lambda: np.copyto(c, a), nbytes=2 * a.nbytes,
                family=family or "numpy", threads=1, checked=family is None)]
    if torch is not None:
        ta, tc = torch.from_numpy(a), torch.from_numpy(c)
        for T in threads_list:
            def pre(T=T):
                if torch.get_num_threads() != T:
                    torch.set_num_threads(T)
            out.append(Impl(prefix + "torch copy_ %dT" % T, lambda: tc.copy_(ta), pre=pre,
                            nbytes=2 * a.nbytes, family=family or "torch", threads=T,
                            checked=family is None))
    return out


def copy_gbs_of(row):
    """The fastest copy timed in a row (``np.copyto`` or PyTorch's ``copy_``), GB/s, or None."""
    g = [m["gbs"] for name, m in row["impls"].items()
         if ("numpy copyto" in name or "torch copy_" in name) and m.get("gbs")]
    return max(g) if g else None


def ceiling_row(ctx, nbytes_per_array, threads_list):
    n = max(1, nbytes_per_array // 4)
    rng = np.random.default_rng(7)
    a = rng.standard_normal(n, dtype=np.float32)
    b2 = rng.standard_normal(n, dtype=np.float32)
    c = np.empty_like(a)
    copies = copy_impls(ctx.torch, a, c, threads_list)
    impls = copies[:1] + [
        Impl("numpy add", lambda: np.add(a, b2, out=c), nbytes=3 * 4 * n, family="numpy", threads=1),
    ] + copies[1:]
    res, noise = measure(impls, ctx.cfg)
    return {"suite": "ceiling", "case": _fmt_bytes(4 * n), "array_bytes": 4 * n, "threads": None,
            "impls": res, "noise_other_cpu_share": noise}


def _fmt_bytes(n):
    for unit, s in (("GB", 1 << 30), ("MB", 1 << 20), ("KB", 1 << 10)):
        if n >= s:
            v = n / s
            return ("%.0f %s" if v >= 10 or v == int(v) else "%.1f %s") % (v, unit)
    return "%d B" % n
