"""One entry point for block-sparse attention: ``block_sparse_attention(q, k, v, block_mask, ...)``.

It validates the inputs once, picks the best path the device and dtype allow and falls back, logging why, when a
path cannot take the inputs or fails at run time:

=========  ==========================================================================================
path       when ``backend="auto"`` picks it
=========  ==========================================================================================
triton     CUDA tensors, fp16/bf16/fp32, block sizes multiples of 16, head dim <= 256, triton importable
flex       FlexAttention, compiled; CUDA when triton cannot run, CPU for long sequences
           (``q_len * kv_len >= CPU_FLEX_MIN_PAIRS``)
reference  dense SDPA with the block mask expanded to a boolean mask; always works; CPU short sequences
=========  ==========================================================================================

All paths compute ``softmax(scale q k^T + log M) v`` over the mask ``M`` (Vaswani et al. 2017, eq. 1), give zeros for
query rows that attend nothing, accept grouped/multi-query key-value heads (``Hkv`` divides ``H``) and are
differentiable.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor

from .block_mask import BlockSparseMask
from .flex import flex_available, flex_block_sparse_attention
from .reference import dense_masked_attention
from .triton_block_sparse import triton_block_sparse_attention, triton_unsupported_reason

__all__ = ["BACKENDS", "CPU_FLEX_MIN_PAIRS", "block_sparse_attention", "reset_fallback_state", "select_backend",
           "validate_inputs"]

logger = logging.getLogger("fewstep.kernels")

BACKENDS = ("triton", "flex", "reference")
FLEX_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
#: below this many (query, key) pairs the CPU auto path uses dense masked SDPA: a compiled kernel does not pay off
CPU_FLEX_MIN_PAIRS = 1 << 20

_broken: dict[tuple, str] = {}  # (backend, device type, dtype, compile) -> error seen at run time
_warned: set[tuple[str, str]] = set()


def validate_inputs(q: Tensor, k: Tensor, v: Tensor, block_mask: BlockSparseMask) -> None:
    """Raise ``ValueError``/``TypeError`` with a clear message when the inputs cannot be attended together."""
    if not isinstance(block_mask, BlockSparseMask):
        raise TypeError(f"block_mask must be a fewstep BlockSparseMask, got {type(block_mask).__name__}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor) or t.ndim != 4:
            raise ValueError(f"{name} must be a 4-D tensor (batch, heads, seq, head_dim); got "
                             f"{tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__}")
        if not t.dtype.is_floating_point:
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v are on different devices ({q.device}, {k.device}, {v.device})")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v have different dtypes ({q.dtype}, {k.dtype}, {v.dtype})")
    b, h, sq, d = q.shape
    if k.shape[0] != b or v.shape[0] != b:
        raise ValueError(f"batch sizes differ: q {b}, k {k.shape[0]}, v {v.shape[0]}")
    if k.shape[:3] != v.shape[:3]:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must agree in batch, heads and length")
    if k.shape[-1] != d:
        raise ValueError(f"q head dim {d} != k head dim {k.shape[-1]}")
    hk = k.shape[1]
    if h % hk:
        raise ValueError(f"{h} query heads are not a multiple of {hk} key/value heads (GQA needs H % Hkv == 0)")
    if block_mask.q_len != sq or block_mask.kv_len != k.shape[2]:
        raise ValueError(f"mask is for q_len={block_mask.q_len}, kv_len={block_mask.kv_len} but q has {sq} and k has "
                         f"{k.shape[2]} tokens")
    mb, mh, _, _ = block_mask.shape
    if mb not in (1, b) or mh not in (1, h):
        raise ValueError(f"mask batch {mb} / heads {mh} do not broadcast to batch {b} / query heads {h}")


def _reason(backend: str, q: Tensor, k: Tensor, v: Tensor, mask: BlockSparseMask, compile: bool) -> str | None:
    if backend == "triton":
        reason = triton_unsupported_reason(q, k, v, mask)
    elif backend == "flex":
        if not flex_available():
            reason = "torch has no torch.nn.attention.flex_attention (needs torch >= 2.5)"
        elif q.dtype not in FLEX_DTYPES:
            reason = f"dtype {q.dtype} is not supported by FlexAttention (fp16, bf16, fp32)"
        else:
            reason = None
    elif backend == "reference":
        reason = None
    else:
        raise ValueError(f"unknown backend {backend!r}; choose one of {('auto',) + BACKENDS}")
    if reason is None:
        reason = _broken.get((backend, q.device.type, q.dtype, compile))
    return reason


def _auto_order(q: Tensor, mask: BlockSparseMask) -> tuple[list[str], str | None]:
    if q.device.type == "cuda":
        return ["triton", "flex", "reference"], None
    if mask.q_len * mask.kv_len < CPU_FLEX_MIN_PAIRS:
        return ["reference"], (f"{q.device.type}: {mask.q_len}x{mask.kv_len} pairs < CPU_FLEX_MIN_PAIRS, dense masked "
                               "SDPA is faster than a compiled kernel here")
    return ["flex", "reference"], None


def select_backend(q: Tensor, k: Tensor, v: Tensor, block_mask: BlockSparseMask, backend: str = "auto",
                   compile: bool = True) -> tuple[str, list[str]]:
    """The path ``block_sparse_attention`` would take and, for each path passed over, why."""
    if backend == "auto":
        order, note = _auto_order(q, block_mask)
        reasons = [note] if note else []
    else:
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; choose one of {('auto',) + BACKENDS}")
        order = [backend] + [b for b in ("flex", "reference") if b != backend]
        reasons = []
    for name in order:
        r = _reason(name, q, k, v, block_mask, compile)
        if r is None:
            return name, reasons
        reasons.append(f"{name}: {r}")
    return "reference", reasons  # unreachable: reference has no reason to refuse


def _log_fallback(requested: str, reasons: list[str]) -> None:
    for r in reasons:
        key = (requested, r)
        if key in _warned:
            logger.debug("block_sparse_attention(backend=%r) fell back: %s", requested, r)
        else:
            _warned.add(key)
            logger.warning("block_sparse_attention(backend=%r) fell back: %s", requested, r)


def _run(backend: str, q: Tensor, k: Tensor, v: Tensor, mask: BlockSparseMask, scale: float | None,
         compile: bool) -> Tensor:
    if backend == "triton":
        return triton_block_sparse_attention(q, k, v, mask, scale)
    if backend == "flex":
        return flex_block_sparse_attention(q, k, v, mask, scale, compile=compile)
    return dense_masked_attention(q, k, v, mask, scale)


def block_sparse_attention(q: Tensor, k: Tensor, v: Tensor, block_mask: BlockSparseMask, *,
                           scale: float | None = None, backend: str = "auto", compile: bool | None = None,
                           strict: bool = False) -> Tensor:
    """Attention of ``q (B, H, Sq, D)`` over ``k, v (B, Hkv, Skv, D)`` restricted to ``block_mask``.

    Args:
        q, k, v: SDPA layout; ``Hkv`` divides ``H`` (GQA / MQA). Any strides.
        block_mask: a ``BlockSparseMask`` for ``(Sq, Skv)``; its batch/head dims may be 1.
        scale: softmax scale, default ``1/sqrt(D)``.
        backend: ``"auto"`` (best available), or ``"triton"``, ``"flex"``, ``"reference"`` to ask for one path; an
            explicit path that cannot run falls back (flex, then reference) with a logged warning.
        compile: compile FlexAttention (default True; False runs its unfused eager implementation).
        strict: raise ``RuntimeError`` instead of falling back.

    Returns:
        ``(B, H, Sq, D)`` in ``q``'s dtype; rows whose query block attends no key block are zeros.
    """
    validate_inputs(q, k, v, block_mask)
    compile = True if compile is None else bool(compile)
    block_mask = block_mask.to(q.device)
    chosen, reasons = select_backend(q, k, v, block_mask, backend, compile)
    passed_over = [r for r in reasons if not r.startswith(f"{chosen}:")]
    if backend != "auto" and chosen != backend:
        if strict:
            raise RuntimeError(f"backend {backend!r} cannot run these inputs: {'; '.join(passed_over)}")
        _log_fallback(backend, passed_over)
    elif passed_over:
        logger.debug("block_sparse_attention(auto) chose %s: %s", chosen, "; ".join(passed_over))
    order = [chosen] + [b for b in ("flex", "reference") if b != chosen]
    last_error: Exception | None = None
    for name in order:
        if name != chosen and _reason(name, q, k, v, block_mask, compile) is not None:
            continue
        try:
            return _run(name, q, k, v, block_mask, scale, compile)
        except Exception as e:  # a path that should have run failed (e.g. a compiler error): remember, fall back
            if name == "reference" or strict:
                raise
            key = (name, q.device.type, q.dtype, compile)
            _broken[key] = f"failed earlier with {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
            _log_fallback(backend, [f"{name}: {_broken[key]}"])
            last_error = e
    raise RuntimeError("no attention path could run") from last_error


def reset_fallback_state() -> None:
    """Forget paths marked broken at run time and the warnings already given (for tests and long sessions)."""
    _broken.clear()
    _warned.clear()
