"""Triton block-sparse flash attention: forward and backward, fp16/bf16/fp32, GQA/MQA, any head dim up to 256.

Kernel bodies and the equations are in ``_triton_kernels`` (FlashAttention-2, Dao 2023, Algorithms 1-2, with the
key loop restricted to the listed blocks). This module launches them with ``triton.jit``: compiled for CUDA tensors, or
run by Triton's interpreter on CPU tensors when triton was imported with ``TRITON_INTERPRET=1`` (slow; for tests at
small sizes).

Kernel tiles: ``BLOCK_M`` divides the mask's ``block_q`` and ``BLOCK_N`` divides its ``block_kv`` (at most 64 / 64 on
GPU), so mask blocks of 16, 32, 64, 128, ... tokens all work; the head dimension is padded to a power of two inside
the kernel (masked loads), so 24, 72, 80 are fine.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch
from torch import Tensor

from .block_mask import BlockSparseMask

__all__ = ["TRITON_DTYPES", "triton_available", "triton_block_sparse_attention", "triton_unsupported_reason"]

TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MAX_HEAD_DIM = 256


@functools.cache
def triton_available() -> bool:
    """True when ``import triton`` works (it may still have no GPU: see ``triton_unsupported_reason``)."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # ImportError, or a broken install raising at import time
        return False
    return True


def interpreter_active() -> bool:
    """True when triton was imported in interpreter mode (``TRITON_INTERPRET=1`` set before ``import triton``):
    then kernels run on CPU tensors through Triton's interpreter (slow; for tests at small sizes). The mode is
    fixed at import, because triton's own library functions are decorated then."""
    if not triton_available():
        return False
    import triton.language.standard as std
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(getattr(std, "zeros", None), InterpretedFunction)


def _tile(block: int, cap: int) -> int | None:
    """Largest power-of-two tile in [16, cap] dividing ``block``."""
    t = cap
    while t >= 16:
        if block % t == 0:
            return t
        t //= 2
    return None


def triton_unsupported_reason(q: Tensor, k: Tensor, v: Tensor, mask: BlockSparseMask) -> str | None:
    """Why the Triton path cannot run these inputs (``None`` when it can)."""
    if not triton_available():
        return "triton is not installed (pip install triton)"
    if q.device.type == "cpu":
        if not interpreter_active():
            return ("CPU tensors need Triton's interpreter (TRITON_INTERPRET=1 set before triton is imported; slow, "
                    "for tests)")
    elif q.device.type != "cuda":
        return f"device {q.device.type} is not supported by the Triton kernel"
    if q.dtype not in TRITON_DTYPES:
        return f"dtype {q.dtype} is not supported by the Triton kernel (fp16, bf16, fp32)"
    if not (q.dtype == k.dtype == v.dtype):
        return f"q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype})"
    if q.shape[-1] != v.shape[-1]:
        return "the Triton kernel needs the value head dim to equal the query head dim"
    if q.shape[-1] > _MAX_HEAD_DIM:
        return f"head dim {q.shape[-1]} > {_MAX_HEAD_DIM}"
    if _tile(mask.block_q, 64) is None or _tile(mask.block_kv, 64) is None:
        return (f"block sizes ({mask.block_q}, {mask.block_kv}) must be multiples of 16 for the Triton kernel")
    return None


@functools.cache
def _kernels() -> dict[str, Any]:
    import triton

    from . import _triton_kernels as kb

    # triton.jit gives interpreted functions when triton was imported with TRITON_INTERPRET=1
    return {name: triton.jit(getattr(kb, name)) for name in ("fwd_kernel", "bwd_dkdv_kernel", "bwd_dq_kernel")}


def _launch_cfg(q: Tensor, mask: BlockSparseMask) -> dict[str, Any]:
    d = q.shape[-1]
    # 64x64 tiles on GPU; 32 for fp32 with wide heads (shared memory) and on CPU (interpreter speed)
    cap = 32 if q.device.type == "cpu" or (q.dtype == torch.float32 and d > 64) else 64
    bm = _tile(mask.block_q, cap)
    bn = _tile(mask.block_kv, cap)
    block_d = max(16, 1 << (d - 1).bit_length())
    cfg: dict[str, Any] = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_D": block_d, "SUB_M": mask.block_q // bm,
                           "SUB_N": mask.block_kv // bn, "IEEE": q.dtype == torch.float32,
                           # Triton's interpreter gets bf16 tl.dot wrong (triton 3.7): compute its tiles in fp32
                           "UPCAST": q.device.type == "cpu" and q.dtype == torch.bfloat16}
    if q.device.type == "cuda":
        cfg["num_warps"] = 4 if block_d <= 64 else 8
        cfg["num_stages"] = 2
    return cfg


