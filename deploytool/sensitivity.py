"""int8 sensitivity (`deploytool quantize --explain`, `--auto-mixed BUDGET`).

- Ranking: for each int8 layer, a model with only that layer int8 (every other one fp32, one shared
  calibration table) runs on the evaluation inputs and is judged against the fp32 ncnn model
  (judge.judge_backend: cosine, peak_rel, top-1 agreement); worst first.
- Error growth: the whole int8 model and the fp32 model on the first input, every blob compared
  (layerwise.compare_blobs) in graph order.
- Auto-mixed: the most sensitive layers are kept fp32, one more at a time, until the int8 model meets
  the budget against the run's reference (torch); that model becomes model.int8.param/.bin and its
  table has the kept layers' lines commented out (`#`, ncnn2table's convention).

Every model of the sweep runs in one ncnn worker process (backends/isolated.py); the per-layer models
are written to a scratch folder under --out that is removed at the end.
"""

from __future__ import annotations

import json
import math
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from . import judge, progress
from .atomic import atomic_path, remove_path, write_text
from .backends import REFERENCE, Artifacts, role
from .backends.base import by_spec_name
from .backends.ncnn_runner import IN_PROCESS_ENV, NcnnSession
from .errors import ParityError, SpecError
from .ncnn_param import NcnnGraph, as_floats, read_model, read_param, requantized_blobs
from .results import InputItem, RunReport, finite_or_text

SCRATCH = ".sensitivity"  # under --out, removed when the sweep ends
SWEEP_BACKEND = role("sweep")  # the backend every model of the sweep runs on
FP32 = f"{SWEEP_BACKEND} fp32"  # what the ranking is judged against
TOP_N = 10  # layers in the console table
SKIP_GROWTH = ("Input", "Split")  # blobs that only repeat another blob


@dataclass(frozen=True)
class ExplainOptions:
    """What `quantize --explain` / `--auto-mixed` add to a quantize run; the budget is checked when made."""

    auto_mixed: str | None = None  # a budget (judge.parse_budget syntax): keep layers fp32 until it fits

    def __post_init__(self) -> None:
        if self.auto_mixed is not None:
            judge.parse_budget(self.auto_mixed, flag="--auto-mixed")

    @property
    def budget(self) -> judge.Budget | None:
        return None if self.auto_mixed is None else judge.parse_budget(self.auto_mixed, flag="--auto-mixed")


def _metrics(verdict: judge.Verdict) -> dict:
    """The numbers of a Verdict that sensitivity reports (JSON-safe)."""
    summary = verdict.summary()
    keys = ("cosine", "peak_rel", "max_abs", "top1_agreement", "top5_agreement", "detection_agreement")
    return {k: finite_or_text(float(summary[k])) for k in keys if summary.get(k) is not None}


def _num(metrics: dict, key: str) -> float:
    v = metrics.get(key)
    return float(v) if v is not None else math.nan


@dataclass
class LayerSensitivity:
    """The model with only `layer` int8, judged against the fp32 ncnn model over the inputs."""

    layer: str
    type: str
    index: int  # position in the .param
    metrics: dict  # cosine (worst input), peak_rel (worst input), max_abs, top1_agreement, ...

    def to_dict(self) -> dict:
        return {"layer": self.layer, "type": self.type, "index": self.index, **self.metrics}


@dataclass
class GrowthRow:
    """One blob of the int8 model against the same blob of the fp32 model (one input)."""

    index: int
    layer: str
    type: str
    blob: str
    int8: bool  # the layer that wrote it is int8
    cosine: float
    peak_rel: float
    max_abs: float

    def to_dict(self) -> dict:
        return {k: finite_or_text(v) if isinstance(v, float) else v for k, v in self.__dict__.items()}


@dataclass
class AutoMixed:
    """What `--auto-mixed` kept fp32 and why: each kept layer's sensitivity, and every model it tried."""

    budget: str
    kept: list[LayerSensitivity]  # most sensitive first
    metrics: dict  # the chosen model against the reference
    tried: list[dict] = field(default_factory=list)  # {"kept_fp32": n, **metrics, "failures": [...]}

    def to_dict(self) -> dict:
        return {
            "budget": self.budget,
            "reference": REFERENCE,
            "kept_fp32": [k.to_dict() for k in self.kept],
            "metrics": self.metrics,
            "tried": self.tried,
        }


