"""PNG pictures of a report: error histograms per output and per-layer error curves (matplotlib)."""

from __future__ import annotations

import math
from pathlib import Path

from .atomic import atomic_path
from .results import RunReport


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers and in CI
    import matplotlib.pyplot as plt

    return plt


def error_histograms(report: RunReport, path: Path) -> Path | None:
    """One panel per output: how many elements fall in each decade of |got - ref|, one bar set per backend."""
    hist = report.histograms
    edges = hist.get("edges_log10")
    series = {b: outs for b, outs in hist.items() if b != "edges_log10"}
    if not edges or not series:
        return None
    outputs = sorted({o for outs in series.values() for o in outs})
    plt = _pyplot()
    fig, axes = plt.subplots(len(outputs), 1, figsize=(8, 3 * len(outputs)), squeeze=False)
    labels = ["0 / <1e-10"] + [f"1e{e}" for e in edges]
    width = 0.8 / max(len(series), 1)
    for ax, output in zip(axes[:, 0], outputs, strict=True):
        for k, (backend, outs) in enumerate(series.items()):
            if output in outs:
                xs = [i + k * width for i in range(len(labels))]
                ax.bar(xs, outs[output], width=width, label=backend)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(labels))], labels, rotation=45, fontsize=7)
        ax.set_yscale("symlog")
        ax.set_ylabel("elements")
        ax.set_title(f"{report.model} · {output}: |backend − {report.reference}| per decade")
        ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, plt, path)


def layer_curves(report: RunReport, path: Path) -> Path | None:
    """Error against layer index (log scale), one line per layer-wise comparison; failures marked."""
    layers = report.layers
    if not layers:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(10, 4))
    for name in dict.fromkeys(row.comparison for row in layers):
        rows = [r for r in layers if r.comparison == name and math.isfinite(r.max_abs)]
        xs = [r.index for r in rows]
        ys = [max(r.max_abs, 1e-12) for r in rows]
        _marked_line(ax, xs, ys, name, [not r.passed for r in rows], marker="x", size=60)
    ax.set_xlabel("layer index (graph order)")
    ax.set_ylabel("max |Δ| of the layer's output")
    ax.set_title(f"{report.model}: per-layer error (× = over tolerance)")
    return _save_log(fig, ax, plt, path)


def _marked_line(ax, xs: list, ys: list, label: str, marked: list[bool], marker: str, size: int) -> None:
    """A line through (xs, ys) with the `marked` points drawn again with `marker` in its colour."""
    (line,) = ax.plot(xs, ys, marker=".", label=label)
    points = [(x, y) for x, y, m in zip(xs, ys, marked, strict=True) if m]
    if points:
        ax.scatter(*zip(*points, strict=True), color=line.get_color(), marker=marker, s=size)


def sensitivity_curve(sens, path: Path) -> Path:
    """int8 against fp32 blob by blob (sensitivity.GrowthRow): 1 − cosine and peak_rel against layer
    index (log scale), int8 layers' outputs marked."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(10, 4))
    xs = [g.index for g in sens.growth]
    for label, ys in (
        ("1 − cosine", [max(1.0 - g.cosine, 1e-12) for g in sens.growth]),
        ("peak_rel", [max(g.peak_rel, 1e-12) for g in sens.growth]),
    ):
        _marked_line(ax, xs, ys, label, [g.int8 for g in sens.growth], marker="s", size=18)
    ax.set_xlabel("layer index (graph order); squares: int8 layers")
    ax.set_ylabel("int8 vs fp32")
    ax.set_title(f"{sens.model}: int8 error growth on {Path(sens.growth_input).name}")
    return _save_log(fig, ax, plt, path)


def _save_log(fig, ax, plt, path: Path) -> Path:
    """A log-scale y axis and a legend, then saved."""
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, plt, path)


def _save(fig, plt, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return Path(path)
