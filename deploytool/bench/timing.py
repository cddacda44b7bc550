"""Timing: latency statistics, one backend measured in a fresh worker process (with retries), peak RSS."""

from __future__ import annotations

import gc
import importlib
import os
import pickle
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from ..backends.base import by_spec_name
from ..backends.ncnn_runner import IN_PROCESS_ENV
from ..errors import BackendError
from ..model import build_model
from ..registry import Artifacts, RunnerConfig, get_backend
from ..spec import ModelSpec
from ..tools import run_tool

SPREAD_WIDE = 0.25  # (p90 - min) / median above this gets a spread_note
WORKER_TIMEOUT_S = 900


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


def peak_rss_mib() -> float:
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


@dataclass
class Job:
    """What one worker measures: one backend (in one variant's files and precision) at one thread count.
    `library` is imported before the baseline memory reading; the worker then finds `backend` in its
    own registry (a backend registered at run time must register itself when `library` is imported)."""

    backend: str
    library: str
    art: Artifacts  # without the eager model: the worker builds it when the backend needs one
    spec: ModelSpec
    weights: str | None
    feeds: list[dict]
    config: RunnerConfig
    warmup: int
    runs: int


@dataclass
class Measurement:
    """What a worker sends back."""

    samples: list[float]  # seconds per timed call (Runner.last_latency_s)
    outputs: list[dict]  # one per feed, by the spec's output names
    device: str | None
    baseline_rss_mib: float  # after importing the library, before loading the model
    peak_rss_mib: float


def measure(job: Job) -> Measurement:
    """Load, infer every feed once (kept for parity), then `warmup` and `runs` timed calls on the
    first feed. Meant for a fresh process: the memory readings are the whole process's."""
    if job.library:
        importlib.import_module(job.library)
    baseline = peak_rss_mib()
    backend = get_backend(job.backend)
    art = job.art
    if "model" in backend.needs and art.model is None:
        art = replace(art, model=build_model(job.spec, job.weights))
    with backend.create(art, job.config) as runner:
        outputs = [by_spec_name(runner.infer(f), job.spec.output_names) for f in job.feeds]
        for _ in range(job.warmup):
            runner.infer(job.feeds[0])
        gc.collect()
        samples = []
        for _ in range(job.runs):
            runner.infer(job.feeds[0])
            samples.append(runner.last_latency_s)
        device = runner.device()
    return Measurement(samples, outputs, device, baseline, peak_rss_mib())


def worker_main(job_path: str, result_path: str) -> None:
    """The worker process's entry point: unpickle the Job, measure, pickle the Measurement."""
    with open(job_path, "rb") as fh:
        job: Job = pickle.load(fh)
    result = measure(job)
    with open(result_path, "wb") as fh:
        pickle.dump(result, fh)


def run_worker(job: Job, log: Path, stage: str, timeout: float = WORKER_TIMEOUT_S) -> Measurement:
    """`measure(job)` in a fresh interpreter, so threads, caches and peak RSS belong to one backend;
    its output goes to `log`, a crash or a timeout is a BackendError naming `stage` and the log."""
    with tempfile.TemporaryDirectory(prefix="deploytool-bench-") as tmp:
        job_path, result_path = Path(tmp) / "job.pkl", Path(tmp) / "result.pkl"
        with open(job_path, "wb") as fh:
            pickle.dump(job, fh)
        env = dict(os.environ)
        root = str(Path(__file__).resolve().parents[2])  # this checkout's deploytool, not another install
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        env[IN_PROCESS_ENV] = "1"  # this worker is already a throwaway process: ncnn's memory is counted here
        code = "import sys; from deploytool.bench.timing import worker_main; worker_main(*sys.argv[1:3])"
        cmd = [sys.executable, "-c", code, str(job_path), str(result_path)]
        run_tool(cmd, log, stage, env=env, timeout=timeout, error=BackendError, tool="bench worker")
        if not result_path.is_file():
            raise BackendError(f"{stage}: the bench worker exited without writing its result; log: {log}")
        with open(result_path, "rb") as fh:
            return pickle.load(fh)


def measure_with_retries(
    job: Job, log: Path, stage: str, retries: int = 0
) -> tuple[Measurement, dict, list[dict]]:
    """Run the worker; while its spread is wide (a busy shared machine), run it again, up to `retries`
    times, and keep the attempt with the lowest median. Returns (that measurement, its latency_stats,
    every attempt's median, min and 1-minute load average before it). Attempt n > 1 logs to LOG-n."""
    best, best_stats, attempts = None, None, []
    for attempt in range(1, retries + 2):
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
        path = log if attempt == 1 else log.with_name(f"{log.stem}-{attempt}{log.suffix}")
        got = run_worker(job, path, stage)
        stats = latency_stats(got.samples)
        attempts.append({"median": stats["median"], "min": stats["min"], "loadavg_1min": load})
        if best_stats is None or stats["median"] < best_stats["median"]:
            best, best_stats = got, stats
        if stats["spread_note"] is None:
            break
    return best, best_stats, attempts


def time_preprocessing(spec: ModelSpec, image: Path, runs: int, warmup: int) -> dict:
    """Image decode (cv2.imread) and preprocessing (resize, colour, normalise) timed apart."""
    from ..inputs import preprocess, read_image

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
