"""Model specs: loading models/*.toml, import specs, validation with clear messages."""

from __future__ import annotations

import difflib
import importlib
import inspect
import math
import os
import re
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomllib

from .errors import DeployError, SpecError

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
    # int8 weights and activations: errors scale with each output's range. Measured on resnet18 (seeded,
    # kl calibration on images/calib): cosine >= 0.9989, peak_rel 0.060-0.066 on ncnn-cpu and llvmpipe
    "int8": Tolerance(1e-3, 0.0, peak_rtol=0.15),
}


INPUT_SOURCES = ("generator", "npy")
GENERATOR_KINDS = ("normal", "uniform", "sine")
MAX_INPUT_COUNT = 256


@dataclass(frozen=True)
class InputSource:
    """[inputs]: where a non-photo model's inputs come from. `generator`: `count` seeded inputs of
    `kind` (normal: standard normal; uniform: in [-1, 1); sine: a noisy mixture of sines along `axis`)
    at the input shape and at each dynamic shape; `npy`: the first `count` rows (default all) of an
    array (N, *input.shape[1:]) in `path`."""

    source: str
    kind: str = "normal"
    seed: int = 0
    count: int | None = 1
    axis: int = -1
    path: Path | None = None


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
    inputs: InputSource | None = None  # [inputs]; None: photos for image tasks, one random input for raw
    onnx: Any = None  # foreign.OnnxRef: the spec names an ONNX file instead of a factory (no PyTorch model)

    def tolerance(self, backend: str, precision: str = "fp32", output: str | None = None) -> Tolerance:
        """The most specific tolerance: backend+precision, then the precision mode alone (`fp16`, `bf16`),
        then backend, then default; each first for `output` (`[tolerance.KEY.outputs.NAME]`). A backend
        on a target falls back to the names it refines: ncnn-cpp@aarch64:max, ncnn-cpp@aarch64, ncnn-cpp."""
        lineage = _backend_lineage(backend)
        keys = [*(f"{b}-{precision}" for b in lineage), precision] if precision != "fp32" else []
        keys += [*lineage, "default"]
        for key in keys:
            for k in ([f"{key}/{output}"] if output else []) + [key]:
                if k in self.tolerances:
                    return self.tolerances[k]
        return DEFAULT_TOLERANCES["default"]


# An input tensor larger than this is refused before anything is allocated: 2**28 float32 values are 1 GiB,
# and every backend holds several copies of its input and activations.
MAX_INPUT_ELEMENTS = 2**28
# A spec's name becomes the folder out/NAME: one path component, nothing that climbs out of --out.
_SAFE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}")
_IDENTIFIER = r"[A-Za-z_][A-Za-z0-9_]*"
_IMPORT_SPEC = re.compile(rf"{_IDENTIFIER}(\.{_IDENTIFIER})*:{_IDENTIFIER}")
BUNDLED_MODELS = Path(__file__).resolve().parent.parent / "models"
IMAGE_TASKS = ("classify", "detect")

_TOP_KEYS = (
    "name", "factory", "task", "description", "factory_args", "input", "output", "preprocess", "tolerance",
    "pnnx", "task_args", "inputs", "onnx",
)  # fmt: skip
_TABLE_KEYS = {
    "input": ("name", "shape", "dynamic_shapes"),
    "output": ("names",),
    "preprocess": ("color", "resize", "pad_value", "scale", "mean", "std"),
    "pnnx": ("moduleop",),
    "inputs": ("source", "kind", "seed", "count", "axis", "path"),
}
_TOLERANCE_KEYS = ("atol", "rtol", "peak_rtol", "outputs")
_CLASSIFY_ARGS = ("top_k", "names", "near_tie_margin")


