"""Scales: per output channel for weights (`weight_scales`), per tensor for activations from fp32 ncnn
runs over calibration inputs (`calibrate`: minmax, ncnn2table's KL search over a 2048-bin histogram of
|x|, or its ACIQ gaussian clip)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from ..backends.ncnn_runner import NcnnRunner
from ..errors import SpecError
from ..ncnn_param import INT8_TERM_TYPES, Layer, NcnnGraph, NcnnModel
from .table import CalibrationTable, scale_count

METHODS = ("kl", "aciq", "minmax")
NUM_BINS = 2048  # ncnn2table's histogram of |x|
TARGET_BINS = 128  # int8's positive levels
KL_EPS = 1e-4
# ACIQ's optimal clipping (in standard deviations of a gaussian) for 1..8 bits, as the paper tabulates
ACIQ_ALPHA = (0.0, 1.71063519, 2.15159277, 2.55913646, 2.93620062, 3.28691474, 3.6151146, 3.92403714)


def is_quantisable(layer: Layer) -> bool:
    """An fp32 Convolution / ConvolutionDepthWise / InnerProduct with its weights in the .bin."""
    return layer.type in INT8_TERM_TYPES and not layer.get(8, 0) and not layer.get(19, 0)


def calibration_layers(graph: NcnnGraph) -> list[Layer]:
    """The layers calibration computes scales for (fp32 Convolution, ConvolutionDepthWise, InnerProduct
    with weights in the .bin), in graph order."""
    return [layer for layer in graph.layers if is_quantisable(layer)]


def layer_weights(model: NcnnModel) -> dict[str, np.ndarray]:
    """fp32 weights of every quantisable layer, by name, reshaped (scale_count, -1)."""
    walked = model.layout.arrays
    weights = {}
    for index, layer in enumerate(model.graph.layers):
        if not is_quantisable(layer):
            continue
        if index >= len(walked):
            raise SpecError(f"{model.bin}: cannot find layer {layer.name}'s weights: {model.layout.stopped}")
        array = walked[index][0]
        if array.dtype == "int8":
            raise SpecError(
                f"{model.bin}: layer {layer.name}'s weights are int8 already; quantise the fp32 model"
            )
        weights[layer.name] = model.values(array).astype(np.float32).reshape(scale_count(layer), -1)
    return weights


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


def weight_scales(model: NcnnModel, method: str = "absmax") -> dict[str, np.ndarray]:
    """Weight scales of every fp32 Convolution / ConvolutionDepthWise / InnerProduct, per output channel
    (per group for depthwise), as ncnn2table computes them: 127/absmax (31/absmax for 3x3 stride-1
    dilation-1 convolutions), or with method="aciq" the ACIQ clip instead of absmax. A channel of zeros
    gets scale 1."""
    if method not in ("absmax", "aciq"):
        raise SpecError(f"unknown weight scale method {method!r}; use absmax or aciq")
    by_name = {layer.name: layer for layer in model.graph.layers}
    scales = {}
    for name, w in layer_weights(model).items():
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


FeedSource = Sequence[dict[str, np.ndarray]] | Callable[[], Iterable[dict[str, np.ndarray]]]


def _iterate(feeds: FeedSource) -> Iterable[dict[str, np.ndarray]]:
    return feeds() if callable(feeds) else feeds


def calibrate(
    model: NcnnModel, feeds: FeedSource, method: str = "kl", threads: int = 2, isolate: bool | None = None
) -> CalibrationTable:
    """Weight scales and bottom-blob scales for every int8-able layer, from fp32 ncnn runs over `feeds`
    (input dicts preprocessed as the spec says, e.g. `inputs.calibration_feeds(spec, images)`; a sequence, or
    a function returning a fresh iterable, since kl reads them twice: absmax, then the histogram).
    Memory stays bounded: one input's blobs at a time, one 2048-bin histogram per layer."""
    if method not in METHODS:
        raise SpecError(f"unknown calibration method {method!r}; use one of {', '.join(METHODS)}")
    layers = calibration_layers(model.graph)
    if not layers:
        raise SpecError(
            f"{model.param} has no Convolution, ConvolutionDepthWise or InnerProduct layer to quantise"
        )
    table = CalibrationTable(weight_scales=weight_scales(model, "aciq" if method == "aciq" else "absmax"))
    stats = {layer.bottoms[0]: _BlobStat() for layer in layers}

    fp32 = NcnnRunner(model.param, model.bin, precision="fp32", threads=threads, isolate=isolate, model=model)
    with fp32 as runner:

        def blobs_of_each_input():
            n = 0
            for feed in _iterate(feeds):
                blobs = runner.extract_all(feed)
                missing = [b for b in stats if b not in blobs]
                if missing:
                    raise SpecError(f"ncnn could not extract blob {missing[0]!r} from {model.param}")
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
