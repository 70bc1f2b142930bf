"""Exponential moving average of the student only (not the teacher, not the critic).

Like Lightning's ``EMAWeightAveraging`` but restricted to ``pl_module.ema_parameters()`` (the student's trainable
tensors: a full copy, LoRA matrices or a guidance adapter). The average is updated after every student update
(``pl_module.student_updates``), saved and restored through the callback's ``state_dict``, swapped into the
student for validation and export, and swapped out again afterwards.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor
from typing_extensions import override

from .sharding import full_tensor, like_param, reshard


class StudentEMA(Callback):
    """EMA of the student's trainable parameters.

    Args:
        decay: EMA decay; with ``warmup`` the decay of update ``n`` is ``min(decay, (1 + n) / (10 + n))``.
        warmup: ramp the decay up (the average follows the student closely at first).
    """

    def __init__(self, decay: float = 0.999, warmup: bool = True):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay, self.warmup = float(decay), bool(warmup)
        self.ema: dict[str, Tensor] | None = None
        self.updates = 0
        self.seen_version = -1
        self._swapped: dict[str, Tensor] | None = None

    @property
    @override
    def state_key(self) -> str:
        """The key of this callback's state in a checkpoint (one per decay: several EMAs can coexist)."""
        return f"StudentEMA[decay={self.decay}]"

    def _init(self, pl_module: L.LightningModule) -> None:
        params = pl_module.ema_parameters()
        if self.ema is None:
            self.ema = {k: p.detach().clone() for k, p in params.items()}
            self.seen_version = int(getattr(pl_module, "student_updates", 0))
        else:
            missing = sorted(set(params) ^ set(self.ema))
            if missing:
                raise ValueError(f"StudentEMA state does not match the student's parameters ({missing[:4]} ...)")
            self.ema = {k: like_param(v, params[k]) for k, v in self.ema.items()}  # sharded like its parameter
        self._loaded = False

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Start the average from the student's weights (or adopt a loaded one).

        Args:
            trainer: unused.
            pl_module: the distillation module (its ``ema_parameters()`` are averaged).
        """
        self._init(pl_module)

    @override
    @torch.no_grad()
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        """Update the average once per student update (``student_updates``; batches without one are skipped).

        Args:
            trainer: its ``global_step`` counts updates for modules without ``student_updates``.
            pl_module: the distillation module whose parameters are averaged.
            outputs, batch, batch_idx: unused (Lightning's hook signature).
        """
        version = int(getattr(pl_module, "student_updates", trainer.global_step))
        if version == self.seen_version:
            return
        self.seen_version = version
        if getattr(self, "_loaded", False):  # loaded after on_fit_start (strategies that restore after setup)
            self._init(pl_module)
        d = min(self.decay, (1 + self.updates) / (10 + self.updates)) if self.warmup else self.decay
        for k, p in pl_module.ema_parameters().items():
            self.ema[k].lerp_(p.detach(), 1.0 - d)
        self.updates += 1

    @contextmanager
    def swapped(self, pl_module: L.LightningModule) -> Iterator[None]:
        """Inside the block the student holds the EMA weights (nested use is a no-op)."""
        if self.ema is None or getattr(self, "_loaded", False):
            self._init(pl_module)
        if self._swapped is not None:
            yield
            return
        params = pl_module.ema_parameters()
        with torch.no_grad():
            self._swapped = {k: p.detach().clone() for k, p in params.items()}
            for k, p in params.items():
                p.copy_(self.ema[k])
            reshard(pl_module)  # FSDP2: gather the swapped shards at the next forward
        try:
            yield
        finally:
            with torch.no_grad():
                for k, p in params.items():
                    p.copy_(self._swapped[k])
                reshard(pl_module)
            self._swapped = None

    @override
    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Swap the EMA weights in for validation.

        Args:
            trainer: unused.
            pl_module: the module whose student gets the EMA weights.
        """
        self._ctx = self.swapped(pl_module)
        self._ctx.__enter__()

    @override
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Swap the live weights back.

        Args:
            trainer, pl_module: unused (the swap entered at ``on_validation_start`` is exited).
        """
        ctx = getattr(self, "_ctx", None)
        if ctx is not None:
            ctx.__exit__(None, None, None)
            self._ctx = None

    @override
    def state_dict(self) -> dict[str, Any]:
        """The averages (gathered to full tensors under FSDP2), the update counts and the decay."""
        # sharded (FSDP2) averages are gathered: every process calls state_dict when a checkpoint is saved
        return {"ema": None if self.ema is None else {k: full_tensor(v.detach()).cpu().clone()
                                                      for k, v in self.ema.items()},
                "updates": self.updates, "seen_version": self.seen_version, "decay": self.decay}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the averages; they are matched to the student's parameters at their next use.

        Args:
            state_dict: this callback's saved ``state_dict()``.
        """
        self.ema = None if state_dict["ema"] is None else dict(state_dict["ema"])
        self.updates = int(state_dict["updates"])
        self.seen_version = int(state_dict["seen_version"])
        self._loaded = True


def find_ema(trainer: L.Trainer) -> StudentEMA | None:
    """The trainer's ``StudentEMA`` callback, if any."""
    for cb in trainer.callbacks:
        if isinstance(cb, StudentEMA):
            return cb
    return None


@contextmanager
def ema_weights(trainer: L.Trainer | None, pl_module: L.LightningModule) -> Iterator[None]:
    """Swap the EMA weights in if the trainer has a ``StudentEMA`` callback (else the live weights)."""
    ema = find_ema(trainer) if trainer is not None else None
    if ema is None:
        yield
    else:
        with ema.swapped(pl_module):
            yield