def compile_for_target(arch: int = 90, dtype: str = "bf16", head_dim: int = 64, block: int = 64,
                       warp_size: int = 32) -> dict[str, int]:
    """Compile the three kernels ahead of time for ``cuda`` compute capability ``arch`` (no GPU needed: Triton
    ships ptxas). Returns the shared memory each kernel needs; raises if a kernel does not compile."""
    import inspect

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from . import _triton_kernels as kb

    block_d = max(16, 1 << (head_dim - 1).bit_length())
    const = {"BLOCK_M": block, "BLOCK_N": block, "BLOCK_D": block_d, "SUB_M": 1, "SUB_N": 1,
             "IEEE": dtype == "fp32", "UPCAST": False}
    out = {}
    for name in ("fwd_kernel", "bwd_dkdv_kernel", "bwd_dq_kernel"):
        params = list(inspect.signature(getattr(kb, name)).parameters)
        sig = {}
        for p in params:
            if p in const:
                sig[p] = "constexpr"
            elif p in ("LSE", "DELTA"):
                sig[p] = "*fp32"
            elif p in ("KV_NUM", "KV_IDX", "Q_NUM", "Q_IDX"):
                sig[p] = "*i32"
            elif p in ("Q", "K", "V", "O", "DO", "DQ", "DK", "DV"):
                sig[p] = "*" + dtype
            elif p.startswith("sm_scale"):
                sig[p] = "fp32"
            else:
                sig[p] = "i32"
        src = ASTSource(triton.jit(getattr(kb, name)), sig,
                        constexprs={(params.index(k),): v for k, v in const.items()})
        kernel = triton.compile(src, target=GPUTarget("cuda", arch, warp_size),
                                options={"num_warps": 4 if block_d <= 64 else 8, "num_stages": 2})
        out[name] = int(kernel.metadata.shared)
    return out


def _mask_strides(t: Tensor) -> list[int]:
    """Strides of a (B, H, ...) mask tensor with size-1 batch/head dims broadcast (stride 0)."""
    s = list(t.stride())
    for i in (0, 1):
        if t.shape[i] == 1:
            s[i] = 0
    return s


def _forward(q: Tensor, k: Tensor, v: Tensor, mask: BlockSparseMask, scale: float) -> tuple[Tensor, Tensor]:
    b, h, m, d = q.shape
    hk, n = k.shape[1], k.shape[2]
    cfg = _launch_cfg(q, mask)
    kern = _kernels()["fwd_kernel"]
    o = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty(b, h, m, device=q.device, dtype=torch.float32)
    num, idx = mask.kv_num_blocks, mask.kv_indices
    grid = (triton_cdiv(m, cfg["BLOCK_M"]), b * h)
    kern[grid](q, k, v, o, lse, num, idx, scale * _LOG2E,
               *q.stride(), *k.stride(), *v.stride(), *o.stride(), lse.stride(0), lse.stride(1),
               *_mask_strides(num), *_mask_strides(idx),
               h, h // hk, m, n, d, **cfg)
    return o, lse


def _backward(do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, mask: BlockSparseMask,
              scale: float) -> tuple[Tensor, Tensor, Tensor]:
    b, h, m, d = q.shape
    hk, n = k.shape[1], k.shape[2]
    cfg = _launch_cfg(q, mask)
    kerns = _kernels()
    delta = (do.float() * o.float()).sum(-1).contiguous()
    dq = torch.empty_like(q, memory_format=torch.contiguous_format)
    dk = torch.empty_like(k, memory_format=torch.contiguous_format)
    dv = torch.empty_like(v, memory_format=torch.contiguous_format)
    # the backward over key tiles needs the query blocks attending each key block (per query head)
    q_num, q_idx = mask.transpose()
    grid = (triton_cdiv(n, cfg["BLOCK_N"]), b * hk)
    kerns["bwd_dkdv_kernel"][grid](
        q, k, v, do, lse, delta, dk, dv, q_num, q_idx, scale, scale * _LOG2E,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), lse.stride(0), lse.stride(1), *dk.stride(),
        *_mask_strides(q_num), *_mask_strides(q_idx), hk, h // hk, m, n, d, **cfg)
    grid = (triton_cdiv(m, cfg["BLOCK_M"]), b * h)
    kerns["bwd_dq_kernel"][grid](
        q, k, v, do, lse, delta, dq, mask.kv_num_blocks, mask.kv_indices, scale, scale * _LOG2E,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), lse.stride(0), lse.stride(1), *dq.stride(),
        *_mask_strides(mask.kv_num_blocks), *_mask_strides(mask.kv_indices), h, h // hk, m, n, d, **cfg)
    return dq, dk, dv


_LOG2E = 1.4426950408889634


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


class _BlockSparseAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, mask: BlockSparseMask, scale: float) -> Tensor:
        o, lse = _forward(q, k, v, mask, scale)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.mask, ctx.scale = mask, scale
        return o

    @staticmethod
    def backward(ctx, do: Tensor):
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = _backward(do, q, k, v, o, lse, ctx.mask, ctx.scale)
        return dq, dk, dv, None, None


def triton_block_sparse_attention(q: Tensor, k: Tensor, v: Tensor, mask: BlockSparseMask,
                                  scale: float | None = None) -> Tensor:
    """Block-sparse attention of ``q (B, H, Sq, D)`` over ``k, v (B, Hkv, Skv, D)`` (``Hkv`` divides ``H``),
    differentiable (Triton backward). Raises ``RuntimeError`` when ``triton_unsupported_reason`` says no."""
    reason = triton_unsupported_reason(q, k, v, mask)
    if reason is not None:
        raise RuntimeError(f"Triton block-sparse attention cannot run: {reason}")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    return _BlockSparseAttention.apply(q, k, v, mask.to(q.device), scale)
