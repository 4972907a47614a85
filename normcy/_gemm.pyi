"""Type stubs for normcy._gemm (packed-weight GEMM and fused attention)."""
from typing import Literal, Optional, Tuple

import numpy as np
import numpy.typing as npt

_F32 = npt.NDArray[np.float32]
_Activation = Optional[Literal["identity", "none", "relu", "gelu", "gelu_tanh"]]

class PackedLinear:
    """``act(x @ weight.T + bias) (+ residual)`` with the weight packed once."""
    in_features: int
    out_features: int
    def __init__(self, weight: _F32, bias: Optional[_F32] = ...) -> None: ...
    @property
    def weight(self) -> _F32: ...
    @property
    def bias(self) -> Optional[_F32]: ...
    def __call__(self, x: _F32, *, activation: _Activation = ..., residual: Optional[_F32] = ...,
                 norm: Optional[Literal["layer_norm", "rms_norm"]] = ...,
                 norm_weight: Optional[npt.ArrayLike] = ...,
                 norm_bias: Optional[npt.ArrayLike] = ..., eps: float = ...,
                 sum_out: Optional[_F32] = ..., out: Optional[_F32] = ...,
                 num_threads: Optional[int] = ...) -> _F32: ...

def _attention(qkv: _F32, bq: _F32, ctx: _F32, nseq: int, L: int, nhead: int, *,
               mask: Optional[_F32] = ..., key_padding_mask: Optional[npt.NDArray[np.bool_]] = ...,
               is_causal: bool = ..., num_threads: Optional[int] = ...) -> None: ...
def _kernel_shape() -> Tuple[int, int]: ...
def _fma_peak(seconds: float = ...) -> float: ...
