"""Typed results: input items, tensor comparisons, task agreement, backend results, the run report."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from .inputs import Geometry

SCHEMA = 1


def finite_or_text(v: float) -> float | str:
    """JSON has no inf/nan: they are written as the strings "inf", "-inf" and "nan"."""
    if math.isfinite(v):
        return v
    return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")


@dataclass(frozen=True)
class InputItem:
    """One input fed to every backend: where it came from, the tensors, and for photos the geometry
    of the preprocessing. `size` is set when the input is at one of the spec's dynamic shapes."""

    source: str  # a photo's path, an .npz path, "random(seed=0)", a golden file's label
    feed: dict[str, np.ndarray]
    geometry: Geometry | None = None
    image: Path | None = None  # the photo, for runners that preprocess it themselves
    size: tuple[int, int] | None = None  # (H, W) of a dynamic shape; None at the spec's input shape

    @property
    def label(self) -> str:
        """How reports name the input: `photo.jpg`, or `photo.jpg@HxW` at a dynamic shape."""
        return f"{self.source}@{self.size[0]}x{self.size[1]}" if self.size else self.source

    @property
    def at_spec_shape(self) -> bool:
        return self.size is None

    @property
    def tensor(self) -> np.ndarray:
        """The (single) input tensor."""
        return next(iter(self.feed.values()))


@dataclass
class TensorComparison:
    """One output of one backend on one input, against the reference."""

    backend: str
    reference: str
    input: str
    output: str
    max_abs: float
    max_rel: float  # elementwise |got - ref| / |ref|, the largest
    mean_abs: float
    cosine: float
    atol: float
    rtol: float
    passed: bool
    min_atol: float  # smallest atol that would pass at this rtol
    min_rtol: float  # smallest rtol that would pass at this atol
    mismatched: int = 0  # elements outside tolerance
    elements: int = 0
    reason: str | None = None
    peak_rel: float = 0.0  # max|got - ref| / max|ref|: the error against the output's range
    peak_rtol: float = 0.0  # the tolerance's share of max|ref| (reduced-precision storage, int8)

    def to_dict(self) -> dict:
        return {k: (finite_or_text(v) if isinstance(v, float) else v) for k, v in asdict(self).items()}


@dataclass
class TaskAgreement:
    """Task-level agreement of one backend with the reference over every input."""

    task: str  # classify | detect
    passed: bool
    per_input: list[dict] = field(default_factory=list)
    top1_agreement: float | None = None  # classify: share of inputs whose top-1 class matches
    topk_agreement: float | None = None  # classify: mean share of the reference's top-k found
    k: int | None = None
    detection_agreement: float | None = None  # detect: share of inputs whose detections match

    def metrics(self) -> dict[str, float]:
        """The agreement values by their report.json names (`top1_agreement`, `top5_agreement`, …)."""
        out = {}
        if self.top1_agreement is not None:
            out["top1_agreement"] = self.top1_agreement
        if self.topk_agreement is not None:
            out[f"top{self.k}_agreement"] = self.topk_agreement
        if self.detection_agreement is not None:
            out["detection_agreement"] = self.detection_agreement
        return out

    def to_dict(self) -> dict:
        return {**self.metrics(), "per_input": self.per_input, "passed": self.passed}


@dataclass
class BackendResult:
    """What one backend was and did in a run."""

    name: str
    available: bool = True
    reason: str | None = None  # why it is unavailable
    device: str | None = None
    latency_ms_median: float | None = None
    latency_method: str | None = None
    precision: str | None = None  # the ncnn precision mode, for backends that take one
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. preprocess_max_abs, a golden file
    error: str | None = None  # it ran, and failed (crashed, natively or not): the stage, signal and log

    def to_dict(self) -> dict:
        out: dict[str, Any] = {"available": self.available, "reason": self.reason, "device": self.device}
        if self.latency_ms_median is not None:
            out["latency_ms_median"] = self.latency_ms_median
            out["latency_method"] = self.latency_method
        if self.precision is not None:
            out["precision"] = self.precision
        if self.error is not None:
            out["error"] = self.error
        out.update(self.extra)
        return out


@dataclass
class LayerRow:
    """One blob of the graph in one layer-wise comparison."""

    comparison: str  # e.g. "ncnn-cpu vs interpreter"
    index: int  # the producing layer's position in the .param
    blob: str
    layer: str
    type: str
    max_abs: float
    passed: bool
    peak_rel: float | None = None
    torch_op: str | None = None  # for torch-vs-ncnn rows: the matching torch tensor

    def to_dict(self) -> dict:
        out = {k: (finite_or_text(v) if isinstance(v, float) else v) for k, v in asdict(self).items()}
        return {k: v for k, v in out.items() if v is not None or k not in ("peak_rel", "torch_op")}


@dataclass
class RunReport:
    """report.json (schema 1) as an object; `to_dict` writes its stable keys."""

    model: str
    spec: str
    reference: str
    versions: dict[str, str | None]
    artifacts: dict[str, Any]
    input: dict[str, Any]
    backends: dict[str, BackendResult]
    stages: dict[str, dict]
    comparisons: list[TensorComparison] = field(default_factory=list)
    task: dict[str, TaskAgreement] = field(default_factory=dict)
    histograms: dict[str, Any] = field(default_factory=dict)
    layers: list[LayerRow] = field(default_factory=list)
    layer_input: str | None = None
    first_failure: dict[str, LayerRow | None] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # e.g. why --precision auto chose a variant

    @property
    def checks(self) -> int:
        """How many verdicts the report holds: tensor comparisons, task and layer-wise checks."""
        return len(self.comparisons) + len(self.task) + len(self.first_failure)

    @property
    def failed_backends(self) -> list[BackendResult]:
        return [b for b in self.backends.values() if b.error is not None]

    @property
    def passed(self) -> bool:
        """Every check passed, no backend failed, and something was checked."""
        return (
            self.checks > 0
            and not self.failed_backends
            and all(c.passed for c in self.comparisons)
            and all(t.passed for t in self.task.values())
            and all(f is None for f in self.first_failure.values())
            and not self.failed_image_paths
        )

    @property
    def failed_image_paths(self) -> list[str]:
        """Backends whose own photo decoding and preprocessing strayed from Python's (judge_image_path)."""
        return [n for n, b in self.backends.items() if b.extra.get("image_path", {}).get("passed") is False]

    @property
    def failed_tasks(self) -> list[str]:
        return [b for b, t in self.task.items() if not t.passed]

    @property
    def failed_layerwise(self) -> list[str]:
        return [n for n, f in self.first_failure.items() if f is not None]

    def to_dict(self) -> dict:
        out = {
            "schema": SCHEMA,
            "model": self.model,
            "spec": self.spec,
            "passed": self.passed,
            "reference": self.reference,
            "versions": self.versions,
            "artifacts": self.artifacts,
            "input": self.input,
            "backends": {n: b.to_dict() for n, b in self.backends.items()},
            "stages": self.stages,
            "comparisons": [c.to_dict() for c in self.comparisons],
            "task": {n: t.to_dict() for n, t in self.task.items()},
            "histograms": self.histograms,
        }
        if self.notes:
            out["notes"] = self.notes
        if self.layers or self.first_failure:
            out["layers"] = [r.to_dict() for r in self.layers]
            out["layerwise"] = {
                "input": self.layer_input,
                "first_failure": {n: f and f.to_dict() for n, f in self.first_failure.items()},
            }
        return out
