"""The one place that decides: tensor metrics, tolerances per backend/precision/output (and per layer),
task agreement, budgets. run, parity, bench and layerwise all judge through it; it reads the backend
registry as data (lineage, judged precision) and never runs a backend."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from .detect import compare_raw
from .errors import SpecError, did_you_mean
from .registry import get_backend
from .results import ClassifyRow, DetectRow, InputItem, TaskAgreement, TensorComparison
from .spec import DEFAULT_TOLERANCES, ModelSpec, Tolerance

# ---------------------------------------------------------------- tensor metrics


def align(ref: np.ndarray, got: np.ndarray) -> np.ndarray | None:
    """`got` in `ref`'s shape when only the layout differs (ncnn drops or flattens axes), else None."""
    if got.shape == ref.shape:
        return got
    if got.size == ref.size:
        return got.reshape(ref.shape)
    return None


def compare_tensors(ref: np.ndarray, got: np.ndarray, tol: Tolerance, **ident) -> TensorComparison:
    """Elementwise check |got - ref| <= atol + rtol * |ref| + peak_rtol * max|ref|, with the statistics
    a user needs: the worst errors, cosine, and the smallest atol / rtol that would have passed."""
    ref = np.asarray(ref, dtype=np.float64)
    aligned = align(ref, np.asarray(got, dtype=np.float64))
    if aligned is None:
        nan, inf = float("nan"), float("inf")
        return TensorComparison(
            **ident, max_abs=nan, max_rel=nan, mean_abs=nan, cosine=nan, atol=tol.atol, rtol=tol.rtol,
            passed=False, min_atol=inf, min_rtol=inf, elements=int(ref.size), peak_rel=nan,
            reason=f"shape mismatch: reference {list(ref.shape)}, got {list(np.shape(got))}",
        )  # fmt: skip
    diff = np.abs(aligned - ref)
    mag = np.abs(ref)
    peak = float(mag.max(initial=0.0))
    floor = tol.atol + tol.peak_rtol * peak
    finite = bool(np.isfinite(aligned).all())
    bad = ~(diff <= floor + tol.rtol * mag)
    max_abs = float(diff.max()) if diff.size else 0.0
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = np.where(mag > 0, diff / mag, np.where(diff > 0, np.inf, 0.0))
        need_rtol = np.where(mag > 0, (diff - floor) / mag, np.where(diff > floor, np.inf, 0.0))
    norm = float(np.linalg.norm(ref) * np.linalg.norm(aligned))
    cosine = float(np.dot(ref.ravel(), aligned.ravel()) / norm) if norm > 0 else float(max_abs == 0)
    slack = diff - tol.rtol * mag - tol.peak_rtol * peak
    return TensorComparison(
        **ident,
        max_abs=max_abs,
        max_rel=float(rel.max()) if rel.size else 0.0,
        mean_abs=float(diff.mean()) if diff.size else 0.0,
        cosine=cosine,
        atol=tol.atol,
        rtol=tol.rtol,
        passed=finite and not bad.any(),
        min_atol=float(max(slack.max(initial=0.0), 0.0)) if finite else float("inf"),
        min_rtol=float(max(need_rtol.max(initial=0.0), 0.0)),
        mismatched=int(bad.sum()),
        elements=int(ref.size),
        reason=None if finite else "output contains NaN or Inf",
        peak_rel=max_abs / peak if peak > 0 else (0.0 if max_abs == 0 else math.inf),
        peak_rtol=tol.peak_rtol,
    )


HIST_EDGES_LOG10 = list(range(-10, 3))  # bins of log10|got - ref|: below 1e-10, [1e-10, 1e-9), …, 1e2 and up


def error_histogram(ref: np.ndarray, got: np.ndarray) -> list[int]:
    """Counts of |got - ref| per decade (HIST_EDGES_LOG10); exact matches fall in the first bin."""
    aligned = align(np.asarray(ref), np.asarray(got))
    if aligned is None:
        return [0] * (len(HIST_EDGES_LOG10) + 1)
    diff = np.abs(aligned.astype(np.float64) - np.asarray(ref, dtype=np.float64)).ravel()
    with np.errstate(divide="ignore"):
        logs = np.where(diff > 0, np.log10(np.where(diff > 0, diff, 1.0)), -np.inf)
    idx = np.searchsorted(HIST_EDGES_LOG10, logs, side="right")
    return np.bincount(idx, minlength=len(HIST_EDGES_LOG10) + 1).tolist()


def topk(logits: np.ndarray, k: int) -> list[int]:
    flat = np.asarray(logits, dtype=np.float64).reshape(-1)
    return [int(i) for i in np.argsort(-flat, kind="stable")[:k]]


