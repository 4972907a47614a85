"""A PyTorch-free Transformer encoder layer for CPU inference.

:class:`TransformerEncoderLayer` computes exactly what ``torch.nn.TransformerEncoderLayer``
(``batch_first=True``, eval mode) computes, from the same state dict, with normcy's own kernels
only (no BLAS): packed-weight GEMMs (:class:`normcy.PackedLinear`, weights packed once at load),
a fused attention kernel and the fused norm kernels, all in one OpenMP thread pool:

- the Q/K/V projection is one GEMM against the packed ``in_proj`` weight; the attention scale
  ``1/sqrt(head_dim)`` is folded into the query weights and bias;
- the key bias is dropped (it adds the same constant ``q . b_k`` to every logit of a row, which
  softmax ignores) and the value bias is folded into the output-projection bias (softmax rows
  sum to one, so ``P (V + b_v) W_o^T = P V W_o^T + W_o b_v``): no bias pass over K and V;
- attention is one fused kernel per (sequence, head): q (+ its bias), k^T and v are gathered
  into a cache-resident block, each query row's scores, masked softmax and weighted sum of
  values are computed while the row is in L1; the context goes straight into the
  (tokens, d_model) layout;
- biases and activations are GEMM epilogues; residual adds are fused into the norm kernels
  (``add_layer_norm`` / ``add_rms_norm``, ``sum_out=`` for the pre-LN residual stream) or into
  the last GEMM's epilogue (pre-LN);
- every row's result is independent of the other rows and of the thread count, bit for bit;
- all intermediate buffers live in a per-thread workspace reused between calls, so one layer
  object may be called from several threads at once.

Masks follow PyTorch: ``key_padding_mask`` is (batch, seq) bool with True marking padding;
``attn_mask`` is (seq, seq), additive float or bool (True = not allowed); ``is_causal=True``
applies the causal mask by itself (PyTorch additionally needs the mask passed as a hint).
"""
import math
import os
from collections.abc import Mapping

import numpy as np

from normcy._norms import add_layer_norm, add_rms_norm, layer_norm, rms_norm
from normcy._encoder_plan import (WorkspacePool, key_padding_2d, packed_plan,
                                  padded_plan)
from normcy._gemm import PackedLinear, EncoderLayerKernel, run_layers
from normcy._gemm import attention as attention_kernel
from normcy._validate import as_float, as_int, as_weight, base_array, refuse_masked

__all__ = ["TransformerEncoderLayer", "TransformerEncoder"]

_F32 = np.float32
_ACTIVATIONS = ("relu", "gelu", "gelu_tanh")
_NORMS = ("layer", "rms")


def check_num_threads(value):
    """A model's ``num_threads`` setting: None, or an integer >= 1 (normcy's rules:
    anything ``operator.index`` accepts, not a bool)."""
    return None if value is None else as_int(value, "num_threads", minimum=1)


def _physical_memory():
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, OSError, ValueError):  # pragma: no cover - not POSIX
        return None


def _check_fits_memory(d_model, dim_feedforward):
    """A layer's float32 weights (4 d^2 + 2 d f values, about) must fit in this machine's
    memory: a clear error instead of a MemoryError (or an OOM kill) half way."""
    nbytes = 4 * (4 * d_model * d_model + 2 * d_model * dim_feedforward)
    mem = _physical_memory()
    if mem is not None and nbytes > mem:
        raise ValueError("d_model=%d, dim_feedforward=%d: the layer's weights need %.1f GB, "
                         "more than this machine's %.1f GB of memory"
                         % (d_model, dim_feedforward, nbytes / 1e9, mem / 1e9))


def _check_int(v, name, minimum=1, maximum=2 ** 31 - 1):
    return as_int(v, name, minimum=minimum, maximum=maximum)


class _Prepared:
    """A layer's weights as its kernels use them (made by ``_prepare``, replaced whole by
    ``load_state_dict``): the packed projections, the query bias and folded value bias, the
    norm parameters and epilogue arguments, the compiled layer, and the state-dict arrays
    that are not held by a PackedLinear."""

    __slots__ = ("lin_qkv", "b_q", "o_bv", "lin_o", "lin_1", "lin_2", "n1", "n2", "epi1",
                 "epi2", "kernel", "sd")


