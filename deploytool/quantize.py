"""int8 quantisation for ncnn, written by deploytool itself (ncnn's own tools are not in its wheel).

Three parts, each interoperating with ncnn's tools:

- calibration tables in the text format ncnn2table writes and ncnn2int8 reads (`write_table`,
  `read_table`): one line `LAYER_param_0 s1 s2 ... ` of weight scales per int8 layer, then one line
  `LAYER s ` of the scale of that layer's bottom blob; a line starting with `#` keeps its layer fp32;
- scales: per output channel (per group for depthwise) for weights (`weight_scales`), per tensor for
  activations from fp32 ncnn runs over calibration inputs (`calibrate`: minmax, ncnn2table's KL search
  over a 2048-bin histogram of |x|, or its ACIQ gaussian clip);
- the int8 model (`quantize_model`): Convolution / ConvolutionDepthWise / InnerProduct get `8=`
  (int8_scale_term) in the .param and, in the .bin, int8 weights (storage tag 0x000D4B38) followed by
  the bias, the weight scales and the bottom-blob scale as raw float32, in the order ncnn's load_model
  reads them. Every other layer line and every other byte of the .bin is copied unchanged.

Scales follow ncnn's convention: int8 = round(x * scale), clamped to [-127, 127].
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import SpecError
from .ncnn_param import (
    TAG_FP16,
    TAG_FP32,
    TAG_FP32_SCALED,
    TAG_INT8,
    Layer,
    NcnnGraph,
    flagged_bytes,
    read_param,
    weight_arrays,
)

INT8_TYPES = ("Convolution", "ConvolutionDepthWise", "InnerProduct")
METHODS = ("kl", "aciq", "minmax")
NUM_BINS = 2048  # ncnn2table's histogram of |x|
TARGET_BINS = 128  # int8's positive levels
KL_EPS = 1e-4
PARAM_SUFFIX = "_param_"
# ACIQ's optimal clipping (in standard deviations of a gaussian) for 1..8 bits, as the paper tabulates
ACIQ_ALPHA = (0.0, 1.71063519, 2.15159277, 2.55913646, 2.93620062, 3.28691474, 3.6151146, 3.92403714)


# ---------------------------------------------------------------------------------------------
# the calibration table


@dataclass
class CalibrationTable:
    """Scales by layer name. `weight_scales[layer]`: one per output channel (per group for depthwise);
    `blob_scales[layer]`: the scale of the layer's first bottom blob (one value, as ncnn2table writes);
    `fp32_layers`: layers whose lines are commented out with `#` (kept fp32; their scales are kept too).
    `extra`: other `LAYER_param_N` lines (Embed, MultiHeadAttention, RNN... in ncnn2table), kept for the
    round trip; `order`: line keys in file order when read from a file (writing keeps it); `commented`:
    the keys whose lines were commented (a layer in `fp32_layers` without any has all its lines commented)."""

    weight_scales: dict[str, np.ndarray] = field(default_factory=dict)
    blob_scales: dict[str, np.ndarray] = field(default_factory=dict)
    fp32_layers: set[str] = field(default_factory=set)
    extra: dict[str, np.ndarray] = field(default_factory=dict)
    order: list[str] | None = None
    commented: set[str] = field(default_factory=set)  # line keys read with `#` (for the exact round trip)

    def layers(self) -> list[str]:
        """Layers with a weight or bottom-blob scale, weight lines' order first."""
        return list(dict.fromkeys([*self.weight_scales, *self.blob_scales]))

    def _entries(self) -> dict[str, np.ndarray]:
        entries = {f"{name}{PARAM_SUFFIX}0": s for name, s in self.weight_scales.items()}
        entries.update(self.blob_scales)
        entries.update(self.extra)
        return entries

    def validate(self, graph: NcnnGraph, source: str = "calibration table") -> None:
        """Refuse scales for layers the graph does not have or cannot quantise, scale counts that do not
        match the layer, and scales that are not finite and positive."""
        by_name = {layer.name: layer for layer in graph.layers}
        for name in sorted({*self.layers(), *self.fp32_layers}):
            layer = by_name.get(name)
            if layer is None:
                raise SpecError(f"{source}: layer {name!r} is not in the model's .param")
            if layer.type not in INT8_TYPES:
                raise SpecError(
                    f"{source}: layer {name} is a {layer.type}; only {', '.join(INT8_TYPES)} are quantised"
                )
        for name, scales in self.weight_scales.items():
            want = scale_count(by_name[name])
            if len(scales) != want:
                raise SpecError(
                    f"{source}: {name}{PARAM_SUFFIX}0 has {len(scales)} weight scales; "
                    f"{by_name[name].type} {name} needs {want}"
                )
        for name, scales in self.blob_scales.items():
            if len(scales) != 1:
                raise SpecError(f"{source}: {name} has {len(scales)} bottom-blob scales; ncnn needs 1")
        for key, scales in self._entries().items():
            if not np.all(np.isfinite(scales)) or np.any(scales <= 0):
                raise SpecError(f"{source}: {key} has a scale that is not a finite positive number")


