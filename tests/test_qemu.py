"""The cross-built aarch64 runner under qemu-aarch64 against ncnn's x86 CPU results on the same
preprocessed tensors: ncnn's Arm kernels (NEON fp32 on Cortex-A72; fp16 arithmetic and dot-product
int8 on `-cpu max`) checked with the same comparison as every backend, each with its measured tolerance.

Without qemu-user, g++-aarch64-linux-gnu or the aarch64 libncnn (`make ncnn`) these tests skip, except
where CI is set or DEPLOYTOOL_REQUIRE_AARCH64=1: there they fail."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from deploytool.judge import compare_tensors
from deploytool.spec import Tolerance

REPO = Path(__file__).resolve().parent.parent
PHOTOS = ("chelsea.jpg", "coffee.jpg")
FP16 = {"use_fp16_storage": True, "use_fp16_packed": True, "use_fp16_arithmetic": True}

# Measured on ResNet18 (seeded weights; logits' range 12-19) on chelsea.jpg and coffee.jpg against x86
# ncnn on the same tensors: fp32 max_abs 7.4e-6 (peak_rel 7.7e-7), the same on cortex-a72 and max;
# fp16 storage+arithmetic on max max_abs 0.051 (peak_rel 5.2e-3); int8 bit-identical (0) on both.
# Each tolerance is several times its measurement.
TOL_FP32 = Tolerance(atol=5e-5, rtol=0.0)
TOL_FP16 = Tolerance(atol=0.0, rtol=0.0, peak_rtol=0.015)
TOL_INT8 = Tolerance(atol=1e-4, rtol=0.0)
# stb_image (the aarch64 runner) vs OpenCV's libjpeg (the host) on images/*.jpg, in 0..255 pixel levels
# of the preprocessed tensor: max 2-3, mean 0.04-0.07; ResNet18's logits move by at most 0.0067.
DECODER_MAX_LEVELS, DECODER_MEAN_LEVELS, DECODER_LOGITS_MAX_ABS = 4.0, 0.2, 0.02
CPUS = ("cortex-a72", "max")


def _require() -> None:
    """Skip with the reason (fail where CI or DEPLOYTOOL_REQUIRE_AARCH64=1 asks for the aarch64 path)."""
    from deploytool.targets.qemu import QemuTarget

    ok, reason = QemuTarget().available()
    if ok:
        return
    if (
        os.environ.get("CI", "") not in ("", "0", "false")
        or os.environ.get("DEPLOYTOOL_REQUIRE_AARCH64") == "1"
    ):
        pytest.fail(f"the aarch64 runner is required here (CI / DEPLOYTOOL_REQUIRE_AARCH64=1): {reason}")
    pytest.skip(reason)


@dataclass
class Model:
    param: Path
    bin: Path
    meta: dict


@dataclass
class Arm:
    exe: Path
    fp32: Model
    int8: Model
    feeds: dict[str, Path]  # stem -> host-preprocessed (OpenCV) input tensor (.npy)
    ref_fp32: dict[str, np.ndarray]  # stem -> x86 ncnn logits
    ref_int8: dict[str, np.ndarray]
    tmp: Path
    runs: dict  # (cpu, model, options) -> run_on's result, so tests share qemu runs


def run_on(
    target, model: Model, inputs: list[Path], tmp: Path, options: dict | None = None
) -> tuple[dict, dict[str, np.ndarray]]:
    """One runner process on `target` (a QemuTarget, or LocalTarget) over `inputs` (images or .npy
    tensors, distinct stems); returns its JSON and every dumped array by file name without .npy
    ('chelsea.out0', 'chelsea.input')."""
    meta = dict(model.meta, param="model.param", bin="model.bin")
    if options:
        meta["ncnn_options"] = options
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "meta.json").write_text(json.dumps(meta))
    with target.open() as session:
        session.put(model.param, "model.param")
        session.put(model.bin, "model.bin")
        session.put(tmp / "meta.json", "meta.json")
        names = [session.put(p, p.name) for p in inputs]
        stdout = session.run(["meta.json", *names, "--dump-raw", "raw", "--threads", "2"], tmp / "run.log")
        dump = session.fetch("raw", tmp / "raw")
        arrays = {f.name[: -len(".npy")]: np.load(f) for f in dump.glob("*.npy")}
    return json.loads(stdout), arrays


def _x86(model: Model, feeds: dict[str, Path], precision: str) -> dict[str, np.ndarray]:
    from deploytool.backends.ncnn_runner import NcnnRunner

    out = model.meta["outputs"][0]
    with NcnnRunner(model.param, model.bin, precision=precision) as runner:
        return {
            stem: runner.infer({model.meta["input"]["name"]: np.load(p)})[out] for stem, p in feeds.items()
        }


@pytest.fixture(scope="module")
def arm(tmp_path_factory) -> Arm:
    """The cross-built runner, ResNet18 fp32 and int8, the photos preprocessed on the host, and x86
    ncnn's logits for them."""
    _require()
    import torch

    from deploytool.convert import convert
    from deploytool.export import export_torchscript
    from deploytool.inputs import calibration_feeds, preprocess, read_image
    from deploytool.model import build_model
    from deploytool.ncnn_param import read_model
    from deploytool.quantize.calibrate import calibrate
    from deploytool.quantize.write import quantize_model
    from deploytool.runfolder import meta_for
    from deploytool.spec_toml import load_spec
    from deploytool.targets.build import build_runner

    tmp = tmp_path_factory.mktemp("qemu")
    exe = build_runner(arch="aarch64")
    spec = load_spec("resnet18")
    export_torchscript(build_model(spec).eval(), torch.rand(*spec.input_shape), tmp / "model.pt")
    conv = convert(tmp / "model.pt", tmp, input_shape=spec.input_shape)
    fp32 = Model(conv.param, conv.bin, meta_for(spec, conv.param))
    photos = [REPO / "images" / p for p in PHOTOS]
    model = read_model(conv.param, conv.bin)
    table = calibrate(model, calibration_feeds(spec, photos), method="kl")
    quantize_model(model, table, tmp / "model.int8.param", tmp / "model.int8.bin")
    int8 = Model(tmp / "model.int8.param", tmp / "model.int8.bin", fp32.meta)
    feeds = {}
    for photo in photos:
        x, _ = preprocess(read_image(photo), spec.preprocess, spec.input_shape[3], spec.input_shape[2])
        feeds[photo.stem] = tmp / f"{photo.stem}.host.npy"
        np.save(feeds[photo.stem], x)
    return Arm(exe, fp32, int8, feeds, _x86(fp32, feeds, "fp32"), _x86(int8, feeds, "int8"), tmp, {})


