"""Latency, memory and size of every backend and ncnn precision variant; the pick within a parity budget."""

from __future__ import annotations

import difflib
import gc
import json
import math
import os
import pickle
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .atomic import write_text
from .backends import NCNN_BACKENDS, REFERENCE, Artifacts, create_runner
from .backends.ncnn_runner import NcnnRunner, vulkan_device_name
from .compare import compare_tensors, topk_agreement
from .convert import convert
from .errors import BackendError, ParityError, SpecError
from .ncnn_param import read_param
from .pipeline import (
    RunOptions,
    StageTimer,
    build_artifacts,
    by_spec_name,
    inputs_for,
    ncnn_feed,
    select_backends,
    versions,
)
from .report import fmt
from .spec import ModelSpec, build_model

SCHEMA = 1
BENCH_BACKENDS = ["torch", "torchscript", "onnxruntime", "ncnn-cpu", "ncnn-vulkan"]
DEFAULT_BUDGET = "top1=1.0,rel=1e-2"
SPREAD_WIDE = 0.25  # (p90 - min) / median above this gets a spread_note
WORKER_TIMEOUT_S = 900
CPU_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16")


@dataclass
class BenchOptions:
    """Everything `deploytool bench` takes besides the model."""

    out: Path
    runs: int = 20
    warmup: int = 3
    threads: list[int] = field(default_factory=lambda: [2])
    backends: str | None = None  # None: BENCH_BACKENDS, the unavailable ones reported and skipped
    images: list[Path] = field(default_factory=list)
    weights: str | None = None
    budget: str | None = None  # None: DEFAULT_BUDGET
    retries: int = 0  # re-measure a row with a wide spread up to this often; the lowest median is kept


@dataclass(frozen=True)
class Variant:
    """One way to run the converted ncnn model: which runner, which .bin, which ncnn Option fields."""

    name: str
    backend: str
    description: str
    fp16_weights: bool = False
    precision: str = "fp32"  # the runner's precision (set_precision in backends/ncnn_runner.py)


VARIANTS = (
    Variant("fp32", "ncnn-cpu", "fp32 weights; fp16/bf16 storage and arithmetic off"),
    Variant(
        "fp16-weights",
        "ncnn-cpu",
        "weights stored as fp16 in the .bin (pnnx fp16=1), expanded to fp32 at load; fp32 compute",
        fp16_weights=True,
    ),
    Variant(
        "fp16",
        "ncnn-cpu",
        "ncnn's defaults: fp16 storage, packing and arithmetic in the layers that have them on this CPU",
        precision="fp16",
    ),
    Variant(
        "bf16",
        "ncnn-cpu",
        "bf16 storage and packing on, fp16 off",
        precision="bf16",
    ),
    Variant(
        "vulkan",
        "ncnn-vulkan",
        "Vulkan compute, fp16 storage on the device, fp32 arithmetic",
    ),
)
VARIANT_NAMES = tuple(v.name for v in VARIANTS)


# ---------------------------------------------------------------- statistics


def latency_stats(samples_s: list[float]) -> dict:
    """Milliseconds: median, p90 (linear interpolation), min, mean, stdev (sample; 0 for one run),
    spread = (p90 - min) / median, and a spread_note when the spread is wide."""
    if not samples_s:
        raise ValueError("latency_stats needs at least one sample")
    ms = np.asarray(samples_s, dtype=np.float64) * 1e3
    median = float(np.median(ms))
    p90 = float(np.percentile(ms, 90))
    low = float(ms.min())
    spread = (p90 - low) / median if median > 0 else 0.0
    stats = {
        "n": int(ms.size),
        "median": round(median, 4),
        "p90": round(p90, 4),
        "min": round(low, 4),
        "mean": round(float(ms.mean()), 4),
        "stdev": round(statistics.stdev(ms.tolist()), 4) if ms.size > 1 else 0.0,
        "spread": round(spread, 4),
        "spread_note": None,
    }
    if spread > SPREAD_WIDE:
        stats["spread_note"] = (
            f"wide spread: p90 {p90:.3g} ms vs min {low:.3g} ms ({spread:.0%} of the median); "
            "the machine was likely busy, compare medians with care or rerun with more --runs"
        )
    return stats


# ---------------------------------------------------------------- budget


