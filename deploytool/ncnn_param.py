"""ncnn's model format: the text .param (layers, blobs, parameters), the one .bin walker, and the int8
format facts (ncnn's int8 rounding, requantised blobs)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import SpecError

PARAM_MAGIC = "7767517"
ARRAY_KEY_BASE = -23300


@dataclass
class Layer:
    """One line of a .param file."""

    type: str
    name: str
    bottoms: list[str]
    tops: list[str]
    params: dict[int, int | float | str | list[int | float]] = field(default_factory=dict)

    def get(self, key: int, default=None):
        return self.params.get(key, default)


@dataclass
class NcnnGraph:
    """A parsed .param file, layers in file (= execution) order."""

    layers: list[Layer]
    blob_count: int | None = None  # as the header declares it
    text: str = ""  # the file's text, for writers that change a few lines and copy the rest

    @property
    def input_names(self) -> list[str]:
        return [top for layer in self.layers if layer.type == "Input" for top in layer.tops]

    @property
    def output_names(self) -> list[str]:
        """Blobs produced by some layer and consumed by none, in graph order."""
        consumed = {b for layer in self.layers for b in layer.bottoms}
        return [t for layer in self.layers for t in layer.tops if t not in consumed]

    @property
    def int8_layers(self) -> list[str]:
        """Layers whose weights and input run in int8 (8=int8_scale_term set), in graph order. Only the
        types whose param 8 is int8_scale_term count: Gemm's 8 is constantN (its int8 term is 18), so a
        pnnx Gemm with 8=1 (a constant B) is an fp32 layer."""
        return [layer.name for layer in self.layers if layer.type in INT8_TERM_TYPES and layer.get(8, 0)]

    def producer(self, blob: str) -> Layer | None:
        for layer in self.layers:
            if blob in layer.tops:
                return layer
        return None


def _number(text: str) -> int | float:
    if any(c in text for c in ".eE") and not text.lstrip("-").isdigit():
        return float(text)
    return int(text)


def _parse_params(tokens: list[str], where: str) -> dict:
    params: dict[int, int | float | str | list[int | float]] = {}
    for token in tokens:
        key_text, sep, value = token.partition("=")
        if not sep:
            raise SpecError(f"{where}: malformed parameter {token!r} (expected key=value)")
        try:
            key = int(key_text)
            if value.startswith('"') and value.endswith('"') and len(value) >= 2:
                params[key] = value[1:-1]  # pnnx's shape expressions for dynamic sizes, e.g. "*(0h,0w),64"
            elif key <= ARRAY_KEY_BASE:
                items = value.split(",")
                params[ARRAY_KEY_BASE - key] = [_number(v) for v in items[1 : 1 + int(items[0])]]
            else:
                params[key] = _number(value)
        except ValueError as exc:
            raise SpecError(f"{where}: malformed parameter {token!r} ({exc})") from None
    return params


def parse_param_text(text: str, source: str = "<param>") -> NcnnGraph:
    """Parse the text of a .param file; raise SpecError naming the line that is wrong."""
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines or lines[0].strip() != PARAM_MAGIC:
        raise SpecError(f"{source} is not an ncnn .param file (first line must be {PARAM_MAGIC})")
    try:
        layer_count, blob_count = (int(v) for v in lines[1].split())
    except (IndexError, ValueError):
        raise SpecError(f"{source}: line 2 must hold the layer and blob counts") from None
    layers = []
    for lineno, line in enumerate(lines[2:], start=3):
        tokens = line.split()
        where = f"{source}:{lineno}"
        try:
            n_in, n_out = int(tokens[2]), int(tokens[3])
            bottoms = tokens[4 : 4 + n_in]
            tops = tokens[4 + n_in : 4 + n_in + n_out]
        except (IndexError, ValueError):
            raise SpecError(f"{where}: malformed layer line {line!r}") from None
        if len(bottoms) != n_in or len(tops) != n_out:
            raise SpecError(f"{where}: layer {tokens[1]} lists fewer blobs than it declares")
        params = _parse_params(tokens[4 + n_in + n_out :], where)
        layers.append(Layer(tokens[0], tokens[1], bottoms, tops, params))
    if len(layers) != layer_count:
        raise SpecError(f"{source}: header declares {layer_count} layers but the file has {len(layers)}")
    return NcnnGraph(layers, blob_count, text)


def read_param(path: Path | str) -> NcnnGraph:
    """Read and parse a .param file."""
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"{path}: no such .param file")
    try:
        text = path.read_text()
    except UnicodeDecodeError:
        raise SpecError(
            f"{path} is not an ncnn .param (a text file); is it the .bin, or another format?"
        ) from None
    return parse_param_text(text, str(path))


# ---------------------------------------------------------------------------------------------
# what each layer loads from the .bin

# The 4-byte storage tags ncnn's ModelBin reads before a "flagged" array (ModelBin::load type 0).
TAG_FP32 = 0x00000000
TAG_FP16 = 0x01306B47
TAG_INT8 = 0x000D4B38
TAG_FP32_SCALED = 0x0002C056

# Layer types that load nothing from the .bin (their load_model is ncnn's default no-op). A type outside
# this set and outside weight_arrays()'s list may load weights: checks after it only count minimums.
WEIGHTLESS = frozenset(
    """AbsVal BinaryOp BNLL Cast Clip Concat Crop CumulativeSum DeepCopy Dropout ELU Eltwise Exp ExpandDims
    Flatten GELU HardSigmoid HardSwish Input Interp Log MatMul Mish Noop Packing Permute PixelShuffle Pooling
    Power ReLU Reduction Reorg Reshape SELU ShuffleChannel Sigmoid Slice Softmax Split Squeeze Swish TanH
    Threshold Tile UnaryOp""".split()
)


@dataclass(frozen=True)
class WeightArray:
    """One array a layer loads from the .bin, in load order."""

    name: str
    count: int  # elements
    flagged: bool  # starts with a 4-byte storage tag (fp32/fp16/int8); else raw float32


def weight_arrays(layer: Layer) -> list[WeightArray] | None:
    """The arrays `layer` loads from the .bin, in order, as ncnn's load_model reads them; [] for a type
    that loads nothing; None when not known here (int8 Gemm, and types outside this list and
    WEIGHTLESS, are not modelled)."""
    p, t = layer.params, layer.type
    if t in WEIGHTLESS:
        return []
    if t in ("Convolution", "ConvolutionDepthWise"):
        if p.get(19, 0):
            return []  # dynamic weight: the weights arrive as a second input blob
        arrays = [WeightArray("weight", int(p.get(6, 0)), True)]
        if p.get(5, 0):
            arrays.append(WeightArray("bias", int(p.get(0, 0)), False))
        per_channel = int(p.get(7, 1)) if t == "ConvolutionDepthWise" else int(p.get(0, 0))
        return _with_int8_scales(layer, arrays, per_channel)
    if t == "InnerProduct":
        arrays = [WeightArray("weight", int(p.get(2, 0)), True)]
        if p.get(1, 0):
            arrays.append(WeightArray("bias", int(p.get(0, 0)), False))
        return _with_int8_scales(layer, arrays, int(p.get(0, 0)))
    if t == "BatchNorm":
        n = int(p.get(0, 0))
        return [WeightArray(name, n, False) for name in ("slope", "mean", "var", "bias")]
    if t == "Scale":
        n = int(p.get(0, 0))
        arrays = [] if n == -233 else [WeightArray("scale", n, False)]
        if p.get(1, 0):
            arrays.append(WeightArray("bias", n, False))
        return arrays
    if t == "PReLU":
        return [WeightArray("slope", int(p.get(0, 0)), False)]
    if t == "Padding":
        n = int(p.get(6, 0))
        return [WeightArray("pad_value", n, False)] if n else []
    if t == "Gemm":
        if p.get(18, 0):
            return None  # int8
        m, n, k = int(p.get(7, 0)), int(p.get(8, 0)), int(p.get(9, 0))
        arrays = []
        if p.get(4, 0):
            arrays.append(WeightArray("A", m * k, True))
        if p.get(5, 0):
            arrays.append(WeightArray("B", k * n, True))
        broadcast_c = int(p.get(10, -1))
        if p.get(6, 0) and broadcast_c != -1:
            sizes = {0: 1, 1: m, 2: m, 3: m * n, 4: n}  # by constant_broadcast_type_C
            if broadcast_c not in sizes:
                return None
            arrays.append(WeightArray("C", sizes[broadcast_c], True))
        return arrays
    if t == "MemoryData":  # ncnn loads (w,h,d,c), (w,h,c), (w,h) or (w) by the highest axis set, else 1
        w, h, d, c = (int(p.get(k, 0)) for k in (0, 1, 11, 2))
        count = w * h * d * c if d else w * h * c if c else w * h if h else w if w else 1
        return [WeightArray("data", count, p.get(21, 1) == 0)]
    return None


# ncnn layer types with param 8 = int8_scale_term (the ones deploytool's int8 quantizes)
INT8_TERM_TYPES = ("Convolution", "ConvolutionDepthWise", "InnerProduct")
INT8_SCALE_TERMS = (1, 2, 101, 102)  # 8=: per-channel / per-tensor weight scales; > 100 requantises


def _with_int8_scales(layer: Layer, arrays: list[WeightArray], per_channel: int) -> list[WeightArray] | None:
    """An int8 layer's (8=int8_scale_term) arrays: its weights and bias, then raw float32 scales: one
    weight scale per output channel (per group for depthwise; one for depthwise 8=2), the bottom
    blob's scale and, when it requantises (8 > 100), the top blob's. None for an unknown term."""
    term = int(layer.get(8, 0))
    if not term:
        return arrays
    if term not in INT8_SCALE_TERMS:
        return None
    if layer.type == "ConvolutionDepthWise" and term % 100 == 2:
        per_channel = 1
    arrays = arrays + [
        WeightArray("weight_scales", per_channel, False),
        WeightArray("bottom_scale", 1, False),
    ]
    return arrays + ([WeightArray("top_scale", 1, False)] if term > 100 else [])


def _align4(n: int) -> int:
    return (n + 3) // 4 * 4


def check_structure(graph: NcnnGraph, source: str = "<param>") -> None:
    """Refuse a graph ncnn would mis-wire: a blob consumed before (or without) being produced, a blob
    name produced twice, more blobs than the header declares. Raises SpecError naming the layer."""
    produced: dict[str, str] = {}
    for layer in graph.layers:
        for blob in layer.bottoms:
            if blob not in produced:
                raise SpecError(
                    f"{source}: layer {layer.name} ({layer.type}) reads blob {blob!r}, which no earlier "
                    "layer produces; the .param is malformed"
                )
        for blob in layer.tops:
            if blob in produced:
                raise SpecError(
                    f"{source}: layer {layer.name} ({layer.type}) produces blob {blob!r}, which layer "
                    f"{produced[blob]} already produces; the .param is malformed"
                )
            produced[blob] = layer.name
    if graph.blob_count is not None and len(produced) > graph.blob_count:
        raise SpecError(
            f"{source}: the header declares {graph.blob_count} blobs but the layers produce {len(produced)}; "
            "the .param is malformed"
        )


# ---------------------------------------------------------------------------------------------
# the .bin: one walker for every reader (the checks before ncnn loads it, int8, the interpreter)

TAG_DTYPES = {TAG_FP32: "float32", TAG_FP32_SCALED: "float32", TAG_FP16: "float16", TAG_INT8: "int8"}


@dataclass(frozen=True)
class BinArray:
    """Where one weight array of a layer lies in the .bin."""

    name: str
    count: int  # elements
    dtype: str  # as stored: "float32", "float16" or "int8"
    start: int  # its first byte (the storage tag's, when it has one)
    offset: int  # the first byte of its values
    end: int  # one past its last byte (after the 4-byte alignment padding)


@dataclass(frozen=True)
class BinLayout:
    """Where each layer's weight arrays lie in a .bin, for the layers before `stopped`."""

    arrays: list[list[BinArray]]  # per layer, in graph order
    walked_to: int  # the byte after those layers' arrays
    stopped: str | None  # why no layer from there on is walked (its loads are not known here)


