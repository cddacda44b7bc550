"""Reading a spec: MODEL as a name, a .toml file or an import spec (load_spec), and every check of a
parsed TOML document (spec_from_dict), each error naming the file and the key."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import tomllib

from . import registry
from .errors import SpecError, did_you_mean
from .spec import (
    COLORS,
    DEFAULT_TOLERANCES,
    GENERATOR_KINDS,
    IMAGE_TASKS,
    INPUT_SOURCES,
    MAX_INPUT_COUNT,
    RESIZE_MODES,
    SAFE_NAME,
    TASKS,
    ClassifySettings,
    DetectSettings,
    InputSource,
    ModelSpec,
    OnnxRef,
    Preprocess,
    Tolerance,
    available_models,
    find_model,
    is_number,
    known_keys,
    type_name,
)

# An input tensor larger than this is refused before anything is allocated: 2**28 float32 values are 1 GiB,
# and every backend holds several copies of its input and activations.
MAX_INPUT_ELEMENTS = 2**28
_IDENTIFIER = r"[A-Za-z_][A-Za-z0-9_]*"
_IMPORT_SPEC = re.compile(rf"{_IDENTIFIER}(\.{_IDENTIFIER})*:{_IDENTIFIER}")

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


def _number(value: Any, where: str, low: float | None = None, high: float | None = None, *,
            positive: bool = False) -> float:  # fmt: skip
    """A finite int or float (not a boolean), > 0 with `positive`, else within [low, high]."""
    if positive:
        ok, need = is_number(value) and value > 0, "a finite number > 0"
    elif high is not None:
        ok, need = is_number(value) and low <= value <= high, f"a number in [{low:g}, {high:g}]"
    elif low is not None:
        ok, need = is_number(value) and value >= low, f"a finite number >= {low:g}"
    else:
        ok, need = is_number(value), "a finite number"
    if not ok:
        raise SpecError(f"{where} must be {need}, got {type_name(value)}")
    return float(value)


def _string(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise SpecError(f"{where} must be a non-empty string, got {type_name(value)}")
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
        raise SpecError(f"{where} must be a TOML table, got {type_name(value)}")
    if allowed is not None:
        known_keys(value, allowed, where)
    return value


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
    if not isinstance(value, list) or len(value) != 3 or not all(is_number(v) for v in value):
        raise SpecError(f"{where}: expected three finite numbers, got {value!r}")
    return tuple(float(v) for v in value)


def _integer(value: Any, where: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise SpecError(f"{where} must be a whole number in [{low}, {high}], got {type_name(value)}")
    return value


def _tolerance(table: dict[str, Any], where: str) -> Tolerance:
    if not {"atol", "rtol"} <= set(table):
        raise SpecError(f"{where} needs both atol and rtol")
    return Tolerance(
        _number(table["atol"], f"{where}.atol", 0.0),
        _number(table["rtol"], f"{where}.rtol", 0.0),
        _number(table.get("peak_rtol", 0.0), f"{where}.peak_rtol", 0.0),
    )


def tolerance_keys() -> list[str]:
    """The keys a [tolerance.KEY] table may have: default, a precision (fp16, bf16), a backend, or
    BACKEND-PRECISION (backends and precisions from the backend registry). A backend that runs on
    targets also takes BACKEND@TARGET (`ncnn-cpp@aarch64`, `ncnn-cpp@aarch64:max`, `ncnn-cpp@ssh`);
    _tolerance_key_ok checks those."""
    precisions = [p for p in registry.NCNN_PRECISIONS if p != "fp32"]
    return [
        "default",
        *precisions,
        *registry.BACKENDS,
        *(f"{b}-{p}" for b in registry.BACKENDS for p in precisions),
    ]


def _tolerance_key_ok(key: str, allowed: list[str]) -> bool:
    """A listed key, or BACKEND@TARGET[-PRECISION] for a backend that runs on targets."""
    if key in allowed:
        return True
    base, at, target = key.partition("@")
    for p in registry.NCNN_PRECISIONS:
        if target.endswith(f"-{p}"):
            target = target[: -len(p) - 1]
    if not at or base not in registry.BACKENDS or not registry.BACKENDS[base].targets:
        return False
    if target == "ssh":  # every board: the lineage's `BACKEND@ssh`
        return True
    try:
        registry.get_backend(f"{base}@{target}")
    except SpecError:
        return False
    return True


def _tolerances(data: dict[str, Any], outputs: list[str], source: str) -> dict[str, Tolerance]:
    tolerances = dict(DEFAULT_TOLERANCES)
    allowed = tolerance_keys()
    for key, tol in _table(data, "tolerance", f"{source}: tolerance").items():
        where = f"{source}: tolerance.{key}"
        if not _tolerance_key_ok(key, allowed):
            raise SpecError(
                f"{where}: unknown backend or precision {key!r}; {did_you_mean(key, allowed)}use default, a "
                "backend (deploytool doctor lists them), a precision (fp16, bf16) or BACKEND-PRECISION"
            )
        if not isinstance(tol, dict):
            raise SpecError(f"{where} must be a table with atol and rtol, got {type_name(tol)}")
        known_keys(tol, _TOLERANCE_KEYS, where)
        per_output = _table(tol, "outputs", f"{where}.outputs")
        for output, sub in per_output.items():
            sub_where = f"{where}.outputs.{output}"
            if output not in outputs:
                raise SpecError(
                    f"{sub_where}: no output named {output!r} (output.names: {', '.join(outputs)})"
                )
            if not isinstance(sub, dict):
                raise SpecError(f"{sub_where} must be a table with atol and rtol, got {type_name(sub)}")
            known_keys(sub, ("atol", "rtol", "peak_rtol"), sub_where)
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


def _task_settings(
    args: dict[str, Any], task: str, factory_args: dict[str, Any], source: str
) -> tuple[ClassifySettings, DetectSettings]:
    """[task_args], parsed for the task (classify's or detect's settings; the other keeps its defaults);
    raw takes none."""
    if task == "detect":
        return ClassifySettings(), DetectSettings.from_task_args(args, source)
    if task == "classify":
        return ClassifySettings.from_task_args(
            args, source, factory_args.get("num_classes")
        ), DetectSettings()
    if args:
        raise SpecError(
            f"{source}: task_args: task {task!r} takes no task_args (got {', '.join(sorted(args))}); "
            "set task = 'classify' or 'detect', or remove [task_args]"
        )
    return ClassifySettings(), DetectSettings()


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
        known_keys(table, ("source", "path", "count"), f"{where} (source 'npy')")
        name = _string(table.get("path"), f"{where}.path")
        path = Path(source).parent / name
        if not name.endswith(".npy"):
            raise SpecError(f"{where}.path {name!r} must name an .npy file (numpy.save)")
        if not path.is_file():
            raise SpecError(f"{where}.path: {path} does not exist (the path is relative to the spec file)")
        return InputSource("npy", count=count, path=path)
    known_keys(table, ("source", "kind", "seed", "count", "axis"), f"{where} (source 'generator')")
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
    if not isinstance(name, str) or not SAFE_NAME.fullmatch(name):
        raise SpecError(
            f"{where}: name {name!r} is not a safe folder name (it becomes out/NAME); use 1-100 letters, "
            "digits, '_', '.' or '-', not starting with '.' or '-', e.g. name = 'resnet18'"
        )
    return name


def spec_from_dict(data: dict[str, Any], source: str) -> ModelSpec:
    """Validate a whole parsed TOML document (types, ranges, unknown keys at every level, the task's
    arguments); every error names the file and the key."""
    known_keys(data, _TOP_KEYS, source)
    onnx = None
    if "onnx" in data:  # an ONNX file someone else exported, instead of a factory
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
        raise SpecError(f"{source}: description must be a string, got {type_name(data['description'])}")
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
        raise SpecError(f"{source}: input.dynamic_shapes must be a list of shapes, got {type_name(dynamic)}")
    input_shape = _shape(inp.get("shape", [1, 3, 224, 224]), f"{source}: input.shape")
    input_name = _string(inp.get("name", "input"), f"{source}: input.name")
    preprocess = _preprocess(data, source)
    tolerances = _tolerances(data, names, source)
    dynamic_shapes = [_shape(s, f"{source}: input.dynamic_shapes") for s in dynamic]
    moduleop = _strings(pnnx.get("moduleop", []), f"{source}: pnnx.moduleop")
    task_args = _table(data, "task_args", f"{source}: task_args")
    classify, detect = _task_settings(task_args, task, factory_args, source)
    spec = ModelSpec(
        name=data["name"], factory=factory, task=task, factory_args=dict(factory_args), input_name=input_name,
        input_shape=input_shape, output_names=names, preprocess=preprocess, tolerances=tolerances,
        dynamic_shapes=dynamic_shapes, pnnx_moduleop=moduleop, task_args=dict(task_args), classify=classify,
        detect=detect, source=source, inputs=_inputs(data, task, len(input_shape), source), onnx=onnx,
    )  # fmt: skip
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
            hint = did_you_mean(model, names)
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
