"""int8 on Vulkan: where ncnn runs each layer of an int8 model is read from ncnn itself (the layer's
support_vulkan after loading), reported per backend, and a layer that falls back to the CPU is named,
so a CPU result is never presented as Vulkan's."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import convert_model

from deploytool.backends.ncnn_runner import NcnnRunner, NcnnVulkanRunner
from deploytool.ncnn_param import read_model
from deploytool.quantize.calibrate import calibrate
from deploytool.quantize.write import quantize_model
from deploytool.report import _placement

pytestmark = pytest.mark.vulkan


class DepthwiseNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.dw = torch.nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.fc = torch.nn.Linear(8, 4)

    def forward(self, x):
        x = torch.relu(self.dw(torch.relu(self.conv(x))))
        return self.fc(x.mean(dim=(2, 3)))


@pytest.fixture(scope="module")
def int8_model(tmp_path_factory):
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("vk8")
    param, bin = convert_model(DepthwiseNet().eval(), torch.randn(1, 3, 16, 16), folder)
    rng = np.random.default_rng(0)
    feeds = [{"in0": rng.standard_normal((1, 3, 16, 16)).astype(np.float32)} for _ in range(4)]
    model = read_model(param, bin)
    table = calibrate(model, feeds, method="minmax")
    layers = quantize_model(model, table, folder / "q.param", folder / "q.bin")
    return folder, layers, feeds


def _run(runner_cls, param, bin, feed):
    with runner_cls(param, bin, precision="int8") as runner:
        out = runner.infer(feed)
        return next(iter(out.values())), runner.extra()


def test_vulkan_runner_reports_where_each_int8_layer_ran(int8_model):
    folder, layers, feeds = int8_model
    got, extra = _run(NcnnVulkanRunner, folder / "q.param", folder / "q.bin", feeds[0])
    cpu, _ = _run(NcnnRunner, folder / "q.param", folder / "q.bin", feeds[0])
    assert extra["int8_layers"] == len(layers) == 3
    # this ncnn (1.0.20261020) has Vulkan int8 kernels for convolution, depthwise and inner product
    assert extra["int8_layers_on_device"] == 3 and extra["layers_on_cpu"] == []
    assert extra["layers_on_device"] == extra["layers"]
    cos = float(got.ravel() @ cpu.ravel() / np.linalg.norm(got) / np.linalg.norm(cpu))
    assert cos > 0.99  # the device's int8 path computes what the CPU's does, within int8 noise


def test_a_layer_ncnn_cannot_run_on_vulkan_is_named_as_run_on_the_cpu(int8_model, tmp_path):
    """ncnn's Vulkan depthwise has no int8 kernel for a non-zero pad value (18=): the layer stays on the
    CPU inside the Vulkan net, and the report names it."""
    folder, layers, feeds = int8_model
    lines = (folder / "q.param").read_text().splitlines()
    dw = next(i for i, line in enumerate(lines) if line.startswith("ConvolutionDepthWise"))
    name = lines[dw].split()[1]
    lines[dw] += " 18=1.000000e-01"
    (tmp_path / "q.param").write_text("\n".join(lines) + "\n")
    _, extra = _run(NcnnVulkanRunner, tmp_path / "q.param", folder / "q.bin", feeds[0])
    assert extra["layers_on_cpu"] == [name]
    assert extra["int8_layers_on_device"] == 2 and extra["int8_layers"] == 3
    text = _placement(extra)
    assert f"(int8: 2/3); on the CPU instead: {name}" in text
