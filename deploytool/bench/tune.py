"""bench --tune: search ncnn's CPU runtime options (ncnn.Option fields), keep the fastest set within the
budget, record it as "ncnn_options" in the meta.json beside the model.

Per precision base (the fp32 and int8 variants) a dozen option sets, not the full product: ncnn's
defaults, then one change at a time to what picks the convolution kernels (Winograd on/off and which
tile sizes F(2,3)/F(4,3)/F(6,3) it may use, im2col+sgemm, the SIMD packing layout), how blobs are kept
(lightmode) and how long OpenMP threads spin between calls (openmp_blocktime), and one combination.
Sets that touch a layer kind the graph has none of (Winograd: 3x3 stride-1 convolutions) are left out.
Each set is timed and judged exactly as a bench row (a fresh worker, the same budget); precision is
the base's own (reduced-precision storage is what bench's fp16/bf16 variants measure), so a tuned
set differs from ncnn's defaults in speed and in rounding only.

A shared machine can slow one worker down as a whole, so the defaults and the fastest other set within
the budget are timed once more (each keeps its faster attempt); that set replaces the defaults only
when it is then still the fastest, at least MIN_GAIN faster, and neither row has a wide spread.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..judge import Budget
from ..ncnn_param import NcnnGraph, read_param
from ..registry import Artifacts, role
from ..report import fmt
from ..runfolder import META, check_ncnn_options, read_meta, with_model_files, write_meta
from .records import BenchRow
from .variants import Variant, get_variant

BASES = ("fp32", "int8")  # the variants whose runtime options are tuned
MIN_GAIN = 0.03  # a set must beat ncnn's defaults by this share of their median to replace them (noise)
TUNE_BACKEND = role("tune")


@dataclass(frozen=True)
class Candidate:
    """One option set: a short name (log files, bench.json) and the ncnn.Option fields it sets on top
    of the base precision's settings; `needs` names the layer kind it changes (None: every graph)."""

    name: str
    options: dict = field(default_factory=dict)
    needs: str | None = None

    def __post_init__(self) -> None:
        check_ncnn_options(self.options, f"tune candidate {self.name}")


DEFAULTS = Candidate("defaults")
CANDIDATES = (
    DEFAULTS,
    Candidate("no-winograd", {"use_winograd_convolution": False}, "winograd"),
    Candidate("no-winograd63", {"use_winograd63_convolution": False}, "winograd"),
    Candidate("winograd63-only", {"use_winograd23_convolution": False, "use_winograd43_convolution": False},
              "winograd"),
    Candidate("winograd43-only", {"use_winograd23_convolution": False, "use_winograd63_convolution": False},
              "winograd"),
    Candidate("winograd23-only", {"use_winograd43_convolution": False, "use_winograd63_convolution": False},
              "winograd"),
    Candidate("no-sgemm", {"use_sgemm_convolution": False}, "conv"),
    Candidate("no-packing", {"use_packing_layout": False}),
    Candidate("no-lightmode", {"lightmode": False}),
    Candidate("blocktime-0", {"openmp_blocktime": 0}),
    Candidate("blocktime-200", {"openmp_blocktime": 200}),
    Candidate("winograd63-only+no-lightmode", {"use_winograd23_convolution": False,
              "use_winograd43_convolution": False, "lightmode": False}, "winograd"),
)  # fmt: skip


def layer_kinds(graph: NcnnGraph) -> set[str]:
    """What the candidates' `needs` may name that the graph has: `conv` (a Convolution), `winograd`
    (a 3x3, stride-1, dilation-1 Convolution: what ncnn's Winograd kernels take)."""
    kinds = set()
    for layer in graph.layers:
        if layer.type != "Convolution":
            continue
        kinds.add("conv")
        kw = layer.get(1, 0)
        kh, stride_w, dil_w = layer.get(11, kw), layer.get(3, 1), layer.get(2, 1)
        if (kw, kh, stride_w, layer.get(13, stride_w), dil_w, layer.get(12, dil_w)) == (3, 3, 1, 1, 1, 1):
            kinds.add("winograd")
    return kinds


def candidates_for(graph: NcnnGraph, candidates: tuple[Candidate, ...] = CANDIDATES) -> list[Candidate]:
    """The candidates that can change something in `graph` (ncnn's defaults always first)."""
    kinds = layer_kinds(graph)
    rest = [c for c in candidates if c.options and (c.needs is None or c.needs in kinds)]
    return [DEFAULTS, *rest]


