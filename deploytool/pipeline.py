"""Wires the stages: spec -> model -> export -> convert -> run every backend -> compare -> report dict."""

from __future__ import annotations

import json
import platform
import re
import statistics
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import __version__
from .atomic import atomic_path, write_text
from .backends import (
    NCNN_BACKENDS,
    PRECISION_BACKENDS,
    REFERENCE,
    RUNNERS,
    Artifacts,
    availability,
    create_runner,
    parse_backends,
)
from .compare import HIST_EDGES_LOG10, compare_tensors, error_histogram, topk_agreement
from .convert import convert, pnnx_version
from .errors import BackendUnavailable, SpecError
from .export import DEFAULT_OPSET, export_onnx, export_torchscript
from .inputs import collect_images, load_inputs, random_input
from .ncnn_param import read_param
from .spec import ModelSpec, build_model

SCHEMA = 1


@dataclass
class RunOptions:
    """Everything `deploytool run` takes besides the model."""

    out: Path
    backends: str | None = None  # None: the default set, unavailable ones reported and skipped
    images: list[Path] = field(default_factory=list)
    converter: str = "pnnx"
    onnx2ncnn: str | None = None
    opset: int = DEFAULT_OPSET
    weights: str | None = None
    ncnn_precision: str = "fp32"
    save_vis: Path | None = None  # detectors: draw every backend's boxes on each photo here
    fp16_weights: bool = False
    threads: int = 2


class StageTimer:
    def __init__(self) -> None:
        self.stages: dict[str, dict] = {}

    @contextmanager
    def stage(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.stages[name] = {"seconds": round(time.perf_counter() - start, 4)}


def versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {"deploytool": __version__, "python": platform.python_version()}
    for key, dist in (
        ("torch", "torch"),
        ("onnx", "onnx"),
        ("onnxruntime", "onnxruntime"),
        ("ncnn", "ncnn"),
        ("opencv", "opencv-python-headless"),
    ):
        try:
            out[key] = version(dist)
        except PackageNotFoundError:
            out[key] = None
    out["pnnx"] = pnnx_version()
    return out


def by_spec_name(result: dict, spec_names: list[str]) -> dict:
    """Name a backend's outputs as the spec does: by name when they agree, else by position
    (pnnx's out0, out1, … in numeric order)."""
    if set(result) == set(spec_names):
        return {n: result[n] for n in spec_names}
    keys = list(result)
    if all(re.fullmatch(r"out\d+", k) for k in keys):
        keys.sort(key=lambda k: int(k[3:]))
    if len(keys) != len(spec_names):
        raise SpecError(f"backend produced outputs {keys} but the spec names {spec_names}; fix output.names")
    return {n: result[k] for n, k in zip(spec_names, keys, strict=True)}


def select_backends(
    requested: str | None, reference: str = REFERENCE, default: list[str] | None = None
) -> tuple[list[str], dict[str, dict]]:
    """Backends to run (the reference first) and the availability of each. An explicitly requested
    backend that cannot run raises BackendUnavailable; from the default set it is reported and skipped."""
    names = parse_backends(requested) if requested is not None or default is None else default
    info: dict[str, dict] = {}
    runnable = []
    for name in names:
        ok, reason = availability(name)
        info[name] = {"available": ok, "reason": reason, "device": None}
        if ok:
            runnable.append(name)
        elif requested is not None:
            raise BackendUnavailable(f"backend {name} is unavailable: {reason}")
    if reference in RUNNERS:
        ok, reason = availability(reference)
        if not ok:
            raise BackendUnavailable(f"reference backend {reference} is unavailable: {reason}")
        runnable = [reference] + [n for n in runnable if n != reference]
        info.setdefault(reference, {"available": True, "reason": None, "device": None})
    return runnable, info


def run(spec: ModelSpec, opts: RunOptions) -> dict:
    """Run the whole pipeline; returns report.json's dict (schema 1). Never raises for a parity
    failure: `report["passed"]` says it."""
    timer = StageTimer()
    backends, backend_info = select_backends(opts.backends)
    items = inputs_for(spec, opts)
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)

    art = build_artifacts(
        spec,
        opts,
        items[0][1][spec.input_name],
        out,
        timer,
        convert_ncnn=any(b in NCNN_BACKENDS for b in backends),
    )
    results = infer_all(spec, art, opts, backends, backend_info, items, timer)
    return summarize(spec, art, opts, backend_info, items, results, timer)


