"""The backend registry: every backend declared once, and a backend added in that one place is usable
by run, parity, the CLI's validation and doctor without touching any other module."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from deploytool import registry
from deploytool.backends.ort_runner import OnnxRuntimeRunner
from deploytool.cli import app
from deploytool.errors import BackendUnavailable, SpecError
from deploytool.judge import tolerance_at
from deploytool.options import RunOptions
from deploytool.pipeline import run
from deploytool.spec_toml import load_spec


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.fc = torch.nn.Linear(4, 5)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)))


def tiny():
    return Tiny()


class ShiftedOrt(OnnxRuntimeRunner):
    """ONNX Runtime with every output moved by 0.01: a backend that is wrong on purpose."""

    name = "ort-shifted"

    def _infer(self, feed):
        return {k: v + 0.01 for k, v in super()._infer(feed).items()}


class Gone:
    """A runner whose library is missing."""

    @staticmethod
    def available():
        return 0, "x"


NOOPT = registry.Backend(
    "onnxruntime-noopt",
    "onnxruntime",
    "deploytool.backends.ort_runner:OnnxRuntimeRunner",
    lambda cls, b: cls(b.art.onnx, b.config.threads, optimize=False),
    needs=("onnx",),
    description="ONNX Runtime with graph optimisations off",
)
SHIFTED = dataclasses.replace(
    NOOPT, name="ort-shifted", runner=f"{__name__}:ShiftedOrt", build=lambda cls, b: cls(b.art.onnx)
)


@pytest.fixture
def extra_backends(monkeypatch):
    monkeypatch.setitem(registry.BACKENDS, NOOPT.name, NOOPT)
    monkeypatch.setitem(registry.BACKENDS, SHIFTED.name, SHIFTED)


def test_every_declaration_is_consistent():
    fields = {f.name for f in dataclasses.fields(registry.Artifacts)}
    for name, backend in registry.BACKENDS.items():
        assert backend.name == name and backend.family in ("torch", "onnxruntime", "ncnn")
        assert set(backend.needs) <= fields, name
        assert "fp32" in backend.precisions
        assert backend.runner_class().name == name  # the Runner class reports the same name
    assert registry.REFERENCE in registry.default_backends()
    assert set(registry.bench_backends()) <= set(registry.BACKENDS)


def test_unknown_backend_gets_a_suggestion():
    with pytest.raises(SpecError, match="did you mean 'ncnn-cpu'"):
        registry.parse_backends("torch,ncnn-cpy")
    with pytest.raises(SpecError, match="empty"):
        registry.parse_backends(" , ")
    assert registry.parse_backends("torch,torch,onnxruntime") == ["torch", "onnxruntime"]


def test_a_named_backend_that_cannot_run_is_exit_4(monkeypatch):
    gone = dataclasses.replace(NOOPT, name="gone", runner=f"{__name__}:Gone")
    monkeypatch.setitem(registry.BACKENDS, "gone", gone)
    with pytest.raises(BackendUnavailable, match="backend gone is unavailable: x"):
        registry.select_backends("torch,gone")
    runnable, found = registry.select_backends(None, default=["gone", "onnxruntime"])
    assert runnable == ["torch", "onnxruntime"] and found["gone"] == (0, "x")


def test_a_backend_missing_its_files_is_refused():
    with pytest.raises(SpecError, match="needs onnx"):
        registry.create_runner("onnxruntime", registry.Artifacts(), registry.RunnerConfig(("x",), ("y",)))


@pytest.mark.slow
def test_a_backend_registered_in_one_place_runs_in_run_parity_cli_and_doctor(extra_backends, tmp_path):
    spec = load_spec("test_registry:tiny", "1,3,16,16")
    report = run(spec, RunOptions(out=tmp_path, backends="torch,onnxruntime-noopt,ort-shifted"))
    by_backend = {c.backend: c for c in report.comparisons}
    assert by_backend["onnxruntime-noopt"].passed and by_backend["onnxruntime-noopt"].max_abs < 1e-5
    # the judge judges the new backend like any other: 0.01 off fails at the default 1e-4 tolerance
    assert not by_backend["ort-shifted"].passed
    assert by_backend["ort-shifted"].max_abs == pytest.approx(0.01, rel=1e-3)
    assert not report.passed and report.backends["ort-shifted"].latency_ms_median is not None

    cli = CliRunner()
    (tmp_path / "report.json").write_text('{"spec": "test_registry:tiny"}')
    args = ["parity", str(tmp_path), "--model", "test_registry:tiny", "--input-shape", "1,3,16,16"]
    ok = cli.invoke(app, [*args, "--backends", "onnxruntime-noopt"])
    assert ok.exit_code == 0, ok.output
    assert "onnxruntime-noopt" in ok.output
    bad = cli.invoke(app, [*args, "--backends", "ort-shifted", "--reference", "onnxruntime-noopt"])
    assert bad.exit_code == 1, bad.output
    doctor = cli.invoke(app, ["doctor"])
    assert "backend onnxruntime-noopt" in doctor.output and "graph optimisations off" in doctor.output
    typo = cli.invoke(
        app, ["run", "test_registry:tiny", "--input-shape", "1,3,16,16", "--backends", "onnxruntime-nopt"]
    )
    assert typo.exit_code == 2 and "did you mean 'onnxruntime-noopt'" in typo.output


def test_tolerance_of_a_new_backend_falls_back_to_the_default(extra_backends):
    from deploytool.judge import tolerance

    spec = load_spec("resnet18")
    assert registry.get_backend("onnxruntime-noopt").judged_precision("fp16", fp16_weights=True) == "fp32"
    assert tolerance(spec, "onnxruntime-noopt", "fp16") == tolerance_at(spec, "default")
    fp16 = tolerance_at(spec, "ncnn-cpu", "fp16")
    assert np.isclose(tolerance(spec, "ncnn-cpu", "fp32", fp16_weights=True).atol, fp16.atol)


def test_a_backend_name_may_carry_a_target():
    """runner x target: ncnn-cpp@TARGET is the declared ncnn-cpp on that target; tolerances and reports
    fall back along its lineage; a target on a backend that has none, or an unknown target, is exit 2."""
    b = registry.get_backend("ncnn-cpp@aarch64:max")
    assert (b.name, b.base, b.target, b.family) == ("ncnn-cpp@aarch64:max", "ncnn-cpp", "aarch64:max", "ncnn")
    assert b.lineage() == ["ncnn-cpp@aarch64:max", "ncnn-cpp@aarch64", "ncnn-cpp"]
    assert registry.get_backend("ncnn-cpp@aarch64").lineage() == ["ncnn-cpp@aarch64", "ncnn-cpp"]
    assert registry.get_backend("ncnn-cpp").lineage() == ["ncnn-cpp"]
    ssh = registry.get_backend("ncnn-cpp@ssh:pi@board.local:2222:models/r18")
    assert ssh.lineage() == ["ncnn-cpp@ssh:pi@board.local:2222:models/r18", "ncnn-cpp@ssh", "ncnn-cpp"]
    assert registry.parse_backends("torch,ncnn-cpp@aarch64,ncnn-cpp@aarch64:max") == [
        "torch", "ncnn-cpp@aarch64", "ncnn-cpp@aarch64:max"
    ]  # fmt: skip
    with pytest.raises(SpecError, match="runs only here"):
        registry.get_backend("ncnn-cpu@aarch64")
    with pytest.raises(SpecError, match="unknown target 'riscv64'"):
        registry.get_backend("ncnn-cpp@riscv64")
    with pytest.raises(SpecError, match="unknown target"):
        registry.get_backend("ncnn-cpp@aarch64:")
    with pytest.raises(SpecError, match="did you mean 'ncnn-cpp'"):
        registry.get_backend("ncnn-cxx@aarch64")


def test_a_target_tolerance_falls_back_along_the_lineage(tmp_path):
    toml = tmp_path / "t.toml"
    toml.write_text(
        'name = "t"\ntask = "classify"\nfactory = "test_registry:tiny"\n[input]\nshape = [1, 3, 8, 8]\n'
        '[tolerance."ncnn-cpp@aarch64-fp16"]\natol = 0.03\nrtol = 0.01\n'
        '[tolerance."ncnn-cpp@aarch64:max"]\natol = 2e-5\nrtol = 1e-5\n'
    )
    spec = load_spec(str(toml))
    assert tolerance_at(spec, "ncnn-cpp@aarch64:max", "fp16").atol == 0.03  # BACKEND@KIND-PRECISION
    assert tolerance_at(spec, "ncnn-cpp@aarch64:max", "fp32").atol == 2e-5  # the exact name
    assert tolerance_at(spec, "ncnn-cpp@aarch64", "fp32").atol == 1e-4  # nothing for it: the default
    assert tolerance_at(spec, "ncnn-cpp@ssh:pi@b", "fp16").atol != 0.03  # a board is not the emulator
    bad = tmp_path / "bad.toml"
    bad.write_text(toml.read_text().replace("aarch64:max", "venus"))
    with pytest.raises(SpecError, match="unknown backend or precision 'ncnn-cpp@venus'"):
        load_spec(str(bad))