def walk_bin(graph: NcnnGraph, data: bytes, source: str) -> BinLayout:
    """Where every layer's weight arrays lie in `data` (a .bin), read as ncnn's ModelBin reads it: a
    flagged array's storage tag says fp32 (4 bytes an element), fp16 (2) or int8 (1), after the 4-byte
    tag. From the first layer whose loads (or storage tag) are not known here, only minimums are counted
    (flagged arrays as int8), so only what is certainly wrong is refused: a .bin too short for its
    layers (SpecError naming the first layer that reads past its end) and, when every load is known
    exactly, a .bin with bytes left over."""
    size = len(data)
    pos, walked_to, walked, stopped = 0, 0, [], None
    for layer in graph.layers:
        wanted = weight_arrays(layer)
        if wanted is None:
            stopped = stopped or f"layer {layer.name} ({layer.type}) loads weights deploytool cannot size"
            continue
        start, found = pos, []
        for array in wanted:
            begin, dtype = pos, "float32"
            if array.flagged:
                readable = stopped is None and pos + 4 <= size
                tag = int.from_bytes(data[pos : pos + 4], "little") if readable else None
                dtype = TAG_DTYPES.get(tag)
                if dtype is None:
                    if tag is not None:
                        stopped = (
                            f"layer {layer.name}'s {array.name} has storage tag {tag:#010x}, which "
                            "deploytool cannot read (fp32, fp16 and int8 are)"
                        )
                    pos += 4 + _align4(array.count)  # the tag, then the smallest storage (int8)
                    continue
                pos += 4
            offset = pos
            pos += _align4(array.count * np.dtype(dtype).itemsize)
            found.append(BinArray(array.name, array.count, dtype, begin, offset, pos))
        if pos > size:
            upto = "up to" if stopped is None else "at least up to"
            raise SpecError(
                f"{source} does not match its .param (too short): layer {layer.name} ({layer.type}) "
                f"reads weights from byte {start} {upto} byte {pos} but the file has {size} bytes; "
                "convert the model again so both files come from one run"
            )
        if stopped is None:
            walked.append(found)
            walked_to = pos
    if stopped is None and pos < size:
        raise SpecError(
            f"{source} does not match its .param: it has {size - pos} bytes more than the layers load "
            f"({pos} of {size}); convert the model again so both files come from one run"
        )
    return BinLayout(walked, walked_to, stopped)


