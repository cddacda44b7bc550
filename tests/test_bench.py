"""bench: statistics, budgets (judge's names), variant selection, MAC counting, a backend registered with
bench=True benched without changing bench, and one real ResNet18 bench."""

from __future__ import annotations

import importlib
import json
import os
import sys
from dataclasses import FrozenInstanceError

import pytest
from conftest import IMAGES

from deploytool.bench import (
    SPREAD_WIDE,
    VARIANT_NAMES,
    BenchOptions,
    BenchRow,
    Selection,
    latency_stats,
    select_all,
    select_variant,
    variant_run_options,
)
from deploytool.errors import ParityError, SpecError
from deploytool.judge import Budget, parse_budget

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


# ---------------------------------------------------------------- budgets (judge.py, as bench uses them)


def test_parse_budget_good():
    b = parse_budget("top1=1.0, rel=1e-2")
    assert b.limits == {"top1_agreement": 1.0, "peak_rel": 0.01}
    assert b.text == "top1_agreement=1,peak_rel=0.01"
    full = parse_budget("abs=0.5,top5=0.8,top1=0.9,rel=0,det=1")
    assert full.limits == {
        "top1_agreement": 0.9,
        "top5_agreement": 0.8,
        "detection_agreement": 1.0,
        "peak_rel": 0.0,
        "max_abs": 0.5,
    }
    assert parse_budget(full.text) == full  # the long names parse too


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
    assert b.failures({"top1_agreement": 1.0, "peak_rel": 1e-3, "max_abs": 0.01}) == []
    why = b.failures({"top1_agreement": 0.75, "peak_rel": 0.02, "max_abs": 0.01})
    assert why == ["top1_agreement 0.75 < 1", "peak_rel 0.02 > 0.01"]
    assert b.failures({"peak_rel": 0.0, "max_abs": 0.0}) == ["top1_agreement not measured for this task"]
    det = parse_budget("det=1.0")
    assert det.failures({"detection_agreement": 0.75}) == ["detection_agreement 0.75 < 1"]
    assert det.failures({"detection_agreement": 1.0}) == []


# ---------------------------------------------------------------- selection


def _row(variant, median, threads=2, top1=1.0, rel=1e-4, ratio=None):
    parity = {"top1_agreement": top1, "top5_agreement": 1.0, "peak_rel": rel, "max_abs": rel * 10}
    return BenchRow("ncnn-cpu", variant, threads, {"median": median}, parity, ratio_to_onnxruntime=ratio)


def _rows(*rows):
    ort = BenchRow("onnxruntime", None, 2, {"median": 18.0}, {})
    return [ort, *rows]


def test_select_variant_fastest_within_budget():
    rows = _rows(
        _row("fp32", 13.0, ratio=0.7),
        _row("bf16", 8.0, rel=0.05, ratio=0.43),  # fastest, outside peak_rel
        _row("fp16", 10.0, ratio=0.54),
        _row("fp16", 5.0, threads=1),  # another thread count: ignored at 2 threads
    )
    pick = select_variant(rows, parse_budget("top1=1.0,rel=1e-2"))
    assert pick == Selection(2, "fp16", pick.reason, fits=True)
    assert "0.54x onnxruntime" in pick.reason and "bf16 (peak_rel 0.05 > 0.01)" in pick.reason
    assert "within top1_agreement=1,peak_rel=0.01 at 2 threads" in pick.reason
    assert "top1_agreement 1.00" in pick.reason and "top5_agreement 1.00" in pick.reason
    assert select_variant(rows, parse_budget("top1=1.0,rel=1e-1")).variant == "bf16"
    assert select_variant(rows, parse_budget("rel=1e-2"), threads=1).variant == "fp16"


def test_select_variant_none_fits():
    rows = _rows(_row("fp32", 13.0, top1=0.75), _row("bf16", 8.0, rel=0.05))
    with pytest.raises(ParityError) as info:
        select_variant(rows, parse_budget("top1=1.0,rel=1e-2"), model="m")
    msg = str(info.value)
    assert info.value.exit_code == 1
    assert "no ncnn variant of m fits budget 'top1_agreement=1,peak_rel=0.01' at 2 threads" in msg
    assert "fp32: top1_agreement 0.75 < 1" in msg and "bf16: peak_rel 0.05 > 0.01" in msg


