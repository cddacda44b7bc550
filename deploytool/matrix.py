"""`deploytool matrix`: model × backend × precision as one CI gate. Each (model, precision) is one
pipeline run (its backends share the export and conversion), run in worker processes (`jobs`), with
the stage cache on, optionally only a deterministic shard of them; the result is one table (Markdown),
one JSON and one JUnit file. `merge` joins shards' JSON files into the same three files."""

from __future__ import annotations

import json
import os
import time
import xml.etree.ElementTree as ET
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context
from pathlib import Path

from .atomic import write_text
from .errors import DeployError, SpecError
from .results import RunReport, exit_code

SCHEMA = 1
FILES = ("matrix.json", "matrix.md", "junit.xml")


@dataclass(frozen=True)
class MatrixOptions:
    models: tuple[str, ...] = ()  # empty: every spec in models/
    backends: str | None = None  # None: run's default set (unavailable ones reported as skipped)
    precisions: tuple[str, ...] = ("fp32",)
    jobs: int = 1
    shard: tuple[int, int] = (1, 1)  # (I, N): the I-th of N slices, 1-based
    out: Path = Path("out/matrix")
    cache: Path | None = None  # the stage cache folder; None: off


@dataclass(frozen=True)
class Job:
    model: str
    precision: str

    @property
    def name(self) -> str:
        return f"{self.model}/{self.precision}"


@dataclass
class Cell:
    """One model × backend × precision: passed, or why not, and its worst metric."""

    model: str
    backend: str
    precision: str
    status: str  # pass | fail | skipped | error
    worst: str = ""  # e.g. "max_abs 6.5e-06, top1 1.00" or the failure
    seconds: float = 0.0

    @property
    def column(self) -> str:
        return f"{self.backend}/{self.precision}"


@dataclass
class JobRecord:
    """How one (model, precision) job went: its time, and why it could not run."""

    job: str
    seconds: float
    status: str  # ok | error
    error: str | None = None


@dataclass
class MatrixReport:
    cells: list[Cell] = field(default_factory=list)
    jobs: list[JobRecord] = field(default_factory=list)
    shard: tuple[int, int] = (1, 1)
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return (
            bool(self.cells)
            and all(c.status in ("pass", "skipped", "reference") for c in self.cells)
            and any(c.status == "pass" for c in self.cells)
        )

    @property
    def exit_code(self) -> int:
        """3 when a job could not run (a tool failed), else 1 when a check failed, else 0 (and 1 when
        nothing was checked at all: zero checks is never a pass)."""
        return exit_code(self.passed, failed=any(c.status == "error" for c in self.cells))

    def to_dict(self) -> dict:
        return {"schema": SCHEMA, "passed": self.passed, "shard": list(self.shard), "seconds": self.seconds,
                "jobs": [asdict(j) for j in self.jobs], "cells": [asdict(c) for c in self.cells]}  # fmt: skip

    @classmethod
    def from_dict(cls, d: dict) -> MatrixReport:
        """A matrix.json read back; `schema` and `passed` are derived, not read."""
        return cls(cells=[Cell(**c) for c in d["cells"]], jobs=[JobRecord(**j) for j in d.get("jobs", [])],
                   shard=tuple(d.get("shard", (1, 1))), seconds=float(d.get("seconds", 0.0)))  # fmt: skip


def parse_shard(text: str | None) -> tuple[int, int]:
    """'2/4' -> (2, 4); anything else is the user's error."""
    if text is None:
        return (1, 1)
    i, sep, n = text.partition("/")
    if not sep or not i.strip().isdigit() or not n.strip().isdigit() or not 1 <= int(i) <= int(n):
        raise SpecError(f"--shard {text!r}: write I/N with 1 <= I <= N, e.g. --shard 2/4")
    return int(i), int(n)


def plan(opts: MatrixOptions) -> list[Job]:
    """Every (model, precision) in a fixed order, then this shard's slice of them: job k goes to shard
    k mod N, so shards are disjoint, cover everything, and do not depend on the machine."""
    from .registry import NCNN_PRECISIONS
    from .spec import available_models
    from .spec_toml import load_spec

    for p in opts.precisions:
        if p not in NCNN_PRECISIONS:
            raise SpecError(f"--precisions: unknown precision {p!r}; use {', '.join(NCNN_PRECISIONS)}")
    models = list(opts.models) or available_models()
    for m in models:
        load_spec(m)  # an unknown or invalid spec is exit 2 before any work
    jobs = [Job(m, p) for m in sorted(dict.fromkeys(models)) for p in opts.precisions]
    i, n = opts.shard
    return [j for k, j in enumerate(jobs) if k % n == i - 1]


