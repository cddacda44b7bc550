"""bench --tune: the option search, the budget's veto, meta.json's ncnn_options and that every runner
(ncnn's Python binding, the C++ runner, the bundle's run_ncnn.py) applies what meta.json says."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from deploytool.bench.records import BenchRow
from deploytool.bench.tune import (
    CANDIDATES,
    DEFAULTS,
    Candidate,
    Trial,
    TuneResult,
    candidates_for,
    choose,
    table_rows,
    tune_markdown,
)
from deploytool.errors import SpecError
from deploytool.judge import parse_budget
from deploytool.ncnn_param import parse_param_text
from deploytool.runfolder import OPTION_TYPES, check_ncnn_options, ncnn_options_of

REPO = Path(__file__).resolve().parent.parent
IMAGES = REPO / "images"
# An option that changes the numbers on purpose: bf16 storage (measured on this model: max_abs 8e-4
# against fp32's 5e-8, outputs of magnitude 0.26), so a runner that ignored it would be caught.
BF16 = {"use_bf16_storage": True, "use_bf16_packed": True}
TUNED = {**BF16, "use_winograd_convolution": False, "openmp_blocktime": 0}

TINY_SOURCE = """
import torch


def tiny():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(16, 16, 3, padding=1),
        torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(16, 10),
    ).eval()
"""
TINY_SPEC = """
name = "tiny"
task = "classify"
factory = "tune_tiny:tiny"

[input]
name = "input"
shape = [1, 3, 32, 32]

[output]
names = ["logits"]

[preprocess]
color = "rgb"
resize = "resize"
scale = 0.00392156862745098
mean = [0.5, 0.5, 0.5]
std = [0.25, 0.25, 0.25]

[task_args]
top_k = 3
"""


# ---------------------------------------------------------------- the ncnn_options contract


def test_check_ncnn_options_accepts_every_known_field():
    good = {k: (0 if t is int else False) for k, t in OPTION_TYPES.items()}
    assert check_ncnn_options(good, "m.json") == good
    assert ncnn_options_of({"schema": 1}) == {}  # no ncnn_options: ncnn's defaults, as before
    assert ncnn_options_of({"ncnn_options": {"lightmode": False}}) == {"lightmode": False}


@pytest.mark.parametrize(
    "options, match",
    [
        ({"use_winograd": False}, "unknown ncnn option 'use_winograd'"),
        ({"num_threads": 4}, "unknown ncnn option 'num_threads'"),
        ({"lightmode": 1}, "lightmode must be true or false, got 1"),
        ({"openmp_blocktime": True}, "openmp_blocktime must be a whole number"),
        ({"openmp_blocktime": -1}, "openmp_blocktime must be a whole number"),
        ({"openmp_blocktime": 2.5}, "openmp_blocktime must be a whole number"),
        (["lightmode"], "must be an object of ncnn.Option fields"),
    ],
)
def test_check_ncnn_options_refuses(options, match):
    with pytest.raises(SpecError, match=match):
        check_ncnn_options(options, "m.json")


def test_every_option_is_an_ncnn_option_field():
    """The keys are real fields of the installed ncnn.Option, of the declared type (what setattr needs)."""
    import ncnn

    opt = ncnn.Option()
    for key, kind in OPTION_TYPES.items():
        assert type(getattr(opt, key)) is kind, key


def test_the_cpp_and_python_bundle_runners_know_the_same_keys():
    """run_ncnn.py and main.cpp are standalone (they go onto the board), so they list the keys
    themselves: the lists must be the deploytool's."""
    sys.path.insert(0, str(REPO / "cmake"))
    try:
        import run_ncnn
    finally:
        sys.path.pop(0)
    assert set(run_ncnn.BOOL_OPTIONS) | set(run_ncnn.INT_OPTIONS) == set(OPTION_TYPES)
    source = (REPO / "cmake" / "src" / "main.cpp").read_text()
    for key in OPTION_TYPES:
        assert f'"{key}"' in source, key


