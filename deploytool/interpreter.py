"""A float64 reference interpreter for ncnn graphs (.param + .bin), one numpy/torch op per layer."""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .errors import BackendError, SpecError
from .ncnn_param import TAG_INT8, Layer, NcnnGraph, read_param, weight_arrays

FLT_MAX = float(np.finfo(np.float32).max)
TAG_FP16 = 0x01306B47
SAME_UPPER = -233
SAME_LOWER = -234


class UnsupportedLayerError(BackendError):
    """The interpreter has no implementation for a layer type or for one of its settings."""


# ---------------------------------------------------------------------------------------------
# model-bin reading


@dataclass(frozen=True)
class WeightRecord:
    """Where one weight array of one layer lies in the .bin."""

    layer_index: int
    name: str
    offset: int  # first byte of the data, after any 4-byte flag
    count: int
    dtype: str  # "float32", "float16" or "int8" (an int8 layer's weights)


def _weight_specs(layer: Layer) -> list[tuple[str, int, bool]]:
    """The arrays a layer loads from the model bin, in load order: (name, count, flagged), as
    ncnn_param.weight_arrays knows them. flagged arrays start with a 4-byte tag (ncnn ModelBin::load
    type 0); the others are raw float32 (type 1)."""
    arrays = weight_arrays(layer)
    if arrays is None:
        raise UnsupportedLayerError(
            f"layer {layer.name} ({layer.type}): the interpreter does not know what it loads from the .bin"
        )
    return [(a.name, a.count, a.flagged) for a in arrays]


def _memorydata_shape(layer: Layer) -> tuple[int, ...]:
    w, h, d, c = (int(layer.get(k, 0)) for k in (0, 1, 11, 2))
    if d:
        return (c, d, h, w)
    if c:
        return (c, h, w)
    if h:
        return (h, w)
    return (max(w, 1),)


def read_model_bin(
    graph: NcnnGraph, bin_path: Path | str
) -> tuple[list[dict[str, np.ndarray]], list[WeightRecord]]:
    """Read every layer's weights from an ncnn model bin, in layer order.

    Returns the weights per layer (name -> float64 array) and where each array lies in the file.
    Raises SpecError when the file is shorter or longer than the .param says it should be.
    """
    bin_path = Path(bin_path)
    if not bin_path.is_file():
        raise SpecError(f"{bin_path}: no such .bin file")
    data = bin_path.read_bytes()
    pos = 0
    weights: list[dict[str, np.ndarray]] = []
    records: list[WeightRecord] = []

    def need(nbytes: int, what: str) -> None:
        if pos + nbytes > len(data):
            raise SpecError(
                f"{bin_path} is too short for its .param: it ends at byte {len(data)} while reading {what}; "
                "convert the model again so both files come from one run"
            )

    for index, layer in enumerate(graph.layers):
        _check_supported(layer)
        arrays = {}
        for name, count, flagged in _weight_specs(layer):
            what = f"{name} of layer {layer.name} ({layer.type})"
            dtype = "float32"
            if flagged:
                need(4, what)
                tag = int.from_bytes(data[pos : pos + 4], "little")
                pos += 4
                if tag == TAG_FP16:
                    dtype = "float16"
                elif tag == TAG_INT8 and layer.get(8, 0):
                    dtype = "int8"
                elif tag != 0:
                    raise UnsupportedLayerError(
                        f"{bin_path}: {what} is stored with tag 0x{tag:08X}; the interpreter reads float32 "
                        "(tag 0), float16 (tag 0x01306B47) and the int8 weights of int8 layers"
                    )
            itemsize = np.dtype(dtype).itemsize
            nbytes = count * itemsize
            need(nbytes, what)
            arr = np.frombuffer(data, dtype=np.dtype(dtype).newbyteorder("<"), count=count, offset=pos)
            records.append(WeightRecord(index, name, pos, count, dtype))
            arrays[name] = arr.astype(np.float64)
            pos += (nbytes + 3) // 4 * 4  # ncnn aligns every array to 4 bytes
        weights.append(arrays)
    if pos != len(data):
        raise SpecError(
            f"{bin_path} has {len(data) - pos} bytes more than its .param describes; "
            "the .bin and .param come from different conversions"
        )
    return weights, records


