"""Every backend, declared once: its family, the precisions it takes, the files it needs, how its
Runner is built from a run's artifacts. Listing, validation, help, doctor, run, parity and bench all
derive from BACKENDS. A backend declared with `targets=True` is a runner that can execute elsewhere:
its name may carry a target after '@' (`ncnn-cpp@aarch64:max`, `ncnn-cpp@ssh:pi@board`), see
deploytool/targets."""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass, replace
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
class Built:
    """What a Backend's `build` gets besides the Runner class: the artifacts, the run's config, and the
    target the backend's name carries (None without '@')."""

    art: Artifacts
    config: RunnerConfig
    target: object = None  # a targets.base.Target


@dataclass(frozen=True)
class Backend:
    """One backend's declaration."""

    name: str
    family: str  # torch | onnxruntime | ncnn: who wrote the kernels
    runner: Callable[[], type[Runner]]  # the Runner class, imported on first use
    build: Callable[[type[Runner], Built], Runner]
    needs: tuple[str, ...]  # Artifacts fields that must be set
    description: str
    precisions: tuple[str, ...] = ("fp32",)  # ncnn precision modes it takes (--ncnn-precision)
    default: bool = False  # in `run`'s default --backends
    bench: bool = False  # timed by `bench`
    library: str = ""  # module imported before a bench worker's baseline memory reading
    targets: bool = False  # the name may carry '@TARGET': where the runner executes
    target: str = ""  # this backend's target (what follows '@'; '' for the declared one)

    def available(self) -> tuple[bool, str | None]:
        ok, reason = self.runner().available()
        if ok and self.targets:
            ok, reason = self.make_target().available()
        return ok, reason

    def make_target(self):
        """The targets.base.Target this backend's runner executes on."""
        from ..targets import make_target

        return make_target(self.target)

    @property
    def base(self) -> str:
        """The declared backend's name, without '@TARGET'."""
        return self.name.split("@", 1)[0]

    def lineage(self) -> list[str]:
        """This name, then the names it refines, most specific first: ncnn-cpp@aarch64:max ->
        [ncnn-cpp@aarch64:max, ncnn-cpp@aarch64, ncnn-cpp] (tolerances fall back along it)."""
        if not self.target:
            return [self.name]
        kind = self.target.split(":", 1)[0]
        return list(dict.fromkeys([self.name, f"{self.base}@{kind}", self.base]))

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
        target = self.make_target() if self.targets else None
        runner = self.build(self.runner(), Built(art, config, target))
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


def _ncnn(cls, b: Built) -> Runner:
    options = (b.art.meta or {}).get("ncnn_options")  # from bench --tune; the runner checks them
    c = b.config
    return cls(b.art.ncnn_param, b.art.ncnn_bin, precision=c.precision, threads=c.threads, options=options)


NCNN_PRECISIONS = ("fp32", "fp16", "bf16", "int8")
BACKENDS: dict[str, Backend] = {
    b.name: b
    for b in (
        Backend(
            "torch", "torch", _torch,
            lambda cls, b: cls(b.art.model, list(b.config.input_names), list(b.config.output_names),
                               b.config.threads),
            needs=("model",), description="PyTorch eager, the reference", default=True, bench=True,
            library="torch",
        ),
        Backend(
            "torchscript", "torch", _torchscript,
            lambda cls, b: cls(b.art.torchscript, list(b.config.input_names), list(b.config.output_names),
                               b.config.threads),
            needs=("torchscript",), description="the traced TorchScript file pnnx reads", bench=True,
            library="torch",
        ),
        Backend(
            "onnxruntime", "onnxruntime", _ort, lambda cls, b: cls(b.art.onnx, b.config.threads),
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
            lambda cls, b: cls(b.art.ncnn_param, b.art.ncnn_bin, b.art.meta, b.config.threads,
                               precision=b.config.precision, target=b.target),
            needs=("ncnn_param", "ncnn_bin", "meta"), precisions=("fp32", "fp16", "int8"), targets=True,
            description="the bundle's C++ runner (libncnn CPU, its own image decoding and preprocessing); "
            "@aarch64[:CPU] cross-built and run under qemu-aarch64, @ssh:[user@]host[:port][:DIR] on a board",
        ),
    )
}  # fmt: skip


def get_backend(name: str) -> Backend:
    """The declaration of `name`, or for `BASE@TARGET` the declared BASE on that target (the target's
    text is checked here); an unknown name is the user's error, with a 'did you mean'."""
    base, at, target = name.partition("@")
    if base not in BACKENDS:
        likely = [b.name for b in BACKENDS.values() if b.targets or not at]  # '@' only fits these
        close = difflib.get_close_matches(base, likely, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise SpecError(f"unknown backend {base!r}; {hint}choose from {', '.join(BACKENDS)}")
    backend = BACKENDS[base]
    if not at:
        return backend
    if not backend.targets:
        with_targets = [b.name for b in BACKENDS.values() if b.targets]
        raise SpecError(
            f"backend {base} runs only here, not on a target ({name!r}); "
            f"targets are for {', '.join(with_targets)}"
        )
    from ..targets import check_target

    check_target(target)
    return replace(backend, name=name, target=target)


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
