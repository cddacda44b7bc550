"""bench_model: make the files, time and judge every backend and variant per thread count, pick."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np

from .. import judge
from ..atomic import write_text
from ..errors import SpecError
from ..inputs import calibration_images, inputs_for
from ..options import Recipe, RunOptions
from ..progress import StageTimer
from ..quantize.ort import OrtQuantRecipe, quantize_onnx
from ..registry import (
    REFERENCE,
    Artifacts,
    RunnerConfig,
    bench_backends,
    get_backend,
    parse_backends,
    select_backends,
)
from ..results import BackendResult, InputItem
from ..spec import ModelSpec, Tolerance
from ..stages import build_artifacts, convert_stage
from ..versions import versions
from .facts import file_entry, machine_info, model_info
from .records import RATIO_BASELINE, RATIO_BASELINE_INT8, BenchOptions, BenchReport, BenchRow
from .select import select_all
from .timing import Job, measure_with_retries, time_preprocessing
from .tune import TUNE_BACKEND, tune_variants
from .variants import BASELINE, MIXED, MIXED_BACKEND, VARIANT_BACKENDS, VARIANTS, Variant, mixed_variant


def validate(opts: BenchOptions) -> tuple[list[str], dict[str, tuple[bool, str | None]], judge.Budget]:
    """The backends to time (the reference first), the availability of each, the budget; a bad option
    is a SpecError before anything is measured."""
    if opts.runs < 1:
        raise SpecError(f"--runs must be at least 1, got {opts.runs}")
    if opts.warmup < 0:
        raise SpecError(f"--warmup must be 0 or more, got {opts.warmup}")
    if opts.retries < 0:
        raise SpecError(f"--retries must be 0 or more, got {opts.retries}")
    if not opts.threads or any(t < 1 for t in opts.threads):
        got = ",".join(map(str, opts.threads))
        raise SpecError(f"--threads must list thread counts of at least 1, e.g. 1,2; got {got or 'none'}")
    budget = judge.parse_budget(judge.DEFAULT_BUDGET if opts.budget is None else opts.budget)
    if opts.backends is not None:
        unsupported = [b for b in parse_backends(opts.backends) if not get_backend(b).bench]
        if unsupported:
            raise SpecError(
                f"bench does not time {', '.join(unsupported)}; choose from {', '.join(bench_backends())}"
            )
    backends, found = select_backends(opts.backends, default=bench_backends())
    if opts.tune and TUNE_BACKEND not in backends:
        raise SpecError(f"--tune searches the runtime options of {TUNE_BACKEND}; add it to --backends")
    if opts.keep_fp32 and MIXED_BACKEND not in backends:
        raise SpecError(f"--keep-fp32 adds an {MIXED_BACKEND}/{MIXED} row; add {MIXED_BACKEND} to --backends")
    return backends, found, budget


def bench_model(spec: ModelSpec, opts: BenchOptions) -> BenchReport:
    """Time every backend and ncnn variant at every thread count (each row in a fresh process), check
    each against the reference and pick the fastest variant within the budget at each thread count.
    Writes opts.out/bench.json."""
    backends, found, budget = validate(opts)
    timer = StageTimer()
    out = opts.out  # build_artifacts makes it ready once the model has loaded
    items = inputs_for(spec, list(opts.images), dynamic=False)  # timed at the spec's input shape only
    variants = [v for v in VARIANTS if v.backend in backends]
    if opts.keep_fp32:
        variants.insert(
            next(i for i, v in enumerate(variants) if v.name == "int8") + 1, mixed_variant(opts.keep_fp32)
        )
    plain = [b for b in backends if b not in VARIANT_BACKENDS]
    base_recipe = BASELINE.files_for(opts.recipe)  # the user's converter, fp32 weights
    model, files, labels = _make_files(spec, opts, base_recipe, variants, plain, items[0].tensor, timer)
    base = files[base_recipe]

    rows: list[BenchRow] = []
    for threads in opts.threads:
        ref_outs: list[dict] = []
        fp32_outs: dict[str, list[dict]] = {}  # backend -> its fp32 outputs (ncnn's: the baseline's)
        for backend, v in _row_order(plain, variants):
            art = files[v.files_for(base_recipe)] if v else base
            row, outs = _bench_row(spec, opts, backend, v, art, items, threads, ref_outs, timer)
            if backend == REFERENCE:
                ref_outs = outs
            if v is None or v is BASELINE:
                fp32_outs[backend] = outs
            elif (fp32 := fp32_outs.get(backend if v.peer else BASELINE.backend)) is not None:
                row.parity["max_abs_vs_fp32"] = _max_abs_between(spec, fp32, outs)
            rows.append(row)
        _set_ratios([r for r in rows if r.threads == threads])
    tuned = []
    if opts.tune:  # at the last thread count, judged against its reference outputs like every row
        tuned = tune_variants(
            variants, lambda v: files[v.files_for(base_recipe)], budget, threads,
            lambda v, art: _bench_row(spec, opts, v.backend, v, art, items, threads, ref_outs, timer)[0],
        )  # fmt: skip

    report = BenchReport(
        model=spec.name,
        spec=spec.source,
        options=opts,
        budget=budget,
        method=method_text(opts),
        input={"label": items[0].label, "count": len(items), "shape": list(spec.input_shape)},
        rows=rows,
        backends={n: BackendResult(n, available=ok, reason=why) for n, (ok, why) in found.items()},
        variants=variants,
        versions=versions(),
        machine=machine_info(),
        preprocess=(
            time_preprocessing(spec, items[0].image, opts.runs, opts.warmup) if items[0].image else None
        ),
        model_info=model_info(spec, model, base, items[0].feed),
        artifacts=_artifacts(files, labels, base_recipe),
        stages=timer.stages,
        tune=tuned,
    )
    for row in rows:
        report.backends[row.backend].device = row.device
    report.selection = select_all(rows, budget, opts.threads, spec.name)
    write_text(out / "bench.json", json.dumps(report.to_dict(), indent=2, default=_json_default) + "\n")
    return report


def _row_order(plain: list[str], variants: list[Variant]) -> list[tuple[str, Variant | None]]:
    """(backend, variant) in timing order: each plain backend and its peers, then the ncnn variants."""
    order: list[tuple[str, Variant | None]] = []
    for b in plain:
        order += [(b, None)] + [(b, v) for v in variants if v.backend == b]
    return order + [(v.backend, v) for v in variants if v.backend not in plain]


def _make_files(
    spec: ModelSpec, opts: BenchOptions, base: Recipe, variants: list[Variant], plain: list[str],
    x: np.ndarray, timer: StageTimer,
) -> tuple[object, dict[Recipe, Artifacts], dict[Recipe, str]]:  # fmt: skip
    """Export once, then convert once per distinct ncnn recipe that a row needs (`base` into opts.out, each
    other one into opts.out/VARIANT) and quantize the ONNX file once per ONNX Runtime recipe
    (model.int8.onnx beside model.onnx). Returns the eager model, {recipe: its artifacts, without the
    model} (`base` always present, converted or not) and {ncnn recipe: the variant it is named after}."""
    run_opts = RunOptions(out=opts.out, weights=opts.weights, recipe=base)
    exported = build_artifacts(spec, run_opts, x, opts.out, timer, convert_ncnn=False)
    model, exported = exported.model, replace(exported, model=None)  # workers rebuild it: jobs stay small
    labels: dict[Recipe, str] = {}
    if any(get_backend(b).family == "ncnn" for b in plain):
        labels[base] = BASELINE.name
    for v in variants:
        if isinstance(v.recipe, Recipe):
            labels.setdefault(v.files_for(base), v.name)
    files: dict[Recipe | OrtQuantRecipe, Artifacts] = {base: exported}
    for v in variants:
        if isinstance(v.recipe, OrtQuantRecipe) and v.recipe not in files:
            with timer.stage(f"quantize:{v.label}"):
                onnx = quantize_onnx(spec, exported.onnx, calibration_images(), v.recipe)
            files[v.recipe] = replace(exported, onnx=onnx)
    for recipe, name in labels.items():
        stage, folder = ("convert", opts.out) if recipe == base else (f"convert:{name}", opts.out / name)
        folder.mkdir(parents=True, exist_ok=True)
        with timer.stage(stage, show=False):  # convert() shows its own progress step
            files[recipe] = convert_stage(spec, exported, recipe, folder)
    return model, files, labels


def _artifacts(files: dict[Recipe, Artifacts], labels: dict[Recipe, str], base: Recipe) -> dict:
    """bench.json's files: the exported ones, the base recipe's .param/.bin, every other recipe's .bin
    (`ncnn_bin_fp16_weights`)."""
    art = files[base]
    out = {
        "torchscript": file_entry(art.torchscript),
        "onnx": file_entry(art.onnx),
        "ncnn_param": file_entry(art.ncnn_param),
        "ncnn_bin": file_entry(art.ncnn_bin),
    }
    for recipe, other in files.items():
        if isinstance(recipe, OrtQuantRecipe):
            out["onnx_int8"] = file_entry(other.onnx)
        elif recipe != base:
            out[f"ncnn_bin_{labels[recipe].replace('-', '_')}"] = file_entry(other.ncnn_bin)
    return out


def _bench_row(
    spec: ModelSpec, opts: BenchOptions, backend: str, variant: Variant | None, art: Artifacts,
    items: list[InputItem], threads: int, ref_outs: list[dict], timer: StageTimer,
) -> tuple[BenchRow, list[dict]]:  # fmt: skip
    """Measure one backend (variant) in a worker process and judge its outputs against `ref_outs`
    (the reference's own row is judged against itself)."""
    label = f"{backend}/{variant.name}" if variant else backend
    precision = variant.precision if variant else "fp32"
    config = RunnerConfig((spec.input_name,), tuple(spec.output_names), precision, threads)
    job = Job(
        backend, get_backend(backend).library, art, spec, opts.weights, [i.feed for i in items], config,
        opts.warmup, opts.runs,
    )  # fmt: skip
    stage = f"bench:{label}@{threads}"
    with timer.stage(stage):
        log = opts.out / "logs" / f"bench-{label.replace('/', '-')}-t{threads}.log"
        got, stats, attempts = measure_with_retries(job, log, stage, opts.retries)
    ref = got.outputs if backend == REFERENCE else ref_outs
    fp16_weights, int8 = (variant.fp16_weights, variant.int8) if variant else (False, False)
    verdict = judge.judge_backend(
        spec, backend, REFERENCE, items, ref, got.outputs, precision, fp16_weights, int8_model=int8
    )
    row = BenchRow(
        backend, variant.name if variant else None, threads, stats, verdict.summary(),
        peak_rss_mib=got.peak_rss_mib, baseline_rss_mib=got.baseline_rss_mib, device=got.device,
        attempts=attempts,
    )  # fmt: skip
    return row, got.outputs


def _set_ratios(rows: list[BenchRow]) -> None:
    """Each row's median and min as a multiple of ONNX Runtime fp32's, and its median as a multiple of
    ONNX Runtime int8's (rows of one thread count; a baseline that was not benched leaves None)."""
    fp32 = next((r for r in rows if r.name == RATIO_BASELINE), None)
    int8 = next((r for r in rows if r.name == RATIO_BASELINE_INT8), None)
    for r in rows:
        r.ratio_to_onnxruntime = _ratio(r, fp32, "median")
        r.ratio_to_onnxruntime_min = _ratio(r, fp32, "min")
        r.ratio_to_onnxruntime_int8 = _ratio(r, int8, "median")


def _ratio(row: BenchRow, base: BenchRow | None, stat: str) -> float | None:
    return None if base is None else round(row.latency_ms[stat] / base.latency_ms[stat], 4)


def _max_abs_between(spec: ModelSpec, a: list[dict], b: list[dict]) -> float:
    """The largest |a - b| over every input and output (judge's metric)."""
    exact = Tolerance(0.0, 0.0)
    ident = {"backend": "variant", "reference": BASELINE.name, "input": ""}
    return max(
        judge.compare_tensors(x[k], y[k], exact, output=k, **ident).max_abs
        for x, y in zip(a, b, strict=True)
        for k in spec.output_names
    )


def method_text(opts: BenchOptions) -> str:
    """How the numbers were taken, for bench.json and docs/performance.md."""
    text = (
        f"each backend/variant at each thread count in a fresh Python process: load, one call per input "
        f"(kept for parity), {opts.warmup} warm-up calls, {opts.runs} timed calls on the first input "
        "(inference only: Runner.last_latency_s); peak RSS is that process's VmHWM (/proc/self/status; "
        "ru_maxrss would include the parent's size, Linux keeps it across fork+exec), baseline after "
        "importing the backend's library, before loading the model"
    )
    if opts.retries:
        text += (
            f"; a row whose spread was wide was measured again (at most {opts.retries} more times) and "
            "the attempt with the lowest median kept"
        )
    return text


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
