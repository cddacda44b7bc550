"""What every interpreter op shares: blobs are float64 numpy arrays shaped as ncnn shapes them, (w,),
(h, w), (c, h, w), (c, d, h, w); the error for what the interpreter does not implement."""

from __future__ import annotations

import numpy as np
import torch

from ..errors import BackendError
from ..ncnn_param import Layer

FLT_MAX = float(np.finfo(np.float32).max)
DIM_NAMES = {1: "w", 2: "hw", 3: "chw", 4: "cdhw"}


class UnsupportedLayerError(BackendError):
    """The interpreter has no implementation for a layer type or for one of its settings."""


def tensor(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float64))


def need_dims(layer: Layer, x: np.ndarray, dims: tuple[int, ...]) -> None:
    if x.ndim not in dims:
        raise UnsupportedLayerError(
            f"layer {layer.name} ({layer.type}) got a {x.ndim}-d blob; the interpreter implements it for "
            f"{' or '.join(str(d) for d in dims)}-d blobs only"
        )


def axis_of(layer: Layer, key: int, ndim: int, default: int = 0) -> int:
    axis = int(layer.get(key, default))
    axis = axis + ndim if axis < 0 else axis
    if not 0 <= axis < ndim:
        raise UnsupportedLayerError(f"layer {layer.name} ({layer.type}): axis {axis} for a {ndim}-d blob")
    return axis


def named_dims(x: np.ndarray) -> dict[str, int]:
    dims = {"w": 1, "h": 1, "d": 1, "c": 1}
    dims.update(zip(DIM_NAMES[x.ndim], x.shape, strict=True))
    return dims
