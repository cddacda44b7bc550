"""What deploytool promises for bad input (README "Bad input"): every case below gets its documented
exit code and one `error:` line on stderr, no traceback, and nothing new in the folder it was pointed at.
Each row is one thing a careless or hostile user did."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from deploytool.cli import app
from deploytool.progress import PREFIX as PROGRESS_PREFIX

REPO = Path(__file__).resolve().parent.parent
IMAGES = REPO / "images"
GOOD_SPEC = (REPO / "models" / "resnet18.toml").read_text()
cli = CliRunner()

# Import-spec factories a user might write, in a module the tests put on sys.path.
FACTORIES = """
import sys
import torch

def raises():
    raise RuntimeError("cannot find my config")

def not_a_module():
    return 42

def needs_arg(width):
    return torch.nn.Linear(width, 2)

def exits():
    sys.exit(0)

def tiny():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.LazyLinear(5))
"""


def _spec(tmp: Path, name: str, text: str) -> Path:
    path = tmp / f"{name}.toml"
    path.write_text(text)
    return path


def _spec_with(tmp: Path, name: str, old: str, new: str) -> Path:
    assert old in GOOD_SPEC, old
    return _spec(tmp, name, GOOD_SPEC.replace(old, new, 1))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Bad files of every kind, made once."""
    t = tmp_path_factory.mktemp("bad")
    (t / "text.onnx").write_text("this is not an onnx model\n")
    (t / "garbage.pt").write_bytes(os.urandom(256))
    (t / "notes.txt").write_text("hello\n")
    (t / "binary.param").write_bytes(b"\xf7\x01" + os.urandom(200))
    (t / "binary.bin").write_bytes(os.urandom(64))
    (t / "alone.param").write_text("7767517\n1 1\nInput in0 0 1 in0 0=4 1=4 2=3\n")
    torch.onnx.export(torch.nn.Linear(4, 2), (torch.zeros(1, 4),), str(t / "ok.onnx"), dynamo=False)
    (t / "corrupt.npz").write_bytes(b"PK\x03\x04 not really a zip")
    np.savez(t / "strings.npz", x=np.array(["a", "b"]))
    np.savez(t / "notgolden.npz", x=np.zeros((1, 3, 4, 4), np.float32))
    (t / "notimage.jpg").write_text("not a jpeg\n")
    data = (IMAGES / "chelsea.jpg").read_bytes()
    (t / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (t / "folder.json").mkdir()
    (t / "afile").write_text("a file, not a folder\n")
    (t / "foreign").mkdir()
    (t / "foreign" / "model.onnx").write_text("the user's own model\n")
    (t / "empty_run").mkdir()
    (t / "userpkg").mkdir()
    (t / "userpkg" / "__init__.py").write_text("")
    (t / "userpkg" / "nets.py").write_text(FACTORIES)
    (t / "userpkg" / "broken.py").write_text("def f(:\n")
    specs = {
        "pad_grey": ('resize = "resize"', 'resize = "resize"\npad_value = "grey"'),
        "atol_nan": ("[tolerance.default]\natol = 1e-4", "[tolerance.default]\natol = nan"),
        "atol_negative": ("[tolerance.default]\natol = 1e-4", "[tolerance.default]\natol = -1e-4"),
        "top_k_text": ("top_k = 5", 'top_k = "five"'),
        "near_tie_negative": ("near_tie_margin = 0.05", "near_tie_margin = -1"),
        "name_escapes": ('name = "resnet18"', 'name = "../../x"'),
        "unknown_key": ('name = "resnet18"', 'name = "resnet18"\ncolour = "red"'),
    }
    for name, (old, new) in specs.items():
        _spec_with(t, name, old, new)
    _spec_with(t, "tolerance_number", 'name = "resnet18"', 'name = "resnet18"\ntolerance = 5')
    _spec_with(t, "classify_unknown_arg", "top_k = 5", "top_k = 5\nextra = 1")
    (t / "latin1.toml").write_bytes('name = "r\xe9seau"\n'.encode("latin-1"))
    _spec(t, "invalid", "name = \n")
    # [inputs] of a sequence model (models/lstm.toml) and an .npy model (models/eegnet.toml)
    lstm, eeg = ((REPO / "models" / f"{m}.toml").read_text() for m in ("lstm", "eegnet"))
    _spec(t, "inputs_count_zero", lstm.replace("count = 3", "count = 0", 1))
    _spec(t, "inputs_unknown_kind", lstm.replace('kind = "uniform"', 'kind = "walk"', 1))
    _spec(t, "inputs_npy_missing", eeg.replace('path = "data/', 'path = "nope.npy" # ', 1))
    _spec(t, "inputs_npy_wrong_shape", eeg.replace('path = "data/', 'path = "wrong.npy" # ', 1))
    np.save(t / "wrong.npy", np.zeros((2, 5, 8, 8), np.float32))
    return t


# (id, arguments, exit code, text the error line must contain). {t} is the folder of bad files,
# {o} a fresh output folder that must stay empty.
CASES = [
    # run: the model and its spec
    ("run-unknown-model", ["run", "resnet19", "--out", "{o}"], 2, "did you mean 'resnet18'"),
    ("run-spec-missing", ["run", "{t}/nope.toml", "--out", "{o}"], 2, "does not exist"),
    ("run-spec-invalid-toml", ["run", "{t}/invalid.toml", "--out", "{o}"], 2, "invalid TOML"),
    ("run-spec-not-utf8", ["run", "{t}/latin1.toml", "--out", "{o}"], 2, "latin1.toml"),
    ("run-spec-pad-grey", ["run", "{t}/pad_grey.toml", "--out", "{o}"], 2, "pad_value"),
    ("run-spec-tolerance-number", ["run", "{t}/tolerance_number.toml", "--out", "{o}"], 2, "tolerance"),
    ("run-spec-atol-nan", ["run", "{t}/atol_nan.toml", "--out", "{o}"], 2, "atol"),
    ("run-spec-atol-negative", ["run", "{t}/atol_negative.toml", "--out", "{o}"], 2, "atol"),
    ("run-spec-top-k-text", ["run", "{t}/top_k_text.toml", "--out", "{o}"], 2, "top_k"),
    ("run-spec-near-tie", ["run", "{t}/near_tie_negative.toml", "--out", "{o}"], 2, "near_tie"),
    ("run-spec-name-escapes", ["run", "{t}/name_escapes.toml"], 2, "../../x"),
    ("run-spec-unknown-key", ["run", "{t}/unknown_key.toml", "--out", "{o}"], 2, "colour"),
    ("run-spec-unknown-task-arg", ["run", "{t}/classify_unknown_arg.toml", "--out", "{o}"], 2, "extra"),
    # run: import specs
    ("run-import-no-shape", ["run", "userpkg.nets:tiny", "--out", "{o}"], 2, "--input-shape"),
    ("run-import-no-module", ["run", "nopkg.nets:f", "--input-shape", "1,3,8,8", "--out", "{o}"], 2, "nopkg"),
    (
        "run-import-no-attr",
        ["run", "userpkg.nets:nothing", "--input-shape", "1,3,8,8", "--out", "{o}"],
        2,
        "nothing",
    ),
    (
        "run-factory-raises",
        ["run", "userpkg.nets:raises", "--input-shape", "1,3,8,8", "--out", "{o}"],
        2,
        "cannot find my config",
    ),
    (
        "run-factory-not-module",
        ["run", "userpkg.nets:not_a_module", "--input-shape", "1,3,8,8", "--out", "{o}"],
        2,
        "not_a_module",
    ),
    (
        "run-factory-needs-arg",
        ["run", "userpkg.nets:needs_arg", "--input-shape", "1,3,8,8", "--out", "{o}"],
        2,
        "width",
    ),
    (
        "run-factory-exits",
        ["run", "userpkg.nets:exits", "--input-shape", "1,3,8,8", "--out", "{o}"],
        2,
        "exit",
    ),
    (
        "run-factory-syntax-error",
        ["run", "userpkg.broken:f", "--input-shape", "1,3,8,8", "--out", "{o}"],
        2,
        "broken",
    ),
    # run: shapes and inputs
    (
        "run-shape-malformed",
        ["run", "resnet18", "--input-shape", "1,3,x", "--out", "{o}"],
        2,
        "--input-shape",
    ),
    ("run-shape-zero", ["run", "resnet18", "--input-shape", "1,3,0,224", "--out", "{o}"], 2, "positive"),
    (
        "run-shape-huge",
        ["run", "resnet18", "--input-shape", "1,3,100000,100000", "--out", "{o}"],
        2,
        "elements",
    ),
    (
        "run-shape-model-cannot-take",
        ["run", "userpkg.nets:tiny", "--input-shape", "1,3", "--out", "{o}"],
        2,
        "cannot run on input shape",
    ),
    (
        "run-one-channel-photos",
        ["run", "resnet18", "--input-shape", "1,1,224,224", "--out", "{o}"],
        2,
        "1,3,H,W",
    ),
    (
        "run-image-missing",
        ["run", "resnet18", "--images", "{t}/nope.jpg", "--out", "{o}"],
        2,
        "does not exist",
    ),
    (
        "run-image-not-image",
        ["run", "resnet18", "--images", "{t}/notimage.jpg", "--out", "{o}"],
        2,
        "notimage.jpg",
    ),
    (
        "run-image-truncated",
        ["run", "resnet18", "--images", "{t}/truncated.jpg", "--out", "{o}"],
        2,
        "truncated.jpg",
    ),
    (
        "run-image-folder-without-images",
        ["run", "resnet18", "--images", "{t}/userpkg", "--out", "{o}"],
        2,
        "no images found",
    ),
    (
        "run-weights-missing",
        ["run", "resnet18", "--weights", "{t}/nope.pt", "--out", "{o}"],
        2,
        "does not exist",
    ),
    (
        "run-weights-garbage",
        ["run", "resnet18", "--weights", "{t}/garbage.pt", "--out", "{o}"],
        2,
        "checkpoint",
    ),
    # run: options
    ("run-precision-fp8", ["run", "resnet18", "--ncnn-precision", "fp8", "--out", "{o}"], 2, "fp8"),
    ("run-converter-tnn", ["run", "resnet18", "--converter", "tnn", "--out", "{o}"], 2, "tnn"),
    ("run-opset-99", ["run", "resnet18", "--opset", "99", "--out", "{o}"], 2, "opset"),
    ("run-threads-zero", ["run", "resnet18", "--threads", "0", "--out", "{o}"], 2, "--threads"),
    ("run-backends-empty", ["run", "resnet18", "--backends", ",", "--out", "{o}"], 2, "empty"),
    (
        "run-target-unknown",
        ["run", "resnet18", "--backends", "torch,ncnn-cpp@riscv64", "--out", "{o}"],
        2,
        "unknown target 'riscv64'",
    ),
    (
        "run-target-on-a-local-backend",
        ["run", "resnet18", "--backends", "torch,ncnn-cpu@aarch64", "--out", "{o}"],
        2,
        "runs only here",
    ),
    (
        "run-target-qemu-cpu-typo",
        ["run", "resnet18", "--backends", "torch,ncnn-cpp@aarch64:cortex-a27", "--out", "{o}"],
        2,
        "did you mean",
    ),
    (
        "run-target-ssh-no-host",
        ["run", "resnet18", "--backends", "torch,ncnn-cpp@ssh:pi@:22", "--out", "{o}"],
        2,
        "no host",
    ),
    ("bundle-target-riscv", ["bundle", "resnet18", "--target", "riscv64", "--out", "{o}"], 2, "--target"),
    ("deploy-not-a-bundle", ["deploy", "{t}/foreign", "--to", "127.0.0.1:x"], 2, "not a deploytool bundle"),
    ("deploy-missing-folder", ["deploy", "{t}/nope", "--to", "127.0.0.1:x"], 2, "no such folder"),
    (
        "run-backends-typo",
        ["run", "resnet18", "--backends", "torch,ncnn-cpy", "--out", "{o}"],
        2,
        "did you mean 'ncnn-cpu'",
    ),
    (
        "run-backends-only-reference",
        ["run", "resnet18", "--backends", "torch", "--out", "{o}"],
        2,
        "nothing to compare",
    ),
    (
        "run-onnx2ncnn-missing",
        ["run", "resnet18", "--converter", "onnx2ncnn", "--onnx2ncnn", "{t}/nope", "--out", "{o}"],
        2,
        "onnx2ncnn",
    ),
    (
        "run-onnx2ncnn-folder",
        ["run", "resnet18", "--converter", "onnx2ncnn", "--onnx2ncnn", "{t}/userpkg", "--out", "{o}"],
        2,
        "folder",
    ),
    ("run-precision-not-auto", ["run", "resnet18", "--precision", "fast", "--out", "{o}"], 2, "only 'auto'"),
    ("run-auto-without-budget", ["run", "resnet18", "--precision", "auto", "--out", "{o}"], 2, "--budget"),
    (
        "run-budget-without-auto",
        ["run", "resnet18", "--budget", "top1=1", "--out", "{o}"],
        2,
        "--precision auto",
    ),
    (
        "run-auto-bad-budget",
        ["run", "resnet18", "--precision", "auto", "--budget", "top2=1", "--out", "{o}"],
        2,
        "top2",
    ),
    (
        "run-auto-and-fixed-precision",
        [
            "run",
            "resnet18",
            "--precision",
            "auto",
            "--budget",
            "top1=1",
            "--ncnn-precision",
            "bf16",
            "--out",
            "{o}",
        ],
        2,
        "--ncnn-precision bf16",
    ),
    (
        "run-auto-and-fp16",
        ["run", "resnet18", "--precision", "auto", "--budget", "top1=1", "--fp16", "--out", "{o}"],
        2,
        "--fp16",
    ),
    # run: where it writes
    ("run-out-is-a-file", ["run", "resnet18", "--out", "{t}/afile"], 2, "is a file"),
    ("run-out-in-proc", ["run", "resnet18", "--out", "/proc/deploytool-x"], 2, "/proc/deploytool-x"),
    ("run-out-foreign-folder", ["run", "resnet18", "--out", "{t}/foreign"], 2, "did not write"),
    (
        "run-report-is-a-folder",
        ["run", "resnet18", "--report", "{t}/folder.json", "--out", "{o}"],
        2,
        "is a folder",
    ),
    (
        "run-junit-is-a-folder",
        ["run", "resnet18", "--junit", "{t}/folder.json", "--out", "{o}"],
        2,
        "is a folder",
    ),
    (
        "run-markdown-under-a-file",
        ["run", "resnet18", "--markdown", "{t}/afile/r.md", "--out", "{o}"],
        2,
        "is a file",
    ),
    # int8
    (
        "quantize-calib-missing",
        ["quantize", "resnet18", "--calib", "{t}/nope", "--out", "{o}"],
        2,
        "does not exist",
    ),
    (
        "quantize-calib-empty",
        ["quantize", "resnet18", "--calib", "{t}/empty_run", "--out", "{o}"],
        2,
        "no images found",
    ),
    ("quantize-bad-method", ["quantize", "resnet18", "--method", "entropy", "--out", "{o}"], 2, "entropy"),
    (
        "quantize-table-malformed",
        ["quantize", "resnet18", "--table", "{t}/notes.txt", "--out", "{o}"],
        2,
        "notes.txt",
    ),
    (
        "quantize-table-and-calib",
        ["quantize", "resnet18", "--table", "{t}/notes.txt", "--calib", "{t}/calib", "--out", "{o}"],
        2,
        "--table replaces calibration",
    ),
    (
        "run-calib-without-int8",
        ["run", "resnet18", "--calib", "{t}/userpkg", "--out", "{o}"],
        2,
        "--ncnn-precision int8",
    ),
    (
        "run-int8-and-fp16",
        ["run", "resnet18", "--ncnn-precision", "int8", "--fp16", "--out", "{o}"],
        2,
        "--fp16",
    ),
    # parity
    ("parity-missing-target", ["parity", "{t}/nope"], 2, "neither a run folder"),
    ("parity-empty-folder", ["parity", "{t}/empty_run"], 2, "holds no model"),
    ("parity-text-onnx", ["parity", "{t}/text.onnx", "--input-shape", "1,3,8,8"], 2, "text.onnx"),
    ("parity-binary-param", ["parity", "{t}/binary.param", "--input-shape", "1,3,8,8"], 2, "binary.param"),
    ("parity-param-without-bin", ["parity", "{t}/alone.param", "--input-shape", "1,3,4,4"], 2, "alone.bin"),
    ("parity-corrupt-npz", ["parity", "{t}/ok.onnx", "--inputs", "{t}/corrupt.npz"], 2, "corrupt.npz"),
    ("parity-string-npz", ["parity", "{t}/ok.onnx", "--inputs", "{t}/strings.npz"], 2, "strings.npz"),
    (
        "parity-golden-and-inputs",
        ["parity", "{t}/text.onnx", "--golden", "{t}/notgolden.npz", "--inputs", "{t}/strings.npz"],
        2,
        "--golden brings its own inputs",
    ),
    (
        "parity-golden-and-shape",
        ["parity", "{t}/text.onnx", "--golden", "{t}/notgolden.npz", "--input-shape", "1,3,8,8"],
        2,
        "drop --input-shape",
    ),
    (
        "parity-golden-and-reference",
        ["parity", "{t}/text.onnx", "--golden", "{t}/notgolden.npz", "--reference", "onnxruntime"],
        2,
        "--golden is the reference",
    ),
    ("parity-precision-fp8", ["parity", "{t}/alone.param", "--ncnn-precision", "fp8"], 2, "fp8"),
    (
        "parity-save-golden-folder",
        ["parity", "{t}/alone.param", "--save-golden", "{t}/folder.json"],
        2,
        "is a folder",
    ),
    # bench
    ("bench-bad-budget", ["bench", "resnet18", "--budget", "top2=1", "--out", "{o}"], 2, "top2"),
    ("bench-threads-text", ["bench", "resnet18", "--threads", "a", "--out", "{o}"], 2, "--threads"),
    ("bench-threads-zero", ["bench", "resnet18", "--threads", "0", "--out", "{o}"], 2, "--threads"),
    ("bench-runs-zero", ["bench", "resnet18", "--runs", "0", "--out", "{o}"], 2, "--runs"),
    (
        "bench-cpp-not-timed",
        ["bench", "resnet18", "--backends", "ncnn-cpp", "--out", "{o}"],
        2,
        "does not time",
    ),
    # export and convert
    ("export-bad-format", ["export", "resnet18", "--formats", "tflite", "--out", "{o}"], 2, "tflite"),
    ("export-opset-99", ["export", "resnet18", "--opset", "99", "--out", "{o}"], 2, "opset"),
    ("convert-missing", ["convert", "{t}/nope.onnx", "--out", "{o}"], 2, "does not exist"),
    ("convert-pt-without-shape", ["convert", "{t}/garbage.pt", "--out", "{o}"], 2, "--input-shape"),
    (
        "convert-text-onnx",
        ["convert", "{t}/text.onnx", "--input-shape", "1,3,8,8", "--out", "{o}"],
        2,
        "text.onnx",
    ),
    (
        "convert-garbage-pt",
        ["convert", "{t}/garbage.pt", "--input-shape", "1,3,8,8", "--out", "{o}"],
        2,
        "garbage.pt",
    ),
    (
        "convert-other-suffix",
        ["convert", "{t}/notes.txt", "--input-shape", "1,3,8,8", "--out", "{o}"],
        2,
        "notes.txt",
    ),
    ("convert-converter-tnn", ["convert", "{t}/text.onnx", "--converter", "tnn", "--out", "{o}"], 2, "tnn"),
    (
        "convert-shape-malformed",
        ["convert", "{t}/text.onnx", "--input-shape", "a,b", "--out", "{o}"],
        2,
        "--input-shape",
    ),
    ("run-inputs-count-zero", ["run", "{t}/inputs_count_zero.toml", "--out", "{o}"], 2, "inputs.count"),
    ("run-inputs-unknown-kind", ["run", "{t}/inputs_unknown_kind.toml", "--out", "{o}"], 2, "'walk'"),
    ("run-inputs-npy-missing", ["run", "{t}/inputs_npy_missing.toml", "--out", "{o}"], 2, "nope.npy"),
    ("run-inputs-npy-shape", ["run", "{t}/inputs_npy_wrong_shape.toml", "--out", "{o}"], 2, "[2, 5, 8, 8]"),
    ("run-inputs-and-images", ["run", "lstm", "--images", str(IMAGES), "--out", "{o}"], 2, "not photos"),
]


@pytest.fixture
def userpkg(files, monkeypatch):
    monkeypatch.syspath_prepend(str(files))
    monkeypatch.chdir(files)  # ./models must not hide the bundled specs; relative paths resolve here


def _snapshot(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def _error_lines(result) -> list[str]:
    return [ln for ln in result.stderr.strip().splitlines() if not ln.startswith(PROGRESS_PREFIX)]


@pytest.mark.parametrize("case_id, args, code, needle", CASES, ids=[c[0] for c in CASES])
def test_bad_input(case_id, args, code, needle, files, userpkg, tmp_path):
    out = tmp_path / "o"
    before = _snapshot(files)
    argv = [a.format(t=files, o=out) for a in args]
    result = cli.invoke(app, argv)
    lines = _error_lines(result)
    assert result.exit_code == code, f"{argv}\n{result.output}"
    assert "Traceback" not in result.output
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    assert needle in lines[0], lines[0]
    assert _snapshot(files) == before, "the folder of the user's files changed"
    assert not out.exists() or not any(out.iterdir()), f"{out} holds {sorted(_snapshot(out))}"
    for leftover in tmp_path.rglob("*.tmp*"):
        raise AssertionError(f"half-written file left behind: {leftover}")


def test_there_are_at_least_sixty_cases():
    assert len(CASES) >= 60


def test_an_internal_error_is_exit_5_with_the_traceback_saved(monkeypatch, tmp_path):
    import deploytool.cli as cli_module

    def broken(*_args, **_kwargs):
        raise KeyError("a bug")

    monkeypatch.setattr(cli_module, "load_spec", broken)
    result = cli.invoke(app, ["run", "resnet18", "--out", str(tmp_path / "o")])
    assert result.exit_code == 5 and "Traceback" not in result.output
    [line] = _error_lines(result)
    assert "internal error (KeyError" in line and "bug in deploytool" in line
    saved = Path(line.rsplit("traceback saved to ", 1)[1].strip())
    assert "KeyError: 'a bug'" in saved.read_text()
    saved.unlink()


# ---------------------------------------------------------------- wrong verdicts (theme 4)


class ReLUNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.fc = torch.nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)))


