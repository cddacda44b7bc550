"""The CLI through typer's CliRunner: exit codes and one clear line for every bad input."""

from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from deploytool.cli import app
from deploytool.progress import PREFIX as PROGRESS_PREFIX

IMAGES = Path(__file__).resolve().parent.parent / "images"
cli = CliRunner()


def _invoke(*args):
    return cli.invoke(app, [str(a) for a in args])


def _one_clear_line(result, code, *needles):
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    # progress lines of the steps that finished before the failure may precede the one error line
    lines = [ln for ln in result.stderr.strip().splitlines() if not ln.startswith(PROGRESS_PREFIX)]
    err = "\n".join(lines)
    assert err.startswith("error:") and len(lines) == 1, err
    for needle in needles:
        assert needle in err, err


def test_unknown_model_exit_2_with_suggestion(tmp_path):
    _one_clear_line(_invoke("run", "resnet19", "--out", tmp_path), 2, "did you mean 'resnet18'")
    assert not any(tmp_path.iterdir())


def test_malformed_input_shape_exit_2(tmp_path):
    _one_clear_line(
        _invoke("run", "deploytool.zoo.resnet:resnet18", "--input-shape", "1,3,x", "--out", tmp_path),
        2,
        "--input-shape",
    )


def test_missing_image_exit_2(tmp_path):
    result = _invoke("run", "resnet18", "--images", tmp_path / "nope.jpg", "--out", tmp_path / "o")
    _one_clear_line(result, 2, "nope.jpg", "--images")
    assert not (tmp_path / "o").exists()


def test_unreadable_image_exit_2(tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not a jpeg")
    _one_clear_line(_invoke("run", "resnet18", "--images", bad, "--out", tmp_path / "o"), 2, "broken.jpg")


def test_missing_weights_exit_2(tmp_path):
    result = _invoke("run", "resnet18", "--weights", tmp_path / "w.pth", "--out", tmp_path / "o")
    _one_clear_line(result, 2, "w.pth", "does not exist")


class _Unsafe:
    def __reduce__(self):
        return (print, ("this would run at load time",))


def test_weights_needing_unsafe_unpickling_are_refused(tmp_path):
    path = tmp_path / "unsafe.pth"
    torch.save({"payload": _Unsafe()}, path)
    _one_clear_line(
        _invoke("run", "resnet18", "--weights", path, "--out", tmp_path / "o"), 2, "unsafe unpickling"
    )


def test_weights_of_another_model_are_refused(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"fc.weight": torch.zeros(3, 3)}, path)
    _one_clear_line(_invoke("run", "resnet18", "--weights", path, "--out", tmp_path / "o"), 2, "does not fit")


def test_a_file_that_is_not_torchscript_is_bad_input_before_pnnx_runs(tmp_path):
    """(A pnnx that fails on a real file is still exit 3: tests/test_validation.py.)"""
    bogus = tmp_path / "model.pt"
    bogus.write_bytes(b"this is not torchscript")
    result = _invoke("convert", bogus, "--input-shape", "1,3,8,8", "--out", tmp_path / "o")
    _one_clear_line(result, 2, "model.pt is not a TorchScript file")
    assert not (tmp_path / "o").exists()


def test_missing_onnx2ncnn_exit_4_points_to_pnnx_onnx(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    onnx = tmp_path / "m.onnx"
    onnx.write_bytes(b"x")
    result = _invoke("convert", onnx, "--converter", "onnx2ncnn", "--out", tmp_path / "o")
    _one_clear_line(result, 4, "onnx2ncnn", "--converter pnnx-onnx")


def test_unknown_backend_and_converter_exit_2(tmp_path):
    _one_clear_line(
        _invoke("run", "resnet18", "--backends", "ncnn-gpu", "--out", tmp_path), 2, "did you mean"
    )
    f = tmp_path / "m.pt"
    f.write_bytes(b"x")
    _one_clear_line(
        _invoke("convert", f, "--converter", "tflite", "--input-shape", "1,3,8,8"), 2, "converter"
    )


def test_parity_on_folder_without_artifacts_exit_2(tmp_path):
    _one_clear_line(_invoke("parity", tmp_path), 2, "holds no model.pt")
    (tmp_path / "model.ncnn.param").write_text("7767517\n1 1\nInput in0 0 1 in0\n")
    _one_clear_line(_invoke("parity", tmp_path), 2, "model.ncnn.bin is missing")
    (tmp_path / "model.ncnn.bin").write_bytes(b"")
    _one_clear_line(_invoke("parity", tmp_path), 2, "--inputs")
    result = _invoke("parity", tmp_path, "--backends", "onnxruntime", "--input-shape", "1,3,8,8")
    _one_clear_line(result, 2, "no onnx file")


def test_models_lists_specs():
    result = _invoke("models")
    assert result.exit_code == 0 and "resnet18" in result.output


def test_doctor_lists_versions_and_converters():
    result = _invoke("doctor")
    assert result.exit_code == 0
    for word in ("torch", "onnxruntime", "ncnn", "pnnx", "vulkan", "onnx2ncnn"):
        assert word in result.output


@pytest.mark.slow
def test_import_spec_with_input_shape_runs(tmp_path):
    result = _invoke(
        "run",
        "deploytool.zoo.resnet:resnet18",
        "--input-shape",
        "1,3,64,64",
        "--backends",
        "torch,ncnn-cpu",
        "--out",
        tmp_path,
    )
    assert result.exit_code == 0, result.output


def test_shape_the_model_cannot_take_exit_2(tmp_path):
    result = _invoke("run", "deploytool.zoo.resnet:resnet18", "--input-shape", "1,3", "--out", tmp_path)
    _one_clear_line(result, 2, "cannot run on input shape 1,3", "--input-shape")
