from typing import Literal, Optional, Tuple

import numpy as np
from numpy.typing import ArrayLike, NDArray

F32 = NDArray[np.float32]
_Activation = Literal["identity", "none", "relu", "gelu", "gelu_tanh"]

def softmax(x: F32, *, scale: Optional[float] = ..., mask: Optional[NDArray[np.floating]] = ...,
            key_padding_mask: Optional[NDArray[np.bool_]] = ..., is_causal: bool = ...,
            out: Optional[F32] = ..., num_threads: Optional[int] = ...) -> F32: ...
def bias_activation(x: F32, bias: Optional[ArrayLike] = ...,
                    activation: Optional[_Activation] = ..., *, residual: Optional[F32] = ...,
                    out: Optional[F32] = ..., num_threads: Optional[int] = ...) -> F32: ...
def bias_add(x: F32, bias: ArrayLike, *, out: Optional[F32] = ...,
             num_threads: Optional[int] = ...) -> F32: ...
def gelu(x: F32, *, approximate: Literal["none", "tanh"] = ..., out: Optional[F32] = ...,
         num_threads: Optional[int] = ...) -> F32: ...
def relu(x: F32, *, out: Optional[F32] = ..., num_threads: Optional[int] = ...) -> F32: ...
def _exp(x: F32, *, out: Optional[F32] = ...) -> F32: ...
def kernel_isa() -> str: ...
POOL_CLS: int
POOL_MAX: int
POOL_MEAN: int
POOL_MEAN_SQRT_LEN: int
POOL_WEIGHTED_MEAN: int
POOL_LAST: int
def pool_normalize(hidden: F32, lengths: NDArray[np.int64], modes: Tuple[int, ...],
                   normalize: int = ...) -> F32: ...
def l2_normalize_rows(x: F32, times: int = ...) -> F32: ...
