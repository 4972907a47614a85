"""A PyTorch-free Transformer encoder layer for CPU inference.

:class:`TransformerEncoderLayer` computes exactly what ``torch.nn.TransformerEncoderLayer``
(``batch_first=True``, eval mode) computes, from the same state dict, with NumPy's BLAS for the
matrix multiplies and normcy's fused kernels for everything else:

- the Q/K/V projection is one GEMM against the pre-transposed, contiguous ``in_proj`` weight;
  the attention scale ``1/sqrt(head_dim)`` is folded into the query weights and bias;
- the key bias is dropped (it adds the same constant ``q . b_k`` to every logit of a row, which
  softmax ignores) and the value bias is folded into the output-projection bias (softmax rows
  sum to one, so ``P (V + b_v) W_o^T = P V W_o^T + W_o b_v``): no bias pass over K and V;
- attention runs as two batched ``np.matmul`` calls on head-major copies of q, k^T and v
  (one fused copy kernel that also adds the query bias) around normcy's in-place masked
  softmax; the context goes straight into the (tokens, d_model) layout (no merge copy);
- every residual add is fused into the norm kernels (``add_layer_norm`` / ``add_rms_norm``
  with ``x_bias=`` the linear layer's bias, ``sum_out=`` for the pre-LN residual stream), the
  feed-forward bias is fused into the activation;
- all intermediate buffers live in a per-thread workspace reused between calls, so one layer
  object may be called from several threads at once.

Masks follow PyTorch: ``key_padding_mask`` is (batch, seq) bool with True marking padding;
``attn_mask`` is (seq, seq), additive float or bool (True = not allowed); ``is_causal=True``
applies the causal mask by itself (PyTorch additionally needs the mask passed as a hint).
"""
import math
import threading
from collections.abc import Mapping

import numpy as np

from normcy._norms import add_layer_norm, add_rms_norm, layer_norm, rms_norm
from normcy._ops import _split_heads, bias_activation, softmax
from normcy._validate import as_float, as_int

__all__ = ["TransformerEncoderLayer", "TransformerEncoder"]

_F32 = np.float32
#: Threads for normcy's kernels between the BLAS matmuls of a layer (see __init__).
DEFAULT_KERNEL_THREADS = 1
_ACTIVATIONS = ("relu", "gelu", "gelu_tanh")
_NORMS = ("layer", "rms")


class _Workspace:
    """Named, grow-only float32 buffers handed out as reshaped views (one per thread)."""

    __slots__ = ("_bufs",)

    def __init__(self):
        self._bufs = {}

    def get(self, name, shape):
        n = 1
        for s in shape:
            n *= s
        buf = self._bufs.get(name)
        if buf is None or buf.size < n:
            buf = np.empty(max(n, 1), dtype=_F32)
            self._bufs[name] = buf
        return buf[:n].reshape(shape)

    def nbytes(self):
        return sum(b.nbytes for b in self._bufs.values())


class _ThreadWorkspaces(threading.local):
    def __init__(self):
        self.ws = _Workspace()


def _as_param(value, name, shape):
    """A state-dict entry as a contiguous float32 array of the expected shape."""
    try:
        a = np.asarray(value)
    except Exception as exc:  # pragma: no cover - exotic objects
        raise TypeError("%s must be an array, got %s" % (name, type(value).__name__)) from exc
    if a.dtype.kind not in "fiu" or a.dtype == np.bool_:
        raise TypeError("%s must be a float array, got dtype %s" % (name, a.dtype))
    if tuple(a.shape) != tuple(shape):
        raise ValueError("%s must have shape %s, got %s" % (name, tuple(shape), tuple(a.shape)))
    a = np.array(a, dtype=_F32, order="C", copy=True)
    if not np.all(np.isfinite(a)):
        raise ValueError("%s contains NaN or Inf" % name)
    return a


def _check_int(v, name, minimum=1, maximum=2 ** 31 - 1):
    return as_int(v, name, minimum=minimum, maximum=maximum)


