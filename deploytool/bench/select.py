"""The pick: the fastest ncnn variant whose parity stays within a judge.Budget, per thread count (peers
such as onnxruntime/int8 are compared, never picked)."""

from __future__ import annotations

from collections.abc import Sequence

from ..errors import ParityError, SpecError
from ..judge import Budget
from .records import RATIO_BASELINE, BenchRow, Selection
from .variants import CANDIDATE_LABELS, VARIANT_BACKENDS


def select_variant(
    rows: Sequence[BenchRow], budget: Budget, threads: int | None = None, model: str = "the model"
) -> Selection:
    """The fastest variant (by median at `threads`, default the most benched) within `budget`, with the
    reason. Raises ParityError listing every variant and why it failed when none fits, SpecError when
    no variant was benched (at `threads`)."""
    entries = [r for r in rows if r.name in CANDIDATE_LABELS]
    if not entries:
        raise SpecError(f"no ncnn variant was benched; include {' or '.join(VARIANT_BACKENDS)} in --backends")
    if threads is None:
        threads = max(r.threads for r in entries)
    entries = [r for r in entries if r.threads == threads]
    if not entries:
        raise SpecError(f"no ncnn variant was benched at {threads} threads")
    fits, failed = [], []
    for r in sorted(entries, key=lambda r: r.median):
        why = budget.failures(r.parity)
        (failed if why else fits).append((r, why))
    if not fits:
        lines = "; ".join(f"{r.variant}: {', '.join(why)}" for r, why in failed)
        raise ParityError(
            f"no ncnn variant of {model} fits budget {budget.text!r} at {threads} threads: {lines}; "
            "loosen --budget or keep fp32"
        )
    best = fits[0][0]
    faster = [f"{r.variant} ({', '.join(why)})" for r, why in failed if r.median < best.median]
    p = best.parity
    vs = f", {best.ratio_to_onnxruntime:.2f}x {RATIO_BASELINE}" if best.ratio_to_onnxruntime else ""
    task = "".join(f", {k} {v:.2f}" for k, v in p.items() if k.endswith("_agreement") and v is not None)
    reason = (
        f"{best.variant} is the fastest variant within {budget.text} at {threads} threads: "
        f"median {best.median:.2f} ms{vs}; peak_rel {p['peak_rel']:.2g}, max_abs {p['max_abs']:.2g}{task}"
    )
    if faster:
        reason += "; faster but outside the budget: " + ", ".join(faster)
    return Selection(threads, best.variant, reason, fits=True)


def select_all(
    rows: Sequence[BenchRow], budget: Budget, threads: Sequence[int], model: str
) -> dict[int, Selection]:
    """select_variant at every thread count, a failure recorded (not raised); empty without variants."""
    if not any(r.name in CANDIDATE_LABELS for r in rows):
        return {}
    out = {}
    for t in threads:
        try:
            out[t] = select_variant(rows, budget, t, model)
        except ParityError as exc:
            out[t] = Selection(t, None, str(exc), fits=False)
    return out
