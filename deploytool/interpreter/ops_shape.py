"""Ops that move values without computing new ones: reshape, permute, slice, concat, crop, padding,
interp, and pnnx's shape expressions (`eval_shape_expr`)."""

from __future__ import annotations

import math
import re
from collections.abc import Callable

import numpy as np

from ..ncnn_param import Layer
from .blobs import DIM_NAMES, UnsupportedLayerError, axis_of, named_dims, need_dims


def _concat(layer: Layer, inputs, w):
    return [np.concatenate(inputs, axis=axis_of(layer, 0, inputs[0].ndim))]


def _slice(layer: Layer, inputs, w):
    x = inputs[0]
    axis = axis_of(layer, 1, x.ndim)
    size = x.shape[axis]
    n = len(layer.tops)
    indices = layer.get(2)
    slices = layer.get(0)
    outs, q = [], 0
    for i in range(n):
        if indices is not None:
            indices = indices if isinstance(indices, list) else [indices]
            if i == n - 1:
                length = size - q
            else:
                end = int(indices[i])
                length = (end + size if end < 0 else end) - q
        else:
            slices = slices if isinstance(slices, list) else [slices]
            length = int(slices[i])
            if length == -233:
                length = (size - q) // (n - i)
        outs.append(np.take(x, range(q, q + length), axis=axis))
        q += length
    return outs


def _split(layer: Layer, inputs, w):
    return [inputs[0].copy() for _ in layer.tops]


_EXPR_BINARY = {
    "+": lambda a, b: a + b,
    "-": lambda a, b: a - b,
    "*": lambda a, b: a * b,
    "/": lambda a, b: a / b,
    "//": lambda a, b: a // b,
    "max": max,
    "min": min,
    "pow": lambda a, b: a**b,
}
_EXPR_UNARY = {
    "floor": math.floor,
    "ceil": math.ceil,
    "round": round,
    "trunc": math.trunc,
    "neg": lambda a: -a,
    "abs": abs,
}


def eval_shape_expr(expr: str, inputs: list[np.ndarray], where: str) -> list[int]:
    """Evaluate pnnx/ncnn's shape expression (e.g. `*(0h,0w),64`): comma-separated items in w,h,d,c
    order, prefix operators `op(a,b)`, `<i><w|h|d|c>` for input i's size; results truncated to int."""
    tokens = re.findall(r"//|[A-Za-z_]+|\d+[whdc]|-?\d+(?:\.\d+)?|[-+*/(),]", expr)
    pos = 0

    def item():
        nonlocal pos
        tok = tokens[pos]
        pos += 1
        ref = re.fullmatch(r"(\d)([whdc])", tok)
        if ref:
            blob = inputs[int(ref.group(1))]
            return named_dims(blob)[ref.group(2)]
        if tok in _EXPR_BINARY or tok in _EXPR_UNARY:
            if tokens[pos] != "(":
                raise UnsupportedLayerError(f"{where}: malformed shape expression {expr!r}")
            pos += 1
            args = [item()]
            while tokens[pos] == ",":
                pos += 1
                args.append(item())
            pos += 1  # ")"
            fn = _EXPR_BINARY.get(tok) if len(args) == 2 else _EXPR_UNARY.get(tok)
            if fn is None:
                raise UnsupportedLayerError(
                    f"{where}: operator {tok!r} with {len(args)} argument(s) in {expr!r}"
                )
            return fn(*args)
        try:
            return float(tok) if "." in tok else int(tok)
        except ValueError:
            raise UnsupportedLayerError(
                f"{where}: unsupported token {tok!r} in shape expression {expr!r}"
            ) from None

    values = [item()]
    while pos < len(tokens) and tokens[pos] == ",":
        pos += 1
        values.append(item())
    return [math.trunc(v) for v in values]


