"""Per-layer parity: compare every blob of an ncnn graph and blame the layer where values first go wrong."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.overrides import TorchFunctionMode

from .atomic import atomic_path
from .interpreter import NcnnInterpreter
from .judge import LAYER_TOLERANCES, MATCH_TOLERANCE, compare_tensors
from .ncnn_param import NcnnGraph
from .registry import is_int8
from .results import LayerRow
from .spec import Tolerance


@dataclass
class LayerResult:
    """One blob of two runs of the same graph, compared (judge.compare_tensors)."""

    blob: str
    layer: str
    layer_type: str
    max_abs: float
    max_rel: float  # elementwise |a - b| / |b|, the largest
    cosine: float
    passed: bool
    required_atol: float  # the smallest atol (added to peak_rtol * peak) that passes at the rtol given
    peak_rel: float  # max |a - b| / max |b|: the error against the blob's range


def _producers(graph: NcnnGraph) -> dict[str, object]:
    return {top: layer for layer in graph.layers for top in layer.tops}


def compare_blobs(
    a: dict[str, np.ndarray],
    b: dict[str, np.ndarray],
    graph: NcnnGraph,
    atol: float,
    rtol: float,
    *,
    peak_rtol: float = 0.0,
) -> list[LayerResult]:
    """Compare the blobs two runs of one graph share, in graph order; b is the reference.

    A blob passes when the shapes agree and every element satisfies
    |a - b| <= atol + rtol * |b| + peak_rtol * max|b|. peak_rtol suits reduced-precision storage
    (fp16), whose error scales with the blob's range rather than with each element.
    """
    producers = _producers(graph)
    tol = Tolerance(atol, rtol, peak_rtol)
    results = []
    for layer in graph.layers:
        for blob in layer.tops:
            if blob not in a or blob not in b:
                continue
            ident = {"backend": "", "reference": "", "input": "", "output": blob}
            c = compare_tensors(np.asarray(b[blob]), np.asarray(a[blob]), tol, **ident)
            owner = producers[blob]
            results.append(
                LayerResult(blob, owner.name, owner.type, c.max_abs, c.max_rel, c.cosine, c.passed,
                            c.min_atol, c.peak_rel)
            )  # fmt: skip
    return results


def first_failure(results: list[LayerResult]) -> LayerResult | None:
    """The first blob in graph order that failed; the layer that wrote it is where the runs part."""
    return next((r for r in results if not r.passed), None)


# ---------------------------------------------------------------------------------------------
# torch against ncnn, by value


@dataclass
class TorchRecord:
    """One tensor seen during torch's eager forward pass."""

    name: str  # module path and op, e.g. "layer3.0.conv1:conv2d#41"; "input", "param:fc.weight"
    value: np.ndarray  # float64, flattened


class _Recorder(TorchFunctionMode):
    """Records the output of every torch function call; module hooks supply the names."""

    def __init__(self):
        super().__init__()
        self.records: list[TorchRecord] = []
        self.scope: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = getattr(func, "__name__", str(func))
        if name not in ("__get__", "__set__", "dim", "size", "numel", "__len__", "__bool__"):
            self._keep(out, f"{self.scope[-1] if self.scope else ''}:{name}")
        return out

    def _keep(self, out, name: str) -> None:
        if isinstance(out, torch.Tensor) and out.is_floating_point() and out.numel() > 0:
            value = out.detach().to(torch.float64).reshape(-1).numpy().copy()
            self.records.append(TorchRecord(f"{name}#{len(self.records)}", value))
        elif isinstance(out, (tuple, list)):
            for i, item in enumerate(out):
                self._keep(item, f"{name}[{i}]")


def record_torch(model: torch.nn.Module, x: torch.Tensor) -> list[TorchRecord]:
    """Every floating-point tensor the eager forward pass of model on x produces, in order.

    A TorchFunctionMode sees every op, including functional ones (torch.cat, +, chunk, softmax,
    arange for anchor grids) that forward hooks on leaf modules would miss; forward pre/post hooks
    only name the module each op ran in. The input and the model's parameters and buffers are
    recorded too, because converters fold constants (e.g. a bias added by hand becomes MemoryData).
    """
    recorder = _Recorder()
    handles = []
    for mod_name, module in model.named_modules():
        label = mod_name or type(model).__name__

        def pre(_m, _inp, label=label):
            recorder.scope.append(label)

        def post(_m, _inp, _out):
            recorder.scope.pop()

        handles.append(module.register_forward_pre_hook(pre))
        handles.append(module.register_forward_hook(post))
    recorder._keep(x, "input")
    try:
        with torch.no_grad(), recorder:
            model(x)
    finally:
        for handle in handles:
            handle.remove()
    for pname, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        recorder._keep(tensor, f"param:{pname}")
    return recorder.records