def test_meta_for_and_write_bundle_check_ncnn_options(tmp_path):
    from deploytool.bundle.write import write_bundle
    from deploytool.runfolder import meta_for
    from deploytool.spec_toml import load_spec

    spec_file = tmp_path / "tiny.toml"
    spec_file.write_text(TINY_SPEC)
    param = tmp_path / "model.ncnn.param"
    param.write_text("7767517\n2 2\nInput in0 0 1 in0\nReLU relu 1 1 in0 out0\n")
    spec = load_spec(str(spec_file))
    assert "ncnn_options" not in meta_for(spec, param)
    assert meta_for(spec, param, ncnn_options={"lightmode": False})["ncnn_options"] == {"lightmode": False}
    with pytest.raises(SpecError, match="unknown ncnn option 'fast'"):
        meta_for(spec, param, ncnn_options={"fast": True})
    meta = dict(meta_for(spec, param), ncnn_options={"use_packing_layout": "no"})
    (tmp_path / "model.ncnn.bin").write_bytes(b"")
    with pytest.raises(SpecError, match="use_packing_layout must be true or false"):
        write_bundle(tmp_path / "bundle", param, tmp_path / "model.ncnn.bin", meta)
    assert not (tmp_path / "bundle").exists()


# ---------------------------------------------------------------- the search and the budget


def _row(name: str, median: float, peak_rel: float, top1: float = 1.0) -> BenchRow:
    stats = {"median": median, "min": median * 0.98, "p90": median * 1.02, "spread_note": None}
    parity = {"peak_rel": peak_rel, "max_abs": peak_rel * 10, "top1_agreement": top1}
    return BenchRow("ncnn-cpu", f"fp32+{name}", 2, stats, parity, attempts=[{"median": median}])


def _trials(budget: str, *specs) -> list[Trial]:
    b = parse_budget(budget)
    out = []
    for cand, median, peak_rel in specs:
        row = _row(cand.name, median, peak_rel)
        out.append(Trial(cand, row, b.failures(row.parity)))
    return out


FAST_BUT_WRONG = Candidate("bf16-storage", BF16)
NO_WINO = CANDIDATES[1]


def test_choose_rejects_a_faster_set_that_breaks_the_budget():
    trials = _trials(
        "top1=1,rel=1e-4", (DEFAULTS, 13.0, 1e-6), (NO_WINO, 12.0, 2e-6), (FAST_BUT_WRONG, 10.0, 6e-3)
    )
    chosen, reason = choose(trials)
    assert trials[2].failures == ["peak_rel 0.006 > 0.0001"]
    assert chosen is trials[1]
    assert "no-winograd (12.00 ms) is the fastest" in reason and "outside the budget: bf16-storage" in reason
    # the same trials with a budget that lets bf16 through: it wins
    loose = _trials(
        "top1=1,rel=1e-2", (DEFAULTS, 13.0, 1e-6), (NO_WINO, 12.0, 2e-6), (FAST_BUT_WRONG, 10.0, 6e-3)
    )
    assert choose(loose)[0].candidate == FAST_BUT_WRONG


def test_choose_keeps_the_defaults_for_a_gain_within_noise():
    trials = _trials("rel=1e-2", (DEFAULTS, 13.0, 1e-6), (NO_WINO, 12.9, 1e-6))
    chosen, reason = choose(trials)
    assert chosen.candidate == DEFAULTS and "under the 3%" in reason
    assert choose(trials, min_gain=0.0)[0].candidate == NO_WINO


def test_choose_does_not_trust_a_wide_spread():
    trials = _trials("rel=1e-2", (DEFAULTS, 13.0, 1e-6), (NO_WINO, 10.0, 1e-6))
    trials[0].row.latency_ms["spread_note"] = "wide spread: ..."
    chosen, reason = choose(trials)
    assert chosen.candidate == DEFAULTS and "cannot be told apart" in reason and "defaults" in reason


