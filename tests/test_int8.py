"""int8 through the whole tool: `quantize` / `run --ncnn-precision int8` calibrate, write ncnn's int8
model and judge it against torch; a wrong scale is caught by parity."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from deploytool.cli import app
from deploytool.quantize.table import read_table, write_table

IMAGES = Path(__file__).resolve().parent.parent / "images"
pytestmark = pytest.mark.slow
cli = CliRunner()


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    out = tmp_path_factory.mktemp("int8")
    result = cli.invoke(app, ["quantize", "resnet18", "--out", str(out), "--report", str(out / "r.json")])
    assert result.exit_code == 0, result.output
    return out, json.loads((out / "r.json").read_text()), result.output


def test_quantize_writes_an_int8_model_that_ncnn_runs_within_the_int8_tolerance(quantized):
    out, report, output = quantized
    art = report["artifacts"]
    assert art["int8_method"] == "kl" and len(art["int8_layers"]) == 21  # every conv and the classifier
    assert Path(art["ncnn_param"]).name == "model.int8.param"
    assert (out / "model.int8.bin").stat().st_size < 0.3 * (out / "model.ncnn.bin").stat().st_size
    assert "8=2" in (out / "model.int8.param").read_text()
    rows = [c for c in report["comparisons"] if c["backend"] == "ncnn-cpu"]
    assert rows and all(c["passed"] and c["cosine"] > 0.998 for c in rows)
    assert report["backends"]["ncnn-cpu"]["precision"] == "int8"
    assert report["task"]["ncnn-cpu"]["top1_agreement"] == 1.0
    assert "quantized 21 layers" in output
    # the table is ncnn2table's format: what we wrote reads back
    table = read_table(out / "model.table")
    assert set(table.blob_scales) == set(art["int8_layers"])


def test_a_wrong_activation_scale_fails_parity(quantized, tmp_path):
    out, report, _ = quantized
    table = read_table(out / "model.table")
    layer = report["artifacts"]["int8_layers"][5]
    table.blob_scales[layer] = table.blob_scales[layer] * 20  # clips the layer's input hard
    write_table(tmp_path / "bad.table", table)
    result = cli.invoke(
        app, ["quantize", "resnet18", "--table", str(tmp_path / "bad.table"), "--out", str(tmp_path / "o")]
    )
    assert result.exit_code == 1, result.output
    assert "FAIL" in result.output


def test_run_int8_with_a_layer_kept_fp32(tmp_path):
    result = cli.invoke(
        app,
        ["run", "resnet18", "--ncnn-precision", "int8", "--keep-fp32", "linear_21", "--backends",
         "torch,ncnn-cpu", "--images", str(IMAGES / "chelsea.jpg"), "--out", str(tmp_path)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "report.json").read_text())
    assert (
        "linear_21" not in report["artifacts"]["int8_layers"]
        and len(report["artifacts"]["int8_layers"]) == 20
    )


@pytest.mark.vulkan
def test_trained_efficientnet_lite0_int8_keeps_the_top1_class_on_cpu_and_vulkan(tmp_path):
    """Depthwise convolutions with ReLU6 on trained weights: the int8-sensitive case."""
    result = cli.invoke(
        app,
        ["run", "efficientnet_lite0", "--ncnn-precision", "int8", "--backends", "torch,ncnn-cpu,ncnn-vulkan",
         "--out", str(tmp_path)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "report.json").read_text())
    assert len(report["artifacts"]["int8_layers"]) == 50
    for backend in ("ncnn-cpu", "ncnn-vulkan"):
        assert report["task"][backend]["top1_agreement"] == 1.0
        assert min(c["cosine"] for c in report["comparisons"] if c["backend"] == backend) > 0.97
