"""Recurrent time-series models: GRU and LSTM heads over a sequence, and a CNN + LSTM + attention
forecaster. Inputs are batch-first: (N, T, features) for the recurrent models, (N, 1, T) for the
univariate forecaster. Seeded weights: PyTorch's own initialisation drawn from `seed`, the recurrent
weights then scaled by `gain` (3: U(-3/sqrt(H), 3/sqrt(H)), so the state carries information over many
steps rather than fading within a few) and the linear head centred and scaled on seeded normal inputs
(outputs of standard deviation 1 around 0, not a constant bias), so that the outputs depend on the input
and a wrong gate shows."""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn


@contextmanager
def seeded(seed: int):
    """Build a model inside this block: torch's default initialisation draws from `seed`, and the global
    random state is restored afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


class GRUClassifier(nn.Module):
    """A stacked GRU over (N, T, F); the last time step's hidden state goes through a linear head."""

    def __init__(self, features: int, hidden: int, layers: int, num_classes: int):
        super().__init__()
        self.gru = nn.GRU(features, hidden, num_layers=layers, batch_first=True)
        self.head = nn.Linear(hidden, num_classes)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.gru(x)
        return out[:, -1, :]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encode(x))


class LSTMRegressor(nn.Module):
    """A stacked bidirectional LSTM over (N, T, F); the mean over time of both directions' outputs
    goes through a linear head (a mean, not the last step: the backward direction ends at t = 0)."""

    def __init__(self, features: int, hidden: int, layers: int, outputs: int):
        super().__init__()
        self.lstm = nn.LSTM(features, hidden, num_layers=layers, batch_first=True, bidirectional=True)
        self.head = nn.Linear(2 * hidden, outputs)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(x)
        return out.mean(dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encode(x))


class Forecaster(nn.Module):
    """Univariate forecaster over (N, 1, T): two Conv1d feature layers, an LSTM over time, softmax
    attention over the time steps, and a linear head giving the next `horizon` values."""

    def __init__(self, channels: int, hidden: int, horizon: int):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv1d(1, channels, 5, padding=2),
            nn.ReLU(),
            nn.Conv1d(channels, channels, 3, padding=1),
            nn.ReLU(),
        )
        self.lstm = nn.LSTM(channels, hidden, batch_first=True)
        self.score = nn.Linear(hidden, 1)
        self.head = nn.Linear(hidden, horizon)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        f = self.features(x).permute(0, 2, 1)  # (N, T, C)
        h, _ = self.lstm(f)  # (N, T, H)
        weights = torch.softmax(self.score(h), dim=1)  # (N, T, 1): attention over time
        return (weights * h).sum(dim=1)  # (N, H): the context

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encode(x))


def _condition(model: nn.Module, rnn: nn.RNNBase, gain: float, example: torch.Size) -> nn.Module:
    """Scale `rnn`'s weights by `gain`, then centre and scale `model.head` so that its outputs over seeded
    normal inputs of shape `example` have mean 0 and standard deviation 1 (call inside `seeded`)."""
    with torch.no_grad():
        for name, p in rnn.named_parameters():
            if name.startswith("weight"):
                p.mul_(gain)
        features = model.encode(torch.randn(example))
        centred = features - features.mean(0)
        head = model.head
        head.weight.mul_(1.0 / (centred @ head.weight.T).std())
        head.bias.copy_(-head.weight @ features.mean(0))
    return model.eval()


def gru(
    features: int = 8,
    hidden: int = 32,
    layers: int = 2,
    num_classes: int = 5,
    gain: float = 3.0,
    seed: int = 0,
) -> nn.Module:
    with seeded(seed):
        model = GRUClassifier(features, hidden, layers, num_classes)
        return _condition(model, model.gru, gain, torch.Size((64, 32, features)))


def lstm(
    features: int = 8, hidden: int = 32, layers: int = 2, outputs: int = 3, gain: float = 3.0, seed: int = 0
) -> nn.Module:
    with seeded(seed):
        model = LSTMRegressor(features, hidden, layers, outputs)
        return _condition(model, model.lstm, gain, torch.Size((64, 32, features)))


def forecaster(
    channels: int = 16, hidden: int = 32, horizon: int = 8, gain: float = 3.0, seed: int = 0
) -> nn.Module:
    with seeded(seed):
        model = Forecaster(channels, hidden, horizon)
        return _condition(model, model.lstm, gain, torch.Size((64, 1, 48)))
