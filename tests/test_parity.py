"""`deploytool parity` on existing artifacts: golden files, bare .param/.onnx files, other references."""

import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from deploytool.cli import app
from deploytool.parity import read_golden

IMAGES = Path(__file__).resolve().parent.parent / "images"
pytestmark = pytest.mark.slow
cli = CliRunner()


def _invoke(*args):
    return cli.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def ncnn_files(resnet_run, tmp_path_factory):
    """A copy of the run's ncnn files alone: no spec, no report."""
    out, _ = resnet_run
    folder = tmp_path_factory.mktemp("bare")
    for name in ("model.ncnn.param", "model.ncnn.bin", "model.onnx"):
        shutil.copy(out / name, folder / name)
    return folder


def test_golden_round_trip_and_detects_a_changed_bin(resnet_run, ncnn_files, tmp_path):
    out, _ = resnet_run
    golden = tmp_path / "golden.npz"
    result = _invoke(
        "parity",
        out,
        "--model",
        "resnet18",
        "--backends",
        "ncnn-cpu",
        "--images",
        IMAGES / "chelsea.jpg",
        "--save-golden",
        golden,
    )
    assert result.exit_code == 0, result.output
    items, outputs, meta = read_golden(golden)
    assert meta["reference"] == "torch" and len(items) == 1 and outputs[0]["logits"].shape == (1, 1000)

    # another process, no model, no images: the golden file carries inputs and reference outputs
    result = _invoke(
        "parity", ncnn_files / "model.ncnn.param", "--golden", golden, "--report", tmp_path / "r.json"
    )
    assert result.exit_code == 0, result.output
    import json

    report = json.loads((tmp_path / "r.json").read_text())
    assert report["reference"] == "golden"
    cpu = [c for c in report["comparisons"] if c["backend"] == "ncnn-cpu"]
    assert len(cpu) == 1 and cpu[0]["max_abs"] <= 1e-4

    broken = tmp_path / "broken"
    broken.mkdir()
    shutil.copy(ncnn_files / "model.ncnn.param", broken / "model.ncnn.param")
    data = np.fromfile(ncnn_files / "model.ncnn.bin", dtype=np.uint8)
    data[-4000:].view(np.float32)[:] *= -1  # flip the sign of part of the classifier
    data.tofile(broken / "model.ncnn.bin")
    result = _invoke("parity", broken / "model.ncnn.param", "--golden", golden)
    assert result.exit_code == 1, result.output


def test_onnx_reference_on_bare_files_with_npz_input(ncnn_files, tmp_path):
    x = np.random.default_rng(1).standard_normal((1, 3, 224, 224)).astype(np.float32)
    np.savez(tmp_path / "x.npz", input=x)
    result = _invoke(
        "parity",
        ncnn_files,
        "--inputs",
        tmp_path / "x.npz",
        "--backends",
        "ncnn-cpu",
        "--report",
        tmp_path / "r.json",
    )
    assert result.exit_code == 0, result.output
    import json

    report = json.loads((tmp_path / "r.json").read_text())
    assert report["reference"] == "onnxruntime" and report["passed"]


@pytest.mark.vulkan
def test_cpu_vs_vulkan_on_a_bare_param(ncnn_files):
    result = _invoke(
        "parity",
        ncnn_files / "model.ncnn.param",
        "--reference",
        "ncnn-cpu",
        "--backends",
        "ncnn-vulkan",
        "--input-shape",
        "1,3,224,224",
    )
    assert result.exit_code == 0, result.output
    assert "ncnn-vulkan" in result.output


def test_golden_file_errors_are_clear(tmp_path, ncnn_files):
    np.savez(tmp_path / "plain.npz", x=np.zeros(3))
    result = _invoke("parity", ncnn_files / "model.ncnn.param", "--golden", tmp_path / "plain.npz")
    assert result.exit_code == 2 and "--save-golden" in result.stderr
    result = _invoke("parity", ncnn_files / "model.ncnn.param", "--golden", tmp_path / "none.npz")
    assert result.exit_code == 2 and "does not exist" in result.stderr
