"""Seeded initialisation shared by the zoo's models."""

from __future__ import annotations

import torch
from torch import nn


def randomise_batchnorm(model: nn.Module, generator: torch.Generator) -> None:
    """Give every BatchNorm non-trivial statistics and affine parameters.

    Freshly built BatchNorm is the identity in eval mode, which makes parity too easy to pass;
    random statistics exercise the BN folding that converters do.
    """
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            with torch.no_grad():
                m.weight.copy_(torch.empty(n).uniform_(0.5, 1.5, generator=generator))
                m.bias.copy_(torch.randn(n, generator=generator) * 0.1)
                m.running_mean.copy_(torch.randn(n, generator=generator) * 0.1)
                m.running_var.copy_(torch.empty(n).uniform_(0.5, 1.5, generator=generator))
