"""Per-layer blame: ncnn against torch by value, against the interpreter, and CPU against Vulkan."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import convert_model
from torch import nn

from deploytool.backends.ncnn_runner import NcnnRunner, NcnnVulkanRunner
from deploytool.errors import SpecError
from deploytool.interpreter import NcnnInterpreter
from deploytool.layerwise import (
    TorchRecord,
    blame,
    compare_blobs,
    first_failure,
    match_torch,
    record_torch,
    scale_layer_weights,
)
from deploytool.ncnn_param import parse_param_text
from deploytool.zoo.init import randomise_batchnorm
from deploytool.zoo.resnet import resnet18

PNNX = Path(sys.executable).parent / "pnnx"


def ncnn_blobs(param, bin_, x, runner=NcnnRunner):
    with runner(param, bin_) as r:
        return r.extract_all({"in0": x})


@pytest.fixture(scope="module")
def resnet(tmp_path_factory):
    """ResNet18 converted once, with a copy of its .bin whose layer3.0.conv1 weights are scaled by 1.5."""
    model = resnet18(seed=0)
    x = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
    folder = tmp_path_factory.mktemp("resnet18")
    param, bin_ = convert_model(model, torch.from_numpy(x), folder, "torchscript")
    graph = NcnnInterpreter(param, bin_).graph
    # layer3.0.conv1: the first 3x3 convolution with 256 outputs (pnnx names it convrelu_N: ReLU fused)
    target = next(
        layer
        for layer in graph.layers
        if layer.type == "Convolution" and layer.get(0) == 256 and layer.get(1) == 3
    )
    bad = scale_layer_weights(param, bin_, target.name, 1.5, folder / "bad.bin")
    records = record_torch(model, torch.from_numpy(x))
    return {
        "model": model,
        "x": x,
        "param": param,
        "bin": bin_,
        "bad": bad,
        "target": target,
        "records": records,
    }


@pytest.mark.slow
def test_clean_ncnn_blames_nothing(resnet):
    blobs = ncnn_blobs(resnet["param"], resnet["bin"], resnet["x"])
    graph = NcnnInterpreter(resnet["param"], resnet["bin"]).graph
    matches = match_torch(blobs, graph, resnet["records"])
    assert all(m.matched for m in matches), [m.blob for m in matches if not m.matched]
    assert blame(matches, graph) is None
    # fused conv+relu: ncnn's blob is torch's relu output, not its conv output
    fused = next(m for m in matches if m.layer.startswith("convrelu"))
    assert ":relu" in fused.torch_op


@pytest.mark.slow
def test_corrupted_convolution_is_blamed_by_torch_matching(resnet):
    blobs = ncnn_blobs(resnet["param"], resnet["bad"], resnet["x"])
    graph = NcnnInterpreter(resnet["param"], resnet["bad"]).graph
    culprit = blame(match_torch(blobs, graph, resnet["records"]), graph)
    assert culprit is not None and culprit.layer == resnet["target"].name
    assert culprit.blob == resnet["target"].tops[0] and culprit.layer_type == "Convolution"


@pytest.mark.slow
def test_corrupted_convolution_is_blamed_through_the_interpreter(resnet):
    interp = NcnnInterpreter(resnet["param"], resnet["bad"])
    blobs = interp.run({"in0": resnet["x"]})
    culprit = blame(match_torch(blobs, interp.graph, resnet["records"]), interp.graph)
    assert culprit is not None and culprit.layer == resnet["target"].name
    # and ncnn on the corrupted .bin against the interpreter on the clean one parts at the same layer
    clean = NcnnInterpreter(resnet["param"], resnet["bin"]).run({"in0": resnet["x"]})
    ncnn = ncnn_blobs(resnet["param"], resnet["bad"], resnet["x"])
    results = compare_blobs(ncnn, clean, interp.graph, atol=1e-4, rtol=1e-4)
    assert [r.blob for r in results] == list(clean)
    assert first_failure(results).layer == resnet["target"].name
    assert all(r.passed for r in results[: results.index(first_failure(results))])


def test_scale_layer_weights_touches_only_that_array(resnet, tmp_path):
    before = resnet["bin"].read_bytes()
    after = resnet["bad"].read_bytes()
    rec = NcnnInterpreter(resnet["param"], resnet["bin"]).weight_record(resnet["target"].name)
    start, end = rec.offset, rec.offset + 4 * rec.count
    assert len(before) == len(after) and before[:start] == after[:start] and before[end:] == after[end:]
    old = np.frombuffer(before[start:end], "<f4")
    new = np.frombuffer(after[start:end], "<f4")
    np.testing.assert_allclose(new, old * 1.5, rtol=1e-6)
    with pytest.raises(SpecError, match="no layer named 'nope'"):
        scale_layer_weights(resnet["param"], resnet["bin"], "nope", 2.0, tmp_path / "x.bin")
    assert not (tmp_path / "x.bin").exists()


@pytest.mark.vulkan
@pytest.mark.slow
def test_cpu_and_vulkan_agree_blob_by_blob(resnet):
    graph = NcnnInterpreter(resnet["param"], resnet["bin"]).graph
    cpu = ncnn_blobs(resnet["param"], resnet["bin"], resnet["x"])
    vulkan = ncnn_blobs(resnet["param"], resnet["bin"], resnet["x"], NcnnVulkanRunner)
    # Vulkan keeps fp16 storage even in fp32 mode, so errors scale with each blob's range
    results = compare_blobs(vulkan, cpu, graph, atol=0.0, rtol=0.0, peak_rtol=1e-2)
    assert len(results) == len(cpu)
    worst = max(results, key=lambda r: r.peak_rel)
    print(f"CPU vs Vulkan: worst blob {worst.blob} ({worst.layer}) peak_rel {worst.peak_rel:.3g}")
    assert first_failure(results) is None, first_failure(results)


# --- what pnnx rewrites must not be blamed


class Residual(nn.Module):
    """Conv-BN-SiLU twice with a shortcut: via ONNX, pnnx writes one SiLU as Sigmoid + mul, a
    sigmoid blob torch never computes; BN folds into the convolutions."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(4, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8)
        self.head = nn.Conv2d(8, 3, 1)

    def forward(self, x):
        y = F.silu(self.bn1(self.conv1(x)))
        y = y + F.silu(self.bn2(self.conv2(y)))
        return self.head(torch.cat(y.chunk(2, 1), 1)).flatten(2).transpose(1, 2).softmax(-1)


