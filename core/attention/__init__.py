"""fewstep.core.attention: sparse attention patterns -> block masks -> ``fewstep.kernels`` dispatch.

- Layout: ``TokenLayout`` (grid + global tokens), ``tile_permutation`` (tile-major token order).
- Patterns: ``SlidingTilePattern`` (static sliding tile / window over 1D-3D grids, global tokens always attended),
  ``TopKPattern`` (adaptive top-k key blocks by pooled q.k, keep ratio or cumulative mass); the functions
  ``sliding_tile_block_mask`` and ``topk_block_mask`` behind them.
- ``SparsitySchedule``: dense for the first steps / chosen layers / heads.
- ``sparse_attention(q, k, v, pattern, layout)``: the tensor-level call every adapter shares;
  ``sparse_attention_packed`` takes ComfyUI's packed ``(B, S, H*D)`` layout.
- diffusers: ``apply_sparse_attention(model, pattern, schedule)`` -> handle with ``remove()``.
- The mask format and kernels live in ``fewstep.kernels`` (``BlockSparseMask``, ``block_sparse_attention``).
"""

from ...kernels.block_mask import BlockSparseMask
from ...kernels.dispatch import block_sparse_attention
from .diffusers_processor import SparseAttention, SparseAttnProcessor, apply_sparse_attention, infer_grid
from .layout import TokenLayout, block_boxes, latent_token_grid, tile_permutation
from .patterns import (
    SlidingTilePattern,
    SparsePattern,
    TopKPattern,
    default_tile,
    radius_for_density,
    sliding_tile_block_mask,
    topk_block_mask,
)
from .schedule import SparsitySchedule
from .sparse import pattern_mask, sparse_attention, sparse_attention_packed

__all__ = [
    "BlockSparseMask",
    "SlidingTilePattern",
    "SparseAttention",
    "SparseAttnProcessor",
    "SparsePattern",
    "SparsitySchedule",
    "TokenLayout",
    "TopKPattern",
    "apply_sparse_attention",
    "block_boxes",
    "block_sparse_attention",
    "default_tile",
    "infer_grid",
    "latent_token_grid",
    "pattern_mask",
    "radius_for_density",
    "sliding_tile_block_mask",
    "sparse_attention",
    "sparse_attention_packed",
    "tile_permutation",
    "topk_block_mask",
]