@dataclass
class Sensitivity:
    model: str
    inputs: list[str]
    ranking: list[LayerSensitivity]  # worst first
    growth_input: str
    growth: list[GrowthRow]
    seconds: float = 0.0
    auto: AutoMixed | None = None

    def to_dict(self) -> dict:
        return {
            "schema": 1,
            "model": self.model,
            "reference": FP32,
            "backend": SWEEP_BACKEND,
            "inputs": self.inputs,
            "seconds": round(self.seconds, 3),
            "ranking": [r.to_dict() for r in self.ranking],
            "growth": {"input": self.growth_input, "blobs": [g.to_dict() for g in self.growth]},
            "auto_mixed": self.auto.to_dict() if self.auto else None,
        }


def rank(rows: list[LayerSensitivity]) -> list[LayerSensitivity]:
    """Worst first: lowest cosine (of the worst input), then highest peak_rel; NaN counts as worst.
    Top-1 agreement is reported but does not rank: over a few photos it only counts near-ties."""

    def key(r: LayerSensitivity):
        cos, peak = _num(r.metrics, "cosine"), _num(r.metrics, "peak_rel")
        return (cos if math.isfinite(cos) else -math.inf, -peak if math.isfinite(peak) else -math.inf)

    return sorted(rows, key=key)


# ---------------------------------------------------------------------------------------------
# one ncnn process for every model of the sweep


class SweepSession:
    """The worker's object: loads a model, runs it and releases it, for one model after another."""

    def __init__(self, threads: int, input_names: list[str], output_names: list[str]):
        self.args = (False, "int8", threads, input_names, output_names)

    @contextmanager
    def _loaded(self, param: str, bin: str):
        session = NcnnSession(param, bin, *self.args, quiet=True)
        try:
            yield session
        finally:
            session.close()

    def infer(self, param: str, bin: str, feeds: list[dict]) -> list[dict]:
        with self._loaded(param, bin) as session:
            return [session.infer(feed)[0] for feed in feeds]

    def extract_all(self, param: str, bin: str, feed: dict, blobs: list[str]) -> dict:
        with self._loaded(param, bin) as session:
            return session.extract_all(feed, blobs)

    def close(self) -> None:
        """Nothing stays loaded between calls."""


class _Sweep:
    """Runs models on the inputs (named as the .param names them) and returns outputs by spec name."""

    def __init__(self, call, graph: NcnnGraph, items: list[InputItem], output_names: list[str]):
        self._call, self.graph, self.output_names = call, graph, output_names
        names = graph.input_names
        self.feeds = [
            {
                n: np.ascontiguousarray(v, dtype=np.float32)
                for n, v in zip(names, i.feed.values(), strict=True)
            }
            for i in items
        ]

    def outputs(self, param: Path, bin: Path) -> list[dict]:
        outs = self._call("infer", str(param), str(bin), self.feeds, doing=f"running {param.name}")
        return [by_spec_name(o, self.output_names) for o in outs]

    def blobs(self, param: Path, bin: Path) -> dict[str, np.ndarray]:
        tops = [top for layer in self.graph.layers for top in layer.tops]
        blobs = self._call("extract_all", str(param), str(bin), self.feeds[0], tops, doing="extracting blobs")
        return as_floats(blobs, requantized_blobs(read_model(param, bin)))  # requantised: int8 values


@contextmanager
def _sweep(graph: NcnnGraph, items: list[InputItem], output_names: list[str], threads: int):
    args = (threads, graph.input_names, graph.output_names)
    if os.environ.get(IN_PROCESS_ENV) == "1":
        session = SweepSession(*args)
        yield _Sweep(lambda m, *a, doing: getattr(session, m)(*a), graph, items, output_names)
        return
    from .backends.isolated import Worker

    worker = Worker(SWEEP_BACKEND, f"{__name__}:SweepSession", *args)
    try:
        yield _Sweep(worker.call, graph, items, output_names)
    except BaseException:
        worker.stop(check=False)
        raise
    worker.stop()


# ---------------------------------------------------------------------------------------------
# the analysis


