"""Facts around the timings: the machine, parameter and MAC counts, file sizes."""

from __future__ import annotations

import math
import os
from pathlib import Path

from ..ncnn_param import read_param
from ..registry import Artifacts, RunnerConfig, get_backend
from ..spec import ModelSpec
from .variants import BASELINE

# the SIMD flags that pick ncnn's and ONNX Runtime's fp16/bf16/int8 kernels (and so their rounding)
CPU_FLAGS = (
    "avx2", "fma", "f16c", "avx_vnni", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_bf16",
    "amx_int8",
)  # fmt: skip
MAC_LAYERS = (
    "Convolution",
    "Convolution1D",
    "Convolution3D",
    "ConvolutionDepthWise",
    "ConvolutionDepthWise1D",
    "ConvolutionDepthWise3D",
    "InnerProduct",
    "Deconvolution",
    "DeconvolutionDepthWise",
    "Gemm",
    "MatMul",
)


def machine_info() -> dict:
    """CPU model, core count, the SIMD flags that decide ncnn's and ORT's kernels, the Vulkan device."""
    first: dict[str, str] = {}  # the first processor's fields
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            first.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    flags = set(first.get("flags", "").split())
    model = first.get("model name")
    if model and "cpu family" in first:  # a virtual CPU's name can be as vague as "Intel(R) Xeon(R)"
        family, number, stepping = first["cpu family"], first.get("model"), first.get("stepping")
        model += f" (family {family}, model {number}, stepping {stepping})"
    info: dict = {
        "cpu": model,
        "cores": os.cpu_count(),
        "flags": {f: f in flags for f in CPU_FLAGS},
        "ncnn_cpu_support": {},
        "vulkan_device": None,
    }
    try:
        import ncnn

        from ..backends.ncnn_runner import vulkan_device_name

        info["ncnn_cpu_support"] = {
            n[len("cpu_support_") :]: bool(getattr(ncnn, n)())
            for n in dir(ncnn)
            if n.startswith("cpu_support_")
        }
        info["vulkan_device"] = vulkan_device_name()
    except ImportError:
        pass
    return info


def count_parameters(model) -> int:
    return int(sum(p.numel() for p in model.parameters()))


def count_macs(graph, shapes: dict[str, tuple[int, ...]]) -> dict:
    """Multiply-accumulates of the .param graph's Convolution/ConvolutionDepthWise/InnerProduct/Gemm
    (and Deconvolution, MatMul) layers, from each layer's weight_data_size and its blobs' shapes
    (`shapes`: blob -> ncnn Mat shape). Elementwise layers (ReLU, add, pooling, folded BatchNorm) are
    not counted."""
    by_type: dict[str, int] = {}
    skipped: list[str] = []
    for layer in graph.layers:
        if layer.type not in MAC_LAYERS:
            continue
        out = shapes.get(layer.tops[0]) if layer.tops else None
        inp = shapes.get(layer.bottoms[0]) if layer.bottoms else None
        if out is None or inp is None:
            skipped.append(layer.name)
            continue
        out_n, in_n = math.prod(out), math.prod(inp)
        if layer.type in ("Gemm", "MatMul"):
            trans_a = layer.get(2, 0) if layer.type == "Gemm" else 0
            k = layer.get(9, 0) if layer.type == "Gemm" else 0
            k = k or (inp[-2] if trans_a and len(inp) > 1 else inp[-1])
            macs = out_n * k
        elif layer.type.startswith("Deconvolution"):
            weights = layer.get(6, 0)
            macs = weights * (in_n // max(inp[0], 1))  # every input pixel scatters one kernel per channel
        else:
            weights = layer.get(2 if layer.type == "InnerProduct" else 6, 0)
            macs = weights * (out_n // max(layer.get(0, 1), 1))  # weight count x output positions
        by_type[layer.type] = by_type.get(layer.type, 0) + int(macs)
    total = sum(by_type.values())
    return {
        "macs": total,
        "flops": 2 * total,
        "by_type": by_type,
        "skipped_layers": skipped,
        "method": "counted from the ncnn .param graph: weight_data_size x output positions per "
        "Convolution/ConvolutionDepthWise/InnerProduct (Gemm/MatMul: output elements x K), blob shapes "
        f"from one {BASELINE.backend} {BASELINE.precision} extraction; FLOPs = 2 x MACs; elementwise "
        "layers not counted",
    }


def blob_shapes(spec: ModelSpec, art: Artifacts, feed: dict) -> dict[str, tuple[int, ...]]:
    """The shape of every blob of the .param graph on `feed`, from the baseline variant's runner."""
    config = RunnerConfig((spec.input_name,), tuple(spec.output_names), BASELINE.precision, threads=1)
    with get_backend(BASELINE.backend).create(art, config) as runner:
        blobs = runner.extract_all(feed)
    return {k: tuple(v.shape) for k, v in blobs.items()}


def model_info(spec: ModelSpec, model, art: Artifacts, feed: dict) -> dict:
    """Parameters of the eager model; MACs and FLOPs from the ncnn graph when there is one."""
    info = {"parameters": count_parameters(model), "macs": None, "flops": None}
    if art.ncnn_param is not None:
        try:
            info.update(count_macs(read_param(art.ncnn_param), blob_shapes(spec, art, feed)))
        except Exception as exc:  # counting is informative only; a failure must not lose the timings
            info["macs_error"] = f"{type(exc).__name__}: {exc}"
    return info


def file_entry(path: Path | None) -> dict | None:
    """{"path", "bytes"} of a file that exists, else None."""
    if path is None or not Path(path).is_file():
        return None
    return {"path": str(path), "bytes": Path(path).stat().st_size}
