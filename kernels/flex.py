"""Block-sparse attention through PyTorch FlexAttention.

``torch.nn.attention.flex_attention`` with a ``BlockMask`` built from our ``BlockSparseMask`` (Dong et al. 2024,
"Flex Attention: A Programming Model for Generating Optimized Attention Kernels"): compiled (``torch.compile``) it
generates a fused kernel that skips unlisted blocks (Triton on CUDA, C++ on CPU); eager it is an unfused reference
that materialises the score matrix. Fully masked rows come out as zeros, as in our reference.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import Tensor

from .block_mask import BlockSparseMask

__all__ = ["flex_available", "flex_block_sparse_attention"]


@functools.cache
def flex_available() -> bool:
    """True when this torch has ``torch.nn.attention.flex_attention`` (torch >= 2.5)."""
    try:
        from torch.nn.attention import flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


@functools.cache
def _flex_fn(compiled: bool) -> Callable[..., Tensor]:
    from torch.nn.attention.flex_attention import flex_attention

    if not compiled:
        return flex_attention
    return torch.compile(flex_attention, dynamic=False)


def flex_block_sparse_attention(q: Tensor, k: Tensor, v: Tensor, mask: BlockSparseMask, scale: float | None = None,
                                compile: bool = True) -> Tensor:
    """FlexAttention over ``q (B, H, Sq, D)``, ``k, v (B, Hkv, Skv, D)`` restricted to ``mask`` (GQA when
    ``Hkv`` divides ``H``). ``compile=False`` runs FlexAttention's eager (dense, unfused) implementation."""
    import warnings

    block_mask = mask.to(q.device).to_flex_block_mask()
    fn = _flex_fn(bool(compile))
    with warnings.catch_warnings():
        # the eager path warns on every call that it is unfused; that is what was asked for here
        warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
        out = fn(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
    return out
