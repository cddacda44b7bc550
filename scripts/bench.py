"""Regenerate docs/performance.md: bench resnet18, efficientnet_lite0 and yolov8n (those whose spec exists)
at 1 and 2 threads, with the int8 rows (ncnn's and ONNX Runtime's) compared in a section of their own."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from zoo_timing import BEGIN as ZOO_BEGIN  # noqa: E402  (scripts/ is on sys.path: this script's folder)
from zoo_timing import END as ZOO_END  # noqa: E402

from deploytool.atomic import write_text  # noqa: E402
from deploytool.bench import BenchOptions, bench_markdown, bench_model  # noqa: E402
from deploytool.errors import DeployError  # noqa: E402
from deploytool.judge import DEFAULT_BUDGET  # noqa: E402
from deploytool.spec_toml import load_spec  # noqa: E402
from deploytool.versions import versions  # noqa: E402

# Measured by hand on ResNet18, 2 threads, medians (issue 5).
ANCHORS = {"onnxruntime": 18.4, "torchscript": 24.6, "ncnn-cpu/fp32": 13.1}
AIM_RATIO = 0.5
DETECT_BUDGET = "detection_agreement=1"  # top-1 means nothing for a detector: every photo's detections match
MODELS = ("resnet18", "efficientnet_lite0", "yolov8n")
PHOTOS = (REPO / "images", REPO / "images" / "eval")  # the demo photos and the eval photos (not images/calib)
# The budget `quantize --auto-mixed` meets on images/ to choose each model's int8-mixed row (layers kept fp32)
MIXED_BUDGETS = {
    "resnet18": "cosine=0.9995",
    "efficientnet_lite0": "cosine=0.999",
    "yolov8n": "peak_rel=0.02",
}


def kept_fp32(name: str, out: Path) -> tuple[tuple[str, ...], str]:
    """The layers `deploytool quantize NAME --auto-mixed BUDGET` keeps fp32 (run as a user would, its
    log in OUT/quantize.log), and a line saying how they were chosen; () when it finds none."""
    budget = MIXED_BUDGETS.get(name)
    if budget is None:
        return (), "no auto-mixed budget set for this model"
    out.mkdir(parents=True, exist_ok=True)
    cli = Path(sys.executable).with_name("deploytool")
    cmd = [str(cli), "--quiet", "quantize", name, "--auto-mixed", budget, "--out", str(out / "run"),
           "--report", str(out / "report.json")]  # fmt: skip
    with open(out / "quantize.log", "w") as log:
        rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, check=False).returncode
    report = out / "report.json"
    kept = json.loads(report.read_text())["artifacts"].get("int8_kept_fp32") if report.is_file() else None
    if rc not in (0, 1) or not kept:  # 1 with a kept list: found, but the run's own checks failed
        return (), f"`quantize --auto-mixed {budget}` exited {rc} (see {out / 'quantize.log'})"
    kept = tuple(kept)
    return (
        kept,
        f"`quantize --auto-mixed {budget}` on images/ kept {len(kept)} layers fp32: {', '.join(kept)}"
        + ("" if rc == 0 else " (that run failed its other checks, see its log)"),
    )


def _r(result: dict, name: str, threads: int) -> dict | None:
    return next((r for r in result["results"] if r["name"] == name and r["threads"] == threads), None)


def machine_section(machine: dict, load_before, load_after) -> str:
    flags = ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in machine["flags"].items())
    ncnn = ", ".join(
        f"{k} {'yes' if v else 'no'}" for k, v in machine["ncnn_cpu_support"].items() if "x86" in k
    )
    return (
        "## Machine\n\n"
        f"- CPU: {machine['cpu']}, {machine['cores']} cores visible to this process\n"
        f"- CPU flags (/proc/cpuinfo): {flags}\n"
        f"- ncnn's own detection (ncnn.cpu_support_*): {ncnn or 'n/a'}\n"
        f"- Vulkan device: {machine['vulkan_device'] or 'none'}"
        " (Mesa's software rasteriser: Vulkan compute runs on the same CPU cores)\n"
        f"- load average (1 min) before / after: {load_before:.2f} / {load_after:.2f}; the machine is shared "
        "with other jobs, so medians are quoted and the spread of each row is kept in bench.json\n"
    )


def versions_section(v: dict) -> str:
    return "## Versions\n\n" + "".join(f"- {k}: {val}\n" for k, val in v.items()) + "\n"


def method_section(result: dict) -> str:
    o = result["options"]
    return (
        "## Method\n\n"
        f"- {result['method']}.\n"
        f"- Runs: {o['warmup']} warm-up, {o['runs']} timed; the table quotes the median, p90 and min. "
        "`*` marks a row whose (p90 - min) / median exceeds 25 %: the machine was busy during it.\n"
        "- Threads: torch.set_num_threads, ONNX Runtime intra-op threads and ncnn's num_threads all equal "
        "the column `threads` (inter-op 1). Vulkan on llvmpipe uses llvmpipe's own worker threads.\n"
        "- Parity: every input photo through each backend once, compared with torch eager at the same "
        "thread count; `max_abs` and `peak_rel` (= max|got - ref| / max|ref|, per output) are the worst "
        "over inputs; `top1_agreement` is the share of photos whose top-1 class matches torch; "
        "`detection_agreement` (detect specs) the "
        "share whose detections match torch's (deploytool.detect.match_detections); detect specs are "
        f"judged with budget `{DETECT_BUDGET}`.\n"
        "- Memory: `peak RSS` of the worker process, in brackets what loading and running the model "
        "added to the resident size after importing the backend's library.\n"
        "- Pre-processing (OpenCV decode, resize, normalise) is timed apart and is not in any latency.\n\n"
    )


def _gflops(result: dict, row: dict) -> float | None:
    flops = (result.get("model_info") or {}).get("flops")
    return flops / (row["latency_ms"]["median"] * 1e-3) / 1e9 if flops else None


def comparison_section(result: dict) -> str:
    t = 2
    ort, ts, fp32 = (_r(result, n, t) for n in ("onnxruntime", "torchscript", "ncnn-cpu/fp32"))
    if ort is None or fp32 is None:
        return (
            "## Against the issue's anchors\n\nnot measured at 2 threads (onnxruntime or ncnn-cpu missing)\n"
        )
    lines = [
        "## Against the issue's anchors (ResNet18, 2 threads, medians)\n",
        "| backend | anchor ms | measured ms | anchor x ORT | measured x ORT | x ORT of the mins |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, row in (("onnxruntime", ort), ("torchscript", ts), ("ncnn-cpu/fp32", fp32)):
        if row is None:
            continue
        a = ANCHORS[name]
        lines.append(
            f"| {name} | {a:.1f} | {row['latency_ms']['median']:.2f} | {a / ANCHORS['onnxruntime']:.2f}x "
            f"| {row['ratio_to_onnxruntime']:.2f}x | {row['ratio_to_onnxruntime_min']:.2f}x |"
        )
    sel = result["selection"]["by_threads"].get(str(t), {})
    pick = _r(result, f"ncnn-cpu/{sel.get('variant')}", t) or _r(
        result, f"ncnn-vulkan/{sel.get('variant')}", t
    )
    lines.append("")
    if pick is None:
        lines.append(f"No variant fits {result['selection']['budget']} at 2 threads: {sel.get('reason')}")
        return "\n".join(lines) + "\n"
    ratio = pick["ratio_to_onnxruntime"]
    met = ratio <= AIM_RATIO
    lines.append(
        f"Aim: the fastest variant within budget `{result['selection']['budget']}` at <= {AIM_RATIO}x "
        "onnxruntime. "
        f"Pick: **{pick['name']}**, median {pick['latency_ms']['median']:.2f} ms = **{ratio:.2f}x** "
        f"onnxruntime at 2 threads: the aim is **{'met' if met else 'not met'}**.\n"
    )
    lines.append("Every ncnn variant at 2 threads (effective GFLOP/s = 2 x MACs / median):\n")
    for r in (r for r in ncnn_variants(result) if r["threads"] == t):
        p = r["parity"]
        same = p.get("max_abs_vs_fp32")
        note = " (output identical to fp32: the mode does nothing here)" if same == 0.0 else ""
        gf = _gflops(result, r)
        lines.append(
            f"- {r['name']}: {r['latency_ms']['median']:.2f} ms, {r['ratio_to_onnxruntime']:.2f}x ORT, "
            f"{gf:.0f} GFLOP/s, peak_rel {p['peak_rel']:.2g}, top1_agreement {p['top1_agreement']:.2f}{note}"
        )
    lines.append("")
    lines += explanation(result, ort, fp32, pick, met)
    return "\n".join(lines) + "\n"


def ncnn_variants(result: dict) -> list[dict]:
    """The rows of ncnn's variants (not the peers such as onnxruntime/int8)."""
    return [r for r in result["results"] if r["variant"] and r["name"] not in result.get("peers", {})]


