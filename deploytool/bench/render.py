"""bench's results for people: table rows, the rich table, the lines below it, Markdown."""

from __future__ import annotations

from pathlib import Path

from ..registry import REFERENCE
from ..report import fmt
from .records import RATIO_BASELINE, RATIO_BASELINE_INT8, BenchReport
from .tune import render_tune, tune_markdown

HEADERS = ["backend/variant", "threads", "median ms", "p90 ms", "min ms", "x ORT", "x ORT int8", "max_abs",
           "peak_rel", "top1/det agreement", "peak RSS MiB (model)"]  # fmt: skip


def _task_cell(parity: dict) -> str:
    """top1_agreement (classify) or detection_agreement (detect), else '-'."""
    if parity.get("top1_agreement") is not None:
        return f"{parity['top1_agreement']:.2f}"
    if parity.get("detection_agreement") is not None:
        return f"det {parity['detection_agreement']:.2f}"
    return "-"


def _times(ratio: float | None) -> str:
    return fmt(ratio, ".2f") + ("x" if ratio else "")


def table_rows(report: BenchReport) -> list[list[str]]:
    """One row per BenchRow, in HEADERS' order."""
    rows = []
    for r in report.rows:
        lat, p = r.latency_ms, r.parity
        ref = r.backend == REFERENCE
        model_mib = r.peak_rss_mib - r.baseline_rss_mib
        rows.append(
            [
                r.name,
                str(r.threads),
                f"{lat['median']:.2f}" + ("*" if lat.get("spread_note") else ""),
                f"{lat['p90']:.2f}",
                f"{lat['min']:.2f}",
                _times(r.ratio_to_onnxruntime),
                _times(r.ratio_to_onnxruntime_int8),
                "ref" if ref else fmt(p["max_abs"], ".2g"),
                "ref" if ref else fmt(p["peak_rel"], ".2g"),
                "ref" if ref else _task_cell(p),
                f"{r.peak_rss_mib:.0f} ({model_mib:+.0f})",
            ]
        )
    return rows


def render_bench(report: BenchReport, console) -> None:
    """Rich table of every backend and variant, then model facts and the budget's pick."""
    from rich.table import Table

    table = Table(title=f"{report.model}: latency (inference only), parity against {REFERENCE}, memory")
    for i, h in enumerate(HEADERS):
        table.add_column(h, justify="left" if i == 0 else "right")
    for row in table_rows(report):
        table.add_row(*row)
    console.print(table)
    for line in summary_lines(report):
        console.print(line, markup=False, highlight=False)
    if report.tune:
        render_tune(report.tune, console)


def summary_lines(report: BenchReport) -> list[str]:
    """The facts below the table, as plain lines (console and Markdown)."""
    o = report.options
    lines = [
        f"median of {o.runs} timed runs after {o.warmup} warm-up; x ORT (x ORT int8) = median / "
        f"{RATIO_BASELINE}'s ({RATIO_BASELINE_INT8}'s) median at the same threads; "
        "peak_rel = max|got-ref| / max|ref|; top1/det agreement = share of "
        f"inputs whose top-1 class / detections match {REFERENCE}; * = wide spread (busy machine)"
    ]
    pre = report.preprocess
    if pre:
        lines.append(
            f"pre-processing (not in the latencies): decode {pre['decode_ms']['median']:.2f} ms, "
            f"resize+normalise {pre['preprocess_ms']['median']:.2f} ms (median, {Path(pre['image']).name})"
        )
    info = report.model_info
    if info.get("macs"):
        lines.append(
            f"parameters {info['parameters'] / 1e6:.2f} M; {info['macs'] / 1e9:.3f} GMACs "
            f"({info['flops'] / 1e9:.2f} GFLOPs) counted from the ncnn .param graph"
        )
    sizes = ", ".join(f"{k} {v['bytes'] / 2**20:.1f} MiB" for k, v in report.artifacts.items() if v)
    if sizes:
        lines.append(f"files: {sizes}")
    for r in report.rows:
        if r.parity.get("max_abs_vs_fp32") == 0.0:
            lines.append(f"{r.name} @{r.threads}: output identical to fp32 (the mode changes nothing here)")
    for threads, pick in report.selection.items():
        prefix = f"budget {report.budget.text} @{threads} threads: "
        lines.append(prefix + (pick.reason if pick.fits else "NONE FITS - " + pick.reason))
    return lines


def bench_markdown(report: BenchReport) -> str:
    """The table and summary as Markdown (docs/performance.md, CI pages)."""
    head = "| " + " | ".join(HEADERS) + " |\n|" + "|".join(["---"] + ["---:"] * (len(HEADERS) - 1)) + "|\n"
    body = "".join("| " + " | ".join(row) + " |\n" for row in table_rows(report))
    notes = "".join(f"- {line}\n" for line in summary_lines(report))
    tuned = "\n" + tune_markdown(report.tune) if report.tune else ""
    return head + body + "\n" + notes + tuned
