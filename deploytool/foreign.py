"""ONNX files that deploytool did not export: where they are (a path, or a file shipped inside an
installed Python package) and `deploytool run` on them, with ONNX Runtime as the reference.

The flow is `run`'s without the PyTorch half: the ONNX file is linked into the run folder as
model.onnx, converted by the same convert stage (pnnx from ONNX, or the user's onnx2ncnn), and every
backend is run and judged against onnxruntime by the same infer/judge stages."""

from __future__ import annotations

import os
import shutil
from dataclasses import replace
from pathlib import Path

from .backends import BACKENDS, Artifacts, get_backend, role, select_backends
from .errors import SpecError
from .spec import ModelSpec, OnnxRef
from .spec_toml import check_input_shape, check_name, parse_shape

ORT = role("onnx_reference")
# What a backend may need from an ONNX-only run: everything but the PyTorch model and TorchScript.
_ONNX_ARTIFACTS = ("onnx", "ncnn_param", "ncnn_bin")


def is_onnx_file(model: str) -> bool:
    """MODEL names an ONNX file (`run FILE.onnx`)."""
    return model.lower().endswith(".onnx")


def spec_for_file(file: Path, input_shape: str | None) -> ModelSpec:
    """The spec of a bare FILE.onnx: input and output names from the graph, the shape from
    --input-shape or the graph's fixed one, default tolerances, a seeded random input."""
    from .convert import check_onnx_file, onnx_declared_input

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
    spec = synth_spec(Artifacts(onnx=file), name, shape)
    return replace(spec, source=str(file), onnx=OnnxRef(str(file), path=file))


def synth_spec(art: Artifacts, name: str, shape: tuple[int, ...] | None) -> ModelSpec:
    """A spec for artifacts that came without one: names from the files, shape from the user."""
    if art.onnx is not None:
        import onnx

        try:
            graph = onnx.load(str(art.onnx), load_external_data=False).graph
        except Exception as exc:  # protobuf's DecodeError and friends: the file is not an ONNX model
            raise SpecError(f"{art.onnx} is not a readable ONNX model ({type(exc).__name__})") from None
        inits = {i.name for i in graph.initializer}
        ins = [i.name for i in graph.input if i.name not in inits]
        outs = [o.name for o in graph.output]
    elif art.ncnn_param is not None:
        from .ncnn_param import read_param

        g = read_param(art.ncnn_param)
        ins, outs = g.input_names, g.output_names
    else:
        raise SpecError("a TorchScript file alone does not say its outputs; pass --model")
    if len(ins) != 1:
        raise SpecError(f"the model has inputs {ins}; parity supports single-input models")
    return ModelSpec(
        name=name, factory="", input_name=ins[0], input_shape=shape or (1,), output_names=outs, source=name
    )


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
                f"(the reference is {ORT}); drop it from --backends"
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
    from .infer import infer_all
    from .pipeline import judge_run
    from .progress import StageTimer
    from .runfolder import prepare_run_folder
    from .stages import convert_stage

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