def _format_line(key: str, scales: np.ndarray, commented: bool) -> str:
    values = "".join(f"{float(v):f} " for v in np.asarray(scales, dtype=np.float32))  # ncnn2table's "%f "
    return f"{'#' if commented else ''}{key} {values}\n"


def _layer_of_key(key: str) -> str:
    head, sep, tail = key.rpartition(PARAM_SUFFIX)
    return head if sep and tail.isdigit() else key


def write_table(path: Path | str, table: CalibrationTable) -> None:
    """Write `table` as ncnn2table does: weight lines, then bottom-blob lines, then other lines (or in
    the order the table was read in); a layer in `fp32_layers` has its lines commented out with `#`."""
    entries = table._entries()
    keys = [k for k in table.order or [] if k in entries]
    keys += [k for k in entries if k not in keys]
    marked = {_layer_of_key(k) for k in table.commented}

    def commented(key: str) -> bool:
        layer = _layer_of_key(key)
        return layer in table.fp32_layers and (key in table.commented or layer not in marked)

    text = "".join(_format_line(k, entries[k], commented(k)) for k in keys)
    Path(path).write_text(text)


def parse_table(text: str, source: str = "<table>") -> CalibrationTable:
    """Parse the text of an ncnn2table calibration table; SpecError names a malformed line."""
    table = CalibrationTable(order=[])
    for lineno, line in enumerate(text.splitlines(), start=1):
        tokens = line.split()
        if not tokens or tokens == ["#"]:
            continue
        key, commented = tokens[0], tokens[0].startswith("#")
        if commented:
            key = key[1:]
        where = f"{source}:{lineno}"
        if not key or len(tokens) < 2:
            raise SpecError(f"{where}: expected `NAME scale ...`, got {line.strip()!r}")
        try:
            scales = np.array([float(t) for t in tokens[1:]], dtype=np.float32)
        except ValueError:
            raise SpecError(f"{where}: {key} has a scale that is not a number: {line.strip()!r}") from None
        if key in table.order:
            raise SpecError(f"{where}: {key} appears twice in the table")
        table.order.append(key)
        layer = _layer_of_key(key)
        if key.endswith(f"{PARAM_SUFFIX}0") and layer != key:
            table.weight_scales[layer] = scales
        elif layer != key:
            table.extra[key] = scales
        else:
            table.blob_scales[key] = scales
        if commented:
            table.fp32_layers.add(layer)
            table.commented.add(key)
    return table


def read_table(path: Path | str, graph: NcnnGraph | None = None) -> CalibrationTable:
    """Read an ncnn2table calibration table; with `graph`, also validate it against the model."""
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"{path}: no such calibration table")
    try:
        text = path.read_text()
    except UnicodeDecodeError:
        raise SpecError(f"{path} is not a calibration table (not text)") from None
    table = parse_table(text, str(path))
    if graph is not None:
        table.validate(graph, str(path))
    return table


# ---------------------------------------------------------------------------------------------
# the .bin, layer by layer


@dataclass
class _Array:
    name: str
    count: int
    flagged: bool
    start: int  # first byte (the tag, when flagged)
    end: int  # one past the last byte (after the 4-byte alignment padding)
    tag: int | None