@dataclass
class BlobMatch:
    """An ncnn blob and the torch tensor that holds the same values, if any."""

    blob: str
    layer: str
    layer_type: str
    torch_op: str | None  # the matching record's name; None when nothing matched
    max_abs: float  # against the matching record, or against the closest same-sized one
    matched: bool
    explained: bool  # matched, or every consumer's outputs are explained (a fused intermediate)


def match_torch(
    blobs: dict[str, np.ndarray],
    graph: NcnnGraph,
    records: list[TorchRecord],
    atol: float = 1e-3,
    rtol: float = 1e-3,
) -> list[BlobMatch]:
    """Match each ncnn blob (graph order) to a torch tensor of the same size and values.

    Values are compared flattened, so the batch axis ncnn drops, reshapes and transposes that torch
    also performs all match. Blobs that ncnn computes but torch never materialises (pnnx splits
    silu into sigmoid and mul, inserts permutes around an op, folds constants) have no match; they
    count as explained when everything computed from them is matched or explained again.
    """
    by_size: dict[int, list[TorchRecord]] = {}
    for rec in records:
        by_size.setdefault(rec.value.size, []).append(rec)
    producers = _producers(graph)
    matches: list[BlobMatch] = []
    for layer in graph.layers:
        for blob in layer.tops:
            if blob not in blobs:
                continue
            value = np.asarray(blobs[blob], dtype=np.float64).reshape(-1)
            best, best_err = None, np.inf
            for rec in by_size.get(value.size, []):
                diff = np.abs(value - rec.value)
                err = float(diff.max())
                if err < best_err:
                    best_err = err
                if np.all(diff <= atol + rtol * np.abs(rec.value)):
                    best = rec
                    best_err = err
                    break
            owner = producers[blob]
            matches.append(
                BlobMatch(
                    blob,
                    owner.name,
                    owner.type,
                    best.name if best else None,
                    best_err,
                    best is not None,
                    False,
                )
            )
    consumers: dict[str, list] = {}
    for layer in graph.layers:
        for b in layer.bottoms:
            consumers.setdefault(b, []).append(layer)
    status = {m.blob: m for m in matches}
    for m in reversed(matches):  # consumers come later in graph order, so they are settled first
        if m.matched:
            m.explained = True
            continue
        outs = [top for layer in consumers.get(m.blob, []) for top in layer.tops if top in status]
        m.explained = bool(outs) and all(status[t].explained for t in outs)
    return matches


def blame(matches: list[BlobMatch], graph: NcnnGraph) -> BlobMatch | None:
    """The first unexplained blob whose layer's inputs are all explained: where ncnn leaves torch."""
    status = {m.blob: m for m in matches}
    producers = _producers(graph)
    for m in matches:
        if m.explained:
            continue
        inputs = producers[m.blob].bottoms
        if all(status[b].explained for b in inputs if b in status):
            return m
    return None


# ---------------------------------------------------------------------------------------------


def scale_layer_weights(
    param: Path | str, bin: Path | str, layer_name: str, factor: float, out_bin: Path | str
) -> Path:
    """Copy bin to out_bin with one layer's weight array multiplied by factor (for fault-injection tests)."""
    rec = NcnnInterpreter(param, bin).weight_record(layer_name, "weight")
    out_bin = Path(out_bin)
    with atomic_path(out_bin) as tmp:
        shutil.copyfile(bin, tmp)
        with open(tmp, "r+b") as f:
            f.seek(rec.offset)
            dtype = np.dtype(rec.dtype).newbyteorder("<")
            data = np.frombuffer(f.read(rec.count * dtype.itemsize), dtype=dtype)
            f.seek(rec.offset)
            f.write((data.astype(np.float64) * factor).astype(dtype).tobytes())
    return out_bin


# ---------------------------------------------------------------------------------------------
# the report `deploytool parity --layerwise` builds from the pieces above