@dataclass(frozen=True)
class NcnnModel:
    """A .param and its .bin, each read once, and where each layer's weights lie in the .bin."""

    param: Path
    bin: Path
    graph: NcnnGraph
    data: bytes
    layout: BinLayout

    def values(self, array: BinArray) -> np.ndarray:
        """An array's values as stored (float32, float16 or int8), a view of `data`."""
        return np.frombuffer(self.data, np.dtype(array.dtype).newbyteorder("<"), array.count, array.offset)


def read_model(param: Path | str, bin: Path | str, graph: NcnnGraph | None = None) -> NcnnModel:
    """Read (unless given) a .param and read its .bin, refusing what ncnn would mis-wire or misread
    (`check_structure`, `walk_bin`) before ncnn sees the files; ncnn crashes on some of them."""
    param, bin = Path(param), Path(bin)
    graph = graph if graph is not None else read_param(param)
    check_structure(graph, str(param))
    if not bin.is_file():
        raise SpecError(f"{bin}: no such .bin file")
    data = bin.read_bytes()
    return NcnnModel(param, bin, graph, data, walk_bin(graph, data, str(bin)))


# ---------------------------------------------------------------------------------------------
# int8: ncnn's arithmetic, and the blobs a requantising model hands out as int8 values


def round_half_away(x: np.ndarray) -> np.ndarray:
    return np.sign(x) * np.floor(np.abs(x) + 0.5)  # C's roundf, as ncnn's float2int8


