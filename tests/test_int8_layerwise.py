"""Layer-wise checks of an int8 model: the float64 interpreter runs ncnn's int8 arithmetic (inputs
rounded half away from zero at the bottom scale, clamped to ±127, integer sums, dequantised per output
channel), each layer on ncnn's own inputs, so a wrong scale in the int8 .bin is named at its layer."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import convert_model

from deploytool.interpreter import NcnnInterpreter
from deploytool.layerwise import layerwise
from deploytool.ncnn_param import read_model
from deploytool.quantize.calibrate import calibrate
from deploytool.quantize.write import quantize_model


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.dw = torch.nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.pw = torch.nn.Conv2d(8, 16, 1)
        self.fc = torch.nn.Linear(16, 5)

    def forward(self, x):
        x = torch.clamp(self.dw(torch.relu(self.conv(x))), 0, 6)
        return self.fc(torch.relu(self.pw(x)).mean(dim=(2, 3)))


@pytest.fixture(scope="module")
def int8_files(tmp_path_factory):
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("i8lw")
    param, bin = convert_model(Net().eval(), torch.randn(1, 3, 24, 24), folder)
    rng = np.random.default_rng(0)
    feeds = [{"in0": rng.standard_normal((1, 3, 24, 24)).astype(np.float32)} for _ in range(4)]
    model = read_model(param, bin)
    table = calibrate(model, feeds, method="kl")
    layers = quantize_model(model, table, folder / "q.param", folder / "q.bin")
    return folder / "q.param", folder / "q.bin", layers, feeds[0]


def test_interpreter_runs_the_int8_arithmetic_ncnn_runs(int8_files):
    param, bin, layers, feed = int8_files
    assert len(layers) == 4
    rows, first = layerwise(param, bin, feed, precision="int8")
    assert {r.comparison for r in rows} == {"ncnn-cpu vs interpreter, per layer"}
    assert first == {"ncnn-cpu vs interpreter, per layer": None}
    assert max(r.peak_rel for r in rows if r.peak_rel is not None) < 2e-3


def test_a_corrupted_weight_scale_in_the_int8_bin_is_named_at_its_layer(int8_files, tmp_path):
    param, bin, layers, feed = int8_files
    target = layers[2]  # the pointwise convolution
    record = NcnnInterpreter(param, bin).weight_record(target, "weight_scales")
    data = bytearray(bin.read_bytes())
    scales = np.frombuffer(bytes(data[record.offset : record.offset + 4 * record.count]), "<f4").copy()
    scales[3] *= 1.5  # one output channel's weight scale
    data[record.offset : record.offset + 4 * record.count] = scales.astype("<f4").tobytes()
    bad = tmp_path / "bad.bin"
    bad.write_bytes(bytes(data))
    # the per-layer check, with ncnn running the corrupted file and the interpreter holding the
    # arithmetic of the good one (what a kernel that misreads one scale looks like): only that layer
    # fails, since every layer is fed ncnn's own inputs
    from deploytool.backends.ncnn_runner import NcnnRunner
    from deploytool.judge import LAYER_TOLERANCES
    from deploytool.layerwise import _layer_by_layer, compare_blobs

    with NcnnRunner(param, bad, precision="int8") as runner:
        blobs = runner.extract_all(feed)
    good = NcnnInterpreter(param, bin)
    peak = LAYER_TOLERANCES["int8"].peak_rtol
    results = compare_blobs(blobs, _layer_by_layer(good, blobs), good.graph, 0.0, 0.0, peak_rtol=peak)
    failed = {r.layer for r in results if not r.passed}
    assert failed == {target}


@pytest.mark.vulkan
def test_parity_runs_an_int8_model_as_int8_and_refuses_a_contradicting_precision(int8_files, tmp_path):
    from typer.testing import CliRunner

    from deploytool.cli import app

    param, *_ = int8_files
    cli = CliRunner()
    args = ["parity", str(param), "--input-shape", "1,3,24,24", "--backends", "ncnn-cpu,ncnn-vulkan"]
    result = cli.invoke(app, [*args, "--ncnn-precision", "fp16"])
    assert result.exit_code == 2 and "is an int8 model; drop --ncnn-precision fp16" in result.output
    result = cli.invoke(app, [*args, "--layerwise", "--report", str(tmp_path / "p.json")])
    assert result.exit_code == 0, result.output
    assert "ncnn-cpu vs interpreter, per layer: every blob within tolerance" in result.output
    report = json.loads((tmp_path / "p.json").read_text())
    assert report["backends"]["ncnn-vulkan"]["precision"] == "int8"
    assert {c["peak_rtol"] for c in report["comparisons"]} == {0.15}  # the int8 tolerance
