"""Every backend, declared once: its family, the precisions it takes, the files it needs, how its
Runner is built from a run's artifacts. Listing, validation, help, doctor, run, parity and bench all
derive from BACKENDS."""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..errors import BackendUnavailable, SpecError
from .base import Runner

REFERENCE = "torch"


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
    int8_table: Path | None = None  # the calibration table an int8 model was made from
    int8_layers: tuple[str, ...] = ()  # the layers it quantized


@dataclass(frozen=True)
class RunnerConfig:
    """How a run wants its runners: the spec's input/output names, ncnn precision, CPU threads."""

    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    precision: str = "fp32"
    threads: int = 2


@dataclass(frozen=True)
class Backend:
    """One backend's declaration."""

    name: str
    family: str  # torch | onnxruntime | ncnn: who wrote the kernels
    runner: Callable[[], type[Runner]]  # the Runner class, imported on first use
    build: Callable[[type[Runner], Artifacts, RunnerConfig], Runner]
    needs: tuple[str, ...]  # Artifacts fields that must be set
    description: str
    precisions: tuple[str, ...] = ("fp32",)  # ncnn precision modes it takes (--ncnn-precision)
    default: bool = False  # in `run`'s default --backends
    bench: bool = False  # timed by `bench`
    library: str = ""  # module imported before a bench worker's baseline memory reading

    def available(self) -> tuple[bool, str | None]:
        return self.runner().available()

    @property
    def takes_precision(self) -> bool:
        return len(self.precisions) > 1

    def missing(self, art: Artifacts) -> list[str]:
        """The artifacts this backend needs that `art` lacks."""
        return [n for n in self.needs if getattr(art, n) is None]

    def create(self, art: Artifacts, config: RunnerConfig) -> Runner:
        """The Runner over `art` (not loaded yet: use `with`)."""
        missing = self.missing(art)
        if missing:
            raise SpecError(f"backend {self.name} needs {', '.join(missing)}, which this run does not have")
        runner = self.build(self.runner(), art, config)
        runner.name = self.name  # one Runner class may serve several declared backends
        return runner


def _torch():
    from .torch_runner import TorchRunner

    return TorchRunner


def _torchscript():
    from .torch_runner import TorchScriptRunner

    return TorchScriptRunner


def _ort():
    from .ort_runner import OnnxRuntimeRunner

    return OnnxRuntimeRunner


def _ncnn_cpu():
    from .ncnn_runner import NcnnRunner

    return NcnnRunner


def _ncnn_vulkan():
    from .ncnn_runner import NcnnVulkanRunner

    return NcnnVulkanRunner


def _ncnn_cpp():
    from .ncnn_cpp import NcnnCppRunner

    return NcnnCppRunner


def _ncnn(cls, art: Artifacts, c: RunnerConfig) -> Runner:
    options = (art.meta or {}).get("ncnn_options")  # from bench --tune; the runner checks them
    return cls(art.ncnn_param, art.ncnn_bin, precision=c.precision, threads=c.threads, options=options)


