"""normcy: fused normalization kernels and a PyTorch-free Transformer encoder for CPU inference.

Kernels (all float32, normalization over the last axis, GIL released, OpenMP over rows):

- :func:`layer_norm`, :func:`add_layer_norm` (fused residual add + LayerNorm)
- :func:`rms_norm`, :func:`add_rms_norm`
- :func:`batch_norm` (inference mode), :func:`fold_batch_norm`,
  :func:`fold_batch_norm_into_linear`
- Transformer building blocks: :func:`softmax` (masked, scaled, in place), :func:`gelu`
  (exact erf or tanh), :func:`relu`, :func:`bias_activation`, :func:`bias_add`, and
  :class:`PackedLinear` (packed-weight GEMM with fused bias / activation / residual)

Thread control: :func:`get_num_threads`, :func:`set_num_threads`; build report:
:func:`show_config`.
"""
import os as _os


def _read_build_info():
    try:
        from normcy import _build_info as bi
        return bi
    except ImportError:      # the uncompiled source folder: the error comes below
        return None


def _tune_libgomp_wait():
    """Bound how long idle OpenMP threads spin (GNU libgomp reads this when it loads).

    By default libgomp workers spin for ~100 us or more after every parallel region.
    normcy's kernels alternate with NumPy's BLAS, whose own threads then find a core
    taken by a spinning OpenMP thread: an encoder layer ran 10-25x slower that way.  A
    short spin (GOMP_SPINCOUNT=1000, a few microseconds) keeps back-to-back kernel calls
    cheap and gives the cores back to BLAS quickly.  Set GOMP_SPINCOUNT or
    OMP_WAIT_POLICY yourself to override; it has no effect if libgomp was already loaded.
    """
    if (_os.environ.get("GOMP_SPINCOUNT") == "1000" and "OMP_WAIT_POLICY" not in _os.environ
            and _os.environ.get("NORMCY_SET_GOMP_SPINCOUNT") == "1"):
        # inherited from a parent process in which normcy set it
        return "GOMP_SPINCOUNT=1000 (set by normcy in a parent process)"
    bi = _read_build_info()
    if bi is not None and not bi.openmp:
        return "serial build (no OpenMP): not set"
    if "GOMP_SPINCOUNT" in _os.environ or "OMP_WAIT_POLICY" in _os.environ:
        return "user setting (GOMP_SPINCOUNT=%s, OMP_WAIT_POLICY=%s)" % (
            _os.environ.get("GOMP_SPINCOUNT", "unset"), _os.environ.get("OMP_WAIT_POLICY", "unset"))
    try:
        with open("/proc/self/maps") as f:
            if "libgomp.so" in f.read():
                return "libgomp was loaded before normcy: its default spin applies"
    except OSError:
        pass
    _os.environ["GOMP_SPINCOUNT"] = "1000"
    _os.environ["NORMCY_SET_GOMP_SPINCOUNT"] = "1"    # so that child processes can tell
    return "GOMP_SPINCOUNT=1000 (set by normcy at import)"


_omp_wait_note = _tune_libgomp_wait()

from normcy._version import __version__
try:
    from normcy._parallel import get_num_threads, set_num_threads, fork_serial
except ModuleNotFoundError as _exc:  # pragma: no cover - exercised in a subprocess test
    if _exc.name != "normcy._parallel":
        raise
    raise ImportError(
        "normcy's compiled extensions are missing in %s: this is the uncompiled source "
        "folder. Install normcy (`pip install .` in the checkout; a C compiler with OpenMP "
        "is needed) and run Python from outside the checkout, or build in place with "
        "`python setup.py build_ext --inplace`." % _os.path.dirname(_os.path.abspath(__file__))
    ) from None
from normcy._norms import (
    layer_norm,
    add_layer_norm,
    rms_norm,
    add_rms_norm,
    batch_norm,
    fold_batch_norm,
)
from normcy._ops import softmax, gelu, relu, bias_activation, bias_add
from normcy._bn_fold import fold_batch_norm_into_linear
from normcy._gemm import PackedLinear
from normcy._config import show_config


def _warn_if_serial_by_accident():
    bi = _read_build_info()
    if bi is not None and not bi.openmp and not getattr(bi, "openmp_disabled", False):
        import warnings
        from normcy._validate import user_stacklevel
        warnings.warn("normcy was built without OpenMP (%s): every kernel runs on one core. "
                      "Rebuild with an OpenMP-capable compiler (gcc, or clang with libomp), "
                      "or build with NORMCY_DISABLE_OPENMP=1 to choose serial kernels on "
                      "purpose." % bi.openmp_detail, RuntimeWarning, stacklevel=user_stacklevel())


_warn_if_serial_by_accident()

__all__ = [
    "__version__",
    "layer_norm",
    "add_layer_norm",
    "rms_norm",
    "add_rms_norm",
    "batch_norm",
    "fold_batch_norm",
    "fold_batch_norm_into_linear",
    "PackedLinear",
    "softmax",
    "gelu",
    "relu",
    "bias_activation",
    "bias_add",
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


# the model and application layers' modules, imported on first attribute access too
# (`normcy.sentence.default_model_path()` after a bare `import normcy`)
_SUBMODULES = ("transformer", "bert", "sentence", "hf", "corpus", "cli", "integrations",
               "serve")


from typing import TYPE_CHECKING as _TYPE_CHECKING

if _TYPE_CHECKING:
    # what the lazy attributes below are, for type checkers (mypy, pyright)
    from normcy import bert, cli, corpus, hf, integrations, sentence, serve, transformer
    from normcy.bert import BertModel
    from normcy.sentence import SentenceEncoder
    from normcy.transformer import TransformerEncoder, TransformerEncoderLayer
else:
    def __getattr__(name):
        # The Transformer/model layer is imported on first use so that `import normcy`
        # stays cheap and does not need the optional model dependencies.
        import importlib

        if name in _SUBMODULES:
            return importlib.import_module("normcy." + name)
        mod = _LAZY.get(name)
        if mod is None:
            raise AttributeError("module 'normcy' has no attribute %r" % name)
        return getattr(importlib.import_module(mod), name)


def __dir__():
    return sorted(set(globals()) | set(_LAZY) | set(_SUBMODULES))
