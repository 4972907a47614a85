"""normcy: fused normalization kernels and a PyTorch-free Transformer encoder for CPU inference.

Kernels (all float32, normalization over the last axis, GIL released, OpenMP over rows):

- :func:`layer_norm`, :func:`add_layer_norm` (fused residual add + LayerNorm)
- :func:`rms_norm`, :func:`add_rms_norm`
- :func:`batch_norm` (inference mode), :func:`fold_batch_norm`,
  :func:`fold_batch_norm_into_linear`

Thread control: :func:`get_num_threads`, :func:`set_num_threads`; build report:
:func:`show_config`.
"""
from normcy._version import __version__
from normcy._parallel import get_num_threads, set_num_threads, fork_serial
from normcy._norms import (
    layer_norm,
    add_layer_norm,
    rms_norm,
    add_rms_norm,
    batch_norm,
    fold_batch_norm,
)
from normcy._bn_fold import fold_batch_norm_into_linear
from normcy._config import show_config

__all__ = [
    "__version__",
    "layer_norm",
    "add_layer_norm",
    "rms_norm",
    "add_rms_norm",
    "batch_norm",
    "fold_batch_norm",
    "fold_batch_norm_into_linear",
    "get_num_threads",
    "set_num_threads",
    "fork_serial",
    "show_config",
    "TransformerEncoderLayer",
    "TransformerEncoder",
    "BertModel",
    "SentenceEncoder",
]

_LAZY = {
    "TransformerEncoderLayer": "normcy.transformer",
    "TransformerEncoder": "normcy.transformer",
    "BertModel": "normcy.bert",
    "SentenceEncoder": "normcy.sentence",
}


def __getattr__(name):
    # The Transformer/model layer is imported on first use so that `import normcy`
    # stays cheap and does not need the optional model dependencies.
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError("module 'normcy' has no attribute %r" % name)
    import importlib

    return getattr(importlib.import_module(mod), name)


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
