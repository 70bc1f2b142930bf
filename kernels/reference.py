"""Dense masked attention: the ground truth every block-sparse path is tested against.

``softmax(scale * Q K^T + log M) V`` (Vaswani et al. 2017, "Attention Is All You Need", eq. 1) computed by
``torch.nn.functional.scaled_dot_product_attention`` with a boolean mask, plus one rule of our own: a query row
that attends no key returns zeros (SDPA's answer there depends on the backend and version).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .block_mask import BlockSparseMask

__all__ = ["dense_attention", "dense_masked_attention"]


def _expand_kv(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    h, hk = q.shape[1], k.shape[1]
    if h == hk:
        return k, v
    return k.repeat_interleave(h // hk, dim=1), v.repeat_interleave(h // hk, dim=1)


def dense_attention(q: Tensor, k: Tensor, v: Tensor, scale: float | None = None) -> Tensor:
    """Plain (full) attention on ``(B, H, S, D)`` tensors; key/value heads may divide query heads (GQA/MQA)."""
    k, v = _expand_kv(q, k, v)
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


def dense_masked_attention(q: Tensor, k: Tensor, v: Tensor, mask: BlockSparseMask | Tensor | None,
                           scale: float | None = None) -> Tensor:
    """Attention of ``q (B, H, Sq, D)`` over ``k, v (B, Hkv, Skv, D)`` restricted to ``mask``.

    ``mask`` is a ``BlockSparseMask`` or a boolean tensor broadcastable to ``(B, H, Sq, Skv)`` (True = attend);
    rows with no attended key give zeros. Differentiable (autograd through SDPA's math path).
    """
    if mask is None:
        return dense_attention(q, k, v, scale)
    dense = mask.to(q.device).to_dense() if isinstance(mask, BlockSparseMask) else mask
    if dense.dtype != torch.bool:
        raise TypeError(f"mask must be boolean (True = attend), got {dense.dtype}")
    k, v = _expand_kv(q, k, v)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=dense, scale=scale)
    has_key = dense.any(-1, keepdim=True)
    return torch.where(has_key, out, torch.zeros((), dtype=out.dtype, device=out.device))