# Below this many rows, ``x @ W`` runs as ``(W^T @ x^T)^T`` through two small copies, with
# the token count padded up to a multiple of 8.  OpenBLAS's kernels want the long dimension
# first, and its sgemm handles a short dimension that is not a multiple of 8 in slow tail
# code: six MiniLM layers (d_model 384) of matmuls take 2.4 ms at 16 tokens but 4.0 ms at
# 15, 3.1 ms at 24 and 4.4 ms at 23 (2 threads; the padded columns are zeros and cost
# nothing else; measured by timing the four products of six layers for every m <= 80).
# Above ~56 rows the two transposing copies cost more than the faster product saves
# (a six-layer encoder at 1x48: 8.3 vs 8.8 ms; at 1x64: 10.9 vs 9.8 ms).
_SMALL_ROWS = 56
_PAD_MIN = 5


def _linear(x, w, wt, out, ws):
    """``out = x @ w`` for C-contiguous (m, k) x, (k, n) w and its (n, k) transpose wt.

    With few rows the product runs as ``(wt @ x^T)^T`` on a copy of x^T padded with zero
    columns to a multiple of 8: a C-contiguous (n, k) left operand and a right operand
    whose column count is a multiple of the kernel width are what OpenBLAS's small-m path
    wants (six MiniLM layers at 9 tokens: 2.6 ms of matmuls instead of 3.2 ms with ``w.T``
    as an F-ordered view; padding 15 -> 16 columns: 4.0 -> 2.4 ms).
    """
    m = x.shape[0]
    if m > _SMALL_ROWS or m == 0:
        return np.matmul(x, w, out=out)
    mp = m if m < _PAD_MIN else (m + 7) & ~7
    k = x.shape[1]
    xt = ws.get("lin_xt", (k, mp))
    np.copyto(xt[:, :m], x.T)
    if mp > m:
        xt[:, m:] = 0.0
    ot = ws.get("lin_ot", (w.shape[1], mp))
    np.matmul(wt, xt, out=ot)
    np.copyto(out, ot[:, :m].T)
    return out


# Attention runs on chunks of sequences whose score matrices fit this budget (bytes), so that
# the scores stay in L2 between the QK^T matmul, the softmax and the PV matmul (about 30%
# faster attention at 32 x 128 than one pass over the whole batch).
_SCORES_BUDGET = 2 << 20


