"""Parity on artifacts that already exist (a run folder, a .param/.bin pair, an .onnx) and golden files."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .atomic import atomic_path
from .backends import REFERENCE, RUNNERS, Artifacts
from .bundle import TASKS, meta_for
from .errors import SpecError
from .inputs import default_images
from .ncnn_param import read_param
from .pipeline import (
    RunOptions,
    StageTimer,
    infer_all,
    inputs_for,
    select_backends,
    summarize,
    versions,
)
from .spec import ModelSpec, build_model, load_spec, parse_shape

GOLDEN = "golden"
NEEDS = {
    "torchscript": "torchscript",
    "onnxruntime": "onnx",
    "ncnn-cpu": "ncnn_param",
    "ncnn-vulkan": "ncnn_param",
}


@dataclass
class ParityOptions(RunOptions):
    """RunOptions plus what only `parity` takes."""

    model: str | None = None  # spec of the model the artifacts came from (enables the torch reference)
    input_shape: str | None = None
    inputs_npz: Path | None = None
    golden: Path | None = None
    save_golden: Path | None = None
    reference: str | None = None
    layerwise: bool = False


def locate(target: Path) -> tuple[Artifacts, str | None]:
    """The artifacts in a run folder or a single file, and the spec a run folder recorded."""
    target = Path(target)
    art = Artifacts()
    spec = None
    if target.is_dir():
        files = {"torchscript": "model.pt", "onnx": "model.onnx", "ncnn_param": "model.ncnn.param"}
        for attr, name in files.items():
            if (target / name).is_file():
                setattr(art, attr, target / name)
        report = target / "report.json"
        if report.is_file():
            try:
                spec = json.loads(report.read_text()).get("spec")
            except ValueError:
                spec = None
    elif target.is_file() and target.suffix in (".param", ".onnx", ".pt"):
        attr = {".param": "ncnn_param", ".onnx": "onnx", ".pt": "torchscript"}[target.suffix]
        setattr(art, attr, target)
    else:
        raise SpecError(f"{target} is neither a run folder nor a .param/.onnx/.pt file")
    if art.ncnn_param is not None:
        art.ncnn_bin = art.ncnn_param.with_suffix(".bin")
        meta = art.ncnn_param.parent / "meta.json"  # the deployment's own preprocessing, for ncnn-cpp
        if meta.is_file():
            try:
                art.meta = json.loads(meta.read_text())
            except ValueError:
                raise SpecError(f"{meta} is not valid JSON; fix it or delete it") from None
        if not art.ncnn_bin.is_file():
            raise SpecError(
                f"{art.ncnn_bin} is missing: a .param needs its .bin beside it, with the same stem"
            )
    if not any((art.torchscript, art.onnx, art.ncnn_param)):
        raise SpecError(
            f"{target} holds no model.pt, model.onnx or model.ncnn.param; run `deploytool run` first"
        )
    return art, spec


def _synth_spec(art: Artifacts, name: str, shape: tuple[int, ...] | None) -> ModelSpec:
    """A spec for artifacts that came without one: names from the files, shape from the user."""
    if art.onnx is not None:
        import onnx

        graph = onnx.load(str(art.onnx), load_external_data=False).graph
        inits = {i.name for i in graph.initializer}
        ins = [i.name for i in graph.input if i.name not in inits]
        outs = [o.name for o in graph.output]
    elif art.ncnn_param is not None:
        g = read_param(art.ncnn_param)
        ins, outs = g.input_names, g.output_names
    else:
        raise SpecError("a TorchScript file alone does not say its outputs; pass --model")
    if len(ins) != 1:
        raise SpecError(f"the model has inputs {ins}; parity supports single-input models")
    return ModelSpec(
        name=name, factory="", input_name=ins[0], input_shape=shape or (1,), output_names=outs, source=name
    )


def _pick_reference(opts: ParityOptions, art: Artifacts, has_spec: bool) -> str:
    if opts.golden is not None:
        return GOLDEN
    if opts.reference is not None:
        if opts.reference not in RUNNERS:
            raise SpecError(f"unknown --reference {opts.reference!r}; choose from {', '.join(RUNNERS)}")
        return opts.reference
    if has_spec:
        return REFERENCE
    for backend in ("torchscript", "onnxruntime", "ncnn-cpu"):
        if getattr(art, NEEDS[backend]) is not None:
            return backend
    raise SpecError("nothing to use as the reference; pass --model, --golden or --reference")


def run_parity(target: Path, opts: ParityOptions) -> dict:
    """Compare backends on existing artifacts; write a golden file if asked. Returns report.json's dict."""
    timer = StageTimer()
    art, recorded = locate(target)
    model = opts.model or recorded
    shape = parse_shape(opts.input_shape) if opts.input_shape else None
    if model is not None:
        spec = load_spec(model, opts.input_shape)
    else:
        spec = _synth_spec(art, Path(target).stem, shape)
    reference = _pick_reference(opts, art, model is not None)
    if art.meta is None and art.ncnn_param is not None and model is not None and spec.task in TASKS:
        art.meta = meta_for(spec, art.ncnn_param, num_classes=spec.factory_args.get("num_classes"))
    # the default set leaves out ncnn-cpp, as `run` does: it needs libncnn built (`make ncnn`)
    default = [b for b in NEEDS if getattr(art, NEEDS[b]) is not None and b != "ncnn-cpp"]
    backends, info = select_backends(opts.backends, reference, default=default)
    for backend in backends:
        if backend in NEEDS and getattr(art, NEEDS[backend]) is None:
            raise SpecError(
                f"{target} has no {NEEDS[backend]} file for backend {backend}; drop it from --backends"
            )
    if "torch" in backends:
        if model is None:
            raise SpecError("the torch backend needs the model: pass --model")
        with timer.stage("load"):
            art.model = build_model(spec, opts.weights)

    preset: dict[str, list[dict]] = {}
    if opts.golden is not None:
        items, preset[GOLDEN], meta = read_golden(opts.golden)
        info[GOLDEN] = {
            "available": True,
            "reason": None,
            "device": meta.get("reference"),
            "file": str(opts.golden),
        }
        spec.output_names = list(preset[GOLDEN][0])
        first = items[0][1]
        if len(first) == 1:
            spec.input_name = next(iter(first))
            spec.input_shape = tuple(first[spec.input_name].shape)
    elif opts.inputs_npz is not None:
        items = [_npz_item(opts.inputs_npz, spec)]
    elif opts.images and model is None:
        raise SpecError("--images needs --model (its spec says how to preprocess); or pass --inputs FILE.npz")
    elif model is None and shape is None:
        raise SpecError(
            "say what to feed: --inputs FILE.npz, --golden FILE.npz, --images with --model, "
            "or --input-shape for a seeded random input"
        )
    else:
        if shape is not None:
            spec.input_shape = shape
        if not opts.images and model is not None and spec.task != "raw":
            opts.images = default_images()
        items = inputs_for(spec, opts)

    results = dict(preset)
    results.update(infer_all(spec, art, opts, backends, info, items, timer))
    if opts.save_golden is not None:
        write_golden(
            opts.save_golden, items, results[reference], {"model": spec.name, "reference": reference}
        )
    report = summarize(spec, art, opts, info, items, results, timer, reference)
    if opts.layerwise:
        if art.ncnn_param is None:
            raise SpecError(f"--layerwise compares ncnn blobs, but {target} has no .param")
        from .layerwise import layerwise

        with timer.stage("layerwise"):
            rows, first = layerwise(
                art.ncnn_param,
                art.ncnn_bin,
                items[0][1],
                art.model,
                vulkan="ncnn-vulkan" in backends,
                precision=opts.ncnn_precision,
                threads=opts.threads,
            )
        report["layers"] = rows
        report["layerwise"] = {"input": str(items[0][0]), "first_failure": first}
        report["passed"] = report["passed"] and all(v is None for v in first.values())
    return report