class TransformerEncoderLayer:
    """Transformer encoder layer (self-attention + feed-forward), PyTorch-compatible.

    Parameters
    ----------
    d_model : int
        Model width.
    nhead : int
        Number of attention heads; must divide `d_model`.
    dim_feedforward : int
        Hidden width of the feed-forward block.
    activation : {"relu", "gelu", "gelu_tanh"}, default "relu"
        ``"gelu"`` is the exact erf GELU (PyTorch ``"gelu"``), ``"gelu_tanh"`` the tanh
        approximation.
    norm_first : bool, default False
        Pre-LN (``x + sa(norm1(x))``, ...) instead of post-LN (``norm1(x + sa(x))``, ...).
    layer_norm_eps : float, default 1e-5
        Epsilon of both norms.
    norm : {"layer", "rms"}, default "layer"
        LayerNorm (weight and bias) or RMSNorm (weight only, as ``torch.nn.RMSNorm``).
    bias : bool, default True
        False: no biases anywhere, as ``torch.nn.TransformerEncoderLayer(..., bias=False)``
        (its projections have none and its LayerNorms are ``LayerNorm(bias=False)``:
        weight only, still LayerNorm, not RMSNorm).
    batch_first : bool, default True
        Inputs and outputs are (batch, seq, d_model); False: (seq, batch, d_model), PyTorch's
        default layout.  The key padding mask is (batch, seq) either way, as in PyTorch.

    Notes
    -----
    A new layer has randomly initialized weights (PyTorch's initialization scheme); load real
    ones with :meth:`from_torch_state_dict` or :meth:`load_state_dict`.  Calling the layer
    returns a new array; the intermediate buffers are cached per thread and reused.
    """

    def __init__(self, d_model, nhead, dim_feedforward, *, activation="relu", norm_first=False,
                 layer_norm_eps=1e-5, norm="layer", bias=True, batch_first=True):
        self._configure(d_model, nhead, dim_feedforward, activation, norm_first,
                        layer_norm_eps, norm, bias, batch_first)
        self.load_state_dict(self._init_state_dict())

    def _configure(self, d_model, nhead, dim_feedforward, activation, norm_first,
                   layer_norm_eps, norm, bias, batch_first):
        d_model = _check_int(d_model, "d_model")
        nhead = _check_int(nhead, "nhead")
        dim_feedforward = _check_int(dim_feedforward, "dim_feedforward")
        if d_model % nhead:
            raise ValueError("d_model (%d) must be divisible by nhead (%d)" % (d_model, nhead))
        _check_fits_memory(d_model, dim_feedforward)
        if not isinstance(activation, str):
            raise TypeError("activation must be a str, one of %s, got %s"
                            % (_ACTIVATIONS, type(activation).__name__))
        if activation not in _ACTIVATIONS:
            raise ValueError("activation must be one of %s, got %r" % (_ACTIVATIONS, activation))
        if not isinstance(norm_first, (bool, np.bool_)):
            raise TypeError("norm_first must be True or False, got %r" % (norm_first,))
        if not isinstance(norm, str):
            raise TypeError("norm must be 'layer' or 'rms', got %s" % type(norm).__name__)
        if norm not in _NORMS:
            raise ValueError("norm must be 'layer' or 'rms', got %r" % (norm,))
        eps = as_float(layer_norm_eps, "layer_norm_eps", minimum=0.0)
        self.d_model = d_model
        self.nhead = nhead
        self.head_dim = d_model // nhead
        self.dim_feedforward = dim_feedforward
        self.activation = activation
        self.norm_first = bool(norm_first)
        self.layer_norm_eps = eps
        self.norm = norm
        if not isinstance(bias, (bool, np.bool_)):
            raise TypeError("bias must be True or False, got %r" % (bias,))
        self.bias = bool(bias)
        if not isinstance(batch_first, (bool, np.bool_)):
            raise TypeError("batch_first must be True or False, got %r" % (batch_first,))
        self.batch_first = bool(batch_first)
        self._wsp = WorkspacePool()
        self.num_threads = None

    @property
    def num_threads(self):
        """Threads for every kernel of the layer (None: normcy's default, all cores; small
        work runs serially).  The matrix products are normcy's own (PackedLinear), so one
        OpenMP pool serves the whole layer.  Checked when set (any integer >= 1, or None)."""
        return self._num_threads

    @num_threads.setter
    def num_threads(self, value):
        self._num_threads = check_num_threads(value)

    # ------------------------------------------------------------------ parameters
    def _expected_shapes(self):
        d, f = self.d_model, self.dim_feedforward
        shapes = {
            "self_attn.in_proj_weight": (3 * d, d),
            "self_attn.in_proj_bias": (3 * d,),
            "self_attn.out_proj.weight": (d, d),
            "self_attn.out_proj.bias": (d,),
            "linear1.weight": (f, d),
            "linear1.bias": (f,),
            "linear2.weight": (d, f),
            "linear2.bias": (d,),
            "norm1.weight": (d,),
            "norm2.weight": (d,),
        }
        if self.norm == "layer":
            shapes["norm1.bias"] = (d,)
            shapes["norm2.bias"] = (d,)
        if not self.bias:
            shapes = {k: v for k, v in shapes.items() if not k.endswith("bias")}
        return shapes

    def _init_state_dict(self):
        rng = np.random.default_rng()
        d, f = self.d_model, self.dim_feedforward

        def uni(shape, bound):
            # drawn in float32 (a float64 draw would need twice the weights' memory)
            a = rng.random(size=shape, dtype=_F32)
            a *= _F32(2 * bound)
            a -= _F32(bound)
            return a

        sd = {
            "self_attn.in_proj_weight": uni((3 * d, d), math.sqrt(6.0 / (4 * d))),
            "self_attn.in_proj_bias": np.zeros(3 * d, _F32),
            "self_attn.out_proj.weight": uni((d, d), 1.0 / math.sqrt(d)),
            "self_attn.out_proj.bias": np.zeros(d, _F32),
            "linear1.weight": uni((f, d), 1.0 / math.sqrt(d)),
            "linear1.bias": uni((f,), 1.0 / math.sqrt(d)),
            "linear2.weight": uni((d, f), 1.0 / math.sqrt(f)),
            "linear2.bias": uni((d,), 1.0 / math.sqrt(f)),
            "norm1.weight": np.ones(d, _F32),
            "norm2.weight": np.ones(d, _F32),
        }
        if self.norm == "layer":
            sd["norm1.bias"] = np.zeros(d, _F32)
            sd["norm2.bias"] = np.zeros(d, _F32)
        keep = self._expected_shapes()
        return {k: v for k, v in sd.items() if k in keep}

    @classmethod
    def from_torch_state_dict(cls, state_dict, nhead, *, activation="relu", norm_first=False,
                              layer_norm_eps=1e-5, norm="layer", bias=None, batch_first=True):
        """Build a layer from the state dict of ``torch.nn.TransformerEncoderLayer``.

        Parameters
        ----------
        state_dict : Mapping[str, array_like]
            Exactly the keys of ``torch.nn.TransformerEncoderLayer(...).state_dict()``
            (``self_attn.in_proj_weight``, ``self_attn.in_proj_bias``,
            ``self_attn.out_proj.weight``/``bias``, ``linear1.*``, ``linear2.*``, ``norm1.*``,
            ``norm2.*``; with ``norm="rms"`` the norms have only a ``weight``; a layer made
            with ``bias=False`` has no ``*bias`` keys), as NumPy arrays (``tensor.numpy()``).
            ``d_model`` and ``dim_feedforward`` are read from the shapes.
        nhead : int
        activation, norm_first, layer_norm_eps, norm, batch_first
            As for the constructor; they must match the PyTorch layer's settings (they are
            not stored in a state dict).
        bias : bool, optional
            As for the constructor; None (default): False when the state dict has no
            ``self_attn.in_proj_bias`` (a PyTorch layer made with ``bias=False``).

        Returns
        -------
        TransformerEncoderLayer
        """
        if not isinstance(state_dict, Mapping):
            raise TypeError("state_dict must be a mapping of names to arrays, got %s"
                            % type(state_dict).__name__)
        for key in ("self_attn.in_proj_weight", "linear1.weight"):
            if key not in state_dict:
                raise ValueError("state_dict has no %r; expected the keys of "
                                 "torch.nn.TransformerEncoderLayer.state_dict()" % key)
        w = np.shape(state_dict["self_attn.in_proj_weight"])
        if len(w) != 2 or w[0] != 3 * w[1]:
            raise ValueError("self_attn.in_proj_weight must have shape (3*d_model, d_model), "
                             "got %s" % (tuple(w),))
        f = np.shape(state_dict["linear1.weight"])
        if len(f) != 2:
            raise ValueError("linear1.weight must have shape (dim_feedforward, d_model), got %s"
                             % (tuple(f),))
        if bias is None:
            bias = "self_attn.in_proj_bias" in state_dict
        layer = cls.__new__(cls)
        layer._configure(w[1], nhead, f[0], activation, norm_first, layer_norm_eps, norm, bias,
                         batch_first)
        layer.load_state_dict(state_dict)
        return layer

    def load_state_dict(self, state_dict):
        """Load PyTorch-named parameters (see :meth:`from_torch_state_dict`); strict."""
        if not isinstance(state_dict, Mapping):
            raise TypeError("state_dict must be a mapping of names to arrays, got %s"
                            % type(state_dict).__name__)
        shapes = self._expected_shapes()
        missing = sorted(set(shapes) - set(state_dict))
        unexpected = sorted(set(state_dict) - set(shapes), key=repr)
        if missing or unexpected:
            msg = []
            if missing:
                msg.append("missing keys %s" % missing)
            if unexpected:
                msg.append("unexpected keys %s" % unexpected)
            hint = ""
            if not self.bias and any(k.endswith("bias") for k in unexpected):
                hint = " (a layer made with bias=False has no biases)"
            elif self.bias and "self_attn.in_proj_bias" in missing:
                hint = " (a state dict without biases needs bias=False)"
            elif self.norm == "layer" and "norm1.bias" in missing:
                hint = (" (norms without a bias: RMSNorm needs norm='rms'; a PyTorch layer "
                        "made with bias=False, bias=False)")
            elif self.norm == "rms" and "norm1.bias" in unexpected:
                hint = " (a state dict with norm biases needs norm='layer')"
            raise ValueError("state_dict does not match a TransformerEncoderLayer(d_model=%d, "
                             "dim_feedforward=%d, norm=%r, bias=%r): %s%s"
                             % (self.d_model, self.dim_feedforward, self.norm, self.bias,
                                "; ".join(msg), hint))
        # all or nothing: the new weights are prepared aside and replace the old ones in one
        # assignment, so that a failed or interrupted load leaves the layer as it was, and a
        # call running in another thread sees the old weights or the new, never a mix
        self._p = self._prepare({k: as_weight(state_dict[k], k, s) for k, s in shapes.items()})

    # matrices held only by their PackedLinear after loading (its .weight unpacks the same
    # bits), so that a model keeps each of them once; the QKV weight is packed with its
    # query rows scaled, so its original stays in sd
    _PACKED_ONLY = {"self_attn.out_proj.weight": "lin_o", "linear1.weight": "lin_1",
                    "linear2.weight": "lin_2"}

    def state_dict(self):
        """The parameters under PyTorch's names (copies, float32)."""
        p = self._p
        out = {}
        for k in self._expected_shapes():
            attr = self._PACKED_ONLY.get(k)
            out[k] = getattr(p, attr).weight.copy() if attr else p.sd[k].copy()
        return out

    def _prepare(self, sd):
        """The prepared weights of state dict `sd` (checked float32 arrays, which it takes
        over): a :class:`_Prepared`."""
        d = self.d_model
        scale = 1.0 / math.sqrt(self.head_dim)
        w_in = sd["self_attn.in_proj_weight"].astype(np.float64)
        b_in = (sd["self_attn.in_proj_bias"].astype(np.float64) if self.bias
                else np.zeros(3 * d))
        w_in[:d] *= scale
        # one packed GEMM gives [q*scale | k | v] (no bias: the query bias is added by the
        # attention kernel, the key bias cancels in the softmax, the value bias is folded
        # into the output projection's bias)
        p = _Prepared()
        p.lin_qkv = PackedLinear(w_in.astype(_F32))
        p.b_q = (b_in[:d] * scale).astype(_F32)
        w_o = sd["self_attn.out_proj.weight"].astype(np.float64)
        o_bv = w_o @ b_in[2 * d:]
        p.o_bv = o_bv.astype(_F32)
        if self.bias:
            b_o = (sd["self_attn.out_proj.bias"].astype(np.float64) + o_bv).astype(_F32)
        else:
            b_o = None          # no value bias to fold either (o_bv is zero)
        p.lin_o = PackedLinear(sd["self_attn.out_proj.weight"], b_o)
        p.lin_1 = PackedLinear(sd["linear1.weight"], sd.get("linear1.bias"))
        p.lin_2 = PackedLinear(sd["linear2.weight"], sd.get("linear2.bias"))
        p.n1 = (sd["norm1.weight"], sd.get("norm1.bias"))
        p.n2 = (sd["norm2.weight"], sd.get("norm2.bias"))
        # PackedLinear keyword arguments of the fused residual + norm epilogues (built once:
        # they are passed on every forward)
        p.epi1 = self._epilogue(p.n1)
        p.epi2 = self._epilogue(p.n2)
        # the whole layer as one compiled call (one parallel region, no Python between the
        # stages) for attention without masks: the same kernels, the same bits
        p.kernel = EncoderLayerKernel(
            p.lin_qkv, p.b_q, p.lin_o, p.lin_1, p.lin_2, p.n1, p.n2, self.layer_norm_eps,
            self.norm, self.activation, self.norm_first, self.nhead)
        p.sd = {k: v for k, v in sd.items() if k not in self._PACKED_ONLY}
        return p

    # ------------------------------------------------------------------ kernels
    def _norm(self, x, params, out):
        if self.norm == "layer":
            return layer_norm(x, params[0], params[1], self.layer_norm_eps, out=out,
                              num_threads=self.num_threads)
        return rms_norm(x, params[0], self.layer_norm_eps, out=out, num_threads=self.num_threads)

    def _add_norm(self, x, residual, params, x_bias, out, sum_out=None):
        if self.norm == "layer":
            return add_layer_norm(x, residual, params[0], params[1], self.layer_norm_eps,
                                  x_bias=x_bias, out=out, sum_out=sum_out,
                                  num_threads=self.num_threads)
        return add_rms_norm(x, residual, params[0], self.layer_norm_eps, x_bias=x_bias,
                            out=out, sum_out=sum_out, num_threads=self.num_threads)

    def _attention(self, qkv, ctx, plan, b_q):
        """Scaled dot-product attention from the (rows, 3d) projections into ctx (rows, d):
        one fused kernel per (sequence, head) (scores stay in cache; no BLAS)."""
        h = self.nhead
        nt = self.num_threads
        for off, nseq, L in plan.groups:
            rows = nseq * L
            kpm = plan.kpm
            mask = plan.mask
            first = off // L
            if kpm is not None:
                kpm = kpm[first:first + nseq]
            if mask is not None and mask.ndim == 4:
                mask = mask[first:first + nseq]
            attention_kernel(qkv[off:off + rows], b_q, ctx[off:off + rows], nseq, L, h,
                              mask=mask, key_padding_mask=kpm, is_causal=plan.is_causal,
                              num_threads=nt)

    def forward_rows(self, x, plan, ws, out):
        """One layer on a (rows, d_model) C-contiguous matrix; result into `out`.

        Package-level interface (used by :class:`TransformerEncoder` and
        :class:`normcy.BertModel`): `plan` is an :class:`AttentionPlan` and `ws` a
        :class:`Workspace`.  `x` is not modified; `out` must not alias `x` or the workspace
        buffers.
        """
        n, d = x.shape
        if plan.dead is not None:
            return self._forward_stages(x, plan, ws, out)
        f = self.dim_feedforward
        qkv = ws.get("qkv", (n, 3 * d))
        ctx = ws.get("ctx", (n, d))
        hid = ws.get("hid", (n, f))
        mid = ws.get("sum" if self.norm_first else "x1", (n, d))
        xn = ws.get("xn", (n, d)) if self.norm_first else None
        self._p.kernel.run(x, qkv, ctx, mid, hid, out, plan.groups, self.num_threads, xn,
                         key_padding_mask=plan.kpm, mask=plan.mask, is_causal=plan.is_causal)
        return out

    def _forward_stages(self, x, plan, ws, out):
        """forward_rows stage by stage, one kernel call per stage (the same kernels in the
        same order as the compiled layer, so the same bits); needed when some query has
        every key masked (plan.dead), whose rows lose the folded value bias between the
        output projection and its residual + norm."""
        p = self._p               # read once: a concurrent load_state_dict swaps it whole
        n, d = x.shape
        f = self.dim_feedforward
        nt = self.num_threads
        qkv = ws.get("qkv", (n, 3 * d))
        ctx = ws.get("ctx", (n, d))
        hid = ws.get("hid", (n, f))
        proj = ws.get("proj", (n, d))
        if self.norm_first:
            xn = ws.get("xn", (n, d))
            self._norm(x, p.n1, xn)
            p.lin_qkv(xn, out=qkv, num_threads=nt)
        else:
            p.lin_qkv(x, out=qkv, num_threads=nt)
        self._attention(qkv, ctx, plan, p.b_q)
        # The residual add + norm after each sub-layer runs in the GEMM's epilogue (the
        # same bits as add_layer_norm / add_rms_norm), except after an attention with dead
        # rows: their folded value bias must come off before the residual is added.
        n_o, epi_o = (p.n2, p.epi2) if self.norm_first else (p.n1, p.epi1)
        if plan.dead is not None:
            p.lin_o(ctx, out=proj, num_threads=nt)
            proj[plan.dead] -= p.o_bv
        if self.norm_first:
            s = ws.get("sum", (n, d))
            # s = x + attn ; xn = norm2(s)
            if plan.dead is not None:
                self._add_norm(proj, x, n_o, None, out=xn, sum_out=s)
            else:
                p.lin_o(ctx, residual=x, out=xn, sum_out=s, num_threads=nt,
                            **epi_o)
            p.lin_1(xn, activation=self.activation, out=hid, num_threads=nt)
            p.lin_2(hid, residual=s, out=out, num_threads=nt)
        else:
            x1 = ws.get("x1", (n, d))
            if plan.dead is not None:
                self._add_norm(proj, x, n_o, None, out=x1)
            else:
                p.lin_o(ctx, residual=x, out=x1, num_threads=nt, **epi_o)
            p.lin_1(x1, activation=self.activation, out=hid, num_threads=nt)
            p.lin_2(hid, residual=x1, out=out, num_threads=nt, **p.epi2)
        return out

    def _epilogue(self, params):
        """PackedLinear keyword arguments of the fused residual + norm epilogue."""
        if self.norm == "layer":
            return {"norm": "layer_norm", "norm_weight": params[0], "norm_bias": params[1],
                    "eps": self.layer_norm_eps}
        return {"norm": "rms_norm", "norm_weight": params[0], "eps": self.layer_norm_eps}

    # ------------------------------------------------------------------ public call
    def __call__(self, x, *args, key_padding_mask=None, attn_mask=None, is_causal=False,
                 skip_padding=False, src_mask=None, src_key_padding_mask=None):
        """Run the layer.

        Every argument after `x` is a keyword: PyTorch's second positional argument is the
        attention mask and normcy's was the padding mask, so a positional mask is refused
        (TypeError) rather than read as the wrong one.  PyTorch's names work too.

        Parameters
        ----------
        x : ndarray of float32, shape (batch, seq, d_model) or (seq, d_model)
            Input, not modified ((seq, batch, d_model) for a layer made with
            ``batch_first=False``).
        key_padding_mask : ndarray of bool, shape (batch, seq) or (seq,), optional
            True marks padding: those keys get no attention weight (PyTorch's
            ``src_key_padding_mask``, also accepted under that name).  A float array is an
            additive mask instead.
        attn_mask : ndarray, shape (seq, seq), optional
            Additive float mask, or bool with True = not allowed (PyTorch's ``src_mask``,
            also accepted under that name).
        is_causal : bool, default False
            Position ``i`` attends only to positions ``<= i``, together with any
            `attn_mask` (PyTorch treats it as a hint that `attn_mask` is causal).
        skip_padding : bool, default False
            With a boolean `key_padding_mask` (and no `attn_mask`): compute the real tokens
            only, packed, and return zeros at the padded positions, as PyTorch's fast path
            (nested tensors) does.  The real tokens get the values of the padded call up to
            rounding (~1e-6), and each sequence's values no longer depend on the padding
            or on the other sequences of the batch (bit for bit).  False (default): every
            position holds the layer's result, padded queries included.

        Returns
        -------
        ndarray of float32
            A new array with the shape of `x`.
        """
        key_padding_mask, attn_mask, is_causal, skip_padding = _call_options(
            "TransformerEncoderLayer", args, key_padding_mask, attn_mask, is_causal,
            skip_padding, src_key_padding_mask, ("src_mask", src_mask))
        x3, unbatched = _check_input(x, self.d_model, self.batch_first)
        return _run(self.forward_rows, x3, unbatched, key_padding_mask, attn_mask, is_causal,
                    skip_padding, self._wsp, self.batch_first)

    def clear_workspace(self):
        """Drop the cached intermediate buffers (those of a call running now in another
        thread when it ends)."""
        self._wsp.clear()

    def __repr__(self):
        return ("TransformerEncoderLayer(d_model=%d, nhead=%d, dim_feedforward=%d, "
                "activation=%r, norm_first=%r, layer_norm_eps=%g, norm=%r%s)"
                % (self.d_model, self.nhead, self.dim_feedforward, self.activation,
                   self.norm_first, self.layer_norm_eps, self.norm,
                   ("" if self.bias else ", bias=False")
                   + ("" if self.batch_first else ", batch_first=False")))


