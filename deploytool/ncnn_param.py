"""Reader for ncnn's text .param format: layers, blobs and their parameters."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

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
    return NcnnGraph(layers, blob_count)


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
# structure and .bin checks, run before ncnn sees the files (ncnn crashes on some malformed graphs)

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


def flagged_bytes(tag: int, count: int) -> int | None:
    """Bytes after the tag, as ncnn's ModelBin reads them; None for a tag this reader does not know."""
    if tag == TAG_FP16:
        return _align4(2 * count)
    if tag == TAG_INT8:
        return _align4(count)
    if tag in (TAG_FP32, TAG_FP32_SCALED):
        return 4 * count
    return None


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


def check_model_bin(graph: NcnnGraph, bin_path: Path | str) -> None:
    """Refuse a .bin too short for the weights its .param's layers load, naming the first layer that
    reads past its end; and, when every layer's loads are known exactly, a .bin with bytes left over.

    Walks the .bin as ncnn's ModelBin does (reading each flagged array's storage tag: fp32 4 bytes an
    element, fp16 2, int8 1, after the 4-byte tag). After a layer whose loads are not known here, only
    minimums are added (flagged arrays as int8), so only what is certainly wrong is refused.
    """
    bin_path = Path(bin_path)
    try:
        size = bin_path.stat().st_size
    except OSError:
        raise SpecError(f"{bin_path}: no such .bin file") from None
    pos, exact = 0, True  # exact: `pos` is where ncnn would read next, not a lower bound
    with open(bin_path, "rb") as fh:
        for layer in graph.layers:
            arrays = weight_arrays(layer)
            if arrays is None:
                exact = False
                continue
            start = pos
            for array in arrays:
                if not array.flagged:
                    pos += 4 * array.count
                elif not exact or pos + 4 > size:
                    pos += 4 + _align4(array.count)  # the tag, then the smallest storage (int8)
                else:
                    fh.seek(pos)
                    tag = int.from_bytes(fh.read(4), "little")
                    nbytes = flagged_bytes(tag, array.count)
                    if nbytes is None:
                        exact = False
                        nbytes = _align4(array.count)
                    pos += 4 + nbytes
            if pos > size:
                upto = "up to" if exact else "at least up to"
                raise SpecError(
                    f"{bin_path} does not match its .param (too short): layer {layer.name} ({layer.type}) "
                    f"reads weights from byte {start} {upto} byte {pos} but the file has {size} bytes; "
                    "convert the model again so both files come from one run"
                )
    if exact and pos < size:
        raise SpecError(
            f"{bin_path} does not match its .param: it has {size - pos} bytes more than the layers load "
            f"({pos} of {size}); convert the model again so both files come from one run"
        )


def check_files(param: Path | str, bin_path: Path | str, graph: NcnnGraph | None = None) -> NcnnGraph:
    """Read (unless given) and check a .param and its .bin before ncnn loads them; returns the graph."""
    graph = graph if graph is not None else read_param(param)
    check_structure(graph, str(param))
    check_model_bin(graph, bin_path)
    return graph