def model_dirs() -> list[Path]:
    """The folders searched for a named spec, in order: each folder of $DEPLOYTOOL_MODELS (os.pathsep
    separated), ./models, then the models/ folder shipped with deploytool. A name found in an earlier
    folder hides the same name in a later one; a ./models folder never hides the bundled specs."""
    dirs = [Path(entry) for entry in os.environ.get("DEPLOYTOOL_MODELS", "").split(os.pathsep) if entry]
    for d in dirs:
        if not d.is_dir():
            raise SpecError(f"DEPLOYTOOL_MODELS names {d}, which is not a folder; fix or unset it")
    dirs += [d for d in (Path.cwd() / "models", BUNDLED_MODELS) if d.is_dir()]
    unique: dict[Path, Path] = {}
    for d in dirs:
        unique.setdefault(d.resolve(), d)
    return list(unique.values())


def models_dir() -> Path:
    """The first folder searched for named specs (see model_dirs)."""
    dirs = model_dirs()
    return dirs[0] if dirs else BUNDLED_MODELS


def find_model(name: str) -> Path | None:
    """The spec file for a model name: NAME.toml in the first folder of model_dirs() that has it."""
    if not _SAFE_NAME.fullmatch(name):
        return None
    for d in model_dirs():
        path = d / f"{name}.toml"
        if path.is_file():
            return path
    return None


def available_models() -> list[str]:
    """Every model name found in model_dirs(), sorted (a name counts once, from the first folder)."""
    return sorted({p.stem for d in model_dirs() for p in d.glob("*.toml") if _SAFE_NAME.fullmatch(p.stem)})


def _check_elements(dims: tuple[int, ...], what: str) -> None:
    count = math.prod(dims)
    if count > MAX_INPUT_ELEMENTS:
        raise SpecError(
            f"{what} has {count:,} elements; the limit is {MAX_INPUT_ELEMENTS:,} (2**28, 1 GiB of float32): "
            "pass a smaller shape"
        )


def parse_shape(text: str) -> tuple[int, ...]:
    """Parse '1,3,224,224' (brackets and x separators accepted) into a tuple of positive ints, at most
    MAX_INPUT_ELEMENTS elements in all."""
    tokens = re.split(r"[,x]", text.strip().strip("[]()").replace(" ", ""))
    try:
        dims = tuple(int(v) for v in tokens)
    except ValueError:
        raise SpecError(
            f"malformed --input-shape {text!r}: expected comma-separated integers like 1,3,224,224"
        ) from None
    if not dims or any(d <= 0 for d in dims):
        raise SpecError(f"malformed --input-shape {text!r}: every dimension must be a positive integer")
    _check_elements(dims, f"--input-shape {text}")
    return dims


def _type_name(value: Any) -> str:
    """How a wrong value is shown in a message: tables and lists by kind, anything else by repr."""
    if isinstance(value, dict):
        return "a table"
    text = repr(value)
    return text if len(text) <= 60 else text[:59] + "…"


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _number(value: Any, where: str, low: float | None = None, high: float | None = None, *,
            positive: bool = False) -> float:  # fmt: skip
    """A finite int or float (not a boolean), > 0 with `positive`, else within [low, high]."""
    if positive:
        ok, need = _is_number(value) and value > 0, "a finite number > 0"
    elif high is not None:
        ok, need = _is_number(value) and low <= value <= high, f"a number in [{low:g}, {high:g}]"
    elif low is not None:
        ok, need = _is_number(value) and value >= low, f"a finite number >= {low:g}"
    else:
        ok, need = _is_number(value), "a finite number"
    if not ok:
        raise SpecError(f"{where} must be {need}, got {_type_name(value)}")
    return float(value)