def write_meta(spec: ModelSpec, param: Path, path: Path) -> dict | None:
    """meta.json for the runners (C++, bundle) when the model is an image classifier or detector."""
    from .bundle import TASKS, meta_for

    if spec.task not in TASKS:
        return None
    meta = meta_for(spec, param, num_classes=spec.factory_args.get("num_classes"))
    write_text(path, json.dumps(meta, indent=2) + "\n")
    return meta


def build_artifacts(
    spec: ModelSpec, opts: RunOptions, x: np.ndarray, out: Path, timer: StageTimer, convert_ncnn: bool = True
) -> Artifacts:
    """Build the model, check it runs on `x`, export TorchScript and ONNX, convert to ncnn (with the
    spec's first dynamic shape as pnnx's second shape) and write meta.json, timing each stage."""
    with timer.stage("load"):
        model = build_model(spec, opts.weights)
    example = _example_tensor(x)
    _try_forward(model, example, spec)
    art = Artifacts(model=model)
    with timer.stage("export"):
        art.torchscript = export_torchscript(model, example, out / "model.pt")
        art.onnx = export_onnx(
            model,
            example,
            out / "model.onnx",
            [spec.input_name],
            spec.output_names,
            opset=opts.opset,
            dynamic=bool(spec.dynamic_shapes),
        )
    if convert_ncnn:
        source = art.torchscript if opts.converter == "pnnx" else art.onnx
        with timer.stage("convert"):
            converted = convert(
                source,
                out,
                opts.converter,
                spec.input_shape,
                spec.dynamic_shapes[0] if spec.dynamic_shapes else None,
                fp16_weights=opts.fp16_weights,
                moduleop=spec.pnnx_moduleop,
                onnx2ncnn=opts.onnx2ncnn,
            )
        art.ncnn_param, art.ncnn_bin = converted.param, converted.bin
        art.converter, art.converter_log = opts.converter, converted.log
        art.meta = write_meta(spec, art.ncnn_param, out / "meta.json")
    return art


def inputs_for(spec: ModelSpec, opts: RunOptions, dynamic: bool = True) -> list:
    """[(label, feed, geometry)]: the photos preprocessed per the spec, at its input shape and then
    (with `dynamic`) at each of its dynamic shapes, labelled `photo.jpg@HxW`; or one seeded random input."""
    if not opts.images:
        return [("random(seed=0)", random_input(spec), None)]
    images = collect_images(opts.images)
    items = load_inputs(spec, images)
    for shape in spec.dynamic_shapes if dynamic else []:
        items += [(f"{p}@{shape[2]}x{shape[3]}", f, g) for p, f, g in load_inputs(spec, images, shape)]
    return items


def image_of(label) -> Path:
    """The photo an input label names (labels of dynamic sizes end in @HxW)."""
    return Path(str(label).rsplit("@", 1)[0])