def _call_options(owner, args, key_padding_mask, attn_mask, is_causal, skip_padding,
                  torch_kpm, torch_mask):
    """A layer's or a stack's call options, checked, PyTorch's names folded into normcy's:
    (key_padding_mask, attn_mask, is_causal, skip_padding)."""
    mask_name, torch_attn = torch_mask
    if args:
        raise TypeError("%s takes x as its only positional argument (got %d more): pass masks "
                        "by keyword, attn_mask= (PyTorch's %s) or key_padding_mask= (PyTorch's "
                        "src_key_padding_mask)" % (owner, len(args), mask_name))
    if torch_kpm is not None:
        if key_padding_mask is not None:
            raise TypeError("give key_padding_mask or src_key_padding_mask, not both")
        key_padding_mask = torch_kpm
    if torch_attn is not None:
        if attn_mask is not None:
            raise TypeError("give attn_mask or %s, not both" % mask_name)
        attn_mask = torch_attn
    if is_causal is None:
        is_causal = False
    for name, v in (("is_causal", is_causal), ("skip_padding", skip_padding)):
        if not isinstance(v, (bool, np.bool_)):
            raise TypeError("%s must be a bool, got %s" % (name, type(v).__name__))
    return key_padding_mask, attn_mask, bool(is_causal), bool(skip_padding)


