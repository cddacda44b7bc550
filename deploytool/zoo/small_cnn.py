"""Small CNNs on non-photo inputs: a LeNet-style digit classifier on one 28x28 channel, and an
EEG-style classifier over a grid of per-band features (bands x 9 x 9 electrode grid, as in
differential-entropy features mapped onto the scalp). Seeded weights, randomised BatchNorm."""

from __future__ import annotations

import torch
from torch import nn

from .init import randomise_batchnorm
from .sequence import seeded


class LeNet(nn.Module):
    """LeNet-5 layout: two conv + pool stages, three fully connected layers."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2),
        )  # fmt: skip
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(16 * 5 * 5, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(),
            nn.Linear(84, num_classes),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class EEGNet(nn.Module):
    """Per-band feature grids (N, bands, 9, 9): three 3x3 conv + BatchNorm + ELU blocks, a max pool,
    and a linear head over the flattened grid."""

    def __init__(self, bands: int, num_classes: int):
        super().__init__()

        def block(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ELU()]

        self.features = nn.Sequential(*block(bands, 32), *block(32, 64), *block(64, 64), nn.MaxPool2d(2))
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(0.5), nn.Linear(64 * 4 * 4, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def lenet(num_classes: int = 10, seed: int = 0) -> nn.Module:
    with seeded(seed):
        return LeNet(num_classes).eval()


def eegnet(bands: int = 5, num_classes: int = 3, seed: int = 0) -> nn.Module:
    with seeded(seed):
        model = EEGNet(bands, num_classes)
    randomise_batchnorm(model, torch.Generator().manual_seed(seed))
    return model.eval()