@dataclass
class _BinLayout:
    spans: dict[str, list[_Array]]  # layer name -> its arrays, for the layers walked
    walked_to: int  # bytes of the .bin that belong to walked layers
    stopped_at: Layer | None  # the first layer whose loads are not known (nothing after it is walked)


def _walk_bin(graph: NcnnGraph, data: bytes, source: str) -> _BinLayout:
    pos, spans = 0, {}
    for layer in graph.layers:
        arrays = weight_arrays(layer)
        if arrays is None:
            return _BinLayout(spans, pos, layer)
        found = []
        for array in arrays:
            start, tag = pos, None
            if array.flagged:
                if pos + 4 > len(data):
                    raise SpecError(f"{source} is too short for layer {layer.name}'s {array.name}")
                tag = int.from_bytes(data[pos : pos + 4], "little")
                nbytes = flagged_bytes(tag, array.count)  # as ncnn's ModelBin reads it (and check_model_bin)
                if nbytes is None:
                    raise SpecError(
                        f"{source}: layer {layer.name}'s {array.name} has storage tag {tag:#010x}, which "
                        "deploytool cannot read (fp32, fp16 and int8 are supported)"
                    )
                pos += 4 + nbytes
            else:
                pos += 4 * array.count
            if pos > len(data):
                raise SpecError(f"{source} is too short for layer {layer.name}'s {array.name}")
            found.append(_Array(array.name, array.count, array.flagged, start, pos, tag))
        spans[layer.name] = found
    return _BinLayout(spans, pos, None)


def _decode(data: bytes, array: _Array, where: str) -> np.ndarray:
    if not array.flagged:
        return np.frombuffer(data, np.float32, array.count, array.start).astype(np.float32)
    if array.tag == TAG_FP16:
        return np.frombuffer(data, np.float16, array.count, array.start + 4).astype(np.float32)
    if array.tag in (TAG_FP32, TAG_FP32_SCALED):
        return np.frombuffer(data, np.float32, array.count, array.start + 4).astype(np.float32)
    raise SpecError(f"{where}: the weights are int8 already; quantise the fp32 model")


def _is_quantisable(layer: Layer) -> bool:
    """An fp32 Convolution / ConvolutionDepthWise / InnerProduct with its weights in the .bin."""
    return layer.type in INT8_TYPES and not layer.get(8, 0) and not layer.get(19, 0)


def scale_count(layer: Layer) -> int:
    """How many weight scales ncnn loads for an int8 layer: num_output, or group for depthwise."""
    if layer.type == "ConvolutionDepthWise":
        return int(layer.get(7, 1))
    return int(layer.get(0, 0))


def _uses_6bit(layer: Layer) -> bool:
    """ncnn2table keeps 3x3, dilation 1, stride 1 Convolution weights to 6 bits (31 levels): ncnn's int8
    Winograd F(4,3) kernels need the headroom. Not for depthwise or InnerProduct."""
    if layer.type != "Convolution":
        return False
    kw = int(layer.get(1, 0))
    kh = int(layer.get(11, kw))
    dw = int(layer.get(2, 1))
    dh = int(layer.get(12, dw))
    sw = int(layer.get(3, 1))
    sh = int(layer.get(13, sw))
    return (kw, kh, dw, dh, sw, sh) == (3, 3, 1, 1, 1, 1)


def aciq_gaussian_clip(absmax: float, n: int, bits: int = 8) -> float:
    """ACIQ's clipping threshold for `n` values with this absmax, modelled as a gaussian whose standard
    deviation is estimated from the expected range of n samples (as ncnn2table estimates it)."""
    gaussian_const = (0.5 * 0.35) * (1 + math.sqrt(math.pi * math.log(4)))
    std = (absmax * 2 * gaussian_const) / math.sqrt(2 * math.log(max(n, 2)))
    return ACIQ_ALPHA[bits - 1] * std


