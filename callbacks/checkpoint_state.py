"""Checkpoint surgery of the distillation modules: the frozen teacher stays out of checkpoints.

The teacher is the user's model: its frozen tensors are dropped from the saved ``state_dict`` (found by storage, so
tensors the student shares with it, e.g. a LoRA student's base weights, go too) and put back from the live module
on load. Sharded (FSDP2) checkpoints keep every key: Lightning's distributed load asks for all of them.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

__all__ = ["drop_frozen", "fill_frozen", "frozen_ptrs"]


def _storage_ptr(t: Tensor) -> int:
    return t.untyped_storage().data_ptr()


def frozen_ptrs(teacher: nn.Module) -> set[int]:
    """The storages of ``teacher``'s frozen parameters and buffers."""
    return {_storage_ptr(t) for t in list(teacher.parameters()) + list(teacher.buffers()) if not t.requires_grad}


def drop_frozen(state_dict: dict[str, Any], ptrs: set[int]) -> None:
    """Delete, in place, the tensors of ``state_dict`` that live in one of the storages ``ptrs``."""
    for k in [k for k, v in state_dict.items() if ptrs and isinstance(v, Tensor) and _storage_ptr(v) in ptrs]:
        del state_dict[k]


def fill_frozen(state_dict: dict[str, Any], own: dict[str, Tensor], ptrs: set[int]) -> dict[str, Any]:
    """``state_dict`` plus the keys of the live ``own`` state it lacks whose tensors live in ``ptrs``."""
    full = dict(state_dict)
    for k, v in own.items():
        if k not in full and _storage_ptr(v) in ptrs:
            full[k] = v
    return full
