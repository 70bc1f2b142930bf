"""Sparse attention on q, k, v tensors with a pattern: reorder tokens, build the block mask, dispatch, restore.

This is the one call the adapters share (the diffusers processor here, the ComfyUI ``optimized_attention_override``
in ``nodes/``): it needs only ``(B, H, S, D)`` tensors and the token layout.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ...kernels.block_mask import BlockSparseMask
from ...kernels.dispatch import block_sparse_attention
from .layout import TokenLayout
from .patterns import SparsePattern

__all__ = ["pattern_mask", "sparse_attention", "sparse_attention_packed"]


def _check_layout(layout: TokenLayout | None, seq_len: int) -> TokenLayout:
    if layout is None:
        return TokenLayout((seq_len,))
    if layout.seq_len != seq_len:
        raise ValueError(f"layout {layout} describes {layout.seq_len} tokens but the sequence has {seq_len}")
    return layout


def pattern_mask(q: Tensor, k: Tensor, pattern: SparsePattern, layout: TokenLayout | None = None,
                 dense_heads: Sequence[int] = ()) -> tuple[Tensor, BlockSparseMask]:
    """The permutation and the block mask ``sparse_attention`` would use (the mask is over the permuted
    sequence). ``q``/``k`` are in the original order."""
    layout = _check_layout(layout, q.shape[2])
    perm = pattern.permutation(layout, q.device)
    qp, kp = (q.index_select(2, perm), k.index_select(2, perm)) if pattern.reorders(layout) else (q, k)
    mask = pattern.block_mask(qp, kp, layout)
    if dense_heads:
        mask = mask.with_dense_heads(dense_heads, q.shape[1])
    return perm, mask


def sparse_attention(q: Tensor, k: Tensor, v: Tensor, pattern: SparsePattern, layout: TokenLayout | None = None, *,
                     scale: float | None = None, backend: str = "auto", compile: bool | None = None,
                     dense_heads: Sequence[int] = (), return_mask: bool = False
                     ) -> Tensor | tuple[Tensor, BlockSparseMask]:
    """Self-attention of ``q (B, H, S, D)`` over ``k, v (B, Hkv, S, D)`` with ``pattern``'s block mask.

    Tokens are gathered into the pattern's tile order (``x[:, :, perm]``), attended with
    ``fewstep.kernels.block_sparse_attention`` and scattered back, so the result is in the input order. ``layout``
    says where the grid and the global tokens are (default: a 1D sequence). ``dense_heads`` stay dense.
    ``return_mask=True`` also returns the block mask used (over the permuted sequence).
    """
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"sparse_attention is for self-attention; got {q.shape[2]} queries and {k.shape[2]} keys")
    layout = _check_layout(layout, q.shape[2])
    reorder = pattern.reorders(layout)
    perm = pattern.permutation(layout, q.device)
    qp, kp, vp = (x.index_select(2, perm) for x in (q, k, v)) if reorder else (q, k, v)
    mask = pattern.block_mask(qp, kp, layout)
    if dense_heads:
        mask = mask.with_dense_heads(dense_heads, q.shape[1])
    out = block_sparse_attention(qp, kp, vp, mask, scale=scale, backend=backend, compile=compile)
    if reorder:
        inv = torch.empty_like(perm)
        inv[perm] = torch.arange(perm.numel(), device=perm.device)
        out = out.index_select(2, inv)
    return (out, mask) if return_mask else out


def sparse_attention_packed(q: Tensor, k: Tensor, v: Tensor, heads: int, pattern: SparsePattern,
                            layout: TokenLayout | None = None, *, skip_reshape: bool = False,
                            skip_output_reshape: bool = False, **kwargs) -> Tensor | tuple[Tensor, BlockSparseMask]:
    """``sparse_attention`` with the packed ``(B, S, heads * D)`` layout of ComfyUI's ``optimized_attention``
    functions (``skip_reshape``: inputs already ``(B, H, S, D)``; ``skip_output_reshape``: return ``(B, H, S, D)``).
    ``kwargs`` go to ``sparse_attention`` (with ``return_mask=True`` the block mask is returned too)."""
    if not skip_reshape:
        b, s, _ = q.shape
        q, k, v = (t.view(b, t.shape[1], heads, -1).transpose(1, 2) for t in (q, k, v))
    result = sparse_attention(q, k, v, pattern, layout, **kwargs)
    out, mask = result if kwargs.get("return_mask") else (result, None)
    if not skip_output_reshape:
        b, h, s, d = out.shape
        out = out.transpose(1, 2).reshape(b, s, h * d)
    return (out, mask) if kwargs.get("return_mask") else out
