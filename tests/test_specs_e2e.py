"""Every spec in models/ gets an end-to-end check (after optimum's registry tests): a new spec is covered
the moment it is added, and a spec that cannot export, convert or pass parity fails here."""

from pathlib import Path

import pytest
from typer.testing import CliRunner

from deploytool.cli import app
from deploytool.spec import available_models
from deploytool.spec_toml import load_spec

IMAGES = Path(__file__).resolve().parent.parent / "images"


@pytest.mark.slow
@pytest.mark.parametrize("name", available_models())
def test_spec_runs_end_to_end_on_cpu(name, tmp_path):
    spec = load_spec(name)
    onnx_only = spec.onnx is not None  # a third-party ONNX file: onnxruntime is the reference
    photos = [] if spec.inputs is not None else ["--images", str(IMAGES / "chelsea.jpg")]  # [inputs]: its own
    args = [
        "run",
        name,
        "--backends",
        "ncnn-cpu" if onnx_only else "torch,onnxruntime,ncnn-cpu",
        *photos,
        "--out",
        str(tmp_path),
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "model.ncnn.param").is_file() and (tmp_path / "report.json").is_file()


@pytest.mark.slow
def test_export_then_convert_commands(tmp_path):
    cli = CliRunner()
    result = cli.invoke(
        app, ["export", "resnet18", "--formats", "onnx", "--opset", "13", "--out", str(tmp_path)]
    )
    assert result.exit_code == 0, result.output
    assert (tmp_path / "model.onnx").is_file() and not (tmp_path / "model.pt").exists()
    result = cli.invoke(app, ["convert", str(tmp_path / "model.onnx"), "--input-shape", "1,3,224,224"])
    assert result.exit_code == 0, result.output
    flat = " ".join(result.output.split())  # the console wraps long lines (a long tmp path) anywhere
    assert "outputs ['out0']" in flat and (tmp_path / "logs" / "pnnx-onnx.log").is_file()
