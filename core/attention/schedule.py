"""When to attend sparsely: dense for the first sampling steps and for chosen layers / heads, sparse after.

The first steps of a sampler lay out the global structure and are the most sensitive to dropped attention; later
steps refine local detail, where a sliding window or a top-k mask loses little (the step skipping of Sliding Tile
Attention, Zhang et al. 2025, sec. 4, and the dense warm-up steps of SpargeAttn / Video-BLADE). Some layers and
heads attend globally throughout and are best left dense.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

__all__ = ["SparsitySchedule"]


@dataclass(frozen=True)
class SparsitySchedule:
    """Dense for sampling steps ``< dense_steps``, for the attention layers in ``dense_layers`` (index among the
    patched self-attention layers, in module order) and for the heads in ``dense_heads`` on every layer.

    ``step=None`` (unknown, e.g. training with random timesteps) counts as past the dense steps.
    """

    dense_steps: int = 0
    dense_layers: frozenset[int] = field(default_factory=frozenset)
    dense_heads: tuple[int, ...] = ()

    def __init__(self, dense_steps: int = 0, dense_layers: Iterable[int] = (), dense_heads: Iterable[int] = ()):
        if dense_steps < 0:
            raise ValueError(f"dense_steps must be >= 0, got {dense_steps}")
        object.__setattr__(self, "dense_steps", int(dense_steps))
        object.__setattr__(self, "dense_layers", frozenset(int(i) for i in dense_layers))
        object.__setattr__(self, "dense_heads", tuple(sorted({int(i) for i in dense_heads})))

    def is_dense(self, step: int | None, layer: int | None) -> bool:
        """Whether this (step, layer) runs plain dense attention."""
        if step is not None and step < self.dense_steps:
            return True
        return layer is not None and layer in self.dense_layers