def analyse(
    spec, fp32: Artifacts, art: Artifacts, items: list[InputItem], reference_outs: list[dict],
    scratch: Path, threads: int = 2, budget: judge.Budget | None = None,
) -> Sensitivity:  # fmt: skip
    """Rank `art`'s int8 layers (each alone int8, against the fp32 model `fp32`), the error growth of
    the whole int8 model on the first input, and with `budget` the auto-mixed choice (judged against
    `reference_outs`, torch's outputs). `scratch` is made and removed."""
    from .quantize.calibrate import calibration_layers
    from .quantize.table import read_table
    from .quantize.write import quantize_model

    start = time.perf_counter()
    graph = read_param(fp32.ncnn_param)
    int8 = list(art.int8_layers)
    if not int8:
        raise SpecError("--explain: no layer of the model is int8 (--keep-fp32 or the table keep them all)")
    table = read_table(art.int8_table, graph)
    quantisable = [layer.name for layer in calibration_layers(graph)]
    index = {layer.name: i for i, layer in enumerate(graph.layers)}
    types = {layer.name: layer.type for layer in graph.layers}
    param, bin_ = scratch / "model.param", scratch / "model.bin"

    def judged(keep: list[str], ref_outs: list[dict], reference: str) -> judge.Verdict:
        quantize_model(read_model(fp32.ncnn_param, fp32.ncnn_bin), table, param, bin_, keep_fp32=keep)
        outs = sweep.outputs(param, bin_)
        return judge.judge_backend(spec, SWEEP_BACKEND, reference, items, ref_outs, outs, "int8")

    scratch.mkdir(parents=True, exist_ok=True)
    try:
        with _sweep(graph, items, spec.output_names, threads) as sweep:
            base = sweep.outputs(fp32.ncnn_param, fp32.ncnn_bin)
            rows = []
            with progress.step(f"sensitivity ({len(int8)} layers)"):
                for name in int8:
                    verdict = judged([n for n in quantisable if n != name], base, FP32)
                    rows.append(LayerSensitivity(name, types[name], index[name], _metrics(verdict)))
            ranking = rank(rows)
            with progress.step("error growth"):
                growth = _growth(sweep, fp32, art, graph, set(int8))
            auto = None
            if budget is not None:
                with progress.step("auto-mixed"):
                    user_kept = [n for n in quantisable if n not in int8]
                    auto = _auto_mixed(budget, ranking, user_kept, reference_outs, judged)
    finally:
        remove_path(scratch)
    return Sensitivity(
        spec.name,
        [i.label for i in items],
        ranking,
        items[0].label,
        growth,
        time.perf_counter() - start,
        auto,
    )


def _growth(
    sweep: _Sweep, fp32: Artifacts, art: Artifacts, graph: NcnnGraph, int8: set[str]
) -> list[GrowthRow]:
    from .layerwise import compare_blobs

    ref = sweep.blobs(fp32.ncnn_param, fp32.ncnn_bin)
    got = sweep.blobs(art.ncnn_param, art.ncnn_bin)
    index = {layer.name: i for i, layer in enumerate(graph.layers)}
    return [
        GrowthRow(
            index[r.layer], r.layer, r.layer_type, r.blob, r.layer in int8, r.cosine, r.peak_rel, r.max_abs
        )
        for r in compare_blobs(got, ref, graph, 0.0, 0.0)
        if r.layer_type not in SKIP_GROWTH
    ]


def _auto_mixed(budget: judge.Budget, ranking, user_kept: list[str], reference_outs, judged) -> AutoMixed:
    """Keep the first n layers of the ranking fp32, for the smallest n whose model meets `budget`
    against the reference; ParityError when not even every layer in fp32 meets it."""
    order = [r.layer for r in ranking]
    tried: list[dict] = []

    def attempt(n: int) -> tuple[list[str], dict]:
        verdict = judged([*user_kept, *order[:n]], reference_outs, REFERENCE)
        metrics, failures = _metrics(verdict), budget.failures(verdict.summary())
        tried.append({"kept_fp32": n, **metrics, "failures": failures})
        return failures, metrics

    failures, metrics = attempt(len(order))
    if failures:
        raise ParityError(
            f"--auto-mixed {budget.text}: not met even with every layer fp32 ({'; '.join(failures)} against "
            f"{REFERENCE}); the budget is tighter than the fp32 model itself"
        )
    for n in range(len(order)):
        failures, found = attempt(n)
        if not failures:
            metrics = found
            break
    else:
        n = len(order)
    return AutoMixed(budget.text, ranking[:n], metrics, tried)


# ---------------------------------------------------------------------------------------------
# the quantize run with --explain / --auto-mixed