@dataclass(frozen=True)
class Budget:
    """What a variant must keep, compared with torch over every input.

    top1, top5: minimum share of inputs whose top-1 class matches / share of the reference's top-5
    found in the variant's top-5 (classify specs). det: minimum share of inputs whose detections
    match the reference's (deploytool.detect.match_detections; detect specs). rel: maximum of
    max|got - ref| / max|ref|, per output and input (the worst error relative to the output's largest
    magnitude; unlike elementwise relative error it does not explode on near-zero logits).
    abs: maximum of max|got - ref|.
    """

    top1: float | None = None
    top5: float | None = None
    det: float | None = None
    rel: float | None = None
    abs: float | None = None
    text: str = ""

    def failures(self, parity: dict) -> list[str]:
        """Why `parity` (a result's parity dict) is outside this budget; empty when it fits."""
        out = []
        for key, at_least in (("top1", True), ("top5", True), ("det", True), ("rel", False), ("abs", False)):
            limit = getattr(self, key)
            if limit is None:
                continue
            value = parity.get({"abs": "max_abs", "det": "detections"}.get(key, key))
            if value is None:
                out.append(f"{key} not measured (task {parity.get('task', '?')})")
            elif isinstance(value, str) or not math.isfinite(value):
                out.append(f"{key} {value}")
            elif at_least and value < limit:
                out.append(f"{key} {value:.3g} < {limit:g}")
            elif not at_least and value > limit:
                out.append(f"{key} {value:.3g} > {limit:g}")
        return out


BUDGET_KEYS = ("top1", "top5", "det", "rel", "abs")


