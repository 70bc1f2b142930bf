"""One block-sparse mask format for every attention path.

A ``BlockSparseMask`` says, for each (batch, head, query block), which key blocks are attended. It is stored the
way FlexAttention's ``BlockMask`` stores it (Dong et al. 2024, "Flex Attention: A Programming Model for Generating
Optimized Attention Kernels", sec. 4.2): a row count ``kv_num_blocks[b, h, i]`` and a row of key-block indices
``kv_indices[b, h, i, :]`` of which the first ``kv_num_blocks[b, h, i]`` are valid and ascending. This is CSR with
padded rows (``to_csr`` gives the plain ``crow_indices``/``col_indices`` pair). Within a kept block every token pair
is attended (the mask is block-level); tokens past ``q_len``/``kv_len`` in the last, partial blocks are padding and
never attended.

Semantics shared by every kernel (and checked against ``reference.dense_masked_attention``)::

    O[b, h, i] = softmax_j(scale * q_i . k_j  over j with M[b, h, i, j]) @ V,   and O = 0 for rows with no j,

where ``M = mask.to_dense()`` (Vaswani et al. 2017, eq. 1, restricted to the mask). The batch and head dimensions
of the mask may be 1 (broadcast over the batch or the query heads).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["BlockSparseMask"]


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


class BlockSparseMask:
    """Block-sparse attention mask in padded-CSR (FlexAttention) layout.

    Args:
        kv_num_blocks: ``(B, H, Qb)`` integer, number of key blocks attended by each query block (``B``/``H`` may be
            1 to broadcast).
        kv_indices: ``(B, H, Qb, K)`` integer, ``K <= Kb``; the first ``kv_num_blocks`` entries of each row are the
            attended key blocks in ascending order, the rest is ignored.
        q_len, kv_len: token lengths of the query and key sequences.
        block_q, block_kv: tokens per query / key block. ``Qb = ceil(q_len / block_q)``, ``Kb = ceil(kv_len /
            block_kv)``.
    """

    def __init__(self, kv_num_blocks: Tensor, kv_indices: Tensor, q_len: int, kv_len: int, block_q: int,
                 block_kv: int | None = None) -> None:
        block_kv = block_q if block_kv is None else block_kv
        if block_q < 1 or block_kv < 1:
            raise ValueError(f"block sizes must be positive, got block_q={block_q}, block_kv={block_kv}")
        if q_len < 1 or kv_len < 1:
            raise ValueError(f"sequence lengths must be positive, got q_len={q_len}, kv_len={kv_len}")
        if kv_num_blocks.dtype.is_floating_point or kv_indices.dtype.is_floating_point or \
                kv_num_blocks.dtype == torch.bool:
            raise TypeError("kv_num_blocks and kv_indices must be integer tensors")
        if kv_num_blocks.ndim != 3 or kv_indices.ndim != 4:
            raise ValueError(f"kv_num_blocks must be (B, H, Qb) and kv_indices (B, H, Qb, K); got "
                             f"{tuple(kv_num_blocks.shape)} and {tuple(kv_indices.shape)}")
        qb, kb = _cdiv(q_len, block_q), _cdiv(kv_len, block_kv)
        if kv_num_blocks.shape[-1] != qb or tuple(kv_indices.shape[:3]) != tuple(kv_num_blocks.shape):
            raise ValueError(f"q_len={q_len} with block_q={block_q} needs {qb} query blocks; kv_num_blocks has shape "
                             f"{tuple(kv_num_blocks.shape)} and kv_indices {tuple(kv_indices.shape)}")
        if kv_indices.shape[-1] > kb or kv_indices.shape[-1] < 1:
            raise ValueError(f"kv_indices has {kv_indices.shape[-1]} columns but kv_len={kv_len} with "
                             f"block_kv={block_kv} has {kb} key blocks")
        self.kv_num_blocks = kv_num_blocks.to(torch.int32).contiguous()
        self.kv_indices = kv_indices.to(torch.int32).contiguous()
        self.q_len, self.kv_len = int(q_len), int(kv_len)
        self.block_q, self.block_kv = int(block_q), int(block_kv)
        self._cache: dict[Any, Any] = {}

    # ----------------------------------------------------------------------------------------------- construction
    @classmethod
    def from_block_dense(cls, blocks: Tensor, q_len: int, kv_len: int, block_q: int,
                         block_kv: int | None = None) -> BlockSparseMask:
        """From a boolean ``(B, H, Qb, Kb)`` (or ``(Qb, Kb)``) block table: True = key block attended."""
        if blocks.dtype != torch.bool:
            raise TypeError(f"block table must be boolean, got {blocks.dtype}")
        while blocks.ndim < 4:
            blocks = blocks.unsqueeze(0)
        num = blocks.sum(-1, dtype=torch.int32)
        # stable sort puts kept blocks first, in ascending order (full width: no device sync to find the widest row)
        idx = torch.argsort((~blocks).to(torch.int8), dim=-1, stable=True).to(torch.int32)
        out = cls(num, idx, q_len, kv_len, block_q, block_kv)
        out._cache["block_dense"] = blocks
        return out

    @classmethod
    def full(cls, q_len: int, kv_len: int, block_q: int, block_kv: int | None = None,
             device: torch.device | str | None = None) -> BlockSparseMask:
        """Every query block attends every key block (equals plain dense attention)."""
        block_kv = block_q if block_kv is None else block_kv
        qb, kb = _cdiv(q_len, block_q), _cdiv(kv_len, block_kv)
        return cls.from_block_dense(torch.ones(1, 1, qb, kb, dtype=torch.bool, device=device), q_len, kv_len,
                                    block_q, block_kv)

    @classmethod
    def from_dense(cls, mask: Tensor, block_q: int, block_kv: int | None = None) -> BlockSparseMask:
        """Coarsen a token-level boolean ``(..., q_len, kv_len)`` mask: a block is kept if any pair in it is.

        Lossless only for masks that are constant on blocks (``to_dense`` of the result then equals ``mask``)."""
        block_kv = block_q if block_kv is None else block_kv
        while mask.ndim < 4:
            mask = mask.unsqueeze(0)
        q_len, kv_len = mask.shape[-2:]
        qb, kb = _cdiv(q_len, block_q), _cdiv(kv_len, block_kv)
        pad = torch.zeros(*mask.shape[:2], qb * block_q, kb * block_kv, dtype=torch.bool, device=mask.device)
        pad[..., :q_len, :kv_len] = mask
        blocks = pad.view(*mask.shape[:2], qb, block_q, kb, block_kv).any(-1).any(-2)
        return cls.from_block_dense(blocks, q_len, kv_len, block_q, block_kv)

    # --------------------------------------------------------------------------------------------------- shape
    @property
    def num_q_blocks(self) -> int:
        return self.kv_num_blocks.shape[-1]

    @property
    def num_kv_blocks(self) -> int:
        return _cdiv(self.kv_len, self.block_kv)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """``(B, H, q_len, kv_len)`` with the mask's own (possibly broadcast, 1) batch and head sizes."""
        b, h, _ = self.kv_num_blocks.shape
        return b, h, self.q_len, self.kv_len

    @property
    def device(self) -> torch.device:
        return self.kv_num_blocks.device

    def to(self, device: torch.device | str) -> BlockSparseMask:
        if torch.device(device) == self.device:
            return self
        return BlockSparseMask(self.kv_num_blocks.to(device), self.kv_indices.to(device), self.q_len, self.kv_len,
                               self.block_q, self.block_kv)

    def __repr__(self) -> str:
        b, h, _, _ = self.shape
        return (f"BlockSparseMask(B={b}, H={h}, q_len={self.q_len}, kv_len={self.kv_len}, block=({self.block_q}, "
                f"{self.block_kv}), blocks={self.num_q_blocks}x{self.num_kv_blocks}, density={self.density():.3f})")

    # ------------------------------------------------------------------------------------------------ conversion
    def to_block_dense(self) -> Tensor:
        """Boolean ``(B, H, Qb, Kb)`` block table."""
        if "block_dense" not in self._cache:
            kb = self.num_kv_blocks
            cols = torch.arange(self.kv_indices.shape[-1], device=self.device)
            valid = cols < self.kv_num_blocks.unsqueeze(-1).long()
            out = torch.zeros(*self.kv_num_blocks.shape, kb + 1, dtype=torch.bool, device=self.device)
            idx = torch.where(valid, self.kv_indices.long().clamp(0, kb - 1), kb)  # invalid -> spare column
            out.scatter_(-1, idx, True)
            self._cache["block_dense"] = out[..., :kb]
        return self._cache["block_dense"]

    def to_dense(self) -> Tensor:
        """Token-level boolean ``(B, H, q_len, kv_len)`` mask (True = attended)."""
        blocks = self.to_block_dense()
        dense = blocks.repeat_interleave(self.block_q, dim=-2).repeat_interleave(self.block_kv, dim=-1)
        return dense[..., : self.q_len, : self.kv_len]

    def to_csr(self) -> tuple[Tensor, Tensor]:
        """Plain CSR over the flattened ``B*H*Qb`` rows: ``(crow_indices (R+1,), col_indices (nnz,))``, int64."""
        num = self.kv_num_blocks.reshape(-1).long()
        crow = torch.zeros(num.numel() + 1, dtype=torch.long, device=self.device)
        crow[1:] = torch.cumsum(num, 0)
        cols = torch.arange(self.kv_indices.shape[-1], device=self.device)
        valid = cols < self.kv_num_blocks.unsqueeze(-1)
        return crow, self.kv_indices[valid].long()

    def transpose(self) -> tuple[Tensor, Tensor]:
        """Query blocks per key block, ``(q_num_blocks (B, H, Kb), q_indices (B, H, Kb, Qb))`` int32 (for the
        backward pass over key blocks)."""
        if "transpose" not in self._cache:
            t = self.to_block_dense().transpose(-1, -2)
            num = t.sum(-1, dtype=torch.int32)
            idx = torch.argsort((~t).to(torch.int8), dim=-1, stable=True).to(torch.int32)
            self._cache["transpose"] = (num.contiguous(), idx.contiguous())
        return self._cache["transpose"]

    def to_flex_block_mask(self, full_blocks: bool | None = None):
        """A ``torch.nn.attention.flex_attention.BlockMask`` with the same semantics.

        The block table is also given as ``mask_mod`` (a table lookup), because FlexAttention's eager path reads only
        ``mask_mod``; the compiled kernels read the block lists. ``full_blocks`` lists the blocks as "full" (no
        ``mask_mod`` evaluated inside them; the faster choice on CUDA) instead of "partial" (the only form the CPU
        compiled kernel of torch 2.13 builds). Default: full on CUDA, partial elsewhere.
        """
        from torch.nn.attention.flex_attention import BlockMask

        full_blocks = self.device.type == "cuda" if full_blocks is None else full_blocks
        key = ("flex", full_blocks)
        if key in self._cache:
            return self._cache[key]
        kb = self.num_kv_blocks
        num = self.kv_num_blocks
        # FlexAttention expects kv_indices with one column per key block: pad each row with its unused blocks.
        idx = self.kv_indices
        if idx.shape[-1] < kb:
            blocks = self.to_block_dense()
            idx = torch.argsort((~blocks).to(torch.int8), dim=-1, stable=True).to(torch.int32)
        table = self.to_block_dense()
        bq, bk = self.block_q, self.block_kv
        tb, th = table.shape[0], table.shape[1]

        def block_table_mask(b, h, q_idx, kv_idx):
            bi = b if tb > 1 else 0
            hi = h if th > 1 else 0
            return table[bi, hi, q_idx // bq, kv_idx // bk]

        if full_blocks:
            bm = BlockMask.from_kv_blocks(torch.zeros_like(num), idx, num, idx, BLOCK_SIZE=(bq, bk),
                                          mask_mod=block_table_mask, seq_lengths=(self.q_len, self.kv_len))
        else:
            bm = BlockMask.from_kv_blocks(num, idx, BLOCK_SIZE=(bq, bk), mask_mod=block_table_mask,
                                          seq_lengths=(self.q_len, self.kv_len))
        self._cache[key] = bm
        return bm

    # ------------------------------------------------------------------------------------------------ algebra
    def density(self) -> float:
        """Fraction of (query, key) token pairs attended, averaged over the mask's batch and heads."""
        blocks = self.to_block_dense().float()
        rows = torch.full((self.num_q_blocks,), float(self.block_q), device=self.device)
        rows[-1] = self.q_len - (self.num_q_blocks - 1) * self.block_q
        cols = torch.full((self.num_kv_blocks,), float(self.block_kv), device=self.device)
        cols[-1] = self.kv_len - (self.num_kv_blocks - 1) * self.block_kv
        pairs = torch.einsum("bhij,i,j->bh", blocks, rows, cols)
        return float(pairs.mean() / (self.q_len * self.kv_len))

    def block_density(self) -> float:
        """Fraction of blocks kept (ignores the smaller last blocks)."""
        return float(self.kv_num_blocks.float().mean() / self.num_kv_blocks)

    def expand(self, batch: int, heads: int) -> BlockSparseMask:
        """Materialise broadcast batch/head dimensions."""
        b, h, _, _ = self.shape
        if (b, h) == (batch, heads):
            return self
        if b not in (1, batch) or h not in (1, heads):
            raise ValueError(f"mask with batch {b} and heads {h} cannot broadcast to ({batch}, {heads})")
        blocks = self.to_block_dense().expand(batch, heads, -1, -1)
        return BlockSparseMask.from_block_dense(blocks.contiguous(), self.q_len, self.kv_len, self.block_q,
                                                self.block_kv)

    def union(self, other: BlockSparseMask) -> BlockSparseMask:
        """Blocks kept by either mask (same lengths and block sizes; batch/heads broadcast)."""
        self._check_compatible(other)
        return BlockSparseMask.from_block_dense(self.to_block_dense() | other.to_block_dense(), self.q_len,
                                                self.kv_len, self.block_q, self.block_kv)

    def with_dense_heads(self, heads: list[int] | tuple[int, ...], num_heads: int) -> BlockSparseMask:
        """Make the listed heads fully dense (e.g. heads found to need global attention)."""
        m = self.expand(self.shape[0], num_heads)
        blocks = m.to_block_dense().clone()
        blocks[:, list(heads)] = True
        return BlockSparseMask.from_block_dense(blocks, self.q_len, self.kv_len, self.block_q, self.block_kv)

    def _check_compatible(self, other: BlockSparseMask) -> None:
        if (self.q_len, self.kv_len, self.block_q, self.block_kv) != (other.q_len, other.kv_len, other.block_q,
                                                                        other.block_kv):
            raise ValueError("masks differ in lengths or block sizes")

    def is_full(self) -> bool:
        return bool((self.kv_num_blocks == self.num_kv_blocks).all())

    def has_empty_rows(self) -> bool:
        return bool((self.kv_num_blocks == 0).any())
