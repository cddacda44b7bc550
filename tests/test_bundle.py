"""`deploytool bundle` and the ncnn-cpp backend: the bundle builds and runs as its README says."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from deploytool.cli import app
from deploytool.targets.build import ncnn_cmake_dir

IMAGES = Path(__file__).resolve().parent.parent / "images"
pytestmark = [pytest.mark.cpp, pytest.mark.slow]
cli = CliRunner()


def _invoke(*args):
    return cli.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    root = tmp_path_factory.mktemp("bundle")
    result = _invoke("bundle", "resnet18", "--out", root / "b", "--work", root / "work", "--images", IMAGES)
    assert result.exit_code == 0, result.output
    return root


def test_bundle_contents_and_report(bundle):
    b = bundle / "b"
    for name in (
        "model.ncnn.param",
        "model.ncnn.bin",
        "meta.json",
        "CMakeLists.txt",
        "run_ncnn.py",
        "README.md",
        "report.json",
    ):
        assert (b / name).is_file(), name
    report = json.loads((b / "report.json").read_text())
    assert report["passed"] and {"ncnn-cpu", "ncnn-cpp"} <= set(report["backends"])
    assert report["task"]["ncnn-cpp"]["top1_agreement"] == 1.0


def test_bundle_readme_commands_build_and_run(bundle, tmp_path):
    b = bundle / "b"
    readme = (b / "README.md").read_text()
    cmds = [c for c in re.findall(r"^(cmake .*)$", readme, re.M) if "toolchains" not in c][:2]
    assert len(cmds) == 2 and "-Dncnn_DIR=/path/to/ncnn/install/lib/cmake/ncnn" in cmds[0]
    build = tmp_path / "build"
    for cmd in cmds:  # the README's own commands, with this machine's paths filled in
        cmd = cmd.replace("/path/to/ncnn/install/lib/cmake/ncnn", str(ncnn_cmake_dir()))
        cmd = cmd.replace("-B build", f"-B {build}").replace("--build build", f"--build {build}")
        proc = subprocess.run(cmd, shell=True, cwd=b, capture_output=True, text=True)
        assert proc.returncode == 0, cmd + "\n" + proc.stdout[-2000:] + proc.stderr[-2000:]
    photo = IMAGES / "chelsea.jpg"
    cpp = subprocess.run(
        [str(build / "deploytool_runner"), "meta.json", str(photo)],
        cwd=b,
        capture_output=True,
        text=True,
    )
    py = subprocess.run(
        [sys.executable, "run_ncnn.py", "meta.json", str(photo)], cwd=b, capture_output=True, text=True
    )
    assert cpp.returncode == 0 and py.returncode == 0, cpp.stderr + py.stderr
    top_cpp = [t["index"] for t in json.loads(cpp.stdout)["results"][0]["top_k"]]
    top_py = [t["index"] for t in json.loads(py.stdout)["results"][0]["top_k"]]
    assert top_cpp == top_py and len(top_cpp) == 5


def test_cpp_backend_passes_and_wrong_channel_order_fails(bundle, tmp_path):
    work = bundle / "work"
    result = _invoke(
        "parity", work, "--backends", "ncnn-cpp", "--images", IMAGES, "--report", tmp_path / "ok.json"
    )
    assert result.exit_code == 0, result.output
    ok = json.loads((tmp_path / "ok.json").read_text())
    assert ok["backends"]["ncnn-cpp"]["preprocess_max_abs"] < 1e-5
    assert max(c["max_abs"] for c in ok["comparisons"]) <= 1e-4

    swapped = tmp_path / "swapped"
    shutil.copytree(work, swapped)
    meta = json.loads((swapped / "meta.json").read_text())
    meta["input"]["color"] = "bgr"  # the classic deployment bug: the board feeds BGR to an RGB model
    (swapped / "meta.json").write_text(json.dumps(meta))
    result = _invoke("parity", swapped, "--backends", "ncnn-cpp", "--images", IMAGES)
    assert result.exit_code == 1, result.output
    assert "FAIL" in result.output and "its own preprocessing vs Python's" in result.output


def test_int8_bundle_carries_the_int8_model_checked_by_the_cpp_runner(tmp_path):
    """`bundle --ncnn-precision int8`: the board gets the int8 model that torch, ncnn-cpu and the C++
    runner (built against the same libncnn) were checked on at the int8 tolerance."""
    result = _invoke(
        "bundle", "resnet18", "--ncnn-precision", "int8", "--out", tmp_path / "b", "--work", tmp_path / "w",
        "--images", IMAGES / "chelsea.jpg",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "w" / "report.json").read_text())
    assert report["passed"] and report["backends"]["ncnn-cpp"]["available"]
    cpp = [c for c in report["comparisons"] if c["backend"] == "ncnn-cpp"]
    assert cpp and all(c["passed"] and c["peak_rtol"] > 0 for c in cpp)  # judged at int8
    param = (tmp_path / "b" / "model.ncnn.param").read_text()
    assert "8=102" in param and "8=2" in param  # int8 layers, requantising where ncnn2int8 would
    assert (tmp_path / "b" / "model.ncnn.bin").read_bytes() == (
        tmp_path / "w" / "model.int8.bin"
    ).read_bytes()
    assert json.loads((tmp_path / "w" / "meta.json").read_text())["param"] == "model.int8.param"
    result = _invoke("bundle", "resnet18", "--ncnn-precision", "fp16", "--out", tmp_path / "c")
    assert result.exit_code == 2 and "takes fp32 or int8" in result.output
