"""Lightning training of the learned cache's predictor (DisCa-style) on a model's own trajectories.

``LearnedCacheModule`` regresses a ``ResidualPredictor`` onto the skipped block range's residual (training pairs
from ``fewstep.core.cache.learned.collect_pairs``: teacher runs, student runs, or both concatenated);
``LearnedCacheExport`` writes the predictor as safetensors keyed to the model's fingerprint when training ends
(atomic; the path is the one the user named). ``fit_learned_cache`` wires both into a ``Trainer``.

Resuming: the data order depends only on ``(seed, epoch)`` (``EpochSeededSampler``) and the optimiser state is in the
checkpoint, so ``trainer.fit(..., ckpt_path=...)`` continues exactly where an uninterrupted run would be.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader
from typing_extensions import override

from ..core.cache.learned import EpochSeededSampler, PairsDataset, ResidualPredictor, predictor_loss, save_predictor


class LearnedCacheModule(L.LightningModule):
    """Trains a ``ResidualPredictor``.

    Args:
        dim, rank, mix: the predictor's configuration (``ResidualPredictor``).
        lr: AdamW learning rate; cosine-decayed to 5% over ``total_steps`` when that is given.
        weight_decay: AdamW weight decay.
        total_steps: planned optimiser steps (for the schedule; ``None``: constant rate).
        stop_below: no optimiser step on a batch whose relative error is already below this (Adam's steps are
            scale-free, so without it a predictor fitted exactly -- linear skipped blocks -- would be nudged off).
    """

    def __init__(self, dim: int, rank: int = 48, mix: bool = True, lr: float = 2e-3, weight_decay: float = 0.0,
                 total_steps: int | None = None, stop_below: float = 0.0) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.predictor = ResidualPredictor(dim, rank, mix)

    def init_linear(self, pairs: dict[str, torch.Tensor], max_rows: int = 200_000) -> float:
        """Closed-form start for the predictor's linear map (``ResidualPredictor.fit_linear``) on up to
        ``max_rows`` token rows of ``pairs``; returns the fit's relative error."""
        n_tok = pairs["h"].shape[1]
        k = max(1, min(pairs["h"].shape[0], max_rows // max(n_tok, 1)))
        return self.predictor.fit_linear(pairs["h"][:k], pairs["r_c"][:k], pairs["h_c"][:k], pairs["r_t"][:k],
                                         pairs["sigma_t"][:k], pairs["sigma_c"][:k])

    @override
    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """The predictor's relative error on a batch of pairs (``None`` skips the step below ``stop_below``).

        Args:
            batch: trajectory pairs (``PairsDataset``).
            batch_idx: unused.
        """
        loss = predictor_loss(self.predictor, batch)
        self.log("train/rel_err", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=batch["h"].shape[0])
        if float(loss.detach()) < self.hparams.stop_below:
            return None  # already fitted to tolerance on this batch: skip the step
        return loss

    @override
    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        """Log the relative error on a validation batch.

        Args:
            batch: held-out trajectory pairs.
            batch_idx: unused.
        """
        self.log("val/rel_err", predictor_loss(self.predictor, batch), on_epoch=True, batch_size=batch["h"].shape[0])

    @override
    def configure_optimizers(self) -> Any:
        """AdamW, with a cosine learning-rate decay over ``total_steps`` when set."""
        opt = torch.optim.AdamW(self.predictor.parameters(), lr=self.hparams.lr,
                                weight_decay=self.hparams.weight_decay)
        if not self.hparams.total_steps:
            return opt
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=int(self.hparams.total_steps),
                                                           eta_min=0.05 * self.hparams.lr)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class LearnedCacheExport(Callback):
    """Write the predictor to ``path`` (safetensors + fingerprint header) when ``fit`` ends.

    Args:
        path: the output file (written atomically; this callback writes nothing else).
        identity: the model fingerprint (``core.cache.learned.model_identity(model)``).
        meta: stored with it (``skip_steps``, ``head_blocks``, ``tail_blocks``, training record).
    """

    def __init__(self, path: str | Path, identity: dict[str, str], meta: dict[str, Any] | None = None) -> None:
        self.path = Path(path)
        self.identity = identity
        self.meta = dict(meta or {})
        self.written: Path | None = None

    @override
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Write the predictor (rank 0) when fitting ends.

        Args:
            trainer: its step and epoch counts go into the metadata.
            pl_module: holds the fitted ``predictor``.
        """
        if trainer.is_global_zero:
            meta = {**self.meta, "optimizer_steps": int(trainer.global_step), "epochs": int(trainer.current_epoch)}
            self.written = save_predictor(self.path, pl_module.predictor, self.identity, meta)


def pairs_loader(pairs: dict[str, torch.Tensor], batch_size: int = 64, seed: int = 0) -> DataLoader:
    ds = PairsDataset(pairs)
    return DataLoader(ds, batch_size=batch_size, sampler=EpochSeededSampler(len(ds), seed), drop_last=False)


def fit_learned_cache(pairs: dict[str, torch.Tensor], *, rank: int = 48, mix: bool = True, lr: float = 2e-3,
                      epochs: int = 20, batch_size: int = 64, seed: int = 0, init_linear: bool = True,
                      stop_below: float = 0.0,
                      export: LearnedCacheExport | None = None, default_root_dir: str | Path | None = None,
                      ckpt_path: str | None = None, **trainer_kwargs: Any) -> tuple[LearnedCacheModule, dict]:
    """Train a predictor on ``pairs`` with a Lightning ``Trainer`` (CPU or GPU as Lightning picks); returns the
    module and a record (seconds, optimiser steps, final training error)."""
    L.seed_everything(seed, workers=True, verbose=False)
    loader = pairs_loader(pairs, batch_size, seed)
    steps = epochs * len(loader)
    module = LearnedCacheModule(int(pairs["h"].shape[-1]), rank, mix, lr=lr, total_steps=steps,
                                stop_below=stop_below)
    rec: dict[str, Any] = {"pairs": int(pairs["h"].shape[0]), "tokens": int(pairs["h"].shape[1]),
                           "predictor_params": sum(p.numel() for p in module.predictor.parameters())}
    t0 = time.perf_counter()
    if init_linear and ckpt_path is None:
        rec["linear_fit_rel_err"] = module.init_linear(pairs)
    callbacks = [export] if export is not None else []
    kw: dict[str, Any] = {"max_epochs": epochs, "callbacks": callbacks, "logger": False, "enable_checkpointing": False,
                          "enable_progress_bar": False, "enable_model_summary": False, "deterministic": True,
                          "default_root_dir": default_root_dir}
    trainer = L.Trainer(**{**kw, **trainer_kwargs})
    trainer.fit(module, loader, ckpt_path=ckpt_path)
    rec["seconds"] = round(time.perf_counter() - t0, 1)
    rec["optimizer_steps"] = int(trainer.global_step)
    with torch.no_grad():
        module.predictor.eval()
        rec["final_rel_err"] = float(predictor_loss(module.predictor, {k: v[:2048] for k, v in pairs.items()}))
    return module, rec