def _string(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise SpecError(f"{where} must be a non-empty string, got {_type_name(value)}")
    return value


def _strings(value: Any, where: str, *, non_empty: bool = False) -> list[str]:
    if (
        not isinstance(value, list)
        or not all(isinstance(v, str) and v for v in value)
        or (non_empty and not value)
    ):
        need = "a non-empty list" if non_empty else "a list"
        raise SpecError(f"{where} must be {need} of non-empty strings, got {value!r}")
    return list(value)


def _table(data: dict[str, Any], key: str, where: str, allowed: tuple[str, ...] | None = None) -> dict:
    """data[key] (default {}), which must be a TOML table holding only `allowed` keys."""
    value = data.get(key, {})
    if not isinstance(value, dict):
        raise SpecError(f"{where} must be a TOML table, got {_type_name(value)}")
    if allowed is not None:
        _known_keys(value, allowed, where)
    return value


def _known_keys(table: dict[str, Any], allowed: tuple[str, ...] | set[str], where: str) -> None:
    unknown = sorted(set(table) - set(allowed))
    if unknown:
        close = difflib.get_close_matches(unknown[0], list(allowed), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise SpecError(
            f"{where}: unknown key(s) {', '.join(unknown)}{hint} (allowed: {', '.join(sorted(allowed))})"
        )


def _shape(value: Any, where: str) -> tuple[int, ...]:
    ok = (
        isinstance(value, list)
        and value
        and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    )
    if not ok or any(v <= 0 for v in value):
        raise SpecError(f"{where}: expected a list of positive integers like [1, 3, 224, 224], got {value!r}")
    dims = tuple(value)
    _check_elements(dims, where)
    return dims


def _choice(value: Any, choices: tuple[str, ...], where: str) -> str:
    if value not in choices:
        raise SpecError(f"{where}: {value!r} is not one of {', '.join(choices)}")
    return value


def _triple(value: Any, where: str) -> tuple[float, float, float]:
    if not isinstance(value, list) or len(value) != 3 or not all(_is_number(v) for v in value):
        raise SpecError(f"{where}: expected three finite numbers, got {value!r}")
    return tuple(float(v) for v in value)


def _tolerance(table: dict[str, Any], where: str) -> Tolerance:
    if not {"atol", "rtol"} <= set(table):
        raise SpecError(f"{where} needs both atol and rtol")
    return Tolerance(
        _number(table["atol"], f"{where}.atol", 0.0),
        _number(table["rtol"], f"{where}.rtol", 0.0),
        _number(table.get("peak_rtol", 0.0), f"{where}.peak_rtol", 0.0),
    )


def _backend_lineage(backend: str) -> list[str]:
    from .backends.registry import get_backend

    try:
        return get_backend(backend).lineage()
    except SpecError:  # not a backend name: looked up as it is
        return [backend]


def tolerance_keys() -> list[str]:
    """The keys a [tolerance.KEY] table may have: default, a precision (fp16, bf16), a backend, or
    BACKEND-PRECISION (backends and precisions from the backend registry). A backend that runs on
    targets also takes BACKEND@TARGET (`ncnn-cpp@aarch64`, `ncnn-cpp@aarch64:max`, `ncnn-cpp@ssh`);
    _tolerance_key_ok checks those."""
    from .backends.registry import BACKENDS, NCNN_PRECISIONS

    precisions = [p for p in NCNN_PRECISIONS if p != "fp32"]
    return ["default", *precisions, *BACKENDS, *(f"{b}-{p}" for b in BACKENDS for p in precisions)]


def _tolerance_key_ok(key: str, allowed: list[str]) -> bool:
    """A listed key, or BACKEND@TARGET[-PRECISION] for a backend that runs on targets."""
    from .backends.registry import BACKENDS, NCNN_PRECISIONS

    if key in allowed:
        return True
    base, at, target = key.partition("@")
    for p in NCNN_PRECISIONS:
        if target.endswith(f"-{p}"):
            target = target[: -len(p) - 1]
    if not at or base not in BACKENDS or not BACKENDS[base].targets:
        return False
    if target == "ssh":
        return True
    from .targets import check_target

    try:
        check_target(target)
    except SpecError:
        return False
    return True


def _tolerances(data: dict[str, Any], outputs: list[str], source: str) -> dict[str, Tolerance]:
    tolerances = dict(DEFAULT_TOLERANCES)
    allowed = tolerance_keys()
    for key, tol in _table(data, "tolerance", f"{source}: tolerance").items():
        where = f"{source}: tolerance.{key}"
        if not _tolerance_key_ok(key, allowed):
            close = difflib.get_close_matches(key, allowed, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise SpecError(
                f"{where}: unknown backend or precision {key!r}; {hint}use default, a backend "
                "(deploytool doctor lists them), a precision (fp16, bf16) or BACKEND-PRECISION"
            )
        if not isinstance(tol, dict):
            raise SpecError(f"{where} must be a table with atol and rtol, got {_type_name(tol)}")
        _known_keys(tol, _TOLERANCE_KEYS, where)
        per_output = _table(tol, "outputs", f"{where}.outputs")
        for output, sub in per_output.items():
            sub_where = f"{where}.outputs.{output}"
            if output not in outputs:
                raise SpecError(
                    f"{sub_where}: no output named {output!r} (output.names: {', '.join(outputs)})"
                )
            if not isinstance(sub, dict):
                raise SpecError(f"{sub_where} must be a table with atol and rtol, got {_type_name(sub)}")
            _known_keys(sub, ("atol", "rtol", "peak_rtol"), sub_where)
            tolerances[f"{key}/{output}"] = _tolerance(sub, sub_where)
        if {"atol", "rtol", "peak_rtol"} & set(tol) or not per_output:
            tolerances[key] = _tolerance(tol, where)
    return tolerances


def _preprocess(data: dict[str, Any], source: str) -> Preprocess:
    pre = _table(data, "preprocess", f"{source}: preprocess", _TABLE_KEYS["preprocess"])
    where = f"{source}: preprocess"
    preprocess = Preprocess(
        color=_choice(pre.get("color", "rgb"), COLORS, f"{where}.color"),
        resize=_choice(pre.get("resize", "resize"), RESIZE_MODES, f"{where}.resize"),
        pad_value=_number(pre.get("pad_value", 114), f"{where}.pad_value (a pixel value)", 0, 255),
        scale=_number(pre.get("scale", 1 / 255), f"{where}.scale", positive=True),
        mean=_triple(pre.get("mean", [0, 0, 0]), f"{where}.mean"),
        std=_triple(pre.get("std", [1, 1, 1]), f"{where}.std"),
    )
    if any(s == 0 for s in preprocess.std):
        raise SpecError(f"{where}.std must not contain 0")
    return preprocess


def _task_args(data: dict[str, Any], task: str, factory_args: dict[str, Any], source: str) -> dict[str, Any]:
    """[task_args], validated for the task: detect's by DetectSettings, classify's top_k and names; raw
    takes none."""
    where = f"{source}: task_args"
    args = _table(data, "task_args", where)
    if task == "detect":
        from .detect import DetectSettings

        DetectSettings.from_task_args(args, source)
    elif task == "classify":
        _known_keys(args, _CLASSIFY_ARGS, f"{where} (task 'classify')")
        top_k = args.get("top_k", 5)
        if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1:
            raise SpecError(f"{where}.top_k must be a positive integer, got {_type_name(top_k)}")
        classes = factory_args.get("num_classes")
        if isinstance(classes, int) and not isinstance(classes, bool) and top_k > classes:
            raise SpecError(f"{where}.top_k = {top_k} is more than the model's {classes} classes")
        _strings(args.get("names", []), f"{where}.names")
        margin = args.get("near_tie_margin", 0.0)
        if isinstance(margin, bool) or not isinstance(margin, int | float) or not 0 <= margin < math.inf:
            raise SpecError(f"{where}.near_tie_margin must be a number >= 0 (logits), got {margin!r}")
    elif args:
        raise SpecError(
            f"{where}: task {task!r} takes no task_args (got {', '.join(sorted(args))}); "
            "set task = 'classify' or 'detect', or remove [task_args]"
        )
    return dict(args)


def _integer(value: Any, where: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise SpecError(f"{where} must be a whole number in [{low}, {high}], got {_type_name(value)}")
    return value


def _inputs(data: dict[str, Any], task: str, rank: int, source: str) -> InputSource | None:
    """[inputs], checked: a generator's kind, seed, count and (sine) axis, or an .npy file that exists,
    relative to the spec file. Only raw models take them (image models take photos)."""
    where = f"{source}: inputs"
    table = _table(data, "inputs", where, _TABLE_KEYS["inputs"])
    if not table:
        return None
    if task != "raw":
        raise SpecError(
            f"{where}: a {task} model takes photos (--images); [inputs] is for task = 'raw' models"
        )
    if "source" not in table:
        raise SpecError(f"{where}: missing key 'source'; set source = 'generator' or 'npy'")
    kind = _choice(table["source"], INPUT_SOURCES, f"{where}.source")
    count = table.get("count")
    count = None if count is None else _integer(count, f"{where}.count", 1, MAX_INPUT_COUNT)
    if kind == "npy":
        _known_keys(table, ("source", "path", "count"), f"{where} (source 'npy')")
        name = _string(table.get("path"), f"{where}.path")
        path = Path(source).parent / name
        if not name.endswith(".npy"):
            raise SpecError(f"{where}.path {name!r} must name an .npy file (numpy.save)")
        if not path.is_file():
            raise SpecError(f"{where}.path: {path} does not exist (the path is relative to the spec file)")
        return InputSource("npy", count=count, path=path)
    _known_keys(table, ("source", "kind", "seed", "count", "axis"), f"{where} (source 'generator')")
    generator = _choice(table.get("kind", "normal"), GENERATOR_KINDS, f"{where}.kind")
    if "axis" in table and generator != "sine":
        raise SpecError(f"{where}.axis is the time axis of kind 'sine'; kind {generator!r} takes none")
    axis = _integer(table.get("axis", -1), f"{where}.axis", -rank, rank - 1)
    if axis in (0, -rank):
        raise SpecError(f"{where}.axis must not be the batch axis (0); the time axis is 1 or more, or -1")
    seed = _integer(table.get("seed", 0), f"{where}.seed", 0, 2**63 - 1)
    return InputSource("generator", generator, seed, 1 if count is None else count, axis)


def check_input_shape(spec: ModelSpec) -> None:
    """The input shape fits the task: image tasks take one [1, 3, H, W] photo at a time, and every
    dynamic shape has the input's rank (and, for images, the same form)."""
    shapes = [spec.input_shape, *spec.dynamic_shapes]
    if spec.task in IMAGE_TASKS:
        for shape in shapes:
            if len(shape) != 4 or shape[0] != 1 or shape[1] != 3:
                raise SpecError(
                    f"{spec.source}: a {spec.task} model takes one RGB/BGR photo, so its input shape must "
                    f"be 1,3,H,W; got {','.join(map(str, shape))} (check input.shape, input.dynamic_shapes "
                    "or --input-shape)"
                )
    if spec.inputs is not None and spec.inputs.source == "npy" and spec.dynamic_shapes:
        raise SpecError(
            f"{spec.source}: inputs from an .npy file have one shape, so input.dynamic_shapes cannot be "
            "checked with them; remove input.dynamic_shapes or use [inputs] source = 'generator'"
        )
    for shape in spec.dynamic_shapes:
        if len(shape) != len(spec.input_shape):
            raise SpecError(
                f"{spec.source}: input.dynamic_shapes entry {list(shape)} has rank {len(shape)}, but the "
                f"input shape {list(spec.input_shape)} has rank {len(spec.input_shape)}"
            )


def check_name(name: Any, where: str) -> str:
    """A spec name is one safe file name (it becomes the folder out/NAME)."""
    if not isinstance(name, str) or not _SAFE_NAME.fullmatch(name):
        raise SpecError(
            f"{where}: name {name!r} is not a safe folder name (it becomes out/NAME); use 1-100 letters, "
            "digits, '_', '.' or '-', not starting with '.' or '-', e.g. name = 'resnet18'"
        )
    return name


def spec_from_dict(data: dict[str, Any], source: str) -> ModelSpec:
    """Validate a whole parsed TOML document (types, ranges, unknown keys at every level, the task's
    arguments); every error names the file and the key."""
    _known_keys(data, _TOP_KEYS, source)
    onnx = None
    if "onnx" in data:  # an ONNX file someone else exported, instead of a factory
        from .foreign import OnnxRef

        if "factory" in data:
            raise SpecError(f"{source}: give either factory or [onnx], not both")
        onnx = OnnxRef.from_table(data["onnx"], source)
    for key in ("name",) if onnx else ("name", "factory"):
        if not isinstance(data.get(key), str):
            raise SpecError(f"{source}: missing string key {key!r}")
    check_name(data["name"], source)
    factory = data.get("factory", "")
    if onnx is None and not _IMPORT_SPEC.fullmatch(factory):
        raise SpecError(f"{source}: factory {factory!r} must look like package.module:function")
    if "description" in data and not isinstance(data["description"], str):
        raise SpecError(f"{source}: description must be a string, got {_type_name(data['description'])}")
    task = _choice(data.get("task", "raw"), TASKS, f"{source}: task")
    factory_args = _table(data, "factory_args", f"{source}: factory_args")
    inp = _table(data, "input", f"{source}: input", _TABLE_KEYS["input"])
    out = _table(data, "output", f"{source}: output", _TABLE_KEYS["output"])
    pnnx = _table(data, "pnnx", f"{source}: pnnx", _TABLE_KEYS["pnnx"])
    names = _strings(out.get("names", ["output"]), f"{source}: output.names", non_empty=True)
    if len(set(names)) != len(names):
        raise SpecError(f"{source}: output.names has duplicates: {names}")
    dynamic = inp.get("dynamic_shapes", [])
    if not isinstance(dynamic, list):
        raise SpecError(f"{source}: input.dynamic_shapes must be a list of shapes, got {_type_name(dynamic)}")
    input_shape = _shape(inp.get("shape", [1, 3, 224, 224]), f"{source}: input.shape")
    spec = ModelSpec(
        name=data["name"],
        factory=factory,
        task=task,
        factory_args=dict(factory_args),
        input_name=_string(inp.get("name", "input"), f"{source}: input.name"),
        input_shape=input_shape,
        output_names=names,
        preprocess=_preprocess(data, source),
        tolerances=_tolerances(data, names, source),
        dynamic_shapes=[_shape(s, f"{source}: input.dynamic_shapes") for s in dynamic],
        pnnx_moduleop=_strings(pnnx.get("moduleop", []), f"{source}: pnnx.moduleop"),
        task_args=_task_args(data, task, factory_args, source),
        source=source,
        inputs=_inputs(data, task, len(input_shape), source),
        onnx=onnx,
    )
    check_input_shape(spec)
    return spec


def load_spec(model: str, input_shape: str | None = None) -> ModelSpec:
    """Resolve MODEL: a name in model_dirs(), a path to a .toml, or an import spec `pkg.mod:factory`;
    the whole spec is validated here, before any work starts."""
    if model.endswith(".toml"):
        path = Path(model)
        if path.is_dir():
            raise SpecError(f"spec file {model} is a folder; pass the .toml file inside it")
        if not path.is_file():
            raise SpecError(f"spec file {model} does not exist")
        spec = _read_toml_spec(path)
    elif ":" in model and not Path(model).exists():
        if not _IMPORT_SPEC.fullmatch(model):
            raise SpecError(
                f"{model!r} is not an import spec like package.module:factory (nor a model name or .toml)"
            )
        if input_shape is None:
            raise SpecError(f"{model} is an import spec: pass --input-shape (e.g. --input-shape 1,3,224,224)")
        name = check_name(model.split(":")[-1], model)
        return ModelSpec(name=name, factory=model, input_shape=parse_shape(input_shape), source=model)
    else:
        path = find_model(model)
        if path is None:
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
        check_input_shape(spec)
    return spec


def _read_toml_spec(path: Path) -> ModelSpec:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise SpecError(f"cannot read spec file {path}: {exc.strerror or exc}") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise SpecError(
            f"{path} is not UTF-8 text (byte 0x{raw[exc.start]:02x} on line {line}); save it as UTF-8"
        ) from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise SpecError(f"{path}: invalid TOML ({exc})") from None
    return spec_from_dict(data, str(path))


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0].strip() if lines else "(no message)"


def _where(exc: BaseException) -> str:
    """` (at FILE:LINE)` of the innermost frame of exc's traceback, '' when there is none."""
    tb = traceback.extract_tb(exc.__traceback__)
    return f" (at {tb[-1].filename}:{tb[-1].lineno})" if tb else ""


def _import_factory_module(module_name: str, factory: str):
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and (module_name == exc.name or module_name.startswith(exc.name + ".")):
            raise SpecError(
                f"cannot import {module_name!r} for factory {factory!r}: no module named {exc.name!r} "
                "(check the spelling, install the package or add its folder to PYTHONPATH)"
            ) from None
        raise SpecError(
            f"importing {module_name!r} for factory {factory!r} failed: {_first_line(exc)}{_where(exc)}"
        ) from None
    except SyntaxError as exc:
        raise SpecError(
            f"cannot import {module_name!r} for factory {factory!r}: SyntaxError: {exc.msg} "
            f"(at {exc.filename}:{exc.lineno})"
        ) from None
    except SystemExit as exc:
        raise SpecError(
            f"importing {module_name!r} for factory {factory!r} called sys.exit({exc.code!r}){_where(exc)}"
        ) from None
    except Exception as exc:
        raise SpecError(
            f"importing {module_name!r} for factory {factory!r} raised {type(exc).__name__}: "
            f"{_first_line(exc)}{_where(exc)}"
        ) from None


def build_model(spec: ModelSpec, weights: str | None = None):
    """Import the factory, build the nn.Module in eval mode, load `weights` if given. Whatever goes
    wrong in the user's factory (an import error, an exception, sys.exit, a missing argument, a
    return value that is not an nn.Module) is a SpecError naming the factory."""
    import torch

    if spec.onnx is not None:
        raise SpecError(
            f"{spec.source} names an ONNX file, not a PyTorch model: `deploytool run {spec.name}` checks it "
            "against ONNX Runtime"
        )
    module_name, _, attr = spec.factory.partition(":")
    if not module_name or not attr:
        raise SpecError(f"factory {spec.factory!r} must look like package.module:function")
    module = _import_factory_module(module_name, spec.factory)
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise SpecError(f"{module_name} has no callable {attr!r} (from factory {spec.factory!r})")
    try:
        inspect.signature(factory).bind(**spec.factory_args)
    except TypeError as exc:
        given = ", ".join(spec.factory_args) or "no arguments"
        raise SpecError(
            f"factory {spec.factory} cannot be called with {given}: {exc}; give its arguments in the "
            "factory_args table of a .toml spec"
        ) from None
    except ValueError:  # no signature to check (a builtin): the call below says what is wrong
        pass
    try:
        model = factory(**spec.factory_args)
    except DeployError:
        raise
    except SystemExit as exc:
        raise SpecError(
            f"factory {spec.factory} called sys.exit({exc.code!r}) instead of returning a model{_where(exc)}"
        ) from None
    except Exception as exc:
        raise SpecError(
            f"factory {spec.factory} raised {type(exc).__name__}: {_first_line(exc)}{_where(exc)}"
        ) from None
    if not isinstance(model, torch.nn.Module):
        raise SpecError(
            f"factory {spec.factory} returned {type(model).__name__}, not a torch.nn.Module; "
            "it must return the model"
        )
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
    except pickle.UnpicklingError as exc:
        text = str(exc)
        if "Unsupported global" in text or "Unsupported class" in text:
            raise SpecError(
                f"{path} needs unsafe unpickling (it holds more than tensors); "
                "save a plain state_dict with torch.save(model.state_dict(), path)"
            ) from None
        # torch reports a file that is no pickle at all as a weights_only failure too
        detail = text.split("WeightsUnpickler error:", 1)[-1]
        first = next((ln.strip() for ln in detail.splitlines() if ln.strip()), type(exc).__name__)
        raise SpecError(
            f"{path} is not a readable PyTorch checkpoint ({first}); pass a file written by "
            "torch.save(model.state_dict(), path)"
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