def topk_agreement(ref: np.ndarray, got: np.ndarray, k: int = 5, input: str = "") -> ClassifyRow:
    """Top-1 equality, the share of the reference's top-k found in the backend's top-k, and the
    reference's margin between its first and second class (a top-1 swap under a margin smaller than
    the backend's error is a near-tie in the reference, not a broken layer)."""
    r, g = topk(ref, k), topk(got, k)
    flat = np.asarray(ref, dtype=np.float64).reshape(-1)
    margin = float(flat[r[0]] - flat[r[1]]) if len(r) > 1 else None
    return ClassifyRow(input, r[0], g[0], k, len(set(r) & set(g)) / k, margin)


# ---------------------------------------------------------------- tolerances


def _lineage(backend: str) -> list[str]:
    try:
        return get_backend(backend).lineage()
    except SpecError:  # not a backend name (`default`, a precision): looked up as it is
        return [backend]


def tolerance_at(
    spec: ModelSpec, backend: str, precision: str = "fp32", output: str | None = None
) -> Tolerance:
    """The spec's most specific tolerance: backend+precision, then the precision mode alone (`fp16`,
    `bf16`), then backend, then default; each first for `output` (`[tolerance.KEY.outputs.NAME]`). A
    backend on a target falls back to the names it refines: ncnn-cpp@aarch64:max, ncnn-cpp@aarch64,
    ncnn-cpp."""
    lineage = _lineage(backend)
    keys = [*(f"{b}-{precision}" for b in lineage), precision] if precision != "fp32" else []
    keys += [*lineage, "default"]
    for key in keys:
        for k in ([f"{key}/{output}"] if output else []) + [key]:
            if k in spec.tolerances:
                return spec.tolerances[k]
    return DEFAULT_TOLERANCES["default"]


def tolerance(spec: ModelSpec, backend: str, precision: str = "fp32", output: str | None = None,
              fp16_weights: bool = False) -> Tolerance:  # fmt: skip
    """The spec's tolerance for `backend`'s `output` at the precision it is judged at."""
    return tolerance_at(spec, backend, get_backend(backend).judged_precision(precision, fp16_weights), output)


# Per-layer parity (layerwise.py): the blobs of one graph against the float64 interpreter's, by the
# precision the graph ran at, as a share of each blob's range (peak_rtol).
LAYER_TOLERANCES = {
    "fp32": Tolerance(0.0, 0.0, peak_rtol=1e-4),  # ncnn fp32 kernels: measured <= 2.5e-6 on ResNet18
    # fp16 storage (Vulkan, ncnn fp16 mode), and bf16: measured <= 2.5e-3 on llvmpipe
    "fp16": Tolerance(0.0, 0.0, peak_rtol=1e-2),
    "bf16": Tolerance(0.0, 0.0, peak_rtol=1e-2),
    # ncnn's int8 kernels vs the interpreter's int8 arithmetic (round half away, clamp to +-127, integer
    # sums), layer by layer on ncnn's own inputs: measured <= 5.1e-4 on EfficientNet-Lite0 (a depthwise
    # layer), 1.3e-7 on ResNet18 (x86, AVX-512 VNNI)
    "int8": Tolerance(0.0, 0.0, peak_rtol=2e-3),
}
MATCH_TOLERANCE = Tolerance(1e-3, 1e-3)  # a torch tensor vs the ncnn blob it became, elementwise


# ---------------------------------------------------------------- task agreement


def classify_agreement(
    spec: ModelSpec, items: list[InputItem], ref_outs: list[dict], outs: list[dict]
) -> TaskAgreement:
    """Top-1 and top-k (the spec's task_args.top_k, default 5) agreement over every input; passes
    when every top-1 class matches. Each input carries its label and, when the spec names the
    classes, the names of both top-1 classes.

    An input whose reference margin (top-1 minus top-2 logit) is below the spec's
    task_args.near_tie_margin (default 0: none) is a near-tie: its top-1 is reported but not judged,
    and top1_agreement is over the other inputs (1.0 when none is left; `near_ties` says how many)."""
    k = spec.classify.top_k
    name = spec.output_names[0]
    classes, near = spec.classify.names, spec.classify.near_tie_margin
    per_input = []
    for item, r, g in zip(items, ref_outs, outs, strict=True):
        row = topk_agreement(r[name], g[name], k, item.label)
        if classes:
            row.names = tuple(classes[i] if i < len(classes) else None for i in (row.top1_ref, row.top1))
        row.near_tie = row.top1_margin_ref is not None and row.top1_margin_ref < near
        per_input.append(row)
    judged = [p for p in per_input if not p.near_tie]
    top1 = sum(p.top1_match for p in judged) / len(judged) if judged else 1.0
    top_k = sum(p.topk_overlap for p in per_input) / len(per_input)
    return TaskAgreement("classify", top1 == 1.0, per_input, top1_agreement=top1, topk_agreement=top_k, k=k)


