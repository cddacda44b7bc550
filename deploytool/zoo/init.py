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


def seeded_weights(model: nn.Module, generator: torch.Generator) -> None:
    """He-normal convolutions (fan-in, per group) with zero bias; Linear layers drawn as PyTorch's
    default U(-1/sqrt(fan_in), 1/sqrt(fan_in)), bias included."""
    for m in model.modules():
        with torch.no_grad():
            if isinstance(m, nn.Conv2d):
                fan_in = m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1]
                m.weight.normal_(0.0, (2.0 / fan_in) ** 0.5, generator=generator)
                if m.bias is not None:
                    m.bias.zero_()
            elif isinstance(m, nn.Linear):
                bound = 1.0 / m.in_features**0.5
                m.weight.uniform_(-bound, bound, generator=generator)
                m.bias.uniform_(-bound, bound, generator=generator)


def photo_inputs(
    generator: torch.Generator,
    size: int,
    mean: tuple[float, ...] = (0.0, 0.0, 0.0),
    std: tuple[float, ...] = (1.0, 1.0, 1.0),
) -> torch.Tensor:
    """Seeded photo-like model inputs (yolo._calibration_images, `size` px, in [0, 1]) normalised as a
    spec's preprocessing does: (x - mean) / std per channel."""
    from .yolo import _calibration_images

    x = _calibration_images(generator, size=size)
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def photo_batchnorm(
    model: nn.Module,
    generator: torch.Generator,
    x: torch.Tensor,
    gamma: tuple[float, float],
    beta: tuple[float, float],
) -> None:
    """BatchNorm as a trained network has it: running statistics measured on the photo-like inputs `x`
    (photo_inputs), so each BN normalises its input on photographs, and affine parameters
    gamma ~ U(gamma), beta ~ U(beta)."""
    from .yolo import _calibrate_batchnorm

    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.weight.uniform_(*gamma, generator=generator)
                m.bias.uniform_(*beta, generator=generator)
    _calibrate_batchnorm(model, x)


def centre_classifier(model: nn.Module, fc: nn.Linear, x: torch.Tensor, logit_std: float) -> None:
    """Make a seeded classifier's logits depend on the image: `fc` is rescaled so its logits have
    standard deviation `logit_std` over the photo-like inputs `x` and its bias cancels their mean feature
    (else a positive post-ReLU mean times random weights is a constant offset, and one class wins on
    every photo)."""
    from .yolo import _inputs_of

    (features,) = _inputs_of(model, [fc], x)
    centred = features - features.mean(0)
    with torch.no_grad():
        fc.weight.mul_(logit_std / (centred @ fc.weight.T).std())
        fc.bias.copy_(-fc.weight @ features.mean(0))