@pytest.mark.parametrize(
    "defaults, other, kept",
    [([40.0, 10.0], [9.0, 9.5], "no-winograd"), ([40.0, 8.0], [9.0, 9.5], "defaults"),
     ([9.0, 9.5], [13.0, 7.0], "no-winograd")],
)  # fmt: skip
def test_tune_base_times_the_defaults_and_the_best_other_set_again(tmp_path, defaults, other, kept):
    """A worker slowed down as a whole (a first median of 40 ms for the defaults, or of 13 ms for the
    other set) does not decide: both are timed again and each keeps its faster attempt; what wins is
    written to meta.json and nothing else."""
    from deploytool.bench.tune import tune_base
    from deploytool.bench.variants import get_variant
    from deploytool.registry import Artifacts

    param = tmp_path / "model.ncnn.param"
    param.write_text(
        "7767517\n2 2\nInput in0 0 1 in0\nConvolution c 1 1 in0 out0 0=8 1=3 11=3 3=1 13=1 4=1 5=1 6=216\n"
    )
    (tmp_path / "meta.json").write_text(json.dumps({"schema": 1, "param": "model.ncnn.param"}))
    art = Artifacts(ncnn_param=param, ncnn_bin=tmp_path / "model.ncnn.bin", meta={"schema": 1})
    medians = {"fp32+defaults": list(defaults), "fp32+no-winograd": list(other), "fp32+bf16-storage": [5.0]}
    calls = []

    def measure(variant, tuned):
        calls.append((variant.name, tuned.meta["ncnn_options"]))
        name = variant.name.removesuffix("-2")
        return _row(name.split("+")[1], medians[name].pop(0), 6e-3 if "bf16" in name else 1e-6)

    budget = parse_budget("top1=1,rel=1e-4")
    result = tune_base(get_variant("fp32"), art, budget, 2, measure, (DEFAULTS, NO_WINO, FAST_BUT_WRONG))
    assert calls == [
        ("fp32+defaults", {}), ("fp32+no-winograd", NO_WINO.options), ("fp32+bf16-storage", BF16),
        ("fp32+defaults-2", {}), ("fp32+no-winograd-2", NO_WINO.options),
    ]  # fmt: skip
    assert result.defaults.row.median == min(defaults) and result.defaults.row.variant == "fp32+defaults"
    assert [a["median"] for a in result.defaults.row.attempts] == defaults  # both attempts are kept
    assert result.chosen.candidate.name == kept
    written = json.loads((tmp_path / "meta.json").read_text())
    assert written["ncnn_options"] == result.chosen.candidate.options
    assert written["param"] == "model.ncnn.param" and written["bin"] == "model.ncnn.bin"


def test_choose_none_fits():
    trials = _trials("rel=1e-9", (DEFAULTS, 13.0, 1e-6), (NO_WINO, 12.0, 2e-6))
    chosen, reason = choose(trials)
    assert chosen is None and reason.startswith("no option set fits the budget (ncnn's defaults: peak_rel")
    assert "the fastest set, no-winograd, 12.00 ms against 13.00 ms" in reason


def test_tune_table_marks_the_pick_and_the_gain():
    trials = _trials(
        "top1=1,rel=1e-4", (DEFAULTS, 10.0, 1e-6), (NO_WINO, 8.0, 2e-6), (FAST_BUT_WRONG, 5.0, 6e-3)
    )
    chosen, reason = choose(trials)
    result = TuneResult("fp32", 2, "top1_agreement=1,peak_rel=0.0001", trials, chosen, reason)
    assert result.gain == pytest.approx(0.2)
    rows = table_rows([result])
    assert [r[1] for r in rows] == ["defaults", "no-winograd *", "bf16-storage"]
    assert [r[4] for r in rows] == ["+0.0%", "-20.0%", "-50.0%"]
    assert rows[2][-1] == "peak_rel 0.006 > 0.0001" and rows[1][-1] == "fits"
    assert "(gain +20.0% over ncnn's defaults)" in tune_markdown([result])
    doc = result.to_dict()
    assert doc["chosen"] == "no-winograd" and doc["ncnn_options"] == {"use_winograd_convolution": False}
    assert [t["fits"] for t in doc["trials"]] == [True, True, False]
    assert [t["option_set"] for t in doc["trials"]] == ["defaults", "no-winograd", "bf16-storage"]
    assert doc["trials"][2]["name"] == "ncnn-cpu/fp32+bf16-storage" and doc["gain"] == 0.2


def test_candidates_depend_on_the_graph():
    head = "7767517\n3 3\nInput in0 0 1 in0\n"
    conv3 = parse_param_text(
        head + "Convolution c 1 1 in0 a 0=8 1=3 11=3 3=1 13=1 4=1 5=1 6=216\nReLU r 1 1 a b\n"
    )
    conv3s2 = parse_param_text(head + "Convolution c 1 1 in0 a 0=8 1=3 3=2 4=1 5=1 6=216\nReLU r 1 1 a b\n")
    relu = parse_param_text(head + "ReLU r 1 1 in0 a\nReLU s 1 1 a b\n")
    every = [c.name for c in candidates_for(conv3)]
    assert every == [c.name for c in CANDIDATES] and len(every) == 12
    no_wino = [c.name for c in candidates_for(conv3s2)]
    assert "no-sgemm" in no_wino and not any("winograd" in n for n in no_wino)
    assert [c.name for c in candidates_for(relu)] == [
        "defaults", "no-packing", "no-lightmode", "blocktime-0", "blocktime-200",
    ]  # fmt: skip


def test_a_candidate_with_an_unknown_option_is_a_bug_caught_at_once():
    with pytest.raises(SpecError, match="unknown ncnn option"):
        Candidate("typo", {"use_winogard_convolution": False})


