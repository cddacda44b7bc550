"""bench's typed results: rows, the pick per thread count, the report (`to_dict()` is bench.json)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..judge import Budget
from ..options import Recipe
from ..registry import role
from ..results import BackendResult, finite_or_text
from .variants import Variant

SCHEMA = 1
RATIO_BASELINE = role("ratio_baseline")  # every row's median is also given as a multiple of this backend's
RATIO_BASELINE_INT8 = f"{RATIO_BASELINE}/int8"  # ... and of this row's (ONNX Runtime's own int8 model)


@dataclass(frozen=True)
class BenchOptions:
    """Everything `deploytool bench` takes besides the model."""

    out: Path
    runs: int = 20
    warmup: int = 3
    threads: tuple[int, ...] = (2,)
    backends: str | None = None  # None: every bench backend, the unavailable ones reported and skipped
    images: tuple[Path, ...] = ()
    weights: str | None = None
    budget: str | None = None  # None: judge.DEFAULT_BUDGET
    retries: int = 0  # re-measure a row with a wide spread up to this often; the lowest median is kept
    recipe: Recipe = field(default_factory=Recipe)  # the converter; each variant sets its weights on top
    tune: bool = False  # also search ncnn's runtime options of the fp32/int8 variants (bench/tune.py)
    keep_fp32: tuple[str, ...] = ()  # set: an int8-mixed row, int8 with these layers kept fp32

    def __post_init__(self) -> None:
        object.__setattr__(self, "out", Path(self.out))
        object.__setattr__(self, "threads", tuple(self.threads))
        object.__setattr__(self, "images", tuple(Path(p) for p in self.images))
        object.__setattr__(self, "keep_fp32", tuple(self.keep_fp32))


@dataclass
class BenchRow:
    """One backend (or ncnn variant) at one thread count: latency, memory, parity against the reference.
    `parity` is judge.Verdict.summary() (report.json's names), plus max_abs_vs_fp32 for the variants
    other than the baseline."""

    backend: str
    variant: str | None
    threads: int
    latency_ms: dict  # timing.latency_stats
    parity: dict
    peak_rss_mib: float = 0.0
    baseline_rss_mib: float = 0.0
    device: str | None = None
    attempts: list[dict] = field(default_factory=list)
    ratio_to_onnxruntime: float | None = None
    ratio_to_onnxruntime_min: float | None = None
    ratio_to_onnxruntime_int8: float | None = None  # median / onnxruntime/int8's median

    @property
    def name(self) -> str:
        return f"{self.backend}/{self.variant}" if self.variant else self.backend

    @property
    def median(self) -> float:
        return self.latency_ms["median"]

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "backend": self.backend,
            "variant": self.variant,
            "threads": self.threads,
            "device": self.device,
            "latency_ms": self.latency_ms,
            "attempts": self.attempts,
            "ratio_to_onnxruntime": self.ratio_to_onnxruntime,
            "ratio_to_onnxruntime_min": self.ratio_to_onnxruntime_min,
            "ratio_to_onnxruntime_int8": self.ratio_to_onnxruntime_int8,
            "memory": {
                "peak_rss_mib": round(self.peak_rss_mib, 1),
                "baseline_rss_mib": round(self.baseline_rss_mib, 1),
                "model_rss_mib": round(self.peak_rss_mib - self.baseline_rss_mib, 1),
            },
            "parity": {k: finite_or_text(v) if isinstance(v, float) else v for k, v in self.parity.items()},
        }


@dataclass(frozen=True)
class Selection:
    """The budget's pick at one thread count: the fastest variant that fits, or none (`fits` False,
    `reason` then lists why each variant failed)."""

    threads: int
    variant: str | None
    reason: str
    fits: bool

    def to_dict(self) -> dict:
        return {"variant": self.variant, "reason": self.reason, "fits": self.fits}


@dataclass
class BenchReport:
    """Everything one bench measured."""

    model: str
    spec: str
    options: BenchOptions
    budget: Budget
    method: str
    input: dict
    rows: list[BenchRow]
    backends: dict[str, BackendResult]
    variants: list[Variant]
    selection: dict[int, Selection] = field(default_factory=dict)
    versions: dict[str, Any] = field(default_factory=dict)
    machine: dict[str, Any] = field(default_factory=dict)
    preprocess: dict | None = None
    model_info: dict[str, Any] = field(default_factory=dict)
    artifacts: dict[str, dict | None] = field(default_factory=dict)
    stages: dict[str, dict] = field(default_factory=dict)
    tune: list = field(default_factory=list)  # tune.TuneResult per tuned variant (bench --tune)

    @property
    def budget_fits(self) -> bool | None:
        """Whether a variant fits the budget at the largest thread count; None when nothing was selected
        (no ncnn variant benched)."""
        pick = self.selection.get(max(self.options.threads))
        return None if pick is None else pick.fits

    def row(self, name: str, threads: int) -> BenchRow | None:
        return next((r for r in self.rows if r.name == name and r.threads == threads), None)

    def to_dict(self) -> dict:
        o = self.options
        return {
            "schema": SCHEMA,
            "kind": "bench",
            "model": self.model,
            "spec": self.spec,
            "versions": self.versions,
            "machine": self.machine,
            "options": {
                "runs": o.runs,
                "warmup": o.warmup,
                "threads": list(o.threads),
                "budget": self.budget.text,
                "retries": o.retries,
            },
            "method": self.method,
            "input": self.input,
            "preprocess": self.preprocess,
            "model_info": self.model_info,
            "artifacts": self.artifacts,
            "backends": {n: b.to_dict() for n, b in self.backends.items()},
            "variants": {v.name: v.to_dict() for v in self.variants if not v.peer},
            "peers": {v.label: v.to_dict() for v in self.variants if v.peer},
            "results": [r.to_dict() for r in self.rows],
            "stages": self.stages,
            "selection": {
                "budget": self.budget.text,
                "by_threads": {str(t): s.to_dict() for t, s in self.selection.items()},
            },
            **({"tune": [t.to_dict() for t in self.tune]} if self.tune else {}),
        }
