"""Render a run's report: console table, report.json, JUnit XML, Markdown (+ plots.py's PNGs)."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

from rich.console import Console
from rich.table import Table

from .atomic import writable_folder, write_text
from .errors import SpecError
from .results import ClassifyRow, DetectRow, RunReport, TensorComparison, Worst


def fmt(v, spec: str = ".3g") -> str:
    """A number for a table cell; strings ("inf", "ref") and None ("-") pass through."""
    if v is None:
        return "-"
    if isinstance(v, str):
        return v
    return format(v, spec)


def console_summary(report: RunReport, console: Console) -> None:
    """The parity table (worst case per backend and output), task agreement and stage timings."""
    table = Table(title=f"{report.model}: parity against {report.reference}")
    for col in (
        "backend",
        "output",
        "inputs",
        "max_abs",
        "max_rel",
        "cosine",
        "atol/rtol",
        "min atol",
        "result",
    ):
        table.add_column(col, justify="right" if col not in ("backend", "output", "result") else "left")
    for (backend, output), worst in _worst_by_output(report.comparisons).items():
        row = worst.row
        table.add_row(
            backend,
            output,
            str(worst.checks),
            fmt(row.max_abs),
            fmt(row.max_rel),
            fmt(worst.cosine),
            f"{row.atol:.0e}/{row.rtol:.0e}",
            fmt(worst.min_atol),
            "[green]pass[/]" if worst.passed else "[red]FAIL[/]" + (f" ({row.reason})" if row.reason else ""),
        )
    console.print(table)
    first = next(iter(report.task.values()), None)
    if first is not None and first.task == "classify" and first.per_input:
        top1 = ", ".join(f"{i.input} {i.ref_class!r}" for i in first.per_input)
        console.print(f"  {report.reference} top-1: {top1}", highlight=False)
    for backend, t in report.task.items():
        text = ", ".join(f"{k} {v:.2f}" for k, v in t.metrics().items())
        ties = sum(1 for item in t.per_input if isinstance(item, ClassifyRow) and item.near_tie)
        if ties:
            text += f" ({ties} near-tie{'s' if ties > 1 else ''} in the reference not judged)"
        console.print(f"  {backend}: {text} [{'green]pass' if t.passed else 'red]FAIL'}[/]")
        for item in t.per_input:
            if isinstance(item, DetectRow):
                for line in item.parity.failures[:3]:
                    console.print(f"    [red]{item.input}[/]: {line}", highlight=False)
            elif not item.top1_match:
                tie = " [yellow](near-tie: not judged)[/]" if item.near_tie else ""
                console.print(f"    [red]{_class_swap(item, backend)}[/]{tie}", highlight=False)
    verdicts = report.verdicts
    for name, info in report.backends.items():
        if not info.available:
            console.print(f"  [yellow]skipped {name}[/]: {info.reason}")
        elif info.error is not None:
            console.print(f"  [red]{name} failed[/]: {info.error}", highlight=False)
        elif info.latency_ms_median is not None:
            dev = f" on {info.device}" if info.device not in (None, "cpu") else ""
            console.print(
                f"  {name}{dev}: {info.latency_ms_median:.2f} ms per inference ({info.latency_method})"
            )
            if "image_path" in info.extra:
                seen = _image_path(info.extra["image_path"], verdicts[name].image_path)
                console.print(f"  {name}: {seen}", highlight=False)
            if "layers_on_device" in info.extra:
                console.print(f"  {name}: {_placement(info.extra)}", highlight=False)
    if any(b.latency_ms_median is not None for b in report.backends.values()):
        console.print(
            "  (latencies are indicative: `deploytool bench` times every backend in a fresh process)"
        )
    for note in report.notes:
        console.print(f"  {note}", highlight=False, markup=False)
    if report.layers:
        layer_table(report, console)
    stages = ", ".join(f"{k} {v['seconds']:.2f}s" for k, v in report.stages.items())
    console.print(f"  stages: {stages}")
    verdict = "[green]PASSED[/]" if report.passed else "[red]FAILED[/]"
    extra = "".join(
        f"; {what} failed: {', '.join(names)}"
        for what, names in (
            ("task checks", report.failed_tasks),
            ("layer-wise", report.failed_layerwise),
            ("image path", report.failed_image_paths),
            ("backends", [b.name for b in report.failed_backends]),
        )
        if names
    )
    passed = sum(c.passed for c in report.comparisons)
    console.print(f"{verdict}: {passed}/{len(report.comparisons)} tensor checks passed{extra}")


def _image_path(seen: dict, passed: bool | None) -> str:
    """What the C++ runner's own photo decoding and preprocessing changed, apart from the network, and
    its verdict (`passed`; None: not judged)."""
    outs = ", ".join(f"{k} max_abs {fmt(v)}" for k, v in seen["output_max_abs"].items())
    decoder = seen["decoder"]
    same = decoder == seen["host_decoder"]
    versus = "" if same else f" vs {seen['host_decoder']}"
    verdict = ""
    if passed is not None:
        verdict = "ok, " if passed else "FAIL, "
        verdict += f"mean {seen['input_mean_levels']:.3g} pixel levels, limit {seen['limit_mean_levels']:g}; "
    text = (
        f"its own preprocessing vs Python's ({decoder} decoder{versus}): {verdict}"
        f"input max_abs {fmt(seen['input_max_abs'])}; outputs on the photo vs on Python's tensor: {outs}"
    )
    if same:
        return text + " (the photo runs are judged)"
    return text + " (the JPEG decoder's part; the tensor runs are judged, so it is not blamed on the model)"


def _placement(extra: dict) -> str:
    """Where a Vulkan net ran its layers, e.g. '70/70 layers ran on the device (int8: 59/59)'; the
    layers ncnn kept on the CPU are named, so a CPU fallback is never read as a Vulkan result."""
    text = f"{extra['layers_on_device']}/{extra['layers']} layers ran on the device"
    if extra.get("int8_layers"):
        text += f" (int8: {extra['int8_layers_on_device']}/{extra['int8_layers']})"
    cpu = extra.get("layers_on_cpu") or []
    if cpu:
        more = f" and {len(cpu) - 5} more" if len(cpu) > 5 else ""
        text += f"; on the CPU instead: {', '.join(cpu[:5])}{more}"
    return text


def _class_swap(item: ClassifyRow, backend: str) -> str:
    """'cat.jpg: reference 'tabby' (margin 0.5), ncnn-cpu 'tiger cat'': a top-1 disagreement, by name
    when the spec names the classes, with the reference's own top-1/top-2 margin."""
    margin = item.top1_margin_ref
    why = f" (margin {fmt(margin)})" if margin is not None else ""
    return f"{item.input}: reference {item.ref_class!r}{why}, {backend} {item.got_class!r}"