def _run(forward, x3, unbatched, key_padding_mask, attn_mask, is_causal, skip_padding, pool,
         batch_first=True):
    """A layer's or a stack's call: forward(rows, plan, ws, out) on the (batch, seq, d)
    input, on every position or (skip_padding) on the real tokens packed, with a workspace
    lent by `pool`; the result in the caller's layout (batch_first=False: (seq, batch, d), a
    new C-contiguous array)."""
    ws = pool.acquire()
    try:
        return _run_on(forward, x3, unbatched, key_padding_mask, attn_mask, is_causal,
                       skip_padding, ws, batch_first)
    finally:
        pool.release(ws)


def _run_on(forward, x3, unbatched, key_padding_mask, attn_mask, is_causal, skip_padding, ws,
            batch_first):
    b, s, d = x3.shape
    plan = None
    if skip_padding and key_padding_mask is not None:
        real = _real_tokens(key_padding_mask, attn_mask, b, s, unbatched)
        b_idx, col, plan = packed_plan(real, is_causal)
        if b_idx is not None:
            out = np.zeros((b, s, d), dtype=_F32)
            if b_idx.size:
                y = np.empty((b_idx.size, d), dtype=_F32)
                forward(np.ascontiguousarray(x3[b_idx, col]), plan, ws, y)
                out[b_idx, col] = y
            return _layout(out, unbatched, batch_first)
        # no padding: the whole batch as it is
    if plan is None:
        plan = padded_plan(b, s, key_padding_mask, attn_mask, is_causal, unbatched)
    out = np.empty((b, s, d), dtype=_F32)
    if b * s:
        forward(x3.reshape(b * s, d), plan, ws, out.reshape(b * s, d))
    return _layout(out, unbatched, batch_first)


