"""Backend registry: names, availability and construction of Runners."""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path

from ..errors import SpecError
from .base import Runner
from .ncnn_cpp import NcnnCppRunner
from .ncnn_runner import NcnnRunner, NcnnVulkanRunner
from .ort_runner import OnnxRuntimeRunner
from .torch_runner import TorchRunner, TorchScriptRunner

REFERENCE = "torch"
RUNNERS: dict[str, type[Runner]] = {
    "torch": TorchRunner,
    "torchscript": TorchScriptRunner,
    "onnxruntime": OnnxRuntimeRunner,
    "ncnn-cpu": NcnnRunner,
    "ncnn-vulkan": NcnnVulkanRunner,
    "ncnn-cpp": NcnnCppRunner,
}
DEFAULT_BACKENDS = ["torch", "onnxruntime", "ncnn-cpu", "ncnn-vulkan"]
NCNN_BACKENDS = ("ncnn-cpu", "ncnn-vulkan", "ncnn-cpp")  # run the converted .param/.bin
PRECISION_BACKENDS = ("ncnn-cpu", "ncnn-vulkan")  # take --ncnn-precision (the C++ runner is fp32)


@dataclass
class Artifacts:
    """What a backend may need: the eager model and the exported/converted files."""

    model: object = None
    torchscript: Path | None = None
    onnx: Path | None = None
    ncnn_param: Path | None = None
    ncnn_bin: Path | None = None
    converter: str | None = None
    converter_log: Path | None = None
    meta: dict | None = None  # meta.json for the runners (ncnn-cpp, bundles)


def parse_backends(text: str | None) -> list[str]:
    """'torch,ncnn-cpu' -> list; unknown names get a 'did you mean'."""
    if text is None:
        return list(DEFAULT_BACKENDS)
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise SpecError("--backends is empty; list backends like torch,onnxruntime,ncnn-cpu")
    for n in names:
        if n not in RUNNERS:
            close = difflib.get_close_matches(n, list(RUNNERS), n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise SpecError(f"unknown backend {n!r}; {hint}choose from {', '.join(RUNNERS)}")
    return list(dict.fromkeys(names))


def availability(name: str) -> tuple[bool, str | None]:
    return RUNNERS[name].available()


def create_runner(
    name: str,
    art: Artifacts,
    input_names: list[str],
    output_names: list[str],
    precision: str = "fp32",
    threads: int = 2,
) -> Runner:
    """A Runner for `name` over the given artifacts (not yet loaded: use `with`)."""
    if name == "torch":
        return TorchRunner(art.model, input_names, output_names, threads)
    if name == "torchscript":
        return TorchScriptRunner(art.torchscript, input_names, output_names, threads)
    if name == "onnxruntime":
        return OnnxRuntimeRunner(art.onnx, threads)
    if name == "ncnn-cpp":
        if art.meta is None:
            raise SpecError("ncnn-cpp needs meta.json (written by `run` for classify and detect specs)")
        return NcnnCppRunner(art.ncnn_param, art.ncnn_bin, art.meta, threads)
    return RUNNERS[name](art.ncnn_param, art.ncnn_bin, precision=precision, threads=threads)
