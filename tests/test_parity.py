"""`deploytool parity` on existing artifacts: golden files, bare .param/.onnx files, other references."""

import json
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


@pytest.mark.parametrize("conv", ["convrelu_0", "conv_8"])
def test_layerwise_blames_the_corrupted_convolution(resnet_run, tmp_path, conv):
    from deploytool.layerwise import scale_layer_weights

    out, report = resnet_run
    folder = tmp_path / "faulty"
    folder.mkdir()
    for name in ("model.ncnn.param", "model.pt"):
        shutil.copy(out / name, folder / name)
    (folder / "report.json").write_text(json.dumps({"spec": report["spec"]}))
    scale_layer_weights(
        out / "model.ncnn.param", out / "model.ncnn.bin", conv, 1.5, folder / "model.ncnn.bin"
    )
    result = _invoke(
        "parity",
        folder,
        "--layerwise",
        "--backends",
        "ncnn-cpu",
        "--images",
        IMAGES / "chelsea.jpg",
        "--report",
        tmp_path / "r.json",
    )
    assert result.exit_code == 1, result.output
    assert f"torch vs ncnn-cpu: first diverges at layer {conv} (Convolution)" in result.output
    data = json.loads((tmp_path / "r.json").read_text())
    first = data["layerwise"]["first_failure"]
    assert first["torch vs ncnn-cpu"]["layer"] == conv and first["torch vs interpreter"]["layer"] == conv
    assert first["ncnn-cpu vs interpreter"] is None  # same weights on both sides: ncnn's kernels are fine
    assert (folder / "parity-layers.png").is_file() and f"`{conv}`" in (folder / "parity.md").read_text()
    assert json.loads((folder / "report.json").read_text()) == {"spec": report["spec"]}  # the run's: kept


def test_layerwise_on_clean_files_blames_nothing(resnet_run, tmp_path):
    out, _ = resnet_run
    result = _invoke(
        "parity",
        out,
        "--model",
        "resnet18",
        "--layerwise",
        "--backends",
        "ncnn-cpu",
        "--images",
        IMAGES / "chelsea.jpg",
        "--report",
        tmp_path / "r.json",
    )
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "r.json").read_text())
    assert all(v is None for v in data["layerwise"]["first_failure"].values())
    assert len({r["comparison"] for r in data["layers"]}) == 3