def test_cli_tune_needs_ncnn_cpu(tmp_path):
    from typer.testing import CliRunner

    from deploytool.cli import app

    out = CliRunner().invoke(app, ["bench", "resnet18", "--tune", "--backends", "onnxruntime", "--out",
                                   str(tmp_path)])  # fmt: skip
    assert out.exit_code == 2, out.output
    assert "--tune searches the runtime options of ncnn-cpu" in out.output
    assert not (tmp_path / "bench.json").exists()


# ---------------------------------------------------------------- real models, real runners


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny classifier as a spec (its factory importable here and in worker processes), converted
    with pnnx; returns (spec, artifacts with meta.json, folder)."""
    from deploytool.options import RunOptions
    from deploytool.progress import StageTimer
    from deploytool.spec_toml import load_spec
    from deploytool.stages import build_artifacts

    d = tmp_path_factory.mktemp("tune")
    (d / "tune_tiny.py").write_text(TINY_SOURCE)
    (d / "tiny.toml").write_text(TINY_SPEC)
    mp = pytest.MonkeyPatch()
    mp.syspath_prepend(str(d))
    mp.setenv("PYTHONPATH", os.pathsep.join(p for p in (str(d), os.environ.get("PYTHONPATH")) if p))
    spec = load_spec(str(d / "tiny.toml"))
    out = d / "run"
    art = build_artifacts(spec, RunOptions(out=out), np.zeros((1, 3, 32, 32), np.float32), out, StageTimer())
    yield spec, art, out
    mp.undo()
    sys.modules.pop("tune_tiny", None)


def _photos(spec):
    from deploytool.inputs import inputs_for

    return inputs_for(spec, sorted(IMAGES.glob("*.jpg"))[:2], dynamic=False)


@pytest.mark.slow
def test_tune_rejects_the_accuracy_breaking_set_and_records_the_pick(tiny):
    """Real workers, real judge: the bf16 set is faster-or-not but outside rel=1e-4 and so rejected;
    meta.json then holds exactly the chosen set, and parity's way in (meta.json beside the .param)
    gives the Python runner those options."""
    import torch

    from deploytool.bench.orchestrate import _bench_row
    from deploytool.bench.records import BenchOptions
    from deploytool.bench.tune import tune_base
    from deploytool.bench.variants import get_variant
    from deploytool.progress import StageTimer
    from deploytool.registry import RunnerConfig, create_runner

    spec, art, out = tiny
    items = _photos(spec)
    model = __import__("tune_tiny").tiny()
    with torch.no_grad():
        ref = [{"logits": model(torch.from_numpy(i.tensor)).numpy()} for i in items]
    opts = BenchOptions(out=out, runs=3, warmup=1)

    def measure(variant, tuned):
        return _bench_row(spec, opts, "ncnn-cpu", variant, tuned, items, 1, ref, StageTimer())[0]

    budget = parse_budget("top1=1,rel=1e-4")
    result = tune_base(get_variant("fp32"), art, budget, 1, measure, (DEFAULTS, NO_WINO, FAST_BUT_WRONG))

    by_name = {t.candidate.name: t for t in result.trials}
    assert set(by_name) == {"defaults", "no-winograd", "bf16-storage"}
    wrong = by_name["bf16-storage"]
    assert not wrong.fits and wrong.failures[0].startswith("peak_rel ")
    assert wrong.row.parity["peak_rel"] > 1e-4 > by_name["defaults"].row.parity["peak_rel"]
    assert result.chosen is not None and result.chosen.fits and result.chosen is not wrong
    assert (out / "logs" / "bench-ncnn-cpu-fp32+bf16-storage-t1.log").is_file()  # its own worker

    meta = json.loads((out / "meta.json").read_text())
    assert result.meta == out / "meta.json"
    assert meta["ncnn_options"] == result.chosen.candidate.options
    assert meta["param"] == "model.ncnn.param" and meta["task"] == "classify"

    # what parity does with a folder: meta.json beside the .param -> Artifacts.meta -> the runner
    forced = dict(meta, ncnn_options=TUNED)
    (out / "meta.json").write_text(json.dumps(forced))
    from deploytool.parity import locate

    located, _ = locate(out / "model.ncnn.param")
    with create_runner("ncnn-cpu", located, RunnerConfig(("input",), ("logits",), "fp32", 1)) as runner:
        runner.infer(items[0].feed)
        assert runner.extra() == {"ncnn_options": TUNED}


def test_parity_refuses_a_malformed_ncnn_options_with_exit_2(tmp_path):
    from typer.testing import CliRunner

    from deploytool.cli import app

    (tmp_path / "model.ncnn.param").write_text("7767517\n2 2\nInput in0 0 1 in0\nReLU relu 1 1 in0 out0\n")
    (tmp_path / "model.ncnn.bin").write_bytes(b"")
    (tmp_path / "meta.json").write_text(json.dumps({"schema": 1, "ncnn_options": {"use_turbo": True}}))
    out = CliRunner().invoke(app, ["parity", str(tmp_path / "model.ncnn.param"), "--input-shape", "1,3,4,4"])
    assert out.exit_code == 2, out.output
    lines = [line for line in out.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "unknown ncnn option 'use_turbo'" in lines[0], out.output
    assert "Traceback" not in out.output


# ---------------------------------------------------------------- the C++ runner and run_ncnn.py


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def _write_meta(folder: Path, art, options) -> Path:
    meta = dict(art.meta, ncnn_options=options)
    path = folder / "meta.json"
    path.write_text(json.dumps(meta))
    return path


@pytest.mark.cpp
@pytest.mark.slow
def test_cpp_python_and_bundle_runners_apply_the_same_options(tiny, tmp_path):
    """meta.json with an accuracy-changing set: the C++ runner and run_ncnn.py report the same options as
    ncnn's Python binding and give its numbers, not fp32's (so neither ignored them)."""
    from deploytool.backends.ncnn_cpp import NcnnCppRunner
    from deploytool.backends.ncnn_runner import NcnnRunner
    from deploytool.targets.build import build_runner

    spec, art, out = tiny
    x = _photos(spec)[0].tensor
    feed = {"in0": x}
    with NcnnRunner(art.ncnn_param, art.ncnn_bin, threads=1) as plain:
        fp32 = plain.infer(feed)["out0"]
    with NcnnRunner(art.ncnn_param, art.ncnn_bin, threads=1, options=TUNED) as py:
        tuned = py.infer(feed)["out0"]
        assert py.extra() == {"ncnn_options": TUNED}
    assert np.abs(tuned - fp32).max() > 1e-4  # the set changes the numbers (bf16 storage)

    meta = dict(art.meta, ncnn_options=TUNED)
    with NcnnCppRunner(art.ncnn_param, art.ncnn_bin, meta, threads=1) as cpp:
        got = cpp.infer({"input": x})["out0"]
        assert cpp.extra()["ncnn_options"] == TUNED
    np.testing.assert_allclose(got, tuned, atol=1e-6)

    folder = tmp_path / "board"
    folder.mkdir()
    for f in (art.ncnn_param, art.ncnn_bin):
        (folder / f.name).write_bytes(f.read_bytes())
    np.save(folder / "x.npy", x)
    path = _write_meta(folder, art, TUNED)
    ran = _run([sys.executable, str(REPO / "cmake" / "run_ncnn.py"), str(path), str(folder / "x.npy"),
                "--threads", "1", "--dump-raw", str(folder / "py")])  # fmt: skip
    assert ran.returncode == 0, ran.stderr
    assert json.loads(ran.stdout)["ncnn_options"] == TUNED
    np.testing.assert_allclose(np.load(folder / "py" / "x.out0.npy"), tuned, atol=1e-6)

    exe = build_runner()
    ran = _run([str(exe), str(path), str(folder / "x.npy"), "--threads", "1"])
    assert ran.returncode == 0, ran.stderr
    assert json.loads(ran.stdout)["ncnn_options"] == TUNED


@pytest.mark.cpp
@pytest.mark.parametrize(
    "options, match",
    [
        ({"use_turbo": True}, 'unknown ncnn option "use_turbo"'),
        ({"lightmode": "yes"}, "lightmode must be true or false"),
        ({"openmp_blocktime": -5}, "openmp_blocktime must be a whole number"),
        ([1, 2], '"ncnn_options" must be an object of'),
    ],
)
def test_bundle_runners_refuse_malformed_options_with_exit_2(tiny, tmp_path, options, match):
    from deploytool.targets.build import build_runner

    _, art, out = tiny
    meta = dict(art.meta, ncnn_options=options, param=str(art.ncnn_param), bin=str(art.ncnn_bin))
    path = tmp_path / "meta.json"
    path.write_text(json.dumps(meta))
    photo = sorted(IMAGES.glob("*.jpg"))[0]
    for cmd in ([str(build_runner())], [sys.executable, str(REPO / "cmake" / "run_ncnn.py")]):
        ran = _run([*cmd, str(path), str(photo)])
        assert ran.returncode == 2, ran.stderr
        lines = ran.stderr.strip().splitlines()
        assert len(lines) == 1 and match in lines[0], ran.stderr
        assert ran.stdout == ""