def _chunk_groups(plan, nhead):
    for off, nseq, L in plan.groups:
        per = max(1, _SCORES_BUDGET // (4 * nhead * L * L))
        for i in range(0, nseq, per):
            n = min(per, nseq - i)
            yield off + i * L, n, L


class _AttentionPlan:
    """How the tokens of a (rows, d_model) matrix form sequences for attention.

    ``groups`` is a list of (row_offset, n_seq, seq_len): ``n_seq`` consecutive sequences of
    ``seq_len`` tokens each starting at ``row_offset``.  ``kpm`` / ``mask`` apply to a single
    group covering every row (the padded (batch, seq) layout).  ``dead`` lists the rows
    whose every key is masked: softmax gives them zero weights, so their attention output is
    zero (PyTorch's scaled_dot_product_attention does the same); the layer removes the value
    bias it folded into the output bias from those rows.
    """

    __slots__ = ("groups", "kpm", "mask", "is_causal", "dead")

    def __init__(self, groups, kpm=None, mask=None, is_causal=False, dead=None):
        self.groups = groups
        self.kpm = kpm
        self.mask = mask
        self.is_causal = is_causal
        # rows whose every key is masked (their attention output is zero), or None
        self.dead = dead


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

    Notes
    -----
    A new layer has randomly initialized weights (PyTorch's initialization scheme); load real
    ones with :meth:`from_torch_state_dict` or :meth:`load_state_dict`.  Calling the layer
    returns a new array; the intermediate buffers are cached per thread and reused.
    """

    def __init__(self, d_model, nhead, dim_feedforward, *, activation="relu", norm_first=False,
                 layer_norm_eps=1e-5, norm="layer"):
        self._configure(d_model, nhead, dim_feedforward, activation, norm_first,
                        layer_norm_eps, norm)
        self.load_state_dict(self._init_state_dict())

    def _configure(self, d_model, nhead, dim_feedforward, activation, norm_first,
                   layer_norm_eps, norm):
        d_model = _check_int(d_model, "d_model")
        nhead = _check_int(nhead, "nhead")
        dim_feedforward = _check_int(dim_feedforward, "dim_feedforward")
        if d_model % nhead:
            raise ValueError("d_model (%d) must be divisible by nhead (%d)" % (d_model, nhead))
        if activation not in _ACTIVATIONS:
            raise ValueError("activation must be one of %s, got %r" % (_ACTIVATIONS, activation))
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
        self._tls = _ThreadWorkspaces()
        # Threads for normcy's kernels inside the layer.  They run between NumPy BLAS calls,
        # and OpenBLAS's worker threads keep spinning on the other cores for a long while
        # after each matmul: a multi-threaded kernel then waits for a core held by a
        # spinning BLAS thread (measured here: one 1x128 layer 41 ms with 2 kernel threads
        # vs 2.6 ms with 1).  So by default BLAS gets the cores for the matmuls and the
        # memory-bound kernels run on the calling thread.
        self._nt = DEFAULT_KERNEL_THREADS

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
        return shapes

    def _init_state_dict(self):
        rng = np.random.default_rng()
        d, f = self.d_model, self.dim_feedforward

        def uni(shape, bound):
            return rng.uniform(-bound, bound, size=shape).astype(_F32)

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
        return sd

    @classmethod
    def from_torch_state_dict(cls, state_dict, nhead, *, activation="relu", norm_first=False,
                              layer_norm_eps=1e-5, norm="layer"):
        """Build a layer from the state dict of ``torch.nn.TransformerEncoderLayer``.

        Parameters
        ----------
        state_dict : Mapping[str, array_like]
            Exactly the keys of ``torch.nn.TransformerEncoderLayer(...).state_dict()``
            (``self_attn.in_proj_weight``, ``self_attn.in_proj_bias``,
            ``self_attn.out_proj.weight``/``bias``, ``linear1.*``, ``linear2.*``, ``norm1.*``,
            ``norm2.*``; with ``norm="rms"`` the norms have only a ``weight``), as NumPy
            arrays (``tensor.numpy()``).  ``d_model`` and ``dim_feedforward`` are read from
            the shapes.
        nhead : int
        activation, norm_first, layer_norm_eps, norm
            As for the constructor; they must match the PyTorch layer's settings (they are
            not stored in a state dict).

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
        layer = cls.__new__(cls)
        layer._configure(w[1], nhead, f[0], activation, norm_first, layer_norm_eps, norm)
        layer.load_state_dict(state_dict)
        return layer

    def load_state_dict(self, state_dict):
        """Load PyTorch-named parameters (see :meth:`from_torch_state_dict`); strict."""
        if not isinstance(state_dict, Mapping):
            raise TypeError("state_dict must be a mapping of names to arrays, got %s"
                            % type(state_dict).__name__)
        shapes = self._expected_shapes()
        missing = sorted(set(shapes) - set(state_dict))
        unexpected = sorted(set(state_dict) - set(shapes))
        if missing or unexpected:
            msg = []
            if missing:
                msg.append("missing keys %s" % missing)
            if unexpected:
                msg.append("unexpected keys %s" % unexpected)
            hint = ""
            if self.norm == "layer" and "norm1.bias" in missing:
                hint = " (a state dict without norm biases needs norm='rms')"
            elif self.norm == "rms" and "norm1.bias" in unexpected:
                hint = " (a state dict with norm biases needs norm='layer')"
            raise ValueError("state_dict does not match a TransformerEncoderLayer(d_model=%d, "
                             "dim_feedforward=%d, norm=%r): %s%s"
                             % (self.d_model, self.dim_feedforward, self.norm,
                                "; ".join(msg), hint))
        self._sd = {k: _as_param(state_dict[k], k, s) for k, s in shapes.items()}
        self._prepare()

    def state_dict(self):
        """The parameters under PyTorch's names (copies, float32)."""
        return {k: v.copy() for k, v in self._sd.items()}

    def _prepare(self):
        sd = self._sd
        d = self.d_model
        scale = 1.0 / math.sqrt(self.head_dim)
        w_in = sd["self_attn.in_proj_weight"].astype(np.float64)
        b_in = sd["self_attn.in_proj_bias"].astype(np.float64)
        w_in[:d] *= scale
        # (d, 3d) contiguous: x @ w_qkv gives [q*scale | k | v]
        self._w_qkv = np.ascontiguousarray(w_in.T, dtype=_F32)
        self._wt_qkv = np.ascontiguousarray(w_in, dtype=_F32)     # (3d, d), for few rows
        self._b_q = (b_in[:d] * scale).astype(_F32)
        w_o = sd["self_attn.out_proj.weight"].astype(np.float64)
        self._w_o = np.ascontiguousarray(w_o.T, dtype=_F32)
        self._wt_o = sd["self_attn.out_proj.weight"]
        o_bv = w_o @ b_in[2 * d:]
        self._o_bv = o_bv.astype(_F32)
        self._b_o = (sd["self_attn.out_proj.bias"].astype(np.float64) + o_bv).astype(_F32)
        self._w_1 = np.ascontiguousarray(sd["linear1.weight"].T)
        self._wt_1 = sd["linear1.weight"]
        self._b_1 = sd["linear1.bias"]
        self._w_2 = np.ascontiguousarray(sd["linear2.weight"].T)
        self._wt_2 = sd["linear2.weight"]
        self._b_2 = sd["linear2.bias"]
        self._n1 = (sd["norm1.weight"], sd.get("norm1.bias"))
        self._n2 = (sd["norm2.weight"], sd.get("norm2.bias"))

    # ------------------------------------------------------------------ kernels
    def _norm(self, x, params, out):
        if self.norm == "layer":
            return layer_norm(x, params[0], params[1], self.layer_norm_eps, out=out,
                              num_threads=self._nt)
        return rms_norm(x, params[0], self.layer_norm_eps, out=out, num_threads=self._nt)

    def _add_norm(self, x, residual, params, x_bias, out, sum_out=None):
        if self.norm == "layer":
            return add_layer_norm(x, residual, params[0], params[1], self.layer_norm_eps,
                                  x_bias=x_bias, out=out, sum_out=sum_out,
                                  num_threads=self._nt)
        return add_rms_norm(x, residual, params[0], self.layer_norm_eps, x_bias=x_bias,
                            out=out, sum_out=sum_out, num_threads=self._nt)

    def _attention(self, qkv, ctx, plan, ws):
        """Scaled dot-product attention from the (rows, 3d) projections into ctx (rows, d).

        The query bias is added while q, k and v are copied into head-major buffers (keys
        transposed): OpenBLAS multiplies those small contiguous per-head matrices about twice
        as fast as strided views of the packed projections.  The context is written straight
        into the (rows, d) layout through a strided view (no merge copy).
        """
        h, dh, d = self.nhead, self.head_dim, self.d_model
        nt = self._nt
        for off, nseq, L in _chunk_groups(plan, h):
            rows = nseq * L
            q = ws.get("q", (nseq, h, L, dh))
            kt = ws.get("kt", (nseq, h, dh, L))
            v = ws.get("v", (nseq, h, L, dh))
            _split_heads(qkv[off:off + rows], self._b_q, q, kt, v, nseq, L, h, num_threads=nt)
            scores = ws.get("scores", (nseq, h, L, L))
            np.matmul(q, kt, out=scores)
            kpm = plan.kpm
            mask = plan.mask
            if kpm is not None or (mask is not None and mask.ndim == 4):
                # masks with a batch axis: the padded layout, one group starting at row 0
                first = off // L
                if kpm is not None:
                    kpm = kpm[first:first + nseq, None, None, :]
                if mask is not None and mask.ndim == 4:
                    mask = mask[first:first + nseq]
            softmax(scores, mask=mask, key_padding_mask=kpm, is_causal=plan.is_causal,
                    out=scores, num_threads=nt)
            c = ctx[off:off + rows].reshape(nseq, L, h, dh).transpose(0, 2, 1, 3)
            np.matmul(scores, v, out=c)

    def _forward_rows(self, x, plan, ws, out):
        """One layer on a (rows, d_model) C-contiguous matrix; result into `out`.

        `x` is not modified; `out` must not alias `x` or the workspace buffers.
        """
        n, d = x.shape
        f = self.dim_feedforward
        qkv = ws.get("qkv", (n, 3 * d))
        ctx = ws.get("ctx", (n, d))
        proj = ws.get("proj", (n, d))
        hid = ws.get("hid", (n, f))
        if self.norm_first:
            xn = ws.get("xn", (n, d))
            self._norm(x, self._n1, xn)
            _linear(xn, self._w_qkv, self._wt_qkv, qkv, ws)
        else:
            _linear(x, self._w_qkv, self._wt_qkv, qkv, ws)
        nt = self._nt
        self._attention(qkv, ctx, plan, ws)
        _linear(ctx, self._w_o, self._wt_o, proj, ws)
        if plan.dead is not None:
            proj[plan.dead] -= self._o_bv
        if self.norm_first:
            s = ws.get("sum", (n, d))
            # s = x + attn + b_o ; xn = norm2(s)
            self._add_norm(proj, x, self._n2, self._b_o, out=xn, sum_out=s)
            _linear(xn, self._w_1, self._wt_1, hid, ws)
            bias_activation(hid, self._b_1, self.activation, out=hid, num_threads=nt)
            _linear(hid, self._w_2, self._wt_2, proj, ws)
            bias_activation(proj, self._b_2, residual=s, out=out, num_threads=nt)
        else:
            x1 = ws.get("x1", (n, d))
            self._add_norm(proj, x, self._n1, self._b_o, out=x1)
            _linear(x1, self._w_1, self._wt_1, hid, ws)
            bias_activation(hid, self._b_1, self.activation, out=hid, num_threads=nt)
            _linear(hid, self._w_2, self._wt_2, proj, ws)
            self._add_norm(proj, x1, self._n2, self._b_2, out=out)
        return out

    # ------------------------------------------------------------------ public call
    def __call__(self, x, key_padding_mask=None, is_causal=False, *, attn_mask=None):
        """Run the layer.

        Parameters
        ----------
        x : ndarray of float32, shape (batch, seq, d_model) or (seq, d_model)
            Input (batch first); not modified.
        key_padding_mask : ndarray of bool, shape (batch, seq) or (seq,), optional
            True marks padding: those keys get no attention weight (PyTorch's
            ``src_key_padding_mask``).  A float array is an additive mask instead.
        is_causal : bool, default False
            Position ``i`` attends only to positions ``<= i``.
        attn_mask : ndarray, shape (seq, seq), optional
            PyTorch's ``src_mask``: additive float mask, or bool with True = not allowed.

        Returns
        -------
        ndarray of float32
            A new array with the shape of `x`.
        """
        x3, unbatched = _check_input(x, self.d_model)
        plan = _padded_plan(x3.shape[0], x3.shape[1], key_padding_mask, attn_mask, is_causal,
                            unbatched)
        b, s, d = x3.shape
        out = np.empty((b, s, d), dtype=_F32)
        if b * s:
            self._forward_rows(x3.reshape(b * s, d), plan, self._tls.ws, out.reshape(b * s, d))
        return out[0] if unbatched else out

    def clear_workspace(self):
        """Drop this thread's cached intermediate buffers."""
        self._tls.ws = _Workspace()

    def __repr__(self):
        return ("TransformerEncoderLayer(d_model=%d, nhead=%d, dim_feedforward=%d, "
                "activation=%r, norm_first=%r, layer_norm_eps=%g, norm=%r)"
                % (self.d_model, self.nhead, self.dim_feedforward, self.activation,
                   self.norm_first, self.layer_norm_eps, self.norm))


def _check_input(x, d_model):
    if not isinstance(x, np.ndarray):
        raise TypeError("x must be a float32 numpy.ndarray of shape (batch, seq, %d), got %s"
                        % (d_model, type(x).__name__))
    if x.dtype != _F32:
        raise TypeError("x must have dtype float32, got %s (shape %s); normcy does not cast "
                        "activations" % (x.dtype, tuple(x.shape)))
    if x.ndim not in (2, 3) or x.shape[-1] != d_model:
        raise ValueError("x must have shape (batch, seq, %d) or (seq, %d), got %s"
                         % (d_model, d_model, tuple(x.shape)))
    unbatched = x.ndim == 2
    x3 = x[None] if unbatched else x
    if not x3.flags.c_contiguous:
        x3 = np.ascontiguousarray(x3)
    return x3, unbatched


def _padded_plan(b, s, key_padding_mask, attn_mask, is_causal, unbatched):
    kpm = None
    mask = None
    if key_padding_mask is not None:
        k = key_padding_mask
        if not isinstance(k, np.ndarray):
            raise TypeError("key_padding_mask must be a numpy.ndarray of bool, got %s"
                            % type(k).__name__)
        if unbatched and k.ndim == 1:
            k = k[None]
        if k.shape != (b, s):
            raise ValueError("key_padding_mask must have shape %s (batch, seq), got %s"
                             % ((s,) if unbatched else (b, s), tuple(key_padding_mask.shape)))
        if k.dtype == np.bool_:
            kpm = k
        elif k.dtype.kind == "f":
            mask = k.astype(_F32)[:, None, None, :]
        else:
            raise TypeError("key_padding_mask must have dtype bool (True = padding) or be an "
                            "additive float mask, got dtype %s" % k.dtype)
    if attn_mask is not None:
        m = attn_mask
        if not isinstance(m, np.ndarray):
            raise TypeError("attn_mask must be a numpy.ndarray, got %s" % type(m).__name__)
        if m.shape != (s, s):
            raise ValueError("attn_mask must have shape (seq, seq) = %s, got %s"
                             % ((s, s), tuple(m.shape)))
        if m.dtype == np.bool_:
            m = np.where(m, np.float32(-np.inf), np.float32(0.0))
        elif m.dtype.kind == "f":
            m = m.astype(_F32)
        else:
            raise TypeError("attn_mask must be a float (additive) or bool mask, got dtype %s"
                            % m.dtype)
        mask = m if mask is None else mask + m
    is_causal = bool(is_causal)
    dead = _dead_rows(b, s, kpm, mask, is_causal)
    return _AttentionPlan([(0, b, s)], kpm=kpm, mask=mask, is_causal=is_causal, dead=dead)


def _dead_rows(b, s, kpm, mask, is_causal):
    """Flat (batch*seq) indices of the queries whose every key is masked, or None."""
    if kpm is None and mask is None:
        return None            # a causal mask alone always leaves the diagonal
    if mask is None:
        if is_causal:
            dead = np.logical_and.accumulate(kpm, axis=1)
        else:
            dead = np.broadcast_to(kpm.all(axis=1)[:, None], (b, s))
    else:
        m = np.isneginf(mask)
        if m.ndim == 4:
            m = m[:, 0]                                    # (b, 1 or s, s)
        blocked = np.broadcast_to(m, (b, s, s)).copy()
        if kpm is not None:
            blocked |= kpm[:, None, :]
        if is_causal:
            blocked |= np.triu(np.ones((s, s), dtype=bool), 1)
        dead = blocked.all(axis=-1)
    idx = np.flatnonzero(dead)
    return idx if idx.size else None


class TransformerEncoder:
    """A stack of :class:`TransformerEncoderLayer` with an optional final norm.

    Parameters
    ----------
    layers : sequence of TransformerEncoderLayer
        Applied in order; all with the same ``d_model``.
    norm : None, or a (weight, bias) pair / dict, optional
        Final LayerNorm applied to the output (``torch.nn.TransformerEncoder(norm=...)``).
        Give ``{"weight": w, "bias": b, "eps": 1e-5}``, or ``{"weight": w, "eps": ...,
        "kind": "rms"}`` for an RMSNorm.
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
        self.layers = layers
        self.d_model = d
        self.norm = _final_norm(norm, d)
        self._tls = _ThreadWorkspaces()

    @classmethod
    def from_torch_state_dict(cls, state_dict, num_layers, nhead, *, activation="relu",
                              norm_first=False, layer_norm_eps=1e-5, norm="layer",
                              final_norm_eps=None):
        """Build from the state dict of ``torch.nn.TransformerEncoder``.

        Keys are ``layers.N.<TransformerEncoderLayer key>`` for ``N < num_layers`` and, when
        the encoder has a final norm, ``norm.weight`` (and ``norm.bias``).  The final norm
        uses `final_norm_eps` (default: `layer_norm_eps`) and is a LayerNorm when it has a
        bias, an RMSNorm otherwise.
        """
        if not isinstance(state_dict, Mapping):
            raise TypeError("state_dict must be a mapping of names to arrays, got %s"
                            % type(state_dict).__name__)
        num_layers = _check_int(num_layers, "num_layers")
        per = [dict() for _ in range(num_layers)]
        final = {}
        unexpected = []
        for key, value in state_dict.items():
            if not isinstance(key, str):
                unexpected.append(key)
                continue
            if key.startswith("layers."):
                idx, _, rest = key[len("layers."):].partition(".")
                if idx.isdigit() and int(idx) < num_layers and rest:
                    per[int(idx)][rest] = value
                    continue
            elif key.startswith("norm.") and key[5:] in ("weight", "bias"):
                final[key[5:]] = value
                continue
            unexpected.append(key)
        if unexpected:
            raise ValueError("unexpected keys in a TransformerEncoder state dict with %d layers: "
                             "%s" % (num_layers, sorted(map(str, unexpected))[:10]))
        layers = []
        for i, sd in enumerate(per):
            if not sd:
                raise ValueError("state_dict has no keys for layer %d (layers.%d.*)" % (i, i))
            try:
                layers.append(TransformerEncoderLayer.from_torch_state_dict(
                    sd, nhead, activation=activation, norm_first=norm_first,
                    layer_norm_eps=layer_norm_eps, norm=norm))
            except ValueError as exc:
                raise ValueError("layers.%d: %s" % (i, exc)) from None
        fnorm = None
        if final:
            if "weight" not in final:
                raise ValueError("final norm has a bias but no norm.weight")
            eps = layer_norm_eps if final_norm_eps is None else final_norm_eps
            fnorm = {"weight": final["weight"], "bias": final.get("bias"), "eps": eps,
                     "kind": "layer" if "bias" in final else "rms"}
        return cls(layers, norm=fnorm)

    def __call__(self, x, key_padding_mask=None, is_causal=False, *, attn_mask=None):
        """Run every layer, then the final norm.  Arguments as for the layer's call."""
        x3, unbatched = _check_input(x, self.d_model)
        b, s, d = x3.shape
        plan = _padded_plan(b, s, key_padding_mask, attn_mask, is_causal, unbatched)
        out = np.empty((b, s, d), dtype=_F32)
        if b * s:
            self._forward_rows(x3.reshape(b * s, d), plan, self._tls.ws, out.reshape(b * s, d))
        return out[0] if unbatched else out

    def _forward_rows(self, x, plan, ws, out):
        n, d = x.shape
        cur = x
        nl = len(self.layers)
        for i, layer in enumerate(self.layers):
            last = i == nl - 1
            if last and self.norm is None:
                dst = out
            else:
                dst = ws.get("io%d" % (i % 2), (n, d))
            layer._forward_rows(cur, plan, ws, dst)
            cur = dst
        if self.norm is not None:
            w, b, eps, kind = self.norm
            if kind == "layer":
                layer_norm(cur, w, b, eps, out=out)
            else:
                rms_norm(cur, w, eps, out=out)
        return out

    def clear_workspace(self):
        """Drop this thread's cached intermediate buffers."""
        self._tls.ws = _Workspace()


def _final_norm(norm, d):
    if norm is None:
        return None
    if isinstance(norm, Mapping):
        w = norm.get("weight")
        b = norm.get("bias")
        eps = norm.get("eps", 1e-5)
        kind = norm.get("kind", "layer" if b is not None else "rms")
    elif isinstance(norm, (tuple, list)) and len(norm) in (2, 3):
        w, b = norm[0], norm[1]
        eps = norm[2] if len(norm) == 3 else 1e-5
        kind = "layer"
    else:
        raise TypeError("norm must be None, a dict with 'weight' (and 'bias', 'eps', 'kind') "
                        "or a (weight, bias[, eps]) tuple, got %s" % type(norm).__name__)
    if kind not in _NORMS:
        raise ValueError("norm kind must be 'layer' or 'rms', got %r" % (kind,))
    w = _as_param(w, "norm.weight", (d,))
    b = None if b is None else _as_param(b, "norm.bias", (d,))
    if kind == "rms" and b is not None:
        raise ValueError("an RMS final norm has no bias")
    eps = as_float(eps, "final norm eps", minimum=0.0)
    return (w, b, eps, kind)
