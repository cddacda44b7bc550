"""Elementwise ops: activations (also the ones convolutions fuse), binary/unary/eltwise, reductions,
softmax."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch.nn.functional as F

from ..ncnn_param import Layer
from .blobs import FLT_MAX, UnsupportedLayerError, axis_of, tensor


def _sigmoid(x):
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def activation(x: np.ndarray, kind: int, params: list, layer: Layer) -> np.ndarray:
    """ncnn's fused activations (activation_type 0..6 with activation_params)."""
    params = list(params) if isinstance(params, list) else [params]
    if kind == 0:
        return x
    if kind == 1:
        return np.maximum(x, 0.0)
    if kind == 2:
        return np.where(x > 0, x, x * params[0])
    if kind == 3:
        return np.clip(x, params[0], params[1])
    if kind == 4:
        return _sigmoid(x)
    if kind == 5:
        return x * np.tanh(np.logaddexp(0.0, x))
    if kind == 6:
        return x * np.clip(x * params[0] + params[1], 0.0, 1.0)
    raise UnsupportedLayerError(f"layer {layer.name} ({layer.type}): unknown activation_type {kind}")


def _align_rank(a: np.ndarray, b: np.ndarray, layer: Layer) -> np.ndarray:
    """Expand a lower-rank operand the way ncnn's BinaryOp does.

    A 1-d operand whose length matches b's outermost axis acts along that axis (per channel
    against (c, h, w)); otherwise it aligns with the innermost axis. ncnn gives shapes that are
    no numpy broadcast for higher-rank gaps (a (h, w) blob against (c, h, w)), so those are refused.
    """
    if a.ndim >= b.ndim:
        return a
    if a.ndim != 1:
        raise UnsupportedLayerError(
            f"layer {layer.name} (BinaryOp): broadcasting a {a.shape} blob against a {b.shape} blob "
            "is not implemented (only equal ranks and 1-d operands are)"
        )
    extra = b.ndim - 1
    if a.shape[0] == b.shape[0]:
        return a.reshape(a.shape + (1,) * extra)
    return a.reshape((1,) * extra + a.shape)


_BINARY: dict[int, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    0: np.add,
    1: np.subtract,
    2: np.multiply,
    3: np.divide,
    4: np.maximum,
    5: np.minimum,
    6: np.power,
    7: lambda a, b: b - a,
    8: lambda a, b: b / a,
    9: lambda a, b: np.power(b, a),
    10: np.arctan2,
    11: lambda a, b: np.arctan2(b, a),
}


def _binary_op(layer: Layer, inputs, w):
    op = int(layer.get(0, 0))
    if op not in _BINARY:
        raise UnsupportedLayerError(f"layer {layer.name} (BinaryOp): unknown op_type {op}")
    fn = _BINARY[op]
    a = inputs[0]
    if layer.get(1, 0):  # with_scalar
        return [fn(a, np.float64(np.float32(layer.get(2, 0.0))))]
    b = inputs[1]
    with np.errstate(divide="ignore", invalid="ignore"):
        if b.size == 1:
            return [fn(a, b.reshape(-1)[0] + np.zeros_like(a))]
        if a.size == 1:
            return [fn(a.reshape(-1)[0] + np.zeros_like(b), b)]
        a2, b2 = _align_rank(a, b, layer), _align_rank(b, a, layer)
        try:
            return [fn(a2, b2)]
        except ValueError:
            raise UnsupportedLayerError(
                f"layer {layer.name} (BinaryOp): shapes {a.shape} and {b.shape} do not broadcast"
            ) from None


def _unary_op(layer: Layer, inputs, w):
    x = inputs[0]
    ops: dict[int, Callable[[np.ndarray], np.ndarray]] = {
        0: np.abs,
        1: np.negative,
        2: np.floor,
        3: np.ceil,
        4: np.square,
        5: np.sqrt,
        6: lambda v: 1.0 / np.sqrt(v),
        7: np.exp,
        8: np.log,
        9: np.sin,
        10: np.cos,
        11: np.tan,
        12: np.arcsin,
        13: np.arccos,
        14: np.arctan,
        15: lambda v: 1.0 / v,
        16: np.tanh,
        17: np.log10,
        18: np.rint,
        19: np.trunc,
    }
    op = int(layer.get(0, 0))
    if op not in ops:
        raise UnsupportedLayerError(f"layer {layer.name} (UnaryOp): unknown op_type {op}")
    with np.errstate(divide="ignore", invalid="ignore"):
        return [ops[op](x)]


def _eltwise(layer: Layer, inputs, w):
    op = int(layer.get(0, 0))
    coeffs = layer.get(1, [])
    coeffs = coeffs if isinstance(coeffs, list) else [coeffs]
    if op == 0:
        return [np.prod(np.stack(inputs), axis=0)]
    if op == 1:
        if coeffs:
            return [sum(float(cf) * x for cf, x in zip(coeffs, inputs, strict=True))]
        return [sum(inputs[1:], inputs[0])]
    if op == 2:
        return [np.max(np.stack(inputs), axis=0)]
    raise UnsupportedLayerError(f"layer {layer.name} (Eltwise): unknown op_type {op}")