def test_select_variant_without_variants():
    with pytest.raises(SpecError, match="include ncnn-cpu"):
        select_variant(_rows(), Budget({"top1_agreement": 1.0}))


def test_selection_record_per_thread_count():
    rows = _rows(_row("fp32", 13.0), _row("fp32", 20.0, threads=1, top1=0.5))
    picks = select_all(rows, parse_budget("top1=1"), (1, 2), "m")
    assert picks[2].fits and picks[2].variant == "fp32"
    assert not picks[1].fits and picks[1].variant is None and "top1_agreement 0.5 < 1" in picks[1].reason
    assert select_all(_rows(), parse_budget("top1=1"), (2,), "m") == {}  # nothing to select from


def test_select_variant_never_picks_a_peer():
    ort8 = BenchRow("onnxruntime", "int8", 2, {"median": 1.0}, {"top1_agreement": 1.0, "peak_rel": 0.0})
    rows = _rows(ort8, _row("fp32", 13.0))
    assert select_variant(rows, parse_budget("top1=1")).variant == "fp32"  # not the faster ORT int8
    assert select_all(_rows(ort8), parse_budget("top1=1"), (2,), "m") == {}  # a peer alone: no pick
    with pytest.raises(SpecError, match="no ncnn variant"):
        select_variant(_rows(ort8), parse_budget("top1=1"))


# ---------------------------------------------------------------- ratios to ONNX Runtime fp32 and int8


def _timed(backend, variant, median, low, threads=2):
    return BenchRow(backend, variant, threads, {"median": median, "min": low}, {})


def test_ratios_to_ort_fp32_and_int8():
    from deploytool.bench.orchestrate import _set_ratios

    ort, ort8 = _timed("onnxruntime", None, 20.0, 16.0), _timed("onnxruntime", "int8", 8.0, 5.0)
    ncnn8, torch = _timed("ncnn-cpu", "int8", 6.0, 4.0), _timed("torch", None, 30.0, 24.0)
    _set_ratios([torch, ort, ort8, ncnn8])
    assert (ncnn8.ratio_to_onnxruntime, ncnn8.ratio_to_onnxruntime_min) == (0.3, 0.25)
    assert ncnn8.ratio_to_onnxruntime_int8 == 0.75
    assert (torch.ratio_to_onnxruntime_int8, ort.ratio_to_onnxruntime_int8) == (3.75, 2.5)
    assert (ort8.ratio_to_onnxruntime, ort8.ratio_to_onnxruntime_int8) == (0.4, 1.0)
    assert ort.ratio_to_onnxruntime == ort.ratio_to_onnxruntime_min == 1.0
    assert _timed("x", None, 1.0, 1.0).to_dict()["ratio_to_onnxruntime_int8"] is None


def test_ratios_without_a_baseline_stay_unset():
    from deploytool.bench.orchestrate import _set_ratios

    ort, ncnn = _timed("onnxruntime", None, 20.0, 16.0), _timed("ncnn-cpu", "fp32", 10.0, 9.0)
    _set_ratios([ort, ncnn])  # no onnxruntime/int8 row (e.g. --backends torch,ncnn-cpu)
    assert ncnn.ratio_to_onnxruntime == 0.5 and ncnn.ratio_to_onnxruntime_int8 is None
    alone = _timed("ncnn-cpu", "fp32", 10.0, 9.0)
    _set_ratios([alone, _timed("onnxruntime", "int8", 4.0, 4.0)])  # ORT fp32 missing, int8 there
    assert alone.ratio_to_onnxruntime is None and alone.ratio_to_onnxruntime_int8 == 2.5


