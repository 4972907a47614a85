"""BERT-family encoders (Hugging Face checkpoints) on normcy, without PyTorch.

:class:`BertModel` computes ``transformers.BertModel(...).last_hidden_state`` from the
checkpoint's weights: embeddings (word + token type + absolute position, LayerNorm) and N
post-LN encoder layers (:class:`normcy.TransformerEncoderLayer` with q/k/v concatenated into
one input projection).

Padding costs nothing in the token-wise work: the real tokens of a batch (``attention_mask``
== 1) are packed into one (tokens, hidden) matrix for every projection, feed-forward and norm;
attention runs per group of equally long sequences (the batch is ordered by length inside the
model).  A sequence's result therefore does not depend on which other sequences share its batch,
bit for bit (normcy's own GEMM and attention are batch-invariant).  Padded positions of the
output are zero (Hugging Face computes values there that no pooling should use).
"""
import os
import re
from collections.abc import Mapping

import numpy as np

from normcy._norms import embed_layer_norm
from normcy._encoder_plan import WorkspacePool, packed_plan
from normcy._heap import release_free_heap
from normcy._validate import as_float, as_weight, base_array, refuse_masked
from normcy import hf
from normcy.hf import WeightsFile
from normcy.transformer import TransformerEncoderLayer, check_num_threads, forward_layers

__all__ = ["BertModel"]

_F32 = np.float32
_ACT = {
    "gelu": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "relu": "relu",
}
_LAYER_RE = re.compile(r"^encoder\.layer\.(\d+)\.")
_IGNORED_PREFIXES = ("pooler.", "cls.", "embeddings.position_ids")


_UNSIGNED = {}


def _unsigned_max(a):
    """The largest value of an integer array, negative values counting as huge (a signed
    array is read as its unsigned twin): one reduction range-checks [0, limit)."""
    dt = a.dtype
    if dt.kind == "i":
        u = _UNSIGNED.get(dt)
        if u is None:
            u = _UNSIGNED[dt] = np.dtype(dt.str.replace("i", "u"))  # same size and byte order
        a = a.view(u)
    return int(a.max())


def _shape_of(weights, key):
    """The shape of weights[key], without reading it from a WeightsFile."""
    if isinstance(weights, WeightsFile):
        return weights.shape(key)
    return np.shape(weights[key])


def _config_int(config, key, default=None):
    v = config.get(key, default)
    if v is None:
        raise ValueError("config has no %r" % key)
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
        raise ValueError("config[%r] must be a positive int, got %r" % (key, v))
    return int(v)


