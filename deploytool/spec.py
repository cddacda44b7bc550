"""Model specs: loading models/*.toml, import specs, validation with clear messages."""

from __future__ import annotations

import difflib
import importlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomllib

from .errors import SpecError

TASKS = ("classify", "detect", "raw")
RESIZE_MODES = ("resize", "letterbox")
COLORS = ("rgb", "bgr")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Tolerance:
    """|got - ref| <= atol + rtol * |ref| + peak_rtol * max|ref|, elementwise. peak_rtol suits
    reduced-precision storage, whose error scales with the tensor's range rather than each element."""

    atol: float
    rtol: float
    peak_rtol: float = 0.0


DEFAULT_TOLERANCES = {
    "default": Tolerance(1e-4, 1e-4),
    "ncnn-vulkan": Tolerance(5e-2, 5e-2),
    "ncnn-cpu-fp16": Tolerance(5e-2, 5e-2),
    "ncnn-cpu-bf16": Tolerance(1e-1, 5e-2),
    "fp16": Tolerance(5e-2, 5e-2),  # any ncnn backend with fp16 weights or storage, unless set per backend
    "bf16": Tolerance(1e-1, 5e-2),
    "ncnn-vulkan-fp16": Tolerance(1e-1, 1e-1),
}


@dataclass
class Preprocess:
    color: str = "rgb"
    resize: str = "resize"
    pad_value: float = 114.0
    scale: float = 1 / 255
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)


@dataclass
class ModelSpec:
    """Everything deploytool needs to build, export, convert and check one model."""

    name: str
    factory: str
    input_name: str = "input"
    input_shape: tuple[int, ...] = (1, 3, 224, 224)
    output_names: list[str] = field(default_factory=lambda: ["output"])
    task: str = "raw"
    factory_args: dict[str, Any] = field(default_factory=dict)
    preprocess: Preprocess = field(default_factory=Preprocess)
    tolerances: dict[str, Tolerance] = field(default_factory=lambda: dict(DEFAULT_TOLERANCES))
    dynamic_shapes: list[tuple[int, ...]] = field(default_factory=list)
    pnnx_moduleop: list[str] = field(default_factory=list)
    task_args: dict[str, Any] = field(default_factory=dict)
    source: str = "<import>"

    def tolerance(self, backend: str, precision: str = "fp32", output: str | None = None) -> Tolerance:
        """The most specific tolerance: backend+precision, then the precision mode alone (`fp16`, `bf16`),
        then backend, then default; each first for `output` (`[tolerance.KEY.outputs.NAME]`)."""
        keys = [f"{backend}-{precision}", precision] if precision != "fp32" else []
        keys += [backend, "default"]
        for key in keys:
            for k in ([f"{key}/{output}"] if output else []) + [key]:
                if k in self.tolerances:
                    return self.tolerances[k]
        return DEFAULT_TOLERANCES["default"]


def models_dir() -> Path:
    """Where named specs live: $DEPLOYTOOL_MODELS, else ./models, else the repo's models/."""
    env = os.environ.get("DEPLOYTOOL_MODELS")
    if env:
        return Path(env)
    here = Path.cwd() / "models"
    if here.is_dir():
        return here
    return Path(__file__).resolve().parent.parent / "models"


def available_models() -> list[str]:
    d = models_dir()
    return sorted(p.stem for p in d.glob("*.toml")) if d.is_dir() else []


def parse_shape(text: str) -> tuple[int, ...]:
    """Parse '1,3,224,224' (brackets and x separators accepted) into a tuple of positive ints."""
    tokens = re.split(r"[,x]", text.strip().strip("[]()").replace(" ", ""))
    try:
        dims = tuple(int(v) for v in tokens)
    except ValueError:
        raise SpecError(
            f"malformed --input-shape {text!r}: expected comma-separated integers like 1,3,224,224"
        ) from None
    if not dims or any(d <= 0 for d in dims):
        raise SpecError(f"malformed --input-shape {text!r}: every dimension must be a positive integer")
    return dims


def _shape(value: Any, where: str) -> tuple[int, ...]:
    if not isinstance(value, list) or not value or not all(isinstance(v, int) and v > 0 for v in value):
        raise SpecError(f"{where}: expected a list of positive integers like [1, 3, 224, 224], got {value!r}")
    return tuple(value)


def _choice(value: Any, choices: tuple[str, ...], where: str) -> str:
    if value not in choices:
        raise SpecError(f"{where}: {value!r} is not one of {', '.join(choices)}")
    return value


def _triple(value: Any, where: str) -> tuple[float, float, float]:
    if not isinstance(value, list) or len(value) != 3 or not all(isinstance(v, int | float) for v in value):
        raise SpecError(f"{where}: expected three numbers, got {value!r}")
    return tuple(float(v) for v in value)


def _tolerance(table: Any, where: str) -> Tolerance:
    if not isinstance(table, dict) or not {"atol", "rtol"} <= set(table):
        raise SpecError(f"{where} needs both atol and rtol")
    try:
        return Tolerance(float(table["atol"]), float(table["rtol"]))
    except (TypeError, ValueError):
        raise SpecError(f"{where}: atol and rtol must be numbers") from None


