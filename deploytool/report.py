"""Render a run's report: console table, report.json, JUnit XML."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

from rich.console import Console
from rich.table import Table

from .atomic import write_text


def fmt(v, spec: str = ".3g") -> str:
    """A number for a table cell; strings ("inf", "ref") and None ("-") pass through."""
    if v is None:
        return "-"
    if isinstance(v, str):
        return v
    return format(v, spec)


def console_summary(report: dict, console: Console) -> None:
    """The parity table (worst case per backend and output), task agreement and stage timings."""
    table = Table(title=f"{report['model']}: parity against {_reference(report)}")
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
    for (backend, output), rows in _group(report["comparisons"]).items():
        worst = max(rows, key=lambda r: _num(r["max_abs"]))
        ok = all(r["passed"] for r in rows)
        table.add_row(
            backend,
            output,
            str(len(rows)),
            fmt(worst["max_abs"]),
            fmt(worst["max_rel"]),
            fmt(min(_num(r["cosine"]) for r in rows)),
            f"{worst['atol']:.0e}/{worst['rtol']:.0e}",
            fmt(max(_num(r["min_atol"]) for r in rows)),
            "[green]pass[/]"
            if ok
            else "[red]FAIL[/]" + (f" ({worst['reason']})" if worst.get("reason") else ""),
        )
    console.print(table)
    for backend, t in report.get("task", {}).items():
        keys = [k for k in t if k.endswith("_agreement")]
        text = ", ".join(f"{k} {t[k]:.2f}" for k in keys)
        console.print(f"  {backend}: {text} [{'green]pass' if t.get('passed', True) else 'red]FAIL'}[/]")
        for item in t.get("per_input", []):
            for line in item.get("failures", [])[:3]:
                console.print(f"    [red]{item['input']}[/]: {line}", highlight=False)
    for name, info in report["backends"].items():
        if not info["available"]:
            console.print(f"  [yellow]skipped {name}[/]: {info['reason']}")
        elif info.get("latency_ms_median") is not None:
            dev = f" on {info['device']}" if info.get("device") not in (None, "cpu") else ""
            pre = info.get("preprocess_max_abs")
            note = f"; its own preprocessing vs Python's: max_abs {fmt(pre)}" if pre is not None else ""
            console.print(f"  {name}{dev}: median {info['latency_ms_median']:.2f} ms per inference{note}")
    if report.get("layers"):
        layer_table(report, console)
    stages = ", ".join(f"{k} {v['seconds']:.2f}s" for k, v in report["stages"].items())
    console.print(f"  stages: {stages}")
    verdict = "[green]PASSED[/]" if report["passed"] else "[red]FAILED[/]"
    failed_tasks = [b for b, t in report.get("task", {}).items() if not t.get("passed", True)]
    failed_layers = [n for n, f in report.get("layerwise", {}).get("first_failure", {}).items() if f]
    extra = "".join(
        f"; {what} failed: {', '.join(names)}"
        for what, names in (("task checks", failed_tasks), ("layer-wise", failed_layers))
        if names
    )
    console.print(
        f"{verdict}: {sum(c['passed'] for c in report['comparisons'])}/{len(report['comparisons'])} "
        f"tensor checks passed{extra}"
    )


def layer_table(report: dict, console: Console) -> None:
    """Blobs in graph order, one error column per layer-wise comparison; the first failure of each marked."""
    rows = report["layers"]
    names = list(dict.fromkeys(r["comparison"] for r in rows))
    by_blob: dict[str, dict] = {}
    for r in rows:
        by_blob.setdefault(r["blob"], {"row": r})[r["comparison"]] = r
    firsts = report.get("layerwise", {}).get("first_failure", {})
    table = Table(title="per-layer max |Δ| (✗ = over tolerance, ◀ = first failure)")
    for col in ("#", "layer", "type", "blob"):
        table.add_column(col)
    for name in names:
        table.add_column(name, justify="right")
    for blob, entry in sorted(by_blob.items(), key=lambda kv: kv[1]["row"]["index"]):
        cells = []
        for name in names:
            r = entry.get(name)
            if r is None:
                cells.append("")
                continue
            first = firsts.get(name)
            mark = " ◀" if first and first["blob"] == blob else (" ✗" if not r["passed"] else "")
            style = "red" if not r["passed"] else ""
            cells.append(f"[{style}]{fmt(r['max_abs'])}{mark}[/]" if style else fmt(r["max_abs"]) + mark)
        row = entry["row"]
        table.add_row(str(row["index"]), row["layer"], row["type"], blob, *cells)
    console.print(table)
    for name in names:
        first = firsts.get(name)
        if first is None:
            console.print(f"  {name}: every blob within tolerance")
        else:
            console.print(
                f"  [red]{name}: first diverges at layer {first['layer']} ({first['type']}), "
                f"blob {first['blob']}, max_abs {fmt(first['max_abs'])}[/]"
            )


def _reference(report: dict) -> str:
    return report["comparisons"][0]["reference"] if report["comparisons"] else "torch"


def _num(v) -> float:
    return float(v) if not isinstance(v, str) else float("inf")


def _group(comparisons: list[dict]) -> dict:
    groups: dict = {}
    for c in comparisons:
        groups.setdefault((c["backend"], c["output"]), []).append(c)
    return groups


def write_json(report: dict, path: Path | str) -> Path:
    return write_text(path, json.dumps(report, indent=2, default=str) + "\n")


def write_junit(report: dict, path: Path | str) -> Path:
    """One testcase per (backend, input, output), plus one per task-level check."""
    suite = ET.Element("testsuite", name=f"deploytool.{report['model']}")
    failures = 0
    for c in report["comparisons"]:
        case = ET.SubElement(
            suite,
            "testcase",
            classname=f"{report['model']}.{c['backend']}",
            name=f"{Path(c['input']).name}:{c['output']}",
        )
        if not c["passed"]:
            failures += 1
            msg = c.get("reason") or (
                f"max_abs {fmt(c['max_abs'])} max_rel {fmt(c['max_rel'])} exceeds atol {c['atol']} "
                f"rtol {c['rtol']}; smallest passing atol {fmt(c['min_atol'])}"
            )
            ET.SubElement(case, "failure", message=msg)
    for backend, t in report.get("task", {}).items():
        case = ET.SubElement(suite, "testcase", classname=f"{report['model']}.{backend}", name="task")
        if not t.get("passed", True):
            failures += 1
            ET.SubElement(
                case, "failure", message=json.dumps({k: v for k, v in t.items() if k != "per_input"})
            )
    for name, first in report.get("layerwise", {}).get("first_failure", {}).items():
        case = ET.SubElement(suite, "testcase", classname=f"{report['model']}.layerwise", name=name)
        if first is not None:
            failures += 1
            msg = f"first diverges at layer {first['layer']} ({first['type']}), blob {first['blob']}"
            ET.SubElement(case, "failure", message=msg)
    suite.set("tests", str(len(suite)))
    suite.set("failures", str(failures))
    suite.set("time", str(sum(s["seconds"] for s in report.get("stages", {}).values())))
    ET.indent(suite)
    return write_text(path, ET.tostring(suite, encoding="unicode", xml_declaration=True) + "\n")


def write_markdown(report: dict, path: Path | str, pictures: list[Path] | None = None) -> Path:
    """A summary fit for a CI job page: verdict, worst error per backend and output, task agreement,
    the first failing layer, stage timings, and links to the PNG pictures."""
    path = Path(path)
    ok = report["passed"]
    lines = [f"# {report['model']}: {'passed' if ok else 'FAILED'}", ""]
    lines += [f"Reference: `{_reference(report)}`. Check: |got − ref| ≤ atol + rtol·|ref| elementwise.", ""]
    lines += [
        "| backend | output | inputs | max_abs | max_rel | cosine | atol / rtol | smallest passing atol "
        "| result |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for (backend, output), rows in _group(report["comparisons"]).items():
        worst = max(rows, key=lambda r: _num(r["max_abs"]))
        passed = all(r["passed"] for r in rows)
        lines.append(
            f"| {backend} | {output} | {len(rows)} | {fmt(worst['max_abs'])} | {fmt(worst['max_rel'])} | "
            f"{fmt(min(_num(r['cosine']) for r in rows))} | {worst['atol']:g} / {worst['rtol']:g} | "
            f"{fmt(max(_num(r['min_atol']) for r in rows))} | {'pass' if passed else '**FAIL**'} |"
        )
    if report.get("task"):
        lines += ["", "| backend | task agreement | result |", "|---|---|---|"]
        for backend, t in report["task"].items():
            text = ", ".join(f"{k} {t[k]:.2f}" for k in t if k.endswith("_agreement"))
            lines.append(f"| {backend} | {text} | {'pass' if t.get('passed', True) else '**FAIL**'} |")
    for name, first in report.get("layerwise", {}).get("first_failure", {}).items():
        where = (
            "every blob within tolerance"
            if first is None
            else f"first diverges at `{first['layer']}` ({first['type']}), blob `{first['blob']}`, "
            f"max_abs {fmt(first['max_abs'])}"
        )
        lines += ["", f"Layer-wise, {name}: {where}."]
    skipped = [f"{n} ({i['reason']})" for n, i in report["backends"].items() if not i["available"]]
    if skipped:
        lines += ["", "Skipped: " + "; ".join(skipped)]
    stages = ", ".join(f"{k} {v['seconds']:.2f} s" for k, v in report.get("stages", {}).items())
    lines += ["", f"Stages: {stages}"]
    for pic in pictures or []:
        lines += ["", f"![{pic.stem}]({pic.name})"]
    return write_text(path, "\n".join(lines) + "\n")
