"""The embedded benchmark's feature network: a small CNN classifier for 1x16x16 digits.

It plays the role Inception-v3 plays for FID (Heusel et al. 2017, "GANs Trained by a Two Time-Scale
Update Rule Converge to a Local Nash Equilibrium"): its penultimate activations are the feature space in
which Frechet distance and k-NN precision/recall (Kynkaenniemi et al. 2019) are measured, and its logits
give the class accuracy of conditional samples. Trained by ``train_classifier.py`` on the train split of
``core.models.digits``; the weights ship with the package.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "DEFAULT_CONFIG",
    "WEIGHTS_DIR",
    "WEIGHTS_PATH",
    "CONFIG_PATH",
    "DigitsClassifier",
    "load_classifier",
    "read_config",
]

WEIGHTS_DIR: Path = Path(__file__).resolve().parent / "weights"
WEIGHTS_PATH: Path = WEIGHTS_DIR / "digits_classifier.safetensors"
CONFIG_PATH: Path = WEIGHTS_DIR / "digits_classifier.json"

DEFAULT_CONFIG: dict[str, Any] = {
    "in_channels": 1,
    "image_size": 16,
    "channels": [32, 64, 128],
    "feature_dim": 128,
    "num_classes": 10,
    "dropout": 0.2,
}


class DigitsClassifier(nn.Module):
    """conv(32) - conv(64) - maxpool - conv(128) - global average pool - fc(128) [features] - fc(10).

    All convolutions are 3x3 with padding 1 and ReLU; ``features(x)`` is the post-ReLU output of the
    128-wide fully connected layer, ``forward(x)`` the class logits. Inputs are ``(N, 1, 16, 16)`` in
    ``[-1, 1]`` (other sizes work: the pooling is global).
    """

    def __init__(
        self,
        in_channels: int = 1,
        channels: tuple[int, int, int] | list[int] = (32, 64, 128),
        feature_dim: int = 128,
        num_classes: int = 10,
        dropout: float = 0.2,
        image_size: int = 16,
    ) -> None:
        super().__init__()
        c1, c2, c3 = (int(c) for c in channels)
        self.config: dict[str, Any] = {
            "in_channels": int(in_channels),
            "image_size": int(image_size),
            "channels": [c1, c2, c3],
            "feature_dim": int(feature_dim),
            "num_classes": int(num_classes),
            "dropout": float(dropout),
        }

        def block(cin: int, cout: int) -> list[nn.Module]:
            return [
                nn.Conv2d(cin, cout, 3, padding=1, bias=False),
                nn.BatchNorm2d(cout),
                nn.ReLU(inplace=True),
            ]

        self.body = nn.Sequential(
            *block(in_channels, c1),
            *block(c1, c2),
            nn.MaxPool2d(2),
            *block(c2, c3),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.fc = nn.Linear(c3, feature_dim)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(feature_dim, num_classes)

    @property
    def feature_dim(self) -> int:
        return self.fc.out_features

    def features(self, x: Tensor) -> Tensor:
        """Penultimate features ``(N, feature_dim)`` (post-ReLU), the space of FD and precision/recall."""
        return torch.relu(self.fc(self.body(x)))

    def forward(self, x: Tensor) -> Tensor:
        """Class logits ``(N, num_classes)``."""
        return self.head(self.dropout(self.features(x)))


def read_config(path: str | os.PathLike[str] = CONFIG_PATH) -> dict[str, Any]:
    """The JSON written next to the weights (architecture, held-out accuracy, train time, seed)."""
    from ..io import read_json

    return read_json(path)


def load_classifier(
    device: str | torch.device = "cpu", path: str | os.PathLike[str] | None = None
) -> DigitsClassifier:
    """Load the shipped digits classifier (eval mode, gradients off) from safetensors.

    Args:
        device: where to put the model.
        path: a ``.safetensors`` file (default: the shipped ``weights/digits_classifier.safetensors``);
            the architecture is read from the ``.json`` of the same stem if present.
    """
    from ..io import read_safetensors

    weights = Path(path) if path is not None else WEIGHTS_PATH
    if not weights.is_file():
        raise FileNotFoundError(
            f"digits classifier weights not found at {weights}; train them with "
            "`python -m fewstep.core.metrics.train_classifier` (a few minutes on CPU)"
        )
    cfg_path = weights.with_suffix(".json")
    arch = dict(DEFAULT_CONFIG)
    if cfg_path.is_file():
        arch.update(read_config(cfg_path).get("architecture", {}))
    model = DigitsClassifier(**{k: arch[k] for k in DEFAULT_CONFIG})
    model.load_state_dict(read_safetensors(weights)[0])
    model.requires_grad_(False)
    return model.eval().to(device)
