"""Typed results: input items, tensor comparisons, task agreement and its per-input rows, backend
results, verdicts and the run report; to JSON and back."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from .errors import BackendError, ParityError

SCHEMA = 1


def finite_or_text(v: float) -> float | str:
    """JSON has no inf/nan: they are written as the strings "inf", "-inf" and "nan"."""
    if math.isfinite(v):
        return v
    return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")


def _from_json(cls, d: dict):
    """`cls(**d)` for a to_dict that wrote its floats with finite_or_text: "inf" and "nan" become floats."""
    floats = {f.name for f in fields(cls) if f.type.startswith("float")}
    return cls(**{k: float(v) if k in floats and isinstance(v, str) else v for k, v in d.items()})


@dataclass(frozen=True)
class Geometry:
    """How the original image maps into the network input: x_in = x_orig * scale + pad_x."""

    orig_w: int
    orig_h: int
    scale_x: float
    scale_y: float
    pad_x: float
    pad_y: float

    def to_original(self, boxes_xyxy: np.ndarray) -> np.ndarray:
        """Map boxes from network-input pixels back to original-image pixels, clipped to the image."""
        b = np.asarray(boxes_xyxy, dtype=np.float32).copy()
        b[:, [0, 2]] = ((b[:, [0, 2]] - self.pad_x) / self.scale_x).clip(0, self.orig_w)
        b[:, [1, 3]] = ((b[:, [1, 3]] - self.pad_y) / self.scale_y).clip(0, self.orig_h)
        return b


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

    @classmethod
    def from_dict(cls, d: dict) -> TensorComparison:
        return _from_json(cls, d)


@dataclass
class DetectionParity:
    """How well one backend's detections agree with the reference's."""

    passed: bool
    conf: float
    margin: float
    iou_min: float
    score_tol: float
    n_ref: int  # detections at or above conf
    n_got: int
    matched: int  # pairs (same class, IoU >= MATCH_IOU_FLOOR)
    unmatched_ref: int
    unmatched_got: int
    min_iou: float | None  # over matched pairs; None when nothing matched
    max_score_diff: float | None
    max_box_diff_px: float | None  # largest coordinate difference of a matched pair, original pixels
    borderline: int  # unmatched detections within `margin` of conf: may flip, not failures
    failures: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """The report.json form (`conf` is written as `confidence`)."""
        return {("confidence" if k == "conf" else k): v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> DetectionParity:
        return cls(**{("conf" if k == "confidence" else k): v for k, v in d.items()})


@dataclass
class ClassifyRow:
    """One input's top-k agreement with the reference: a classifier's row of task.per_input."""

    input: str
    top1_ref: int
    top1: int
    k: int
    topk_overlap: float  # the share of the reference's top-k found in the backend's top-k
    top1_margin_ref: float | None  # the reference's top-1 minus top-2 logit
    names: tuple[str | None, str | None] | None = None  # both top-1 classes' names, when the spec names them
    near_tie: bool = False  # the margin is under the spec's near_tie_margin: reported, not judged

    @property
    def top1_match(self) -> bool:
        return self.top1 == self.top1_ref

    @property
    def ref_class(self) -> str | int:
        """The reference's top-1 class: its name when known, else its index."""
        return (self.names and self.names[0]) or self.top1_ref

    @property
    def got_class(self) -> str | int:
        return (self.names and self.names[1]) or self.top1

    def to_dict(self) -> dict:
        out = {"input": self.input, "top1_ref": self.top1_ref, "top1": self.top1,
               "top1_match": self.top1_match, f"top{self.k}_overlap": self.topk_overlap,
               "top1_margin_ref": self.top1_margin_ref}  # fmt: skip
        if self.names is not None:
            out["top1_ref_name"], out["top1_name"] = self.names
        if self.near_tie:
            out["near_tie"] = True
        return out

    @classmethod
    def from_dict(cls, d: dict) -> ClassifyRow:
        k = next(int(key[3:-8]) for key in d if key.startswith("top") and key.endswith("_overlap"))
        names = (d["top1_ref_name"], d["top1_name"]) if "top1_name" in d else None
        return cls(d["input"], d["top1_ref"], d["top1"], k, d[f"top{k}_overlap"], d["top1_margin_ref"], names,
                   d.get("near_tie", False))  # fmt: skip


@dataclass
class DetectRow:
    """One input's detection-level agreement with the reference: a detector's row of task.per_input."""

    input: str
    detections: int  # the backend's detections at or above the confidence threshold
    parity: DetectionParity

    def to_dict(self) -> dict:
        return {"input": self.input, "detections": self.detections, **self.parity.to_dict()}

    @classmethod
    def from_dict(cls, d: dict) -> DetectRow:
        rest = {k: v for k, v in d.items() if k not in ("input", "detections")}
        return cls(d["input"], d["detections"], DetectionParity.from_dict(rest))