def test_table_has_the_ort_int8_column():
    from deploytool.bench import HEADERS, table_rows
    from deploytool.bench.records import BenchReport

    row = _timed("ncnn-cpu", "int8", 6.0, 4.0)
    row.latency_ms.update(p90=7.0, spread_note=None)
    row.parity = {"max_abs": 0.1, "peak_rel": 0.05, "top1_agreement": 1.0}
    row.ratio_to_onnxruntime, row.ratio_to_onnxruntime_int8 = 0.3, 0.75
    report = BenchReport("m", "m.toml", BenchOptions(out="x"), parse_budget("top1=1"), "", {}, [row], {}, [])
    cells = dict(zip(HEADERS, table_rows(report)[0], strict=True))
    assert cells["x ORT"] == "0.30x" and cells["x ORT int8"] == "0.75x"


def test_row_to_dict_uses_the_report_names():
    row = BenchRow(
        "ncnn-cpu", "fp16", 2, {"median": 1.0}, {"peak_rel": float("inf"), "top1_agreement": 1.0},
        peak_rss_mib=120.04, baseline_rss_mib=100.0,
    )  # fmt: skip
    d = row.to_dict()
    assert d["name"] == "ncnn-cpu/fp16"
    assert d["parity"] == {"peak_rel": "inf", "top1_agreement": 1.0}  # JSON has no inf
    assert d["memory"] == {"peak_rss_mib": 120.0, "baseline_rss_mib": 100.0, "model_rss_mib": 20.0}


# ---------------------------------------------------------------- variants and options


def test_variant_run_options(tmp_path):
    from deploytool.options import Recipe, RunOptions

    opts = RunOptions(out=tmp_path, budget="top1=1", recipe=Recipe(converter="pnnx-onnx"))
    vulkan = variant_run_options("vulkan", opts)
    assert vulkan.backends == "torch,onnxruntime,ncnn-vulkan" and vulkan.budget is None
    half = variant_run_options("fp16-weights", opts)
    assert half.recipe == Recipe(converter="pnnx-onnx", fp16_weights=True) and half.ncnn_precision == "fp32"
    assert half.backends is None
    bf16 = variant_run_options("bf16", RunOptions(out=tmp_path, backends="torch,ncnn-cpu"))
    assert (bf16.ncnn_precision, bf16.backends, bf16.recipe.fp16_weights) == ("bf16", "torch,ncnn-cpu", False)
    with pytest.raises(SpecError, match="unknown variant"):
        variant_run_options("int4", opts)


def test_bench_options_frozen_with_tuples(tmp_path):
    opts = BenchOptions(out=str(tmp_path), threads=[1, 2], images=[IMAGES])
    assert opts.threads == (1, 2) and opts.images == (IMAGES,) and opts.out == tmp_path
    with pytest.raises(FrozenInstanceError):
        opts.runs = 3


def test_bench_refuses_a_backend_it_does_not_time(tmp_path):
    from deploytool.bench.orchestrate import validate

    with pytest.raises(SpecError, match="bench does not time ncnn-cpp"):
        validate(BenchOptions(out=tmp_path, backends="torch,ncnn-cpp"))
    with pytest.raises(SpecError, match="--threads"):
        validate(BenchOptions(out=tmp_path, threads=()))


def test_choose_variant_checks_its_input_before_benching(tmp_path):
    from deploytool.bench import choose_variant
    from deploytool.options import RunOptions
    from deploytool.spec_toml import load_spec

    spec = load_spec("resnet18")
    with pytest.raises(SpecError, match="budget"):
        choose_variant(spec, RunOptions(out=tmp_path, budget="top1=abc"))
    with pytest.raises(SpecError, match="include ncnn-cpu or ncnn-vulkan"):
        choose_variant(spec, RunOptions(out=tmp_path, budget="top1=1", backends="torch,onnxruntime"))
    assert not (tmp_path / "bench").exists()


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


# ---------------------------------------------------------------- a backend bench does not name

