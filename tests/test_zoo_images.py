"""The image families of the zoo (MobileNet, VGG, ShuffleNet, YOLOv4-tiny style; seeded weights) end to
end with the real tools: every backend within the spec's measured tolerances at every declared input size,
and a corrupted ncnn .bin that fails parity. tests/test_specs_e2e.py runs each spec once on the CPU
backends; here each family runs once (two photos, every size, Vulkan when there is a device) and the
tests share that run."""

import json
import shutil

import numpy as np
import pytest
from conftest import IMAGES
from typer.testing import CliRunner

from deploytool.backends.ncnn_runner import vulkan_device_name
from deploytool.cli import app
from deploytool.judge import tolerance_at
from deploytool.options import RunOptions
from deploytool.pipeline import run
from deploytool.spec_toml import load_spec

pytestmark = pytest.mark.slow
PHOTOS = (IMAGES / "chelsea.jpg", IMAGES / "rocket.jpg")
CPU = ("onnxruntime", "ncnn-cpu")
# family -> (the extra sizes its spec declares, as the report suffixes inputs; floats of its first conv)
FAMILIES = {
    "mobilenet": (("224x224",), 3 * 16 * 9),
    "vgg": ((), 3 * 8 * 9),  # a flattened 5x5 grid before the fully connected head: one input size
    "shufflenet": (("224x224",), 3 * 24 * 9),
    "yolov4_tiny": (("320x320", "256x416"), 3 * 16 * 9),
}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory):
    """One `run` of the family on PHOTOS at every size, CPU backends and Vulkan when there is a device."""
    name = request.param
    out = tmp_path_factory.mktemp(name)
    backends = ",".join(("torch", *CPU) + (("ncnn-vulkan",) if vulkan_device_name() else ()))
    report = run(load_spec(name), RunOptions(out=out, images=PHOTOS, backends=backends)).to_dict()
    (out / "report.json").write_text(json.dumps(report))
    return name, out, report


def _checked(report, backend):
    comparisons = [c for c in report["comparisons"] if c["backend"] == backend]
    assert comparisons, f"{backend} did not run"
    return comparisons


def test_cpu_backends_pass_at_every_size(family):
    name, _, report = family
    sizes, _ = FAMILIES[name]
    for backend in CPU:
        comparisons = _checked(report, backend)
        assert all(c["passed"] for c in comparisons), [(c["input"], c["max_abs"]) for c in comparisons]
        inputs = {c["input"].rsplit("/", 1)[-1] for c in comparisons}
        assert inputs == {f"{p.name}{s}" for p in PHOTOS for s in ("", *(f"@{e}" for e in sizes))}
        task = report["task"][backend]
        assert task["passed"]
        if "detection_agreement" in task:  # the detector's parity compares real detections
            assert task["detection_agreement"] == 1.0
            assert sum(p["matched"] for p in task["per_input"]) > 0, "no detections to compare"


@pytest.mark.vulkan
def test_vulkan_passes_within_its_fp16_tolerance(family):
    name, _, report = family
    comparisons = _checked(report, "ncnn-vulkan")
    spec = load_spec(name)
    # fp16 storage on the device: a looser bound than the CPU's
    assert tolerance_at(spec, "ncnn-vulkan").atol > tolerance_at(spec, "ncnn-cpu").atol
    assert all(c["passed"] for c in comparisons) and report["task"]["ncnn-vulkan"]["passed"]
    assert report["passed"]


def test_corrupted_bin_fails_parity_with_exit_1(family, tmp_path):
    """The first convolution's weights (after pnnx's 4-byte fp32 tag) scaled by 1.5 in a copy of the
    converted files: `parity` on the copy exits 1 with failed checks, where the run itself passed."""
    name, out, report = family
    _, first_conv = FAMILIES[name]
    for f in ("model.ncnn.param", "model.ncnn.bin", "report.json"):
        shutil.copy(out / f, tmp_path / f)
    data = np.fromfile(tmp_path / "model.ncnn.bin", dtype=np.uint8)
    assert data[:4].view(np.uint32)[0] == 0  # fp32 weights, stored raw
    data[4 : 4 + 4 * first_conv].view(np.float32)[:] *= 1.5
    data.tofile(tmp_path / "model.ncnn.bin")
    args = ["parity", str(tmp_path), "--backends", "ncnn-cpu", "--images", str(PHOTOS[0])]
    result = CliRunner().invoke(app, [*args, "--report", str(tmp_path / "corrupt.json")])
    assert result.exit_code == 1, result.output
    corrupt = json.loads((tmp_path / "corrupt.json").read_text())
    assert not corrupt["passed"] and any(not c["passed"] for c in _checked(corrupt, "ncnn-cpu"))
    assert all(c["passed"] for c in _checked(report, "ncnn-cpu"))  # the same files unchanged passed
