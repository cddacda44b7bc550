"""End to end with the real tools: ResNet18 through export, pnnx and every backend."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from deploytool.cli import app
from deploytool.options import Recipe, RunOptions
from deploytool.pipeline import run
from deploytool.spec_toml import load_spec

IMAGES = Path(__file__).resolve().parent.parent / "images"

pytestmark = pytest.mark.slow
cli = CliRunner()


def _worst(report, backend, key="max_abs"):
    return max(c[key] for c in report["comparisons"] if c["backend"] == backend)


def test_cpu_backends_match_torch(resnet_run):
    _, report = resnet_run
    assert report["schema"] == 1
    for backend in ("onnxruntime", "ncnn-cpu"):
        assert report["backends"][backend]["available"]
        rows = [c for c in report["comparisons"] if c["backend"] == backend]
        assert len(rows) == 4 and all(c["passed"] for c in rows)
        assert report["task"][backend]["top1_agreement"] == 1.0
    assert _worst(report, "ncnn-cpu") <= 1e-4
    assert _worst(report, "onnxruntime") <= 1e-4
    assert set(report["stages"]) >= {"load", "export", "convert", "infer:ncnn-cpu", "compare"}


@pytest.mark.vulkan
def test_vulkan_backend_matches_torch_within_fp16_tolerance(resnet_run):
    _, report = resnet_run
    info = report["backends"]["ncnn-vulkan"]
    assert info["available"] and info["device"]
    assert report["passed"]
    assert report["task"]["ncnn-vulkan"]["top1_agreement"] == 1.0
    # fp16 storage on the device: visibly less exact than the CPU path, yet within its tolerance
    assert _worst(report, "ncnn-cpu") < _worst(report, "ncnn-vulkan") <= 2e-2


def test_artifacts_written_and_nothing_half_written(resnet_run):
    out, report = resnet_run
    for key in ("torchscript", "onnx", "ncnn_param", "ncnn_bin"):
        assert report["artifacts"][key] and (out / report["artifacts"][key].split("/")[-1]).is_file()
    assert (out / "logs" / "pnnx.log").read_text().startswith("$ ")
    assert (out / "pnnx" / "model.pnnx.param").is_file()
    assert not list(out.glob(".*tmp*"))


def test_pnnx_from_onnx_matches_torch(tmp_path):
    report = run(
        load_spec("resnet18"),
        RunOptions(
            out=tmp_path, images=(IMAGES,), backends="torch,ncnn-cpu", recipe=Recipe(converter="pnnx-onnx")
        ),
    ).to_dict()
    assert report["passed"], report["comparisons"]
    assert _worst(report, "ncnn-cpu") <= 1e-4
    assert report["task"]["ncnn-cpu"]["top1_agreement"] == 1.0


def test_ncnn_fp16_precision_is_looser_but_passes_its_tolerance(resnet_run):
    out, fp32 = resnet_run
    fp16 = run(
        load_spec("resnet18"),
        RunOptions(out=out, images=(IMAGES,), backends="torch,ncnn-cpu", ncnn_precision="fp16"),
    ).to_dict()
    assert fp16["backends"]["ncnn-cpu"]["precision"] == "fp16"
    worst = _worst(fp16, "ncnn-cpu")
    assert worst > 10 * _worst(fp32, "ncnn-cpu")
    assert all(c["atol"] == 5e-2 for c in fp16["comparisons"])
    assert fp16["passed"]


def _copy_ncnn(src, dst):
    dst.mkdir()
    for name in ("model.ncnn.param", "model.ncnn.bin", "report.json"):
        if (src / name).exists():
            shutil.copy(src / name, dst / name)
    return dst


def test_corrupted_bin_fails_parity_with_exit_1(resnet_run, tmp_path):
    out, _ = resnet_run
    (out / "report.json").write_text(json.dumps(resnet_run[1]))
    folder = _copy_ncnn(out, tmp_path / "corrupt")
    data = np.fromfile(folder / "model.ncnn.bin", dtype=np.uint8)
    floats = data[4 : 4 + 4 * 4096].view(np.float32)  # first conv's weights, after the 4-byte flag
    floats *= 1.5
    data.tofile(folder / "model.ncnn.bin")
    result = cli.invoke(app, ["parity", str(folder), "--backends", "ncnn-cpu", "--images", str(IMAGES)])
    assert result.exit_code == 1, result.output
    assert "FAIL" in result.output
    # the untouched copy passes, so the failure is the corruption, not the check
    clean = _copy_ncnn(out, tmp_path / "clean")
    result = cli.invoke(app, ["parity", str(clean), "--backends", "ncnn-cpu", "--images", str(IMAGES)])
    assert result.exit_code == 0, result.output


def test_truncated_bin_is_bad_input_exit_2(resnet_run, tmp_path):
    out, _ = resnet_run
    folder = _copy_ncnn(out, tmp_path / "trunc")
    data = (folder / "model.ncnn.bin").read_bytes()
    (folder / "model.ncnn.bin").write_bytes(data[: len(data) // 2])
    result = cli.invoke(
        app, ["parity", str(folder), "--model", "resnet18", "--backends", "ncnn-cpu", "--images", str(IMAGES)]
    )
    assert result.exit_code == 2
    assert "does not match" in result.stderr and "Traceback" not in result.output


def test_cli_run_writes_report_and_junit(tmp_path):
    report, junit = tmp_path / "r.json", tmp_path / "j.xml"
    result = cli.invoke(
        app,
        [
            "run",
            "resnet18",
            "--out",
            str(tmp_path / "o"),
            "--backends",
            "torch,ncnn-cpu",
            "--images",
            str(IMAGES / "chelsea.jpg"),
            "--report",
            str(report),
            "--junit",
            str(junit),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "PASSED" in result.output
    import json
    import xml.etree.ElementTree as ET

    data = json.loads(report.read_text())
    assert data["passed"] and data["backends"]["ncnn-cpu"]["available"]
    md = (tmp_path / "o" / "report.md").read_text()
    assert md.startswith("# resnet18: passed") and "| ncnn-cpu | logits | 1 |" in md and "errors.png" in md
    assert (tmp_path / "o" / "errors.png").read_bytes()[:4] == b"\x89PNG"
    suite = ET.parse(junit).getroot()
    assert suite.get("failures") == "0" and int(suite.get("tests")) == 2