def _layout(out, unbatched, batch_first):
    """A (batch, seq, d) result in the caller's layout."""
    if unbatched:
        return out[0]
    return out if batch_first else np.ascontiguousarray(out.transpose(1, 0, 2))


def _real_tokens(key_padding_mask, attn_mask, b, s, unbatched):
    """The (b, s) real-token mask of a skip_padding call (True = real), checked."""
    if attn_mask is not None:
        raise ValueError("skip_padding=True takes a boolean key_padding_mask and no attn_mask "
                         "(an attention mask may hide keys per query, which packing cannot "
                         "express)")
    k = key_padding_2d(key_padding_mask, b, s, unbatched)
    if k.dtype != np.bool_:
        raise TypeError("skip_padding=True needs key_padding_mask as a numpy.ndarray of bool "
                        "(True = padding), got dtype %s" % k.dtype)
    return ~k


def forward_layers(layers, x, plan, ws, out, io="io"):
    """Run `layers` in sequence on the (rows, d_model) matrix `x` into `out`.

    Package-level interface (used by :class:`TransformerEncoder` and
    :class:`normcy.BertModel`).  Intermediate results alternate between the workspace
    buffers ``io + "0"`` and ``io + "1"`` (`x` may be one of them: only the first layer reads
    it).  Unless some query has every key masked (plan.dead), and when the layers share
    their shapes, norm placement and thread setting, every layer runs in one compiled call
    and one parallel region (the same kernels as layer by layer, the same bits); otherwise
    layer by layer.
    """
    n, d = x.shape
    nl = len(layers)
    if not nl:
        np.copyto(out, x)
        return out
    l0 = layers[0]
    if (plan.dead is None
            and all(l.d_model == d and l.dim_feedforward == l0.dim_feedforward
                    and l.norm_first == l0.norm_first and l.num_threads == l0.num_threads
                    for l in layers)):
        pair = (ws.get(io + "0", (n, d)), ws.get(io + "1", (n, d))) if nl > 1 else ()
        outs = [pair[i % 2] for i in range(nl - 1)] + [out]
        f = l0.dim_feedforward
        mid = ws.get("sum" if l0.norm_first else "x1", (n, d))
        xn = ws.get("xn", (n, d)) if l0.norm_first else None
        run_layers([l._p.kernel for l in layers], x, outs, ws.get("qkv", (n, 3 * d)),
                    ws.get("ctx", (n, d)), mid, ws.get("hid", (n, f)), plan.groups,
                    l0.num_threads, xn, key_padding_mask=plan.kpm, mask=plan.mask,
                    is_causal=plan.is_causal)
        return out
    cur = x
    for i, layer in enumerate(layers):
        dst = out if i == nl - 1 else ws.get("%s%d" % (io, i % 2), (n, d))
        layer.forward_rows(cur, plan, ws, dst)
        cur = dst
    return out