def infer_all(
    spec: ModelSpec,
    art: Artifacts,
    opts: RunOptions,
    backends: list[str],
    backend_info: dict,
    items: list,
    timer: StageTimer,
) -> dict[str, list[dict]]:
    """Run every backend on the same inputs: {backend: [outputs by spec name, one per input]}."""
    ncnn_inputs = read_param(art.ncnn_param).input_names if art.ncnn_param else []
    results: dict[str, list[dict]] = {}
    for name in backends:
        runner = create_runner(
            name, art, [spec.input_name], spec.output_names, opts.ncnn_precision, opts.threads
        )
        latencies = []
        with timer.stage(f"infer:{name}"), runner:
            backend_info[name]["device"] = runner.device()
            outs = []
            for label, feed, geometry in items:
                if name == "ncnn-cpp" and geometry is not None and "@" not in str(label):
                    result = _cpp_on_image(runner, Path(label), feed, backend_info[name])
                else:
                    result = runner.infer(ncnn_feed(feed, ncnn_inputs) if name in NCNN_BACKENDS else feed)
                if "@" not in str(label):  # latency is quoted at the spec's input shape only
                    latencies.append(runner.last_latency_s)
                outs.append(by_spec_name(result, spec.output_names))
        results[name] = outs
        backend_info[name]["latency_ms_median"] = round(statistics.median(latencies) * 1e3, 3)
        if name in PRECISION_BACKENDS:
            backend_info[name]["precision"] = opts.ncnn_precision
    return results


def _cpp_on_image(runner, image: Path, feed: dict, info: dict) -> dict:
    """The C++ runner on the image file itself, so its own (ncnn) preprocessing is under test too;
    how far its input tensor is from Python's is recorded as `preprocess_max_abs`."""
    [(raw, x_cpp, doc)] = runner.run_images([image])
    x_py = next(iter(feed.values()))
    diff = float(np.abs(x_cpp.reshape(x_py.shape) - x_py).max()) if x_cpp.size == x_py.size else float("inf")
    info["preprocess_max_abs"] = max(info.get("preprocess_max_abs", 0.0), diff)
    runner.last_latency_s = doc.get("latency_ms", 0.0) / 1000
    return raw


def summarize(
    spec: ModelSpec,
    art: Artifacts,
    opts: RunOptions,
    backend_info: dict,
    items: list,
    results: dict,
    timer: StageTimer,
    reference: str = REFERENCE,
) -> dict:
    """Compare every backend with the reference and build report.json's dict."""
    with timer.stage("compare"):
        comparisons, task, histograms = _compare(
            spec, items, results, opts.ncnn_precision, reference, opts.save_vis, opts.fp16_weights
        )
    passed = all(c["passed"] for c in comparisons) and all(t.get("passed", True) for t in task.values())
    return {
        "schema": SCHEMA,
        "model": spec.name,
        "spec": spec.source,
        "passed": passed,
        "reference": reference,
        "versions": versions(),
        "artifacts": {
            "torchscript": _str(art.torchscript),
            "onnx": _str(art.onnx),
            "ncnn_param": _str(art.ncnn_param),
            "ncnn_bin": _str(art.ncnn_bin),
            "converter": art.converter,
            "converter_log": _str(art.converter_log),
            "fp16_weights": opts.fp16_weights,
        },
        "input": {
            "name": spec.input_name,
            "shape": list(spec.input_shape),
            "dynamic_shapes": [list(d) for d in spec.dynamic_shapes],  # also checked, from the same files
        },
        "backends": backend_info,
        "stages": timer.stages,
        "comparisons": comparisons,
        "task": task,
        "histograms": histograms,
    }


def _str(path: Path | None) -> str | None:
    return None if path is None else str(path)


def _try_forward(model, example, spec: ModelSpec) -> None:
    """Run the eager model once so a shape it cannot take is reported as the user's input error."""
    import torch

    try:
        with torch.no_grad():
            model(example)
    except (RuntimeError, ValueError) as exc:
        shape = ",".join(map(str, spec.input_shape))
        first = str(exc).strip().splitlines()[0]
        raise SpecError(
            f"{spec.name} cannot run on input shape {shape} ({first}); check --input-shape"
        ) from None


def _example_tensor(x: np.ndarray):
    import torch

    return torch.from_numpy(np.ascontiguousarray(x))


def ncnn_feed(feed: dict, names: list[str]) -> dict:
    """Rename the spec's input to the blob name in the .param (pnnx writes in0, onnx2ncnn the ONNX name)."""
    if len(names) != len(feed):
        raise SpecError(f"the .param has inputs {names} but the model takes {list(feed)}")
    return dict(zip(names, feed.values(), strict=True))