def layer_table(report: RunReport, console: Console) -> None:
    """Blobs in graph order, one error column per layer-wise comparison; the first failure of each marked."""
    rows = report.layers
    names = list(dict.fromkeys(r.comparison for r in rows))
    by_blob: dict[str, dict] = {}
    for r in rows:
        by_blob.setdefault(r.blob, {"row": r})[r.comparison] = r
    firsts = report.first_failure
    table = Table(title="per-layer max |Δ| (✗ = over tolerance, ◀ = first failure)")
    for col in ("#", "layer", "type", "blob"):
        table.add_column(col)
    for name in names:
        table.add_column(name, justify="right")
    for blob, entry in sorted(by_blob.items(), key=lambda kv: kv[1]["row"].index):
        cells = []
        for name in names:
            r = entry.get(name)
            if r is None:
                cells.append("")
                continue
            first = firsts.get(name)
            mark = " ◀" if first and first.blob == blob else (" ✗" if not r.passed else "")
            cells.append(f"[red]{fmt(r.max_abs)}{mark}[/]" if not r.passed else fmt(r.max_abs) + mark)
        row = entry["row"]
        table.add_row(str(row.index), row.layer, row.type, blob, *cells)
    console.print(table)
    for name in names:
        first = firsts.get(name)
        if first is None:
            console.print(f"  {name}: every blob within tolerance")
        else:
            console.print(f"  [red]{name}: {_diverges(first)}[/]")


