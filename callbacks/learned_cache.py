"""Lightning training of the learned cache's predictor (DisCa-style) on a model's own trajectories.

``LearnedCacheModule`` regresses a ``ResidualPredictor`` onto the skipped block range's residual (training pairs
from ``fewstep.core.cache.learned.collect_pairs``: teacher runs, student runs, or both concatenated);
``LearnedCacheDuringDistillation`` trains one while a student distils, on the student's own trajectories;
``LearnedCacheExport`` writes the predictor as safetensors keyed to the model's fingerprint when training ends
(atomic; the path is the one the user named). ``fit_learned_cache`` wires both into a ``Trainer``.

Resuming: the data order depends only on ``(seed, epoch)`` (``EpochSeededSampler``) and the optimiser state is in the
checkpoint, so ``trainer.fit(..., ckpt_path=...)`` continues exactly where an uninterrupted run would be.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
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


class LearnedCacheDuringDistillation(Callback):
    """Trains a learned-cache predictor *while a student distils*, on the student's own features (DisCa, Zou et al.
    2025: the predictor is learned together with the few-step student, so it sees the student's trajectory
    distribution as it is now, not the teacher's).

    Every ``every_n_steps`` training batches the callback samples ``samples`` trajectories with the module's own
    ``sampling_plan()`` (the student's sampler and schedule, its guidance inputs), records the block range
    ``[head_blocks, num_blocks - tail_blocks)`` of the student's network (``core.cache.learned.collect_pairs``) and
    takes ``updates`` AdamW steps of the predictor on those pairs (its own optimiser: the student's training is not
    touched; no gradient flows into the student). The predictor, its optimiser and the counters are in Lightning's
    checkpoint (``state_dict``), so a resumed run continues the same predictor. With ``path`` the predictor is saved
    at the end of fit, keyed to the *final* student's fingerprint (``core.cache.learned.model_identity``).

    Args:
        skip_steps: the skip plan stored with the predictor (call indices of a run whose range is predicted).
        head_blocks, tail_blocks: the cached range, as ``LearnedCache``.
        rank, mix: the predictor's configuration (``ResidualPredictor``).
        lr: the predictor's AdamW learning rate.
        every_n_steps, samples, updates, max_gap: how often, on how many sampled trajectories, how many steps, and
            pairs up to how many calls apart.
        path: where to save the predictor at the end (``None``: keep it in ``self.predictor`` only).
        seed: seeds the recording noise (record ``k`` uses ``seed + k``).
    """

    def __init__(self, skip_steps: Sequence[int], *, head_blocks: int = 1, tail_blocks: int = 0, rank: int = 48,
                 mix: bool = True, lr: float = 2e-3, every_n_steps: int = 10, samples: int = 8, updates: int = 4,
                 max_gap: int = 2, path: str | Path | None = None, seed: int = 0) -> None:
        for name, v in (("every_n_steps", every_n_steps), ("samples", samples), ("updates", updates),
                        ("max_gap", max_gap)):
            if int(v) < 1:
                raise ValueError(f"LearnedCacheDuringDistillation: {name} must be >= 1, got {v}")
        self.skip_steps = sorted(int(s) for s in skip_steps)
        self.head_blocks, self.tail_blocks = int(head_blocks), int(tail_blocks)
        self.rank, self.mix, self.lr = int(rank), bool(mix), float(lr)
        self.every, self.samples, self.updates, self.max_gap = int(every_n_steps), int(samples), int(updates), \
            int(max_gap)
        self.path = Path(path) if path is not None else None
        self.seed = int(seed)
        self.predictor: ResidualPredictor | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.records = 0
        self.batches = 0
        self.history: list[dict[str, float]] = []
        self.written: Path | None = None
        self._pending: dict[str, Any] | None = None

    # ------------------------------------------------------------------ the student's network and its blocks
    @staticmethod
    def _network(pl_module: L.LightningModule) -> tuple[Any, torch.nn.Module, list[torch.nn.Module]]:
        from ..core.cache.identity import find_denoiser
        from ..core.cache.layouts import lookup_layout, resolve_attr

        plan = pl_module.sampling_plan()
        den = find_denoiser(plan["denoiser"])
        if den is None:
            raise TypeError("LearnedCacheDuringDistillation needs a module whose sampling_plan() denoiser wraps a "
                            "fewstep Denoiser")
        layout = lookup_layout("diffusers", den.model)
        if layout is None or len(layout.lists) != 1:
            raise TypeError(f"LearnedCacheDuringDistillation needs a network with one declared block list "
                            f"(core.cache.layouts); {type(den.model).__name__} has none")
        return plan, den, list(resolve_attr(den.model, layout.lists[0].attr))

    def _ensure(self, dim: int, device: torch.device) -> None:
        if self.predictor is None:
            self.predictor = ResidualPredictor(dim, self.rank, self.mix).to(device)
            self.optimizer = torch.optim.AdamW(self.predictor.parameters(), lr=self.lr)
            if self._pending is not None:  # resumed: the checkpoint's predictor and optimiser
                self.predictor.load_state_dict(self._pending["predictor"])
                self.optimizer.load_state_dict(self._pending["optimizer"])
                self._pending = None

    @torch.no_grad()
    def _record(self, pl_module: L.LightningModule) -> dict[str, torch.Tensor]:
        from ..core.cache.learned import collect_pairs, dit_sigma_of_call

        plan, den, blocks = self._network(pl_module)
        n = self.samples
        labels = torch.arange(n, device=pl_module.device) % int(pl_module.num_classes or 1)
        gen = torch.Generator().manual_seed(self.seed + self.records)
        z = torch.randn(n, *pl_module.sample_shape, generator=gen).to(pl_module.device)
        sigmas = torch.as_tensor(plan["sigmas"], dtype=torch.float32).to(pl_module.device)
        ms = den.model_sampling
        x = ms.noise_scaling(sigmas[0], z, torch.zeros_like(z), max_denoise=True)
        extra = {**pl_module.cond(labels), **plan.get("extra", {})}
        sampler = _get_sampler(plan["sampler"])
        modes = [(m, m.training) for m in den.model.modules()]
        den.model.eval()
        try:
            return collect_pairs(lambda: sampler(plan["denoiser"], x, sigmas, extra_args=extra, disable=True),
                                 den.model, blocks, self.head_blocks, self.tail_blocks, dit_sigma_of_call(ms),
                                 max_gap=self.max_gap)
        finally:
            for m, mode in modes:
                m.training = mode

    # ------------------------------------------------------------------ hooks
    @override
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        """Every ``every_n_steps`` batches: record the student's trajectories and train the predictor on them.

        Args:
            trainer: the Lightning trainer.
            pl_module: the distillation module (``sampling_plan()``, ``cond()``, ``sample_shape``).
            outputs, batch, batch_idx: unused.
        """
        self.batches += 1
        if self.batches % self.every:
            return
        pairs = self._record(pl_module)
        self._ensure(int(pairs["h"].shape[-1]), pl_module.device)
        self.records += 1
        self.predictor.train()
        g = torch.Generator().manual_seed(self.seed * 7919 + self.records)
        losses = []
        with torch.enable_grad():
            for _ in range(self.updates):
                idx = torch.randperm(pairs["h"].shape[0], generator=g)[:64]
                loss = predictor_loss(self.predictor, {k: v[idx.to(v.device)] for k, v in pairs.items()})
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.optimizer.step()
                losses.append(float(loss.detach()))
        self.predictor.eval()
        self.history.append({"step": int(trainer.global_step), "rel_err": losses[-1],
                             "pairs": int(pairs["h"].shape[0])})
        pl_module.log("learned_cache/rel_err", losses[-1], on_step=True, on_epoch=False, batch_size=1)

    @override
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Save the predictor keyed to the final student's fingerprint (rank 0, atomic), when ``path`` was given.

        Args:
            trainer: the Lightning trainer.
            pl_module: the distillation module.
        """
        if self.path is None or self.predictor is None or not trainer.is_global_zero:
            return
        from ..core.cache.learned import model_identity

        _, den, blocks = self._network(pl_module)
        meta = {"skip_steps": self.skip_steps, "head_blocks": self.head_blocks, "tail_blocks": self.tail_blocks,
                "trained_during": type(pl_module).__name__, "records": self.records,
                "optimizer_steps": self.records * self.updates, "student_step": int(trainer.global_step)}
        self.written = save_predictor(self.path, self.predictor, model_identity(den), meta)

    @override
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"records": self.records, "batches": self.batches, "history": list(self.history)}
        if self.predictor is not None:
            state.update(dim=self.predictor.dim, predictor=self.predictor.state_dict(),
                         optimizer=self.optimizer.state_dict())
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.records = int(state_dict.get("records", 0))
        self.batches = int(state_dict.get("batches", 0))
        self.history = list(state_dict.get("history", []))
        if "predictor" in state_dict:
            self.predictor = None
            self._pending = {"predictor": state_dict["predictor"], "optimizer": state_dict["optimizer"]}
            self._ensure(int(state_dict["dim"]), torch.device("cpu"))


def _get_sampler(name: str) -> Any:
    from ..core.sampling import get_sampler

    return get_sampler(name)
