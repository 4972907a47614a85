from typing import Literal, Optional, Tuple

import numpy as np
from numpy.typing import ArrayLike, NDArray

_F32 = NDArray[np.float32]
_Activation = Literal["identity", "none", "relu", "gelu", "gelu_tanh"]

def softmax(x: _F32, *, scale: Optional[float] = ..., mask: Optional[NDArray[np.floating]] = ...,
            key_padding_mask: Optional[NDArray[np.bool_]] = ..., is_causal: bool = ...,
            out: Optional[_F32] = ..., num_threads: Optional[int] = ...) -> _F32: ...
def bias_activation(x: _F32, bias: Optional[ArrayLike] = ...,
                    activation: Optional[_Activation] = ..., *, residual: Optional[_F32] = ...,
                    out: Optional[_F32] = ..., num_threads: Optional[int] = ...) -> _F32: ...
def bias_add(x: _F32, bias: ArrayLike, *, out: Optional[_F32] = ...,
             num_threads: Optional[int] = ...) -> _F32: ...
def gelu(x: _F32, *, approximate: Literal["none", "tanh"] = ..., out: Optional[_F32] = ...,
         num_threads: Optional[int] = ...) -> _F32: ...
def relu(x: _F32, *, out: Optional[_F32] = ..., num_threads: Optional[int] = ...) -> _F32: ...
def _exp(x: _F32, *, out: Optional[_F32] = ...) -> _F32: ...
def kernel_isa() -> str: ...
POOL_CLS: int
POOL_MAX: int
POOL_MEAN: int
POOL_MEAN_SQRT_LEN: int
POOL_WEIGHTED_MEAN: int
POOL_LAST: int
def pool_normalize(hidden: _F32, lengths: NDArray[np.int64], modes: Tuple[int, ...],
                   normalize: int = ..., start: int = ...) -> _F32: ...
def l2_normalize_rows(x: _F32, times: int = ...) -> _F32: ...
