"""The board, end to end through the CLI: `bundle --target aarch64` (parity of the cross-built runner
under qemu), the README's cross-build commands, `deploy` to the test suite's own sshd (an unprivileged
board on 127.0.0.1 whose runner executes under qemu-aarch64), then `run … ncnn-cpp@ssh:…` and `parity`
against it, which must fail on a corrupted model. YOLOv8n and fp16 arithmetic (`-cpu max`) run under
qemu through `run` as well."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import sshd
from typer.testing import CliRunner

from deploytool.bundle.readme import NCNN_DIR_PLACEHOLDER, readme_build_commands
from deploytool.bundle.target import runner_path
from deploytool.cli import app
from deploytool.targets.build import ncnn_cmake_dir

IMAGES = Path(__file__).resolve().parent.parent / "images"
pytestmark = [pytest.mark.cpp, pytest.mark.slow]
cli = CliRunner()


def _invoke(*args):
    result = cli.invoke(app, [str(a) for a in args])
    print(result.output)
    return result


@pytest.fixture(autouse=True)
def board_env(request, monkeypatch, tmp_path):
    sshd.board_env(request, monkeypatch, tmp_path)


@pytest.fixture(scope="module")
def arm_bundle(tmp_path_factory):
    sshd.arm_runner()  # skip, or fail under CI, without the aarch64 toolchain and libncnn
    root = tmp_path_factory.mktemp("arm")
    result = _invoke(
        "bundle", "resnet18", "--target", "aarch64", "--out", root / "b", "--work", root / "work",
        "--images", IMAGES,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    return root


def _report(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def test_aarch64_bundle_is_checked_under_qemu_and_ships_its_runner(arm_bundle):
    b = arm_bundle / "b"
    exe = b / runner_path("aarch64")
    assert exe.read_bytes()[:4] == b"\x7fELF" and int.from_bytes(exe.read_bytes()[18:20], "little") == 183
    report = _report(b / "report.json")
    arm = report["backends"]["ncnn-cpp@aarch64"]
    assert report["passed"] and arm["available"] and "cortex-a72" in arm["device"]
    assert arm["emulated"] and "emulated" in arm["latency_method"]
    # the board's decoder (stb_image) is measured apart from the model, and judged on its own limit
    path = arm["image_path"]
    assert (path["decoder"], path["host_decoder"], path["judged"], path["passed"]) == (
        "stb_image", "opencv", "tensor", True
    )  # fmt: skip
    assert 0 < path["input_mean_levels"] < path["limit_mean_levels"] and path["photos"] == 4
    checks = [c for c in report["comparisons"] if c["backend"] == "ncnn-cpp@aarch64"]
    assert len(checks) == 4 and all(c["passed"] for c in checks)
    assert report["task"]["ncnn-cpp@aarch64"]["passed"]


def test_readme_cross_build_is_what_the_tests_ran(arm_bundle, tmp_path):
    """The README's cross-build commands (placeholders filled in) build a runner that answers as the
    bundle's shipped one does, under qemu."""
    b = arm_bundle / "b"
    readme = (b / "README.md").read_text()
    commands = readme_build_commands("aarch64")
    assert all(f"\n{c}\n" in readme for c in commands) and "toolchains/aarch64-linux-gnu.cmake" in commands[0]
    build = tmp_path / "build-aarch64"
    for cmd in commands:
        cmd = cmd.replace(NCNN_DIR_PLACEHOLDER["aarch64"], str(ncnn_cmake_dir("aarch64")))
        cmd = cmd.replace("-B build-aarch64", f"-B {build}")
        cmd = cmd.replace("--build build-aarch64", f"--build {build}")
        proc = subprocess.run(cmd, shell=True, cwd=b, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, cmd + "\n" + proc.stdout[-2000:] + proc.stderr[-2000:]
    tops = []
    for exe in (build / "deploytool_runner", b / runner_path("aarch64")):
        qemu = ["qemu-aarch64", "-cpu", "cortex-a72", "-L", "/usr/aarch64-linux-gnu", str(exe)]
        proc = subprocess.run([*qemu, "meta.json", str(IMAGES / "chelsea.jpg")], cwd=b, capture_output=True,
                              text=True, timeout=300)  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        doc = json.loads(proc.stdout)
        assert doc["image_decoder"] == "stb_image"
        tops.append([(t["index"], round(t["score"], 4)) for t in doc["results"][0]["top_k"]])
    assert tops[0] == tops[1] and len(tops[0]) == 5


def test_deploy_then_run_and_parity_over_ssh(arm_bundle, arm_board, tmp_path):
    """deploy + run … ncnn-cpp@ssh:… pass; the same backend on a corrupted .bin fails with exit 1; a
    board with nothing deployed is exit 4 naming the deploy command."""
    dest = arm_board.dest(arm_board.space / "r18")
    result = _invoke("deploy", arm_bundle / "b", "--to", dest)
    assert result.exit_code == 0, result.output
    assert "aarch64" in result.output and "ncnn-cpp@ssh:" in result.output
    backend = f"ncnn-cpp@ssh:{dest}"
    out = tmp_path / "run"
    result = _invoke("run", "resnet18", "--backends", f"torch,{backend}", "--images", IMAGES, "--out", out)
    assert result.exit_code == 0, result.output
    report = _report(out / "report.json")
    board = report["backends"][backend]
    assert report["passed"] and "(ssh)" in board["device"] and board["image_path"]["passed"]
    assert board["emulated"]  # this board runs its binaries under qemu (DEPLOYTOOL_BOARD_EXEC)
    assert max(c["max_abs"] for c in report["comparisons"] if c["backend"] == backend) < 1e-4

    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    bin_ = broken / "model.ncnn.bin"
    data = np.fromfile(bin_, dtype=np.uint8)
    data[len(data) // 2 : len(data) // 2 + 4096] ^= 0x5A  # scramble weights in the middle of the network
    data.tofile(bin_)
    result = _invoke("parity", broken, "--backends", backend, "--images", IMAGES / "chelsea.jpg")
    assert result.exit_code == 1, result.output
    assert "FAIL" in result.output

    nothing = f"ncnn-cpp@ssh:{arm_board.dest(arm_board.space / 'empty')}"
    result = _invoke("run", "resnet18", "--backends", f"torch,{nothing}", "--images", IMAGES / "chelsea.jpg",
                     "--out", tmp_path / "none")  # fmt: skip
    assert result.exit_code == 4 and "deploytool deploy" in result.output


def test_yolov8n_and_fp16_arithmetic_under_qemu(tmp_path):
    """YOLOv8n's head and NMS through the aarch64 runner; fp16 storage+arithmetic on `-cpu max`
    (ARMv8.2) within its own spec tolerance and measurably off fp32."""
    sshd.arm_runner()
    photo = IMAGES / "chelsea.jpg"
    result = _invoke("run", "yolov8n", "--backends", "torch,ncnn-cpp@aarch64", "--images", photo,
                     "--out", tmp_path / "y")  # fmt: skip
    assert result.exit_code == 0, result.output
    report = _report(tmp_path / "y" / "report.json")
    assert report["task"]["ncnn-cpp@aarch64"]["passed"]

    result = _invoke(
        "run", "resnet18", "--backends", "torch,ncnn-cpp@aarch64:max", "--ncnn-precision", "fp16",
        "--images", photo, "--images", IMAGES / "coffee.jpg", "--out", tmp_path / "f",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    report = _report(tmp_path / "f" / "report.json")
    checks = [c for c in report["comparisons"] if c["backend"] == "ncnn-cpp@aarch64:max"]
    assert all(c["passed"] for c in checks) and max(c["max_abs"] for c in checks) > 1e-3  # fp16 really ran
    assert checks[0]["atol"] == 0.1  # the spec's ncnn-cpp@aarch64-fp16 tolerance
    assert report["backends"]["ncnn-cpp@aarch64:max"]["ncnn_options"]["use_fp16_arithmetic"]