def _softmax(layer: Layer, inputs, w):
    x = inputs[0]
    axis = axis_of(layer, 0, x.ndim)
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return [e / e.sum(axis=axis, keepdims=True)]


def _cumulative_sum(layer: Layer, inputs, w):
    x = inputs[0]
    return [np.cumsum(x, axis=axis_of(layer, 0, x.ndim))]


_REDUCTIONS: dict[int, Callable[..., np.ndarray]] = {
    0: lambda x, axes, keep: np.sum(x, axis=axes, keepdims=keep),
    1: lambda x, axes, keep: np.sum(np.abs(x), axis=axes, keepdims=keep),
    2: lambda x, axes, keep: np.sum(x * x, axis=axes, keepdims=keep),
    3: lambda x, axes, keep: np.mean(x, axis=axes, keepdims=keep),
    4: lambda x, axes, keep: np.max(x, axis=axes, keepdims=keep),
    5: lambda x, axes, keep: np.min(x, axis=axes, keepdims=keep),
    6: lambda x, axes, keep: np.prod(x, axis=axes, keepdims=keep),
    7: lambda x, axes, keep: np.sum(np.abs(x), axis=axes, keepdims=keep),
    8: lambda x, axes, keep: np.sqrt(np.sum(x * x, axis=axes, keepdims=keep)),
    9: lambda x, axes, keep: np.log(np.sum(x, axis=axes, keepdims=keep)),
    10: lambda x, axes, keep: np.log(np.sum(np.exp(x), axis=axes, keepdims=keep)),
}


def _reduction(layer: Layer, inputs, w):
    x = inputs[0]
    p = layer.params
    op = int(p.get(0, 0))
    if op not in _REDUCTIONS:
        raise UnsupportedLayerError(f"layer {layer.name} (Reduction): unknown operation {op}")
    keep = bool(p.get(4, 0))
    coeff = float(p.get(2, 1.0))
    if p.get(1, 0):  # reduce_all; without keepdims ncnn gives a 1-d blob of one value
        y = _REDUCTIONS[op](x, None, keep)
        return [(np.asarray(y) * coeff).reshape(y.shape if keep else (1,))]
    if not p.get(5, 0):
        raise UnsupportedLayerError(
            f"layer {layer.name} (Reduction): axes counted with the batch axis (5=fixbug0 unset) "
            "are not implemented"
        )
    axes = p.get(3, [])
    axes = tuple(
        sorted(
            int(a) + x.ndim if int(a) < 0 else int(a) for a in (axes if isinstance(axes, list) else [axes])
        )
    )
    y = np.asarray(_REDUCTIONS[op](x, axes, keep)) * coeff
    return [y.reshape(1) if y.ndim == 0 else y]


def _relu(layer: Layer, inputs, w):
    x = inputs[0]
    slope = float(layer.get(0, 0.0))
    return [np.maximum(x, 0.0) if slope == 0 else np.where(x > 0, x, x * slope)]


def _clip(layer: Layer, inputs, w):
    return [np.clip(inputs[0], float(layer.get(0, -FLT_MAX)), float(layer.get(1, FLT_MAX)))]


def _hard_sigmoid(layer: Layer, inputs, w):
    alpha, beta = float(layer.get(0, 0.2)), float(layer.get(1, 0.5))
    return [np.clip(inputs[0] * alpha + beta, 0.0, 1.0)]


def _hard_swish(layer: Layer, inputs, w):
    alpha, beta = float(layer.get(0, 0.2)), float(layer.get(1, 0.5))
    x = inputs[0]
    return [x * np.clip(x * alpha + beta, 0.0, 1.0)]


def _elu(layer: Layer, inputs, w):
    x = inputs[0]
    return [np.where(x < 0, float(layer.get(0, 0.1)) * np.expm1(np.minimum(x, 0.0)), x)]


def _gelu(layer: Layer, inputs, w):
    x = tensor(inputs[0])
    return [F.gelu(x, approximate="tanh" if layer.get(0, 0) else "none").numpy()]


def _dropout(layer: Layer, inputs, w):
    return [inputs[0] * float(layer.get(0, 1.0))]


def _elementwise(fn: Callable[[np.ndarray], np.ndarray]):
    def run(layer: Layer, inputs, w):
        return [fn(inputs[0])]

    return run


OPS: dict[str, Callable] = {
    "AbsVal": _elementwise(np.abs),
    "BinaryOp": _binary_op,
    "Clip": _clip,
    "CumulativeSum": _cumulative_sum,
    "Dropout": _dropout,
    "Eltwise": _eltwise,
    "ELU": _elu,
    "GELU": _gelu,
    "HardSigmoid": _hard_sigmoid,
    "HardSwish": _hard_swish,
    "Mish": _elementwise(lambda x: x * np.tanh(np.logaddexp(0.0, x))),
    "Reduction": _reduction,
    "ReLU": _relu,
    "Sigmoid": _elementwise(_sigmoid),
    "Softmax": _softmax,
    "Swish": _elementwise(lambda x: x * _sigmoid(x)),
    "TanH": _elementwise(np.tanh),
    "UnaryOp": _unary_op,
}
