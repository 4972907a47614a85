"""Read Hugging Face model directories without PyTorch.

A Hugging Face checkpoint directory holds ``config.json``, the weights in
``model.safetensors`` (or sharded ``model-0000N-of-0000M.safetensors`` files listed in
``model.safetensors.index.json``) and, for text models, ``tokenizer.json``. This module reads
the safetensors files themselves (a JSON header checked as the :mod:`safetensors` library
checks it, then each tensor's raw little-endian bytes read into its own array) and
``tokenizer.json`` with the :mod:`tokenizers` package (the optional ``model`` extra:
``pip install ".[model]"`` in the checkout); nothing here imports torch or transformers.

Functions
---------
load_config
    Parse ``config.json`` into a dict.
load_weights
    Read the safetensors weights as C-contiguous float32 NumPy arrays.
open_weights
    The same weights as a read-only mapping that reads each tensor when it is accessed
    (what the loaders use: a model is built without the whole checkpoint in memory).
load_tokenizer
    Load ``tokenizer.json`` as a :class:`tokenizers.Tokenizer`.
load_bert
    Build a :class:`normcy.BertModel` from a BERT checkpoint directory.
"""
from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Mapping as _MappingABC
from typing import Any, Dict, Mapping, Optional, Union

import numpy as np

__all__ = [
    "ModelFormatError",
    "SUPPORTED_MODEL_TYPES",
    "load_config",
    "load_weights",
    "open_weights",
    "WeightsFile",
    "load_safetensors",
    "load_tokenizer",
    "check_bert_config",
    "load_bert",
    "check_dir",
    "read_json",
]

PathLike = Union[str, "os.PathLike[str]"]

#: ``model_type`` values of ``config.json`` that :func:`load_bert` accepts. These all use the
#: original BERT layout (absolute learned positions starting at 0, post-LN layers, the
#: ``embeddings.*`` / ``encoder.layer.N.*`` weight names).
SUPPORTED_MODEL_TYPES = ("bert",)

# safetensors dtype tags that are converted to float32.
_FLOAT_DTYPES = {"F16": np.float16, "F32": np.float32, "F64": np.float64}
# Integer tensors are kept as they are (e.g. BERT's ``embeddings.position_ids`` buffer).
_INT_DTYPES = {
    "I8": np.int8, "U8": np.uint8, "I16": np.int16, "U16": np.uint16,
    "I32": np.int32, "U32": np.uint32, "I64": np.int64, "U64": np.uint64,
}


class ModelFormatError(ValueError):
    """A model directory is missing files or holds something normcy cannot run."""


def _require_module(name: str, purpose: str):
    import importlib

    try:
        return importlib.import_module(name)
    except ImportError as exc:  # pragma: no cover - exercised only without the extra
        pkg = name.split(".")[0]
        raise ImportError(
            "normcy needs the optional package %r to %s; install it with "
            "`pip install %s` (the whole [model] extra: `pip install \"safetensors>=0.4\" "
            "\"tokenizers>=0.15\"`)" % (pkg, purpose, pkg)
        ) from exc


