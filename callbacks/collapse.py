"""A callback that makes mode collapse impossible to miss: recall and within-class diversity of a fixed noise batch.

Mode collapse (every noise of a class mapped to one image; DMD2 1-step shipped that way with class accuracy 1.0)
hides behind a good accuracy and a fair FD. ``CollapseMonitor`` samples the student every ``every_n_steps`` batches
from the same noise and classes, scores the samples on the embedded benchmark (FD, accuracy, precision, recall:
``core.metrics.quality``) plus the mean within-class feature spread (``core.metrics.diversity``), logs them as
``collapse/*``, keeps the history (saved with the callback state, so a resumed run keeps its curve), warns loudly
when recall or diversity falls below an absolute floor or below a fraction of its best value so far, and can stop
the run (``stop=True``).
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from .ema import ema_weights


class CollapseWarning(UserWarning):
    """Recall or within-class diversity of the student's samples fell below the monitor's limits."""


def collapse_reasons(row: dict[str, float], best: dict[str, float], min_recall: float, min_diversity: float,
                     max_drop: float) -> list[str]:
    """Why ``row`` (with ``recall`` and ``diversity`` = diversity / real digits' diversity) looks collapsed:
    below the absolute floors, or below ``(1 - max_drop)`` times the best value seen (``best``)."""
    reasons = []
    if row["recall"] < min_recall:
        reasons.append(f"recall {row['recall']:.3f} < {min_recall}")
    if row["diversity"] < min_diversity:
        reasons.append(f"within-class diversity {row['diversity']:.3f} of the real digits' < {min_diversity}")
    for key in ("recall", "diversity"):
        b = best.get(key)
        if b is not None and b > 0 and row[key] < (1.0 - max_drop) * b:
            reasons.append(f"{key} fell from its best {b:.3f} to {row[key]:.3f} (more than {max_drop:.0%})")
    return reasons


class CollapseMonitor(Callback):
    """Track recall and within-class diversity of a fixed noise batch during training; warn and optionally stop.

    Args:
        every_n_steps: batches (``pl_module.batches_seen``) between measurements; also measured at fit start
            (step 0 of a fresh run) and at the end.
        per_class: samples per class of the fixed batch (36 -> the 360-sample benchmark).
        seed: noise seed of the fixed batch.
        min_recall: warn when recall falls below this.
        min_diversity: warn when the mean within-class feature spread falls below this fraction of the real
            digits' (same number of samples per class).
        max_drop: warn when recall or diversity falls by more than this fraction below its best value so far.
        stop: set ``trainer.should_stop`` when it warns.
        path: also write the history as JSON here (atomically) after every measurement.
        use_ema: measure the EMA weights when a ``StudentEMA`` callback is present.
        name: distinguishes several monitors in one trainer (their checkpointed states), e.g. one on the EMA
            weights and one on the live weights.
    """

    def __init__(self, every_n_steps: int = 100, per_class: int = 36, seed: int = 0, min_recall: float = 0.2,
                 min_diversity: float = 0.3, max_drop: float = 0.5, stop: bool = False,
                 path: str | Path | None = None, use_ema: bool = True, name: str | None = None):
        if int(every_n_steps) < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}")
        if int(per_class) < 2:
            raise ValueError(f"per_class must be >= 2 (diversity needs pairs), got {per_class}")
        if not 0.0 < max_drop <= 1.0:
            raise ValueError(f"max_drop must be in (0, 1], got {max_drop}")
        self.every_n_steps, self.per_class, self.seed = int(every_n_steps), int(per_class), int(seed)
        self.min_recall, self.min_diversity, self.max_drop = float(min_recall), float(min_diversity), float(max_drop)
        self.stop, self.use_ema = bool(stop), bool(use_ema)
        self.path = Path(path) if path is not None else None
        self.name = name
        self.history: list[dict[str, Any]] = []
        self.fired: list[dict[str, Any]] = []
        self._real: float | None = None

    def real_diversity(self) -> float:
        if self._real is None:
            from ..core.metrics.diversity import reference_diversity

            self._real = reference_diversity("train", per_class=self.per_class, seed=self.seed)
        return self._real

    def measure_samples(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
        """Benchmark metrics plus ``diversity`` (relative to real digits) and ``diversity_abs`` of ``images``."""
        from ..core.metrics.diversity import mean_class_diversity
        from ..core.metrics.quality import evaluate_samples, extract_features

        images = images.float().cpu().clamp(-1, 1)
        metrics = {k: float(v) for k, v in evaluate_samples(images, labels).items()}
        div = mean_class_diversity(extract_features(images), labels)
        return {**metrics, "diversity_abs": div, "diversity": div / self.real_diversity()}

    def check(self, row: dict[str, Any]) -> list[str]:
        """Compare ``row`` with the limits and the best values so far; warn (and record) when it fires."""
        best = {k: max(r[k] for r in self.history[:-1]) for k in ("recall", "diversity")} \
            if len(self.history) > 1 else {}
        reasons = collapse_reasons(row, best, self.min_recall, self.min_diversity, self.max_drop)
        if reasons:
            self.fired.append({"batches": row.get("batches"), "reasons": reasons})
            warnings.warn(f"MODE COLLAPSE? at batch {row.get('batches')}: " + "; ".join(reasons)
                          + " -- look at the sample grid; lower the learning rate, check the generator's input "
                          "timestep and initialisation, or resume from an earlier checkpoint", CollapseWarning,
                          stacklevel=2)
        return reasons

    def measure(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any] | None:
        if trainer.global_rank != 0:
            return None
        from ..core.evaluate import balanced_labels

        labels = balanced_labels(self.per_class)
        with ema_weights(trainer if self.use_ema else None, pl_module):
            images = pl_module.generate_samples(labels, seed=self.seed)
        step = int(getattr(pl_module, "batches_seen", trainer.global_step))
        counters = pl_module.counters() if hasattr(pl_module, "counters") else {}
        row = {"batches": step, **{k: int(v) for k, v in counters.items()}, **self.measure_samples(images, labels)}
        self.history.append(row)
        for logger in trainer.loggers:
            logger.log_metrics({f"collapse/{k}": v for k, v in row.items() if k not in counters
                                and k not in ("batches", "num_samples")}, step=step)
        reasons = self.check(row)
        row["collapse"] = reasons
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(self.path.name + ".tmp")
            with open(tmp, "w") as f:
                json.dump({"history": self.history, "real_diversity": self.real_diversity()}, f, indent=1)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        if reasons and self.stop:
            trainer.should_stop = True
        return row

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Measure the untrained start (once; not on resume).

        Args:
            trainer: stopped (``stop``) and logged to by ``measure``.
            pl_module: the distillation module (``batches_seen`` 0 = not resumed).
        """
        if not self.history and int(getattr(pl_module, "batches_seen", 0)) == 0:
            self.measure(trainer, pl_module)

    @override
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        """Measure every ``every_n_steps`` batches (counted by ``batches_seen``).

        Args:
            trainer: passed to ``measure``.
            pl_module: the module whose ``batches_seen`` counts the batches.
            outputs, batch, batch_idx: unused (Lightning's hook signature).
        """
        n = int(getattr(pl_module, "batches_seen", 0))
        if n > 0 and n % self.every_n_steps == 0:
            self.measure(trainer, pl_module)

    @override
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Measure the final student unless the last batch was measured.

        Args:
            trainer: passed to ``measure``.
            pl_module: the distillation module whose student is measured.
        """
        n = int(getattr(pl_module, "batches_seen", 0))
        if not self.history or self.history[-1]["batches"] != n:
            self.measure(trainer, pl_module)

    @property
    def state_key(self) -> str:
        return "CollapseMonitor" if self.name is None else f"CollapseMonitor[{self.name}]"

    def state_dict(self) -> dict[str, Any]:
        return {"history": list(self.history), "fired": list(self.fired)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore ``history`` and ``fired`` from a checkpoint.

        Args:
            state_dict: this callback's ``state_dict()`` as saved in the checkpoint.
        """
        self.history = list(state_dict.get("history", []))
        self.fired = list(state_dict.get("fired", []))