def spec_from_dict(data: dict[str, Any], source: str) -> ModelSpec:
    """Validate a parsed TOML document; every error names the file and the key."""
    known = {
        "name",
        "factory",
        "task",
        "description",
        "factory_args",
        "input",
        "output",
        "preprocess",
        "tolerance",
        "pnnx",
        "task_args",
    }
    unknown = set(data) - known
    if unknown:
        raise SpecError(
            f"{source}: unknown key(s) {', '.join(sorted(unknown))}; allowed: {', '.join(sorted(known))}"
        )
    for key in ("name", "factory"):
        if not isinstance(data.get(key), str):
            raise SpecError(f"{source}: missing string key {key!r}")
    inp = data.get("input", {})
    out = data.get("output", {})
    pre = data.get("preprocess", {})
    preprocess = Preprocess(
        color=_choice(pre.get("color", "rgb"), COLORS, f"{source}: preprocess.color"),
        resize=_choice(pre.get("resize", "resize"), RESIZE_MODES, f"{source}: preprocess.resize"),
        pad_value=float(pre.get("pad_value", 114)),
        scale=float(pre.get("scale", 1 / 255)),
        mean=_triple(pre.get("mean", [0, 0, 0]), f"{source}: preprocess.mean"),
        std=_triple(pre.get("std", [1, 1, 1]), f"{source}: preprocess.std"),
    )
    if any(s == 0 for s in preprocess.std):
        raise SpecError(f"{source}: preprocess.std must not contain 0")
    tolerances = dict(DEFAULT_TOLERANCES)
    for key, tol in data.get("tolerance", {}).items():
        if not isinstance(tol, dict):
            raise SpecError(f"{source}: tolerance.{key} must be a table with atol and rtol")
        for output, sub in tol.get("outputs", {}).items():
            tolerances[f"{key}/{output}"] = _tolerance(sub, f"{source}: tolerance.{key}.outputs.{output}")
        if {"atol", "rtol"} & set(tol) or not tol.get("outputs"):
            tolerances[key] = _tolerance(tol, f"{source}: tolerance.{key}")
    shape = _shape(inp.get("shape", [1, 3, 224, 224]), f"{source}: input.shape")
    dynamic = [_shape(s, f"{source}: input.dynamic_shapes") for s in inp.get("dynamic_shapes", [])]
    names = out.get("names", ["output"])
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise SpecError(f"{source}: output.names must be a non-empty list of strings")
    return ModelSpec(
        name=data["name"],
        factory=data["factory"],
        task=_choice(data.get("task", "raw"), TASKS, f"{source}: task"),
        factory_args=dict(data.get("factory_args", {})),
        input_name=str(inp.get("name", "input")),
        input_shape=shape,
        output_names=names,
        preprocess=preprocess,
        tolerances=tolerances,
        dynamic_shapes=dynamic,
        pnnx_moduleop=list(data.get("pnnx", {}).get("moduleop", [])),
        task_args=dict(data.get("task_args", {})),
        source=source,
    )


def load_spec(model: str, input_shape: str | None = None) -> ModelSpec:
    """Resolve MODEL: a name in models/, a path to a .toml, or an import spec `pkg.mod:factory`."""
    if model.endswith(".toml"):
        path = Path(model)
        if not path.is_file():
            raise SpecError(f"spec file {model} does not exist")
        spec = _read_toml_spec(path)
    elif ":" in model and not Path(model).exists():
        if input_shape is None:
            raise SpecError(f"{model} is an import spec: pass --input-shape (e.g. --input-shape 1,3,224,224)")
        name = model.split(":")[-1]
        return ModelSpec(name=name, factory=model, input_shape=parse_shape(input_shape), source=model)
    else:
        path = models_dir() / f"{model}.toml"
        if not path.is_file():
            names = available_models()
            close = difflib.get_close_matches(model, names, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise SpecError(
                f"unknown model {model!r}; {hint}available: {', '.join(names) or 'none'} "
                "(or pass a .toml path or pkg.module:factory)"
            )
        spec = _read_toml_spec(path)
    if input_shape is not None:
        spec.input_shape = parse_shape(input_shape)
    return spec


def _read_toml_spec(path: Path) -> ModelSpec:
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise SpecError(f"{path}: invalid TOML ({exc})") from None
    return spec_from_dict(data, str(path))


def build_model(spec: ModelSpec, weights: str | None = None):
    """Import the factory, build the nn.Module in eval mode, load `weights` if given."""

    module_name, _, attr = spec.factory.partition(":")
    if not module_name or not attr:
        raise SpecError(f"factory {spec.factory!r} must look like package.module:function")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise SpecError(f"cannot import {module_name!r} for factory {spec.factory!r}: {exc}") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise SpecError(f"{module_name} has no callable {attr!r} (from factory {spec.factory!r})")
    model = factory(**spec.factory_args)
    if weights is not None:
        load_weights(model, weights)
    return model.eval()


def load_weights(model, path: str) -> None:
    """Load a state_dict checkpoint safely (weights_only=True); refuse anything else clearly."""
    import pickle

    import torch

    p = Path(path)
    if not p.is_file():
        raise SpecError(f"weights file {path} does not exist")
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise SpecError(
            f"{path} needs unsafe unpickling (it holds more than tensors); "
            "save a plain state_dict with torch.save(model.state_dict(), path)"
        ) from None
    except Exception as exc:
        raise SpecError(
            f"{path} is not a readable PyTorch checkpoint ({type(exc).__name__}: {exc})"
        ) from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise SpecError(f"{path} does not hold a state_dict (got {type(state).__name__})")
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # tensor shape mismatch
        first = str(exc).strip().splitlines()[-1].strip()
        raise SpecError(f"{path} does not fit this model: {first}") from None
    if result.missing_keys or result.unexpected_keys:
        raise SpecError(
            f"{path} does not fit this model: missing {list(result.missing_keys)[:3]}, "
            f"unexpected {list(result.unexpected_keys)[:3]}"
        )
