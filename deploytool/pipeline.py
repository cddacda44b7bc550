"""Wires the stages for one model: spec -> model -> export -> convert -> every backend -> judge -> report."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from . import judge
from .backends import REFERENCE, Artifacts, get_backend, select_backends
from .cache import StageCache
from .errors import SpecError
from .export import DEFAULT_OPSET, check_opset, example_tensor, try_forward
from .infer import infer_all
from .inputs import input_source, inputs_for
from .model import build_model
from .options import RunOptions
from .progress import StageTimer
from .results import BackendResult, InputItem, RunReport
from .spec import ModelSpec
from .stages import EXPORT_FORMATS, build_artifacts, export_model
from .versions import versions


def run(spec: ModelSpec, opts: RunOptions) -> RunReport:
    """Run the whole pipeline. Never raises for a parity failure: `report.passed` says it.
    (--precision auto, which picks the variant first, is bench.auto.run_auto.)"""
    timer = StageTimer()
    backends, found = select_backends(opts.backends)
    items = inputs_for(spec, list(opts.images))
    out = Path(opts.out)
    needs_ncnn = any(get_backend(b).family == "ncnn" for b in backends)
    cache = StageCache(opts.cache)
    art = build_artifacts(spec, opts, items[0].tensor, out, timer, convert_ncnn=needs_ncnn, cache=cache)
    outputs, results = infer_all(spec, art, opts, backends, items, timer, cache=cache)
    report = judge_run(spec, art, opts, items, outputs, results, timer, found=found)
    if cache.hits:
        report.notes.append(f"reused from the stage cache {opts.cache}: {', '.join(cache.hits)}")
        for kind in cache.hits:  # report.json: stages.<kind>.cached
            report.stages.setdefault(kind, {"seconds": 0.0})["cached"] = True
    return report


def export(spec: ModelSpec, out: Path, formats: str, opset: int = DEFAULT_OPSET, weights: str | None = None):
    """`deploytool export`: build the model and write the requested formats; returns the paths."""
    check_opset(opset)
    wanted = tuple(f.strip() for f in formats.split(",") if f.strip())
    bad = [f for f in wanted if f not in EXPORT_FORMATS]
    if bad or not wanted:
        raise SpecError(f"unknown format(s) {', '.join(bad) or '(none)'}; use --formats torchscript,onnx")
    timer = StageTimer()
    with timer.stage("load"):
        model = build_model(spec, weights)
        x = np.zeros(spec.input_shape, np.float32)
        try_forward(model, example_tensor(x), spec)
    with timer.stage("export"):
        art = export_model(spec, model, x, out, opset, wanted)
    return [p for p in (art.torchscript, art.onnx) if p is not None]


def judge_run(
    spec: ModelSpec, art: Artifacts, opts: RunOptions, items: list[InputItem], outputs: dict[str, list[dict]],
    results: dict[str, BackendResult], timer: StageTimer, reference: str = REFERENCE,
    found: dict[str, tuple[bool, str | None]] | None = None,
) -> RunReport:  # fmt: skip
    """Judge every backend against the reference and build the report."""
    backends = dict(results)
    for info in results.values():
        if "image_path" in info.extra:
            info.extra["image_path"] = judge.judge_image_path(info.extra["image_path"])
    for name, (ok, reason) in (found or {}).items():
        if not ok:
            backends[name] = BackendResult(name, available=False, reason=reason)
    report = RunReport(
        model=spec.name,
        spec=spec.source,
        reference=reference,
        versions=versions(),
        artifacts={
            "torchscript": _str(art.torchscript),
            "onnx": _str(art.onnx),
            "ncnn_param": _str(art.ncnn_param),
            "ncnn_bin": _str(art.ncnn_bin),
            "converter": art.converter,
            "converter_log": _str(art.converter_log),
            "fp16_weights": opts.recipe.fp16_weights,
            "int8_table": _str(art.int8_table),
            "int8_layers": list(art.int8_layers),
            "int8_method": opts.recipe.quantize if opts.recipe.int8 and opts.recipe.table is None else None,
            "weights": str(Path(opts.weights).resolve()) if opts.weights else None,
        },
        input={
            "name": spec.input_name,
            "shape": list(spec.input_shape),
            "dynamic_shapes": [list(d) for d in spec.dynamic_shapes],  # also checked, from the same files
            "source": input_source(spec, opts.images),  # photos, [inputs] (generator or .npy) or random
        },
        backends=backends,
        stages=timer.stages,
        histograms={"edges_log10": judge.HIST_EDGES_LOG10},
    )
    with timer.stage("compare"):
        for backend, outs in outputs.items():
            if backend == reference:
                continue
            verdict = judge.judge_backend(
                spec, backend, reference, items, outputs[reference], outs, opts.ncnn_precision,
                opts.recipe.fp16_weights,
            )  # fmt: skip
            report.comparisons += verdict.comparisons
            report.histograms[backend] = verdict.histograms
            if verdict.task is not None:
                report.task[backend] = verdict.task
            if opts.save_vis is not None:
                from .vis import draw_verdict

                draw_verdict(spec, verdict, Path(opts.save_vis))
    return report


def _str(path: Path | None) -> str | None:
    return None if path is None else str(path)