def _compare(
    spec: ModelSpec,
    items,
    results: dict,
    precision: str,
    reference: str,
    save_vis: Path | None = None,
    fp16_weights: bool = False,
) -> tuple[list[dict], dict, dict]:
    """Tensor comparisons, task agreement and error histograms of every backend against the reference."""
    comparisons = []
    task: dict[str, dict] = {}
    histograms: dict = {"edges_log10": HIST_EDGES_LOG10}
    ref_outs = results[reference]
    for backend, outs in results.items():
        if backend == reference:
            continue
        prec = precision if backend in PRECISION_BACKENDS else "fp32"
        if fp16_weights and backend in NCNN_BACKENDS and prec == "fp32":
            prec = "fp16"  # pnnx rounded the weights to fp16: judged with the fp16 tolerances
        for name in spec.output_names:
            tol = spec.tolerance(backend, prec, name)
            counts = np.zeros(len(HIST_EDGES_LOG10) + 1, dtype=np.int64)
            for (label, _, _), ref, got in zip(items, ref_outs, outs, strict=True):
                ident = {"backend": backend, "reference": reference, "input": str(label), "output": name}
                comparisons.append(compare_tensors(ref[name], got[name], tol, **ident).to_dict())
                counts += error_histogram(ref[name], got[name])
            histograms.setdefault(backend, {})[name] = counts.tolist()
        if spec.task == "classify":
            task[backend] = _classify_agreement(spec, ref_outs, outs)
        elif spec.task == "detect":
            task[backend] = _detect_agreement(spec, items, ref_outs, outs, backend, reference, save_vis)
    return comparisons, task, histograms


def _classify_agreement(spec: ModelSpec, ref_outs: list[dict], outs: list[dict]) -> dict:
    k = int(spec.task_args.get("top_k", 5))
    name = spec.output_names[0]
    per_input = [topk_agreement(r[name], g[name], k) for r, g in zip(ref_outs, outs, strict=True)]
    top1 = sum(p["top1_match"] for p in per_input) / len(per_input)
    topk = sum(p[f"top{k}_overlap"] for p in per_input) / len(per_input)
    return {"top1_agreement": top1, f"top{k}_agreement": topk, "per_input": per_input, "passed": top1 == 1.0}


def _detect_agreement(
    spec: ModelSpec, items, ref_outs, outs, backend: str, reference: str, save_vis: Path | None
) -> dict:
    """Detection-level parity per photo (after the same decode + NMS on both sides); optionally the
    boxes drawn on the photo for a person to look at."""
    from .detect import DetectSettings, compare_raw, draw
    from .inputs import read_image

    settings = DetectSettings.from_task_args(spec.task_args, spec.source)
    name = spec.output_names[0]
    per_input = []
    for (label, _, geometry), ref, got in zip(items, ref_outs, outs, strict=True):
        parity, ref_dets, got_dets = compare_raw(ref[name], got[name], geometry, settings)
        per_input.append(
            {"input": str(label), "detections": len(got_dets.above(settings.conf)), **parity.to_dict()}
        )
        if save_vis is not None and geometry is not None:
            img = read_image(image_of(label))
            size = (
                str(label).rsplit("@", 1)[1]
                if "@" in str(label)
                else "x".join(map(str, spec.input_shape[2:]))
            )
            for who, dets in ((reference, ref_dets), (backend, got_dets)):
                path = Path(save_vis) / f"{image_of(label).stem}_{size}.{who}.jpg"
                _write_jpeg(path, draw(img, dets, settings.names, settings.conf))
    passed = sum(p["passed"] for p in per_input)
    return {
        "detection_agreement": passed / len(per_input),
        "per_input": per_input,
        "passed": passed == len(per_input),
    }


def _write_jpeg(path: Path, img: np.ndarray) -> None:
    import cv2

    ok, data = cv2.imencode(".jpg", img)
    if not ok:
        raise SpecError(f"OpenCV could not encode {path}")
    with atomic_path(path) as tmp:
        tmp.write_bytes(data.tobytes())