def check_dir(path: PathLike, what: str = "model directory") -> str:
    """`path` as a string, after checking that it is an existing directory.

    Parameters
    ----------
    path : str or os.PathLike
    what : str
        How error messages name the directory.

    Returns
    -------
    str

    Raises
    ------
    FileNotFoundError, NotADirectoryError
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError("%s %r does not exist" % (what, path))
    if not os.path.isdir(path):
        raise NotADirectoryError("%s %r is not a directory" % (what, path))
    return path


def read_json(filename: str) -> Any:
    """Parse a model's JSON file (``config.json``, ``modules.json``, ...).

    Parameters
    ----------
    filename : str

    Returns
    -------
    object
        The parsed JSON value.

    Raises
    ------
    ModelFormatError
        If the file is not valid JSON (UTF-8 text, nested less deeply than Python's
        recursion limit, integers of at most ``sys.get_int_max_str_digits()`` digits).
    """
    try:
        with open(filename, "r", encoding="utf-8") as f:
            return json.load(f)
    except (ValueError, RecursionError) as exc:
        # ValueError: JSONDecodeError, UnicodeDecodeError, an integer with too many digits
        raise ModelFormatError("%s is not valid JSON: %s" % (filename, exc)) from exc


def load_config(path: PathLike) -> Dict[str, Any]:
    """Read ``config.json`` from a Hugging Face model directory.

    Parameters
    ----------
    path : str or os.PathLike
        The model directory (or the ``config.json`` file itself).

    Returns
    -------
    dict
        The parsed configuration.

    Raises
    ------
    FileNotFoundError
        If the directory or its ``config.json`` is missing.
    ModelFormatError
        If the file is not a JSON object.
    """
    path = os.fspath(path)
    filename = path if os.path.isfile(path) else os.path.join(check_dir(path), "config.json")
    if not os.path.isfile(filename):
        raise FileNotFoundError(
            "no config.json in %r: expected a Hugging Face model directory" % (path,))
    cfg = read_json(filename)
    if not isinstance(cfg, dict):
        raise ModelFormatError("%s must hold a JSON object, got %s"
                               % (filename, type(cfg).__name__))
    return cfg


def _weight_files(path: str):
    """The safetensors files of a checkpoint directory, in load order."""
    single = os.path.join(path, "model.safetensors")
    if os.path.isfile(single):
        return [single]
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        idx = read_json(index)
        wm = idx.get("weight_map") if isinstance(idx, dict) else None
        if not isinstance(wm, dict) or not wm:
            raise ModelFormatError("%s has no 'weight_map'" % index)
        files = []
        for name in wm.values():
            # a shard is a file of this directory, named plainly (no paths out of it)
            if (not isinstance(name, str) or name in ("", ".", "..")
                    or os.path.basename(name) != name or "\\" in name):
                raise ModelFormatError("%s: shard names must be file names in the model "
                                       "directory, got %r" % (index, name))
            if name not in files:
                files.append(name)
        out = []
        for name in files:
            f = os.path.join(path, name)
            if not os.path.isfile(f):
                raise FileNotFoundError("shard %r listed in %s is missing" % (name, index))
            out.append(f)
        return out
    others = [n for n in ("pytorch_model.bin", "tf_model.h5", "flax_model.msgpack", "model.onnx")
              if os.path.isfile(os.path.join(path, n))]
    hint = ""
    if others:
        hint = (" (found %s; normcy reads only safetensors -- convert the checkpoint, e.g. "
                "with transformers' save_pretrained(..., safe_serialization=True))"
                % ", ".join(others))
    raise FileNotFoundError("no model.safetensors (or model.safetensors.index.json) in %r%s"
                            % (path, hint))


# the longest header read (safetensors' own limit is 100 MB)
_MAX_HEADER = 100_000_000

# the stored (little-endian) element type of each dtype tag normcy reads; BF16 is read as
# its 16 bits
_STORED = {"BF16": "<u2", "F16": "<f2", "F32": "<f4", "F64": "<f8", "I8": "<i1", "U8": "<u1",
           "I16": "<i2", "U16": "<u2", "I32": "<i4", "U32": "<u4", "I64": "<i8", "U64": "<u8"}
_ITEMSIZE = {tag: np.dtype(t).itemsize for tag, t in _STORED.items()}


class _DuplicateKey(ValueError):
    pass


def _unique_keys(pairs):
    d = {}
    for k, v in pairs:
        if k in d:
            raise _DuplicateKey("duplicate key %r" % k)
        d[k] = v
    return d


def _is_count(v):
    """A JSON non-negative integer (not a bool, a float or a string)."""
    return type(v) is int and v >= 0


def _safetensors_header(filename: str):
    """The tensors of one safetensors file, checked as the safetensors library checks them:
    {name: (dtype tag, shape, offset of its bytes in the file)}.

    The header is a JSON object of tensor entries (``dtype``, ``shape``, ``data_offsets``)
    and an optional ``__metadata__`` object of strings; the tensors' bytes must tile the
    data after the header exactly: no gaps, no overlaps, nothing after the last one.
    Sizes are Python integers (no overflow, however large the shape)."""
    size = os.path.getsize(filename)
    with open(filename, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ModelFormatError("%s is not a safetensors file (too short)" % filename)
        (n,) = struct.unpack("<Q", raw)
        if n > _MAX_HEADER:
            raise ModelFormatError("%s is not a safetensors file (bad header size)" % filename)
        text = f.read(n)
    if len(text) != n:
        raise ModelFormatError("%s is truncated: its header should be %d bytes, the file has %d"
                               % (filename, n, len(text)))
    try:
        header = json.loads(text.decode("utf-8"), object_pairs_hook=_unique_keys)
    except (ValueError, RecursionError) as exc:
        # JSONDecodeError, UnicodeDecodeError, _DuplicateKey, an integer with too many
        # digits; RecursionError: arrays or objects nested too deeply
        raise ModelFormatError("%s is not a safetensors file: %s" % (filename, exc)) from None
    if not isinstance(header, dict):
        raise ModelFormatError("%s is not a safetensors file: its header is a JSON %s, not an "
                               "object" % (filename, type(header).__name__))
    meta = header.pop("__metadata__", None)
    if meta is not None and not (isinstance(meta, dict)
                                 and all(isinstance(v, str) for v in meta.values())):
        raise ModelFormatError("%s: __metadata__ must be an object of strings" % filename)
    spans = []
    for k, info in header.items():
        if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
            raise ModelFormatError("tensor %r in %s has a malformed header entry (an object "
                                   "with dtype, shape and data_offsets expected)" % (k, filename))
        d, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if not isinstance(d, str) or d not in _ITEMSIZE:
            raise ModelFormatError(
                "tensor %r in %s has unsupported dtype %s (normcy reads F16, BF16, F32, F64 and "
                "integer tensors)" % (k, filename, d if isinstance(d, str) else repr(d)))
        if not (isinstance(shape, list) and all(map(_is_count, shape))
                and isinstance(offsets, list) and len(offsets) == 2
                and all(map(_is_count, offsets))):
            raise ModelFormatError("tensor %r in %s has a malformed header entry (shape and "
                                   "data_offsets must be lists of non-negative integers)"
                                   % (k, filename))
        b, e = offsets
        if e < b or e - b != math.prod(shape) * _ITEMSIZE[d]:
            raise ModelFormatError(
                "tensor %r in %s: data offsets %s do not hold a %s tensor of shape %s"
                % (k, filename, offsets, d, shape))
        # a shape NumPy cannot give an array (more axes than it allows, or an empty
        # tensor whose other axes multiply past its size limit) is refused here, not by
        # the reshape when the tensor is read; the tiling below bounds the size of the rest
        try:
            if b == e:
                np.empty(0, dtype=_STORED[d]).reshape(shape)
            else:
                np.empty([0] * len(shape), dtype=_STORED[d])
        except ValueError as exc:
            raise ModelFormatError("tensor %r in %s has shape %s, which a NumPy array cannot "
                                   "have (%s)" % (k, filename, shape, exc)) from None
        spans.append((b, e, k))
    spans.sort()
    data = size - (8 + n)
    pos = 0
    for b, e, k in spans:
        if b != pos:
            raise ModelFormatError(
                "tensor %r in %s starts at byte %d of the data, where %d was expected: the "
                "tensors must follow each other without gaps or overlaps" % (k, filename, b, pos))
        pos = e
    if pos != data:
        raise ModelFormatError("%s holds %d bytes of tensor data after its header, its header "
                               "describes %d (a truncated file, or bytes after the last tensor)"
                               % (filename, data, pos))
    return {k: (info["dtype"], tuple(info["shape"]), 8 + n + info["data_offsets"][0])
            for k, info in header.items()}


def load_safetensors(filename: PathLike) -> Dict[str, np.ndarray]:
    """Read one ``.safetensors`` file into NumPy arrays.

    Floating-point tensors (F16, BF16, F32, F64) come back as C-contiguous ``float32`` arrays;
    integer tensors (e.g. ``embeddings.position_ids``) keep their integer dtype.

    Parameters
    ----------
    filename : str or os.PathLike
        The ``.safetensors`` file.

    Returns
    -------
    dict of str to numpy.ndarray

    Raises
    ------
    FileNotFoundError
        If the file does not exist.
    ModelFormatError
        If the file is not a safetensors file or holds a tensor of an unsupported dtype (bool,
        float8, complex, ...).
    """
    filename = os.fspath(filename)
    if not os.path.isfile(filename):
        raise FileNotFoundError("weights file %r does not exist" % filename)
    return dict(WeightsFile([filename]))


class WeightsFile(_MappingABC):
    """The tensors of safetensors checkpoint files, read one at a time when accessed.

    A read-only mapping from tensor name to a new NumPy array, converted as
    :func:`load_safetensors` converts (F16, BF16, F32, F64 to C-contiguous float32; integer
    tensors keep their dtype, in native byte order).  Each access reads the tensor's bytes
    from its file (one ``readinto``, no memory map) into a fresh array that no one else
    holds, so that only the tensors a caller keeps stay in memory.  Build it with
    :func:`open_weights`.  The headers are read and checked when it is made, as the
    safetensors library checks them (a JSON object of entries with a supported dtype, a
    shape and data offsets; the tensors' bytes tile the data exactly, without gaps,
    overlaps or trailing bytes; no tensor in two files): a malformed file raises
    :class:`ModelFormatError` then, not at an access.  (The format is a JSON header and raw
    little-endian arrays; reading it directly gives BF16, which NumPy and
    ``safetensors.numpy`` lack, and reads a tensor without parsing the header again.)
    """

    def __init__(self, files):
        self._where = {}
        for filename in files:
            for k, (d, shape, offset) in _safetensors_header(filename).items():
                if k in self._where:
                    raise ModelFormatError("tensor %r appears in two files (%s, %s)"
                                           % (k, self._where[k][0], filename))
                self._where[k] = (filename, offset, d, shape)

    def __getitem__(self, name):
        filename, offset, d, shape = self._where[name]
        raw = np.empty(math.prod(shape), dtype=_STORED[d])
        got = 0
        if raw.nbytes:
            with open(filename, "rb") as f:
                f.seek(offset)
                got = f.readinto(raw.view(np.uint8))
        if got != raw.nbytes:
            raise ModelFormatError("%s ended inside tensor %r (the file changed after it was "
                                   "opened?)" % (filename, name))
        if d == "BF16":
            # bfloat16 is the top half of a float32: widening is exact
            a = (raw.astype(np.uint32) << 16).view(np.float32)
        elif d[0] == "F":
            a = raw.astype(np.float32, copy=False)
        else:
            a = raw.astype(raw.dtype.newbyteorder("="), copy=False)
        return a.reshape(shape)

    def shape(self, name):
        """The shape of tensor `name` (from the header; nothing is read)."""
        return self._where[name][3]

    def __iter__(self):
        return iter(self._where)

    def __len__(self):
        return len(self._where)


def open_weights(path: PathLike) -> WeightsFile:
    """The weights of a checkpoint directory (or one ``.safetensors`` file) as a
    :class:`WeightsFile`: a mapping that reads each tensor when it is accessed.

    Parameters
    ----------
    path : str or os.PathLike
        As for :func:`load_weights`.

    Returns
    -------
    WeightsFile

    Raises
    ------
    FileNotFoundError, ModelFormatError
        As for :func:`load_weights`, when it is made.
    """
    path = os.fspath(path)
    if os.path.isfile(path):
        return WeightsFile([path])
    if not os.path.exists(path):
        raise FileNotFoundError("weights file %r does not exist" % path)
    return WeightsFile(_weight_files(check_dir(path)))


def load_weights(path: PathLike) -> Dict[str, np.ndarray]:
    """Read all weights of a Hugging Face checkpoint directory.

    Parameters
    ----------
    path : str or os.PathLike
        A directory with ``model.safetensors`` (or a sharded checkpoint with
        ``model.safetensors.index.json``), or a ``.safetensors`` file.

    Returns
    -------
    dict of str to numpy.ndarray
        Weight name (as in the checkpoint, e.g. ``encoder.layer.0.attention.self.query.weight``)
        to a C-contiguous float32 array (integer buffers keep their dtype).

    Raises
    ------
    FileNotFoundError
        If there is no safetensors checkpoint (the message says when only a PyTorch ``.bin``
        or another format was found).
    ModelFormatError
        For unsupported dtypes or malformed files.
    """
    return dict(open_weights(path))


def load_tokenizer(path: PathLike):
    """Load ``tokenizer.json`` with the :mod:`tokenizers` package.

    The tokenizer is returned as stored, including any truncation/padding settings the file
    carries; callers such as :class:`normcy.SentenceEncoder` override them.

    Parameters
    ----------
    path : str or os.PathLike
        A model directory holding ``tokenizer.json``, or the file itself.

    Returns
    -------
    tokenizers.Tokenizer

    Raises
    ------
    FileNotFoundError
        If there is no ``tokenizer.json`` (slow-tokenizer files such as ``vocab.txt`` alone
        are not read).
    """
    path = os.fspath(path)
    filename = path if os.path.isfile(path) else os.path.join(check_dir(path), "tokenizer.json")
    if not os.path.isfile(filename):
        hint = ""
        if os.path.isfile(os.path.join(path, "vocab.txt")):
            hint = (" (found vocab.txt only; create tokenizer.json with transformers' "
                    "AutoTokenizer.from_pretrained(path).save_pretrained(path))")
        raise FileNotFoundError("no tokenizer.json in %r%s" % (path, hint))
    tokenizers = _require_module("tokenizers", "read tokenizer.json")
    try:
        return tokenizers.Tokenizer.from_file(filename)
    except Exception as exc:
        raise ModelFormatError("cannot load %s: %s" % (filename, exc)) from exc


def check_bert_config(config: Mapping[str, Any], where: str = "config.json") -> None:
    """Raise :class:`ModelFormatError` unless ``config`` describes a BERT model normcy can run.

    Parameters
    ----------
    config : mapping
        A parsed ``config.json``.
    where : str
        Used in error messages.
    """
    mt = config.get("model_type")
    if mt not in SUPPORTED_MODEL_TYPES:
        archs = config.get("architectures")
        raise ModelFormatError(
            "%s: unsupported model_type %r%s; normcy runs %s checkpoints"
            % (where, mt, " (architectures %r)" % (archs,) if archs else "",
               ", ".join(repr(t) for t in SUPPORTED_MODEL_TYPES)))
    pe = config.get("position_embedding_type", "absolute")
    if pe != "absolute":
        raise ModelFormatError("%s: position_embedding_type %r is not supported (only 'absolute')"
                               % (where, pe))
    if config.get("is_decoder") or config.get("add_cross_attention"):
        raise ModelFormatError("%s: decoder / cross-attention BERT is not supported" % where)
    missing = [k for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                           "intermediate_size") if k not in config]
    if missing:
        raise ModelFormatError("%s: missing required key(s) %s" % (where, ", ".join(missing)))


def load_bert(path: PathLike, num_threads: Optional[int] = None):
    """Build a :class:`normcy.BertModel` from a Hugging Face BERT checkpoint directory.

    Parameters
    ----------
    path : str or os.PathLike
        Directory with ``config.json`` and ``model.safetensors``.
    num_threads : int, optional
        Passed to :class:`normcy.BertModel`.

    Returns
    -------
    normcy.BertModel
    """
    from normcy.bert import BertModel

    return BertModel.from_pretrained(path, num_threads=num_threads)