# ---------------------------------------------------------------------------------------------
# operators; blobs are float64 numpy arrays shaped as ncnn sees them: (w,), (h, w), (c, h, w), (c, d, h, w)


def _t(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float64))


def _sigmoid(x):
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def _activation(x: np.ndarray, kind: int, params: list, layer: Layer) -> np.ndarray:
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


def _need_dims(layer: Layer, x: np.ndarray, dims: tuple[int, ...]) -> None:
    if x.ndim not in dims:
        raise UnsupportedLayerError(
            f"layer {layer.name} ({layer.type}) got a {x.ndim}-d blob; the interpreter implements it for "
            f"{' or '.join(str(d) for d in dims)}-d blobs only"
        )


def _same_pads(size: int, kernel_extent: int, stride: int) -> int:
    return max(kernel_extent + (size - 1) // stride * stride - size, 0)


def _conv(layer: Layer, inputs, w, depthwise: bool):
    x = inputs[0]
    _need_dims(layer, x, (3,))
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
    xt = F.pad(_t(x)[None], (pl, pr, pt, pb), value=pad_value)
    weight = _t(w["weight"]).reshape(out_c, c // groups, kh, kw)
    y = F.conv2d(xt, weight, None, stride=(sh, sw), dilation=(dh, dw), groups=groups)[0].numpy()
    y = _dequantize(y, per_out, w, (out_c, 1, 1))
    return [_requantize(_activation(y, int(p.get(9, 0)), p.get(10, []), layer), w)]


def _quantize_input(layer: Layer, x: np.ndarray, w, out_c: int) -> tuple[np.ndarray, np.ndarray | None]:
    """An int8 layer's input as ncnn quantises it (round half away from zero of x * bottom scale,
    clamped to [-127, 127]) and the factor per output channel that turns the integer sums back into
    floats (1 / (bottom scale * weight scale); 0 where a scale is 0, as ncnn does); a float layer's
    input unchanged and None."""
    if not layer.get(8, 0):
        return x, None
    from .quantize import int8_levels

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
    from .quantize import int8_levels

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
    _need_dims(layer, x, (3,))
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
    xt = _t(x)[None]
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
    return [_requantize(_activation(y, int(p.get(9, 0)), p.get(10, []), layer), w)]


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
        _need_dims(layer, arr, (2,))
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


def _axis(layer: Layer, key: int, ndim: int, default: int = 0) -> int:
    axis = int(layer.get(key, default))
    axis = axis + ndim if axis < 0 else axis
    if not 0 <= axis < ndim:
        raise UnsupportedLayerError(f"layer {layer.name} ({layer.type}): axis {axis} for a {ndim}-d blob")
    return axis


def _concat(layer: Layer, inputs, w):
    return [np.concatenate(inputs, axis=_axis(layer, 0, inputs[0].ndim))]


def _slice(layer: Layer, inputs, w):
    x = inputs[0]
    axis = _axis(layer, 1, x.ndim)
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


def _cumulative_sum(layer: Layer, inputs, w):
    x = inputs[0]
    return [np.cumsum(x, axis=_axis(layer, 0, x.ndim))]


def _split(layer: Layer, inputs, w):
    return [inputs[0].copy() for _ in layer.tops]


_DIM_NAMES = {1: "w", 2: "hw", 3: "chw", 4: "cdhw"}


def _named_dims(x: np.ndarray) -> dict[str, int]:
    dims = {"w": 1, "h": 1, "d": 1, "c": 1}
    dims.update(zip(_DIM_NAMES[x.ndim], x.shape, strict=True))
    return dims


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
            return _named_dims(blob)[ref.group(2)]
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
    have = _named_dims(x)
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
    _need_dims(layer, x, (2, 3, 4))
    order_type = int(layer.get(0, 0))
    limit = {2: 2, 3: 6, 4: 24}[x.ndim]
    if not 0 <= order_type < limit:
        raise UnsupportedLayerError(
            f"layer {layer.name} (Permute): order_type {order_type} for a {x.ndim}-d blob"
        )
    return [np.transpose(x, _permute_axes(order_type, x.ndim)).copy()]


def _softmax(layer: Layer, inputs, w):
    x = inputs[0]
    axis = _axis(layer, 0, x.ndim)
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return [e / e.sum(axis=axis, keepdims=True)]


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
    _need_dims(layer, x, (3,))
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
    names = _DIM_NAMES[x.ndim]
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


def _memory_data(layer: Layer, inputs, w):
    return [w["data"].reshape(_memorydata_shape(layer)).copy()]


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
    x = _t(inputs[0])
    return [F.gelu(x, approximate="tanh" if layer.get(0, 0) else "none").numpy()]


def _dropout(layer: Layer, inputs, w):
    return [inputs[0] * float(layer.get(0, 1.0))]


def _identity(layer: Layer, inputs, w):
    return [x.copy() for x in inputs]


def _elementwise(fn: Callable[[np.ndarray], np.ndarray]):
    def run(layer: Layer, inputs, w):
        return [fn(inputs[0])]

    return run


OPS: dict[str, Callable] = {
    "AbsVal": _elementwise(np.abs),
    "BatchNorm": _batchnorm,
    "BinaryOp": _binary_op,
    "Clip": _clip,
    "Concat": _concat,
    "Convolution": lambda layer, inputs, w: _conv(layer, inputs, w, depthwise=False),
    "ConvolutionDepthWise": lambda layer, inputs, w: _conv(layer, inputs, w, depthwise=True),
    "Crop": _crop,
    "CumulativeSum": _cumulative_sum,
    "Dropout": _dropout,
    "ELU": _elu,
    "Eltwise": _eltwise,
    "Flatten": _flatten,
    "GELU": _gelu,
    "Gemm": _gemm,
    "HardSigmoid": _hard_sigmoid,
    "HardSwish": _hard_swish,
    "InnerProduct": _inner_product,
    "Interp": _interp,
    "MatMul": _matmul,
    "MemoryData": _memory_data,
    "Mish": _elementwise(lambda x: x * np.tanh(np.logaddexp(0.0, x))),
    "Noop": _identity,
    "Padding": _padding,
    "Permute": _permute,
    "Pooling": _pooling,
    "PReLU": _prelu,
    "Reduction": _reduction,
    "ReLU": _relu,
    "Reshape": _reshape,
    "Scale": _scale,
    "Sigmoid": _elementwise(_sigmoid),
    "Slice": _slice,
    "Softmax": _softmax,
    "Split": _split,
    "Swish": _elementwise(lambda x: x * _sigmoid(x)),
    "TanH": _elementwise(np.tanh),
    "UnaryOp": _unary_op,
}


def supported_types() -> list[str]:
    """The ncnn layer types the interpreter implements (besides Input)."""
    return sorted(OPS)


def _check_supported(layer: Layer) -> None:
    if layer.type != "Input" and layer.type not in OPS:
        raise UnsupportedLayerError(
            f"layer {layer.name} has type {layer.type}, which the reference interpreter does not implement "
            f"(it implements: {', '.join(supported_types())})"
        )


# ---------------------------------------------------------------------------------------------


class NcnnInterpreter:
    """Runs an ncnn graph in float64, layer by layer, following ncnn's operator semantics."""

    def __init__(self, param_path: Path | str, bin_path: Path | str):
        self.param_path, self.bin_path = Path(param_path), Path(bin_path)
        self.graph: NcnnGraph = read_param(self.param_path)
        self.weights, self.weight_records = read_model_bin(self.graph, self.bin_path)
        self._producer = {top: layer for layer in self.graph.layers for top in layer.tops}

    def layer_of(self, blob: str) -> Layer:
        """The layer that produces a blob."""
        try:
            return self._producer[blob]
        except KeyError:
            raise SpecError(f"{self.param_path}: no layer produces a blob named {blob!r}") from None

    def weight_record(self, layer_name: str, weight: str = "weight") -> WeightRecord:
        """Where a named layer's weight array lies in the .bin (the layer name must be unique)."""
        indices = [i for i, layer in enumerate(self.graph.layers) if layer.name == layer_name]
        if len(indices) != 1:
            found = "no layer" if not indices else f"{len(indices)} layers"
            raise SpecError(f"{self.param_path}: {found} named {layer_name!r}; name a unique layer")
        for rec in self.weight_records:
            if rec.layer_index == indices[0] and rec.name == weight:
                return rec
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