@dataclass
class Trial:
    """One candidate timed and judged: its bench row and why it is outside the budget (empty: fits)."""

    candidate: Candidate
    row: BenchRow
    failures: list[str]

    @property
    def fits(self) -> bool:
        return not self.failures


@dataclass
class TuneResult:
    """One base's search: every trial, the chosen set, the gain over ncnn's defaults, the meta.json."""

    base: str
    threads: int
    budget: str
    trials: list[Trial]
    chosen: Trial | None  # None: no set fits the budget
    reason: str
    meta: Path | None = None  # the meta.json the chosen options were written into

    @property
    def defaults(self) -> Trial:
        return next(t for t in self.trials if t.candidate == DEFAULTS)

    @property
    def gain(self) -> float | None:
        """(defaults' median - chosen median) / defaults' median."""
        if self.chosen is None:
            return None
        return 1.0 - self.chosen.row.median / self.defaults.row.median

    def to_dict(self) -> dict:
        return {
            "base": self.base,
            "backend": TUNE_BACKEND,
            "threads": self.threads,
            "budget": self.budget,
            "min_gain": MIN_GAIN,
            "chosen": None if self.chosen is None else self.chosen.candidate.name,
            "ncnn_options": None if self.chosen is None else self.chosen.candidate.options,
            "defaults_median_ms": self.defaults.row.median,
            "chosen_median_ms": None if self.chosen is None else self.chosen.row.median,
            "gain": None if self.gain is None else round(self.gain, 4),
            "reason": self.reason,
            "meta": None if self.meta is None else str(self.meta),
            "trials": [
                {
                    **t.row.to_dict(),  # name: ncnn-cpu/BASE+SET
                    "option_set": t.candidate.name,
                    "ncnn_options": t.candidate.options,
                    "fits": t.fits,
                    "failures": t.failures,
                }
                for t in self.trials
            ],
        }


def choose(trials: list[Trial], min_gain: float = MIN_GAIN) -> tuple[Trial | None, str]:
    """The fastest trial within the budget, unless ncnn's defaults fit and it beats them by less than
    `min_gain` of their median, or either was measured with a wide spread (a shared machine's noise):
    then the defaults. With the reason."""
    fits = sorted((t for t in trials if t.fits), key=lambda t: t.row.median)
    defaults = next(t for t in trials if t.candidate == DEFAULTS)
    if not fits:
        fastest = min(trials, key=lambda t: t.row.median)
        return None, (
            f"no option set fits the budget (ncnn's defaults: {', '.join(defaults.failures)}; the "
            f"fastest set, {fastest.candidate.name}, {fastest.row.median:.2f} ms against "
            f"{defaults.row.median:.2f} ms)"
        )
    best = fits[0]
    outside = [t.candidate.name for t in trials if not t.fits and t.row.median < best.row.median]
    note = f"; faster but outside the budget: {', '.join(outside)}" if outside else ""
    if best is not defaults and defaults.fits:
        gain = 1.0 - best.row.median / defaults.row.median
        noisy = [t.candidate.name for t in (best, defaults) if t.row.latency_ms.get("spread_note")]
        if noisy:
            return defaults, (
                f"ncnn's defaults kept: the fastest set, {best.candidate.name} ({best.row.median:.2f} ms "
                f"against {defaults.row.median:.2f} ms), cannot be told apart from them on this busy "
                f"machine (wide spread: {', '.join(noisy)}); rerun with --retries or on a quiet machine{note}"
            )
        if gain < min_gain:
            return defaults, (
                f"ncnn's defaults kept: the fastest set, {best.candidate.name} ({best.row.median:.2f} ms), "
                f"beats them ({defaults.row.median:.2f} ms) by {gain:.1%}, under the {min_gain:.0%} "
                f"that counts on a shared machine{note}"
            )
    if best is defaults:
        return defaults, f"ncnn's defaults are the fastest within the budget ({best.row.median:.2f} ms){note}"
    return best, (
        f"{best.candidate.name} ({best.row.median:.2f} ms) is the fastest within the budget, "
        f"{defaults.row.median:.2f} ms with ncnn's defaults{note}"
    )


