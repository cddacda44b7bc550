"""`deploytool matrix`: cells per model × backend × precision, the stage cache (reuse, and a miss when
the spec, the weights or a tool version changes; a changed tolerance re-judges only), shards that merge
into the unsharded result, and a failing cell that fails the gate."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import deploytool.stages as stages
from deploytool.cli import app
from deploytool.errors import SpecError
from deploytool.matrix import MatrixOptions, merge, parse_shard, plan, run_matrix

cli = CliRunner()
BACKENDS = "torch,onnxruntime,ncnn-cpu"


class Tiny(torch.nn.Module):
    def __init__(self, width: int = 4, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = torch.nn.Conv2d(3, width, 3, padding=1)
        self.fc = torch.nn.Linear(width, 5)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)))


def tiny(width: int = 4, seed: int = 0):
    return Tiny(width, seed)


def _spec(folder: Path, name: str, width: int = 4, atol: float = 1e-4) -> Path:
    path = folder / f"{name}.toml"
    path.write_text(
        f'name = "{name}"\ntask = "raw"\nfactory = "test_matrix:tiny"\n[factory_args]\nwidth = {width}\n'
        f"[input]\nshape = [1, 3, 16, 16]\n[tolerance.default]\natol = {atol}\nrtol = 1e-4\n"
    )
    return path


@pytest.fixture
def specs(tmp_path, monkeypatch):
    folder = tmp_path / "models"
    folder.mkdir()
    for name, width in (("alpha", 4), ("beta", 6), ("gamma", 8)):
        _spec(folder, name, width)
    monkeypatch.setenv("DEPLOYTOOL_MODELS", str(folder))
    return folder


def _opts(tmp_path, **kw) -> MatrixOptions:
    base = dict(
        models=("alpha", "beta", "gamma"), backends=BACKENDS, out=tmp_path / "m", cache=tmp_path / "cache"
    )
    return MatrixOptions(**{**base, **kw})


def _cells(report) -> list[tuple]:
    return sorted((c.model, c.backend, c.precision, c.status, c.worst) for c in report.cells)


def test_shards_cover_every_job_once_and_merge_to_the_unsharded_table(specs, tmp_path):
    jobs = plan(_opts(tmp_path, precisions=("fp32", "fp16")))
    shards = [plan(_opts(tmp_path, precisions=("fp32", "fp16"), shard=(i, 3))) for i in (1, 2, 3)]
    assert sorted(j.name for s in shards for j in s) == sorted(j.name for j in jobs) and len(jobs) == 6
    assert all(len(s) == 2 for s in shards)

    whole = run_matrix(_opts(tmp_path, out=tmp_path / "whole"))
    parts = [run_matrix(_opts(tmp_path, shard=(i, 2), out=tmp_path / f"s{i}")) for i in (1, 2)]
    assert {c.model for c in parts[0].cells}.isdisjoint({c.model for c in parts[1].cells})
    merged = merge([tmp_path / "s1", tmp_path / "s2" / "matrix.json"], tmp_path / "merged")
    assert _cells(merged) == _cells(whole) and whole.passed and len(whole.cells) == 9  # 3 models x 3
    table = (tmp_path / "merged" / "matrix.md").read_text()
    assert table == (tmp_path / "whole" / "matrix.md").read_text().replace(
        f"{whole.seconds:.1f} s", f"{merged.seconds:.1f} s"
    )
    assert "| alpha | ✅ pass max_abs" in table and "ncnn-cpu/fp32 | onnxruntime/fp32" in table
    with pytest.raises(SpecError, match="give each shard once"):
        merge([tmp_path / "s1", tmp_path / "s1"], tmp_path / "twice")


def test_the_cache_reuses_what_nothing_changed_and_misses_what_did(specs, tmp_path, monkeypatch):
    opts = _opts(tmp_path, models=("alpha",))
    cold = run_matrix(opts)

    def cached() -> list[str]:
        doc = json.loads((tmp_path / "m" / "alpha" / "fp32" / "report.json").read_text())
        return [k for k, v in doc["stages"].items() if v.get("cached")]

    assert cold.passed and cached() == []

    def reused() -> list[str]:
        run_matrix(opts)
        return cached()

    warm = reused()
    assert all(k in warm for k in ("export", "convert", "infer:torch", "infer:onnxruntime", "infer:ncnn-cpu"))

    # a changed tolerance re-judges cached outputs: nothing re-runs, the verdict changes
    _spec(specs, "alpha", 4, atol=0.0)
    (specs / "alpha.toml").write_text((specs / "alpha.toml").read_text().replace("rtol = 1e-4", "rtol = 0.0"))
    strict = run_matrix(opts)
    assert "infer:ncnn-cpu" in reused() and not strict.passed and strict.exit_code == 1
    assert any(c.status == "fail" for c in strict.cells)

    _spec(specs, "alpha", 5)  # the spec's model changed: export misses
    assert "export" not in reused()
    _spec(specs, "alpha", 4)
    assert "export" in reused()
    real = stages.versions
    monkeypatch.setattr(stages, "versions", lambda: {**real(), "pnnx": "0.0.0-other"})
    assert "convert" not in reused() and "export" in reused()  # a new converter: convert again


def test_changed_weights_miss_the_cache(specs, tmp_path):
    from deploytool.options import RunOptions
    from deploytool.pipeline import run
    from deploytool.spec_toml import load_spec

    spec = load_spec("alpha")
    weights = tmp_path / "w.pt"
    torch.save(tiny(4, seed=1).state_dict(), weights)
    opts = RunOptions(out=tmp_path / "r", backends=BACKENDS, weights=str(weights), cache=tmp_path / "c")
    run(spec, opts)
    assert any("export" in n for n in run(spec, opts).notes)
    torch.save(tiny(4, seed=2).state_dict(), weights)
    assert not any("stage cache" in n for n in run(spec, opts).notes)


def test_cli_matrix_exit_codes_and_files(specs, tmp_path):
    out = tmp_path / "cli"
    result = cli.invoke(app, ["matrix", "alpha", "--backends", BACKENDS, "--out", str(out), "--jobs", "1",
                              "--no-cache"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert {p.name for p in out.iterdir()} >= {"matrix.json", "matrix.md", "junit.xml", "alpha"}
    assert 'tests="3"' in (out / "junit.xml").read_text()  # torch (the reference), onnxruntime, ncnn-cpu
    result = cli.invoke(app, ["matrix", "alpah", "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "did you mean 'alpha'" in result.output
    for bad in ("0/2", "3/2", "a/b", "1"):
        with pytest.raises(SpecError, match="--shard"):
            parse_shard(bad)
    result = cli.invoke(app, ["matrix", "merge", str(out / "nope.json"), "--out", str(tmp_path / "y")])
    assert result.exit_code == 2
