"""bench: statistics, budgets, variant selection, MAC counting, and one real ResNet18 bench."""

from __future__ import annotations

import json
import os

import pytest
from conftest import IMAGES

from deploytool.bench import (
    SPREAD_WIDE,
    VARIANT_NAMES,
    Budget,
    latency_stats,
    parse_budget,
    select_variant,
)
from deploytool.errors import ParityError, SpecError

# ---------------------------------------------------------------- statistics


def test_latency_stats_values():
    s = latency_stats([0.010, 0.011, 0.012, 0.013, 0.014])
    assert s["n"] == 5
    assert s["median"] == pytest.approx(12.0)
    assert s["min"] == pytest.approx(10.0)
    assert s["mean"] == pytest.approx(12.0)
    assert s["p90"] == pytest.approx(13.6)  # linear interpolation between 13 and 14
    assert s["stdev"] == pytest.approx(1.5811, abs=1e-3)
    assert s["spread"] == pytest.approx((13.6 - 10.0) / 12.0, abs=1e-3)
    assert s["spread"] > SPREAD_WIDE and "wide spread" in s["spread_note"]


def test_latency_stats_tight_and_single():
    tight = latency_stats([0.020, 0.0201, 0.0202, 0.0199])
    assert tight["spread_note"] is None
    one = latency_stats([0.005])
    assert one["stdev"] == 0.0 and one["median"] == one["p90"] == one["min"] == pytest.approx(5.0)
    with pytest.raises(ValueError):
        latency_stats([])


# ---------------------------------------------------------------- budgets


def test_parse_budget_good():
    b = parse_budget("top1=1.0, rel=1e-2")
    assert (b.top1, b.rel, b.top5, b.abs) == (1.0, 0.01, None, None)
    assert b.text == "top1=1,rel=0.01"
    full = parse_budget("abs=0.5,top5=0.8,top1=0.9,rel=0,det=1")
    assert (full.top1, full.top5, full.det, full.rel, full.abs) == (0.9, 0.8, 1.0, 0.0, 0.5)


@pytest.mark.parametrize(
    "text, match",
    [
        ("", "empty"),
        ("top1", "not key=value"),
        ("top=1", "did you mean"),
        ("speed=2", "unknown key"),
        ("rel=abc", "not a number"),
        ("top1=1.5", r"\[0, 1\]"),
        ("det=2", r"\[0, 1\]"),
        ("rel=-1", ">= 0"),
        ("rel=nan", "finite"),
        ("rel=1e-2,rel=1e-3", "twice"),
    ],
)
def test_parse_budget_bad(text, match):
    with pytest.raises(SpecError, match=match):
        parse_budget(text)


def test_budget_failures():
    b = parse_budget("top1=1.0,rel=1e-2,abs=0.1")
    assert b.failures({"top1": 1.0, "rel": 1e-3, "max_abs": 0.01}) == []
    why = b.failures({"top1": 0.75, "rel": 0.02, "max_abs": 0.01})
    assert why == ["top1 0.75 < 1", "rel 0.02 > 0.01"]
    assert b.failures({"top1": None, "rel": 0.0, "max_abs": 0.0, "task": "raw"}) == [
        "top1 not measured (task raw)"
    ]
    det = parse_budget("det=1.0")
    assert det.failures({"detections": 0.75, "task": "detect"}) == ["det 0.75 < 1"]
    assert det.failures({"detections": 1.0, "task": "detect"}) == []


# ---------------------------------------------------------------- selection


def _entry(variant, median, threads=2, top1=1.0, rel=1e-4, ratio=None):
    return {
        "name": f"ncnn-cpu/{variant}",
        "backend": "ncnn-cpu",
        "variant": variant,
        "threads": threads,
        "latency_ms": {"median": median},
        "ratio_to_onnxruntime": ratio,
        "parity": {"top1": top1, "top5": 1.0, "rel": rel, "max_abs": rel * 10, "task": "classify"},
    }


def _result(*entries):
    ort = {"name": "onnxruntime", "backend": "onnxruntime", "variant": None, "threads": 2}
    return {"model": "m", "results": [ort, *entries]}


def test_select_variant_fastest_within_budget():
    result = _result(
        _entry("fp32", 13.0, ratio=0.7),
        _entry("bf16", 8.0, rel=0.05, ratio=0.43),  # fastest, outside rel
        _entry("fp16", 10.0, ratio=0.54),
        _entry("fp16", 5.0, threads=1),  # another thread count: ignored at 2 threads
    )
    name, reason = select_variant(result, parse_budget("top1=1.0,rel=1e-2"))
    assert name == "fp16"
    assert "0.54x onnxruntime" in reason and "bf16 (rel 0.05 > 0.01)" in reason
    assert select_variant(result, parse_budget("top1=1.0,rel=1e-1"))[0] == "bf16"
    assert select_variant(result, parse_budget("rel=1e-2"), threads=1)[0] == "fp16"


def test_select_variant_none_fits():
    result = _result(_entry("fp32", 13.0, top1=0.75), _entry("bf16", 8.0, rel=0.05))
    with pytest.raises(ParityError) as info:
        select_variant(result, parse_budget("top1=1.0,rel=1e-2"))
    msg = str(info.value)
    assert info.value.exit_code == 1
    assert "no ncnn variant of m fits budget 'top1=1,rel=0.01' at 2 threads" in msg
    assert "fp32: top1 0.75 < 1" in msg and "bf16: rel 0.05 > 0.01" in msg


def test_select_variant_without_variants():
    with pytest.raises(SpecError, match="include ncnn-cpu"):
        select_variant(_result(), Budget(top1=1.0))


# ---------------------------------------------------------------- MACs