def explain_quantize(spec, opts, explain: ExplainOptions) -> tuple[RunReport, Sensitivity]:
    """`deploytool quantize --explain`: the quantize run (pipeline stages), then the sensitivity
    analysis; with --auto-mixed the int8 model (model.int8.param/.bin, model.table) becomes the
    mixed one and the run's int8 backends are judged on it. Writes sensitivity.json into --out."""
    from .backends import select_backends
    from .infer import infer_all
    from .inputs import inputs_for
    from .pipeline import judge_run
    from .progress import StageTimer
    from .stages import build_artifacts, quantize_stage

    timer = StageTimer()
    backends, found = select_backends(opts.backends)
    items = inputs_for(spec, list(opts.images))
    out = Path(opts.out)
    as_fp32 = replace(opts, recipe=replace(opts.recipe, quantize=None, table=None), ncnn_precision="fp32")
    fp32 = build_artifacts(spec, as_fp32, items[0].tensor, out, timer)
    with timer.stage("quantize", show=False):
        art = quantize_stage(spec, fp32, opts.recipe, out)
    outputs, results = infer_all(spec, art, opts, backends, items, timer)
    with timer.stage("sensitivity", show=False):
        sens = analyse(
            spec, fp32, art, items, outputs[REFERENCE], out / SCRATCH, opts.threads, explain.budget
        )
    if sens.auto is not None and sens.auto.kept:
        art = _write_mixed(fp32, art, [k.layer for k in sens.auto.kept])
        again = [b for b in outputs if b != REFERENCE]
        more, more_results = infer_all(spec, art, opts, again, items, timer)
        outputs.update(more)
        results.update(more_results)
    report = judge_run(spec, art, opts, items, outputs, results, timer, found=found)
    path = write_text(out / "sensitivity.json", json.dumps(sens.to_dict(), indent=2) + "\n")
    report.artifacts["int8_sensitivity"] = str(path)
    if sens.auto is not None:
        report.artifacts["int8_kept_fp32"] = [k.layer for k in sens.auto.kept]
        report.notes.append(auto_mixed_line(sens.auto))
    return report, sens


def _write_mixed(fp32: Artifacts, art: Artifacts, kept: list[str]) -> Artifacts:
    """model.int8.param/.bin with `kept` in fp32 too, and the table with their lines commented out."""
    from .quantize.table import read_table, write_table
    from .quantize.write import quantize_model

    table = read_table(art.int8_table)
    table.fp32_layers |= set(kept) | (set(table.weight_scales) - set(art.int8_layers))
    with atomic_path(art.ncnn_param) as param, atomic_path(art.ncnn_bin) as bin_:
        layers = quantize_model(read_model(fp32.ncnn_param, fp32.ncnn_bin), table, param, bin_)
    with atomic_path(art.int8_table) as tmp:
        write_table(tmp, table)
    return replace(art, int8_layers=tuple(layers))


# ---------------------------------------------------------------------------------------------
# rendering


def fmt_value(v, spec: str = ".3g") -> str:
    from .report import fmt

    return fmt(v, spec)


def cosine_text(metrics: dict) -> str:
    return fmt_value(metrics.get("cosine"), ".6f")


def auto_mixed_line(auto: AutoMixed) -> str:
    """What --auto-mixed kept and why: the layers (ranking order), their sensitivity, the mixed model's
    numbers against the reference, and what the model with one layer fewer kept fp32 missed."""
    if not auto.kept:
        return f"auto-mixed ({auto.budget}): the all-int8 model meets the budget; no layer kept fp32"
    n = len(auto.kept)
    cosines = [cosine_text(k.metrics) for k in auto.kept]
    missed = next((t["failures"] for t in auto.tried if t["kept_fp32"] == n - 1), [])
    top1 = auto.metrics.get("top1_agreement")
    return (
        f"auto-mixed ({auto.budget}): kept {n} layer(s) fp32, the ranking's first {n} (alone int8 cosine "
        f"{cosines[0]}{f' to {cosines[-1]}' if n > 1 else ''}): {', '.join(k.layer for k in auto.kept)}; "
        f"the mixed model against {REFERENCE}: cosine {cosine_text(auto.metrics)}, peak_rel "
        f"{fmt_value(auto.metrics.get('peak_rel'))}{f', top1 {top1:.2f}' if isinstance(top1, float) else ''}"
        f"{f'; with {n - 1}: ' + ', '.join(missed) if missed else ''}"
    )