NCNN_PRECISIONS = ("fp32", "fp16", "bf16", "int8")
BACKENDS: dict[str, Backend] = {
    b.name: b
    for b in (
        Backend(
            "torch", "torch", _torch,
            lambda cls, art, c: cls(art.model, list(c.input_names), list(c.output_names), c.threads),
            needs=("model",), description="PyTorch eager, the reference", default=True, bench=True,
            library="torch",
        ),
        Backend(
            "torchscript", "torch", _torchscript,
            lambda cls, art, c: cls(art.torchscript, list(c.input_names), list(c.output_names), c.threads),
            needs=("torchscript",), description="the traced TorchScript file pnnx reads", bench=True,
            library="torch",
        ),
        Backend(
            "onnxruntime", "onnxruntime", _ort, lambda cls, art, c: cls(art.onnx, c.threads),
            needs=("onnx",), description="ONNX Runtime, CPU execution provider", default=True, bench=True,
            library="onnxruntime",
        ),
        Backend(
            "ncnn-cpu", "ncnn", _ncnn_cpu, _ncnn, needs=("ncnn_param", "ncnn_bin"),
            description="ncnn's CPU kernels through its Python binding", precisions=NCNN_PRECISIONS,
            default=True, bench=True, library="ncnn",
        ),
        Backend(
            "ncnn-vulkan", "ncnn", _ncnn_vulkan, _ncnn, needs=("ncnn_param", "ncnn_bin"),
            description="ncnn's Vulkan compute (fp16 storage on the device)", precisions=NCNN_PRECISIONS,
            default=True, bench=True, library="ncnn",
        ),
        Backend(
            "ncnn-cpp", "ncnn", _ncnn_cpp,
            lambda cls, art, c: cls(art.ncnn_param, art.ncnn_bin, art.meta, c.threads),
            needs=("ncnn_param", "ncnn_bin", "meta"),
            description="the bundle's C++ runner (libncnn, fp32 CPU, its own image preprocessing)",
        ),
    )
}  # fmt: skip


def get_backend(name: str) -> Backend:
    """The declaration of `name`; an unknown name is the user's error, with a 'did you mean'."""
    if name not in BACKENDS:
        close = difflib.get_close_matches(name, list(BACKENDS), n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise SpecError(f"unknown backend {name!r}; {hint}choose from {', '.join(BACKENDS)}")
    return BACKENDS[name]


def default_backends() -> list[str]:
    return [b.name for b in BACKENDS.values() if b.default]


def bench_backends() -> list[str]:
    return [b.name for b in BACKENDS.values() if b.bench]


def parse_backends(text: str | None) -> list[str]:
    """'torch,ncnn-cpu' -> list (order kept, duplicates dropped); None -> the default set."""
    if text is None:
        return default_backends()
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise SpecError("--backends is empty; list backends like torch,onnxruntime,ncnn-cpu")
    for n in names:
        get_backend(n)
    return list(dict.fromkeys(names))


def availability(name: str) -> tuple[bool, str | None]:
    return get_backend(name).available()


def create_runner(name: str, art: Artifacts, config: RunnerConfig) -> Runner:
    return get_backend(name).create(art, config)


def select_backends(
    requested: str | None, reference: str | None = REFERENCE, default: list[str] | None = None
) -> tuple[list[str], dict[str, tuple[bool, str | None]]]:
    """Backends to run (the reference first) and the availability of each. A backend the user named
    that cannot run raises BackendUnavailable; one from the default set is reported and skipped."""
    names = parse_backends(requested) if requested is not None or default is None else list(default)
    found: dict[str, tuple[bool, str | None]] = {}
    runnable = []
    for name in names:
        ok, reason = found[name] = availability(name)
        if ok:
            runnable.append(name)
        elif requested is not None:
            raise BackendUnavailable(f"backend {name} is unavailable: {reason}")
    if reference in BACKENDS:
        ok, reason = availability(reference)
        if not ok:
            raise BackendUnavailable(f"reference backend {reference} is unavailable: {reason}")
        runnable = [reference] + [n for n in runnable if n != reference]
        found.setdefault(reference, (True, None))
    if not [n for n in runnable if n != reference]:  # zero checks is never a pass
        if requested is not None:
            raise SpecError(
                f"--backends {requested} leaves nothing to compare with the reference {reference}; "
                f"add a backend such as {'ncnn-vulkan' if reference == 'ncnn-cpu' else 'ncnn-cpu'}"
            )
        why = "; ".join(f"{n}: {r}" for n, (ok, r) in found.items() if not ok and n != reference)
        raise BackendUnavailable(
            f"no backend to compare with the reference {reference}: "
            + (why or "none of the default backends has its files here; pass --backends")
        )
    return runnable, found