def _x(ratio: float | None) -> str:
    return "-" if ratio is None else f"{ratio:.2f}x"


def int8_rows(result: dict) -> list[dict]:
    """The rows the judge judged at int8 (ncnn's int8 model, ONNX Runtime's), by thread count."""
    rows = [r for r in result["results"] if (r["parity"].get("tolerance") or {}).get("precision") == "int8"]
    return sorted(rows, key=lambda r: (r["threads"], r["name"]))


def int8_section(results: dict[str, dict], mixed_notes: dict[str, str]) -> str:
    """ncnn int8 (all int8, and mixed: the layers `quantize --auto-mixed` keeps fp32) against ONNX Runtime
    fp32 and ONNX Runtime int8 at the same thread count, and how close each int8 model stays to torch,
    for every benched model."""
    lines = [
        "## int8: ncnn against ONNX Runtime\n",
        "Both int8 models are calibrated on `images/calib` with the spec's own preprocessing: ncnn's by "
        "`deploytool/quantize/` (kl), ONNX Runtime's by its `quantize_static` (`deploytool/quantize/ort.py`: "
        "QDQ, per-channel QInt8 weights, QUInt8 activations, MinMax). `x ORT` / `x ORT int8` = median / "
        "ONNX Runtime fp32's / int8's median at the same threads. Agreement and cosine are against torch "
        "eager on the photos of `images/` and `images/eval` (cosine: the worst output and photo); "
        "`passed` is the judge's int8 verdict (peak_rel <= the spec's int8 peak_rtol, and every top-1 / "
        "detection matching).\n",
        "| model | row | threads | median ms | x ORT | x ORT int8 | top1/det agreement | cosine | peak_rel "
        "| passed |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    lines[2:2] = [
        "`ncnn-cpu/int8-mixed` is ncnn's int8 model with the layers `quantize --auto-mixed` keeps fp32 "
        "(chosen on the 4 photos of `images/`, then judged here on those and `images/eval`):\n",
        *(f"- {name}: {note}" for name, note in mixed_notes.items()),
        "",
    ]
    for name, result in results.items():
        for r in int8_rows(result):
            p = r["parity"]
            agree = p.get("top1_agreement")
            agree = f"{agree:.2f}" if agree is not None else f"det {p.get('detection_agreement', 0):.2f}"
            lines.append(
                f"| {name} | {r['name']} | {r['threads']} | {r['latency_ms']['median']:.2f} "
                f"| {_x(r['ratio_to_onnxruntime'])} | {_x(r['ratio_to_onnxruntime_int8'])} | {agree} "
                f"| {p['cosine']:.4f} | {p['peak_rel']:.2g} | {'yes' if p['passed'] else 'no'} |"
            )
    return "\n".join(lines) + "\n"