PLUGIN = "deploytool_test_bench_plugin"
PLUGIN_SOURCE = '''
"""A backend declared outside deploytool: ONNX Runtime under another name. Importing this module (the
backend's `library`) registers it, which is how a bench worker, a fresh process, finds it too."""

import onnxruntime  # noqa: F401

from deploytool import registry
from deploytool.backends.ort_runner import OnnxRuntimeRunner

NAME = "onnxruntime-copy"


class CopyRunner(OnnxRuntimeRunner):
    name = NAME


def _build(cls, b):
    return cls(b.art.onnx, b.config.threads)


registry.BACKENDS[NAME] = registry.Backend(
    NAME, "onnxruntime", f"{__name__}:CopyRunner", _build, needs=("onnx",),
    description="ONNX Runtime, renamed (test)", bench=True, library=__name__,
)


def tiny():
    import torch

    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(), torch.nn.Linear(8, 5),
    )
'''


@pytest.fixture
def plugin_backend(tmp_path, monkeypatch):
    """The plugin registered in this process (into a copy of BACKENDS, restored afterwards) and
    importable by the workers (PYTHONPATH)."""
    from deploytool import registry

    folder = tmp_path / "plugin"
    folder.mkdir()
    (folder / f"{PLUGIN}.py").write_text(PLUGIN_SOURCE)
    monkeypatch.setattr(registry, "BACKENDS", dict(registry.BACKENDS))
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join(p for p in (str(folder), os.environ.get("PYTHONPATH")) if p)
    )
    module = importlib.import_module(PLUGIN)
    yield module.NAME
    sys.modules.pop(PLUGIN, None)


def test_a_registered_bench_backend_is_benched_without_changing_bench(plugin_backend, tmp_path):
    from deploytool.bench import bench_model
    from deploytool.bench.orchestrate import validate
    from deploytool.registry import bench_backends
    from deploytool.spec_toml import load_spec

    name = plugin_backend
    assert name in bench_backends()
    default = validate(BenchOptions(out=tmp_path))[0]
    assert name in default  # in the default set once registered, like every bench=True backend

    spec = load_spec(f"{PLUGIN}:tiny", "1,3,16,16")
    opts = BenchOptions(
        out=tmp_path / "out", runs=2, warmup=1, threads=(1,), backends=f"torch,onnxruntime,{name}"
    )
    report = bench_model(spec, opts)

    expected = ["torch", "onnxruntime", "onnxruntime/int8", name]  # onnxruntime brings its int8 peer
    assert [r.name for r in report.rows] == expected
    ort, copy = report.row("onnxruntime", 1), report.row(name, 1)
    assert copy.latency_ms["n"] == 2 and copy.device == "cpu"
    assert copy.peak_rss_mib >= copy.baseline_rss_mib > 0
    assert copy.parity["passed"] and copy.parity["max_abs"] == ort.parity["max_abs"]
    assert copy.ratio_to_onnxruntime == pytest.approx(copy.median / ort.median, rel=1e-3)
    assert report.backends[name].available and report.budget_fits is None and report.selection == {}
    assert (tmp_path / "out" / "logs" / f"bench-{name}-t1.log").is_file()  # it ran in a worker process
    written = json.loads((tmp_path / "out" / "bench.json").read_text())
    assert [r["name"] for r in written["results"]] == expected
    assert written["selection"] == {"budget": "top1_agreement=1,peak_rel=0.01", "by_threads": {}}


# ---------------------------------------------------------------- end to end