@dataclass
class DecodedPair:
    """One input's detections after the same decode on both sides (for drawing)."""

    item: InputItem
    ref: object  # detect.Detections
    got: object


def detect_agreement(
    spec: ModelSpec, items: list[InputItem], ref_outs: list[dict], outs: list[dict]
) -> tuple[TaskAgreement, list[DecodedPair]]:
    """Detection-level parity per input (same decode + NMS on both sides, greedy IoU matching)."""
    settings = spec.detect
    name = spec.output_names[0]
    per_input, decoded = [], []
    for item, ref, got in zip(items, ref_outs, outs, strict=True):
        parity, ref_dets, got_dets = compare_raw(ref[name], got[name], item.geometry, settings)
        per_input.append(DetectRow(item.label, len(got_dets.above(settings.conf)), parity))
        decoded.append(DecodedPair(item, ref_dets, got_dets))
    passed = sum(p.parity.passed for p in per_input)
    agreement = TaskAgreement(
        "detect", passed == len(per_input), per_input, detection_agreement=passed / len(per_input)
    )
    return agreement, decoded


# ---------------------------------------------------------------- one backend against the reference


@dataclass
class Verdict:
    """Everything the judge says about one backend against the reference over a set of inputs."""

    backend: str
    reference: str
    precision: str  # what it was judged at (fp32, fp16, bf16)
    comparisons: list[TensorComparison]
    task: TaskAgreement | None
    histograms: dict[str, list[int]]  # output -> counts per decade of |got - ref|
    decoded: list[DecodedPair] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.comparisons) and (self.task is None or self.task.passed)

    def summary(self) -> dict:
        """The worst case over inputs and outputs, by the report's metric names, plus task agreement:
        what budgets and bench rows are judged on."""
        cs = self.comparisons
        tol = cs[0] if cs else None
        return {
            "reference": self.reference,
            "passed": self.passed,
            "max_abs": max((c.max_abs for c in cs), default=0.0),
            "max_rel": max((c.max_rel for c in cs), default=0.0),
            "peak_rel": max((c.peak_rel for c in cs), default=0.0),
            "cosine": min((c.cosine for c in cs), default=1.0),
            "min_atol": max((c.min_atol for c in cs), default=0.0),
            "tolerance": (
                {"precision": self.precision, "atol": tol.atol, "rtol": tol.rtol, "peak_rtol": tol.peak_rtol}
                if tol
                else None
            ),
            **(self.task.metrics() if self.task else {}),
        }


def judge_backend(
    spec: ModelSpec,
    backend: str,
    reference: str,
    items: list[InputItem],
    ref_outs: list[dict],
    outs: list[dict],
    precision: str = "fp32",
    fp16_weights: bool = False,
    int8_model: bool = False,
) -> Verdict:
    """Compare every output of `backend` on every input with the reference's, at the tolerance of the
    precision it ran at, and judge task agreement (classify: top-k; detect: matched detections)."""
    judged = get_backend(backend).judged_precision(precision, fp16_weights, int8_model)
    comparisons, histograms = [], {}
    for name in spec.output_names:
        tol = tolerance_at(spec, backend, judged, name)
        counts = np.zeros(len(HIST_EDGES_LOG10) + 1, dtype=np.int64)
        for item, ref, got in zip(items, ref_outs, outs, strict=True):
            ident = {"backend": backend, "reference": reference, "input": item.label, "output": name}
            comparisons.append(compare_tensors(ref[name], got[name], tol, **ident))
            counts += error_histogram(ref[name], got[name])
        histograms[name] = counts.tolist()
    task, decoded = None, []
    if spec.task == "classify":
        task = classify_agreement(spec, items, ref_outs, outs)
    elif spec.task == "detect":
        task, decoded = detect_agreement(spec, items, ref_outs, outs)
    return Verdict(backend, reference, judged, comparisons, task, histograms, decoded)


# ---------------------------------------------------------------- a runner's own image path

