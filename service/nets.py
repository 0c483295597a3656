"""The MNIST nets: the tutorial's MLP and our small CNN. No I/O; inputs are `(N, 1, 28, 28)` in [0, 1].

Both normalise with MNIST's mean and std inside `forward`, so the weights travel with their preprocessing.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

MNIST_MEAN = 0.1307
MNIST_STD = 0.3081


@dataclass(frozen=True)
class NetConfig:
    """Saved beside the weights: enough to rebuild the net."""

    name: str
    hidden: tuple[int, ...] = ()
    channels: tuple[int, ...] = ()
    dropout: float = 0.0

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


MLP_CONFIG = NetConfig("mlp", hidden=(512, 512), dropout=0.2)
CNN_CONFIG = NetConfig("cnn", channels=(16, 32, 64), hidden=(128,), dropout=0.25)


def normalize(x: torch.Tensor) -> torch.Tensor:
    """`(N, 1, 28, 28)` in [0, 1] -> standardised with MNIST's mean and std, as both nets were trained."""
    return (x - MNIST_MEAN) / MNIST_STD


class MLP(nn.Module):
    """784-512-512-10 with ReLU and dropout 0.2, as the tutorial's Keras model."""

    def __init__(self, config: NetConfig = MLP_CONFIG) -> None:
        super().__init__()
        self.config = config
        sizes = (28 * 28, *config.hidden)
        self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes, sizes[1:], strict=False))
        self.out = nn.Linear(sizes[-1], 10)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = normalize(x).flatten(1)  # (N, 784)
        for layer in self.hidden:
            x = self.dropout(F.relu(layer(x)))  # (N, 512)
        logits: torch.Tensor = self.out(x)  # (N, 10)
        return logits


class CNN(nn.Module):
    """Three conv -> ReLU -> max-pool blocks (5x5, 5x5, 3x3; 16, 32, 64 channels), then 576 -> 128 -> 10.

    About 107k parameters and 3.8M multiply-adds per digit. `features` is a plain Sequential of conv, ReLU and
    pool layers, so its activations are exactly what `/v1/models/cnn/featuremaps` shows.
    """

    def __init__(self, config: NetConfig = CNN_CONFIG) -> None:
        super().__init__()
        self.config = config
        c1, c2, c3 = config.channels
        self.features = nn.Sequential(
            nn.Conv2d(1, c1, 5, padding=2),  # (N, 16, 28, 28)
            nn.ReLU(),
            nn.MaxPool2d(2),  # (N, 16, 14, 14)
            nn.Conv2d(c1, c2, 5, padding=2),  # (N, 32, 14, 14)
            nn.ReLU(),
            nn.MaxPool2d(2),  # (N, 32, 7, 7)
            nn.Conv2d(c2, c3, 3, padding=1),  # (N, 64, 7, 7)
            nn.ReLU(),
            nn.MaxPool2d(2),  # (N, 64, 3, 3)
        )
        self.dropout = nn.Dropout(config.dropout)
        self.fc = nn.Linear(c3 * 3 * 3, config.hidden[0])
        self.out = nn.Linear(config.hidden[0], 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(normalize(x)))

    def head(self, features: torch.Tensor) -> torch.Tensor:
        """`features`' output `(N, 64, 3, 3)` -> logits `(N, 10)`."""
        x = features.flatten(1)  # (N, 576)
        x = self.dropout(F.relu(self.fc(self.dropout(x))))  # (N, 128)
        logits: torch.Tensor = self.out(x)  # (N, 10)
        return logits


NETS: dict[str, type[MLP] | type[CNN]] = {"mlp": MLP, "cnn": CNN}
CONFIGS: dict[str, NetConfig] = {"mlp": MLP_CONFIG, "cnn": CNN_CONFIG}


def build(name: str) -> nn.Module:
    """A freshly initialised net by name (`mlp` or `cnn`)."""
    return NETS[name](CONFIGS[name])


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