def _photos() -> list[Path]:
    return [REPO / "images" / p for p in PHOTOS]


def _qemu(arm: Arm, cpu: str, precision: str) -> tuple[dict, dict[str, np.ndarray]]:
    """The runner under `-cpu CPU` on the host tensors (and for fp32 on the photos too), run once."""
    from deploytool.targets.qemu import QemuTarget

    key = (cpu, precision)
    if key not in arm.runs:
        model = arm.int8 if precision == "int8" else arm.fp32
        inputs = list(arm.feeds.values()) + (_photos() if precision == "fp32" else [])
        options = FP16 if precision == "fp16" else None
        arm.runs[key] = run_on(QemuTarget(cpu), model, inputs, arm.tmp / f"{cpu}-{precision}", options)
    return arm.runs[key]


def _compare(ref: dict[str, np.ndarray], arrays: dict[str, np.ndarray], tol: Tolerance, backend: str) -> dict:
    """compare_tensors per photo on the runner's dumps of the host tensors ('<stem>.host.out0')."""
    return {
        stem: compare_tensors(
            r,
            arrays[f"{stem}.host.out0"],
            tol,
            backend=backend,
            reference="ncnn-cpu",
            input=stem,
            output="out0",
        )
        for stem, r in ref.items()
    }


def _failed(comparisons: dict) -> list[str]:
    return [
        f"{c.input}: max_abs {c.max_abs:.3g} peak_rel {c.peak_rel:.3g}"
        for c in comparisons.values()
        if not c.passed
    ]


@pytest.mark.slow
def test_the_cross_built_runner_is_one_static_aarch64_executable(arm):
    head = arm.exe.read_bytes()[:64]
    assert head[:4] == b"\x7fELF" and int.from_bytes(head[18:20], "little") == 183  # EM_AARCH64
    phoff, phentsize, phnum = (int.from_bytes(head[a:b], "little") for a, b in ((32, 40), (54, 56), (56, 58)))
    data = arm.exe.read_bytes()[: phoff + phentsize * phnum]
    kinds = [
        int.from_bytes(data[phoff + i * phentsize : phoff + i * phentsize + 4], "little")
        for i in range(phnum)
    ]
    assert 3 not in kinds and 2 not in kinds  # no PT_INTERP, no PT_DYNAMIC: nothing to load on the board