def _reshape(layer: Layer, inputs, w):
    x = inputs[0]
    expr = layer.get(6)
    if isinstance(expr, str):  # a dynamic shape: the listed sizes are w, h(, d), c
        whdc = eval_shape_expr(expr, inputs, f"layer {layer.name} (Reshape)")
        return [x.reshape(whdc[::-1])]  # numpy order is c, d, h, w; numpy resolves a -1 itself
    if layer.get(3, 0):
        raise UnsupportedLayerError(
            f"layer {layer.name} (Reshape): the legacy permute flag is not implemented"
        )
    want = {
        "w": layer.get(0, -233),
        "h": layer.get(1, -233),
        "d": layer.get(11, -233),
        "c": layer.get(2, -233),
    }
    if want["w"] == -233:
        names = ""
    elif want["h"] == -233:
        names = "w"
    elif want["c"] == -233:
        names = "hw"
    elif want["d"] == -233:
        names = "chw"
    else:
        names = "cdhw"
    if not names:
        raise UnsupportedLayerError(f"layer {layer.name} (Reshape) gives no target shape")
    have = named_dims(x)
    shape = [have[n] if int(want[n]) == 0 else int(want[n]) for n in names]
    return [x.reshape(shape)]


def _flatten(layer: Layer, inputs, w):
    return [inputs[0].reshape(-1)]