def _diverges(first, quote: str = "") -> str:
    """`first diverges at layer L (Type), blob B, max_abs …`; Markdown quotes the names in backticks."""
    where = f"layer {quote}{first.layer}{quote} ({first.type}), blob {quote}{first.blob}{quote}"
    return f"first diverges at {where}, max_abs {fmt(first.max_abs)}"


def _worst_by_output(comparisons: list[TensorComparison]) -> dict[tuple[str, str], Worst]:
    """The worst case of each (backend, output) over the inputs."""
    groups: dict = {}
    for c in comparisons:
        groups.setdefault((c.backend, c.output), []).append(c)
    return {key: Worst.of(rows) for key, rows in groups.items()}


def write_json(report: RunReport, path: Path | str) -> Path:
    return write_text(path, json.dumps(report.to_dict(), indent=2, default=str) + "\n")


def write_junit(report: RunReport, path: Path | str) -> Path:
    """One testcase per (backend, input, output), plus one per task-level and layer-wise check."""
    suite = ET.Element("testsuite", name=f"deploytool.{report.model}")
    failures = 0
    for c in report.comparisons:
        case = ET.SubElement(
            suite,
            "testcase",
            classname=f"{report.model}.{c.backend}",
            name=f"{Path(c.input).name}:{c.output}",
        )
        if not c.passed:
            failures += 1
            msg = c.reason or (
                f"max_abs {fmt(c.max_abs)} max_rel {fmt(c.max_rel)} exceeds atol {c.atol} "
                f"rtol {c.rtol}; smallest passing atol {fmt(c.min_atol)}"
            )
            ET.SubElement(case, "failure", message=msg)
    for backend, t in report.task.items():
        case = ET.SubElement(suite, "testcase", classname=f"{report.model}.{backend}", name="task")
        if not t.passed:
            failures += 1
            ET.SubElement(case, "failure", message=json.dumps({**t.metrics(), "passed": t.passed}))
    for b in report.failed_backends:
        case = ET.SubElement(suite, "testcase", classname=f"{report.model}.{b.name}", name="run")
        failures += 1
        ET.SubElement(case, "error", message=b.error)
    for name, v in report.verdicts.items():
        if v.image_path is not None:
            case = ET.SubElement(suite, "testcase", classname=f"{report.model}.{name}", name="image_path")
            if not v.image_path:
                failures += 1
                ET.SubElement(
                    case, "failure", message=_image_path(report.backends[name].extra["image_path"], False)
                )
    for name, first in report.first_failure.items():
        case = ET.SubElement(suite, "testcase", classname=f"{report.model}.layerwise", name=name)
        if first is not None:
            failures += 1
            ET.SubElement(case, "failure", message=_diverges(first))
    suite.set("tests", str(len(suite)))
    suite.set("failures", str(failures))
    suite.set("time", str(sum(s["seconds"] for s in report.stages.values())))
    ET.indent(suite)
    return write_text(path, ET.tostring(suite, encoding="unicode", xml_declaration=True) + "\n")