def _npz_item(path: Path, spec: ModelSpec):
    arrays = _load_npz(path)
    if spec.input_name not in arrays:
        if len(arrays) != 1:
            raise SpecError(f"{path} holds {sorted(arrays)}; it needs an array named {spec.input_name!r}")
        arrays = {spec.input_name: next(iter(arrays.values()))}
    x = np.ascontiguousarray(arrays[spec.input_name], dtype=np.float32)
    spec.input_shape = tuple(x.shape)
    return (str(path), {spec.input_name: x}, None)


def _load_npz(path: Path) -> dict[str, np.ndarray]:
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"{path} does not exist")
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except (OSError, ValueError) as exc:
        raise SpecError(f"{path} is not a readable .npz file ({exc})") from None


def write_golden(path: Path, items: list, outputs: list[dict], meta: dict) -> Path:
    """Store inputs and the reference's outputs, so another machine or version can be checked against them."""
    arrays: dict[str, np.ndarray] = {}
    labels = []
    for i, ((label, feed, _), out) in enumerate(zip(items, outputs, strict=True)):
        labels.append(str(label))
        arrays.update({f"in{i}/{k}": v for k, v in feed.items()})
        arrays.update({f"out{i}/{k}": v for k, v in out.items()})
    meta = dict(meta, golden=1, labels=labels, versions=versions())
    arrays["meta"] = np.array(json.dumps(meta))
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.savez_compressed(fh, **arrays)
    return Path(path)


def read_golden(path: Path) -> tuple[list, list[dict], dict]:
    """(items, reference outputs, meta) from a golden file written by write_golden."""
    arrays = _load_npz(path)
    try:
        meta = json.loads(str(arrays.pop("meta")))
        labels = meta["labels"]
    except (KeyError, ValueError):
        raise SpecError(
            f"{path} is not a deploytool golden file (no meta); write one with --save-golden"
        ) from None
    items, outputs = [], []
    for i, label in enumerate(labels):
        feed = {k.split("/", 1)[1]: v for k, v in arrays.items() if k.startswith(f"in{i}/")}
        outs = {k.split("/", 1)[1]: v for k, v in arrays.items() if k.startswith(f"out{i}/")}
        items.append((label, feed, None))
        outputs.append(outs)
    return items, outputs, meta
