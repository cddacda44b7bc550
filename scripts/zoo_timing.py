"""Time the whole zoo matrix (`make zoo`) three ways and write the result into docs/performance.md between
its zoo-timing markers (scripts/bench.py keeps that section when it regenerates the file):

  1. cold, --jobs 1   (an empty stage cache)
  2. cold, --jobs 2   (another empty stage cache)
  3. warm, --jobs 2   (the cache of run 2: nothing changed, so only judging is left)

    .venv/bin/python scripts/zoo_timing.py        # ~30 min on this 2-core machine
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BEGIN, END = "<!-- zoo-timing:begin -->", "<!-- zoo-timing:end -->"


def timed(args: list[str], out: Path) -> tuple[float, dict]:
    cmd = [sys.executable, "-m", "deploytool.cli", "--quiet", "matrix", *args, "--out", str(out)]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode not in (0, 1):
        sys.exit(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return seconds, json.loads((out / "matrix.json").read_text())


def section(rows: list[tuple[str, float, dict]], load: tuple[float, float]) -> str:
    cold1, cold2, warm = (r[1] for r in rows)
    cells = rows[0][2]["cells"]
    counts = {s: sum(c["status"] == s for c in cells) for s in ("pass", "fail", "skipped", "error")}
    models = sorted({c["model"] for c in cells})
    lines = [
        BEGIN,
        "## The zoo matrix (`make zoo`)",
        "",
        f"Written by `scripts/zoo_timing.py`: `deploytool matrix` over {len(models)} specs of models/ "
        f"({', '.join(models)}) on the default backends; load average (1 min) before / after: "
        f"{load[0]:.2f} / {load[1]:.2f}. Cells: "
        + ", ".join(f"{n} {s}" for s, n in counts.items() if n)
        + ".",
        "",
        "| run | wall time | vs cold --jobs 1 |",
        "|---|---:|---:|",
        f"| cold, --jobs 1 | {cold1:.0f} s | 1.00 |",
        f"| cold, --jobs 2 | {cold2:.0f} s | {cold2 / cold1:.2f} (goal < 0.65) |",
        f"| warm, --jobs 2 (nothing changed) | {warm:.0f} s | {warm / cold1:.2f}; "
        f"{warm / cold2:.2f} of cold --jobs 2 (goal < 0.25) |",
        "",
        "Cold: every export, conversion and inference runs; warm: the stage cache returns the files and the",
        "outputs (keys unchanged), so only loading the specs, copying files and judging are left.",
        END,
    ]
    return "\n".join(lines) + "\n"


def splice(doc: str, text: str) -> str:
    if BEGIN in doc and END in doc:
        head, rest = doc.split(BEGIN, 1)
        return head + text + rest.split(END, 1)[1].lstrip("\n")
    return doc.rstrip("\n") + "\n\n" + text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--doc", type=Path, default=REPO / "docs" / "performance.md")
    parser.add_argument("models", nargs="*", help="default: every spec")
    args = parser.parse_args()
    load0 = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="zoo-timing.") as tmp:
        tmp = Path(tmp)
        rows = []
        for label, jobs, cache in (("cold1", 1, "c1"), ("cold2", 2, "c2"), ("warm", 2, "c2")):
            matrix_args = [*args.models, "--jobs", str(jobs), "--cache", str(tmp / cache)]
            seconds, doc = timed(matrix_args, tmp / label)
            print(f"{label}: {seconds:.1f} s", flush=True)
            rows.append((label, seconds, doc))
    text = section(rows, (load0, os.getloadavg()[0]))
    args.doc.write_text(splice(args.doc.read_text() if args.doc.is_file() else "", text))
    print(text)


if __name__ == "__main__":
    main()
