"""Adapter guidance distillation (AGD) as a LightningModule.

Jensen et al. 2025, "Efficient Distillation of Classifier-Free Guidance using Adapters": the teacher stays frozen;
a ``GuidanceAdapter`` (``core.guidance.adapters``, about 2% of the parameters, conditioned on the guidance scale)
is trained so that the adapted model's single pass matches the teacher's CFG output
``uncond + w (cond - uncond)`` (``core.losses.guidance``), at states taken from CFG-guided teacher trajectories
(``core.trajectories``) with the scale each trajectory was sampled with. The loss is in the teacher's native
parameterisation (eps/v).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from typing_extensions import override

from ..core.conditioning import cond_index, cond_to
from ..core.distill import randint_per_sample
from ..core.guidance.adapters import DEFAULT_TARGETS, AdaptedDenoiser, GuidanceAdapter
from ..core.guidance.scaled import guided_denoise
from ..core.losses.guidance import (
    DELTA_WEIGHTINGS,
    SCALE_WEIGHTINGS,
    guidance_delta_weights,
    guidance_distillation_loss,
    guidance_scale_weights,
)
from .base import DistillationModule
from .reflow import resolve_trajectories


class GuidanceAdapterDistillation(DistillationModule):
    """Train a guidance adapter for a frozen teacher on its CFG trajectories.

    Args (besides ``DistillationModule``'s; ``student`` is always the adapted teacher):
        trajectories: a folder from ``generate_trajectories`` with ``save_states=True`` and a range of scales.
        rank, targets, embed_dim, hidden, zero_at_unit_scale: the adapter (``GuidanceAdapter``).
        eval_guidance: the scale used by ``sampling_plan`` (one pass per step).
        scale_weighting, scale_weight_floor: per-sample loss weights over the scale
            (``core.losses.guidance.guidance_scale_weights``): ``"none"`` (plain MSE, large ``w`` dominates) or
            ``"inverse_square"`` (``1 / max(w - 1, floor)^2``: the relative error, equal across scales).
        delta_weighting, delta_weight_floor: per-sample loss weights over the size of the guidance direction at
            that state (``core.losses.guidance.guidance_delta_weights``): ``"none"`` or ``"inverse_delta"``
            (``1 / max(mean((cond - uncond)^2), floor)`` in native units: low-noise steps, where the two passes
            differ little, count as much as high-noise ones; with ``"inverse_square"`` the loss is the squared
            relative error of the guidance term).
    """

    method = "agd"

    def __init__(self, teacher: nn.Module, sample_shape: Sequence[int], trajectories: Any, rank: int = 4,
                 targets: Sequence[str] = DEFAULT_TARGETS, embed_dim: int = 64, hidden: int = 64,
                 zero_at_unit_scale: bool = True, eval_guidance: float | None = None, scale_weighting: str = "none",
                 scale_weight_floor: float = 0.1, delta_weighting: str = "none", delta_weight_floor: float = 1e-4,
                 **kwargs: Any):
        kwargs.pop("student", None)
        if scale_weighting not in SCALE_WEIGHTINGS:
            raise ValueError(f"scale_weighting must be one of {SCALE_WEIGHTINGS}, got {scale_weighting!r}")
        if not scale_weight_floor > 0:
            raise ValueError(f"scale_weight_floor must be > 0, got {scale_weight_floor}")
        if delta_weighting not in DELTA_WEIGHTINGS:
            raise ValueError(f"delta_weighting must be one of {DELTA_WEIGHTINGS}, got {delta_weighting!r}")
        if not delta_weight_floor > 0:
            raise ValueError(f"delta_weight_floor must be > 0, got {delta_weight_floor}")
        super().__init__(teacher, sample_shape, student=None, **kwargs)
        tensors, manifest = resolve_trajectories(trajectories, self.teacher, self.sample_shape)
        if "states" not in tensors:
            raise ValueError("AGD trains on trajectory states: generate the trajectories with save_states=True")
        self.scale_range = tuple(float(v) for v in manifest["guidance_range"])
        self._check_cfg(self.scale_range)
        self.states, self.traj_cond, self.traj_scale = tensors["states"], tensors["cond"], tensors["guidance_scale"]
        self.traj_sigmas = tensors["sigmas"].float()
        self.manifest = manifest
        net = getattr(self.teacher, "model", self.teacher)
        adapter = GuidanceAdapter(net, rank=rank, targets=targets, embed_dim=embed_dim, hidden=hidden,
                                  zero_at_unit_scale=zero_at_unit_scale, scale_range=self.scale_range,
                                  base_name=getattr(self.teacher, "name", None), seed=self.seed)
        self.student = AdaptedDenoiser(self.teacher, adapter)
        self.student_kind = "guidance_adapter"
        self.eval_guidance = float(eval_guidance if eval_guidance is not None else sum(self.scale_range) / 2)
        self.scale_weighting, self.scale_weight_floor = scale_weighting, float(scale_weight_floor)
        self.delta_weighting, self.delta_weight_floor = delta_weighting, float(delta_weight_floor)
        self.save_hyperparameters(ignore=["teacher", "student", "trajectories", "cond_pool"], logger=False)

    @property
    def adapter(self) -> GuidanceAdapter:
        return self.student.adapter

    def agd_step(self, ids: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        ms = self.model_sampling
        dev = self.device
        idx = randint_per_sample(ids, len(self.states), "agd/index", self.seed)
        j = randint_per_sample(ids, self.states.shape[1] - 1, "agd/state", self.seed)  # never the endpoint
        x = self.states[idx, j].to(dev)
        sigma = self.traj_sigmas[j].to(dev)
        labels = cond_to(cond_index(self.traj_cond, idx), dev)
        w = self.traj_scale[idx].to(dev)
        with torch.no_grad():
            _, cond_x0, uncond_x0 = guided_denoise(self.teacher, x, sigma, w, self.cond_key, self.null,
                                                   return_parts=True, **self.cond(labels))
        pred_x0 = self.student(x, sigma, guidance_scale=w, **self.cond(labels))
        native = ms.output_from_denoised
        weights = None if self.scale_weighting == "none" else \
            guidance_scale_weights(w, self.scale_weighting, self.scale_weight_floor).to(dev)
        cond_n, uncond_n = native(sigma, cond_x0, x), native(sigma, uncond_x0, x)
        if self.delta_weighting != "none":
            dw = guidance_delta_weights(cond_n, uncond_n, self.delta_weighting, self.delta_weight_floor)
            weights = dw if weights is None else weights * dw
        loss = guidance_distillation_loss(native(sigma, pred_x0, x), cond_n, uncond_n, w, weights)
        return loss, {"agd": loss.detach()}

    @override
    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        """One guidance-adapter update on this step's samples; returns the loss.

        Args:
            batch, batch_idx: unused: the guidance-adapter samples are drawn from their global indices.
        """
        ids = self.sample_ids()
        loss, logs = self.agd_step(ids)
        return self.counted_update(loss, logs, len(ids))

    def sampling_plan(self) -> dict[str, Any]:
        return {"denoiser": self.student, "sampler": self.manifest["sampler"], "sigmas": self.traj_sigmas,
                "extra": {"guidance_scale": self.eval_guidance}}

    def export_metadata(self) -> dict[str, Any]:
        return {**super().export_metadata(), "eval_guidance": self.eval_guidance,
                "scale_range": list(self.scale_range), "scale_weighting": self.scale_weighting,
                "delta_weighting": self.delta_weighting}

    @torch.no_grad()
    def export(self, path: str | Path, **_: Any) -> list[Path]:
        """Write the adapter (only its tensors) with metadata naming the base model."""
        meta = self.export_metadata()
        meta.pop("config", None)
        if self.world()[1] != 0:  # the adapter is replicated (also under FSDP2): rank 0 writes it
            return []
        return [self.adapter.save(path, extra={"distillation": meta})]