def run_matrix(opts: MatrixOptions) -> MatrixReport:
    """Run this shard's jobs, `opts.jobs` at a time, and write matrix.json/.md and junit.xml to opts.out."""
    from .registry import parse_backends

    if opts.jobs < 1:
        raise SpecError(f"--jobs must be at least 1, got {opts.jobs}")
    if opts.backends is not None:
        parse_backends(opts.backends)  # a typo is exit 2 before any work
    jobs = plan(opts)
    started = time.perf_counter()
    report = MatrixReport(shard=opts.shard)
    threads = max(1, (os.cpu_count() or 1) // opts.jobs)  # workers share the cores, never oversubscribe
    if opts.jobs == 1:
        done = [_run_job(job, opts, threads) for job in jobs]
    else:  # the biggest jobs first, so one long job does not start last and run alone
        with ProcessPoolExecutor(opts.jobs, mp_context=get_context("spawn")) as pool:
            futures = [
                pool.submit(_run_job, job, opts, threads) for job in sorted(jobs, key=_cost, reverse=True)
            ]
            done = [f.result() for f in as_completed(futures)]
    for record, cells in sorted(done, key=lambda d: d[0].job):
        report.jobs.append(record)
        report.cells += cells
    report.seconds = round(time.perf_counter() - started, 2)
    write_matrix(report, opts.out)
    return report


def _cost(job: Job) -> tuple[int, str]:
    """A job's expected size before anything ran: its input elements at every declared shape."""
    import math

    from .spec_toml import load_spec

    spec = load_spec(job.model)
    return sum(math.prod(s) for s in (spec.input_shape, *spec.dynamic_shapes)), job.name


def _run_job(job: Job, opts: MatrixOptions, threads: int) -> tuple[JobRecord, list[Cell]]:
    """One (model, precision) through the pipeline, in this process; never raises for a DeployError."""
    from . import progress
    from .foreign import run_onnx
    from .inputs import images_or_default
    from .options import Recipe, RunOptions
    from .pipeline import run
    from .registry import get_backend, is_int8, parse_backends
    from .report import write_json
    from .spec_toml import load_spec

    if opts.jobs > 1:
        progress.configure(quiet=True)  # workers' steps would interleave; the parent prints per job
        # Mesa's llvmpipe (ncnn-vulkan without a GPU) starts a thread per core in every process: hold each
        # worker's Vulkan to its share of the cores too, unless the user set it
        os.environ.setdefault("LP_NUM_THREADS", str(threads))
    started = time.perf_counter()
    out = Path(opts.out) / job.model / job.precision
    try:
        spec = load_spec(job.model)
        onnx = spec.onnx is not None  # a spec naming an ONNX file: ONNX Runtime is its reference
        recipe = Recipe.from_flags("pnnx-onnx" if onnx else "pnnx", int8=is_int8(job.precision))
        backends = opts.backends
        if onnx and backends is not None:  # each model is judged against its own reference: no torch here
            backends = ",".join(b for b in parse_backends(backends) if get_backend(b).family != "torch")
        run_opts = RunOptions(
            out=out, backends=backends, images=images_or_default(None, spec.task), recipe=recipe,
            ncnn_precision=job.precision, threads=threads, cache=opts.cache,
        )  # fmt: skip
        report = (run_onnx if onnx else run)(spec, run_opts)
        write_json(report, out / "report.json")
    except DeployError as exc:
        seconds = round(time.perf_counter() - started, 2)
        record = JobRecord(job.name, seconds, "error", str(exc))
        return record, [Cell(job.model, "*", job.precision, "error", str(exc), seconds)]
    seconds = round(time.perf_counter() - started, 2)
    return JobRecord(job.name, seconds, "ok"), cells_of(report, job, seconds)


def cells_of(report: RunReport, job: Job, seconds: float) -> list[Cell]:
    """One cell per backend of a run (the reference marked as such): its verdict and worst numbers. Backends
    that do not take an ncnn precision are reported under fp32 only."""
    from .registry import get_backend

    cells = []
    verdicts = report.verdicts
    for name, info in report.backends.items():
        precision = job.precision if get_backend(name).takes_precision else "fp32"
        if precision != job.precision:
            continue
        if name == report.reference:
            cells.append(Cell(job.model, name, precision, "reference"))
            continue
        if not info.available:
            cells.append(Cell(job.model, name, precision, "skipped", info.reason or "", seconds))
            continue
        v = verdicts[name]
        if v.error is not None:
            cells.append(Cell(job.model, name, precision, "error", v.error, seconds))
            continue
        t = v.tensors
        worst = f"max_abs {t.row.max_abs:.3g}, cosine {t.cosine:.6g}" if t else "no checks"
        if v.task is not None:
            worst += "".join(f", {k} {value:.2f}" for k, value in v.task.metrics().items())
        if t and t.failed:
            worst = f"{t.failed}/{t.checks} tensor checks failed; " + worst
        cells.append(Cell(job.model, name, precision, "pass" if v.passed else "fail", worst, seconds))
    return cells


def write_matrix(report: MatrixReport, out: Path) -> list[Path]:
    out = Path(out)
    return [
        write_text(out / "matrix.json", json.dumps(report.to_dict(), indent=2) + "\n"),
        write_text(out / "matrix.md", markdown(report)),
        write_text(out / "junit.xml", junit(report)),
    ]


MARKS = {
    "pass": "✅ pass",
    "fail": "❌ FAIL",
    "skipped": "⚪ skipped",
    "error": "💥 error",
    "reference": "reference",
}


def markdown(report: MatrixReport) -> str:
    """Rows are models, columns backend/precision; each cell its verdict and worst metric."""
    columns = sorted({c.column for c in report.cells if c.backend != "*"})
    models = sorted({c.model for c in report.cells})
    by = {(c.model, c.column): c for c in report.cells}
    errors = {c.model: c for c in report.cells if c.backend == "*"}
    verdict = "passed" if report.passed else "FAILED"
    lines = [f"# deploytool matrix: {verdict}", ""]
    counts = {s: sum(c.status == s for c in report.cells) for s in MARKS}
    lines += [", ".join(f"{n} {s}" for s, n in counts.items() if n) + f"; {report.seconds:.1f} s", ""]
    lines += ["| model | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for m in models:
        if m in errors:
            lines.append(
                f"| {m} | " + " | ".join(f"{MARKS['error']}: {errors[m].worst}" for _ in columns) + " |"
            )
            continue
        row = [f"{MARKS[by[m, col].status]} {by[m, col].worst}" if (m, col) in by else "" for col in columns]
        lines.append(f"| {m} | " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def junit(report: MatrixReport) -> str:
    suite = ET.Element("testsuite", name="deploytool.matrix")
    failures = errors = skipped = 0
    for c in report.cells:
        case = ET.SubElement(suite, "testcase", classname=f"matrix.{c.model}", name=c.column,
                             time=str(c.seconds))  # fmt: skip
        if c.status == "fail":
            failures += 1
            ET.SubElement(case, "failure", message=c.worst)
        elif c.status == "error":
            errors += 1
            ET.SubElement(case, "error", message=c.worst)
        elif c.status in ("skipped", "reference"):
            skipped += 1
            ET.SubElement(case, "skipped", message=c.worst)
    suite.set("tests", str(len(report.cells)))
    for k, v in (("failures", failures), ("errors", errors), ("skipped", skipped)):
        suite.set(k, str(v))
    ET.indent(suite)
    return ET.tostring(suite, encoding="unicode", xml_declaration=True) + "\n"


def merge(paths: list[Path], out: Path) -> MatrixReport:
    """Join shards' matrix.json files (or folders holding one) into one report written to `out`. A cell
    that two shards both report is the user's error (the same shard given twice, or different runs)."""
    if not paths:
        raise SpecError("matrix merge needs the shards' matrix.json files (or their folders)")
    merged = MatrixReport(shard=(1, 1))
    seen: dict[tuple[str, str, str], str] = {}
    for p in paths:
        p = Path(p)
        f = p / "matrix.json" if p.is_dir() else p
        try:
            shard = MatrixReport.from_dict(json.loads(f.read_text()))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise SpecError(f"{f}: not a deploytool matrix.json ({exc})") from None
        for c in shard.cells:
            key = (c.model, c.backend, c.precision)
            if key in seen:
                raise SpecError(f"{f}: {c.model} {c.column} is also in {seen[key]}; give each shard once")
            seen[key] = str(f)
        merged.cells += shard.cells
        merged.jobs += shard.jobs
        merged.seconds = max(merged.seconds, shard.seconds)
    merged.cells.sort(key=lambda c: (c.model, c.column))
    merged.jobs.sort(key=lambda j: j.job)
    write_matrix(merged, out)
    return merged