def parse_budget(text: str) -> Budget:
    """'top1=1.0,rel=1e-2' -> Budget; anything malformed is a SpecError naming the bad part."""
    example = f"e.g. --budget {DEFAULT_BUDGET}"
    items = [p.strip() for p in (text or "").split(",") if p.strip()]
    if not items:
        raise SpecError(f"--budget is empty; give key=value pairs from {', '.join(BUDGET_KEYS)} ({example})")
    values: dict[str, float] = {}
    for item in items:
        key, sep, raw = (s.strip() for s in item.partition("="))
        if not sep:
            raise SpecError(f"--budget: {item!r} is not key=value ({example})")
        if key not in BUDGET_KEYS:
            close = difflib.get_close_matches(key, BUDGET_KEYS, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise SpecError(f"--budget: unknown key {key!r}; {hint}use {', '.join(BUDGET_KEYS)} ({example})")
        if key in values:
            raise SpecError(f"--budget: {key} is given twice")
        try:
            value = float(raw)
        except ValueError:
            raise SpecError(f"--budget: {key}={raw!r} is not a number ({example})") from None
        if not math.isfinite(value) or value < 0:
            raise SpecError(f"--budget: {key} must be a finite number >= 0, got {raw}")
        if key in ("top1", "top5", "det") and value > 1:
            raise SpecError(f"--budget: {key} is a share of inputs in [0, 1], got {raw}")
        values[key] = value
    return Budget(**values, text=",".join(f"{k}={values[k]:g}" for k in BUDGET_KEYS if k in values))


def select_variant(result: dict, budget: Budget, threads: int | None = None) -> tuple[str, str]:
    """The fastest ncnn variant (by median at `threads`, default the most benched) within `budget`,
    with the reason. Raises ParityError listing every variant and why it failed when none fits."""
    entries = [r for r in result.get("results", []) if r.get("variant")]
    if not entries:
        raise SpecError("no ncnn variant was benched; include ncnn-cpu or ncnn-vulkan in --backends")
    if threads is None:
        threads = max(r["threads"] for r in entries)
    entries = [r for r in entries if r["threads"] == threads]
    if not entries:
        raise SpecError(f"no ncnn variant was benched at {threads} threads")
    fits, failed = [], []
    for r in sorted(entries, key=lambda r: r["latency_ms"]["median"]):
        why = budget.failures(r["parity"])
        (failed if why else fits).append((r, why))
    if not fits:
        lines = "; ".join(f"{r['variant']}: {', '.join(why)}" for r, why in failed)
        raise ParityError(
            f"no ncnn variant of {result.get('model', '?')} fits budget {budget.text!r} at {threads} "
            f"threads: {lines}; loosen --budget or keep fp32"
        )
    best = fits[0][0]
    faster = [f"{r['variant']} ({', '.join(why)})" for r, why in failed if _faster(r, best)]
    p = best["parity"]
    ratio = best.get("ratio_to_onnxruntime")
    vs_ort = f", {ratio:.2f}x onnxruntime" if ratio else ""
    task = "".join(f", {k} {p[k]:.2f}" for k in ("top1", "top5", "detections") if p.get(k) is not None)
    reason = (
        f"{best['variant']} is the fastest variant within {budget.text} at {threads} threads: "
        f"median {best['latency_ms']['median']:.2f} ms{vs_ort}; rel {p['rel']:.2g}, "
        f"max_abs {p['max_abs']:.2g}{task}"
    )
    if faster:
        reason += "; faster but outside the budget: " + ", ".join(faster)
    return best["variant"], reason


def variant_run_options(name: str, backends: str | None) -> dict:
    """RunOptions fields that make `run` write and check the files of variant `name`."""
    variant = next((v for v in VARIANTS if v.name == name), None)
    if variant is None:
        raise SpecError(f"unknown variant {name!r}; variants: {', '.join(VARIANT_NAMES)}")
    fields = {"ncnn_precision": variant.precision, "fp16_weights": variant.fp16_weights}
    if variant.backend == "ncnn-vulkan" and backends is None:
        fields["backends"] = "torch,onnxruntime,ncnn-vulkan"
    return fields


def _faster(r: dict, best: dict) -> bool:
    return r["latency_ms"]["median"] < best["latency_ms"]["median"]


# ---------------------------------------------------------------- machine


def machine_info() -> dict:
    """CPU model, core count, the SIMD flags that decide ncnn's and ORT's kernels, the Vulkan device."""
    model, flags = None, set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and model is None:
                model = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass
    info: dict = {
        "cpu": model,
        "cores": os.cpu_count(),
        "flags": {f: f in flags for f in CPU_FLAGS},
        "ncnn_cpu_support": {},
        "vulkan_device": None,
    }
    try:
        import ncnn

        info["ncnn_cpu_support"] = {
            n[len("cpu_support_") :]: bool(getattr(ncnn, n)())
            for n in dir(ncnn)
            if n.startswith("cpu_support_")
        }
        info["vulkan_device"] = vulkan_device_name()
    except ImportError:
        pass
    return info


# ---------------------------------------------------------------- model facts


def count_parameters(model) -> int:
    return int(sum(p.numel() for p in model.parameters()))


MAC_LAYERS = (
    "Convolution",
    "Convolution1D",
    "Convolution3D",
    "ConvolutionDepthWise",
    "ConvolutionDepthWise1D",
    "ConvolutionDepthWise3D",
    "InnerProduct",
    "Deconvolution",
    "DeconvolutionDepthWise",
    "Gemm",
    "MatMul",
)


def count_macs(graph, shapes: dict[str, tuple[int, ...]]) -> dict:
    """Multiply-accumulates of the .param graph's Convolution/ConvolutionDepthWise/InnerProduct/Gemm
    (and Deconvolution, MatMul) layers, from each layer's weight_data_size and its blobs' shapes
    (`shapes`: blob -> ncnn Mat shape). Elementwise layers (ReLU, add, pooling, folded BatchNorm) are
    not counted."""
    by_type: dict[str, int] = {}
    skipped: list[str] = []
    for layer in graph.layers:
        if layer.type not in MAC_LAYERS:
            continue
        out = shapes.get(layer.tops[0]) if layer.tops else None
        inp = shapes.get(layer.bottoms[0]) if layer.bottoms else None
        if out is None or inp is None:
            skipped.append(layer.name)
            continue
        out_n, in_n = math.prod(out), math.prod(inp)
        if layer.type in ("Gemm", "MatMul"):
            trans_a = layer.get(2, 0) if layer.type == "Gemm" else 0
            k = layer.get(9, 0) if layer.type == "Gemm" else 0
            k = k or (inp[-2] if trans_a and len(inp) > 1 else inp[-1])
            macs = out_n * k
        elif layer.type.startswith("Deconvolution"):
            weights = layer.get(6, 0)
            macs = weights * (in_n // max(inp[0], 1))  # every input pixel scatters one kernel per channel
        else:
            weights = layer.get(2 if layer.type == "InnerProduct" else 6, 0)
            macs = weights * (out_n // max(layer.get(0, 1), 1))  # weight count x output positions
        by_type[layer.type] = by_type.get(layer.type, 0) + int(macs)
    total = sum(by_type.values())
    return {
        "macs": total,
        "flops": 2 * total,
        "by_type": by_type,
        "skipped_layers": skipped,
        "method": "counted from the ncnn .param graph: weight_data_size x output positions per "
        "Convolution/ConvolutionDepthWise/InnerProduct (Gemm/MatMul: output elements x K), blob shapes "
        "from one ncnn-cpu fp32 extraction; FLOPs = 2 x MACs; elementwise layers not counted",
    }


def _blob_shapes(param: Path, bin_: Path, feed: dict) -> dict[str, tuple[int, ...]]:
    runner = NcnnRunner(param, bin_, precision="fp32", threads=1)
    with runner:
        blobs = runner.extract_all(ncnn_feed(feed, runner.input_names))
    return {k: tuple(v.shape) for k, v in blobs.items()}


def _file_entry(path: Path | None) -> dict | None:
    if path is None or not Path(path).is_file():
        return None
    return {"path": str(path), "bytes": Path(path).stat().st_size}


# ---------------------------------------------------------------- runners in a fresh process


@dataclass
class _Job:
    """What one worker process measures: one backend (or variant) at one thread count."""

    backend: str
    variant: Variant | None
    art: Artifacts
    spec: ModelSpec
    weights: str | None
    feeds: list[dict]
    threads: int
    warmup: int
    runs: int


def _peak_rss_mib() -> float:
    """This process's peak resident set size. VmHWM from /proc/self/status, because Linux carries
    ru_maxrss across fork+exec: a worker's ru_maxrss starts at its parent's resident size."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _import_backend_library(backend: str) -> None:
    if backend in ("torch", "torchscript"):
        import torch  # noqa: F401
    elif backend == "onnxruntime":
        import onnxruntime  # noqa: F401
    else:
        import ncnn  # noqa: F401


def _make_runner(job: _Job):
    spec, v = job.spec, job.variant
    names = ([spec.input_name], spec.output_names)
    art = job.art
    if job.backend == "torch":
        art = Artifacts(model=build_model(spec, job.weights))
    return create_runner(job.backend, art, *names, v.precision if v else "fp32", job.threads)  # as `run` does


def _worker(job_path: str, result_path: str) -> None:
    """Entry point of the worker process: load, infer every input once (kept for parity), then
    `warmup` and `runs` timed calls on the first input; peak RSS before loading and at the end."""
    with open(job_path, "rb") as fh:
        job: _Job = pickle.load(fh)
    _import_backend_library(job.backend)
    baseline = _peak_rss_mib()
    runner = _make_runner(job)
    feeds = job.feeds
    with runner:
        if job.backend in NCNN_BACKENDS:
            feeds = [ncnn_feed(f, runner.input_names) for f in feeds]
        outputs = [by_spec_name(runner.infer(f), job.spec.output_names) for f in feeds]
        for _ in range(job.warmup):
            runner.infer(feeds[0])
        gc.collect()
        samples = []
        for _ in range(job.runs):
            runner.infer(feeds[0])
            samples.append(runner.last_latency_s)
        device = runner.device()
    result = {
        "samples": samples,
        "outputs": outputs,
        "device": device,
        "baseline_rss_mib": baseline,
        "peak_rss_mib": _peak_rss_mib(),
    }
    with open(result_path, "wb") as fh:
        pickle.dump(result, fh)


def _run_worker(job: _Job, log: Path) -> dict:
    """Run `_worker` in a fresh interpreter, so threads, caches and peak RSS belong to one backend."""
    with tempfile.TemporaryDirectory(prefix="deploytool-bench-") as tmp:
        job_path, result_path = Path(tmp) / "job.pkl", Path(tmp) / "result.pkl"
        with open(job_path, "wb") as fh:
            pickle.dump(job, fh)
        env = dict(os.environ)
        root = str(Path(__file__).resolve().parent.parent)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        code = "import sys; from deploytool.bench import _worker; _worker(sys.argv[1], sys.argv[2])"
        cmd = [sys.executable, "-c", code, str(job_path), str(result_path)]
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "w") as fh:
            fh.write("$ " + " ".join(cmd) + "\n")
            fh.flush()
            try:
                proc = subprocess.run(
                    cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, timeout=WORKER_TIMEOUT_S
                )
            except subprocess.TimeoutExpired:
                raise BackendError(
                    f"bench: {log.stem} timed out after {WORKER_TIMEOUT_S} s; log: {log}"
                ) from None
        if proc.returncode != 0 or not result_path.is_file():
            tail = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()][-1:]
            hint = f" (last line: {tail[0].strip()[:200]})" if tail else ""
            raise BackendError(f"bench: {log.stem} exited with code {proc.returncode}{hint}; log: {log}")
        with open(result_path, "rb") as fh:
            return pickle.load(fh)


def _measure(job: _Job, log: Path, retries: int) -> tuple[dict, dict, list[dict]]:
    """Run the worker; while its spread is wide (a busy shared machine), run it again, up to `retries`
    times, and keep the attempt with the lowest median. Every attempt's median, min and the 1-minute
    load average before it are returned for the record."""
    best, best_stats, attempts = None, None, []
    for _ in range(retries + 1):
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
        got = _run_worker(job, log)
        stats = latency_stats(got["samples"])
        attempts.append({"median": stats["median"], "min": stats["min"], "loadavg_1min": load})
        if best_stats is None or stats["median"] < best_stats["median"]:
            best, best_stats = got, stats
        if stats["spread_note"] is None:
            break
    return best, best_stats, attempts


# ---------------------------------------------------------------- parity


def _tolerance(spec: ModelSpec, variant: Variant | None, backend: str, output: str):
    """The spec's tolerance for a variant, resolved as `run` does (fp16 weights count as fp16)."""
    precision = variant.precision if variant else "fp32"
    if variant and variant.fp16_weights and precision == "fp32":
        precision = "fp16"
    return spec.tolerance(backend, precision, output), precision


def task_agreement(spec: ModelSpec, ref_outs: list[dict], outs: list[dict], geometries=None) -> dict:
    """Task-level agreement with the reference over every input: top-1/top-5 for classify specs,
    matched detections (deploytool.detect.match_detections) for detect specs, nothing otherwise."""
    name = spec.output_names[0]
    if spec.task == "classify":
        per = [topk_agreement(r[name], g[name], 5) for r, g in zip(ref_outs, outs, strict=True)]
        return {
            "top1": sum(p["top1_match"] for p in per) / len(per),
            "top5": sum(p["top5_overlap"] for p in per) / len(per),
        }
    if spec.task == "detect":
        try:
            from .detect import DetectSettings, compare_raw
        except ImportError:
            return {}
        settings = DetectSettings.from_task_args(spec.task_args, spec.source)
        geoms = list(geometries or [None] * len(outs))
        results = [
            compare_raw(r[name], g[name], geo, settings)[0]
            for r, g, geo in zip(ref_outs, outs, geoms, strict=True)
        ]
        return {"detections": sum(r.passed for r in results) / len(results)}
    return {}


def parity_summary(
    spec: ModelSpec, backend: str, variant: Variant | None, ref_outs, outs, geoms=None
) -> dict:
    """Worst tensor parity over inputs and outputs (spec tolerances), rel as in Budget, task agreement."""
    max_abs, rel, cosine, passed, min_atol = 0.0, 0.0, 1.0, True, 0.0
    tol_used, tol_key = None, "fp32"
    for ref, got in zip(ref_outs, outs, strict=True):
        for name in spec.output_names:
            tol, tol_key = _tolerance(spec, variant, backend, name)
            tol_used = tol_used or tol
            c = compare_tensors(
                ref[name], got[name], tol, backend=backend, reference=REFERENCE, input="", output=name
            )
            peak = float(np.abs(np.asarray(ref[name], dtype=np.float64)).max(initial=0.0))
            max_abs = max(max_abs, c.max_abs)
            rel = max(rel, c.max_abs / peak if peak > 0 else (0.0 if c.max_abs == 0 else math.inf))
            cosine = min(cosine, c.cosine)
            min_atol = max(min_atol, c.min_atol)
            passed = passed and c.passed
    out = {
        "reference": REFERENCE,
        "task": spec.task,
        "max_abs": max_abs,
        "rel": rel,
        "cosine": cosine,
        "passed": passed,
        "tolerance": {"precision": tol_key, "atol": tol_used.atol, "rtol": tol_used.rtol}
        if tol_used
        else None,
        "min_atol": min_atol,
        "top1": None,
        "top5": None,
    }
    out.update(task_agreement(spec, ref_outs, outs, geoms))
    return out


def _max_abs_between(a: list[dict], b: list[dict]) -> float:
    return max(
        float(
            np.abs(np.asarray(x[k], np.float64) - np.asarray(y[k], np.float64).reshape(np.shape(x[k]))).max()
        )
        for x, y in zip(a, b, strict=True)
        for k in x
    )


# ---------------------------------------------------------------- the benchmark


def _validate(opts: BenchOptions) -> tuple[list[str], dict]:
    if opts.runs < 1:
        raise SpecError(f"--runs must be at least 1, got {opts.runs}")
    if opts.warmup < 0:
        raise SpecError(f"--warmup must be 0 or more, got {opts.warmup}")
    if not opts.threads or any(t < 1 for t in opts.threads):
        raise SpecError(f"--threads must list thread counts of at least 1, e.g. 1,2; got {opts.threads}")
    backends, info = select_backends(opts.backends, default=BENCH_BACKENDS)
    unsupported = [b for b in backends if b not in BENCH_BACKENDS]
    if unsupported:
        raise SpecError(
            f"bench does not time {', '.join(unsupported)}; choose from {', '.join(BENCH_BACKENDS)}"
        )
    return backends, info


def time_preprocessing(spec: ModelSpec, image: Path, runs: int, warmup: int) -> dict:
    """Image decode (cv2.imread) and preprocessing (resize, colour, normalise) timed apart."""
    from .inputs import preprocess, read_image

    height, width = spec.input_shape[2], spec.input_shape[3]
    read_s, pre_s = [], []
    for i in range(warmup + runs):
        start = time.perf_counter()
        img = read_image(image)
        mid = time.perf_counter()
        preprocess(img, spec.preprocess, width, height)
        end = time.perf_counter()
        if i >= warmup:
            read_s.append(mid - start)
            pre_s.append(end - mid)
    return {"image": str(image), "decode_ms": latency_stats(read_s), "preprocess_ms": latency_stats(pre_s)}


def bench_model(spec: ModelSpec, opts: BenchOptions) -> dict:
    """Export and convert as `run` does, time every backend and ncnn variant at every thread count
    (each in a fresh process), check each against torch, pick the variant within the budget; returns
    bench.json's dict and writes it to opts.out/bench.json."""
    backends, backend_info = _validate(opts)
    budget = parse_budget(opts.budget or DEFAULT_BUDGET)
    timer = StageTimer()
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    items = inputs_for(spec, opts, dynamic=False)  # timed at the spec's input shape only
    feeds = [feed for _, feed, _ in items]
    geoms = [geo for _, _, geo in items]

    variants = [v for v in VARIANTS if v.backend in backends]
    art = build_artifacts(
        spec,
        RunOptions(out=out, weights=opts.weights),
        feeds[0][spec.input_name],
        out,
        timer,
        convert_ncnn=bool(variants),
    )
    model, art.model = art.model, None  # workers rebuild it: the job file stays small
    fp16_art = None
    if variants:
        dyn = spec.dynamic_shapes[0] if spec.dynamic_shapes else None
        if any(v.fp16_weights for v in variants):
            with timer.stage("convert:fp16-weights"):
                c16 = convert(
                    art.torchscript, out / "fp16-weights", "pnnx", spec.input_shape, dyn,
                    fp16_weights=True, moduleop=spec.pnnx_moduleop,
                )  # fmt: skip
            fp16_art = Artifacts(ncnn_param=c16.param, ncnn_bin=c16.bin)

    configs: list[tuple[str, Variant | None]] = [(b, None) for b in backends if b not in NCNN_BACKENDS]
    configs += [(v.backend, v) for v in variants]
    results: list[dict] = []
    fp32_outs: dict[int, list[dict]] = {}
    for threads in opts.threads:
        ref_outs = None
        for backend, variant in configs:
            label = f"{backend}/{variant.name}" if variant else backend
            job_art = fp16_art if variant and variant.fp16_weights else art
            job = _Job(backend, variant, job_art, spec, opts.weights, feeds, threads, opts.warmup, opts.runs)
            with timer.stage(f"bench:{label}@{threads}"):
                log = out / "logs" / f"bench-{label.replace('/', '-')}-t{threads}.log"
                got, stats, attempts = _measure(job, log, opts.retries)
            backend_info[backend]["device"] = got["device"]
            if backend == REFERENCE:
                ref_outs = got["outputs"]
            entry = {
                "name": label,
                "backend": backend,
                "variant": variant.name if variant else None,
                "threads": threads,
                "latency_ms": stats,
                "attempts": attempts,
                "ratio_to_onnxruntime": None,
                "ratio_to_onnxruntime_min": None,
                "memory": {
                    "peak_rss_mib": round(got["peak_rss_mib"], 1),
                    "baseline_rss_mib": round(got["baseline_rss_mib"], 1),
                    "model_rss_mib": round(got["peak_rss_mib"] - got["baseline_rss_mib"], 1),
                },
                "parity": parity_summary(spec, backend, variant, ref_outs, got["outputs"], geoms),
            }
            if variant and variant.name == "fp32":
                fp32_outs[threads] = got["outputs"]
            if variant and variant.name != "fp32" and threads in fp32_outs:
                entry["parity"]["max_abs_vs_fp32"] = _max_abs_between(fp32_outs[threads], got["outputs"])
            results.append(entry)
        ort = next((r for r in results if r["backend"] == "onnxruntime" and r["threads"] == threads), None)
        for r in results:
            if ort and r["threads"] == threads:
                r["ratio_to_onnxruntime"] = round(r["latency_ms"]["median"] / ort["latency_ms"]["median"], 4)
                r["ratio_to_onnxruntime_min"] = round(r["latency_ms"]["min"] / ort["latency_ms"]["min"], 4)

    result = {
        "schema": SCHEMA,
        "kind": "bench",
        "model": spec.name,
        "spec": spec.source,
        "versions": versions(),
        "machine": machine_info(),
        "options": {
            "runs": opts.runs,
            "warmup": opts.warmup,
            "threads": list(opts.threads),
            "budget": budget.text,
            "retries": opts.retries,
        },
        "method": (
            f"each backend/variant at each thread count in a fresh Python process: load, one call per input "
            f"(kept for parity), {opts.warmup} warm-up calls, {opts.runs} timed calls on the first input "
            "(inference only: Runner.last_latency_s); peak RSS is that process's VmHWM (/proc/self/status; "
            "ru_maxrss would include the parent's size, Linux keeps it across fork+exec), baseline after "
            "importing the backend's library, before loading the model"
            + (
                f"; a row whose spread was wide was measured again (at most {opts.retries} more times) and "
                "the attempt with the lowest median kept"
                if opts.retries
                else ""
            )
        ),
        "input": {"label": str(items[0][0]), "count": len(items), "shape": list(spec.input_shape)},
        "preprocess": (
            time_preprocessing(spec, Path(items[0][0]), opts.runs, opts.warmup) if opts.images else None
        ),
        "model_info": _model_info(model, art, feeds[0]),
        "artifacts": {
            "torchscript": _file_entry(art.torchscript),
            "onnx": _file_entry(art.onnx),
            "ncnn_param": _file_entry(art.ncnn_param),
            "ncnn_bin": _file_entry(art.ncnn_bin),
            "ncnn_bin_fp16_weights": _file_entry(fp16_art.ncnn_bin if fp16_art else None),
        },
        "backends": backend_info,
        "variants": {v.name: _variant_info(v) for v in variants},
        "results": results,
        "stages": timer.stages,
    }
    result["selection"] = _selection(result, budget)
    write_text(out / "bench.json", json.dumps(result, indent=2, default=_json_default) + "\n")
    return result


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _variant_info(v: Variant) -> dict:
    return {
        "backend": v.backend,
        "description": v.description,
        "fp16_weights": v.fp16_weights,
        "precision": v.precision,
    }


def _model_info(model, art: Artifacts, feed: dict) -> dict:
    info = {"parameters": count_parameters(model), "macs": None, "flops": None}
    if art.ncnn_param is not None:
        try:
            info.update(
                count_macs(read_param(art.ncnn_param), _blob_shapes(art.ncnn_param, art.ncnn_bin, feed))
            )
        except Exception as exc:  # counting is informative only; a failure must not lose the timings
            info["macs_error"] = f"{type(exc).__name__}: {exc}"
    return info


def _selection(result: dict, budget: Budget) -> dict:
    """select_variant at every benched thread count, recorded (not raised) for bench.json."""
    out = {"budget": budget.text, "by_threads": {}}
    if not any(r.get("variant") for r in result["results"]):
        return out
    for threads in result["options"]["threads"]:
        try:
            name, reason = select_variant(result, budget, threads)
            out["by_threads"][str(threads)] = {"variant": name, "reason": reason, "fits": True}
        except ParityError as exc:
            out["by_threads"][str(threads)] = {"variant": None, "reason": str(exc), "fits": False}
    return out


# ---------------------------------------------------------------- rendering


def table_rows(result: dict) -> list[list[str]]:
    """One row per result: name, threads, median, p90, min, x ORT, max_abs, rel, top1, peak RSS (model)."""
    rows = []
    for r in result["results"]:
        lat, p, mem = r["latency_ms"], r["parity"], r["memory"]
        ref = r["backend"] == REFERENCE
        rows.append(
            [
                r["name"],
                str(r["threads"]),
                f"{lat['median']:.2f}" + ("*" if lat.get("spread_note") else ""),
                f"{lat['p90']:.2f}",
                f"{lat['min']:.2f}",
                fmt(r["ratio_to_onnxruntime"], ".2f") + ("x" if r["ratio_to_onnxruntime"] else ""),
                "ref" if ref else fmt(p["max_abs"], ".2g"),
                "ref" if ref else fmt(p["rel"], ".2g"),
                "ref" if ref else _task_cell(p),
                f"{mem['peak_rss_mib']:.0f} ({mem['model_rss_mib']:+.0f})",
            ]
        )
    return rows


HEADERS = ["backend/variant", "threads", "median ms", "p90 ms", "min ms", "x ORT", "max_abs", "rel",
           "top1/det", "peak RSS MiB (model)"]  # fmt: skip


def _task_cell(parity: dict) -> str:
    """top-1 agreement (classify) or matched-detection share (detect), else '-'."""
    if parity.get("top1") is not None:
        return f"{parity['top1']:.2f}"
    if parity.get("detections") is not None:
        return f"det {parity['detections']:.2f}"
    return "-"


def render_bench(result: dict, console) -> None:
    """Rich table of every backend and variant, then model facts and the budget's pick."""
    from rich.table import Table

    table = Table(title=f"{result['model']}: latency (inference only), parity against torch, memory")
    for i, h in enumerate(HEADERS):
        table.add_column(h, justify="left" if i == 0 else "right")
    for row in table_rows(result):
        table.add_row(*row)
    console.print(table)
    for line in summary_lines(result):
        console.print(line, markup=False, highlight=False)


def summary_lines(result: dict) -> list[str]:
    """The facts below the table, as plain lines (console and Markdown)."""
    lines = []
    opts = result["options"]
    lines.append(
        f"median of {opts['runs']} timed runs after {opts['warmup']} warm-up; x ORT = median / onnxruntime's "
        "median at the same threads; rel = max|got-ref| / max|ref|; top1/det = share of inputs whose top-1 "
        "class / detections match torch; * = wide spread (busy machine)"
    )
    pre = result.get("preprocess")
    if pre:
        lines.append(
            f"pre-processing (not in the latencies): decode {pre['decode_ms']['median']:.2f} ms, "
            f"resize+normalise {pre['preprocess_ms']['median']:.2f} ms (median, {Path(pre['image']).name})"
        )
    info = result.get("model_info") or {}
    if info.get("macs"):
        lines.append(
            f"parameters {info['parameters'] / 1e6:.2f} M; {info['macs'] / 1e9:.3f} GMACs "
            f"({info['flops'] / 1e9:.2f} GFLOPs) counted from the ncnn .param graph"
        )
    sizes = ", ".join(
        f"{k} {v['bytes'] / 2**20:.1f} MiB" for k, v in (result.get("artifacts") or {}).items() if v
    )
    if sizes:
        lines.append(f"files: {sizes}")
    for r in result["results"]:
        same = r["parity"].get("max_abs_vs_fp32")
        if same == 0.0:
            lines.append(
                f"{r['name']} @{r['threads']}: output identical to fp32 (the mode changes nothing here)"
            )
    sel = result.get("selection") or {}
    for threads, pick in (sel.get("by_threads") or {}).items():
        prefix = f"budget {sel['budget']} @{threads} threads: "
        lines.append(prefix + (pick["reason"] if pick["fits"] else "NONE FITS - " + pick["reason"]))
    return lines


def bench_markdown(result: dict) -> str:
    """The table and summary as Markdown (docs/performance.md, CI pages)."""
    head = "| " + " | ".join(HEADERS) + " |\n|" + "|".join(["---"] + ["---:"] * (len(HEADERS) - 1)) + "|\n"
    body = "".join("| " + " | ".join(row) + " |\n" for row in table_rows(result))
    notes = "".join(f"- {line}\n" for line in summary_lines(result))
    return head + body + "\n" + notes