def relunet():
    return ReLUNet()


@pytest.mark.slow
def test_parity_reuses_the_weights_the_run_used_and_keeps_its_report(tmp_path):
    other = ReLUNet()
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(-2.0)  # clearly not the seeded weights
    torch.save(other.state_dict(), tmp_path / "w.pt")
    run_dir = tmp_path / "run"
    base = ["test_bad_input:relunet", "--input-shape", "1,3,8,8", "--backends", "torch,onnxruntime"]
    first = cli.invoke(app, ["run", *base, "--weights", str(tmp_path / "w.pt"), "--out", str(run_dir)])
    assert first.exit_code == 0, first.output
    run_report = (run_dir / "report.json").read_text()
    again = cli.invoke(app, ["parity", str(run_dir), "--input-shape", "1,3,8,8"])
    assert again.exit_code == 0, again.output  # without the recorded weights: a false FAIL
    assert (run_dir / "report.json").read_text() == run_report and (run_dir / "parity.json").is_file()
    seeded = cli.invoke(
        app, ["parity", str(run_dir), "--model", "test_bad_input:relunet", "--input-shape", "1,3,8,8"]
    )
    assert seeded.exit_code == 1, seeded.output  # another model named: the run's weights do not apply


@pytest.mark.slow
def test_a_rerun_never_leaves_the_earlier_report_beside_new_files(tmp_path, monkeypatch):
    import deploytool.pipeline as pipeline

    out = tmp_path / "run"
    args = ["run", "test_bad_input:relunet", "--input-shape", "1,3,8,8", "--backends", "torch,onnxruntime"]
    assert cli.invoke(app, [*args, "--out", str(out)]).exit_code == 0
    assert (out / "report.json").is_file()

    def interrupted(*_a, **_k):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "infer_all", interrupted)
    result = cli.invoke(app, [*args, "--out", str(out)])
    assert result.exit_code != 0
    assert not (out / "report.json").exists(), "an old report would vouch for the new model files"
    assert (out / "model.onnx").is_file()