def _check_input(x, d_model, batch_first=True):
    """x as a C-contiguous (batch, seq, d_model) array, and whether it was unbatched
    ((seq, d_model)); batch_first=False: a 3-D x is (seq, batch, d_model)."""
    layout = "(batch, seq" if batch_first else "(seq, batch"
    refuse_masked(x, "x")
    if not isinstance(x, np.ndarray):
        raise TypeError("x must be a float32 numpy.ndarray of shape %s, %d), got %s"
                        % (layout, d_model, type(x).__name__))
    x = base_array(x)       # a subclass is used as its buffer (no subclass method runs)
    if x.dtype != _F32:
        raise TypeError("x must have dtype float32, got %s (shape %s); normcy does not cast "
                        "activations" % (x.dtype, tuple(x.shape)))
    if x.ndim not in (2, 3) or x.shape[-1] != d_model:
        raise ValueError("x must have shape %s, %d) or (seq, %d), got %s"
                         % (layout, d_model, d_model, tuple(x.shape)))
    unbatched = x.ndim == 2
    x3 = x[None] if unbatched else (x if batch_first else x.transpose(1, 0, 2))
    if not (x3.flags.c_contiguous and x3.flags.aligned):
        # an unaligned float32 view (e.g. from a bytes buffer at an odd offset) is read
        # through an aligned copy, as PackedLinear reads one: the compiled layers load whole
        # floats (np.ascontiguousarray would hand back an unaligned contiguous view as is)
        x3 = np.array(x3, dtype=_F32, order="C", copy=True)
    return x3, unbatched