# The C++ runner decodes and preprocesses photos itself. Its input tensor is held to Python's by the
# mean difference in 0..255 pixel levels: where it decodes JPEG with the same library (OpenCV) the two
# agree to rounding; another decoder (stb_image on a board) moves pixels by about a level; a swapped
# channel order or a wrong mean moves them by tens.
IMAGE_PATH_MEAN_LEVELS = {"same decoder": 0.05, "other decoder": 1.0}


def judge_image_path(seen: dict) -> dict:
    """`seen` (a runner's extra()["image_path"]) with its verdict: `limit_mean_levels` and `passed`."""
    same = seen["decoder"] == seen["host_decoder"]
    limit = IMAGE_PATH_MEAN_LEVELS["same decoder" if same else "other decoder"]
    return dict(seen, limit_mean_levels=limit, passed=bool(seen["input_mean_levels"] <= limit))


# ---------------------------------------------------------------- budgets

# Budget keys are the report's metric names; the short forms are accepted on the command line.
AT_LEAST = ("top1_agreement", "top5_agreement", "detection_agreement", "cosine")
AT_MOST = ("peak_rel", "max_abs")
BUDGET_KEYS = AT_LEAST + AT_MOST
BUDGET_ALIASES = {"top1": "top1_agreement", "top5": "top5_agreement", "det": "detection_agreement",
                  "rel": "peak_rel", "abs": "max_abs", "cos": "cosine"}  # fmt: skip
DEFAULT_BUDGET = "top1_agreement=1,peak_rel=0.01"


@dataclass(frozen=True)
class Budget:
    """What a variant must keep against the reference over every input: at least `top1_agreement`,
    `top5_agreement` (classify), `detection_agreement` (detect), `cosine` (the worst output and
    input's); at most `peak_rel`
    (max|got - ref| / max|ref| per output and input: unlike elementwise relative error it does not
    explode on near-zero logits) and `max_abs`."""

    limits: dict[str, float]

    @property
    def text(self) -> str:
        return ",".join(f"{k}={self.limits[k]:g}" for k in BUDGET_KEYS if k in self.limits)

    def failures(self, summary: dict) -> list[str]:
        """Why a Verdict.summary() is outside this budget; empty when it fits."""
        out = []
        for key in BUDGET_KEYS:
            if key not in self.limits:
                continue
            limit, value = self.limits[key], summary.get(key)
            if value is None:
                out.append(f"{key} not measured for this task")
            elif isinstance(value, str) or not math.isfinite(value):
                out.append(f"{key} {value}")
            elif key in AT_LEAST and value < limit:
                out.append(f"{key} {_beside(value, limit)} < {limit:g}")
            elif key in AT_MOST and value > limit:
                out.append(f"{key} {_beside(value, limit)} > {limit:g}")
        return out


def _beside(value: float, limit: float) -> str:
    """`value` to 3 significant digits, or as many more as it takes not to read as `limit` (a cosine of
    0.99899 against 0.999)."""
    for digits in range(3, 10):
        text = f"{value:.{digits}g}"
        if text != f"{limit:g}":
            return text
    return repr(value)


def parse_budget(text: str | None, flag: str = "--budget") -> Budget:
    """'top1=1.0,rel=1e-2' (or the long names) -> Budget; anything malformed is a SpecError that
    names `flag` (--budget, --auto-mixed)."""
    example = f"e.g. {flag} top1=1.0,rel=1e-2"
    names = ", ".join(f"{k} ({a})" for a, k in BUDGET_ALIASES.items())
    items = [p.strip() for p in (text or "").split(",") if p.strip()]
    if not items:
        raise SpecError(f"{flag} is empty; give key=value pairs from {names} ({example})")
    limits: dict[str, float] = {}
    for item in items:
        key, sep, raw = (s.strip() for s in item.partition("="))
        if not sep:
            raise SpecError(f"{flag}: {item!r} is not key=value ({example})")
        canonical = BUDGET_ALIASES.get(key, key)
        if canonical not in BUDGET_KEYS:
            hint = did_you_mean(key, [*BUDGET_ALIASES, *BUDGET_KEYS])
            raise SpecError(f"{flag}: unknown key {key!r}; {hint}use {names} ({example})")
        if canonical in limits:
            raise SpecError(f"{flag}: {canonical} is given twice")
        try:
            value = float(raw)
        except ValueError:
            raise SpecError(f"{flag}: {key}={raw!r} is not a number ({example})") from None
        if not math.isfinite(value) or value < 0:
            raise SpecError(f"{flag}: {key} must be a finite number >= 0, got {raw}")
        if canonical in AT_LEAST and value > 1:
            raise SpecError(f"{flag}: {key} is a share of inputs (or a cosine) in [0, 1], got {raw}")
        limits[canonical] = value
    return Budget(limits)
