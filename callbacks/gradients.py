"""Gradients of the distillation modules: freezing networks for a pass, averaging gradients over processes.

Manual-optimization methods (DMD2's generator and critic, several backward passes per step) turn DDP's reducer off
(``disable_ddp_reducer``) and average the gradients they step on explicitly (``sync_gradients``); under FSDP2 the
sharded gradients are averaged by FSDP and only the replicated ones (guidance adapters) here.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

__all__ = ["disable_ddp_reducer", "frozen", "sync_gradients"]


@contextmanager
def frozen(*modules: nn.Module) -> Iterator[None]:
    """Temporarily set ``requires_grad=False`` on the parameters of ``modules`` (restored afterwards)."""
    params = [p for m in modules if m is not None for p in m.parameters()]
    prev = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, r in zip(params, prev):
            p.requires_grad_(r)


def disable_ddp_reducer(trainer: Any) -> None:
    """Turn off DDP's gradient reducer of ``trainer``'s wrapped model (a no-op without a trainer or DDP)."""
    if trainer is None:
        return
    from torch.nn.parallel import DistributedDataParallel

    model = trainer.strategy.model
    if isinstance(model, DistributedDataParallel):
        model.require_backward_grad_sync = False


def sync_gradients(params: Sequence[nn.Parameter], world: int, sharded: bool) -> None:
    """Average the gradients of ``params`` over ``world`` processes (no-op for one process).

    Args:
        params: the parameters whose ``.grad`` is averaged in place (those without a gradient are skipped).
        world: the number of processes.
        sharded: the networks are FSDP2-sharded: FSDP averaged the sharded gradients, only the replicated ones
            are averaged here.
    """
    if world == 1:
        return
    if sharded:
        from .sharding import sync_replicated_gradients

        sync_replicated_gradients(params)
        return
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = _flatten_dense_tensors(grads)
    torch.distributed.all_reduce(flat)
    flat /= world
    for g, s in zip(grads, _unflatten_dense_tensors(flat, grads)):
        g.copy_(s)