def write_markdown(
    report: RunReport, path: Path | str, pictures: list[Path] | None = None, section: str | None = None
) -> Path:
    """A summary fit for a CI job page: verdict, worst error per backend and output, task agreement,
    the first failing layer, stage timings, and links to the PNG pictures; then `section` (Markdown
    a command adds, e.g. quantize --explain's `## int8 sensitivity`)."""
    path = Path(path)
    lines = [f"# {report.model}: {'passed' if report.passed else 'FAILED'}", ""]
    lines += [f"Reference: `{report.reference}`. Check: |got − ref| ≤ atol + rtol·|ref| elementwise.", ""]
    lines += [
        "| backend | output | inputs | max_abs | max_rel | cosine | atol / rtol | smallest passing atol "
        "| result |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for (backend, output), worst in _worst_by_output(report.comparisons).items():
        row = worst.row
        lines.append(
            f"| {backend} | {output} | {worst.checks} | {fmt(row.max_abs)} | {fmt(row.max_rel)} | "
            f"{fmt(worst.cosine)} | {row.atol:g} / {row.rtol:g} | "
            f"{fmt(worst.min_atol)} | {'pass' if worst.passed else '**FAIL**'} |"
        )
    if report.task:
        lines += ["", "| backend | task agreement | result |", "|---|---|---|"]
        for backend, t in report.task.items():
            text = ", ".join(f"{k} {v:.2f}" for k, v in t.metrics().items())
            lines.append(f"| {backend} | {text} | {'pass' if t.passed else '**FAIL**'} |")
    for name, first in report.first_failure.items():
        where = "every blob within tolerance" if first is None else _diverges(first, "`")
        lines += ["", f"Layer-wise, {name}: {where}."]
    skipped = [f"{n} ({b.reason})" for n, b in report.backends.items() if not b.available]
    if skipped:
        lines += ["", "Skipped: " + "; ".join(skipped)]
    for b in report.failed_backends:
        lines += ["", f"**{b.name} failed**: {b.error}"]
    lines += [""] + [f"Note: {n}" for n in report.notes] if report.notes else []
    stages = ", ".join(f"{k} {v['seconds']:.2f} s" for k, v in report.stages.items())
    lines += ["", f"Stages: {stages}"]
    for pic in pictures or []:
        lines += ["", f"![{pic.stem}]({pic.name})"]
    if section:
        lines += ["", section.rstrip("\n")]
    return write_text(path, "\n".join(lines) + "\n")


def write_outputs(
    report: RunReport, folder: Path | None, json_path: Path | None = None, junit: Path | None = None,
    markdown: Path | None = None, stem: str = "report", section=None,
) -> list[Path]:  # fmt: skip
    """STEM.json, junit.xml, STEM.md and its PNGs into the run folder (`parity` uses the stem
    "parity", so it never overwrites the run's own report), and wherever else asked; returns the
    paths written. A path that cannot be written is the user's error. `section(folder)`, when given,
    writes its own pictures into a Markdown file's folder and returns (Markdown text, their paths)."""
    from . import plots

    prefix = "" if stem == "report" else f"{stem}-"
    written: list[Path] = []
    try:
        for path, writer in (
            (folder and folder / f"{stem}.json", write_json),
            (folder and folder / f"{prefix}junit.xml", write_junit),
            (json_path, write_json),
            (junit, write_junit),
        ):
            if path:
                written.append(writer(report, path))
        for md, pre in ((folder and folder / f"{stem}.md", prefix), (markdown, "")):
            if md:
                pictures = [
                    p
                    for p in (
                        plots.error_histograms(report, md.parent / f"{pre}errors.png"),
                        plots.layer_curves(report, md.parent / f"{pre}layers.png"),
                    )
                    if p
                ]
                text, more = section(md.parent) if section else (None, [])
                written += [*pictures, *more, write_markdown(report, md, pictures, text)]
    except OSError as exc:
        raise SpecError(f"cannot write {exc.filename or 'a report file'}: {exc.strerror}") from None
    return list(dict.fromkeys(written))


def check_output_files(**paths: Path | None) -> None:
    """Refuse, before any work, an output file (by its flag, e.g. report=…) that is a folder or whose
    folder cannot be made."""
    for flag, path in paths.items():
        if path is None:
            continue
        path, name = Path(path), "--" + flag.replace("_", "-")
        if path.is_dir():
            raise SpecError(f"{name} {path} is a folder; give a file name such as {path / 'out.json'}")
        writable_folder(path.parent, f"{name} {path}")
