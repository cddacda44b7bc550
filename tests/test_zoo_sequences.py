"""Non-photo inputs ([inputs]: a seeded generator or an .npy file) and the zoo's non-photo families
(lenet, gru, lstm, forecaster, eegnet): each passes on every backend at each declared shape, and each has a
"deployment bug" (gates swapped in a recurrent layer, corrupted conv weights) that parity catches."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from deploytool.cli import app
from deploytool.errors import SpecError
from deploytool.inputs import declared_inputs, input_source, inputs_for
from deploytool.spec_toml import load_spec, spec_from_dict

REPO = Path(__file__).resolve().parent.parent
FAMILIES = ("lenet", "gru", "lstm", "forecaster", "eegnet")
cli = CliRunner()


def _spec(inputs: dict | None, shape=(1, 16, 4), dynamic=(), task="raw", source="/tmp/s.toml", **extra):
    data = {"name": "m", "factory": "pkg.mod:f", "task": task, "input": {"shape": list(shape), **extra}}
    if dynamic:
        data["input"]["dynamic_shapes"] = [list(d) for d in dynamic]
    if inputs is not None:
        data["inputs"] = inputs
    return spec_from_dict(data, source)


# --- [inputs] in a spec ---------------------------------------------------------------------------------


def test_generator_inputs_at_every_shape_with_labels():
    spec = _spec({"source": "generator", "kind": "normal", "seed": 3, "count": 2}, dynamic=[(1, 40, 4)])
    items = declared_inputs(spec)
    assert [i.label for i in items] == [
        "normal(seed=3)#0", "normal(seed=3)#1", "normal(seed=3)#0@40x4", "normal(seed=3)#1@40x4",
    ]  # fmt: skip
    assert [i.tensor.shape for i in items] == [(1, 16, 4)] * 2 + [(1, 40, 4)] * 2
    assert all(i.tensor.dtype == np.float32 for i in items)
    assert [i.at_spec_shape for i in items] == [True, True, False, False]
    assert not np.array_equal(items[0].tensor, items[1].tensor)
    # seeded: the same seed gives the same inputs, another seed others; dynamic=False: the spec shape only
    again = declared_inputs(spec, dynamic=False)
    assert len(again) == 2 and np.array_equal(again[1].tensor, items[1].tensor)
    other = declared_inputs(_spec({"source": "generator", "seed": 4}))
    assert not np.array_equal(other[0].tensor, items[0].tensor)


def test_generator_kinds_differ_in_kind():
    """uniform stays in [-1, 1); sine is smooth along its axis (lag-1 autocorrelation near 1) and not along
    the others, normal is smooth along none."""

    def lag1(x: np.ndarray, axis: int) -> float:
        a = np.moveaxis(x, axis, -1)
        a = a - a.mean(-1, keepdims=True)
        return float((a[..., 1:] * a[..., :-1]).sum() / (a * a).sum())

    shape = (1, 256, 6)
    sine = inputs_for(_spec({"source": "generator", "kind": "sine", "axis": 1}, shape), [])[0].tensor
    normal = inputs_for(_spec({"source": "generator", "kind": "normal"}, shape), [])[0].tensor
    uniform = inputs_for(_spec({"source": "generator", "kind": "uniform", "count": 1}, shape), [])[0].tensor
    assert lag1(sine, 1) > 0.8 and abs(lag1(sine, 2)) < 0.5 and abs(lag1(normal, 1)) < 0.2
    assert uniform.min() >= -1 and uniform.max() < 1 and uniform.std() > 0.5
    last = _spec({"source": "generator", "kind": "sine"}, (1, 1, 128))  # axis -1 by default
    assert lag1(declared_inputs(last)[0].tensor, 2) > 0.5


def test_npy_inputs_rows_and_report_source(tmp_path):
    data = np.arange(3 * 2 * 5, dtype=np.float64).reshape(3, 2, 5)
    np.save(tmp_path / "x.npy", data)
    spec = _spec({"source": "npy", "path": "x.npy", "count": 2}, (1, 2, 5), source=str(tmp_path / "s.toml"))
    items = inputs_for(spec, [])
    assert [i.label for i in items] == ["x.npy#0", "x.npy#1"]
    assert (
        np.array_equal(items[1].tensor, data[1:2].astype(np.float32)) and items[1].tensor.dtype == np.float32
    )
    source = input_source(spec, ())
    assert source["source"] == "npy" and source["count"] == 2 and source["path"].endswith("x.npy")
    assert len(source["sha256"]) == 64
    whole = _spec({"source": "npy", "path": "x.npy"}, (1, 2, 5), source=str(tmp_path / "s.toml"))
    assert len(inputs_for(whole, [])) == 3 and input_source(whole, ())["count"] == 3


def test_report_source_without_inputs_table():
    spec = _spec(None)
    assert input_source(spec, ()) == {"source": "random", "kind": "normal", "seed": 0, "count": 1}
    assert [i.label for i in inputs_for(spec, [])] == ["random(seed=0)"]  # today's behaviour, unchanged
    gen = _spec({"source": "generator", "kind": "sine", "axis": 1, "count": 2})
    assert input_source(gen, ()) == {"source": "generator", "kind": "sine", "seed": 0, "count": 2, "axis": 1}


@pytest.mark.parametrize(
    ("inputs", "needle"),
    [
        ({"kind": "normal"}, "missing key 'source'"),
        ({"source": "random"}, "'random' is not one of generator, npy"),
        ({"source": "generator", "kind": "walk"}, "'walk' is not one of normal, uniform, sine"),
        ({"source": "generator", "count": 0}, "inputs.count must be a whole number in [1, 256]"),
        ({"source": "generator", "count": True}, "inputs.count"),
        ({"source": "generator", "seed": -1}, "inputs.seed"),
        ({"source": "generator", "seed": 1.5}, "inputs.seed"),
        ({"source": "generator", "kind": "normal", "axis": 1}, "kind 'normal' takes none"),
        ({"source": "generator", "kind": "sine", "axis": 0}, "batch axis"),
        ({"source": "generator", "kind": "sine", "axis": 3}, "inputs.axis"),
        ({"source": "generator", "path": "x.npy"}, "unknown key(s) path"),
        ({"source": "npy", "path": "x.npy", "seed": 1}, "unknown key(s) seed"),
        ({"source": "npy"}, "inputs.path must be a non-empty string"),
        ({"source": "npy", "path": "x.csv"}, "must name an .npy file"),
        ({"source": "npy", "path": "nope.npy"}, "does not exist"),
        ({"source": "generator", "colour": 1}, "unknown key(s) colour"),
    ],
)
def test_bad_inputs_table_is_a_spec_error(inputs, needle):
    with pytest.raises(SpecError) as err:
        _spec(inputs)
    assert needle in str(err.value)


def test_inputs_table_needs_a_raw_model_and_npy_one_shape(tmp_path):
    with pytest.raises(SpecError, match="takes photos"):
        _spec({"source": "generator"}, (1, 3, 8, 8), task="classify")
    np.save(tmp_path / "x.npy", np.zeros((2, 16, 4), np.float32))
    with pytest.raises(SpecError, match="dynamic_shapes cannot be checked"):
        _spec({"source": "npy", "path": "x.npy"}, dynamic=[(1, 32, 4)], source=str(tmp_path / "s.toml"))
    with pytest.raises(SpecError, match="not photos"):
        inputs_for(_spec({"source": "generator"}), [REPO / "images"])


@pytest.mark.parametrize(
    ("array", "count", "needle"),
    [
        (np.zeros((2, 16, 5), np.float32), None, "needs (N, 16, 4)"),
        (np.zeros((0, 16, 4), np.float32), None, "N >= 1"),
        (np.array([["a"]]), None, "numeric array"),
        (np.full((2, 16, 4), np.nan, np.float32), None, "NaN"),
        (np.zeros((2, 16, 4), np.float32), 3, "only 2 rows"),
    ],
)
def test_bad_npy_contents_are_spec_errors(tmp_path, array, count, needle):
    np.save(tmp_path / "x.npy", array)
    table = {"source": "npy", "path": "x.npy", **({"count": count} if count else {})}
    spec = _spec(table, source=str(tmp_path / "s.toml"))
    with pytest.raises(SpecError) as err:
        inputs_for(spec, [])
    assert needle in str(err.value)


def test_not_an_npy_file_is_a_spec_error(tmp_path):
    (tmp_path / "x.npy").write_bytes(b"\x93NUMPY broken")
    with pytest.raises(SpecError, match="not a readable .npy"):
        inputs_for(_spec({"source": "npy", "path": "x.npy"}, source=str(tmp_path / "s.toml")), [])


def test_bundled_specs_declare_their_inputs():
    """Every family's spec loads; the recurrent ones check two or more sequence lengths, the CNNs one
    fixed shape; eegnet reads the committed .npy, which make_eeg_features.py writes again identically."""
    specs = {name: load_spec(name) for name in FAMILIES}
    assert all(s.inputs is not None for s in specs.values())
    for name in ("gru", "lstm", "forecaster"):
        assert len(specs[name].dynamic_shapes) >= 1 and specs[name].inputs.source == "generator"
    assert specs["eegnet"].inputs.source == "npy" and specs["eegnet"].input_shape == (1, 5, 9, 9)
    assert [i.label for i in inputs_for(specs["eegnet"], [])][-1] == "eeg_de_features.npy#7"


def test_eeg_features_script_rebuilds_the_committed_file(tmp_path, monkeypatch):
    import importlib.util

    script = REPO / "models" / "data" / "make_eeg_features.py"
    committed = np.load(script.with_name("eeg_de_features.npy"))
    spec = importlib.util.spec_from_file_location("make_eeg_features", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    copy = tmp_path / "make_eeg_features.py"
    copy.write_text(script.read_text())
    monkeypatch.setattr(module, "__file__", str(copy))
    module.main.__globals__["__file__"] = str(copy)
    module.main()
    assert np.array_equal(np.load(tmp_path / "eeg_de_features.npy"), committed)
    assert (committed[:, :, 0, 0] == 0).all() and np.isclose(committed[0, 0][module.cap_mask()].std(), 1)


def test_seeded_families_are_deterministic_and_leave_torch_rng_alone():
    from deploytool.zoo import sequence

    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a, b = sequence.gru(seed=0), sequence.gru(seed=0)
    assert torch.equal(torch.rand(1), before)  # the factory did not consume the global generator
    assert all(
        torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    )
    c = sequence.gru(seed=1)
    assert not torch.equal(a.state_dict()["gru.weight_ih_l0"], c.state_dict()["gru.weight_ih_l0"])


# --- the families end to end ----------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.vulkan
@pytest.mark.parametrize("name", FAMILIES)
def test_family_passes_on_every_backend_at_every_shape(name, tmp_path):
    """`deploytool run NAME`: torch, onnxruntime, ncnn-cpu and ncnn-vulkan each checked on every declared
    input, at the input shape and each dynamic shape; the report says where the inputs came from."""
    spec = load_spec(name)
    result = cli.invoke(app, ["run", name, "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["input"]["source"] == input_source(spec, ())
    labels = [i.label for i in inputs_for(spec, [])]
    sizes = 1 + len(spec.dynamic_shapes)
    assert len(labels) == sizes * (spec.inputs.count or 8) and len(set(labels)) == len(labels)
    for backend in ("onnxruntime", "ncnn-cpu", "ncnn-vulkan"):
        checked = [c["input"] for c in report["comparisons"] if c["backend"] == backend and c["passed"]]
        assert sorted(checked) == sorted(labels), backend


def _swap_gates(state: dict, prefix: str, gates: int, a: int, b: int) -> None:
    """Exchange gate blocks a and b (rows of each of the gates' equal blocks) in one recurrent layer's
    input and hidden weights and biases: PyTorch stacks them [r|z|n] (GRU) or [i|f|g|o] (LSTM)."""
    for kind in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
        key = prefix.format(kind)
        blocks = list(state[key].chunk(gates))
        blocks[a], blocks[b] = blocks[b], blocks[a]
        state[key] = torch.cat(blocks)


def _negate_first_filter(state: dict, key: str) -> None:
    state[key] = state[key].clone()
    state[key][0] = -state[key][0]


# A "deployment bug" per family: the converted model comes from weights with this mistake.
BUGS = {
    "gru": lambda s: _swap_gates(s, "gru.{}_l0", 3, 0, 1),  # reset <-> update gate, first layer
    "lstm": lambda s: _swap_gates(s, "lstm.{}_l1_reverse", 4, 1, 3),  # forget <-> output, backward, layer 2
    "forecaster": lambda s: _swap_gates(s, "lstm.{}_l0", 4, 0, 1),  # input <-> forget gate
    "lenet": lambda s: _negate_first_filter(s, "features.0.weight"),
    "eegnet": lambda s: _negate_first_filter(s, "features.0.weight"),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", FAMILIES)
def test_deployment_bug_fails_parity(name, tmp_path):
    """Convert the model from weights with the family's bug (the run itself passes: ncnn matches the
    bugged torch model, so the conversion carries the gates through), then check those ncnn files against
    the correct model: exit 1, and on every failing input the error is beyond every tolerance the spec
    sets, Vulkan's and fp16's included."""
    from deploytool.model import build_model

    spec = load_spec(name)
    state = build_model(spec).state_dict()
    BUGS[name](state)
    torch.save(state, tmp_path / "bug.pt")
    out = tmp_path / "run"
    args = [
        "run",
        name,
        "--weights",
        str(tmp_path / "bug.pt"),
        "--backends",
        "torch,ncnn-cpu",
        "--out",
        str(out),
    ]
    result = cli.invoke(app, args)
    assert result.exit_code == 0, result.output
    report_path = tmp_path / "parity.json"
    args = ["parity", str(out), "--model", name, "--backends", "ncnn-cpu", "--report", str(report_path)]
    result = cli.invoke(app, args)
    assert result.exit_code == 1, result.output
    comparisons = json.loads(report_path.read_text())["comparisons"]
    failed = [c for c in comparisons if not c["passed"]]
    assert len(failed) == len(comparisons) == len(inputs_for(spec, []))
    loosest = max(t.atol for key, t in spec.tolerances.items() if key in spec_tolerance_keys(spec))
    assert min(c["max_abs"] for c in failed) > loosest, (loosest, [c["max_abs"] for c in failed])


def spec_tolerance_keys(spec) -> set[str]:
    """The tolerance keys the spec file itself sets (not deploytool's defaults)."""
    import tomllib

    return set(tomllib.loads(Path(spec.source).read_text())["tolerance"])


def test_gemm_constant_n_is_not_an_int8_layer():
    """pnnx writes the forecaster's attention score as a Gemm with 8=1 (constantN); before this was read as
    int8_scale_term, `parity` judged the whole fp32 model at the int8 tolerance and missed a swapped gate."""
    from deploytool.ncnn_param import parse_param_text

    text = (
        "7767517\n3 3\nInput in0 0 1 in0\nGemm gemm_0 1 1 in0 1 10=4 2=0 3=1 4=0 5=1 6=1 7=0 8=1 9=32\n"
        "InnerProduct fc 1 1 1 out0 0=8 1=1 2=256 8=2\n"
    )
    assert parse_param_text(text).int8_layers == ["fc"]
