"""End to end with the real tools: the YOLOv8-style detector, detection parity, dynamic sizes, blame."""

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from deploytool.cli import app
from deploytool.options import RunOptions
from deploytool.pipeline import run
from deploytool.spec_toml import load_spec

IMAGES = Path(__file__).resolve().parent.parent / "images"
pytestmark = pytest.mark.slow
cli = CliRunner()


@pytest.fixture(scope="module")
def yolo_cpu(tmp_path_factory):
    """yolov8n on two photos at 640, 320 and 384x640, one set of converted files, CPU backends."""
    out = tmp_path_factory.mktemp("yolov8n")
    photos = [IMAGES / "chelsea.jpg", IMAGES / "rocket.jpg"]
    report = run(
        load_spec("yolov8n"),
        RunOptions(
            out=out, images=tuple(photos), backends="torch,onnxruntime,ncnn-cpu", save_vis=out / "vis"
        ),
    ).to_dict()
    return out, report


def test_cpu_backends_pass_tensor_and_detection_parity_at_every_size(yolo_cpu):
    out, report = yolo_cpu
    assert report["passed"], [t["per_input"] for t in report["task"].values()]
    inputs = {c["input"].rsplit("/", 1)[-1] for c in report["comparisons"] if c["backend"] == "ncnn-cpu"}
    assert inputs == {
        "chelsea.jpg",
        "rocket.jpg",
        "chelsea.jpg@320x320",
        "rocket.jpg@320x320",
        "chelsea.jpg@384x640",
        "rocket.jpg@384x640",
    }
    for backend in ("onnxruntime", "ncnn-cpu"):
        task = report["task"][backend]
        assert task["detection_agreement"] == 1.0
        assert sum(p["matched"] for p in task["per_input"]) > 0, "no detections to compare"
        assert all(p["min_iou"] is None or p["min_iou"] >= 0.95 for p in task["per_input"])
    # one .param serves every size: pnnx got inputshape2, ncnn computes the anchor grid at run time
    assert "inputshape2=[1,3,320,320]f32" in (out / "logs" / "pnnx.log").read_text()


def test_save_vis_draws_every_backend(yolo_cpu):
    out, _ = yolo_cpu
    names = {p.name for p in (out / "vis").iterdir()}
    for backend in ("torch", "onnxruntime", "ncnn-cpu"):
        assert f"rocket_384x640.{backend}.jpg" in names
    assert (out / "vis" / "chelsea_640x640.ncnn-cpu.jpg").read_bytes()[:2] == b"\xff\xd8"


def test_shifted_boxes_fail_detection_parity(yolo_cpu):
    import torch

    from deploytool.inputs import inputs_for
    from deploytool.judge import detect_agreement
    from deploytool.model import build_model

    out, _ = yolo_cpu
    spec = load_spec("yolov8n")
    items = inputs_for(spec, [IMAGES / "rocket.jpg"])[:1]
    model = build_model(spec)
    with torch.no_grad():
        ref = model(torch.from_numpy(items[0].feed["images"])).numpy()
    shifted = ref.copy()
    shifted[0, 0] += 0.05 * shifted[0, 2]  # every box moved right by 5% of its width: IoU ~0.9
    ok, _ = detect_agreement(spec, items, [{"output": ref}], [{"output": ref}])
    bad, _ = detect_agreement(spec, items, [{"output": ref}], [{"output": shifted}])
    assert ok.passed and not bad.passed and bad.detection_agreement == 0.0
    assert any("IoU" in line for line in bad.per_input[0].parity.failures)


def test_layerwise_blames_a_corrupted_yolo_convolution(yolo_cpu, tmp_path):
    from deploytool.layerwise import scale_layer_weights
    from deploytool.ncnn_param import read_param

    out, report = yolo_cpu
    convs = [
        layer.name for layer in read_param(out / "model.ncnn.param").layers if layer.type == "Convolution"
    ]
    target = convs[len(convs) // 2]  # one in the neck
    folder = tmp_path / "faulty"
    folder.mkdir()
    shutil.copy(out / "model.ncnn.param", folder / "model.ncnn.param")
    scale_layer_weights(
        out / "model.ncnn.param", out / "model.ncnn.bin", target, 1.5, folder / "model.ncnn.bin"
    )
    (folder / "report.json").write_text(json.dumps({"spec": report["spec"]}))
    result = cli.invoke(
        app,
        [
            "parity",
            str(folder),
            "--layerwise",
            "--backends",
            "ncnn-cpu",
            "--images",
            str(IMAGES / "chelsea.jpg"),
            "--report",
            str(tmp_path / "r.json"),
        ],
    )
    assert result.exit_code == 1, result.output
    first = json.loads((tmp_path / "r.json").read_text())["layerwise"]["first_failure"]
    assert first["torch vs ncnn-cpu"]["layer"] == target
    assert first["torch vs interpreter"]["layer"] == target
    assert first["ncnn-cpu vs interpreter"] is None


@pytest.mark.vulkan
def test_vulkan_passes_detection_parity(yolo_cpu):
    out, _ = yolo_cpu
    photos = ["--images", str(IMAGES / "chelsea.jpg"), "--images", str(IMAGES / "rocket.jpg")]
    result = cli.invoke(app, ["parity", str(out), "--model", "yolov8n", "--backends", "ncnn-vulkan", *photos])
    assert result.exit_code == 0, result.output
    assert "ncnn-vulkan: detection_agreement 1.00" in result.output


@pytest.mark.cpp
def test_cpp_runner_detections_match_torch(yolo_cpu, tmp_path):
    """The C++ runner letterboxes the photo itself (ncnn's resize), decodes and NMSes in C++."""
    out, _ = yolo_cpu
    photos = ["--images", str(IMAGES / "chelsea.jpg"), "--images", str(IMAGES / "rocket.jpg")]
    args = ["parity", str(out), "--model", "yolov8n", "--backends", "ncnn-cpp", *photos]
    result = cli.invoke(app, [*args, "--report", str(tmp_path / "r.json")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["task"]["ncnn-cpp"]["detection_agreement"] == 1.0
    assert (
        0 < report["backends"]["ncnn-cpp"]["preprocess_max_abs"] <= 1 / 255 + 1e-6
    )  # one grey level at most
