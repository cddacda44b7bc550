"""The float64 reference interpreter for ncnn graphs (.param + .bin): the op table and the executor."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from ..errors import BackendError, SpecError
from ..ncnn_param import BinArray, Layer, NcnnGraph, NcnnModel, read_model, read_param
from .blobs import UnsupportedLayerError
from .ops_math import OPS as MATH_OPS
from .ops_nn import OPS as NN_OPS
from .ops_shape import OPS as SHAPE_OPS

OPS: dict[str, Callable] = {**NN_OPS, **SHAPE_OPS, **MATH_OPS}


def supported_types() -> list[str]:
    """The ncnn layer types the interpreter implements (besides Input)."""
    return sorted(OPS)


def _check_supported(layer: Layer) -> None:
    if layer.type != "Input" and layer.type not in OPS:
        raise UnsupportedLayerError(
            f"layer {layer.name} has type {layer.type}, which the reference interpreter does not implement "
            f"(it implements: {', '.join(supported_types())})"
        )


def _read_weights(model: NcnnModel) -> list[dict[str, np.ndarray]]:
    """Every layer's weights by name as float64, in layer order."""
    if model.layout.stopped:
        raise UnsupportedLayerError(f"{model.bin}: {model.layout.stopped}; the interpreter cannot read it")
    weights = []
    for layer, arrays in zip(model.graph.layers, model.layout.arrays, strict=True):
        for array in arrays:
            if array.dtype == "int8" and not layer.get(8, 0):
                raise UnsupportedLayerError(
                    f"{model.bin}: {array.name} of layer {layer.name} ({layer.type}) is stored as int8; the "
                    "interpreter reads int8 weights of int8 layers (8=int8_scale_term) only"
                )
        weights.append({array.name: model.values(array).astype(np.float64) for array in arrays})
    return weights


class NcnnInterpreter:
    """Runs an ncnn graph in float64, layer by layer, following ncnn's operator semantics."""

    def __init__(self, param_path: Path | str, bin_path: Path | str):
        self.param_path, self.bin_path = Path(param_path), Path(bin_path)
        self.graph: NcnnGraph = read_param(self.param_path)
        for layer in self.graph.layers:
            _check_supported(layer)
        model = read_model(self.param_path, self.bin_path, self.graph)
        self.arrays = model.layout.arrays  # where each layer's weights lie in the .bin
        self.weights = _read_weights(model)
        self._producer = {top: layer for layer in self.graph.layers for top in layer.tops}

    def layer_of(self, blob: str) -> Layer:
        """The layer that produces a blob."""
        try:
            return self._producer[blob]
        except KeyError:
            raise SpecError(f"{self.param_path}: no layer produces a blob named {blob!r}") from None

    def weight_record(self, layer_name: str, weight: str = "weight") -> BinArray:
        """Where a named layer's weight array lies in the .bin (the layer name must be unique)."""
        indices = [i for i, layer in enumerate(self.graph.layers) if layer.name == layer_name]
        if len(indices) != 1:
            found = "no layer" if not indices else f"{len(indices)} layers"
            raise SpecError(f"{self.param_path}: {found} named {layer_name!r}; name a unique layer")
        for array in self.arrays[indices[0]]:
            if array.name == weight:
                return array
        raise SpecError(f"layer {layer_name!r} has no {weight!r} array in {self.bin_path}")

    def run_layer(self, layer: Layer, inputs: list[np.ndarray]) -> list[np.ndarray]:
        """One layer of this graph on given input blobs (e.g. another backend's), float64 outputs.

        Comparing its outputs with that backend's isolates each layer's own error from the error
        it inherits.
        """
        index = next((i for i, known in enumerate(self.graph.layers) if known is layer), None)
        if index is None or layer.type == "Input":
            raise SpecError(f"layer {layer.name} is not a computing layer of {self.param_path}")
        arrays = [np.asarray(x, dtype=np.float64) for x in inputs]
        return [
            np.asarray(out, dtype=np.float64) for out in OPS[layer.type](layer, arrays, self.weights[index])
        ]

    def run(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Every blob of the graph in graph order, as float64 arrays shaped as ncnn shapes them.

        Inputs with 4 or 5 axes and a leading axis of 1 lose that batch axis, as ncnn drops it.
        """
        blobs: dict[str, np.ndarray] = {}
        for layer, weights in zip(self.graph.layers, self.weights, strict=True):
            if layer.type == "Input":
                for top in layer.tops:
                    if top not in feed:
                        raise SpecError(
                            f"no input named {top!r} in the feed (the graph's inputs are "
                            f"{', '.join(self.graph.input_names)})"
                        )
                    arr = np.asarray(feed[top], dtype=np.float64)
                    if arr.ndim in (4, 5) and arr.shape[0] == 1:
                        arr = arr[0]
                    blobs[top] = arr
                continue
            try:
                inputs = [blobs[b] for b in layer.bottoms]
            except KeyError as exc:
                raise SpecError(
                    f"layer {layer.name} reads blob {exc.args[0]!r}, which no earlier layer wrote"
                ) from None
            outs = OPS[layer.type](layer, inputs, weights)
            if len(outs) != len(layer.tops):
                raise BackendError(
                    f"layer {layer.name} ({layer.type}) gave {len(outs)} outputs, expected {len(layer.tops)}"
                )
            for top, out in zip(layer.tops, outs, strict=True):
                blobs[top] = np.asarray(out, dtype=np.float64)
        return blobs
