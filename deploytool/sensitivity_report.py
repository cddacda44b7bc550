"""The int8 sensitivity analysis shown to people: the console table and the Markdown section."""

from __future__ import annotations

import math
from pathlib import Path

from .sensitivity import FP32, SWEEP_BACKEND, TOP_N, Sensitivity, auto_mixed_line, cosine_text, fmt_value


def render_sensitivity(sens: Sensitivity, console, top: int = TOP_N) -> None:
    """The top layers of the ranking and a one-line summary of the error growth."""
    from rich.table import Table

    table = Table(
        title=f"{sens.model}: int8 sensitivity (each layer alone int8 vs {FP32}, {len(sens.inputs)} inputs)"
    )
    task = [
        k for k in ("top1_agreement", "detection_agreement") if sens.ranking and k in sens.ranking[0].metrics
    ]
    kept = {k.layer for k in sens.auto.kept} if sens.auto else set()
    top = max(top, len(kept))
    for col in ("rank", "layer", "type", "cosine", "peak_rel", *[t.split("_")[0] for t in task]):
        table.add_column(col, justify="right" if col not in ("layer", "type") else "left")
    if sens.auto is not None:
        table.add_column("auto-mixed")
    for i, r in enumerate(sens.ranking[:top], start=1):
        table.add_row(
            str(i), r.layer, r.type, cosine_text(r.metrics), fmt_value(r.metrics.get("peak_rel")),
            *[fmt_value(r.metrics.get(t), ".2f") for t in task],
            *([("kept fp32" if r.layer in kept else "int8")] if sens.auto is not None else []),
        )  # fmt: skip
    console.print(table)
    if len(sens.ranking) > top:
        console.print(f"  ({len(sens.ranking) - top} more layers in sensitivity.json)")
    if sens.growth:
        last = sens.growth[-1]
        worst = min(sens.growth, key=lambda g: g.cosine if math.isfinite(g.cosine) else -math.inf)
        console.print(
            f"  error growth on {sens.growth_input} (int8 vs fp32, {len(sens.growth)} blobs): output "
            f"{last.blob} cosine {last.cosine:.6f}, peak_rel {fmt_value(last.peak_rel)}; lowest cosine "
            f"{worst.cosine:.6f} at {worst.layer} ({worst.type})",
            highlight=False,
        )
    if sens.auto is not None:
        console.print(f"  {auto_mixed_line(sens.auto)}", highlight=False, markup=False)
    console.print(f"  sensitivity analysis {sens.seconds:.1f} s", highlight=False)


def markdown_section(sens: Sensitivity, folder: Path) -> tuple[str, list[Path]]:
    """The `## int8 sensitivity` section (ranking, auto-mixed choice, error-growth table) and its PNG,
    written into `folder` beside the Markdown file."""
    from .plots import sensitivity_curve

    png = sensitivity_curve(sens, folder / "sensitivity.png")
    lines = [
        "## int8 sensitivity",
        "",
        f"Each int8 layer alone int8 (every other layer fp32), on {len(sens.inputs)} inputs, against "
        f"the fp32 ncnn model on {SWEEP_BACKEND}; worst first. Analysis took {sens.seconds:.1f} s.",
        "",
        "| rank | layer | type | cosine | peak_rel | max_abs | top1 |",
        "|---:|---|---|---:|---:|---:|---:|",
    ]
    kept = {k.layer for k in sens.auto.kept} if sens.auto else set()
    for i, r in enumerate(sens.ranking, start=1):
        m = r.metrics
        lines.append(
            f"| {i} | `{r.layer}`{' (kept fp32)' if r.layer in kept else ''} | {r.type} | {cosine_text(m)} | "
            f"{fmt_value(m.get('peak_rel'))} | {fmt_value(m.get('max_abs'))} | "
            f"{fmt_value(m.get('top1_agreement'), '.2f')} |"
        )
    if sens.auto is not None:
        lines += ["", f"**{auto_mixed_line(sens.auto)}**"]
    lines += ["", f"![int8 error growth]({png.name})", ""]
    lines += [
        f"### Error growth: the int8 model against fp32, blob by blob, on `{sens.growth_input}`",
        "",
        "| # | layer | type | blob | int8 | cosine | peak_rel | max_abs |",
        "|---:|---|---|---|---|---:|---:|---:|",
    ]
    for g in sens.growth:
        lines.append(
            f"| {g.index} | `{g.layer}` | {g.type} | `{g.blob}` | {'int8' if g.int8 else ''} | "
            f"{g.cosine:.6f} | {fmt_value(g.peak_rel)} | {fmt_value(g.max_abs)} |"
        )
    return "\n".join(lines) + "\n", [png]
