"""A ShuffleNet-v2-style classifier (Ma et al. 2018): a strided 3x3 stem and a max-pool, then stages of
units that split the channels in two (torch.chunk), run one half through 1x1 conv -> 3x3 depthwise ->
1x1 conv (BatchNorm, ReLU), concatenate, and shuffle the channels by reshape / transpose / reshape; the
first unit of each stage has stride 2 and a second branch instead of the split. Then a 1x1 conv, global
average pooling and a linear layer.

The shuffle is written as in torchvision (view to [N, groups, C / groups, H, W], transpose(1, 2),
contiguous, view back), a 5-D tensor that ncnn (at most 4-D with the batch dropped) can only run once a
converter recognises the pattern. Widths are ShuffleNet-v2 0.5x's with fewer units per stage; the global
pool makes it size-agnostic: models/shufflenet.toml checks 160x160 and 224x224.
"""

from __future__ import annotations

import torch
from torch import nn

from ..spec import IMAGENET_MEAN, IMAGENET_STD
from .init import centre_classifier, photo_batchnorm, photo_inputs, seeded_weights

STEM = 24
# (output channels, units) per stage: ShuffleNet-v2 0.5x widths, 2-3-2 units instead of 4-8-4
STAGES: tuple[tuple[int, int], ...] = ((48, 2), (96, 3), (192, 2))
HEAD = 512
LOGIT_STD = 3.0


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    n, c, h, w = x.size()
    x = x.view(n, groups, c // groups, h, w).transpose(1, 2).contiguous()
    return x.view(n, c, h, w)


def conv_bn(c_in: int, c_out: int, kernel: int, stride: int = 1, groups: int = 1, relu: bool = True):
    layers = [
        nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(c_out),
    ]
    return nn.Sequential(*layers, nn.ReLU(inplace=True)) if relu else nn.Sequential(*layers)


class ShuffleUnit(nn.Module):
    """Stride 1: split, transform the second half, concatenate. Stride 2: both branches see the whole
    input (the first a 3x3 depthwise + 1x1), channels double. Both end with a 2-group channel shuffle."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.stride = stride
        half = c_out // 2
        c_branch = c_in if stride == 2 else half
        if stride == 2:
            self.branch1 = nn.Sequential(conv_bn(c_in, c_in, 3, 2, c_in, relu=False), conv_bn(c_in, half, 1))
        self.branch2 = nn.Sequential(
            conv_bn(c_branch, half, 1),
            conv_bn(half, half, 3, stride, half, relu=False),
            conv_bn(half, half, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 1:
            x1, x2 = x.chunk(2, dim=1)
            out = torch.cat((x1, self.branch2(x2)), 1)
        else:
            out = torch.cat((self.branch1(x), self.branch2(x)), 1)
        return channel_shuffle(out, 2)


class ShuffleNet(nn.Module):
    def __init__(self, num_classes: int = 1000, stages=STAGES):
        super().__init__()
        self.stem = nn.Sequential(conv_bn(3, STEM, 3, 2), nn.MaxPool2d(3, 2, 1))
        units: list[nn.Module] = []
        c = STEM
        for c_out, n in stages:
            units += [ShuffleUnit(c, c_out, 2)] + [ShuffleUnit(c_out, c_out, 1) for _ in range(n - 1)]
            c = c_out
        self.stages = nn.Sequential(*units)
        self.head = conv_bn(c, HEAD, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(HEAD, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.head(self.stages(self.stem(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


def shufflenet(num_classes: int = 1000, seed: int = 0) -> ShuffleNet:
    """Seeded weights as mobilenet's: He-normal convolutions, BatchNorm statistics measured on seeded
    photo-like images with gamma ~ U(0.5, 1.0) and beta ~ U(0, 1), the classifier centred on them."""
    generator = torch.Generator().manual_seed(seed)
    model = ShuffleNet(num_classes)
    seeded_weights(model, generator)
    x = photo_inputs(generator, 160, IMAGENET_MEAN, IMAGENET_STD)
    photo_batchnorm(model, generator, x, gamma=(0.5, 1.0), beta=(0.0, 1.0))
    centre_classifier(model, model.fc, x, LOGIT_STD)
    return model.eval()
