"""Student export and the NaN / divergence guard.

``StudentExport`` writes the student with the EMA weights swapped in (``pl_module.export``): safetensors of the
full network (LoRA merged) with a JSON sidecar naming the sampler and sigmas it was trained for; for LoRA students
also a LoRA file in ComfyUI's key format (``core.models.lora_format``), optionally thinned by DARE; guidance
adapters as adapter files. Files are written atomically, on rank 0.

``DivergenceGuard`` stops training with a clear ``DivergenceError`` when a gradient or a loss becomes NaN/inf (or
a loss exceeds ``max_loss``). It raises *before* the optimizer applies a bad gradient and before the checkpoint
callbacks of that batch run, so the last checkpoint written is the last good one.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor
from typing_extensions import override

from .ema import ema_weights


class StudentExport(Callback):
    """Export the student at the end of training (and every ``every_n_steps`` batches if set).

    Args:
        path: the ``.safetensors`` file of the student (siblings ``<stem>_lora.safetensors`` etc.).
        lora_prefix: key prefix of the ComfyUI LoRA file (``"diffusion_model."`` = ComfyUI's generic form; default:
            the kohya ``"lora_unet_"`` form for a diffusers UNet, the generic form otherwise).
        dare_p, dare_seed: DARE drop probability (0 = off) and seed for the LoRA / delta files.
        write_delta: also write ``student - teacher`` as a ComfyUI "diff" file (DARE applied if ``dare_p``).
    """

    def __init__(self, path: str | Path, every_n_steps: int | None = None, lora_prefix: str | None = None,
                 dare_p: float = 0.0, dare_seed: int = 1, write_delta: bool = False):
        self.path = Path(path)
        self.every_n_steps = every_n_steps
        self.lora_prefix, self.dare_p, self.dare_seed, self.write_delta = lora_prefix, dare_p, dare_seed, write_delta
        self.written: list[Path] = []

    def export(self, trainer: L.Trainer | None, pl_module: L.LightningModule) -> list[Path]:
        # sharded (FSDP2) students are gathered by every process, then written by rank 0 (``export`` checks)
        if trainer is not None and trainer.global_rank != 0 and not pl_module.is_sharded():
            return []
        with ema_weights(trainer, pl_module):
            self.written = pl_module.export(self.path, lora_prefix=self.lora_prefix, dare_p=self.dare_p,
                                            dare_seed=self.dare_seed, write_delta=self.write_delta)
        return self.written

    @override
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        """Export every ``every_n_steps`` batches if set.

        Args:
            trainer: rank 0 writes (all ranks gather under FSDP2).
            pl_module: the distillation module (``batches_seen``, ``export``).
            outputs, batch, batch_idx: unused (Lightning's hook signature).
        """
        n = int(getattr(pl_module, "batches_seen", 0))
        if self.every_n_steps and n % self.every_n_steps == 0:
            self.export(trainer, pl_module)

    @override
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Export the final student.

        Args:
            trainer: its ``StudentEMA`` weights are swapped in.
            pl_module: the module whose student is written.
        """
        self.export(trainer, pl_module)


class DivergenceError(RuntimeError):
    """Training diverged (NaN/inf gradients or losses, or a loss above the limit)."""


class DivergenceGuard(Callback):
    """Stop training with a clear message when it diverges.

    Args:
        max_loss: also stop when a returned loss exceeds this value.
        check_grads: check gradients before every optimizer step (catches NaN before it reaches the weights).
    """

    def __init__(self, max_loss: float | None = None, check_grads: bool = True):
        self.max_loss = max_loss
        self.check_grads = check_grads

    def _last_good(self, trainer: L.Trainer) -> str:
        paths = [p for cb in trainer.checkpoint_callbacks
                 for p in (getattr(cb, "last_model_path", ""), getattr(cb, "best_model_path", "")) if p]
        return paths[0] if paths else "none written yet"

    def _fail(self, trainer: L.Trainer, pl_module: L.LightningModule, reason: str) -> None:
        n = int(trainer.fit_loop.epoch_loop.batch_progress.total.ready)  # 1-based number of the current batch
        raise DivergenceError(
            f"fewstep: training diverged in batch {n} (global step {trainer.global_step}): {reason}. Training was "
            f"stopped before these weights were saved; last good checkpoint: {self._last_good(trainer)}. Lower the "
            "learning rate, check the teacher's outputs and the input range, or resume from that checkpoint.")

    def _bad(self, trainer: L.Trainer, bad: bool) -> bool:
        return bool(trainer.strategy.reduce_boolean_decision(bad, all=False))

    @override
    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer) -> None:
        """Stop before the optimizer applies a non-finite gradient (on any process).

        Args:
            trainer: its strategy shares the verdict between processes.
            pl_module: names the first parameter with a bad gradient.
            optimizer: the optimizer about to step (its parameters' gradients are checked).
        """
        if not self.check_grads:
            return
        bad = None
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.grad is not None and not torch.isfinite(p.grad).all():
                    bad = next((n for n, q in pl_module.named_parameters() if q is p), "?")
                    break
            if bad:
                break
        if self._bad(trainer, bad is not None):
            self._fail(trainer, pl_module, f"non-finite gradient (first in {bad})")

    @override
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        """Stop when a returned loss is non-finite or above ``max_loss`` (on any process).

        Args:
            trainer: its strategy shares the verdict between processes.
            pl_module: named in the error.
            outputs: the losses ``training_step`` returned (a tensor or a dict of scalars).
            batch, batch_idx: unused.
        """
        values: dict[str, float] = {}
        if isinstance(outputs, Tensor):
            values["loss"] = float(outputs.detach().float().mean())
        elif isinstance(outputs, dict):
            for k, v in outputs.items():
                if isinstance(v, Tensor) and v.numel() == 1:
                    values[k] = float(v.detach().float())
        reason = ""
        for k, v in values.items():
            if not math.isfinite(v):
                reason = f"{k} = {v}"
                break
            if self.max_loss is not None and k.startswith("loss") and v > self.max_loss:
                reason = f"{k} = {v:.4g} > max_loss {self.max_loss:g}"
                break
        if self._bad(trainer, bool(reason)):
            self._fail(trainer, pl_module, reason or "another process diverged")
