"""Sparse attention patterns: which key blocks each query block attends.

Static (depends only on the token layout, built once per shape and cached):
    ``SlidingTilePattern`` -- Sliding Tile Attention (Zhang et al. 2025, "Fast Video Generation with Sliding Tile
    Attention", sec. 3.2): tokens are reordered tile by tile, and a query tile attends the key tiles within a window
    around it. Here a key block is kept when the per-dimension gap between the two blocks' token boxes is at most
    ``radius`` tokens, ``max_d gap_d(i, j) <= r_d``; global tokens are always attended and always attend.

Adaptive (computed from q and k at every call):
    ``TopKPattern`` -- per query block, rank key blocks by the pooled score ``s_ij = scale * mean(q_I) . mean(k_J) +
    log |J|`` (block-mean pooling as in SpargeAttn, Zhang et al. 2025, "SpargeAttn", sec. 3.2, and VSA's coarse
    stage, Zhang et al. 2025, "VSA: Faster Video Diffusion with Trainable Sparse Attention", eq. 2; ``log |J|`` counts
    the tokens of a partial block) and keep the top ``ceil(keep_ratio * Kb)`` blocks, or the fewest blocks whose
    softmax mass ``sum_J softmax_J(s_iJ)`` reaches ``mass`` (SpargeAttn's cumulative threshold, eq. 4). Global blocks
    and the diagonal block are always kept, so no query attends nothing.

Both return a ``fewstep.kernels.BlockSparseMask`` over the (tile-reordered) sequence.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ...kernels.block_mask import BlockSparseMask
from .layout import TokenLayout, block_boxes, tile_permutation

__all__ = [
    "SlidingTilePattern",
    "SparsePattern",
    "TopKPattern",
    "default_tile",
    "radius_for_density",
    "sliding_tile_block_mask",
    "topk_block_mask",
]


def default_tile(ndim: int, block_size: int) -> tuple[int, ...]:
    """A tile of ``block_size`` tokens, as square as possible: 64 -> (64,), (8, 8), (4, 4, 4)."""
    side = round(block_size ** (1.0 / ndim))
    tile = [side] * ndim
    tile[-1] = max(1, block_size // math.prod(tile[:-1]))
    return tuple(tile)


def _radius(radius: int | Sequence[int], ndim: int) -> Tensor:
    r = [int(radius)] * ndim if isinstance(radius, int) else [int(x) for x in radius]
    if len(r) != ndim or min(r) < 0:
        raise ValueError(f"radius must be >= 0 for each of the {ndim} grid dims, got {radius}")
    return torch.tensor(r, dtype=torch.long)


def sliding_tile_block_mask(layout: TokenLayout, radius: int | Sequence[int], block_size: int,
                            perm: Tensor | None = None, tile: tuple[int, ...] | int | None = None
                            ) -> BlockSparseMask:
    """Static sliding-tile mask over the sequence ordered by ``perm`` (default ``tile_permutation(layout, tile)``).

    Key block ``j`` is kept for query block ``i`` when, in every grid dim, the gap between the blocks' coordinate
    ranges is ``<= radius`` tokens, or when either block holds a global token."""
    perm = tile_permutation(layout, tile) if perm is None else perm
    lo, hi, glob = block_boxes(layout, perm, block_size)
    gap = torch.maximum(lo[None, :, :] - hi[:, None, :], lo[:, None, :] - hi[None, :, :]).clamp_min(0)
    keep = (gap <= _radius(radius, len(layout.grid))).all(-1)
    keep |= glob[None, :] | glob[:, None]
    s = layout.seq_len
    return BlockSparseMask.from_block_dense(keep, s, s, block_size)


def radius_for_density(layout: TokenLayout, density: float, block_size: int,
                       tile: tuple[int, ...] | int | None = None, isotropic: bool = False
                       ) -> tuple[int | tuple[int, ...], float]:
    """The radius whose sliding-tile mask density is closest to ``density``, and that density.

    Searches per-dimension radii (an anisotropic window) when the grid is small enough (at most 4096 candidates)
    and ``isotropic`` is False, else one radius for all dims."""
    import itertools

    perm = tile_permutation(layout, tile)
    cands: list = list(range(0, max(layout.grid) + 1))
    if not isotropic and len(layout.grid) > 1 and math.prod(g + 1 for g in layout.grid) <= 4096:
        cands = list(itertools.product(*(range(g + 1) for g in layout.grid)))
    best: tuple = (0, 2.0)
    seen: set[float] = set()
    for r in cands:
        d = sliding_tile_block_mask(layout, r, block_size, perm).density()
        if round(d, 9) in seen:
            continue
        seen.add(round(d, 9))
        if abs(d - density) < abs(best[1] - density):
            best = (r, d)
    return best


def _pool(x: Tensor, block: int) -> tuple[Tensor, Tensor]:
    """Mean of each block of ``block`` tokens over its valid tokens: ``(B, H, nb, D)`` and the counts ``(nb,)``."""
    b, h, s, d = x.shape
    nb = -(-s // block)
    pad = nb * block - s
    xf = x.float()
    if pad:
        xf = torch.nn.functional.pad(xf, (0, 0, 0, pad))
    counts = torch.full((nb,), float(block), device=x.device)
    counts[-1] = s - (nb - 1) * block
    return xf.view(b, h, nb, block, d).sum(3) / counts[:, None], counts


def topk_block_mask(q: Tensor, k: Tensor, block_size: int, *, keep_ratio: float | None = None,
                    mass: float | None = None, block_kv: int | None = None, include: BlockSparseMask | None = None,
                    min_blocks: int = 1, scale: float | None = None) -> BlockSparseMask:
    """Adaptive mask from pooled q . k: per (batch, head, query block) keep the top ``keep_ratio`` of key blocks,
    or the fewest reaching softmax ``mass`` (give exactly one of the two). ``include`` blocks are always kept (and
    count towards the ratio and the mass)."""
    if (keep_ratio is None) == (mass is None):
        raise ValueError("give exactly one of keep_ratio (fraction of key blocks) or mass (cumulative threshold)")
    if keep_ratio is not None and not 0.0 < keep_ratio <= 1.0:
        raise ValueError(f"keep_ratio must be in (0, 1], got {keep_ratio}")
    if mass is not None and not 0.0 < mass <= 1.0:
        raise ValueError(f"mass must be in (0, 1], got {mass}")
    block_kv = block_size if block_kv is None else block_kv
    b, h, sq, d = q.shape
    hk, skv = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    with torch.no_grad():
        pq, _ = _pool(q, block_size)
        pk, counts = _pool(k, block_kv)
        if hk != h:
            pk = pk.repeat_interleave(h // hk, dim=1)
        s = torch.einsum("bhid,bhjd->bhij", pq, pk) * scale + counts.log()
        kb = s.shape[-1]
        forced = torch.zeros_like(s, dtype=torch.bool)
        if include is not None:
            forced |= include.to(q.device).to_block_dense()
        rank_key = torch.where(forced, torch.full_like(s, float("inf")), s)
        order = rank_key.argsort(dim=-1, descending=True)
        if keep_ratio is not None:
            n_keep = min(kb, max(min_blocks, math.ceil(keep_ratio * kb)))
            ranked_keep = torch.zeros_like(s, dtype=torch.bool)
            ranked_keep[..., :n_keep] = True
        else:
            p = torch.softmax(s, dim=-1).gather(-1, order)
            before = p.cumsum(-1) - p  # mass of the blocks ranked above
            ranked_keep = before < mass
            ranked_keep[..., :min_blocks] = True
        keep = torch.zeros_like(s, dtype=torch.bool).scatter(-1, order, ranked_keep) | forced
    return BlockSparseMask.from_block_dense(keep, sq, skv, block_size, block_kv)


class SparsePattern:
    """Base class: a pattern reorders the sequence (``permutation``) and gives a block mask over the reordered one
    (``block_mask``). ``block_size`` is the mask block (tokens); ``tile`` the grid tile made contiguous (None: the
    layout's raster order, global tokens moved last)."""

    needs_qk: bool = False

    def __init__(self, block_size: int = 64, tile: tuple[int, ...] | int | None | str = "auto") -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be positive, got {block_size}")
        self.block_size = int(block_size)
        self.tile = tile
        self._cache: dict[Any, Any] = {}

    def tile_for(self, layout: TokenLayout) -> tuple[int, ...] | int | None:
        if self.tile == "auto":
            return default_tile(len(layout.grid), self.block_size)
        return self.tile  # type: ignore[return-value]

    def permutation(self, layout: TokenLayout, device: torch.device | str = "cpu") -> Tensor:
        """Token order of this pattern's blocks (cached per layout and device)."""
        key = ("perm", layout, str(device))
        if key not in self._cache:
            self._cache[key] = tile_permutation(layout, self.tile_for(layout), device)
        return self._cache[key]

    def reorders(self, layout: TokenLayout) -> bool:
        """False when ``permutation`` is the identity (nothing to gather)."""
        key = ("reorders", layout)
        if key not in self._cache:
            perm = self.permutation(layout, "cpu")
            self._cache[key] = not torch.equal(perm, torch.arange(perm.numel()))
        return self._cache[key]

    def block_mask(self, q: Tensor, k: Tensor, layout: TokenLayout) -> BlockSparseMask:
        raise NotImplementedError

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({fields})"


class SlidingTilePattern(SparsePattern):
    """Static sliding tile / window attention over a 1D, 2D or 3D token grid with global tokens (STA, see module
    docstring). ``radius``: tokens of gap allowed per grid dim (int or per-dim)."""

    def __init__(self, radius: int | Sequence[int] = 8, block_size: int = 64,
                 tile: tuple[int, ...] | int | None | str = "auto") -> None:
        super().__init__(block_size, tile)
        self.radius = radius if isinstance(radius, int) else tuple(radius)

    def static_mask(self, layout: TokenLayout, device: torch.device | str = "cpu") -> BlockSparseMask:
        key = ("mask", layout, str(device))
        if key not in self._cache:
            perm = self.permutation(layout, "cpu")
            self._cache[key] = sliding_tile_block_mask(layout, self.radius, self.block_size, perm).to(device)
        return self._cache[key]

    def block_mask(self, q: Tensor, k: Tensor, layout: TokenLayout) -> BlockSparseMask:
        return self.static_mask(layout, q.device)


class TopKPattern(SparsePattern):
    """Adaptive top-k key blocks per query block by pooled q . k (see module docstring). Give ``keep_ratio``
    (fraction of key blocks) or ``mass`` (cumulative softmax threshold)."""

    needs_qk = True

    def __init__(self, keep_ratio: float | None = None, mass: float | None = None, block_size: int = 64,
                 tile: tuple[int, ...] | int | None | str = "auto", keep_globals: bool = True,
                 keep_diagonal: bool = True, min_blocks: int = 1) -> None:
        super().__init__(block_size, tile)
        if (keep_ratio is None) == (mass is None):
            raise ValueError("TopKPattern needs exactly one of keep_ratio or mass")
        self.keep_ratio, self.mass = keep_ratio, mass
        self.keep_globals, self.keep_diagonal, self.min_blocks = keep_globals, keep_diagonal, min_blocks

    def always_kept(self, layout: TokenLayout, device: torch.device | str = "cpu") -> BlockSparseMask | None:
        """Blocks kept whatever the scores say: global rows/columns and the diagonal."""
        if not (self.keep_globals or self.keep_diagonal):
            return None
        key = ("include", layout, str(device))
        if key not in self._cache:
            s, bs = layout.seq_len, self.block_size
            nb = -(-s // bs)
            keep = torch.zeros(nb, nb, dtype=torch.bool)
            if self.keep_diagonal:
                keep |= torch.eye(nb, dtype=torch.bool)
            if self.keep_globals and layout.num_global:
                _, _, glob = block_boxes(layout, self.permutation(layout, "cpu"), bs)
                keep |= glob[None, :] | glob[:, None]
            self._cache[key] = BlockSparseMask.from_block_dense(keep, s, s, bs).to(device)
        return self._cache[key]

    def block_mask(self, q: Tensor, k: Tensor, layout: TokenLayout) -> BlockSparseMask:
        return topk_block_mask(q, k, self.block_size, keep_ratio=self.keep_ratio, mass=self.mass,
                               include=self.always_kept(layout, q.device), min_blocks=self.min_blocks)
