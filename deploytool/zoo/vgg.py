"""A VGG-style plain classifier: stacks of 3x3 convolution + ReLU (no BatchNorm), 2x2 max-pools, then
VGG's head: flatten the last 5x5 feature grid, two fully connected layers.

Widths are VGG-11's at an eighth (8 to 64), so the spec runs in a second on a CPU. The flattened grid
fixes the input size (160x160), as in the original VGG. torchvision's VGG puts an AdaptiveAvgPool2d((7, 7))
before the flatten to accept other sizes, but with dynamic H and W torch.onnx.export (torch 2.13) refuses
it ("ONNX export of operator adaptive_avg_pool2d, input size not accessible"), so deploytool could not
check a second size through ONNX Runtime anyway.
"""

from __future__ import annotations

import torch
from torch import nn

from ..spec import IMAGENET_MEAN, IMAGENET_STD
from .init import centre_classifier, photo_inputs, seeded_weights

# VGG-11's configuration ("A") at width 1/8: output channels of each 3x3 conv, "M" a 2x2 max-pool
CONFIG: tuple[int | str, ...] = (8, "M", 16, "M", 32, 32, "M", 64, 64, "M", 64, 64, "M")
GRID = 5  # 160 / 2**5: the feature grid the head flattens
HIDDEN = 256
LOGIT_STD = 3.0


class VGG(nn.Module):
    def __init__(self, num_classes: int = 1000, config=CONFIG):
        super().__init__()
        layers: list[nn.Module] = []
        c = 3
        for item in config:
            if item == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(c, int(item), 3, padding=1), nn.ReLU(inplace=True)]
                c = int(item)
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.Linear(c * GRID * GRID, HIDDEN), nn.ReLU(inplace=True), nn.Linear(HIDDEN, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


def vgg(num_classes: int = 1000, seed: int = 0) -> VGG:
    """Seeded weights: He-normal convolutions (zero bias, which with ReLU keeps the activations' scale
    through the plain stack), PyTorch-default Linear, and the last layer centred on seeded photo-like
    images so the class depends on the photo (init.centre_classifier)."""
    generator = torch.Generator().manual_seed(seed)
    model = VGG(num_classes).eval()
    seeded_weights(model, generator)
    x = photo_inputs(generator, 160, IMAGENET_MEAN, IMAGENET_STD)
    centre_classifier(model, model.classifier[-1], x, LOGIT_STD)
    return model