class TransformerEncoder:
    """A stack of :class:`TransformerEncoderLayer` with an optional final norm.

    Parameters
    ----------
    layers : sequence of TransformerEncoderLayer
        Applied in order; all with the same ``d_model``.
    norm : None, or a (weight, bias) pair / dict, optional
        Final norm applied to the output (``torch.nn.TransformerEncoder(norm=...)``): a
        LayerNorm ``{"weight": w, "bias": b, "eps": 1e-5}`` (``"bias": None`` or no bias:
        ``LayerNorm(bias=False)``), or an RMSNorm ``{"weight": w, "eps": ..., "kind":
        "rms"}``.  A ``(weight, bias[, eps])`` tuple is a LayerNorm.
    """

    def __init__(self, layers, norm=None):
        layers = list(layers)
        if not layers:
            raise ValueError("layers must not be empty")
        for i, layer in enumerate(layers):
            if not isinstance(layer, TransformerEncoderLayer):
                raise TypeError("layers[%d] must be a TransformerEncoderLayer, got %s"
                                % (i, type(layer).__name__))
        d = layers[0].d_model
        if any(layer.d_model != d for layer in layers):
            raise ValueError("all layers must have the same d_model")
        if any(layer.batch_first != layers[0].batch_first for layer in layers):
            raise ValueError("all layers must have the same batch_first")
        self.layers = layers
        self.d_model = d
        #: the layers' input layout (as torch.nn.TransformerEncoder takes its layers')
        self.batch_first = layers[0].batch_first
        self.norm = _final_norm(norm, d)
        self._wsp = WorkspacePool()
        self._num_threads = None

    @property
    def num_threads(self):
        """Threads for every kernel of the stack, final norm included (None: normcy's
        default).  Setting it sets every layer's ``num_threads``."""
        return self._num_threads

    @num_threads.setter
    def num_threads(self, value):
        value = check_num_threads(value)
        for layer in self.layers:
            layer.num_threads = value
        self._num_threads = value

    @classmethod
    def from_torch_state_dict(cls, state_dict, num_layers, nhead, *, activation="relu",
                              norm_first=False, layer_norm_eps=1e-5, norm="layer",
                              final_norm_eps=None, final_norm=None, batch_first=True):
        """Build from the state dict of ``torch.nn.TransformerEncoder``.

        Keys are ``layers.N.<TransformerEncoderLayer key>`` for ``N < num_layers`` and, when
        the encoder has a final norm, ``norm.weight`` (and ``norm.bias``).  The layers'
        ``bias`` is read from their keys (see :meth:`TransformerEncoderLayer.
        from_torch_state_dict`).  The final norm uses `final_norm_eps` (default:
        `layer_norm_eps`) and is of kind `final_norm` ("layer" or "rms"; default: `norm`):
        a LayerNorm without ``norm.bias`` is ``LayerNorm(bias=False)``.  `batch_first` is
        the layers' (as in ``torch.nn.TransformerEncoderLayer``).
        """
        if not isinstance(state_dict, Mapping):
            raise TypeError("state_dict must be a mapping of names to arrays, got %s"
                            % type(state_dict).__name__)
        num_layers = _check_int(num_layers, "num_layers")
        per = {}      # layer index -> its keys, for the layers the state dict has
        final = {}
        unexpected = []
        for key, value in state_dict.items():
            if not isinstance(key, str):
                unexpected.append(key)
                continue
            if key.startswith("layers."):
                idx, _, rest = key[len("layers."):].partition(".")
                if idx.isdigit() and int(idx) < num_layers and rest:
                    per.setdefault(int(idx), {})[rest] = value
                    continue
            elif key.startswith("norm.") and key[5:] in ("weight", "bias"):
                final[key[5:]] = value
                continue
            unexpected.append(key)
        if unexpected:
            raise ValueError("unexpected keys in a TransformerEncoder state dict with %d layers: "
                             "%s" % (num_layers, sorted(map(str, unexpected))[:10]))
        layers = []
        for i in range(num_layers):      # stops at the first layer the state dict lacks
            sd = per.get(i)
            if not sd:
                raise ValueError("state_dict has no keys for layer %d (layers.%d.*)" % (i, i))
            try:
                layers.append(TransformerEncoderLayer.from_torch_state_dict(
                    sd, nhead, activation=activation, norm_first=norm_first,
                    layer_norm_eps=layer_norm_eps, norm=norm, batch_first=batch_first))
            except ValueError as exc:
                raise ValueError("layers.%d: %s" % (i, exc)) from None
        fnorm = None
        if final:
            if "weight" not in final:
                raise ValueError("final norm has a bias but no norm.weight")
            eps = layer_norm_eps if final_norm_eps is None else final_norm_eps
            fnorm = {"weight": final["weight"], "bias": final.get("bias"), "eps": eps,
                     "kind": norm if final_norm is None else final_norm}
        return cls(layers, norm=fnorm)

    def __call__(self, x, *args, key_padding_mask=None, attn_mask=None, is_causal=False,
                 skip_padding=False, mask=None, src_key_padding_mask=None):
        """Run every layer, then the final norm.  Arguments as for the layer's call
        (keywords only; PyTorch's names here are ``mask`` and ``src_key_padding_mask``,
        and ``is_causal=None`` means False); with skip_padding, the final norm too runs on
        the real tokens only."""
        key_padding_mask, attn_mask, is_causal, skip_padding = _call_options(
            "TransformerEncoder", args, key_padding_mask, attn_mask, is_causal, skip_padding,
            src_key_padding_mask, ("mask", mask))
        x3, unbatched = _check_input(x, self.d_model, self.batch_first)
        return _run(self._forward_rows, x3, unbatched, key_padding_mask, attn_mask, is_causal,
                    skip_padding, self._wsp, self.batch_first)

    def _forward_rows(self, x, plan, ws, out):
        n, d = x.shape
        cur = out if self.norm is None else ws.get("enc_last", (n, d))
        forward_layers(self.layers, x, plan, ws, cur)
        if self.norm is not None:
            w, b, eps, kind = self.norm
            if kind == "layer":
                layer_norm(cur, w, b, eps, out=out, num_threads=self._num_threads)
            else:
                rms_norm(cur, w, eps, out=out, num_threads=self._num_threads)
        return out

    def clear_workspace(self):
        """Drop the cached intermediate buffers (those of a call running now in another
        thread when it ends)."""
        self._wsp.clear()


