"""Every backend, declared once, as data: its family, the precisions it takes, the files it needs, the
roles it plays for other modules, and how its Runner is built from a run's artifacts. Listing,
validation, help, doctor, run, parity and bench all derive from BACKENDS. Runner classes and the target
factory are named by import path and imported only when a runner is made, so that spec and judge may
read this module without importing any runner. A backend declared with `targets=True` is a runner that
can execute elsewhere: its name may carry a target after '@' (`ncnn-cpp@aarch64:max`,
`ncnn-cpp@ssh:pi@board`), see deploytool/targets."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import BackendUnavailable, SpecError, did_you_mean

if TYPE_CHECKING:
    from .backends.base import Runner

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


NCNN_PRECISIONS = ("fp32", "fp16", "bf16", "int8")  # ncnn's precision modes (--ncnn-precision)
NCNN_CPP_PRECISIONS = ("fp32", "fp16", "int8")  # the C++ runner's: it has no bf16 mode
TARGETS = "deploytool.targets"  # the module that makes and checks targets (make_target, check_target)
# What other modules ask the registry for by role (`role(NAME)`), instead of spelling a backend's name.
ROLES = {
    "onnx_reference": "the reference of a run on an ONNX file (there is no PyTorch model)",
    "ratio_baseline": "bench gives every median as a multiple of this backend's",
    "sweep": "quantize --explain runs every model of its sweep on it",
    "tune": "bench --tune searches its ncnn runtime options",
    "layerwise_gpu": "parity --layerwise also compares its blobs with ncnn-cpu's",
}


def is_int8(precision: str) -> bool:
    """The precision of an int8-quantized model (int8 weights and activations)."""
    return precision == "int8"


def resolve(path: str) -> Any:
    """The object an import path `package.module:name` names, imported now."""
    module, _, attr = path.partition(":")
    return getattr(importlib.import_module(module), attr)


@dataclass(frozen=True)
class Backend:
    """One backend's declaration."""

    name: str
    family: str  # torch | onnxruntime | ncnn: who wrote the kernels
    runner: str  # the Runner class as `package.module:Class`, imported on first use
    build: Callable[[type[Runner], Built], Runner]
    needs: tuple[str, ...]  # Artifacts fields that must be set
    description: str
    precisions: tuple[str, ...] = ("fp32",)  # ncnn precision modes it takes (--ncnn-precision)
    default: bool = False  # in `run`'s default --backends
    bench: bool = False  # timed by `bench`
    library: str = ""  # module imported before a bench worker's baseline memory reading
    targets: bool = False  # the name may carry '@TARGET': where the runner executes
    target: str = ""  # this backend's target (what follows '@'; '' for the declared one)
    roles: tuple[str, ...] = ()  # keys of ROLES
    runner_sources: bool = False  # its runner is built from deploytool's C++ sources (in the cache key)

    def runner_class(self) -> type[Runner]:
        return resolve(self.runner)

    def available(self) -> tuple[bool, str | None]:
        ok, reason = self.runner_class().available()
        if ok and self.targets:
            ok, reason = self.make_target().available()
        return ok, reason

    def make_target(self):
        """The targets.base.Target this backend's runner executes on."""
        return resolve(f"{TARGETS}:make_target")(self.target)

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
    def cacheable(self) -> bool:
        """Its outputs may come from the run cache: not on a board over SSH, whose state no key holds."""
        return self.target.split(":", 1)[0] != "ssh"

    @property
    def takes_precision(self) -> bool:
        return len(self.precisions) > 1

    def judged_precision(
        self, precision: str = "fp32", fp16_weights: bool = False, int8_model: bool = False
    ) -> str:
        """The precision this backend's output is judged at: its ncnn mode when it takes one, else fp32;
        fp32 ncnn arithmetic over fp16-rounded weights (pnnx fp16=1) is judged as fp16; an int8-quantized
        model of any backend (`int8_model`: ONNX Runtime's QDQ model in bench) is judged as int8."""
        if int8_model or (is_int8(precision) and self.family == "ncnn"):  # the int8 model, whoever runs it
            return "int8"
        prec = precision if precision in self.precisions else "fp32"
        if fp16_weights and self.family == "ncnn" and prec == "fp32":
            return "fp16"
        return prec

    def missing(self, art: Artifacts) -> list[str]:
        """The artifacts this backend needs that `art` lacks."""
        return [n for n in self.needs if getattr(art, n) is None]

    def create(self, art: Artifacts, config: RunnerConfig) -> Runner:
        """The Runner over `art` (not loaded yet: use `with`)."""
        missing = self.missing(art)
        if missing:
            raise SpecError(f"backend {self.name} needs {', '.join(missing)}, which this run does not have")
        target = self.make_target() if self.targets else None
        runner = self.build(self.runner_class(), Built(art, config, target))
        runner.name = self.name  # one Runner class may serve several declared backends
        return runner


