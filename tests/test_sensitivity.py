"""int8 sensitivity: `quantize --explain` ranks the int8 layers and shows the error growth; a corrupted
scale is named first; `--auto-mixed` keeps the fewest layers fp32 for a budget (or exits 1 when even
fp32 cannot meet it, 2 when the budget is malformed)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from test_quantize import Tiny
from typer.testing import CliRunner

from deploytool.cli import app
from deploytool.judge import parse_budget
from deploytool.ncnn_param import read_param
from deploytool.quantize.table import read_table, write_table
from deploytool.sensitivity import SCRATCH, LayerSensitivity, rank

IMAGES = Path(__file__).resolve().parent.parent / "images"
cli = CliRunner()


def tiny_classifier():
    torch.manual_seed(0)
    return Tiny().eval()  # test_quantize's net: 6-bit 3x3, depthwise, 8-bit conv and fc


TINY_SPEC = """
name = "tiny"
task = "classify"
factory = "test_sensitivity:tiny_classifier"
input = {name = "input", shape = [1, 3, 32, 32]}
output = {names = ["logits"]}
"""  # the default preprocessing: photos resized to 32x32, scaled to [0, 1]


@pytest.fixture(scope="module")
def tiny_spec(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("spec") / "tiny.toml"
    path.write_text(TINY_SPEC)
    return path


def quantize(*args: str):
    return cli.invoke(app, ["quantize", *args])


def one_error_line(output: str) -> str:
    lines = [ln for ln in output.strip().splitlines() if ln.strip()]
    assert "Traceback" not in output
    errors = [ln for ln in lines if ln.startswith("error:")]
    assert len(errors) == 1, output
    return errors[0]


@pytest.fixture(scope="module")
def tiny_explained(tiny_spec, tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny")
    md = out / "md" / "summary.md"
    result = quantize(str(tiny_spec), "--explain", "--out", str(out / "run"), "--markdown", str(md))
    assert result.exit_code == 0, result.output
    return out / "run", md, json.loads((out / "run" / "sensitivity.json").read_text()), result.output


def test_explain_ranks_every_int8_layer_and_shows_the_error_growth(tiny_explained):
    run, md, sens, output = tiny_explained
    report = json.loads((run / "report.json").read_text())
    int8 = report["artifacts"]["int8_layers"]
    assert len(int8) == 4
    ranking = sens["ranking"]
    assert sorted(r["layer"] for r in ranking) == sorted(int8)
    cosines = [r["cosine"] for r in ranking]
    assert cosines == sorted(cosines)  # worst first
    assert all(0.99 < c < 1.0 for c in cosines)  # each layer alone int8 changes the output, a little
    assert all(r["peak_rel"] > 0 and r["top1_agreement"] is not None for r in ranking)
    # error growth: blobs in graph order, every int8 layer's output among them, the last one the output
    growth = sens["growth"]["blobs"]
    assert [g["index"] for g in growth] == sorted(g["index"] for g in growth)
    assert {g["layer"] for g in growth if g["int8"]} == set(int8)
    graph = read_param(run / "model.ncnn.param")
    assert growth[-1]["blob"] == graph.output_names[0] and growth[-1]["cosine"] < 1.0
    # requantising layers hand out int8 values; growth compares them as the floats they stand for
    assert all(g["peak_rel"] < 0.5 for g in growth), [(g["layer"], g["peak_rel"]) for g in growth]
    assert report["artifacts"]["int8_sensitivity"] == str(run / "sensitivity.json")
    assert "int8_kept_fp32" not in report["artifacts"]  # only --auto-mixed keeps layers
    assert not (run / SCRATCH).exists()  # the per-layer models are gone
    # console table, Markdown section with its PNG, in the run folder and beside --markdown
    assert "int8 sensitivity" in output and ranking[0]["layer"] in output
    for text, folder in (((run / "report.md").read_text(), run), (md.read_text(), md.parent)):
        assert "## int8 sensitivity" in text and "### Error growth" in text
        assert f"| 1 | `{ranking[0]['layer']}` |" in text
        assert "![int8 error growth](sensitivity.png)" in text
        assert (folder / "sensitivity.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("kind", ["blob", "weight"])
def test_a_corrupted_scale_is_named_first(tiny_spec, tiny_explained, tmp_path, kind):
    """The check can fail: the layer that int8 hurt least gets a wrong scale in the table (--table), and
    --explain must name it first. A bottom-blob scale x20 clips its input; weight scales x20 saturate
    its weights at +-127."""
    run, _, sens, _ = tiny_explained
    victim = sens["ranking"][-1]["layer"]
    table = read_table(run / "model.table")
    scales = table.blob_scales if kind == "blob" else table.weight_scales
    scales[victim] = scales[victim] * 20
    write_table(tmp_path / "bad.table", table)
    out = tmp_path / "out"
    result = quantize(str(tiny_spec), "--table", str(tmp_path / "bad.table"), "--explain", "--out", str(out))
    assert result.exit_code in (0, 1), result.output  # the whole int8 model may fail parity too
    bad = json.loads((out / "sensitivity.json").read_text())
    assert bad["ranking"][0]["layer"] == victim
    assert bad["ranking"][0]["cosine"] < min(r["cosine"] for r in sens["ranking"])
    assert bad["ranking"][0]["cosine"] < bad["ranking"][1]["cosine"]


def test_auto_mixed_keeps_the_most_sensitive_layers_fp32_until_the_budget_is_met(tiny_spec, tmp_path):
    budget = "top1=1.0,cosine=0.999999"  # all-int8 tiny net: 0.99999; its fc alone int8: 0.99999 too
    result = quantize(str(tiny_spec), "--auto-mixed", budget, "--out", str(tmp_path))
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "report.json").read_text())
    sens = json.loads((tmp_path / "sensitivity.json").read_text())
    kept = report["artifacts"]["int8_kept_fp32"]
    assert kept and kept == [k["layer"] for k in sens["auto_mixed"]["kept_fp32"]]
    order = [r["layer"] for r in sens["ranking"]]
    assert kept == order[: len(kept)]  # the most sensitive, in ranking order
    tried = sens["auto_mixed"]["tried"]
    assert tried[-1]["kept_fp32"] == len(kept) and tried[-1]["failures"] == []
    assert all(t["failures"] for t in tried[1:-1])  # every shorter prefix missed the budget
    assert sens["auto_mixed"]["metrics"]["cosine"] >= 0.999999
    assert set(report["artifacts"]["int8_layers"]) == set(order) - set(kept)
    # the files: kept layers fp32 in the .param, commented out in the table (ncnn2table's `#`)
    layers = {x.name: x for x in read_param(tmp_path / "model.int8.param").layers}
    assert all(not layers[k].get(8, 0) for k in kept)
    assert all(layers[n].get(8, 0) for n in report["artifacts"]["int8_layers"])
    table = read_table(tmp_path / "model.table")
    assert table.fp32_layers == set(kept)
    text = (tmp_path / "model.table").read_text()
    assert all(f"#{k} " in text and f"#{k}_param_0 " in text for k in kept)
    # the report judges the mixed model, and it passes
    assert report["passed"] and report["task"]["ncnn-cpu"]["top1_agreement"] == 1.0
    assert min(c["cosine"] for c in report["comparisons"]) >= 0.999999
    assert "auto-mixed" in result.output and kept[0] in result.output


def test_auto_mixed_with_an_impossible_budget_exits_1(tiny_spec, tmp_path):
    result = quantize(str(tiny_spec), "--auto-mixed", "abs=0", "--out", str(tmp_path))
    assert result.exit_code == 1, result.output
    line = one_error_line(result.output)
    assert "not met even with every layer fp32" in line and "max_abs" in line
    assert not (tmp_path / SCRATCH).exists()


def test_explain_with_every_layer_kept_fp32_exits_2(tiny_spec, tiny_explained, tmp_path):
    _, _, sens, _ = tiny_explained
    every = ",".join(r["layer"] for r in sens["ranking"])
    result = quantize(str(tiny_spec), "--explain", "--keep-fp32", every, "--out", str(tmp_path))
    assert result.exit_code == 2, result.output
    assert "no layer of the model is int8" in one_error_line(result.output)


@pytest.mark.parametrize("budget", ["cosine", "cosine=2", "top1=x", "speed=1", ""])
def test_auto_mixed_with_a_malformed_budget_exits_2_before_any_work(tmp_path, budget):
    result = quantize("resnet18", "--auto-mixed", budget, "--out", str(tmp_path / "o"))
    assert result.exit_code == 2, result.output
    assert "--auto-mixed" in one_error_line(result.output)
    assert not (tmp_path / "o").exists()


def test_budget_failures_show_a_cosine_with_the_digits_that_separate_it_from_the_limit():
    budget = parse_budget("cosine=0.999,top1=1", flag="--auto-mixed")
    assert budget.failures({"cosine": 0.998992, "top1_agreement": 0.75}) == [
        "top1_agreement 0.75 < 1",
        "cosine 0.99899 < 0.999",
    ]
    assert budget.failures({"cosine": 0.9999999999999989, "top1_agreement": 1.0}) == []
    assert parse_budget("cos=1").failures({"cosine": 0.9999999999999989}) == ["cosine 0.9999999999999989 < 1"]


def test_rank_puts_the_worst_cosine_first_and_nan_before_everything():
    def row(name, cos, peak):
        return LayerSensitivity(name, "Convolution", 0, {"cosine": cos, "peak_rel": peak})

    rows = [row("a", 0.9999, 0.01), row("b", 0.99, 0.05), row("c", "nan", "nan"), row("d", 0.9999, 0.02)]
    assert [r.layer for r in rank(rows)] == ["c", "b", "d", "a"]
    assert math.isnan(float(rank(rows)[0].metrics["cosine"]))


@pytest.mark.slow
def test_resnet18_explain_and_auto_mixed(tmp_path):
    result = quantize(
        "resnet18", "--explain", "--auto-mixed", "top1=1.0,cosine=0.9995", "--out", str(tmp_path)
    )
    assert result.exit_code == 0, result.output
    sens = json.loads((tmp_path / "sensitivity.json").read_text())
    report = json.loads((tmp_path / "report.json").read_text())
    assert len(sens["ranking"]) == 21 and len({r["layer"] for r in sens["ranking"]}) == 21
    kept = report["artifacts"]["int8_kept_fp32"]
    assert kept and len(report["artifacts"]["int8_layers"]) == 21 - len(kept)
    assert report["passed"]
    assert min(c["cosine"] for c in report["comparisons"]) >= 0.9995
    top = sens["ranking"][:3]
    print(
        "resnet18 --explain in",
        sens["seconds"],
        "s; top 3:",
        [(r["layer"], r["cosine"], r["peak_rel"]) for r in top],
    )
    print("auto-mixed kept", kept, "metrics", sens["auto_mixed"]["metrics"])
    assert np.isfinite([r["cosine"] for r in sens["ranking"]]).all()


def test_a_later_run_into_the_folder_removes_the_sensitivity_files(tiny_spec, tmp_path):
    assert quantize(str(tiny_spec), "--explain", "--out", str(tmp_path)).exit_code == 0
    assert (tmp_path / "sensitivity.json").is_file() and (tmp_path / "sensitivity.png").is_file()
    result = quantize(str(tiny_spec), "--out", str(tmp_path))
    assert result.exit_code == 0, result.output
    assert not (tmp_path / "sensitivity.json").exists() and not (tmp_path / "sensitivity.png").exists()
    assert "int8_sensitivity" not in json.loads((tmp_path / "report.json").read_text())["artifacts"]