def test_count_macs_from_param():
    from deploytool.bench import count_macs
    from deploytool.ncnn_param import parse_param_text

    text = "\n".join(
        [
            "7767517",
            "5 5",
            "Input in0 0 1 in0 0=8 1=8 2=3",
            "Convolution conv 1 1 in0 c 0=16 1=3 11=3 4=1 5=1 6=432",  # 16*3*3*3 weights
            "ConvolutionDepthWise dw 1 1 c d 0=16 1=3 4=1 5=1 6=144 7=16",
            "Pooling pool 1 1 d p 0=1 4=1",
            "InnerProduct fc 1 1 p out0 0=10 1=1 2=160",
        ]
    )
    shapes = {"in0": (3, 8, 8), "c": (16, 8, 8), "d": (16, 8, 8), "p": (16,), "out0": (10,)}
    m = count_macs(parse_param_text(text), shapes)
    assert m["by_type"] == {"Convolution": 432 * 64, "ConvolutionDepthWise": 144 * 64, "InnerProduct": 160}
    assert m["macs"] == 432 * 64 + 144 * 64 + 160 and m["flops"] == 2 * m["macs"]
    assert m["skipped_layers"] == []


# ---------------------------------------------------------------- end to end


@pytest.mark.slow
def test_bench_resnet18_end_to_end(tmp_path):
    from rich.console import Console

    from deploytool.backends.ncnn_runner import vulkan_device_name
    from deploytool.bench import BenchOptions, bench_markdown, bench_model, render_bench
    from deploytool.spec import load_spec

    images = sorted(IMAGES.glob("*.jpg"))[:2]
    opts = BenchOptions(out=tmp_path, runs=3, warmup=1, threads=[1], images=images)
    result = bench_model(load_spec("resnet18"), opts)

    assert json.loads((tmp_path / "bench.json").read_text())["model"] == "resnet18"
    vulkan = vulkan_device_name() is not None
    if not vulkan and os.environ.get("DEPLOYTOOL_REQUIRE_VULKAN") == "1":
        pytest.fail("DEPLOYTOOL_REQUIRE_VULKAN=1 but ncnn sees no Vulkan device")
    names = {r["name"] for r in result["results"]}
    expected = {"torch", "torchscript", "onnxruntime"} | {f"ncnn-cpu/{v}" for v in VARIANT_NAMES[:4]}
    assert expected <= names
    assert ("ncnn-vulkan/vulkan" in names) == vulkan
    if not vulkan:
        assert result["backends"]["ncnn-vulkan"]["available"] is False

    ort = next(r for r in result["results"] if r["name"] == "onnxruntime")
    for r in result["results"]:
        lat = r["latency_ms"]
        assert lat["n"] == 3 and 0 < lat["min"] <= lat["median"] <= lat["p90"]
        assert r["ratio_to_onnxruntime"] == pytest.approx(
            lat["median"] / ort["latency_ms"]["median"], rel=1e-3
        )
        assert r["memory"]["peak_rss_mib"] >= r["memory"]["baseline_rss_mib"] > 0
        p = r["parity"]
        assert p["max_abs"] >= 0 and p["rel"] >= 0 and 0 <= p["top1"] <= 1 and 0 <= p["top5"] <= 1
        if r["variant"]:
            assert r["variant"] in result["variants"]
    fp32 = next(r for r in result["results"] if r["variant"] == "fp32")
    assert fp32["parity"]["passed"] and fp32["parity"]["top1"] == 1.0 and fp32["parity"]["rel"] < 1e-4

    info = result["model_info"]
    assert info["parameters"] == 11_689_512
    assert info["macs"] == pytest.approx(1.814e9, rel=0.01)  # torchvision's ResNet18: 1.81 GMACs
    arts = result["artifacts"]
    assert arts["ncnn_bin_fp16_weights"]["bytes"] < 0.6 * arts["ncnn_bin"]["bytes"]
    assert result["preprocess"]["preprocess_ms"]["median"] > 0
    assert set(result["selection"]["by_threads"]) == {"1"}

    console = Console(record=True, width=200)
    render_bench(result, console)
    text = console.export_text()
    assert "ncnn-cpu/fp32" in text and "budget top1=1,rel=0.01 @1 threads" in text
    assert "| ncnn-cpu/fp32 | 1 |" in bench_markdown(result)


def test_cli_bench_rejects_a_bad_budget_before_measuring(tmp_path):
    from typer.testing import CliRunner

    from deploytool.cli import app

    result = CliRunner().invoke(app, ["bench", "resnet18", "--budget", "top1=abc", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "budget" in result.stderr
    assert not (tmp_path / "bench.json").exists()
    result = CliRunner().invoke(app, ["bench", "resnet18", "--threads", "0", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "--threads" in result.stderr


@pytest.mark.slow
def test_run_precision_auto_writes_the_chosen_variant(tmp_path):
    import json

    from typer.testing import CliRunner

    from deploytool.cli import app

    args = [
        "run",
        "resnet18",
        "--precision",
        "auto",
        "--budget",
        "top1=1.0,rel=1e-2",
        "--backends",
        "torch,ncnn-cpu",
        "--images",
        str(IMAGES / "chelsea.jpg"),
        "--out",
        str(tmp_path),
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "precision auto:" in result.output and "fastest variant within" in result.output
    bench = json.loads((tmp_path / "bench" / "bench.json").read_text())
    chosen = bench["selection"]["by_threads"]["2"]["variant"]
    report = json.loads((tmp_path / "report.json").read_text())
    expected = {"fp32": "fp32", "fp16-weights": "fp32", "fp16": "fp16", "bf16": "bf16"}[chosen]
    assert report["backends"]["ncnn-cpu"]["precision"] == expected
    assert report["artifacts"]["fp16_weights"] == (chosen == "fp16-weights")
