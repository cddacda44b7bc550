"""The C++ runner against ncnn's Python binding: same preprocessing, same raw outputs, same JSON."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from deploytool.backends.ncnn_cpp import NcnnCppRunner
from deploytool.targets.build import build_runner, runner_source_dir

pytestmark = pytest.mark.cpp

REPO = Path(__file__).resolve().parent.parent
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# Measured: C++ and Python agree to ~1e-6 on ResNet18 logits (both fp32, same libncnn source).
ATOL = 1e-5


def _photos() -> list[Path]:
    import skimage

    photos = sorted((REPO / "images").glob("*.jpg"))[:3]
    photos.append(Path(skimage.__file__).parent / "data" / "chelsea.png")
    return [p for p in photos if p.is_file()]


@pytest.fixture(scope="module")
def runner_exe() -> Path:
    # availability (skip, or fail when CI=true) is checked for every `cpp` test in conftest.py
    return build_runner()


@pytest.fixture(scope="module")
def resnet(tmp_path_factory, runner_exe) -> tuple[Path, Path]:
    """ResNet18 (seeded weights) traced and converted with pnnx, fp32 weights."""
    import torch

    from deploytool.zoo.resnet import resnet18

    d = tmp_path_factory.mktemp("resnet18")
    model = resnet18(num_classes=1000, seed=0).eval()
    torch.jit.trace(model, torch.rand(1, 3, 224, 224)).save(str(d / "model.pt"))
    pnnx = Path(sys.executable).parent / "pnnx"
    proc = subprocess.run(
        [str(pnnx), "model.pt", "inputshape=[1,3,224,224]", "fp16=0"],
        cwd=d,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return d / "model.ncnn.param", d / "model.ncnn.bin"


def _meta(**input_changes) -> dict:
    scale = 1 / 255
    inp = {
        "name": "in0",
        "width": 224,
        "height": 224,
        "color": "rgb",
        "resize": "resize",
        "pad_value": 114,
        "mean_vals": [m / scale for m in MEAN],
        "norm_vals": [scale / s for s in STD],
    }
    inp.update(input_changes)
    return {
        "schema": 1,
        "model": "resnet18",
        "task": "classify",
        "param": "model.ncnn.param",
        "bin": "model.ncnn.bin",
        "input": inp,
        "outputs": ["out0"],
        "labels": [f"class{i}" for i in range(1000)],
        "top_k": 5,
    }


def _run_ncnn_py():
    """cmake/run_ncnn.py, the bundle's Python runner, imported as a module."""
    spec = importlib.util.spec_from_file_location("run_ncnn", runner_source_dir() / "run_ncnn.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _python_reference(param: Path, bin: Path, meta: dict, image: Path):
    """Python ncnn: the same ncnn preprocessing, then the same fp32 network."""
    import cv2

    from deploytool.backends.ncnn_runner import NcnnRunner

    mat, _ = _run_ncnn_py().preprocess(cv2.imread(str(image)), meta["input"])
    x = np.array(mat)[None]
    with NcnnRunner(param, bin) as r:
        return x, r.infer({"in0": x})["out0"]


def test_runner_prints_usage_and_rejects_bad_meta(runner_exe, tmp_path):
    assert subprocess.run([runner_exe, "--help"], capture_output=True).returncode == 0
    bad = tmp_path / "meta.json"
    bad.write_text('{"schema": 1, "task": "segment"}')
    proc = subprocess.run([runner_exe, bad, "x.jpg"], capture_output=True, text=True)
    assert proc.returncode != 0
    assert proc.stderr.count("\n") == 1 and "task must be" in proc.stderr


def test_cpp_raw_outputs_match_python_ncnn(resnet):
    param, bin = resnet
    photos = _photos()
    with NcnnCppRunner(param, bin, _meta()) as runner:
        results = runner.run_images(photos)
    assert len(results) == len(photos)
    for photo, (raw, x_cpp, doc) in zip(photos, results, strict=True):
        x_py, ref = _python_reference(param, bin, _meta(), photo)
        assert x_cpp.shape == (1, 3, 224, 224) and raw["out0"].shape == (1, 1000)
        assert np.abs(x_cpp - x_py).max() <= 1e-6, f"{photo.name}: preprocessing differs"
        diff = float(np.abs(raw["out0"] - ref).max())
        assert diff <= ATOL, f"{photo.name}: C++ vs Python ncnn max_abs {diff:.3g}"
        top = [t["index"] for t in doc["top_k"]]
        assert top == list(np.argsort(-ref[0], kind="stable")[:5])
        assert doc["top_k"][0]["label"] == f"class{top[0]}"


def test_swapping_color_order_breaks_parity(resnet, tmp_path):
    param, bin = resnet
    photo = _photos()[-1]
    _, ref = _python_reference(param, bin, _meta(color="rgb"), photo)
    with NcnnCppRunner(param, bin, _meta(color="bgr")) as runner:
        [(raw, _, _)] = runner.run_images([photo])
    assert float(np.abs(raw["out0"] - ref).max()) > 100 * ATOL


def test_infer_feed_matches_python_ncnn(resnet):
    param, bin = resnet
    x, ref = _python_reference(param, bin, _meta(), _photos()[0])
    with NcnnCppRunner(param, bin, _meta()) as runner:
        out = runner.infer({"in0": x})
        assert runner.last_latency_s is not None and runner.last_latency_s > 0
    assert float(np.abs(out["out0"] - ref).max()) <= ATOL


def test_letterbox_preprocessing_matches_python(resnet, tmp_path):
    """Non-square photo, letterboxed: C++ input equals run_ncnn.py's, pad rows hold the pad value."""
    param, bin = resnet
    photo = _photos()[-1]  # chelsea.png is 451x300
    meta = _meta(resize="letterbox", pad_value=114)
    with NcnnCppRunner(param, bin, meta) as runner:
        [(raw, x_cpp, _)] = runner.run_images([photo])
    x_py, ref = _python_reference(param, bin, meta, photo)
    assert np.abs(x_cpp - x_py).max() <= 1e-6
    assert float(np.abs(raw["out0"] - ref).max()) <= ATOL
    pad = (114 - np.array(meta["input"]["mean_vals"])) * np.array(meta["input"]["norm_vals"])
    np.testing.assert_allclose(x_cpp[0, :, 0, 112], pad, rtol=1e-6)  # top border row


def _reshape_model(d: Path, h: int, w: int, c: int, rows: int, n: int) -> tuple[Path, Path]:
    """A weightless ncnn net that reshapes its (c,h,w) input into a [rows, n] 'detection' output."""
    param = d / "model.ncnn.param"
    param.write_text(
        f"7767517\n2 2\nInput in0 0 1 in0 0={w} 1={h} 2={c}\nReshape r 1 1 in0 out0 0={n} 1={rows}\n"
    )
    bin = d / "model.ncnn.bin"
    bin.write_bytes(b"")
    return param, bin


def _detect_meta(nc: int, **input_changes) -> dict:
    meta = _meta(**input_changes)
    meta.update(
        task="detect", labels=["cat", "dog"][:nc], detect={"confidence": 0.25, "iou": 0.45, "num_classes": nc}
    )
    return meta


def test_detect_decode_and_class_aware_nms(runner_exe, tmp_path):
    """Hand-made raw output fed as .npy: NMS per class, confidence cut, boxes as x1,y1,x2,y2."""
    nc, h, w = 2, 120, 100  # the feed is a 100x120 "image", so boxes are clipped to that
    n = h * w // (4 + nc)
    param, bin = _reshape_model(tmp_path, h=h, w=w, c=1, rows=4 + nc, n=n)
    raw = np.zeros((4 + nc, n), np.float32)
    #            cx   cy   w   h   cat  dog
    raw[:, 0] = [50, 50, 20, 20, 0.9, 0.1]  # kept
    raw[:, 1] = [52, 50, 20, 20, 0.8, 0.1]  # same class, IoU 0.82 with #0: suppressed
    raw[:, 2] = [52, 50, 20, 20, 0.1, 0.7]  # other class at the same place: kept
    raw[:, 3] = [10, 10, 4, 4, 0.2, 0.1]  # below confidence
    raw[:, 4] = [90, 90, 30, 10, 0.05, 0.3]  # kept, clipped at x=100
    feed = tmp_path / "feed.npy"
    np.save(feed, raw.reshape(1, 1, h, w))
    meta = _detect_meta(nc)
    meta["input"].update(width=w, height=h)
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    proc = subprocess.run([runner_exe, tmp_path / "meta.json", feed], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    dets = json.loads(proc.stdout)["results"][0]["detections"]
    assert [(d["class"], round(d["score"], 3)) for d in dets] == [("cat", 0.9), ("dog", 0.7), ("dog", 0.3)]
    np.testing.assert_allclose(dets[0]["box"], [40, 40, 60, 60], atol=1e-5)
    np.testing.assert_allclose(dets[2]["box"], [75, 85, 100, 95], atol=1e-5)

    py = subprocess.run(
        [sys.executable, runner_source_dir() / "run_ncnn.py", tmp_path / "meta.json", feed],
        capture_output=True,
        text=True,
    )
    assert py.returncode == 0, py.stderr
    assert _same_detections(json.loads(py.stdout)["results"][0]["detections"], dets)


def _same_detections(a: list[dict], b: list[dict], atol: float = 1e-3) -> bool:
    return len(a) == len(b) and all(
        x["class_id"] == y["class_id"]
        and abs(x["score"] - y["score"]) <= atol
        and np.allclose(x["box"], y["box"], atol=atol)
        for x, y in zip(a, b, strict=True)
    )


def test_detect_on_letterboxed_photo_matches_python_runner(runner_exe, tmp_path):
    """Boxes mapped back through the letterbox geometry agree between the C++ and Python runners."""
    size, nc = 64, 2
    n = 3 * size * size // (4 + nc)
    _reshape_model(tmp_path, h=size, w=size, c=3, rows=4 + nc, n=n)
    # pixel / 255 * 64 gives cx, cy, w, h in 0..64 input pixels; scores in 0..1
    meta = _detect_meta(nc, width=size, height=size, resize="letterbox", mean_vals=[0, 0, 0])
    meta["input"]["norm_vals"] = [1 / 255] * 3
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    photo = _photos()[-1]
    docs = []
    for cmd in ([runner_exe], [sys.executable, runner_source_dir() / "run_ncnn.py"]):
        proc = subprocess.run([*cmd, tmp_path / "meta.json", photo], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        docs.append(json.loads(proc.stdout)["results"][0])
    cpp, py = docs
    assert (cpp["width"], cpp["height"]) == (451, 300)
    assert cpp["detections"], "expected some boxes above confidence 0.25"
    assert _same_detections(cpp["detections"], py["detections"], atol=1e-3)
    for d in cpp["detections"]:
        x1, y1, x2, y2 = d["box"]
        assert 0 <= x1 <= x2 <= 451 and 0 <= y1 <= y2 <= 300


def test_meta_for_spec_uses_ncnn_units_and_blob_names(resnet):
    from deploytool.runfolder import meta_for
    from deploytool.spec_toml import load_spec

    meta = meta_for(load_spec("resnet18"), resnet[0])
    assert meta["input"]["name"] == "in0" and meta["outputs"] == ["out0"]
    np.testing.assert_allclose(meta["input"]["mean_vals"], [123.675, 116.28, 103.53], rtol=1e-6)
    np.testing.assert_allclose(meta["input"]["norm_vals"], [0.017125, 0.017507, 0.017429], rtol=1e-4)
    assert (meta["task"], meta["top_k"], meta["param"]) == ("classify", 5, "model.ncnn.param")


def test_bundle_runs_with_both_runners(resnet, runner_exe, tmp_path):
    from deploytool.bundle.write import write_bundle

    param, bin = resnet
    report = tmp_path / "report.json"
    report.write_text('{"schema": 1, "passed": true}')
    out = tmp_path / "bundle"
    write_bundle(out, param, bin, _meta(), report)
    (out / "model.ncnn.param").write_text("junk")  # an earlier bundle of ours is replaced whole
    write_bundle(out, param, bin, _meta(), report)
    assert (out / "model.ncnn.param").read_bytes() == param.read_bytes()
    names = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()}
    assert names >= {
        "model.ncnn.param",
        "model.ncnn.bin",
        "meta.json",
        "CMakeLists.txt",
        "src/main.cpp",
        "toolchains/aarch64-linux-gnu.cmake",
        "run_ncnn.py",
        "README.md",
        "report.json",
    }
    assert not list(tmp_path.glob(".bundle*"))
    photo = _photos()[-1]
    docs = []
    for cmd in ([runner_exe], [sys.executable, out / "run_ncnn.py"]):
        proc = subprocess.run([*cmd, out / "meta.json", photo], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        docs.append(json.loads(proc.stdout)["results"][0]["top_k"])
    cpp, py = docs
    assert [t["index"] for t in cpp] == [t["index"] for t in py]
    np.testing.assert_allclose([t["score"] for t in cpp], [t["score"] for t in py], atol=ATOL)


def test_bundle_is_atomic(resnet, tmp_path, monkeypatch):
    """A failure half-way leaves the previous bundle as it was and no temporary folder behind."""
    import deploytool.bundle.write as bundle

    out = tmp_path / "b"
    bundle.write_bundle(out, *resnet, _meta())
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}

    def fail(*args):
        raise OSError("disk full")

    monkeypatch.setattr(bundle, "readme", fail)
    with pytest.raises(OSError, match="disk full"):
        bundle.write_bundle(out, *resnet, _meta())
    assert [p.name for p in tmp_path.iterdir()] == ["b"]
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