def int8_levels(scaled: np.ndarray) -> np.ndarray:
    """x * scale on ncnn's int8 grid: rounded half away from zero, clamped to [-127, 127] (float64)."""
    return np.clip(round_half_away(scaled), -127, 127)


def requantized_blobs(model: NcnnModel) -> dict[str, float]:
    """{blob: scale} for the blobs an int8 model holds as int8 values (the output of a requantising
    layer, 8 > 100, and the Split copies of it): ncnn hands them out as those integers, and value / scale
    is the float they stand for. Empty for a model without requantisation."""
    layers = model.graph.layers
    found = {}
    for layer, arrays in zip(layers, model.layout.arrays, strict=False):  # the walked layers
        if int(layer.get(8, 0)) <= 100:
            continue
        scale = float(model.values(arrays[-1])[0])  # the top scale is the last array such a layer loads
        blobs = [layer.tops[0]]
        while blobs:
            blob = blobs.pop()
            found[blob] = scale
            blobs += [t for x in layers if x.type == "Split" and blob in x.bottoms for t in x.tops]
    return found


def as_floats(blobs: dict[str, np.ndarray], requantized: dict[str, float]) -> dict[str, np.ndarray]:
    """Extracted blobs with the requantised ones (int8 values, see `requantized_blobs`) turned back
    into the floats they stand for, so every per-blob comparison sees floats."""
    out = dict(blobs)
    for blob, scale in requantized.items():
        if blob in out and scale:
            out[blob] = out[blob] / np.float32(scale)
    return out