@pytest.mark.slow
@pytest.mark.parametrize("cpu", CPUS)
def test_fp32_on_arm_matches_x86(arm, cpu):
    doc, arrays = _qemu(arm, cpu, "fp32")
    assert doc["image_decoder"] == "stb_image" and doc["ncnn_options"] == {}
    comparisons = _compare(arm.ref_fp32, arrays, TOL_FP32, f"ncnn-cpp@aarch64:{cpu}")
    assert not _failed(comparisons), _failed(comparisons)


@pytest.mark.slow
def test_fp16_arithmetic_on_max_within_its_tolerance(arm):
    doc, arrays = _qemu(arm, "max", "fp16")
    assert doc["ncnn_options"] == FP16
    comparisons = _compare(arm.ref_fp32, arrays, TOL_FP16, "ncnn-cpp@aarch64:max")
    assert not _failed(comparisons), _failed(comparisons)
    assert _failed(_compare(arm.ref_fp32, arrays, TOL_FP32, "fp16 vs fp32"))  # fp16 arithmetic really ran


@pytest.mark.slow
@pytest.mark.parametrize("cpu", CPUS)
def test_int8_on_arm_matches_x86_int8(arm, cpu):
    doc, arrays = _qemu(arm, cpu, "int8")
    comparisons = _compare(arm.ref_int8, arrays, TOL_INT8, f"ncnn-cpp@aarch64:{cpu}")
    assert not _failed(comparisons), _failed(comparisons)
    int8_vs_fp32 = _compare(arm.ref_fp32, arrays, TOL_FP32, "int8 vs fp32")
    assert _failed(int8_vs_fp32)  # it is the int8 model that ran


@pytest.mark.slow
def test_a_corrupted_weight_run_under_qemu_fails_the_comparison(arm, tmp_path):
    from deploytool.targets.qemu import QemuTarget

    last = arm.fp32.param.read_text().splitlines()[-1].split()
    assert last[0] == "InnerProduct" and "1=1" in last  # the .bin ends with the classifier's bias
    stem, ref = next(iter(arm.ref_fp32.items()))
    cls = int(ref.argmax())
    data = bytearray(arm.fp32.bin.read_bytes())
    at = len(data) - 4 * (ref.size - cls)  # the top-1 class's bias
    bias = np.frombuffer(data[at : at + 4], np.float32)[0]
    data[at : at + 4] = np.float32(bias + 0.01).tobytes()
    (tmp_path / "bad.bin").write_bytes(data)
    bad = Model(arm.fp32.param, tmp_path / "bad.bin", arm.fp32.meta)
    _, arrays = run_on(QemuTarget("cortex-a72"), bad, [arm.feeds[stem]], tmp_path / "run")
    comparison = _compare({stem: ref}, arrays, TOL_FP32, "ncnn-cpp@aarch64")[stem]
    assert not comparison.passed and comparison.max_abs == pytest.approx(0.01, rel=1e-3)


def _levels(x_runner: np.ndarray, x_host: np.ndarray, meta: dict) -> tuple[float, float]:
    """Max and mean |difference| of two preprocessed tensors in 0..255 pixel levels."""
    norm = np.asarray(meta["input"]["norm_vals"], np.float64).reshape(1, 3, 1, 1)
    d = np.abs(x_runner.reshape(x_host.shape).astype(np.float64) - x_host) / norm
    return float(d.max()), float(d.mean())


@pytest.mark.slow
def test_jpeg_decoder_effect_stb_image_vs_opencv(arm):
    """The aarch64 runner decodes the photos itself (stb_image); the host tensors come from OpenCV.
    Their difference is the decoder's (x86's runner, OpenCV too, matches the host to 4e-5 levels)."""
    _, arrays = _qemu(arm, "cortex-a72", "fp32")
    meta = arm.fp32.meta
    for stem, path in arm.feeds.items():
        x_host = np.load(path)
        most, mean = _levels(arrays[f"{stem}.input"], x_host, meta)
        assert 0 < most <= DECODER_MAX_LEVELS and mean <= DECODER_MEAN_LEVELS, (stem, most, mean)
        on_image, on_tensor = arrays[f"{stem}.out0"], arrays[f"{stem}.host.out0"]
        assert np.abs(on_image - on_tensor).max() <= DECODER_LOGITS_MAX_ABS
        assert on_image.argmax() == on_tensor.argmax()
        # the bounds catch a preprocessing fault, e.g. the channel order swapped
        swapped = _levels(arrays[f"{stem}.input"][:, ::-1], x_host, meta)
        assert swapped[0] > DECODER_MAX_LEVELS and swapped[1] > DECODER_MEAN_LEVELS


