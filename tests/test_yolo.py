"""The YOLOv8-style detector: shapes, decoding, seeded detections, and one real pnnx/ncnn round trip."""

from pathlib import Path

import numpy as np
import pytest
import torch

from deploytool.detect import postprocess
from deploytool.inputs import preprocess, read_image
from deploytool.judge import tolerance_at
from deploytool.model import build_model
from deploytool.spec_toml import load_spec

ROOT = Path(__file__).resolve().parent.parent
IMAGES = sorted((ROOT / "images").glob("*.jpg"))
SIZES = [(640, 640), (320, 320), (384, 640)]  # (H, W)


@pytest.fixture(scope="module")
def spec():
    return load_spec(str(ROOT / "models" / "yolov8n.toml"))


@pytest.fixture(scope="module")
def model(spec):
    return build_model(spec)


def run(model, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy()


@pytest.mark.parametrize("hw", SIZES)
def test_output_shape(model, hw):
    h, w = hw
    y = run(model, np.random.default_rng(0).random((1, 3, h, w), dtype=np.float32))
    cells = sum((h // s) * (w // s) for s in (8, 16, 32))
    assert y.shape == (1, 84, cells)
    assert np.isfinite(y).all() and (y[0, 4:] >= 0).all() and (y[0, 4:] <= 1).all()


def test_anchor_grid_follows_the_input(model):
    # Box centres are anchor + (right - left) / 2: averaged over cells of one level they sit on the grid.
    y = run(model, np.full((1, 3, 384, 640), 0.5, np.float32))[0]
    p5 = y[:, -(12 * 20) :]  # last level, 12x20 cells at stride 32, row-major
    cx = p5[0].reshape(12, 20)
    assert (np.diff(cx[6, 2:-2]) > 0).mean() > 0.9  # increases along a row
    assert 0 < cx.min() and cx.max() < 640


def test_checkpoint_round_trip(tmp_path):
    from deploytool.model import load_weights
    from deploytool.zoo.yolo import yolov8n

    a, b = yolov8n(seed=0), yolov8n(seed=1)
    torch.save(a.state_dict(), tmp_path / "w.pt")
    load_weights(b, str(tmp_path / "w.pt"))
    x = np.random.default_rng(1).random((1, 3, 320, 320), dtype=np.float32)
    np.testing.assert_array_equal(run(a.eval(), x), run(b.eval(), x))


def test_sparse_detections_on_photos(spec, model):
    counts = {}
    for path in IMAGES:
        x, geom = preprocess(read_image(path), spec.preprocess, 640, 640)
        d = postprocess(run(model, x), geom, conf=0.25, iou=0.45, margin=0.05)
        counts[path.name] = int((d.scores >= 0.25).sum())
        assert (d.boxes[:, 2:] >= d.boxes[:, :2]).all()
    # Every photo gives something to compare, none gives hundreds.
    assert all(1 <= n <= 100 for n in counts.values()), counts


@pytest.fixture(scope="module")
def converted(model, tmp_path_factory):
    """The model traced at 640x640 and converted by pnnx (fp32 weights) for dynamic sizes."""
    pytest.importorskip("ncnn")
    from deploytool.convert import convert, find_pnnx
    from deploytool.export import export_torchscript

    if find_pnnx() is None:
        pytest.skip("pnnx is not installed")
    folder = tmp_path_factory.mktemp("yolov8n")
    source = export_torchscript(model, torch.zeros(1, 3, 640, 640), folder / "m.pt")
    result = convert(source, folder, "pnnx", (1, 3, 640, 640), (1, 3, 320, 320))
    return result.param, result.bin


@pytest.mark.slow
def test_pnnx_ncnn_matches_torch_at_dynamic_sizes(spec, model, converted):
    from deploytool.backends.ncnn_runner import NcnnRunner

    img = read_image(ROOT / "images" / "chelsea.jpg")
    tol = tolerance_at(spec, "ncnn-cpu")
    with NcnnRunner(*converted) as runner:
        for h, w in [(320, 320), (384, 640)]:
            x, _ = preprocess(img, spec.preprocess, w, h)
            ref = run(model, x)
            got = runner.infer({runner.input_names[0]: x})[runner.output_names[0]]
            assert got.shape == ref.shape
            np.testing.assert_allclose(got, ref, atol=tol.atol, rtol=tol.rtol)
            np.testing.assert_allclose(got[0, 4:], ref[0, 4:], atol=1e-3)  # scores tighter than boxes


@pytest.mark.slow
@pytest.mark.vulkan
def test_vulkan_fp16_storage_detections_match_torch(spec, model, converted):
    # ncnn on Vulkan keeps fp16 storage even in fp32 mode (as deployed): the detections, not the raw
    # tensor, are what must agree, on every photo.
    from deploytool.backends.ncnn_runner import NcnnVulkanRunner
    from deploytool.detect import compare_raw

    settings = spec.detect
    failures, compared = [], 0
    with NcnnVulkanRunner(*converted) as runner:
        for path in IMAGES:
            x, geom = preprocess(read_image(path), spec.preprocess, 320, 320)
            got = runner.infer({runner.input_names[0]: x})[runner.output_names[0]]
            parity, _, _ = compare_raw(run(model, x), got, geom, settings)
            compared += parity.matched
            failures += [f"{path.name}: {f}" for f in parity.failures]
    assert compared > 0, "no detections to compare"
    assert not failures, "\n".join(failures)
