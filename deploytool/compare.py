"""Tensor metrics, tolerances and task-level agreement; knows nothing about backends."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from .spec import Tolerance


@dataclass
class TensorComparison:
    """One output of one backend on one input, against the reference."""

    backend: str
    reference: str
    input: str
    output: str
    max_abs: float
    max_rel: float
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

    def to_dict(self) -> dict:
        return {k: (_finite(v) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def _finite(v: float) -> float | str:
    return v if np.isfinite(v) else ("inf" if v > 0 else "nan")


def align(ref: np.ndarray, got: np.ndarray) -> np.ndarray | None:
    """`got` in `ref`'s shape when only the layout differs (ncnn drops or flattens axes), else None."""
    if got.shape == ref.shape:
        return got
    if got.size == ref.size:
        return got.reshape(ref.shape)
    return None


def compare_tensors(ref: np.ndarray, got: np.ndarray, tol: Tolerance, **ident) -> TensorComparison:
    """Elementwise check |got - ref| <= atol + rtol * |ref|, with the statistics a user needs."""
    ref = np.asarray(ref, dtype=np.float64)
    aligned = align(ref, np.asarray(got, dtype=np.float64))
    if aligned is None:
        nan = float("nan")
        return TensorComparison(
            **ident,
            max_abs=nan,
            max_rel=nan,
            mean_abs=nan,
            cosine=nan,
            atol=tol.atol,
            rtol=tol.rtol,
            passed=False,
            min_atol=float("inf"),
            min_rtol=float("inf"),
            elements=int(ref.size),
            reason=f"shape mismatch: reference {list(ref.shape)}, got {list(np.shape(got))}",
        )
    diff = np.abs(aligned - ref)
    mag = np.abs(ref)
    finite = bool(np.isfinite(aligned).all())
    bad = ~(diff <= tol.atol + tol.rtol * mag)
    max_abs = float(diff.max()) if diff.size else 0.0
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = np.where(mag > 0, diff / mag, np.where(diff > 0, np.inf, 0.0))
        need_rtol = np.where(mag > 0, (diff - tol.atol) / mag, np.where(diff > tol.atol, np.inf, 0.0))
    norm = float(np.linalg.norm(ref) * np.linalg.norm(aligned))
    cosine = float(np.dot(ref.ravel(), aligned.ravel()) / norm) if norm > 0 else float(max_abs == 0)
    return TensorComparison(
        **ident,
        max_abs=max_abs,
        max_rel=float(rel.max()) if rel.size else 0.0,
        mean_abs=float(diff.mean()) if diff.size else 0.0,
        cosine=cosine,
        atol=tol.atol,
        rtol=tol.rtol,
        passed=finite and not bad.any(),
        min_atol=float(max((diff - tol.rtol * mag).max(initial=0.0), 0.0)),
        min_rtol=float(max(need_rtol.max(initial=0.0), 0.0)),
        mismatched=int(bad.sum()),
        elements=int(ref.size),
        reason=None if finite else "output contains NaN or Inf",
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


def topk_agreement(ref: np.ndarray, got: np.ndarray, k: int = 5) -> dict:
    """Top-1 equality and the share of the reference's top-k found in the backend's top-k."""
    r, g = topk(ref, k), topk(got, k)
    return {
        "top1_ref": r[0],
        "top1": g[0],
        "top1_match": r[0] == g[0],
        f"top{k}_overlap": len(set(r) & set(g)) / k,
    }