class BertModel:
    """A Hugging Face BERT encoder (BERT, MiniLM, ...) returning ``last_hidden_state``.

    Parameters
    ----------
    config : dict
        The model's ``config.json`` content: ``hidden_size``, ``num_attention_heads``,
        ``intermediate_size``, ``num_hidden_layers``, ``hidden_act`` ("gelu" = exact erf GELU;
        "gelu_new" / "gelu_pytorch_tanh" / "gelu_fast" = tanh approximation; "relu"),
        ``layer_norm_eps`` (default 1e-12), ``max_position_embeddings``, ``type_vocab_size``.
        ``position_embedding_type``, if given, must be "absolute".
    weights : Mapping[str, ndarray]
        Hugging Face names (``embeddings.word_embeddings.weight``, ...,
        ``encoder.layer.N.attention.self.query.weight``, ...), optionally prefixed with
        ``bert.``; ``pooler.*`` and ``cls.*`` are ignored.  Converted to float32; the model
        keeps copies, except from a :class:`normcy.hf.WeightsFile` (whose arrays are read
        fresh for the caller), which is read a layer at a time.
    num_threads : int, optional
        Threads for every kernel of this model, the matrix products included (default:
        normcy's setting, see :func:`normcy.get_num_threads`; small work runs serially).
    """

    def __init__(self, config, weights, num_threads=None):
        if not isinstance(config, Mapping):
            raise TypeError("config must be a dict (config.json), got %s" % type(config).__name__)
        if not isinstance(weights, Mapping):
            raise TypeError("weights must be a mapping of names to arrays, got %s"
                            % type(weights).__name__)
        self.layers = []
        self.num_threads = num_threads
        num_threads = self.num_threads
        self.config = dict(config)
        H = self.hidden_size = _config_int(config, "hidden_size")
        nh = self.num_attention_heads = _config_int(config, "num_attention_heads")
        ff = self.intermediate_size = _config_int(config, "intermediate_size")
        nl = self.num_hidden_layers = _config_int(config, "num_hidden_layers")
        self.max_position_embeddings = _config_int(config, "max_position_embeddings")
        self.type_vocab_size = _config_int(config, "type_vocab_size", 2)
        if H % nh:
            raise ValueError("hidden_size (%d) must be divisible by num_attention_heads (%d)"
                             % (H, nh))
        if config.get("is_decoder") or config.get("add_cross_attention"):
            raise ValueError("decoder / cross-attention BERT configs are not supported "
                             "(is_decoder / add_cross_attention)")
        mt = config.get("model_type", "bert")
        if mt != "bert":
            raise ValueError("config model_type %r is not BERT (normcy runs 'bert': other "
                             "types share its tensor names but not its positions or layers)"
                             % (mt,))
        act = config.get("hidden_act", "gelu")
        # (a list or dict from config.json is unhashable: not looked up in _ACT)
        if not isinstance(act, str) or act not in _ACT:
            raise ValueError("unsupported hidden_act %r; supported: %s" % (act, sorted(_ACT)))
        pet = config.get("position_embedding_type", "absolute")
        if pet != "absolute":
            raise ValueError("only position_embedding_type='absolute' is supported, got %r"
                             % (pet,))
        eps = as_float(config.get("layer_norm_eps", 1e-12), "config['layer_norm_eps']",
                       minimum=0.0)
        self.layer_norm_eps = eps

        # name -> the key in `weights`; the arrays are fetched when needed (a WeightsFile
        # reads them then)
        w = self._strip(weights)
        own = isinstance(weights, WeightsFile)     # fresh arrays: no copies needed
        if "embeddings.word_embeddings.weight" not in w:
            raise ValueError("weights have no embeddings.word_embeddings.weight")
        ws = tuple(_shape_of(weights, w["embeddings.word_embeddings.weight"]))
        if len(ws) != 2 or ws[0] < 1 or ws[1] != H:
            raise ValueError("embeddings.word_embeddings.weight must have shape (vocab_size >= "
                             "1, hidden_size=%d), got %s" % (H, ws))
        self.vocab_size = int(ws[0])
        # the layers the weights hold, before anything is sized by the config's layer count
        # (a hostile num_hidden_layers must not allocate per claimed layer)
        have = {int(m.group(1)) for m in map(_LAYER_RE.match, w) if m}
        if nl > len(have) or any(i not in have for i in range(nl)):
            lack = [i for i in range(min(nl, len(have) + 1)) if i not in have]
            raise ValueError("config num_hidden_layers=%d but the weights have no encoder layer "
                             "%d (encoder.layer.%d.*)" % (nl, lack[0], lack[0]))
        shapes = {
            "embeddings.word_embeddings.weight": (self.vocab_size, H),
            "embeddings.position_embeddings.weight": (self.max_position_embeddings, H),
            "embeddings.token_type_embeddings.weight": (self.type_vocab_size, H),
            "embeddings.LayerNorm.weight": (H,),
            "embeddings.LayerNorm.bias": (H,),
        }
        per_layer = {
            "attention.self.query.weight": (H, H), "attention.self.query.bias": (H,),
            "attention.self.key.weight": (H, H), "attention.self.key.bias": (H,),
            "attention.self.value.weight": (H, H), "attention.self.value.bias": (H,),
            "attention.output.dense.weight": (H, H), "attention.output.dense.bias": (H,),
            "attention.output.LayerNorm.weight": (H,), "attention.output.LayerNorm.bias": (H,),
            "intermediate.dense.weight": (ff, H), "intermediate.dense.bias": (ff,),
            "output.dense.weight": (H, ff), "output.dense.bias": (H,),
            "output.LayerNorm.weight": (H,), "output.LayerNorm.bias": (H,),
        }
        for i in range(nl):
            for k, s in per_layer.items():
                shapes["encoder.layer.%d.%s" % (i, k)] = s
        missing = [k for k in shapes if k not in w]
        if missing:
            raise ValueError("weights are missing %d entries for this config, e.g. %s"
                             % (len(missing), missing[:5]))
        extra_layers = sorted(i for i in have if i >= nl)
        if extra_layers:
            raise ValueError("weights have encoder layers %s but config num_hidden_layers=%d"
                             % (extra_layers, nl))

        def fetch(k, copy):
            return as_weight(weights[w[k]], k, shapes[k], copy=copy and not own)

        # the embeddings are copied (the model keeps them); each layer's entries are fetched
        # and checked for that layer only: it copies what it keeps and packs its matrices,
        # so a copy here would only raise the load's peak memory
        emb = [fetch(k, True) for k in shapes if k.startswith("embeddings.")]
        self._word, self._pos, self._type = emb[:3]
        self._ln = (emb[3], emb[4])
        for i in range(nl):
            p = {k: fetch(k, False) for k in shapes if k.startswith("encoder.layer.%d." % i)}
            g = lambda k: p["encoder.layer.%d.%s" % (i, k)]  # noqa: E731
            sd = {
                "self_attn.in_proj_weight": np.concatenate(
                    [g("attention.self.query.weight"), g("attention.self.key.weight"),
                     g("attention.self.value.weight")]),
                "self_attn.in_proj_bias": np.concatenate(
                    [g("attention.self.query.bias"), g("attention.self.key.bias"),
                     g("attention.self.value.bias")]),
                "self_attn.out_proj.weight": g("attention.output.dense.weight"),
                "self_attn.out_proj.bias": g("attention.output.dense.bias"),
                "norm1.weight": g("attention.output.LayerNorm.weight"),
                "norm1.bias": g("attention.output.LayerNorm.bias"),
                "linear1.weight": g("intermediate.dense.weight"),
                "linear1.bias": g("intermediate.dense.bias"),
                "linear2.weight": g("output.dense.weight"),
                "linear2.bias": g("output.dense.bias"),
                "norm2.weight": g("output.LayerNorm.weight"),
                "norm2.bias": g("output.LayerNorm.bias"),
            }
            layer = TransformerEncoderLayer.from_torch_state_dict(
                sd, nh, activation=_ACT[act], norm_first=False, layer_norm_eps=eps)
            layer.num_threads = num_threads
            self.layers.append(layer)
        self._wsp = WorkspacePool()

    @staticmethod
    def _strip(weights):
        """{BERT name: its key in weights} (a ``bert.`` prefix dropped; heads ignored)."""
        out = {}
        for k in weights:
            if not isinstance(k, str):
                continue
            name = k[5:] if k.startswith("bert.") else k
            if name.startswith(_IGNORED_PREFIXES):
                continue
            if name in out:
                raise ValueError("weights hold both %r and %r" % (out[name], k))
            out[name] = k
        return out

    @classmethod
    def from_pretrained(cls, path, num_threads=None):
        """Load ``config.json`` and ``model.safetensors`` (or a sharded checkpoint) from a
        Hugging Face model directory, checked by :func:`normcy.hf.check_bert_config`.

        The weights are read a layer at a time through :class:`normcy.hf.WeightsFile`
        (its headers checked when it is made); no torch.
        """
        path = hf.check_dir(path)
        config = hf.load_config(path)
        hf.check_bert_config(config, os.path.join(path, "config.json"))
        # read a layer at a time as the model is built (never the whole checkpoint at once)
        model = cls(config, hf.open_weights(path), num_threads=num_threads)
        release_free_heap()     # the load's temporaries
        return model

    # ------------------------------------------------------------------ inputs
    def _int_input(self, a, name, shape=None):
        refuse_masked(a, name)
        a = base_array(a)       # a subclass is used as its buffer (no subclass method runs)
        if not isinstance(a, np.ndarray):
            try:
                a = np.asarray(a)
            except Exception:
                raise TypeError("%s must be an integer array" % name) from None
        if a.dtype == np.bool_ and name == "attention_mask":
            a = a.astype(np.int64)
        if a.dtype.kind not in "iu":
            raise TypeError("%s must be an integer array of shape (batch, seq), got dtype %s"
                            % (name, a.dtype))
        if shape is None:
            if a.ndim != 2:
                raise ValueError("%s must have shape (batch, seq), got %s" % (name, a.shape))
        elif a.shape != shape:
            raise ValueError("%s must have shape %s like input_ids, got %s"
                             % (name, shape, a.shape))
        return a

    @property
    def num_threads(self):
        """Threads for every kernel of the model (None: normcy's default); setting it
        reaches every layer."""
        return self._num_threads

    @num_threads.setter
    def num_threads(self, num_threads):
        num_threads = check_num_threads(num_threads)
        self._num_threads = num_threads
        for layer in self.layers:
            layer.num_threads = num_threads

    def __call__(self, input_ids, attention_mask=None, token_type_ids=None):
        """Encode a batch.

        Parameters
        ----------
        input_ids : ndarray of int, shape (batch, seq)
        attention_mask : ndarray of int or bool, shape (batch, seq), optional
            1 (True) for real tokens, 0 for padding (default: all real).  Any pattern is
            allowed; position ids are the column indices, as in Hugging Face.
        token_type_ids : ndarray of int, shape (batch, seq), optional
            Segment ids (default 0).

        Returns
        -------
        ndarray of float32, shape (batch, seq, hidden_size)
            ``last_hidden_state``; zero at padded positions.
        """
        ids = self._int_input(input_ids, "input_ids")
        B, S = ids.shape
        if S > self.max_position_embeddings:
            raise ValueError("sequence length %d exceeds max_position_embeddings=%d; truncate "
                             "the input" % (S, self.max_position_embeddings))
        if attention_mask is None:
            mask = None
        else:
            mask = self._int_input(attention_mask, "attention_mask", (B, S)) != 0
        if token_type_ids is None:
            types = None
        else:
            types = self._int_input(token_type_ids, "token_type_ids", (B, S))
        H = self.hidden_size
        if B == 0 or S == 0:
            return np.zeros((B, S, H), dtype=_F32)

        # ---- pack the real tokens, sequences ordered by length (stable)
        # (uint64 values past the int64 range would wrap in the int64 gather below: checked
        # here as unsigned, like padded batches, so the error shows the value given)
        wide = any(a is not None and a.dtype.kind == "u" and a.dtype.itemsize == 8
                   for a in (ids, types))
        if (mask is not None and not mask.all()) or wide:
            # padded: the embedding kernel sees the real tokens only; every position is
            # checked here, as an embedding lookup over the whole batch would
            if _unsigned_max(ids) >= self.vocab_size:
                raise ValueError("input_ids must lie in [0, %d), got values in [%d, %d]"
                                 % (self.vocab_size, ids.min(), ids.max()))
            if types is not None and _unsigned_max(types) >= self.type_vocab_size:
                raise ValueError("token_type_ids must lie in [0, %d), got values in [%d, %d]"
                                 % (self.type_vocab_size, types.min(), types.max()))
        # no padding (dense): row r of the packed tokens is (r // S, r % S); the gathers
        # below use ids/types as they are and positions 0..S-1 repeated (no index arrays)
        b_idx, col, plan = packed_plan(np.ones((B, S), bool) if mask is None else mask)
        dense = b_idx is None
        T = B * S if dense else b_idx.shape[0]
        # dense: every row is written by the layers; else the padded positions stay zero
        out = np.empty((B, S, H), dtype=_F32) if dense else np.zeros((B, S, H), dtype=_F32)
        if T == 0:
            return out

        ws = self._wsp.acquire()
        try:
            return self._forward_tokens(ids, types, out, ws, b_idx, col, plan, dense, T, S, H)
        finally:
            self._wsp.release(ws)

    def _forward_tokens(self, ids, types, out, ws, b_idx, col, plan, dense, T, S, H):
        """Embeddings + layers of the T real tokens into `out` (B, S, H), on workspace ws."""
        B = out.shape[0]
        # s = (word + type) + position, as Hugging Face sums them, then the LayerNorm: one
        # compiled pass (which range-checks the indices)
        tok = np.ascontiguousarray(ids.reshape(-1) if dense else ids[b_idx, col], dtype=np.int64)
        tt = None if types is None else np.ascontiguousarray(
            types.reshape(-1) if dense else types[b_idx, col], dtype=np.int64)
        cur = ws.get("bert_io1", (T, H))
        embed_layer_norm(tok, self._word, self._pos, self._type, self._ln[0], self._ln[1],
                         self.layer_norm_eps, cur,
                         positions=None if dense else np.ascontiguousarray(col, dtype=np.int64),
                         period=S, type_ids=tt, num_threads=self.num_threads)

        final = out.reshape(B * S, H) if dense else ws.get("bert_last", (T, H))
        cur = forward_layers(self.layers, cur, plan, ws, final, io="bert_io")
        if not dense:
            out[b_idx, col] = cur
        return out

    def clear_workspace(self):
        """Drop the cached intermediate buffers (those of a call running now in another
        thread when it ends)."""
        self._wsp.clear()

    def __repr__(self):
        return ("BertModel(hidden_size=%d, layers=%d, heads=%d, intermediate=%d, act=%r)"
                % (self.hidden_size, self.num_hidden_layers, self.num_attention_heads,
                   self.intermediate_size, self.config.get("hidden_act", "gelu")))