@pytest.mark.slow
def test_a_failing_backend_is_reported_and_the_others_still_judged(tmp_path, monkeypatch):
    """A backend that fails (here ONNX Runtime made to raise) costs its own result only: the report is
    written with every other backend's verdict, and the exit code is 3 (a tool failed), not 1."""
    from deploytool.backends.ort_runner import OnnxRuntimeRunner

    calls = {"n": 0}
    original = OnnxRuntimeRunner._infer

    def flaky(self, feed):
        calls["n"] += 1
        if self.name == "onnxruntime":
            raise RuntimeError("simulated crash in the native library")
        return original(self, feed)

    monkeypatch.setattr(OnnxRuntimeRunner, "_infer", flaky)
    out = tmp_path / "run"
    result = cli.invoke(
        app,
        ["run", "test_bad_input:relunet", "--input-shape", "1,3,8,8", "--backends",
         "torch,onnxruntime,torchscript", "--out", str(out)],
    )  # fmt: skip
    assert result.exit_code == 3, result.output
    [line] = _error_lines(result)
    assert "onnxruntime" in line and "simulated crash" in line and "other backends' results" in line
    import json

    report = json.loads((out / "report.json").read_text())
    assert report["passed"] is False
    assert "simulated crash" in report["backends"]["onnxruntime"]["error"]
    assert {c["backend"] for c in report["comparisons"]} == {"torchscript"}
    assert all(c["passed"] for c in report["comparisons"])


def test_the_bundled_specs_are_found_beside_a_models_folder_of_the_users(tmp_path, monkeypatch):
    (tmp_path / "models").mkdir()
    shutil.copy(REPO / "models" / "yolov8n.toml", tmp_path / "models" / "mine.toml")
    monkeypatch.chdir(tmp_path)
    result = cli.invoke(app, ["models"])
    assert result.exit_code == 0 and "resnet18" in result.output and "mine" in result.output