def _ncnn(cls, b: Built) -> Runner:
    options = (b.art.meta or {}).get("ncnn_options")  # from bench --tune; the runner checks them
    c = b.config
    return cls(b.art.ncnn_param, b.art.ncnn_bin, precision=c.precision, threads=c.threads, options=options)


BACKENDS: dict[str, Backend] = {
    b.name: b
    for b in (
        Backend(
            "torch", "torch", "deploytool.backends.torch_runner:TorchRunner",
            lambda cls, b: cls(b.art.model, list(b.config.input_names), list(b.config.output_names),
                               b.config.threads),
            needs=("model",), description="PyTorch eager, the reference", default=True, bench=True,
            library="torch",
        ),
        Backend(
            "torchscript", "torch", "deploytool.backends.torch_runner:TorchScriptRunner",
            lambda cls, b: cls(b.art.torchscript, list(b.config.input_names), list(b.config.output_names),
                               b.config.threads),
            needs=("torchscript",), description="the traced TorchScript file pnnx reads", bench=True,
            library="torch",
        ),
        Backend(
            "onnxruntime", "onnxruntime", "deploytool.backends.ort_runner:OnnxRuntimeRunner",
            lambda cls, b: cls(b.art.onnx, b.config.threads),
            needs=("onnx",), description="ONNX Runtime, CPU execution provider", default=True, bench=True,
            library="onnxruntime", roles=("onnx_reference", "ratio_baseline"),
        ),
        Backend(
            "ncnn-cpu", "ncnn", "deploytool.backends.ncnn_runner:NcnnRunner", _ncnn,
            needs=("ncnn_param", "ncnn_bin"), description="ncnn's CPU kernels through its Python binding",
            precisions=NCNN_PRECISIONS, default=True, bench=True, library="ncnn", roles=("sweep", "tune"),
        ),
        Backend(
            "ncnn-vulkan", "ncnn", "deploytool.backends.ncnn_runner:NcnnVulkanRunner", _ncnn,
            needs=("ncnn_param", "ncnn_bin"),
            description="ncnn's Vulkan compute (fp16 storage on the device)", precisions=NCNN_PRECISIONS,
            default=True, bench=True, library="ncnn", roles=("layerwise_gpu",),
        ),
        Backend(
            "ncnn-cpp", "ncnn", "deploytool.backends.ncnn_cpp:NcnnCppRunner",
            lambda cls, b: cls(b.art.ncnn_param, b.art.ncnn_bin, b.art.meta, b.config.threads,
                               precision=b.config.precision, target=b.target),
            needs=("ncnn_param", "ncnn_bin", "meta"), precisions=NCNN_CPP_PRECISIONS, targets=True,
            runner_sources=True,
            description="the bundle's C++ runner (libncnn CPU, its own image decoding and preprocessing); "
            "@aarch64[:CPU] cross-built and run under qemu-aarch64, @ssh:[user@]host[:port][:DIR] on a board",
        ),
    )
}  # fmt: skip


def role(name: str) -> str:
    """The backend that plays `name` (a key of ROLES)."""
    return next(b.name for b in BACKENDS.values() if name in b.roles)


def get_backend(name: str) -> Backend:
    """The declaration of `name`, or for `BASE@TARGET` the declared BASE on that target (the target's
    text is checked here); an unknown name is the user's error, with a 'did you mean'."""
    base, at, target = name.partition("@")
    if base not in BACKENDS:
        likely = [b.name for b in BACKENDS.values() if b.targets or not at]  # '@' only fits these
        raise SpecError(
            f"unknown backend {base!r}; {did_you_mean(base, likely)}choose from {', '.join(BACKENDS)}"
        )
    backend = BACKENDS[base]
    if not at:
        return backend
    if not backend.targets:
        with_targets = [b.name for b in BACKENDS.values() if b.targets]
        raise SpecError(
            f"backend {base} runs only here, not on a target ({name!r}); "
            f"targets are for {', '.join(with_targets)}"
        )
    resolve(f"{TARGETS}:check_target")(target)
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