def _read_model(param: Path | str, bin: Path | str) -> tuple[NcnnGraph, bytes, _BinLayout]:
    graph = read_param(param)
    bin = Path(bin)
    if not bin.is_file():
        raise SpecError(f"{bin}: no such .bin file")
    data = bin.read_bytes()
    return graph, data, _walk_bin(graph, data, str(bin))


def _layer_weights(graph: NcnnGraph, data: bytes, layout: _BinLayout, bin: Path | str) -> dict:
    """fp32 weights of every quantisable layer, by name, reshaped (scale_count, -1)."""
    weights = {}
    for layer in graph.layers:
        if not _is_quantisable(layer):
            continue
        if layer.name not in layout.spans:
            stop = layout.stopped_at
            raise SpecError(
                f"{bin}: cannot find layer {layer.name}'s weights: layer {stop.name} ({stop.type}) before "
                "it loads weights deploytool cannot size"
            )
        array = layout.spans[layer.name][0]
        w = _decode(data, array, f"{bin}: layer {layer.name}")
        weights[layer.name] = w.reshape(scale_count(layer), -1)
    return weights


def weight_scales(param: Path | str, bin: Path | str, method: str = "absmax") -> dict[str, np.ndarray]:
    """Weight scales of every fp32 Convolution / ConvolutionDepthWise / InnerProduct, per output channel
    (per group for depthwise), as ncnn2table computes them: 127/absmax (31/absmax for 3x3 stride-1
    dilation-1 convolutions), or with method="aciq" the ACIQ clip instead of absmax. A channel of zeros
    gets scale 1."""
    if method not in ("absmax", "aciq"):
        raise SpecError(f"unknown weight scale method {method!r}; use absmax or aciq")
    graph, data, layout = _read_model(param, bin)
    by_name = {layer.name: layer for layer in graph.layers}
    scales = {}
    for name, w in _layer_weights(graph, data, layout, bin).items():
        six = _uses_6bit(by_name[name])
        levels = 31.0 if six else 127.0
        absmax = np.abs(w).max(axis=1).astype(np.float64)
        if method == "aciq":
            absmax = np.array([aciq_gaussian_clip(a, w.shape[1], 6 if six else 8) for a in absmax])
        s = np.where(absmax > 0, levels / np.where(absmax > 0, absmax, 1.0), 1.0)
        scales[name] = s.astype(np.float32)
    return scales


# ---------------------------------------------------------------------------------------------
# activation calibration


def kl_threshold_bin(histogram: np.ndarray, target: int = TARGET_BINS) -> int:
    """ncnn2table's search: the number of histogram bins T (target <= T < len) whose clipped
    distribution (outliers folded into bin T-1) loses least information, by KL divergence, when
    merged into `target` bins and expanded back. Merging averages the source bins each target bin
    overlaps (fractionally at its edges); expanding spreads each average back over the same overlap.

    One candidate more than ncnn2table: T = len (no clipping). ncnn2table always clips, so an input
    whose |x| sits at its maximum (a constant blob, such as the ones a YOLO head turns into its grid
    with a convolution) was clipped to 1/16 of its value; with the candidate, such an input keeps its
    range, and an ordinary distribution still has its tail clipped (the no-clip KL is not lower)."""
    h = np.asarray(histogram, dtype=np.float64)
    total = h.sum()
    if total <= 0:
        return len(h)
    p = h / total
    cum = np.concatenate([[0.0], np.cumsum(p)])  # cum[k] = mass of bins < k

    def integral(c: np.ndarray, values: np.ndarray, x: np.ndarray, width: float = 1.0) -> np.ndarray:
        # integral over [0, x) of the step function with `values` on bins of `width`
        i = np.minimum(np.floor(x / width).astype(np.int64), len(values) - 1)
        return c[i] * width + (x - i * width) * values[i]

    best, best_kl = target, math.inf
    for threshold in range(target, len(p) + 1):
        clip = p[:threshold] + KL_EPS
        clip[-1] += p[threshold:].sum()
        width = threshold / target
        edges = np.arange(target + 1) * width
        q = (integral(cum, p, edges[1:]) - integral(cum, p, edges[:-1])) / width
        qcum = np.concatenate([[0.0], np.cumsum(q)])
        k = np.arange(threshold + 1, dtype=np.float64)
        expand = integral(qcum, q, k[1:], width) - integral(qcum, q, k[:-1], width) + KL_EPS
        kl = float(np.sum(clip * np.log(clip / expand)))
        if kl < best_kl:
            best_kl, best = kl, threshold
    return best