@pytest.mark.slow
def test_bench_resnet18_end_to_end(tmp_path):
    from rich.console import Console

    from deploytool.backends.ncnn_runner import vulkan_device_name
    from deploytool.bench import bench_markdown, bench_model, render_bench
    from deploytool.spec_toml import load_spec

    images = sorted(IMAGES.glob("*.jpg"))[:2]
    opts = BenchOptions(out=tmp_path, runs=3, warmup=1, threads=(1,), images=tuple(images))
    report = bench_model(load_spec("resnet18"), opts)
    result = report.to_dict()

    assert json.loads((tmp_path / "bench.json").read_text()) == json.loads(json.dumps(result))
    assert result["model"] == "resnet18"
    vulkan = vulkan_device_name() is not None
    if not vulkan and os.environ.get("DEPLOYTOOL_REQUIRE_VULKAN") == "1":
        pytest.fail("DEPLOYTOOL_REQUIRE_VULKAN=1 but ncnn sees no Vulkan device")
    names = {r["name"] for r in result["results"]}
    expected = {"torch", "torchscript", "onnxruntime", "onnxruntime/int8"}
    expected |= {f"ncnn-cpu/{v}" for v in VARIANT_NAMES[:5]}
    assert expected <= names
    assert ("ncnn-vulkan/vulkan" in names) == vulkan
    if not vulkan:
        assert result["backends"]["ncnn-vulkan"]["available"] is False

    ort = next(r for r in result["results"] if r["name"] == "onnxruntime")
    ort8 = next(r for r in result["results"] if r["name"] == "onnxruntime/int8")
    assert ort8["parity"]["tolerance"]["precision"] == "int8" and set(result["peers"]) == {"onnxruntime/int8"}
    for r in result["results"]:
        lat = r["latency_ms"]
        assert lat["n"] == 3 and 0 < lat["min"] <= lat["median"] <= lat["p90"]
        assert r["ratio_to_onnxruntime"] == pytest.approx(
            lat["median"] / ort["latency_ms"]["median"], rel=1e-3
        )
        assert r["memory"]["peak_rss_mib"] >= r["memory"]["baseline_rss_mib"] > 0
        p = r["parity"]
        assert p["max_abs"] >= 0 and p["peak_rel"] >= 0 and p["max_rel"] >= 0
        assert 0 <= p["top1_agreement"] <= 1 and 0 <= p["top5_agreement"] <= 1
        assert p["tolerance"]["atol"] > 0 or p["tolerance"]["peak_rtol"] > 0
        if r["variant"]:
            assert r["name"] in result["peers"] or r["variant"] in result["variants"]
        assert r["ratio_to_onnxruntime_int8"] == pytest.approx(
            lat["median"] / ort8["latency_ms"]["median"], rel=1e-3
        )
        if r["variant"] not in (None, "fp32"):
            assert p["max_abs_vs_fp32"] >= 0
    fp32 = next(r for r in result["results"] if r["variant"] == "fp32")
    assert fp32["parity"]["passed"] and fp32["parity"]["top1_agreement"] == 1.0
    assert fp32["parity"]["peak_rel"] < 1e-4
    half = next(r for r in result["results"] if r["variant"] == "fp16-weights")
    assert half["parity"]["tolerance"]["precision"] == "fp16"  # fp16 weights are judged as fp16

    info = result["model_info"]
    assert info["parameters"] == 11_689_512
    assert info["macs"] == pytest.approx(1.814e9, rel=0.01)  # torchvision's ResNet18: 1.81 GMACs
    arts = result["artifacts"]
    assert arts["ncnn_bin_fp16_weights"]["bytes"] < 0.6 * arts["ncnn_bin"]["bytes"]
    assert arts["onnx_int8"]["bytes"] < 0.35 * arts["onnx"]["bytes"]  # int8 weights
    assert result["preprocess"]["preprocess_ms"]["median"] > 0
    assert set(result["selection"]["by_threads"]) == {"1"}
    assert report.budget_fits is result["selection"]["by_threads"]["1"]["fits"]
    stages = {
        "bench:torch@1",
        "bench:ncnn-cpu/fp32@1",
        "convert",
        "convert:fp16-weights",
        "quantize:onnxruntime/int8",
    }
    assert stages <= set(report.stages)

    console = Console(record=True, width=200)
    render_bench(report, console)
    text = console.export_text()
    assert "ncnn-cpu/fp32" in text and "budget top1_agreement=1,peak_rel=0.01 @1 threads" in text
    assert "peak_rel" in text and "top1/det agreement" in text
    assert "| ncnn-cpu/fp32 | 1 |" in bench_markdown(report)


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
    assert {r["backend"] for r in bench["results"]} == {"torch", "ncnn-cpu"}  # the run's backends only
    chosen = bench["selection"]["by_threads"]["2"]["variant"]
    report = json.loads((tmp_path / "report.json").read_text())
    expected = {"fp32": "fp32", "fp16-weights": "fp32", "fp16": "fp16", "bf16": "bf16"}[chosen]
    assert report["backends"]["ncnn-cpu"]["precision"] == expected
    assert report["artifacts"]["fp16_weights"] == (chosen == "fp16-weights")