def _permute_axes(order_type: int, ndim: int) -> tuple[int, ...]:
    """numpy transpose axes for ncnn's Permute order_type.

    ncnn names each order by the old axes that become the new w, h(, d), c. Within each block of six
    the last new axis is fixed and the first three run through the same six arrangements.
    """
    if ndim == 2:
        order = ("wh", "hw")[order_type]
        names = "wh"
    else:
        names = "whc" if ndim == 3 else "whdc"
        last = names[-1 - order_type // 6] if ndim == 4 else ""
        x, y, z = [n for n in names if n != last] if ndim == 4 else names
        order = (x + y + z, y + x + z, x + z + y, z + x + y, y + z + x, z + y + x)[order_type % 6] + last
    numpy_index = {n: i for i, n in enumerate(reversed(names))}
    return tuple(numpy_index[n] for n in reversed(order))


def _permute(layer: Layer, inputs, w):
    x = inputs[0]
    need_dims(layer, x, (2, 3, 4))
    order_type = int(layer.get(0, 0))
    limit = {2: 2, 3: 6, 4: 24}[x.ndim]
    if not 0 <= order_type < limit:
        raise UnsupportedLayerError(
            f"layer {layer.name} (Permute): order_type {order_type} for a {x.ndim}-d blob"
        )
    return [np.transpose(x, _permute_axes(order_type, x.ndim)).copy()]


def _padding(layer: Layer, inputs, w):
    x = inputs[0]
    p = layer.params
    top, bottom, left, right = (int(p.get(k, 0)) for k in (0, 1, 2, 3))
    kind = int(p.get(4, 0))
    value = float(p.get(5, 0.0))
    front, behind = int(p.get(7, 0)), int(p.get(8, 0))
    pads = [(top, bottom), (left, right)]
    if x.ndim == 1:
        pads = [(left, right)]
    elif x.ndim == 3:
        pads = [(front, behind)] + pads
    elif x.ndim == 4:
        pads = [(0, 0), (front, behind)] + pads
    if "pad_value" in w:
        if kind != 0 or x.ndim != 3 or front or behind:
            raise UnsupportedLayerError(f"layer {layer.name} (Padding): per-channel values with type {kind}")
        y = np.pad(x, pads, mode="constant")
        pv = w["pad_value"]
        core = np.zeros_like(y, dtype=bool)
        core[:, top : top + x.shape[1], left : left + x.shape[2]] = True
        return [np.where(core, y, pv[:, None, None])]
    if kind == 0:
        return [np.pad(x, pads, mode="constant", constant_values=value)]
    if kind == 1:
        return [np.pad(x, pads, mode="edge")]
    if kind == 2:
        return [np.pad(x, pads, mode="reflect")]
    raise UnsupportedLayerError(f"layer {layer.name} (Padding): unknown type {kind}")


def _interp(layer: Layer, inputs, w):
    x = inputs[0]
    need_dims(layer, x, (3,))
    p = layer.params
    kind = int(p.get(0, 0))
    if len(inputs) > 1 or p.get(5, 0):
        raise UnsupportedLayerError(f"layer {layer.name} (Interp): dynamic target size is not implemented")
    c, h, wd = x.shape
    hscale, wscale = np.float32(p.get(1, 1.0)), np.float32(p.get(2, 1.0))
    outh, outw = int(p.get(3, 0)), int(p.get(4, 0))
    if outw == 0 or outh == 0:
        outw, outh = int(np.float32(wd) * wscale), int(np.float32(h) * hscale)
    align_corner = int(p.get(6, 0))
    if kind == 1:
        hs = np.float32(h) / np.float32(outh) if p.get(3, 0) else np.float32(1.0) / hscale
        ws = np.float32(wd) / np.float32(outw) if p.get(4, 0) else np.float32(1.0) / wscale
        iy = np.minimum((np.arange(outh, dtype=np.float32) * hs).astype(np.int64), h - 1)
        ix = np.minimum((np.arange(outw, dtype=np.float32) * ws).astype(np.int64), wd - 1)
        return [x[:, iy][:, :, ix]]
    if kind == 2:
        if h < 2 or wd < 2:
            raise UnsupportedLayerError(f"layer {layer.name} (Interp): bilinear from a blob under 2x2")
        y0, fy = _linear_coeffs(h, outh, align_corner)
        x0, fx = _linear_coeffs(wd, outw, align_corner)
        rows = x[:, y0] * (1 - fy)[None, :, None] + x[:, y0 + 1] * fy[None, :, None]
        return [rows[:, :, x0] * (1 - fx) + rows[:, :, x0 + 1] * fx]
    raise UnsupportedLayerError(
        f"layer {layer.name} (Interp): resize_type {kind} is not implemented (nearest=1 and bilinear=2 are)"
    )


def _linear_coeffs(size: int, out: int, align_corner: int):
    """Source index and weight per output position, as ncnn's linear_coeffs computes them."""
    scale = (size - 1) / (out - 1) if align_corner else size / out
    d = np.arange(out, dtype=np.float64)
    f = (d * scale if align_corner else (d + 0.5) * scale - 0.5).astype(np.float32)
    s = np.floor(f).astype(np.int64)
    f = (f - s).astype(np.float32)
    f[s < 0] = 0.0
    s[s < 0] = 0
    hi = s >= size - 1
    s[hi] = size - 2
    f[hi] = 1.0
    return s, f.astype(np.float64)


def _crop(layer: Layer, inputs, w):
    x = inputs[0]
    p = layer.params
    if len(inputs) > 1:
        raise UnsupportedLayerError(
            f"layer {layer.name} (Crop): cropping to a reference blob is not implemented"
        )
    names = DIM_NAMES[x.ndim]
    index = [slice(None)] * x.ndim
    starts = p.get(9)
    if starts is not None:
        starts = starts if isinstance(starts, list) else [starts]
        ends = p.get(10, [])
        ends = ends if isinstance(ends, list) else [ends]
        axes = p.get(11, list(range(len(starts))))
        axes = axes if isinstance(axes, list) else [axes]
        for i, axis in enumerate(axes):
            axis = int(axis) + x.ndim if int(axis) < 0 else int(axis)
            size = x.shape[axis]
            start = int(starts[i])
            end = int(ends[i]) if i < len(ends) else -233
            start = 0 if start == -233 else start if start >= 0 else size + start
            end = size if end == -233 else min(size, end) if end > 0 else size + end
            index[axis] = slice(start, end)
        return [x[tuple(index)].copy()]
    offsets = {"w": (0, 6, 3), "h": (1, 7, 4), "d": (13, 15, 14), "c": (2, 8, 5)}
    for axis, name in enumerate(names):
        k_off, k_off2, k_out = offsets[name]
        off, off2, out = int(p.get(k_off, 0)), int(p.get(k_off2, 0)), int(p.get(k_out, 0))
        avail = x.shape[axis] - off - off2
        if out == 0:
            raise UnsupportedLayerError(
                f"layer {layer.name} (Crop): legacy crop without an explicit output size on axis {name}"
            )
        size = avail if out == -233 else min(out, avail)
        index[axis] = slice(off, off + size)
    return [x[tuple(index)].copy()]


def _identity(layer: Layer, inputs, w):
    return [x.copy() for x in inputs]


OPS: dict[str, Callable] = {
    "Concat": _concat,
    "Crop": _crop,
    "Flatten": _flatten,
    "Interp": _interp,
    "Noop": _identity,
    "Padding": _padding,
    "Permute": _permute,
    "Reshape": _reshape,
    "Slice": _slice,
    "Split": _split,
}