def tune_base(
    variant: Variant, art: Artifacts, budget: Budget, threads: int,
    measure: Callable[[Variant, Artifacts], BenchRow], candidates: tuple[Candidate, ...] = CANDIDATES,
) -> TuneResult:  # fmt: skip
    """Time and judge every candidate of `variant`'s model (`measure` runs one bench row: a fresh
    worker, parity against the reference), pick one (choose) and record it in the meta.json beside the
    model."""

    def timed(cand: Candidate, attempt: int = 1) -> BenchRow:
        tuned = replace(art, meta=dict(art.meta or {}, ncnn_options=cand.options))
        name = f"{variant.name}+{cand.name}"
        row = measure(replace(variant, name=name if attempt == 1 else f"{name}-{attempt}"), tuned)
        return replace(row, variant=name)

    trials = []
    for cand in candidates_for(read_param(art.ncnn_param), candidates):
        row = timed(cand)
        trials.append(Trial(cand, row, budget.failures(row.parity)))
    defaults = next(t for t in trials if t.candidate == DEFAULTS)
    others = sorted((t for t in trials if t.fits and t is not defaults), key=lambda t: t.row.median)
    if others:  # a busy spell can favour either side: time both again, each keeps its faster attempt
        for t in (defaults, others[0]):
            again = timed(t.candidate, 2)
            attempts = t.row.attempts + again.attempts
            t.row = replace(min(t.row, again, key=lambda r: r.median), attempts=attempts)
            t.failures = budget.failures(t.row.parity)
    chosen, reason = choose(trials)
    result = TuneResult(variant.name, threads, budget.text, trials, chosen, reason)
    if chosen is not None:
        result.meta = record(art, chosen.candidate.options)
    return result


def record(art: Artifacts, options: dict) -> Path | None:
    """Write `options` as "ncnn_options" into the meta.json beside the model (naming the model files that
    were measured: an int8 folder holds the fp32 files too); None when there is no meta.json (a spec
    the runners do not take)."""
    path = Path(art.ncnn_param).parent / META
    if not path.is_file():
        return None
    meta = with_model_files(read_meta(path), art.ncnn_param, art.ncnn_bin)
    write_meta(path, dict(meta, ncnn_options=dict(options)))
    return path


def tune_variants(
    variants: list[Variant], files: Callable[[Variant], Artifacts], budget: Budget, threads: int,
    measure: Callable[[Variant, Artifacts], BenchRow],
) -> list[TuneResult]:  # fmt: skip
    """tune_base for every benched base variant (BASES) on the tuned backend."""
    bases = [get_variant(b) for b in BASES]
    return [tune_base(v, files(v), budget, threads, measure) for v in bases if v in variants]


# ---------------------------------------------------------------- rendering

HEADERS = ["base", "option set", "median ms", "min ms", "vs defaults", "peak_rel", "top1/det agreement",
           "budget"]  # fmt: skip


def table_rows(results: list[TuneResult]) -> list[list[str]]:
    """One row per trial, the chosen one marked with '*'."""
    rows = []
    for res in results:
        base_ms = res.defaults.row.median
        for t in res.trials:
            p = t.row.parity
            task = p.get("top1_agreement", p.get("detection_agreement"))
            rows.append(
                [
                    res.base,
                    t.candidate.name + (" *" if t is res.chosen else ""),
                    f"{t.row.median:.2f}",
                    f"{t.row.latency_ms['min']:.2f}",
                    f"{t.row.median / base_ms - 1:+.1%}",
                    fmt(p.get("peak_rel"), ".2g"),
                    fmt(task, ".2f"),
                    "fits" if t.fits else "; ".join(t.failures),
                ]
            )
    return rows


def summary_lines(results: list[TuneResult]) -> list[str]:
    """Per base: the pick, its gain over ncnn's defaults and where it was recorded."""
    lines = []
    for res in results:
        head = f"tune {res.base} @{res.threads} threads, budget {res.budget}: "
        gain = "" if res.gain is None else f" (gain {res.gain:+.1%} over ncnn's defaults)"
        where = f"; recorded in {res.meta}" if res.meta else ""
        lines.append(head + res.reason + gain + where)
    return lines


def render_tune(results: list[TuneResult], console) -> None:
    """Rich table of every trial, then the picks."""
    from rich.table import Table

    table = Table(title=f"ncnn runtime options ({TUNE_BACKEND}): * = chosen, written to meta.json")
    for i, h in enumerate(HEADERS):
        table.add_column(h, justify="left" if i < 2 or i == len(HEADERS) - 1 else "right")
    for row in table_rows(results):
        table.add_row(*row)
    console.print(table)
    for line in summary_lines(results):
        console.print(line, markup=False, highlight=False)


def tune_markdown(results: list[TuneResult]) -> str:
    """The trials and picks as Markdown."""
    head = "| " + " | ".join(HEADERS) + " |\n|" + "|".join(["---", "---"] + ["---:"] * 5 + ["---"]) + "|\n"
    body = "".join("| " + " | ".join(row) + " |\n" for row in table_rows(results))
    return head + body + "\n" + "".join(f"- {line}\n" for line in summary_lines(results))
