"""A MobileNet(v1)-style classifier: a strided 3x3 stem, then depthwise-separable blocks (3x3 depthwise +
BatchNorm + ReLU6, 1x1 pointwise + BatchNorm + ReLU6), global average pooling and a linear layer.

Widths are MobileNet-v1's at a quarter (alpha 0.25) with fewer 512-wide blocks, so the spec runs in a
second on a CPU. The global pool makes it size-agnostic: models/mobilenet.toml checks 160x160 and 224x224.
"""

from __future__ import annotations

import torch
from torch import nn

from ..spec import IMAGENET_MEAN, IMAGENET_STD
from .init import centre_classifier, photo_batchnorm, photo_inputs, seeded_weights

STEM = 16
# (output channels, stride) per depthwise-separable block
BLOCKS: tuple[tuple[int, int], ...] = (
    (32, 1), (64, 2), (64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (256, 1), (512, 2), (512, 1),
)  # fmt: skip
LOGIT_STD = 3.0


def conv_bn_relu6(c_in: int, c_out: int, kernel: int, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU6(inplace=True),
    )


class DepthwiseSeparable(nn.Sequential):
    """3x3 depthwise (groups = channels) then 1x1 pointwise, each with BatchNorm and ReLU6."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__(conv_bn_relu6(c_in, c_in, 3, stride, groups=c_in), conv_bn_relu6(c_in, c_out, 1))


class MobileNet(nn.Module):
    def __init__(self, num_classes: int = 1000, blocks=BLOCKS, stem: int = STEM):
        super().__init__()
        layers = [conv_bn_relu6(3, stem, 3, 2)]
        c = stem
        for c_out, stride in blocks:
            layers.append(DepthwiseSeparable(c, c_out, stride))
            c = c_out
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


def mobilenet(num_classes: int = 1000, seed: int = 0) -> MobileNet:
    """Seeded weights: He-normal convolutions; BatchNorm statistics measured on seeded photo-like images
    (ImageNet-normalised, as the spec preprocesses), gamma ~ U(0.5, 1.0) and beta ~ U(0, 1) so that the
    ReLU6 units are neither dead nor clipped on most inputs."""
    generator = torch.Generator().manual_seed(seed)
    model = MobileNet(num_classes)
    seeded_weights(model, generator)
    x = photo_inputs(generator, 160, IMAGENET_MEAN, IMAGENET_STD)
    photo_batchnorm(model, generator, x, gamma=(0.5, 1.0), beta=(0.0, 1.0))
    centre_classifier(model, model.fc, x, LOGIT_STD)
    return model.eval()
