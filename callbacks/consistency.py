"""Consistency distillation (LCM / multistep / segmented) as a LightningModule.

LCM (Luo et al. 2023, Alg. 1) with the multistep segments of Heek et al. 2024 / MLCM / Hyper-SD
(``core.losses.consistency``): real data is noised to a grid level ``t_{n+k}``; the teacher, guided with scale
``w``, takes a DDIM step to ``t_n`` (stopping at the segment end); the student's prediction at ``t_{n+k}`` and the
target network's at ``t_n``, both moved to the segment end, are pulled together. The target network is the
stop-gradient online student (iCT, Song & Dhariwal 2023) or an EMA of it (``target_ema``, LCM uses 0.95).

With a guidance range ``(w_min, w_max)`` the student is conditioned on ``w`` (LCM's guidance-scale embedding)
through a ``GuidanceAdapter`` on its own layers (not zero at ``w = 1``), trained with it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from typing_extensions import override

from ..core.conditioning import cond_index, cond_to, real_conditions
from ..core.distill import check_guidance_range, rand_per_sample, randint_per_sample, sample_scales
from ..core.guidance.adapters import AdaptedDenoiser, GuidanceAdapter
from ..core.guidance.scaled import guided_denoise
from ..core.losses.common import ddim_transfer
from ..core.losses.consistency import consistency_grid, consistency_loss, segment_boundaries, segment_end_index
from .base import DistillationModule
from .sharding import full_tensor, like_param, reshard


class ConsistencyDistillation(DistillationModule):
    """A ``segments``-step consistency student (``segments=1``: LCM-style, sample with 1..N LCM steps).

    Args (besides ``DistillationModule``'s):
        real_data, real_labels: the data the teacher ODE starts from (LCM distils on real samples).
        guidance: one CFG scale of the teacher, or a ``(min, max)`` range (student conditioned on ``w``).
        segments: trajectory segments (Hyper-SD / multistep CM); the student samples in ``segments`` steps.
        num_grid: solver grid size (LCM's 50 DDIM steps; must be divisible by ``segments``).
        skip: grid steps per teacher step (LCM's skipping-step ``k``).
        distance, huber_c: ``"huber"`` (pseudo-Huber, iCT's ``c`` by default) or ``"l2"``.
        target_ema: EMA decay of the target network (0 = stop-gradient online student).
        adapter_rank: rank of the guidance-scale adapter of a w-conditioned student.
        eval_guidance: the scale used by ``sampling_plan`` for a w-conditioned student.
        segment_weights: relative probability of training on each segment, lowest-noise segment first (default:
            levels uniform over the grid, i.e. equal weights). On the digits teacher the last segment (to sigma 0)
            holds the whole gap of the 4-step student (issue 13): ``(3, 1, 1, 1)`` spends half the batches there.
        teacher_steps: teacher DDIM steps (of ``skip`` grid levels each, stopping at the segment end) from ``x_t``
            before the target network is asked (1: LCM's single step). With ``teacher_steps >= num_grid /
            segments / skip`` every target is the teacher's own ODE solution at the segment end: nothing is
            bootstrapped through the student (multi-step targets, issue 13; costs ``teacher_steps`` guided teacher
            calls per batch).
        warmup_steps: linear learning-rate warm-up over this many updates (0: none).
    """

    method = "consistency"

    def __init__(self, teacher: nn.Module, sample_shape: Sequence[int], real_data: Tensor,
                 real_labels: Tensor | None = None, guidance: float | Sequence[float] = 2.0, segments: int = 4,
                 num_grid: int = 48, skip: int = 1, distance: str = "huber", huber_c: float | None = None,
                 target_ema: float = 0.0, adapter_rank: int = 4, eval_guidance: float | None = None,
                 segment_weights: Sequence[float] | None = None, teacher_steps: int = 1, warmup_steps: int = 0,
                 **kwargs: Any):
        super().__init__(teacher, sample_shape, **kwargs)
        self.guidance_range = check_guidance_range(guidance)
        self._check_cfg(self.guidance_range)
        self.boundaries = segment_boundaries(int(num_grid), int(segments))
        self.segments, self.num_grid = int(segments), int(num_grid)
        if not 1 <= int(skip) <= self.num_grid // self.segments:
            raise ValueError(f"skip must be in [1, {self.num_grid // self.segments}], got {skip}")
        self.skip = int(skip)
        if int(teacher_steps) < 1:
            raise ValueError(f"teacher_steps must be >= 1 (teacher solver steps per target), got {teacher_steps}")
        if int(warmup_steps) < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
        self.teacher_steps, self.warmup_steps = int(teacher_steps), int(warmup_steps)
        self.segment_probs = None
        if segment_weights is not None:
            sw = torch.as_tensor(list(segment_weights), dtype=torch.float64)
            if sw.shape != (self.segments,) or (sw < 0).any() or sw.sum() <= 0:
                raise ValueError(f"segment_weights must be {self.segments} non-negative numbers (one per segment, "
                                 f"lowest noise first) with a positive sum, got {list(segment_weights)}")
            self.segment_probs = (sw / sw.sum()).float()
        if distance not in ("huber", "l2"):
            raise ValueError(f"distance must be 'huber' or 'l2', got {distance!r}")
        self.distance, self.huber_c = distance, huber_c
        if not 0.0 <= target_ema < 1.0:
            raise ValueError(f"target_ema must be in [0, 1), got {target_ema}")
        self.target_ema = float(target_ema)
        self.real_data = torch.as_tensor(real_data).float().cpu()
        if tuple(self.real_data.shape[1:]) != self.sample_shape:
            raise ValueError(f"real_data samples have shape {tuple(self.real_data.shape[1:])}, "
                             f"expected {self.sample_shape}")
        self.real_labels = None if real_labels is None else real_conditions(real_labels)
        self.grid = consistency_grid(self.model_sampling, self.num_grid)
        self.conditioned = self.guidance_range[0] != self.guidance_range[1]
        self.eval_guidance = float(eval_guidance if eval_guidance is not None else self.guidance_range[0]
                                   if not self.conditioned else sum(self.guidance_range) / 2)
        if self.conditioned:
            net = getattr(self.student, "model", self.student)
            adapter = GuidanceAdapter(net, rank=adapter_rank, zero_at_unit_scale=False,
                                      scale_range=self.guidance_range, base_name=getattr(self.student, "name", None),
                                      seed=self.seed)
            self.student = AdaptedDenoiser(self.student, adapter)
        self._target: dict[str, Tensor] | None = None
        self._target_version = -1
        self.save_hyperparameters(ignore=["teacher", "student", "real_data", "real_labels", "cond_pool"], logger=False)

    # ------------------------------------------------------------------------------------------ state
    def extra_state(self) -> dict[str, Any]:
        if self._target is None:
            return {}
        return {"target": {k: full_tensor(v.detach()).cpu().clone() for k, v in self._target.items()},
                "target_version": self._target_version}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        if "target" in state:
            params = self.ema_parameters()  # sharded like its parameter under FSDP2
            self._target = {k: like_param(v, params[k]) for k, v in state["target"].items()}
            self._target_version = int(state["target_version"])

    @torch.no_grad()
    def _update_target(self) -> None:
        """EMA target: fold in the student of the previous update (done at the start of a step, so a checkpoint
        taken after a step and an uninterrupted run see the same target)."""
        if self.target_ema == 0.0 or self._target_version == self.student_updates:
            return
        params = self.ema_parameters()
        if self._target is None:
            self._target = {k: p.detach().clone() for k, p in params.items()}
        else:
            for k, p in params.items():
                t = self._target[k]
                if t.device != p.device:
                    t = self._target[k] = t.to(p.device)
                t.lerp_(p.detach(), 1.0 - self.target_ema)
        self._target_version = self.student_updates

    @torch.no_grad()
    def _target_predict(self, x: Tensor, sigma: Tensor, labels: Tensor, w: Tensor) -> Tensor:
        if self._target is None:
            return self._student_call(x, sigma, labels, w)
        params = self.ema_parameters()
        saved = {k: p.detach().clone() for k, p in params.items()}
        try:
            for k, p in params.items():
                p.copy_(self._target[k])
            reshard(self.student)  # FSDP2: gather the swapped shards at the next forward
            return self._student_call(x, sigma, labels, w)
        finally:
            for k, p in params.items():
                p.copy_(saved[k])
            reshard(self.student)

    def _student_call(self, x: Tensor, sigma: Tensor, labels: Tensor, w: Tensor) -> Tensor:
        if self.conditioned:
            return self.student(x, sigma, guidance_scale=w, **self.cond(labels))
        return self.student(x, sigma, **self.cond(labels))

    # ----------------------------------------------------------------------------------------- step
    def consistency_step(self, ids: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """The consistency loss on the samples ``ids``."""
        ms = self.model_sampling
        dev = self.device
        idx = randint_per_sample(ids, len(self.real_data), "cm/index", self.seed)
        x0 = self.real_data[idx].to(dev)
        labels = cond_to(cond_index(self.real_labels, idx), dev) if self.real_labels is not None \
            else self.draw_labels(ids)
        j = self.draw_levels(ids)
        end = segment_end_index(j, self.num_grid, self.segments)
        grid = self.grid.to(dev)
        sig_t, sig_e = grid[j.to(dev)], grid[end.to(dev)]
        x_t = ms.noise_scaling(sig_t, self.randn(ids, "cm/noise"), x0)
        w = sample_scales(rand_per_sample(ids, 1, "cm/w", self.seed, dev)[:, 0], self.guidance_range)
        with torch.no_grad():
            x_s, s = self.teacher_solve(x_t, j, end, labels, w)
            sig_s = grid[s.to(dev)]
            safe_s = torch.where(sig_s > 0, sig_s, grid[1])  # the target at sigma 0 is x_s itself (unused)
            target_x0 = self._target_predict(x_s, safe_s, labels, w)
        student_x0 = self._student_call(x_t, sig_t, labels, w)
        loss = consistency_loss(ms, x_t, sig_t, student_x0, x_s, sig_s, target_x0, sig_e, self.distance, self.huber_c)
        return loss, {"consistency": loss.detach()}

    @torch.no_grad()
    def teacher_solve(self, x_t: Tensor, j: Tensor, end: Tensor, labels: Tensor, w: Tensor) -> tuple[Tensor, Tensor]:
        """``teacher_steps`` guided teacher DDIM steps from grid level ``j`` towards the segment end ``end``
        (``skip`` levels each, never past ``end``; samples that reached it stop). Returns ``(x_s, s)``."""
        ms, grid = self.model_sampling, self.grid.to(x_t.device)
        x, cur = x_t.clone(), j.clone()
        for _ in range(self.teacher_steps):
            act = (cur > end).nonzero().flatten()
            if len(act) == 0:
                break
            nxt = torch.maximum(cur[act] - self.skip, end[act])
            a = act.to(x.device)
            sig_c, sig_n = grid[cur[act].to(x.device)], grid[nxt.to(x.device)]
            lab = cond_index(labels, a) if labels is not None else None
            x0 = guided_denoise(self.teacher, x[a], sig_c, w[a], self.cond_key, self.null, **self.cond(lab))
            x[a] = ddim_transfer(ms, x[a], x0, sig_c, sig_n)
            cur[act] = nxt
        return x, cur

    def configure_optimizers(self):
        opt = super().configure_optimizers()
        if not self.warmup_steps:
            return opt
        return {"optimizer": opt, "lr_scheduler": self.linear_warmup(opt, self.warmup_steps)}

    def draw_levels(self, ids: Tensor) -> Tensor:
        """Grid levels ``1..num_grid`` of the samples ``ids``: uniform, or a segment drawn with ``segment_weights``
        and a level uniform inside it."""
        if self.segment_probs is None:
            return 1 + randint_per_sample(ids, self.num_grid, "cm/level", self.seed)
        u = rand_per_sample(ids, 1, "cm/segment", self.seed)[:, 0]
        seg = torch.searchsorted(self.segment_probs.cumsum(0), u, right=True).clamp(max=self.segments - 1)
        per = self.num_grid // self.segments
        return seg * per + 1 + randint_per_sample(ids, per, "cm/level", self.seed)

    @override
    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        """One consistency update on this step's samples; returns the loss.

        Args:
            batch, batch_idx: unused: the consistency samples are drawn from their global indices.
        """
        self._update_target()
        ids = self.sample_ids()
        loss, logs = self.consistency_step(ids)
        return self.counted_update(loss, logs, len(ids))

    # ------------------------------------------------------------------------------------- sampling
    def sampling_sigmas(self) -> Tensor:
        return self.grid[list(reversed(self.boundaries))]

    def sampling_plan(self) -> dict[str, Any]:
        extra = {"guidance_scale": self.eval_guidance} if self.conditioned else {}
        return {"denoiser": self.student, "sampler": "euler", "sigmas": self.sampling_sigmas(), "extra": extra}

    def export_metadata(self) -> dict[str, Any]:
        meta = super().export_metadata()
        meta.update({"segments": self.segments, "guidance_range": list(self.guidance_range),
                     "guidance_scale": self.eval_guidance if not self.conditioned else None,
                     "guidance_conditioned": self.conditioned})
        return meta

    @torch.no_grad()
    def export(self, path: str | Path, **kwargs: Any) -> list[Path]:
        """The student (see ``DistillationModule.export``); a w-conditioned student also writes its guidance
        adapter as ``<stem>_guidance.safetensors``."""
        files = super().export(path, **kwargs)
        if self.conditioned and self.world()[1] == 0:  # the adapter is replicated: rank 0 writes it
            p = Path(path)
            files.append(self.student.adapter.save(p.with_name(p.stem + "_guidance.safetensors"),
                                                   extra={"distillation": {"method": self.method}}))
        return files

    def student_network(self) -> nn.Module:
        den = self.student.denoiser if self.conditioned else self.student
        return getattr(den, "model", den)