@dataclass
class _BlobStat:
    absmax: float = 0.0
    count: int = 0  # elements of one sample's blob (ACIQ's N)
    histogram: np.ndarray | None = None


def calibration_layers(graph: NcnnGraph) -> list[Layer]:
    """The layers calibration computes scales for (fp32 Convolution, ConvolutionDepthWise, InnerProduct
    with weights in the .bin), in graph order."""
    return [layer for layer in graph.layers if _is_quantisable(layer)]


FeedSource = Sequence[dict[str, np.ndarray]] | Callable[[], Iterable[dict[str, np.ndarray]]]


def _iterate(feeds: FeedSource) -> Iterable[dict[str, np.ndarray]]:
    return feeds() if callable(feeds) else feeds


def calibrate(
    param: Path | str,
    bin: Path | str,
    feeds: FeedSource,
    method: str = "kl",
    threads: int = 2,
    isolate: bool | None = None,
) -> CalibrationTable:
    """Weight scales and bottom-blob scales for every int8-able layer, from fp32 ncnn runs over `feeds`
    (input dicts preprocessed as the spec says, e.g. `calibration_feeds(spec, images)`; a sequence, or
    a function returning a fresh iterable, since kl reads them twice: absmax, then the histogram).
    Memory stays bounded: one input's blobs at a time, one 2048-bin histogram per layer."""
    from .backends.ncnn_runner import NcnnRunner

    if method not in METHODS:
        raise SpecError(f"unknown calibration method {method!r}; use one of {', '.join(METHODS)}")
    graph = read_param(param)
    layers = calibration_layers(graph)
    if not layers:
        raise SpecError(f"{param} has no Convolution, ConvolutionDepthWise or InnerProduct layer to quantise")
    table = CalibrationTable(
        weight_scales=weight_scales(param, bin, "aciq" if method == "aciq" else "absmax")
    )
    stats = {layer.bottoms[0]: _BlobStat() for layer in layers}

    with NcnnRunner(Path(param), Path(bin), precision="fp32", threads=threads, isolate=isolate) as runner:

        def blobs_of_each_input():
            n = 0
            for feed in _iterate(feeds):
                blobs = runner.extract_all(feed)
                missing = [b for b in stats if b not in blobs]
                if missing:
                    raise SpecError(f"ncnn could not extract blob {missing[0]!r} from {param}")
                n += 1
                yield {b: np.abs(blobs[b]) for b in stats}
            if n == 0:
                raise SpecError("calibration needs at least one input; none was given")

        for blobs in blobs_of_each_input():
            for name, x in blobs.items():
                stats[name].absmax = max(stats[name].absmax, float(x.max(initial=0.0)))
                stats[name].count = x.size
        if method == "kl":
            for st in stats.values():
                st.histogram = np.zeros(NUM_BINS, dtype=np.int64)
            for blobs in blobs_of_each_input():
                for name, x in blobs.items():
                    st = stats[name]
                    if st.absmax <= 0:
                        continue
                    x = x[x != 0]  # ncnn2table leaves exact zeros (ReLU's) out of the histogram
                    index = np.minimum((x / st.absmax * NUM_BINS).astype(np.int64), NUM_BINS - 1)
                    st.histogram += np.bincount(index, minlength=NUM_BINS)

    for layer in layers:
        st = stats[layer.bottoms[0]]
        if st.absmax <= 0:
            scale = 1.0
        elif method == "minmax":
            scale = 127.0 / st.absmax
        elif method == "aciq":
            scale = 127.0 / aciq_gaussian_clip(st.absmax, st.count)
        else:
            threshold = (kl_threshold_bin(st.histogram) + 0.5) * st.absmax / NUM_BINS
            scale = 127.0 / threshold
        table.blob_scales[layer.name] = np.array([scale], dtype=np.float32)
    return table


