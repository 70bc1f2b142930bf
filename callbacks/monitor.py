"""Callbacks that look at the student while it trains: sample grids and quality evaluation.

Both run on the global-rank-0 process every ``every_n_steps`` *batches* (``pl_module.batches_seen``, the modules'
own counter, not ``global_step``), with the EMA weights swapped in when a ``StudentEMA`` callback is present, and
sample with ``pl_module.generate_samples`` (the student's own sampler and sigmas) from fixed seeds and classes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from ..core.io import atomic_path
from .ema import ema_weights


def _due(pl_module: L.LightningModule, every: int | None) -> bool:
    n = int(getattr(pl_module, "batches_seen", 0))
    return bool(every) and n > 0 and n % every == 0


def _log_image(trainer: L.Trainer, tag: str, image: np.ndarray, step: int) -> None:
    for logger in trainer.loggers:
        if hasattr(logger, "log_image"):  # wandb, neptune, comet, mlflow (lightning wrappers)
            try:
                logger.log_image(key=tag, images=[image], step=step)
                continue
            except TypeError:
                pass
        exp = getattr(logger, "experiment", None)
        if exp is not None and hasattr(exp, "add_image"):  # tensorboard
            exp.add_image(tag, image, step, dataformats="HW" if image.ndim == 2 else "HWC")


class _Periodic(Callback):
    """Calls ``run`` every ``every_n_steps`` batches (``pl_module.batches_seen``) and once when training ends,
    unless the last batch already ran it (``ran_at``) or ``at_end`` is off."""

    every_n_steps: int | None = None
    at_end: bool = True

    def run(self, trainer: L.Trainer, pl_module: L.LightningModule) -> Any:
        raise NotImplementedError

    def ran_at(self, step: int) -> bool:
        """Whether ``run`` already ran after batch ``step``."""
        raise NotImplementedError

    @override
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        """Run every ``every_n_steps`` batches.

        Args:
            trainer: passed to ``run``.
            pl_module: the distillation module (its ``batches_seen`` decides; it draws the samples).
            outputs, batch, batch_idx: unused (Lightning's hook signature).
        """
        if _due(pl_module, self.every_n_steps):
            self.run(trainer, pl_module)

    @override
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Run on the final student unless the last batch did (or ``at_end`` is off).

        Args:
            trainer: passed to ``run``.
            pl_module: the distillation module whose student is looked at.
        """
        if self.at_end and not self.ran_at(int(getattr(pl_module, "batches_seen", 0))):
            self.run(trainer, pl_module)


class SampleGrid(_Periodic):
    """Save a PNG grid of student samples (fixed seed and classes) every ``every_n_steps`` batches and at the end
    of training, to ``dirpath`` and to the trainer's loggers.

    Args:
        dirpath: folder of the PNGs (``<name>_<batches>.png``).
        every_n_steps: batches between grids (``None``: only at the end).
        classes: the class of each grid row (default 0-9); ``per_class`` samples per row.
        seed: noise seed (the same grid positions get the same noise every time).
    """

    def __init__(self, dirpath: str | Path, every_n_steps: int | None = 100, classes: list[int] | None = None,
                 per_class: int = 8, seed: int = 0, name: str = "samples"):
        self.dirpath = Path(dirpath)
        self.every_n_steps = every_n_steps
        self.classes = list(range(10)) if classes is None else list(classes)
        self.per_class, self.seed, self.name = int(per_class), int(seed), name
        self.written: list[Path] = []

    def labels(self) -> torch.Tensor:
        return torch.tensor(self.classes).repeat_interleave(self.per_class)

    def write(self, trainer: L.Trainer, pl_module: L.LightningModule) -> Path | None:
        if trainer.global_rank != 0:
            return None
        from ..core.models.grid import to_uint8_grid

        with ema_weights(trainer, pl_module):
            images = pl_module.generate_samples(self.labels(), seed=self.seed).float().cpu()
        if images.shape[1] not in (1, 3):
            images = images[:, :1]
        img = to_uint8_grid(images, nrow=self.per_class)
        self.dirpath.mkdir(parents=True, exist_ok=True)
        step = int(getattr(pl_module, "batches_seen", trainer.global_step))
        path = self.dirpath / f"{self.name}_{step:06d}.png"
        with atomic_path(path) as tmp:
            img.save(tmp)
        self.written.append(path)
        _log_image(trainer, f"{self.name}", np.asarray(img), step)
        return path

    @override
    def run(self, trainer: L.Trainer, pl_module: L.LightningModule) -> Path | None:
        return self.write(trainer, pl_module)

    @override
    def ran_at(self, step: int) -> bool:
        return bool(self.written) and self.written[-1].stem.endswith(f"{step:06d}")


class QualityEval(_Periodic):
    """Frechet distance, class accuracy, precision and recall of student samples on the embedded digits
    benchmark (``core.metrics.quality.evaluate_samples``) every ``every_n_steps`` batches, logged as
    ``eval/fd``, ``eval/accuracy``, ... and kept in ``history`` (saved with the callback state).

    Only for students of 16x16x1 digit models conditioned on class labels 0-9.
    """

    def __init__(self, every_n_steps: int | None = 500, per_class: int = 20, seed: int = 0, reference: str = "train",
                 at_end: bool = True):
        self.every_n_steps, self.per_class, self.seed = every_n_steps, int(per_class), int(seed)
        self.reference, self.at_end = reference, at_end
        self.history: list[dict[str, float]] = []

    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float] | None:
        if trainer.global_rank != 0:
            return None
        from ..core.evaluate import balanced_labels
        from ..core.metrics.quality import evaluate_samples

        labels = balanced_labels(self.per_class)
        with ema_weights(trainer, pl_module):
            images = pl_module.generate_samples(labels, seed=self.seed).float().cpu().clamp(-1, 1)
        metrics = evaluate_samples(images, labels, reference=self.reference)
        step = int(getattr(pl_module, "batches_seen", trainer.global_step))
        row = {"batches": step, **{k: float(v) for k, v in metrics.items()}}
        self.history.append(row)
        for logger in trainer.loggers:
            logger.log_metrics({f"eval/{k}": v for k, v in metrics.items() if k != "num_samples"}, step=step)
        return row

    @override
    def run(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float] | None:
        return self.evaluate(trainer, pl_module)

    @override
    def ran_at(self, step: int) -> bool:
        return bool(self.history) and self.history[-1]["batches"] == step

    @override
    def state_dict(self) -> dict[str, Any]:
        """The evaluations so far (saved with the checkpoint)."""
        return {"history": list(self.history)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore ``history`` from a checkpoint.

        Args:
            state_dict: what ``QualityEval.state_dict`` saved.
        """
        self.history = list(state_dict.get("history", []))
