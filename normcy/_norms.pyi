from typing import Any, Dict, Literal, Optional, Tuple

import numpy as np
from numpy.typing import ArrayLike, NDArray

F32 = NDArray[np.float32]

def layer_norm(x: F32, weight: Optional[ArrayLike] = ..., bias: Optional[ArrayLike] = ...,
               eps: float = ..., *, out: Optional[F32] = ...,
               convention: Literal["standard", "annotated"] = ...,
               num_threads: Optional[int] = ...) -> F32: ...
def add_layer_norm(x: F32, residual: F32, weight: Optional[ArrayLike] = ...,
                   bias: Optional[ArrayLike] = ..., eps: float = ..., *,
                   x_bias: Optional[ArrayLike] = ..., out: Optional[F32] = ...,
                   sum_out: Optional[F32] = ..., num_threads: Optional[int] = ...) -> F32: ...
def rms_norm(x: F32, weight: Optional[ArrayLike] = ..., eps: float = ..., *,
             out: Optional[F32] = ..., num_threads: Optional[int] = ...) -> F32: ...
def add_rms_norm(x: F32, residual: F32, weight: Optional[ArrayLike] = ..., eps: float = ..., *,
                 x_bias: Optional[ArrayLike] = ..., out: Optional[F32] = ...,
                 sum_out: Optional[F32] = ..., num_threads: Optional[int] = ...) -> F32: ...
def batch_norm(x: F32, running_mean: ArrayLike, running_var: ArrayLike,
               weight: Optional[ArrayLike] = ..., bias: Optional[ArrayLike] = ...,
               eps: float = ..., *, axis: int = ..., out: Optional[F32] = ...,
               num_threads: Optional[int] = ...) -> F32: ...
def fold_batch_norm(running_mean: ArrayLike, running_var: ArrayLike,
                    weight: Optional[ArrayLike] = ..., bias: Optional[ArrayLike] = ...,
                    eps: float = ...) -> Tuple[F32, F32]: ...
def kernel_isa() -> str: ...
def isa_info() -> Dict[str, Any]: ...
def have_runtime_dispatch() -> bool: ...
def embed_layer_norm(ids: NDArray[np.int64], word: F32, pos: F32, types: F32,
                     weight: Optional[ArrayLike], bias: Optional[ArrayLike], eps: float,
                     out: F32, *, positions: Optional[NDArray[np.int64]] = ...,
                     period: int = ..., type_ids: Optional[NDArray[np.int64]] = ...,
                     num_threads: Optional[int] = ...) -> F32: ...
