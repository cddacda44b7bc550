"""Model specs: what deploytool knows about one model (ModelSpec and the types it holds), the default
tolerances, and where named specs are found. Reading and checking a spec is spec_toml.py's work."""

from __future__ import annotations

import importlib.util
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import BackendUnavailable, SpecError, did_you_mean

TASKS = ("classify", "detect", "raw")
IMAGE_TASKS = ("classify", "detect")
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


# ---------------------------------------------------------------- task settings, from [task_args]


def is_number(value: Any) -> bool:
    """A finite int or float, not a boolean."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def type_name(value: Any) -> str:
    """How a wrong value is shown in a message: tables and lists by kind, anything else by repr."""
    if isinstance(value, dict):
        return "a table"
    text = repr(value)
    return text if len(text) <= 60 else text[:59] + "…"


def known_keys(table: dict[str, Any], allowed: tuple[str, ...] | set[str], where: str) -> None:
    """Refuse keys of `table` outside `allowed`, suggesting the closest one."""
    unknown = sorted(set(table) - set(allowed))
    if unknown:
        hint = did_you_mean(unknown[0], allowed).strip()
        raise SpecError(
            f"{where}: unknown key(s) {', '.join(unknown)}{'; ' + hint if hint else ''} "
            f"(allowed: {', '.join(sorted(allowed))})"
        )


@dataclass(frozen=True)
class ClassifySettings:
    """The classify task's knobs: the k of top-k, the class names, and the reference margin (top-1
    minus top-2 logit) below which an input is a near-tie whose top-1 is reported but not judged."""

    top_k: int = 5
    names: tuple[str, ...] = ()
    near_tie_margin: float = 0.0

    @classmethod
    def from_task_args(cls, args: dict[str, Any], source: str, num_classes: Any = None) -> ClassifySettings:
        """Validate [task_args] of a classifier with `num_classes` (factory_args.num_classes, if any)."""
        where = f"{source}: task_args"
        known_keys(args, ("top_k", "names", "near_tie_margin"), f"{where} (task 'classify')")
        top_k = args.get("top_k", 5)
        if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1:
            raise SpecError(f"{where}.top_k must be a positive integer, got {type_name(top_k)}")
        if isinstance(num_classes, int) and not isinstance(num_classes, bool) and top_k > num_classes:
            raise SpecError(f"{where}.top_k = {top_k} is more than the model's {num_classes} classes")
        names = args.get("names", [])
        if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
            raise SpecError(f"{where}.names must be a list of non-empty strings, got {names!r}")
        margin = args.get("near_tie_margin", 0.0)
        if isinstance(margin, bool) or not isinstance(margin, int | float) or not 0 <= margin < math.inf:
            raise SpecError(f"{where}.near_tie_margin must be a number >= 0 (logits), got {margin!r}")
        return cls(top_k, tuple(names), float(margin))


@dataclass(frozen=True)
class DetectSettings:
    """The detection task's knobs, read from a spec's [task_args]."""

    conf: float = 0.25
    iou: float = 0.45
    max_det: int = 300
    margin: float = 0.05
    score_tol: float = 0.05
    iou_min: float = 0.95
    box_tol_px: float = 1.0
    names: tuple[str, ...] = ()

    @classmethod
    def from_task_args(cls, args: dict[str, Any], source: str = "<spec>") -> DetectSettings:
        """Validate [task_args]: confidence, iou, max_det, margin, score_tol, iou_min, box_tol_px, names.
        Every value must have the right type and range (no booleans, NaN or infinity); an unknown key is
        an error, with the closest known key suggested."""
        known = ("confidence", "iou", "max_det", "margin", "score_tol", "iou_min", "box_tol_px", "names")
        if not isinstance(args, dict):
            raise SpecError(f"{source}: task_args must be a table, got {args!r}")
        unknown = sorted(set(args) - set(known))
        if unknown:
            raise SpecError(
                f"{source}: unknown task_args key(s) {', '.join(unknown)} for task 'detect'; "
                f"{did_you_mean(unknown[0], known)}allowed: {', '.join(sorted(known))}"
            )
        d = cls()
        fields = {"confidence": "conf", "iou": "iou", "margin": "margin", "score_tol": "score_tol",
                  "iou_min": "iou_min"}  # fmt: skip
        values = {}
        for key, attr in fields.items():
            value = args.get(key, getattr(d, attr))
            if not is_number(value) or not 0 <= value <= 1:
                raise SpecError(f"{source}: task_args.{key} must be a number in [0, 1], got {value!r}")
            values[attr] = float(value)
        max_det = args.get("max_det", d.max_det)
        if not isinstance(max_det, int) or isinstance(max_det, bool) or max_det <= 0:
            raise SpecError(f"{source}: task_args.max_det must be a positive integer, got {max_det!r}")
        box_tol = args.get("box_tol_px", d.box_tol_px)
        if not is_number(box_tol) or box_tol < 0:
            raise SpecError(f"{source}: task_args.box_tol_px must be a finite number >= 0, got {box_tol!r}")
        values["box_tol_px"] = float(box_tol)
        names = args.get("names", [])
        if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
            raise SpecError(f"{source}: task_args.names must be a list of non-empty strings")
        return cls(max_det=max_det, names=tuple(names), **values)


# ---------------------------------------------------------------- an ONNX file instead of a factory

_ONNX_KEYS = ("path", "package", "file", "install")


@dataclass(frozen=True)
class OnnxRef:
    """Where a spec's ONNX file is: `path` (relative to the spec's folder), or `file` inside the
    installed Python package `package` (found with importlib, never imported, never downloaded);
    `install` is the command that installs the package, shown when it is missing."""

    source: str  # the spec that names it, for messages
    path: Path | None = None
    package: str | None = None
    file: str | None = None
    install: str | None = None

    def __str__(self) -> str:
        return str(self.path) if self.path is not None else f"{self.package}:{self.file}"

    @classmethod
    def from_table(cls, table: Any, source: str) -> OnnxRef:
        """The spec's [onnx] table, checked: either `path`, or `package` and `file` (+ `install`)."""
        where = f"{source}: onnx"
        if not isinstance(table, dict):
            raise SpecError(
                f"{where} must be a table: path = 'model.onnx', or package = '...' and file = '...'"
            )
        unknown = sorted(set(table) - set(_ONNX_KEYS))
        if unknown:
            raise SpecError(
                f"{where}: unknown key(s) {', '.join(unknown)} (allowed: {', '.join(_ONNX_KEYS)})"
            )
        for key, value in table.items():
            if not isinstance(value, str) or not value.strip():
                raise SpecError(f"{where}.{key} must be a non-empty string, got {value!r}")
        if ("path" in table) == ("package" in table):
            raise SpecError(f"{where}: give path (a file) or package and file (a file inside a package)")
        if "path" in table:
            if {"file", "install"} & set(table):
                raise SpecError(f"{where}: file and install go with package, not with path")
            return cls(source, path=Path(source).parent / table["path"])
        if "file" not in table:
            raise SpecError(f"{where}: package needs file, the ONNX file's path inside the package")
        if Path(table["file"]).is_absolute() or ".." in Path(table["file"]).parts:
            raise SpecError(f"{where}.file must be a path inside the package, got {table['file']!r}")
        if not all(part.isidentifier() for part in table["package"].split(".")):
            raise SpecError(f"{where}.package {table['package']!r} is not a Python package name")
        return cls(source, package=table["package"], file=table["file"], install=table.get("install"))

    def resolve(self) -> Path:
        """The ONNX file. A missing package is BackendUnavailable (exit 4) saying how to install it; a
        missing file is the spec's error."""
        if self.path is not None:
            if not self.path.is_file():
                raise SpecError(f"{self.source}: onnx.path {self.path} does not exist")
            return self.path
        folder = _package_folder(self.package)
        if folder is None:
            how = f"`{self.install}`" if self.install else f"pip install {self.package}"
            raise BackendUnavailable(
                f"{self.source} needs the ONNX file {self.file} from Python package {self.package!r}, which "
                f"is not installed; install it with {how}"
            )
        path = folder / self.file
        if not path.is_file():
            raise SpecError(
                f"{self.source}: package {self.package!r} (at {folder}) has no {self.file}; check onnx.file "
                "or the package's version"
            )
        return path


