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
        (line,) = ax.plot(xs, ys, marker=".", label=name)
        bad = [(x, y) for x, y, r in zip(xs, ys, rows, strict=True) if not r.passed]
        if bad:
            ax.scatter(*zip(*bad, strict=True), color=line.get_color(), marker="x", s=60)
    ax.set_yscale("log")
    ax.set_xlabel("layer index (graph order)")
    ax.set_ylabel("max |Δ| of the layer's output")
    ax.set_title(f"{report.model}: per-layer error (× = over tolerance)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, plt, path)


def _save(fig, plt, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return Path(path)