def _final_norm(norm, d):
    if norm is None:
        return None
    if isinstance(norm, Mapping):
        extra = sorted(map(str, set(norm) - {"weight", "bias", "eps", "kind"}))
        if extra:
            raise ValueError("norm: unknown keys %s (expected 'weight', 'bias', 'eps', 'kind')"
                             % extra)
        if norm.get("weight") is None:
            raise ValueError("norm needs a 'weight'")
        w = norm["weight"]
        b = norm.get("bias")
        eps = norm.get("eps", 1e-5)
        # a LayerNorm unless told otherwise, with or without a bias (LayerNorm(bias=False))
        kind = norm.get("kind", "layer")
    elif isinstance(norm, (tuple, list)) and len(norm) in (2, 3):
        w, b = norm[0], norm[1]
        eps = norm[2] if len(norm) == 3 else 1e-5
        kind = "layer"
    else:
        raise TypeError("norm must be None, a dict with 'weight' (and 'bias', 'eps', 'kind') "
                        "or a (weight, bias[, eps]) tuple, got %s" % type(norm).__name__)
    if kind not in _NORMS:
        raise ValueError("norm kind must be 'layer' or 'rms', got %r" % (kind,))
    w = as_weight(w, "norm.weight", (d,))
    b = None if b is None else as_weight(b, "norm.bias", (d,))
    if kind == "rms" and b is not None:
        raise ValueError("an RMS final norm has no bias")
    eps = as_float(eps, "final norm eps", minimum=0.0)
    return (w, b, eps, kind)