def _layer_by_layer(interpreter, blobs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Each layer's outputs computed by the interpreter from `blobs` (another backend's) as inputs."""
    out = {}
    for layer in interpreter.graph.layers:
        if layer.type == "Input" or not all(b in blobs for b in layer.bottoms):
            continue
        outs = interpreter.run_layer(layer, [blobs[b] for b in layer.bottoms])
        out.update(zip(layer.tops, outs, strict=True))
    return out


def _rows(name: str, graph: NcnnGraph, results: list[LayerResult]) -> list[LayerRow]:
    index = {layer.name: i for i, layer in enumerate(graph.layers)}
    return [
        LayerRow(
            name, index[r.layer], r.blob, r.layer, r.layer_type, r.max_abs, r.passed, peak_rel=r.peak_rel
        )
        for r in results
    ]


def _match_rows(
    name: str, graph: NcnnGraph, matches: list[BlobMatch], blamed: BlobMatch | None
) -> list[LayerRow]:
    index = {layer.name: i for i, layer in enumerate(graph.layers)}
    return [
        LayerRow(name, index[m.layer], m.blob, m.layer, m.layer_type, m.max_abs,
                 m is not blamed and m.explained, torch_op=m.torch_op)
        for m in matches
    ]  # fmt: skip


def layerwise(
    param: Path,
    bin_: Path,
    feed: dict[str, np.ndarray],
    model=None,
    vulkan: bool = False,
    precision: str = "fp32",
    threads: int = 2,
) -> tuple[list[LayerRow], dict[str, LayerRow | None]]:
    """Per-blob comparisons of one input through the graph: ncnn-cpu vs the float64 interpreter
    (kernels), and when given, torch vs ncnn-cpu and torch vs interpreter (the conversion), and
    ncnn-vulkan vs ncnn-cpu. Returns (rows in graph order, {comparison: first failing row or None})."""
    from .backends.ncnn_runner import NcnnRunner, NcnnVulkanRunner

    x = next(iter(feed.values()))
    cpu = NcnnRunner(param, bin_, precision=precision, threads=threads)
    graph = cpu.graph
    ncnn_feed = dict(zip(cpu.input_names, feed.values(), strict=True))
    with cpu:
        cpu_blobs = cpu.extract_all(ncnn_feed)
    interpreter = NcnnInterpreter(param, bin_)
    if is_int8(precision):
        # int8: each layer on ncnn's own input blobs. Run end to end, a float difference far below
        # anything that matters moves a value across an int8 rounding edge, and one step of one
        # input times a large weight cascades (EfficientNet-Lite0: peak_rel 0.26 end to end, 3e-6
        # layer by layer); per layer, each int8 kernel is held to the int8 arithmetic itself
        interp_blobs = _layer_by_layer(interpreter, cpu_blobs)
        name = "ncnn-cpu vs interpreter, per layer"
    else:
        interp_blobs = interpreter.run(ncnn_feed)
        name = "ncnn-cpu vs interpreter"
    peak = LAYER_TOLERANCES[precision].peak_rtol
    rows = _rows(name, graph, compare_blobs(cpu_blobs, interp_blobs, graph, 0.0, 0.0, peak_rtol=peak))
    # an int8 model differs from torch by its quantisation at every int8 layer (what `quantize
    # --explain` measures), and Vulkan's fp16 storage between int8 layers cascades the same way
    # (peak_rel up to 1.0 mid-network on EfficientNet-Lite0, final cosine 0.98): both are judged
    # end to end at the int8 tolerance, not blob by blob
    if model is not None and not is_int8(precision):
        records = record_torch(model, torch.from_numpy(np.ascontiguousarray(x)))
        for name, blobs in (("torch vs ncnn-cpu", cpu_blobs), ("torch vs interpreter", interp_blobs)):
            matches = match_torch(blobs, graph, records, MATCH_TOLERANCE.atol, MATCH_TOLERANCE.rtol)
            rows += _match_rows(name, graph, matches, blame(matches, graph))
    if vulkan and not is_int8(precision):
        gpu = NcnnVulkanRunner(param, bin_, precision=precision, threads=threads)
        with gpu:
            gpu_blobs = gpu.extract_all(ncnn_feed)
        storage = LAYER_TOLERANCES["fp16"].peak_rtol  # Vulkan keeps fp16 storage at every precision
        rows += _rows(
            "ncnn-vulkan vs ncnn-cpu",
            graph,
            compare_blobs(gpu_blobs, cpu_blobs, graph, 0.0, 0.0, peak_rtol=storage),
        )
    first: dict[str, LayerRow | None] = {}
    for row in rows:
        first.setdefault(row.comparison, None)
        if not row.passed and first[row.comparison] is None:
            first[row.comparison] = row
    return rows, first