def _package_folder(package: str) -> Path | None:
    """The folder of an installed package, without importing it (its own imports may be missing: a
    package installed with --no-deps for its data files)."""
    top = package.split(".")[0]
    try:
        found = importlib.util.find_spec(top)
    except (ImportError, ValueError):
        return None
    if found is None or not found.submodule_search_locations:
        return None
    return Path(next(iter(found.submodule_search_locations))).joinpath(*package.split(".")[1:])


# ---------------------------------------------------------------- the spec


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
    task_args: dict[str, Any] = field(default_factory=dict)  # [task_args] as written (meta.json reads it)
    classify: ClassifySettings = field(default_factory=ClassifySettings)  # task_args, parsed (classify)
    detect: DetectSettings = field(default_factory=DetectSettings)  # task_args, parsed (detect)
    source: str = "<import>"
    inputs: InputSource | None = None  # [inputs]; None: photos for image tasks, one random input for raw
    onnx: OnnxRef | None = None  # the spec names an ONNX file instead of a factory (no PyTorch model)


# ---------------------------------------------------------------- where named specs are found

# A spec's name becomes the folder out/NAME: one path component, nothing that climbs out of --out.
SAFE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}")
BUNDLED_MODELS = Path(__file__).resolve().parent.parent / "models"


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


def find_model(name: str) -> Path | None:
    """The spec file for a model name: NAME.toml in the first folder of model_dirs() that has it."""
    if not SAFE_NAME.fullmatch(name):
        return None
    for d in model_dirs():
        path = d / f"{name}.toml"
        if path.is_file():
            return path
    return None


def available_models() -> list[str]:
    """Every model name found in model_dirs(), sorted (a name counts once, from the first folder)."""
    return sorted({p.stem for d in model_dirs() for p in d.glob("*.toml") if SAFE_NAME.fullmatch(p.stem)})