def _fake_libncnn(cache: Path, stamp: str) -> None:
    from deploytool.targets.build import ncnn_wheel_version

    prefix = cache / f"ncnn-{ncnn_wheel_version()}-aarch64"
    (prefix / "lib" / "cmake" / "ncnn").mkdir(parents=True)
    (prefix / "lib" / "cmake" / "ncnn" / "ncnnConfig.cmake").write_text("")
    (prefix / ".deploytool-stamp").write_text(stamp)


def test_aarch64_runner_unavailable_without_libncnn_or_its_simpleocv(tmp_path, monkeypatch):
    """Needs no cross tools when they are missing either way: the reason names what and `make ncnn`."""
    from deploytool.errors import BackendUnavailable
    from deploytool.targets.build import build_runner, runner_available

    monkeypatch.setenv("DEPLOYTOOL_CACHE", str(tmp_path))
    ok, reason = runner_available("aarch64")
    assert not ok and "make ncnn" in reason
    with pytest.raises(BackendUnavailable, match="make ncnn"):
        build_runner(arch="aarch64")
    if shutil.which("aarch64-linux-gnu-g++") is None:
        assert "aarch64-linux-gnu-g++" in reason
        return
    assert "libncnn" in reason and "for aarch64 with simpleocv is not built" in reason
    _fake_libncnn(tmp_path, "version=x\narch=aarch64\nseconds=1\n")  # built before simpleocv: rebuilt
    assert runner_available("aarch64")[0] is False
    (next(tmp_path.glob("ncnn-*-aarch64")) / ".deploytool-stamp").write_text("arch=aarch64\nsimpleocv=ON\n")
    assert runner_available("aarch64") == (True, None)


def test_qemu_target_names_its_cpu_and_refuses_an_unknown_one():
    from deploytool.errors import SpecError
    from deploytool.targets.qemu import QemuTarget

    if shutil.which("qemu-aarch64") is None:
        ok, reason = QemuTarget().available()
        assert not ok and "qemu-user" in reason
        return
    assert (QemuTarget().suffix, QemuTarget("max").suffix) == ("aarch64", "aarch64:max")
    assert "max" in QemuTarget("max").describe() and QemuTarget("max").emulated
    with pytest.raises(SpecError, match="did you mean 'cortex-a72'"):
        QemuTarget("cortex_a72").available()


def test_local_session_puts_runs_fetches_and_cleans_up(tmp_path):
    """LocalSession with /bin/sh as the 'runner': files land in the work folder (a second put of a name
    replaces it), the command runs there, failures name the stage and the log."""
    from deploytool.errors import BackendError
    from deploytool.targets.local import LocalSession

    src = tmp_path / "a.txt"
    src.write_text("one")
    with LocalSession(Path("/bin/sh"), stage="ncnn-cpp@test") as s:
        s.put(src, "in.txt")
        other = tmp_path / "b.txt"
        other.write_text("two")
        path = s.put(other, "in.txt")
        assert Path(path).read_text() == "two" and src.read_text() == "one"
        out = s.run(["-c", "mkdir out && cp in.txt out/copy.txt && echo ran"], tmp_path / "run.log")
        assert out == "ran\n" and (s.fetch("out", tmp_path / "out") / "copy.txt").read_text() == "two"
        with pytest.raises(BackendError, match=r"ncnn-cpp@test: .*exited with code 3.*run2.log"):
            s.run(["-c", "echo broken >&2; exit 3"], tmp_path / "run2.log")
        with pytest.raises(BackendError, match="wrote no missing/"):
            s.fetch("missing", tmp_path / "m")
        with pytest.raises(ValueError):
            s.put(src, "../escape.txt")
        work = s.work
    assert not work.exists()


@pytest.mark.slow
@pytest.mark.cpp
def test_the_x86_runner_decodes_with_opencv_like_the_host(arm, tmp_path):
    """The baseline that makes the aarch64 difference the decoder's: x86's runner (OpenCV, the same
    ncnn resize) gives the host's tensor to rounding."""
    from deploytool.targets.local import LocalTarget

    stem, feed = next(iter(arm.feeds.items()))
    doc, arrays = run_on(LocalTarget(), arm.fp32, [REPO / "images" / f"{stem}.jpg"], tmp_path)
    assert doc["image_decoder"] == "opencv"
    most, _ = _levels(arrays[f"{stem}.input"], np.load(feed), arm.fp32.meta)
    assert most < 1e-3
