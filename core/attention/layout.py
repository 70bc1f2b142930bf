"""Where each token of an attention sequence sits: a 1D/2D/3D grid of spatial tokens plus global tokens.

Block-sparse attention works on contiguous blocks of the sequence, but a model's tokens are laid out in raster
order: a block of 64 consecutive image tokens is a thin strip, not a square. Sliding Tile Attention (Zhang et al.
2025, "Fast Video Generation with Sliding Tile Attention", sec. 3.1) reorders tokens so that each ``tile`` of the
grid (e.g. 8x8 or 4x4x4) is contiguous; a block then covers one compact tile. ``tile_permutation`` gives that
order; global tokens (text / conditioning) go after the grid tokens so that tiles start on block boundaries.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["TokenLayout", "block_boxes", "latent_token_grid", "tile_permutation"]


@dataclass(frozen=True)
class TokenLayout:
    """A sequence of ``num_global`` global tokens and ``prod(grid)`` spatial tokens in raster order.

    Args:
        grid: spatial token grid, ``(L,)``, ``(H, W)`` or ``(T, H, W)``.
        num_global: tokens attended by every query and attending every key (text, class or register tokens).
        global_first: whether the global tokens precede the grid tokens in the sequence (Flux, CogVideoX) or
            follow them (SD3, HunyuanVideo).
    """

    grid: tuple[int, ...]
    num_global: int = 0
    global_first: bool = True

    def __post_init__(self) -> None:
        grid = tuple(int(g) for g in self.grid)
        if not 1 <= len(grid) <= 3 or min(grid) < 1:
            raise ValueError(f"grid must have 1 to 3 positive sizes, got {self.grid}")
        if self.num_global < 0:
            raise ValueError(f"num_global must be >= 0, got {self.num_global}")
        object.__setattr__(self, "grid", grid)

    @property
    def num_spatial(self) -> int:
        return math.prod(self.grid)

    @property
    def seq_len(self) -> int:
        return self.num_global + self.num_spatial

    @classmethod
    def for_sequence(cls, seq_len: int, grid: tuple[int, ...] | None = None,
                     global_first: bool = True) -> TokenLayout:
        """The layout of a ``seq_len`` sequence with the given spatial grid (the remaining tokens are global);
        a 1D grid of all tokens when ``grid`` is None or does not fit."""
        if grid is None or math.prod(grid) > seq_len:
            return cls((seq_len,))
        return cls(tuple(grid), seq_len - math.prod(grid), global_first)


def _clip_tile(layout: TokenLayout, tile: tuple[int, ...] | int | None) -> tuple[int, ...] | None:
    if tile is None:
        return None
    if isinstance(tile, int):
        tile = (tile,) * len(layout.grid)
    if len(tile) != len(layout.grid):
        raise ValueError(f"tile {tile} has {len(tile)} dims but the grid {layout.grid} has {len(layout.grid)}")
    return tuple(max(1, min(int(t), g)) for t, g in zip(tile, layout.grid))


@functools.lru_cache(maxsize=64)
def _tile_permutation(layout: TokenLayout, tile: tuple[int, ...] | None) -> tuple[int, ...]:
    g0 = layout.num_global if layout.global_first else 0
    s0 = 0 if layout.global_first else layout.num_spatial
    raster = torch.arange(layout.num_spatial).view(*layout.grid)
    if tile is not None:
        # pad each dim to a multiple of the tile, reorder tile-major, drop the padding
        padded = [-(-g // t) * t for g, t in zip(layout.grid, tile)]
        full = torch.full(padded, -1, dtype=torch.long)
        full[tuple(slice(0, g) for g in layout.grid)] = raster
        nd = len(tile)
        shape: list[int] = []
        for p, t in zip(padded, tile):
            shape += [p // t, t]
        x = full.view(*shape).permute(*range(0, 2 * nd, 2), *range(1, 2 * nd, 2)).reshape(-1)
        order = x[x >= 0]
    else:
        order = raster.reshape(-1)
    spatial = (order + g0).tolist()
    glob = [s0 + i for i in range(layout.num_global)]
    return tuple(spatial + glob)


def tile_permutation(layout: TokenLayout, tile: tuple[int, ...] | int | None,
                     device: torch.device | str = "cpu") -> Tensor:
    """Sequence positions in tile-major order: ``x[..., perm, :]`` puts each tile's tokens next to each other and
    the global tokens last; ``tile=None`` only moves the global tokens last."""
    return torch.tensor(_tile_permutation(layout, _clip_tile(layout, tile)), dtype=torch.long, device=device)


def block_boxes(layout: TokenLayout, perm: Tensor, block: int) -> tuple[Tensor, Tensor, Tensor]:
    """For each block of ``block`` tokens of the permuted sequence: per-dim min and max grid coordinates of its
    spatial tokens ``(nb, ndim)`` each, and whether it holds a global token ``(nb,)``."""
    perm = perm.cpu()
    s = layout.seq_len
    g0 = layout.num_global if layout.global_first else 0
    pos = perm - g0
    is_global = (pos < 0) | (pos >= layout.num_spatial)
    coords = torch.zeros(s, len(layout.grid), dtype=torch.long)
    rem = pos.clamp(0, layout.num_spatial - 1)
    for d in range(len(layout.grid) - 1, -1, -1):
        coords[:, d] = rem % layout.grid[d]
        rem = rem // layout.grid[d]
    nb = -(-s // block)
    big = torch.iinfo(torch.long).max // 4
    lo = torch.full((nb * block, len(layout.grid)), big, dtype=torch.long)
    hi = torch.full((nb * block, len(layout.grid)), -big, dtype=torch.long)
    lo[:s] = torch.where(is_global[:, None], big, coords)
    hi[:s] = torch.where(is_global[:, None], -big, coords)
    glob = torch.zeros(nb * block, dtype=torch.bool)
    glob[:s] = is_global
    return (lo.view(nb, block, -1).amin(1), hi.view(nb, block, -1).amax(1), glob.view(nb, block).any(1))


def latent_token_grid(spatial: tuple[int, ...] | list[int], patch: int | tuple[int, ...] | list[int] | None = None
                      ) -> tuple[int, ...]:
    """The token grid a patch embedding makes of a latent with spatial size ``spatial`` (``(H, W)`` or
    ``(T, H, W)``): ``ceil(size / patch)`` per dim (DiTs pad the latent to a multiple of the patch). ``patch`` is an
    int for every dim, or one per dim (a longer tuple gives its last dims, e.g. Wan's ``(1, 2, 2)``)."""
    spatial = tuple(int(s) for s in spatial)
    if not 1 <= len(spatial) <= 3 or min(spatial) < 1:
        raise ValueError(f"a latent's spatial size has 1 to 3 positive dims, got {spatial}")
    if patch is None:
        p: tuple[int, ...] = (1,) * len(spatial)
    elif isinstance(patch, int):
        p = (int(patch),) * len(spatial)
    else:
        p = tuple(int(x) for x in patch)
        p = p[-len(spatial):] if len(p) >= len(spatial) else (1,) * (len(spatial) - len(p)) + p
    if min(p) < 1:
        raise ValueError(f"patch sizes must be positive, got {patch}")
    return tuple(-(-s // q) for s, q in zip(spatial, p))
