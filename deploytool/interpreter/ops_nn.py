"""Layers with weights: convolution, pooling, gemm, inner product, int8 quantise/requantise, batchnorm,
scale, prelu, memory data."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from ..ncnn_param import Layer, int8_levels
from .blobs import FLT_MAX, UnsupportedLayerError, need_dims, tensor
from .ops_math import activation

SAME_UPPER = -233
SAME_LOWER = -234


def _same_pads(size: int, kernel_extent: int, stride: int) -> int:
    return max(kernel_extent + (size - 1) // stride * stride - size, 0)


def _conv(layer: Layer, inputs, w, depthwise: bool):
    x = inputs[0]
    need_dims(layer, x, (3,))
    p = layer.params
    if p.get(19, 0):
        raise UnsupportedLayerError(f"layer {layer.name} ({layer.type}): dynamic weights are not implemented")
    out_c = int(p[0])
    kw = int(p.get(1, 0))
    kh = int(p.get(11, kw))
    dw = int(p.get(2, 1))
    dh = int(p.get(12, dw))
    sw = int(p.get(3, 1))
    sh = int(p.get(13, sw))
    pl = int(p.get(4, 0))
    pt = int(p.get(14, pl))
    pr = int(p.get(15, pl))
    pb = int(p.get(16, pt))
    pad_value = float(p.get(18, 0.0))
    groups = int(p.get(7, 1)) if depthwise else 1
    c, h, wd = x.shape
    ekw, ekh = dw * (kw - 1) + 1, dh * (kh - 1) + 1
    if pl == SAME_UPPER or pl == SAME_LOWER:
        wpad, hpad = _same_pads(wd, ekw, sw), _same_pads(h, ekh, sh)
        if pl == SAME_UPPER:
            pl, pr, pt, pb = wpad // 2, wpad - wpad // 2, hpad // 2, hpad - hpad // 2
        else:
            pl, pr, pt, pb = wpad - wpad // 2, wpad // 2, hpad - hpad // 2, hpad // 2
    if min(pl, pr, pt, pb) < 0:
        raise UnsupportedLayerError(f"layer {layer.name} ({layer.type}): padding {pl},{pr},{pt},{pb}")
    x, per_out = _quantize_input(layer, x, w, out_c)
    xt = F.pad(tensor(x)[None], (pl, pr, pt, pb), value=pad_value)
    weight = tensor(w["weight"]).reshape(out_c, c // groups, kh, kw)
    y = F.conv2d(xt, weight, None, stride=(sh, sw), dilation=(dh, dw), groups=groups)[0].numpy()
    y = _dequantize(y, per_out, w, (out_c, 1, 1))
    return [_requantize(activation(y, int(p.get(9, 0)), p.get(10, []), layer), w)]


def _quantize_input(layer: Layer, x: np.ndarray, w, out_c: int) -> tuple[np.ndarray, np.ndarray | None]:
    """An int8 layer's input as ncnn quantises it (round half away from zero of x * bottom scale,
    clamped to [-127, 127]) and the factor per output channel that turns the integer sums back into
    floats (1 / (bottom scale * weight scale); 0 where a scale is 0, as ncnn does); a float layer's
    input unchanged and None."""
    if not layer.get(8, 0):
        return x, None
    s_in = np.float32(w["bottom_scale"][0])
    # x * scale in float32, as ncnn multiplies (a float64 product rounds differently at the .5 edges)
    xq = int8_levels((x.astype(np.float32) * s_in).astype(np.float64))
    s_in = float(s_in)
    s_w = np.broadcast_to(w["weight_scales"], (out_c,))
    both = s_in * s_w
    return xq, np.divide(1.0, both, out=np.zeros_like(both), where=both != 0)


def _requantize(y: np.ndarray, w) -> np.ndarray:
    """A requantising int8 layer (8 > 100) hands int8 values at its top scale to the next int8 layer;
    as a float blob that is the output rounded to that grid. Other layers: unchanged."""
    if "top_scale" not in w:
        return y
    top = float(np.float32(w["top_scale"][0]))
    return int8_levels(y * top) / top if top else np.zeros_like(y)


def _dequantize(y: np.ndarray, per_out: np.ndarray | None, w, shape: tuple[int, ...]) -> np.ndarray:
    """The integer sums of an int8 layer back to floats, then the bias (a float layer: just the bias)."""
    if per_out is not None:
        y = y * per_out.reshape(shape)
    if "bias" in w:
        y = y + w["bias"].reshape(shape)
    return y


def _pooling(layer: Layer, inputs, w):
    x = inputs[0]
    need_dims(layer, x, (3,))
    p = layer.params
    kind = int(p.get(0, 0))
    if kind not in (0, 1):
        raise UnsupportedLayerError(f"layer {layer.name} (Pooling): unknown pooling_type {kind}")
    c, h, wd = x.shape
    if p.get(4, 0):  # global pooling yields a 1-d blob of channels
        return [x.max(axis=(1, 2)) if kind == 0 else x.mean(axis=(1, 2))]
    if p.get(7, 0):  # adaptive pooling
        ow = int(p.get(8, 0))
        oh = int(p.get(18, ow))
        y = np.empty((c, oh, ow))
        for i in range(oh):
            h0, h1 = (i * h) // oh, -((-(i + 1) * h) // oh)
            for j in range(ow):
                w0, w1 = (j * wd) // ow, -((-(j + 1) * wd) // ow)
                win = x[:, h0:h1, w0:w1]
                y[:, i, j] = win.max(axis=(1, 2)) if kind == 0 else win.mean(axis=(1, 2))
        return [y]
    kw = int(p.get(1, 0))
    kh = int(p.get(11, kw))
    sw = int(p.get(2, 1))
    sh = int(p.get(12, sw))
    pl = int(p.get(3, 0))
    pr = int(p.get(14, pl))
    pt = int(p.get(13, pl))
    pb = int(p.get(15, pt))
    pad_mode = int(p.get(5, 0))
    include_pad = int(p.get(6, 0))
    if pad_mode == 0:  # full padding: extend right/bottom so that every input element is covered
        wtail = (wd + pl + pr - kw) % sw
        htail = (h + pt + pb - kh) % sh
        pr += sw - wtail if wtail else 0
        pb += sh - htail if htail else 0
    elif pad_mode in (2, 3):
        wpad, hpad = _same_pads(wd, kw, sw), _same_pads(h, kh, sh)
        if pad_mode == 2:
            pl, pr, pt, pb = wpad // 2, wpad - wpad // 2, hpad // 2, hpad - hpad // 2
        else:
            pl, pr, pt, pb = wpad - wpad // 2, wpad // 2, hpad - hpad // 2, hpad // 2
    elif pad_mode != 1:
        raise UnsupportedLayerError(f"layer {layer.name} (Pooling): unknown pad_mode {pad_mode}")
    xt = tensor(x)[None]
    if kind == 0:
        xt = F.pad(xt, (pl, pr, pt, pb), value=-FLT_MAX)
        return [F.max_pool2d(xt, (kh, kw), (sh, sw))[0].numpy()]
    padded = F.pad(xt, (pl, pr, pt, pb), value=0.0)
    sums = F.avg_pool2d(padded, (kh, kw), (sh, sw), divisor_override=1)[0].numpy()
    if include_pad:  # ncnn divides every window by the kernel area
        return [sums / (kh * kw)]
    mask = F.pad(torch.ones(1, 1, h, wd, dtype=torch.float64), (pl, pr, pt, pb), value=0.0)
    counts = F.avg_pool2d(mask, (kh, kw), (sh, sw), divisor_override=1)[0].numpy()
    return [sums / counts]


def _inner_product(layer: Layer, inputs, w):
    x = inputs[0]
    p = layer.params
    n_out = int(p[0])
    weight = w["weight"].reshape(n_out, -1)
    x, per_out = _quantize_input(layer, x, w, n_out)
    if x.ndim == 2 and x.shape[1] == weight.shape[1]:
        y = x @ weight.T  # one row per input row
    else:
        y = weight @ x.reshape(-1)
    y = _dequantize(y, per_out, w, (n_out,))
    return [_requantize(activation(y, int(p.get(9, 0)), p.get(10, []), layer), w)]


def _gemm(layer: Layer, inputs, w):
    p = layer.params
    alpha, beta = float(p.get(0, 1.0)), float(p.get(1, 1.0))
    trans_a, trans_b = int(p.get(2, 0)), int(p.get(3, 0))
    const_a, const_b, const_c = int(p.get(4, 0)), int(p.get(5, 0)), int(p.get(6, 0))
    m, n, k = int(p.get(7, 0)), int(p.get(8, 0)), int(p.get(9, 0))
    if p.get(11, 0) or p.get(14, 0):
        raise UnsupportedLayerError(
            f"layer {layer.name} (Gemm): output_N1M / output_transpose not implemented"
        )
    it = iter(inputs)
    if const_a:
        a = w["A"].reshape((k, m) if trans_a else (m, k))
    else:
        a = next(it)
    if const_b:
        b = w["B"].reshape((n, k) if trans_b else (k, n))
    else:
        b = next(it)
    for arr in (a, b):
        need_dims(layer, arr, (2,))
    a = a.T if trans_a else a
    b = b.T if trans_b else b
    m, n = a.shape[0], b.shape[1]
    y = alpha * (a @ b)
    if const_c:
        bc = int(p.get(10, -1))
        c = None if bc == -1 else w["C"]
    else:
        c = next(it, None)
        bc = None
        if c is not None:  # ncnn infers the broadcast type from C's shape; later rules win
            if c.ndim == 1 and c.shape[0] == 1:
                bc = 0
            if c.ndim == 1 and c.shape[0] == m:
                bc = 1
            if c.ndim == 1 and c.shape[0] == n:
                bc = 4
            if c.ndim == 2 and c.shape == (m, 1):
                bc = 2
            if c.ndim == 2 and c.shape == (m, n):
                bc = 3
            if c.ndim == 2 and c.shape == (1, n):
                bc = 4
            if bc is None:
                raise UnsupportedLayerError(
                    f"layer {layer.name} (Gemm): C of shape {c.shape} does not broadcast"
                )
    if c is not None:
        c = c.reshape(-1)
        if bc == 0:
            y = y + beta * c[0]
        elif bc in (1, 2):
            y = y + beta * c[:, None]
        elif bc == 3:
            y = y + beta * c.reshape(m, n)
        else:
            y = y + beta * c[None, :]
    return [y]


def _matmul(layer: Layer, inputs, w):
    a, b = inputs
    if layer.get(0, 0) and b.ndim >= 2:
        b = np.swapaxes(b, -1, -2)
    return [np.matmul(a, b)]


def _batchnorm(layer: Layer, inputs, w):
    x = inputs[0]
    eps = float(layer.get(1, 0.0))
    a = w["slope"] / np.sqrt(w["var"] + eps)
    b = w["bias"] - a * w["mean"]
    shape = (-1,) + (1,) * (x.ndim - 1)
    return [x * a.reshape(shape) + b.reshape(shape)]


def _scale(layer: Layer, inputs, w):
    x = inputs[0]
    scale = w["scale"] if "scale" in w else inputs[1].reshape(-1)
    shape = (-1,) + (1,) * (x.ndim - 1)
    y = x * scale.reshape(shape)
    if "bias" in w:
        y = y + w["bias"].reshape(shape)
    return [y]


def _prelu(layer: Layer, inputs, w):
    x = inputs[0]
    slope = w["slope"]
    if slope.size > 1:
        slope = slope.reshape((-1,) + (1,) * (x.ndim - 1))
    return [np.where(x > 0, x, x * slope)]


def _memorydata_shape(layer: Layer) -> tuple[int, ...]:
    w, h, d, c = (int(layer.get(k, 0)) for k in (0, 1, 11, 2))
    if d:
        return (c, d, h, w)
    if c:
        return (c, h, w)
    if h:
        return (h, w)
    return (max(w, 1),)


def _memory_data(layer: Layer, inputs, w):
    return [w["data"].reshape(_memorydata_shape(layer)).copy()]


OPS: dict[str, Callable] = {
    "BatchNorm": _batchnorm,
    "Convolution": lambda layer, inputs, w: _conv(layer, inputs, w, depthwise=False),
    "ConvolutionDepthWise": lambda layer, inputs, w: _conv(layer, inputs, w, depthwise=True),
    "Gemm": _gemm,
    "InnerProduct": _inner_product,
    "MatMul": _matmul,
    "MemoryData": _memory_data,
    "Pooling": _pooling,
    "PReLU": _prelu,
    "Scale": _scale,
}