def calibration_feeds(spec, images: Sequence[Path | str]) -> Callable[[], Iterable[dict[str, np.ndarray]]]:
    """The calibration photos preprocessed by the spec's own preprocessing, one at a time (a function
    returning a fresh generator, so `calibrate` can read them twice without holding them all)."""
    from .inputs import collect_images, preprocess, read_image

    paths = collect_images([Path(p) for p in images])
    height, width = spec.input_shape[2], spec.input_shape[3]

    def feeds():
        for path in paths:
            x, _ = preprocess(read_image(path), spec.preprocess, width, height)
            yield {spec.input_name: x}

    return feeds


# ---------------------------------------------------------------------------------------------
# the int8 .param/.bin


def round_half_away(x: np.ndarray) -> np.ndarray:
    return np.sign(x) * np.floor(np.abs(x) + 0.5)  # C's roundf, as ncnn's float2int8


def int8_levels(scaled: np.ndarray) -> np.ndarray:
    """x * scale on ncnn's int8 grid: rounded half away from zero, clamped to [-127, 127] (float64)."""
    return np.clip(round_half_away(scaled), -127, 127)


def quantize_weights(w: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """int8 weights as ncnn's quantize_to_int8: round(w * scale) per row, clamped to [-127, 127]."""
    scaled = w.astype(np.float64) * scales.astype(np.float32).astype(np.float64)[:, None]
    return int8_levels(scaled).astype(np.int8)


_INT8_TERM = re.compile(r"(?<=\s)8=\S+")


def _set_int8_term(line: str, value: int) -> str:
    body = line.rstrip("\r\n")
    ending = line[len(body) :]
    if _INT8_TERM.search(body):
        body = _INT8_TERM.sub(f"8={value}", body, count=1)
    else:
        body = f"{body.rstrip()} 8={value}"
    return body + ending


CONV_TYPES = ("Convolution", "ConvolutionDepthWise")


def requantize_targets(graph: NcnnGraph, int8: set[str], scales: dict[str, np.ndarray]) -> dict[str, str]:
    """{int8 convolution: the int8 convolution it hands int8 values to} where ncnn2int8 fuses
    requantisation: a Convolution / ConvolutionDepthWise whose output feeds only int8 convolutions,
    directly or through a Split, all reading it at one scale. Such a layer writes 8=10x and that
    scale as its top scale; its output blob then holds int8 values (see `requantized_blobs`)."""
    consumers: dict[str, list[Layer]] = {}
    for layer in graph.layers:
        for blob in layer.bottoms:
            consumers.setdefault(blob, []).append(layer)

    def readers(blob: str) -> list[Layer] | None:
        users = consumers.get(blob, [])
        if len(users) != 1:
            return None
        if users[0].type == "Split":
            found = [readers(top) for top in users[0].tops]
            return None if any(f is None for f in found) else [x for f in found for x in f]
        return users

    targets = {}
    for layer in graph.layers:
        if layer.type not in CONV_TYPES or layer.name not in int8:
            continue
        users = readers(layer.tops[0])
        if not users or any(
            u.type not in CONV_TYPES or u.name not in int8 or len(u.bottoms) != 1 for u in users
        ):
            continue
        if len({float(scales[u.name][0]) for u in users}) == 1:
            targets[layer.name] = users[0].name
    return targets


def requantized_blobs(param: Path | str, bin: Path | str) -> dict[str, float]:
    """{blob: scale} for the blobs an int8 model holds as int8 values (the output of a requantising
    layer, 8 > 100, and the Split copies of it): ncnn hands them out as those integers, and value / scale
    is the float they stand for. Empty for a model without requantisation."""
    graph = read_param(param)
    requant = [layer for layer in graph.layers if int(layer.get(8, 0)) > 100]
    if not requant:
        return {}
    data = Path(bin).read_bytes()
    layout = _walk_bin(graph, data, str(bin))
    found = {}
    for layer in requant:
        if layer.name not in layout.spans:
            continue
        top = layout.spans[layer.name][-1]  # the top scale is the last array such a layer loads
        scale = float(np.frombuffer(data, np.float32, 1, top.start)[0])
        blobs = [layer.tops[0]]
        while blobs:
            blob = blobs.pop()
            found[blob] = scale
            blobs += [t for x in graph.layers if x.type == "Split" and blob in x.bottoms for t in x.tops]
    return found


def as_floats(blobs: dict[str, np.ndarray], param: Path | str, bin: Path | str) -> dict[str, np.ndarray]:
    """Extracted blobs with the requantised ones (int8 values, `requantized_blobs`) turned back into the
    floats they stand for, so every per-blob comparison sees floats."""
    out = dict(blobs)
    for blob, scale in requantized_blobs(param, bin).items():
        if blob in out and scale:
            out[blob] = out[blob] / np.float32(scale)
    return out


def quantize_model(
    param: Path | str,
    bin: Path | str,
    table: CalibrationTable,
    out_param: Path | str,
    out_bin: Path | str,
    keep_fp32: Iterable[str] = (),
    requantize: bool = True,
) -> list[str]:
    """Write the int8 model: every Convolution / ConvolutionDepthWise / InnerProduct that has a weight
    and a bottom-blob scale in `table` and is neither commented out there nor in `keep_fp32` gets int8
    weights and ncnn's scale arrays; everything else is copied byte for byte. With `requantize`, as
    ncnn2int8 does, an int8 convolution feeding only int8 convolutions hands them int8 values directly
    (`requantize_targets`: same outputs, fewer passes; EfficientNet-Lite0 14 % faster on x86).
    Returns the names of the layers quantised, in graph order."""
    graph, data, layout = _read_model(param, bin)
    table.validate(graph)
    by_name = {layer.name: layer for layer in graph.layers}
    keep = set(keep_fp32)
    unknown = sorted(keep - set(by_name))
    if unknown:
        raise SpecError(f"--keep-fp32: layer {unknown[0]!r} is not in {param}")
    keep |= table.fp32_layers
    already = [
        x.name for x in graph.layers if x.name in table.blob_scales and x.name not in keep and x.get(8, 0)
    ]
    if already:
        raise SpecError(f"{param}: layer {already[0]} is int8 already; quantise the fp32 model")
    chosen = [
        layer
        for layer in graph.layers
        if _is_quantisable(layer)
        and layer.name in table.weight_scales
        and layer.name in table.blob_scales
        and layer.name not in keep
    ]
    weights = _layer_weights(graph, data, layout, bin) if chosen else {}

    names = {layer.name for layer in chosen}
    fused = requantize_targets(graph, names, table.blob_scales) if requantize else {}
    out = bytearray()
    for layer in graph.layers:
        if layer.name not in layout.spans:
            break
        arrays = layout.spans[layer.name]
        if layer.name not in names:
            if arrays:
                out += data[arrays[0].start : arrays[-1].end]
            continue
        w_scales = table.weight_scales[layer.name].astype(np.float32)
        q = quantize_weights(weights[layer.name], w_scales).reshape(-1)
        out += TAG_INT8.to_bytes(4, "little") + q.tobytes() + bytes(-len(q) % 4)
        for array in arrays[1:]:  # the bias, raw float32 as it was
            out += data[array.start : array.end]
        out += w_scales.tobytes() + table.blob_scales[layer.name].astype(np.float32)[:1].tobytes()
        if layer.name in fused:
            out += table.blob_scales[fused[layer.name]].astype(np.float32)[:1].tobytes()
    out += data[layout.walked_to :]

    term = {"Convolution": 2, "InnerProduct": 2, "ConvolutionDepthWise": 1}
    lines = Path(param).read_text().splitlines(keepends=True)
    for i, line in enumerate(lines[2:], start=2):
        tokens = line.split()
        if len(tokens) > 1 and tokens[1] in names:
            lines[i] = _set_int8_term(line, term[tokens[0]] + (100 if tokens[1] in fused else 0))
    Path(out_param).write_text("".join(lines))
    Path(out_bin).write_bytes(bytes(out))
    return [layer.name for layer in chosen]