@dataclass
class TaskAgreement:
    """Task-level agreement of one backend with the reference over every input."""

    task: str  # classify | detect
    passed: bool
    per_input: list[ClassifyRow | DetectRow] = field(default_factory=list)
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
        return {**self.metrics(), "per_input": [r.to_dict() for r in self.per_input], "passed": self.passed}

    @classmethod
    def from_dict(cls, d: dict) -> TaskAgreement:
        if "detection_agreement" in d:
            rows = [DetectRow.from_dict(r) for r in d["per_input"]]
            return cls("detect", d["passed"], rows, detection_agreement=d["detection_agreement"])
        rows = [ClassifyRow.from_dict(r) for r in d["per_input"]]
        k = rows[0].k
        return cls("classify", d["passed"], rows, d["top1_agreement"], d[f"top{k}_agreement"], k)


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

    @classmethod
    def from_dict(cls, name: str, d: dict) -> BackendResult:
        known = {f.name for f in fields(cls)} - {"name", "extra"}
        extra = {k: v for k, v in d.items() if k not in known}
        return cls(name, **{k: v for k, v in d.items() if k in known}, extra=extra)


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

    @classmethod
    def from_dict(cls, d: dict) -> LayerRow:
        return _from_json(cls, d)


# ---------------------------------------------------------------- verdicts


@dataclass(frozen=True)
class Worst:
    """The worst case over tensor comparisons (one backend's, or one backend's output's)."""

    row: TensorComparison  # the largest max_abs: its max_rel, tolerance and reason are shown with it
    cosine: float  # the smallest
    min_atol: float  # the largest: the atol at which every input passes
    checks: int
    failed: int

    @classmethod
    def of(cls, comparisons: list[TensorComparison]) -> Worst | None:
        if not comparisons:
            return None
        return cls(
            row=max(comparisons, key=lambda c: c.max_abs),
            cosine=min(c.cosine for c in comparisons),
            min_atol=max(c.min_atol for c in comparisons),
            checks=len(comparisons),
            failed=sum(not c.passed for c in comparisons),
        )

    @property
    def passed(self) -> bool:
        return self.failed == 0


@dataclass(frozen=True)
class BackendVerdict:
    """One backend's verdict in a run, combined once: its tensor checks, its task agreement, its own
    image path, and whether it ran at all. The report, the matrix and the exit code read this."""

    backend: str
    tensors: Worst | None  # None: no tensor comparison (the reference, a skipped backend)
    task: TaskAgreement | None
    image_path: bool | None  # its own photo decoding and preprocessing held to Python's; None: not judged
    error: str | None  # it failed to run

    @property
    def passed(self) -> bool:
        return (
            self.error is None
            and (self.tensors is None or self.tensors.passed)
            and (self.task is None or self.task.passed)
            and self.image_path is not False
        )


@dataclass
class RunReport:
    """report.json (schema 1) as an object; `to_dict` writes its stable keys, `from_dict` reads them."""

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
    def verdicts(self) -> dict[str, BackendVerdict]:
        """Every backend's verdict (the reference's and a skipped one's pass: nothing of theirs is judged)."""
        out = {}
        for name in dict.fromkeys([*self.backends, *(c.backend for c in self.comparisons), *self.task]):
            b = self.backends.get(name)
            image = b.extra.get("image_path", {}).get("passed") if b else None  # judge.judge_image_path's
            tensors = Worst.of([c for c in self.comparisons if c.backend == name])
            out[name] = BackendVerdict(name, tensors, self.task.get(name), image, b.error if b else None)
        return out

    @property
    def passed(self) -> bool:
        """Every backend's verdict and every layer-wise check passed, and something was checked."""
        return self.checks > 0 and all(v.passed for v in self.verdicts.values()) and not self.failed_layerwise

    @property
    def failed_backends(self) -> list[BackendResult]:
        return [b for b in self.backends.values() if b.error is not None]

    @property
    def failed_image_paths(self) -> list[str]:
        """Backends whose own photo decoding and preprocessing strayed from Python's."""
        return [n for n, v in self.verdicts.items() if v.image_path is False]

    @property
    def failed_tasks(self) -> list[str]:
        return [n for n, v in self.verdicts.items() if v.task is not None and not v.task.passed]

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

    @classmethod
    def from_dict(cls, d: dict) -> RunReport:
        """A report.json read back; `schema` and `passed` are derived, not read."""
        layerwise = d.get("layerwise") or {}
        firsts = layerwise.get("first_failure", {})
        return cls(
            model=d["model"], spec=d["spec"], reference=d["reference"], versions=d["versions"],
            artifacts=d["artifacts"], input=d["input"],
            backends={n: BackendResult.from_dict(n, b) for n, b in d["backends"].items()}, stages=d["stages"],
            comparisons=[TensorComparison.from_dict(c) for c in d["comparisons"]],
            task={n: TaskAgreement.from_dict(t) for n, t in d["task"].items()}, histograms=d["histograms"],
            layers=[LayerRow.from_dict(r) for r in d.get("layers", [])], layer_input=layerwise.get("input"),
            first_failure={n: f and LayerRow.from_dict(f) for n, f in firsts.items()},
            notes=d.get("notes", []),
        )  # fmt: skip


def exit_code(passed: bool, failed: bool = False) -> int:
    """A finished command's exit code (design.md): 3 when a backend or job failed to run, else 0 when
    every check passed and 1 when one failed. Errors that stop a command carry their own (errors.py)."""
    if failed:
        return BackendError.exit_code
    return 0 if passed else ParityError.exit_code
