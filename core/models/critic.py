"""Pieces for critics and discriminators built on a diffusion network: a feature tap and a small classifier head.

DMD2 (Yin et al. 2024, "Improved Distribution Matching Distillation", sec. 4.3) puts its GAN classifier on the
bottleneck features of the fake-score network; ``FeatureTap`` captures the output of any submodule during a
forward pass (a forward hook, removed afterwards) and ``ClassifierHead`` turns ``(B, tokens, D)`` or
``(B, D, H, W)`` features into one logit per sample by mean-pooling first; ``SpatialClassifierHead`` keeps the
layout (tokens back on their square grid) and convolves before it reduces, as DMD2's ``cls_pred_branch``
(strided convolutions on the bottleneck map down to one logit) does: a mean-pooled head sees which features occur,
not where.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

from torch import Tensor, nn

from .denoiser import unwrap_output


def default_feature_module(network: nn.Module) -> str:
    """Name of a sensible feature layer: the middle transformer block (DiT-like models) or the UNet mid block."""
    blocks = getattr(network, "transformer_blocks", None)
    if isinstance(blocks, nn.ModuleList) and len(blocks):
        return f"transformer_blocks.{(len(blocks) - 1) // 2}"
    if getattr(network, "mid_block", None) is not None:
        return "mid_block"
    raise ValueError(f"cannot choose a feature layer of {type(network).__name__}; name one (feature_module=...)")


class FeatureTap:
    """Capture the output of ``network.<name>`` while inside ``with tap.capture():`` (``tap.features``)."""

    def __init__(self, network: nn.Module, name: str):
        modules = dict(network.named_modules())
        if name not in modules:
            raise ValueError(f"{type(network).__name__} has no module {name!r}")
        self.module = modules[name]
        self.name = name
        self.features: Tensor | None = None

    @contextmanager
    def capture(self) -> Iterator[FeatureTap]:
        def hook(module, inputs, output):
            self.features = unwrap_output(output)

        handle = self.module.register_forward_hook(hook)
        self.features = None
        try:
            yield self
        finally:
            handle.remove()


def pool_features(features: Tensor) -> Tensor:
    """``(B, N, D)`` tokens -> mean over tokens; ``(B, D, H, W)`` maps -> mean over space; ``(B, D)`` as is."""
    if features.ndim == 3:
        return features.mean(1)
    if features.ndim == 4:
        return features.mean((2, 3))
    if features.ndim == 2:
        return features
    raise ValueError(f"cannot pool features of shape {tuple(features.shape)}")


class ClassifierHead(nn.Module):
    """Pooled features -> LayerNorm -> Linear -> SiLU -> Linear -> one logit per sample."""

    def __init__(self, dim: int, hidden: int | None = None):
        super().__init__()
        hidden = hidden or dim
        self.net = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.SiLU(), nn.Linear(hidden, 1))

    def forward(self, features: Tensor) -> Tensor:
        return self.net(pool_features(features).float()).squeeze(-1)


def spatial_features(features: Tensor) -> Tensor:
    """``(B, N, D)`` tokens of a square patch grid -> ``(B, D, h, w)``; ``(B, D, H, W)`` maps as they are."""
    if features.ndim == 4:
        return features
    if features.ndim == 3:
        b, n, d = features.shape
        side = math.isqrt(n)
        if side * side != n:
            raise ValueError(f"{n} tokens do not form a square grid; use head='pooled'")
        return features.transpose(1, 2).reshape(b, d, side, side)
    raise ValueError(f"cannot lay out features of shape {tuple(features.shape)} spatially; use head='pooled'")


def _groups(ch: int) -> int:
    return math.gcd(ch, 32)


class SpatialClassifierHead(nn.Module):
    """Feature map -> conv 3x3 -> GN -> SiLU -> conv 4x4 stride 2 -> GN -> SiLU -> conv 1x1 -> per-location
    logits, averaged to one logit per sample (DMD2 sec. 4.3: a classifier on the fake-score bottleneck).

    The convolutions before a GroupNorm carry no bias: the norm removes it (with one channel per group, entirely),
    so its true gradient is 0 and Adam would only turn round-off into steps."""

    def __init__(self, dim: int, hidden: int | None = None):
        super().__init__()
        hidden = hidden or dim
        self.net = nn.Sequential(
            nn.Conv2d(dim, hidden, 3, 1, 1, bias=False), nn.GroupNorm(_groups(hidden), hidden), nn.SiLU(),
            nn.Conv2d(hidden, hidden, 4, 2, 1, bias=False), nn.GroupNorm(_groups(hidden), hidden), nn.SiLU(),
            nn.Conv2d(hidden, 1, 1))

    def forward(self, features: Tensor) -> Tensor:
        return self.net(spatial_features(features).float()).mean((1, 2, 3))


HEADS = {"pooled": ClassifierHead, "spatial": SpatialClassifierHead}