def _yes(machine: dict, flag: str) -> str:
    return "yes" if machine["flags"].get(flag) else "no"


def explanation(result: dict, ort: dict, fp32: dict, pick: dict, met: bool) -> list[str]:
    """Why the numbers are what they are, from the measurements (no claims that are not measured)."""
    m = result["machine"]
    gf_ort = _gflops(result, ort)
    out = ["### Why\n"]
    if gf_ort:
        out.append(
            f"- ONNX Runtime reaches {gf_ort:.0f} GFLOP/s on 2 threads here ({gf_ort / 2:.0f} per thread; "
            f"{ort['latency_ms']['median']:.1f} ms against the anchor's {ANCHORS['onnxruntime']} ms). "
            f"avx512f: {_yes(m, 'avx512f')}. 0.5x means ncnn must deliver {2 * gf_ort:.0f} "
            "GFLOP/s-equivalent on the same two cores, i.e. do less or cheaper arithmetic "
            "(Winograd, bf16, int8) than ORT's fp32."
        )
    fr = fp32["ratio_to_onnxruntime"]
    anchor = ANCHORS["ncnn-cpu/fp32"] / ANCHORS["onnxruntime"]
    verdict = "matches" if abs(fr - anchor) < 0.1 else ("beats" if fr < anchor else "falls short of")
    out.append(f"- ncnn fp32 is {fr:.2f}x ORT here: it {verdict} the anchor's {anchor:.2f}x.")
    by = {r["variant"]: r for r in ncnn_variants(result) if r["threads"] == fp32["threads"]}
    base = fp32["latency_ms"]["median"]
    if "fp16-weights" in by:
        r = by["fp16-weights"]
        out.append(
            f"- fp16-weights halves the .bin but ncnn expands the weights to fp32 when loading them on a CPU "
            f"without fp16 storage: {r['latency_ms']['median'] / base:.2f}x fp32's time."
        )
    if "fp16" in by:
        r = by["fp16"]
        changed = (r["parity"].get("max_abs_vs_fp32") or 0) > 0
        out.append(
            f"- fp16 (ncnn's defaults; f16c: {_yes(m, 'f16c')}, avx512_fp16: {_yes(m, 'avx512_fp16')}): "
            f"the output {'changes' if changed else 'does not change'} against fp32 "
            f"(max_abs {r['parity'].get('max_abs_vs_fp32') or 0:.2g}), so fp16 storage "
            f"{'is' if changed else 'is not'} used by some layers; "
            f"time {r['latency_ms']['median'] / base:.2f}x fp32's."
        )
    if "bf16" in by:
        r = by["bf16"]
        out.append(
            f"- bf16 storage (avx512_bf16: {_yes(m, 'avx512_bf16')}): "
            f"{r['latency_ms']['median'] / base:.2f}x fp32's time at peak_rel {r['parity']['peak_rel']:.2g} "
            "(bf16 keeps 8 mantissa bits, fp16 11)."
        )
    if "vulkan" in by:
        out.append(
            f"- Vulkan runs on {m.get('vulkan_device') or 'no device'}, a software implementation on these "
            "same cores: its time measures the emulation, not a GPU."
        )
    if not met:
        out.append(
            "- What could reach 0.5x: int8 (ncnn's int8 against ONNX Runtime's own int8: the int8 "
            "section), or a board where ncnn's ARM kernels (fp16 arithmetic) face a weaker ORT build."
        )
    out.append(
        "- The machine is shared: the 1-minute load average is in the Machine section and every attempt's "
        "median and load are in bench.json (`attempts`). `x ORT of the mins` compares best cases, "
        "which contention disturbs least."
    )
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--out", type=Path, default=REPO / "out" / "bench")
    parser.add_argument("--doc", type=Path, default=REPO / "docs" / "performance.md")
    parser.add_argument("--retries", type=int, default=3, help="re-measure rows with a wide spread")
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated specs to bench")
    args = parser.parse_args()
    threads = [int(t) for t in args.threads.split(",")]

    load_before = os.getloadavg()[0]
    started = time.time()
    sections: list[str] = []
    first = None
    models = [m for m in args.models.split(",") if (REPO / "models" / f"{m}.toml").is_file()]
    benched: dict[str, dict] = {}
    mixed_notes: dict[str, str] = {}
    for name in models:
        keep, mixed_notes[name] = kept_fp32(name, args.out / f"{name}-mixed")
        opts = BenchOptions(
            out=args.out / name,
            runs=args.runs,
            warmup=args.warmup,
            threads=threads,
            images=PHOTOS,
            budget=DETECT_BUDGET if load_spec(name).task == "detect" else DEFAULT_BUDGET,
            retries=args.retries,
            keep_fp32=keep,
        )
        try:
            report = bench_model(load_spec(name), opts)
        except DeployError as exc:
            sections.append(f"## {name}\n\nnot benched: {exc}\n")
            continue
        result = report.to_dict()
        first = first or result
        benched[name] = result
        sections.append(f"## {name}\n\n" + bench_markdown(report))
        if name == "resnet18":
            sections.append(comparison_section(result))
    if first is None:
        print("no model could be benched", file=sys.stderr)
        return 1
    sections.append(int8_section(benched, mixed_notes))
    load_after = os.getloadavg()[0]
    doc = (
        "# Performance\n\n"
        "Generated by `scripts/bench.py` (`make bench`); do not edit by hand, rerun it. "
        f"Took {time.time() - started:.0f} s. Raw numbers: `out/bench/<model>/bench.json`.\n\n"
        + machine_section(first["machine"], load_before, load_after)
        + "\n"
        + versions_section(versions())
        + method_section(first)
        + "\n".join(sections)
    )
    old = args.doc.read_text() if args.doc.is_file() else ""
    if ZOO_BEGIN in old and ZOO_END in old:  # scripts/zoo_timing.py's section is kept as it measured it
        doc = (
            doc.rstrip("\n")
            + "\n\n"
            + ZOO_BEGIN
            + old.split(ZOO_BEGIN, 1)[1].split(ZOO_END, 1)[0]
            + ZOO_END
            + "\n"
        )
    write_text(args.doc, doc)
    print(f"wrote {args.doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
