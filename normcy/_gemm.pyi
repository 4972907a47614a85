"""Type stubs for normcy._gemm (packed-weight GEMM and fused attention)."""
from typing import List, Literal, Optional, Tuple

import numpy as np
import numpy.typing as npt

_F32 = npt.NDArray[np.float32]
_Activation = Optional[Literal["identity", "none", "relu", "gelu", "gelu_tanh"]]

class PackedLinear:
    """``act(x @ weight.T + bias) (+ residual)`` with the weight packed once."""
    @property
    def in_features(self) -> int: ...
    @property
    def out_features(self) -> int: ...
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

def attention(qkv: _F32, bq: _F32, ctx: _F32, nseq: int, L: int, nhead: int, *,
              mask: Optional[_F32] = ..., key_padding_mask: Optional[npt.NDArray[np.bool_]] = ...,
              is_causal: bool = ..., num_threads: Optional[int] = ...) -> None: ...
class EncoderLayerKernel:
    def __init__(self, lin_qkv: PackedLinear, bq: _F32, lin_o: PackedLinear,
                 lin_1: PackedLinear, lin_2: PackedLinear,
                 norm1: Tuple[_F32, Optional[_F32]], norm2: Tuple[_F32, Optional[_F32]],
                 eps: float, norm: str, activation: Optional[str], norm_first: bool,
                 nhead: int) -> None: ...
    def run(self, x: _F32, qkv: _F32, ctx: _F32, mid: _F32, hid: _F32, out: _F32,
            groups: List[Tuple[int, int, int]], num_threads: Optional[int] = ...,
            xn: Optional[_F32] = ..., *, key_padding_mask: Optional[np.ndarray] = ...,
            mask: Optional[_F32] = ..., is_causal: bool = ...) -> _F32: ...
def run_layers(kernels: List[EncoderLayerKernel], x: _F32, outs: List[_F32], qkv: _F32,
               ctx: _F32, mid: _F32, hid: _F32, groups: List[Tuple[int, int, int]],
               num_threads: Optional[int] = ..., xn: Optional[_F32] = ..., *,
               key_padding_mask: Optional[np.ndarray] = ..., mask: Optional[_F32] = ...,
               is_causal: bool = ...) -> _F32: ...
def kernel_shape() -> Tuple[int, int]: ...
def kernel_blocking() -> Tuple[int, int]: ...
def fma_peak(seconds: float = ...) -> float: ...