@pytest.mark.slow
@pytest.mark.parametrize("via", ["torchscript", "onnx"])
def test_rewritten_intermediates_are_not_blamed(tmp_path, via):
    torch.manual_seed(0)
    model = Residual()
    randomise_batchnorm(model, torch.Generator().manual_seed(0))
    model.eval()
    x = np.random.default_rng(5).standard_normal((1, 4, 12, 12)).astype(np.float32)
    param, bin_ = convert_model(model, torch.from_numpy(x), tmp_path, via)
    graph = NcnnInterpreter(param, bin_).graph
    matches = match_torch(ncnn_blobs(param, bin_, x), graph, record_torch(model, torch.from_numpy(x)))
    assert blame(matches, graph) is None, [m for m in matches if not m.explained]
    if via == "onnx":  # the case the rule exists for really occurs
        assert any(not m.matched and m.explained for m in matches)


# --- unit tests on made-up blobs


GRAPH = parse_param_text(
    "7767517\n4 4\nInput in0 0 1 in0\nConvolution conv 1 1 in0 a 0=1\n"
    "ReLU relu 1 1 a b\nSigmoid sig 1 1 b out0\n"
)


def test_compare_blobs_reports_in_graph_order_with_the_first_failure():
    ref = {
        "in0": np.ones(4),
        "a": np.array([1.0, -2.0, 3.0, 0.0]),
        "b": np.array([1.0, 0, 3, 0]),
        "out0": np.ones(4),
    }
    other = dict(ref, b=np.array([1.0, 0, 3.3, 0]), out0=np.ones(4) * 1.01)
    results = compare_blobs(other, ref, GRAPH, atol=1e-3, rtol=1e-3)
    assert [(r.blob, r.layer, r.layer_type) for r in results] == [
        ("in0", "in0", "Input"),
        ("a", "conv", "Convolution"),
        ("b", "relu", "ReLU"),
        ("out0", "sig", "Sigmoid"),
    ]
    bad = first_failure(results)
    assert bad.blob == "b" and bad.max_abs == pytest.approx(0.3) and bad.max_rel == pytest.approx(0.1)
    assert bad.required_atol == pytest.approx(0.3 - 3e-3, rel=1e-6)
    assert bad.peak_rel == pytest.approx(0.1)
    assert 0.99 < bad.cosine < 1.0
    loose = compare_blobs(other, ref, GRAPH, atol=0.0, rtol=0.0, peak_rtol=0.11)
    assert first_failure(loose) is None
    mismatch = compare_blobs(dict(ref, a=np.ones(5)), ref, GRAPH, atol=1, rtol=1)
    assert first_failure(mismatch).blob == "a"


def test_blame_skips_blobs_whose_consumers_recover():
    """b has no torch twin but out0 does (a fused intermediate); a fault makes out0 fail too."""
    records = [TorchRecord("x", np.ones(4)), TorchRecord("y", np.arange(4.0))]
    blobs = {"in0": np.ones(4), "a": np.arange(4.0), "b": np.full(4, 7.0), "out0": np.arange(4.0)}
    matches = match_torch(blobs, GRAPH, records)
    assert [m.matched for m in matches] == [True, True, False, True]
    assert [m.explained for m in matches] == [True, True, True, True]
    assert blame(matches, GRAPH) is None
    culprit = blame(match_torch(dict(blobs, out0=np.full(4, 9.0)), GRAPH, records), GRAPH)
    assert culprit.blob == "b" and culprit.layer == "relu"


def test_record_torch_sees_functional_ops_with_module_names():
    model = Residual().eval()
    records = record_torch(model, torch.randn(1, 4, 6, 6))
    names = [r.name for r in records]
    assert names[0].startswith("input")
    assert any(n.startswith("conv1:conv2d") for n in names)
    assert any(":silu" in n for n in names) and any(":cat" in n for n in names)
    assert any(":softmax" in n for n in names) and any(n.startswith("param:bn1.running_mean") for n in names)
