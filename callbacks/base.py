"""The shared base of fewstep's distillation LightningModules.

What every method shares:

- **Teacher**: frozen, in eval mode, left out of checkpoints (it is the user's model; it is put back from the live
  module on load). Networks stay in eval mode during training: label dropout would draw from the global RNG.
- **Student**: a full trainable copy of the teacher (``student="copy"``), the teacher plus peft LoRA layers
  (``student="lora"``), or any denoiser you pass (its output shape is checked against the teacher's first).
- **Data**: the modules make their own inputs. The train dataloader is a ticker; a batch is the ``batch_size``
  (global) samples with global indices ``batches_seen * batch_size + [0, batch_size)``, split over processes, and
  all randomness of a sample is drawn from its index (``core.distill``). So DDP reproduces one process at the same
  global batch, and a resumed run reproduces an uninterrupted one, with only ``batches_seen`` to save. Conditions
  come from ``num_classes`` (uniform class ids) or from data (real images, teacher trajectories).
- **Counters** (``batches_seen``, ``student_updates`` and method-specific ones) live in the checkpoint under
  ``"fewstep"``; they, not ``trainer.global_step``, drive update ratios and callbacks.
- **Export**: ``export(path)`` writes the student (safetensors + JSON; merged weights for LoRA students, plus a
  ComfyUI LoRA file), with the sampler and sigmas it was trained for in the metadata.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader
from typing_extensions import override

from ..core.conditioning import (
    Cond,
    check_cond_pool,
    cond_index,
    cond_kwargs,
    cond_len,
    cond_to,
    is_embedding_cond,
)
from ..core.distill import check_null_condition, check_same_output_shape, randint_per_sample, randn_per_sample
from ..core.guidance.adapters import DEFAULT_TARGETS
from ..core.sampling.registry import ANCESTRAL_SAMPLERS
from ..core.sampling.samplers import default_noise_sampler, get_sampler
from ..core.sampling.schedules import check_sigmas
from . import gradients
from .checkpoint_state import drop_frozen, fill_frozen, frozen_ptrs
from .gradients import frozen
from .student_files import write_student_files
from .student_networks import copy_student, lora_student
from .ticker import ticker_dataloader

__all__ = ["DistillationModule", "frozen", "ticker_dataloader"]


class DistillationModule(L.LightningModule):
    """Base class of the distillation modules (see the module docstring).

    Args:
        teacher: the teacher denoiser ``D(x, sigma, **{cond_key: c})``.
        sample_shape: shape of one sample, e.g. ``(1, 16, 16)``.
        student: ``"copy"``, ``"lora"``, or a denoiser module to train (its output shape must match the teacher's);
            ``None`` when a subclass builds its own.
        lora_rank, lora_alpha, lora_targets: LoRA student settings (``lora_alpha`` defaults to the rank).
        batch_size: the global batch size (split over processes; must be divisible by the world size).
        lr, betas, weight_decay, grad_clip: AdamW settings and gradient-norm clipping (0 disables it).
        num_classes, cond_key, null: conditions (uniform class ids), the teacher's condition argument and null value.
        teacher_dtype: run the frozen teacher in this dtype (``"bf16"``: half its memory, faster on GPUs); the
            student (a copy made before the cast, or your module) and the critic keep their float32 weights. Not with
            a LoRA student or a guidance adapter (they share the teacher's network).
        cond_pool: conditions drawn per sample from a pool instead of class ids: precomputed text embeddings
            ``{keyword: (N, ...)}`` (``core.conditioning``; then ``null`` is the mapping of null embeddings,
            ``num_classes`` is ignored).
        seed: seeds all per-sample randomness.
        unique_samples: cycle over this many sample indices (tiny overfitting problems and tests).
    """

    method = "distill"

    def __init__(self, teacher: nn.Module, sample_shape: Sequence[int], student: str | nn.Module | None = "copy",
                 lora_rank: int = 8, lora_alpha: float | None = None, lora_targets: Sequence[str] = DEFAULT_TARGETS,
                 batch_size: int = 32, lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.999),
                 weight_decay: float = 0.0, grad_clip: float = 1.0, num_classes: int | None = 10,
                 cond_key: str = "class_labels", null: Any = 10, seed: int = 0, unique_samples: int | None = None,
                 cond_pool: Any = None, teacher_dtype: str | torch.dtype | None = None):
        super().__init__()
        if not hasattr(teacher, "model_sampling"):
            raise TypeError("the teacher must be a denoiser with a model_sampling (wrap it with "
                            "fewstep.core.models.Denoiser)")
        self.sample_shape = tuple(int(s) for s in sample_shape)
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = int(batch_size)
        self.lr, self.betas, self.weight_decay, self.grad_clip = float(lr), tuple(betas), float(weight_decay), \
            float(grad_clip)
        self.num_classes, self.cond_key, self.null = num_classes, cond_key, null
        self.cond_pool = None if cond_pool is None else check_cond_pool(cond_pool)
        self.seed = int(seed)
        self.unique_samples = unique_samples
        teacher.requires_grad_(False).eval()
        self.student_kind = student if isinstance(student, str) else "module" if student is not None else "custom"
        if student == "copy":
            stud = copy_student(teacher)
        elif student == "lora":
            stud, teacher = lora_student(teacher, lora_rank, lora_alpha, lora_targets, seed=seed)
        elif isinstance(student, nn.Module):
            stud = student
            check_same_output_shape(teacher, stud, self.sample_shape, self._probe_cond())
        elif student is None:  # the subclass builds its student
            stud = None
        else:
            raise ValueError(f"student must be 'copy', 'lora' or a denoiser module, got {student!r}")
        if teacher_dtype is not None:
            if not (isinstance(student, nn.Module) or student == "copy"):
                raise ValueError(f"teacher_dtype={teacher_dtype!r} needs a student with its own weights "
                                 "(student='copy' or a module); a LoRA student or a guidance adapter shares the "
                                 "teacher's network")
            from ..core.models.denoiser import cast_denoiser

            cast_denoiser(teacher, teacher_dtype)
        self.teacher = teacher
        self.student = stud
        self.batches_seen = 0
        self.student_updates = 0

    # ------------------------------------------------------------------------------------------ helpers
    @property
    def model_sampling(self):
        return self.teacher.model_sampling

    def _probe_cond(self) -> dict[str, Any]:
        if self.cond_pool is not None:
            return cond_kwargs(cond_index(self.cond_pool, [0]), self.cond_key)
        if self.num_classes is None:
            return {}
        return {self.cond_key: torch.zeros(1, dtype=torch.long)}

    def _check_cfg(self, scale_range: tuple[float, float]) -> None:
        if scale_range != (1.0, 1.0):
            check_null_condition(self.teacher, self.null, self.sample_shape, self.cond_key)

    @override
    def train(self, mode: bool = True) -> DistillationModule:
        """Keep every network in eval mode (no label dropout: all randomness is per sample).

        Args:
            mode: the train flag (recorded; the networks stay in eval mode).
        """
        super().train(mode)
        for m in self.children():
            m.eval()
        return self

    def world(self) -> tuple[int, int]:
        """``(world_size, global_rank)`` (``(1, 0)`` outside a trainer)."""
        if self._trainer is None:
            return 1, 0
        return self.trainer.world_size, self.trainer.global_rank

    def sample_ids(self) -> Tensor:
        """Global indices of this process's samples in the current batch."""
        world, rank = self.world()
        if self.batch_size % world:
            raise ValueError(f"batch_size {self.batch_size} (global) is not divisible by the {world} processes")
        local = self.batch_size // world
        start = self.batches_seen * self.batch_size + rank * local
        ids = torch.arange(start, start + local)
        return ids % self.unique_samples if self.unique_samples else ids

    def randn(self, ids: Tensor, stream: str, shape: Sequence[int] | None = None) -> Tensor:
        return randn_per_sample(ids, shape or self.sample_shape, stream, self.seed, self.device)

    def draw_labels(self, ids: Tensor) -> Cond:
        """The conditions of the samples ``ids``: rows of ``cond_pool`` (text embeddings) or class ids."""
        if self.cond_pool is not None:
            rows = randint_per_sample(ids, cond_len(self.cond_pool), "cond", self.seed)
            return cond_to(cond_index(self.cond_pool, rows), self.device)
        if self.num_classes is None:
            raise ValueError("this module needs num_classes, a cond_pool of embeddings, or data with conditions")
        return randint_per_sample(ids, int(self.num_classes), "cond", self.seed, self.device)

    def cond(self, c: Cond) -> dict[str, Tensor]:
        """Denoiser keywords of a condition batch (class ids under ``cond_key``, or the embeddings)."""
        return cond_kwargs(c, self.cond_key)

    def batch_mean(self, t: Tensor) -> Tensor:
        """Mean over processes (identity for one process)."""
        world, _ = self.world()
        return self.trainer.strategy.reduce(t, reduce_op="mean") if world > 1 else t

    def student_trainable(self) -> list[nn.Parameter]:
        return [p for p in self.student.parameters() if p.requires_grad]

    def ema_parameters(self) -> dict[str, nn.Parameter]:
        """The student's trainable parameters by name (what ``StudentEMA`` averages and swaps)."""
        if self.is_sharded():  # after a no-grad forward FSDP2's root unit holds gathered tensors: the shards back
            from .sharding import reshard

            reshard(self.student)
        return {n: p for n, p in self.student.named_parameters() if p.requires_grad}

    def counters(self) -> dict[str, int]:
        return {"batches_seen": self.batches_seen, "student_updates": self.student_updates}

    def load_counters(self, state: dict[str, int]) -> None:
        for k, v in state.items():
            setattr(self, k, int(v))

    # -------------------------------------------------------------------------------------- lightning
    @override
    def train_dataloader(self) -> DataLoader:
        """The endless ticker (``ticker_dataloader``): the module draws its own samples from their indices."""
        return ticker_dataloader()

    @override
    def on_fit_start(self) -> None:
        """Refuse an unbounded run: batches are endless, so ``max_steps``, ``max_time`` or ``max_generator_steps``."""
        # the networks are kept in eval mode on purpose (see ``train``)
        warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
        t = self.trainer
        if t.max_steps is None or t.max_steps < 0:
            from lightning.pytorch.callbacks import Timer  # Trainer(max_time=...) installs a Timer callback

            timed = any(isinstance(cb, Timer) and getattr(cb, "_duration", None) for cb in t.callbacks)
            if not timed and not getattr(self, "max_generator_steps", None):
                raise ValueError("distillation modules draw endless batches: set Trainer(max_steps=...) or max_time")

    @override
    def configure_optimizers(self):
        """AdamW over the student's trainable parameters (``lr``, ``betas``, ``weight_decay``)."""
        return torch.optim.AdamW(self.student_trainable(), lr=self.lr, betas=self.betas,
                                 weight_decay=self.weight_decay)

    def counted_update(self, loss: Tensor, logs: dict[str, Tensor], batch_size: int) -> Tensor:
        """The end of an automatic-optimization training step: count the batch and the student update, log
        ``logs`` under ``train/``, return ``loss`` for Lightning to step on."""
        self.batches_seen += 1
        self.student_updates += 1
        self.log_dict({f"train/{k}": v for k, v in logs.items()}, on_step=True, on_epoch=False, batch_size=batch_size)
        return loss

    @staticmethod
    def linear_warmup(optimizer: torch.optim.Optimizer, steps: int) -> dict[str, Any]:
        """Lightning scheduler config of a linear learning-rate warm-up over ``steps`` updates of ``optimizer``
        (``lr * min(1, (step + 1) / steps)``; DMD2's reference uses 500)."""
        n = int(steps)
        sched = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / n))
        return {"scheduler": sched, "interval": "step"}

    @override
    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """Clip by the module's ``grad_clip`` (global norm) unless the Trainer sets its own clipping.

        Args:
            optimizer: the optimizer about to step.
            gradient_clip_val: the Trainer's ``gradient_clip_val`` (``None``: the module's ``grad_clip``).
            gradient_clip_algorithm: the Trainer's algorithm (``"norm"`` or ``"value"``).
        """
        if gradient_clip_val is None and self.grad_clip > 0:
            gradient_clip_val, gradient_clip_algorithm = self.grad_clip, "norm"
        self.clip_gradients(optimizer, gradient_clip_val=gradient_clip_val,
                            gradient_clip_algorithm=gradient_clip_algorithm)

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Leave the frozen teacher out (``checkpoint_state``); save the counters and extra state under ``"fewstep"``.

        Args:
            checkpoint: the checkpoint about to be written (edited in place).
        """
        # a sharded checkpoint keeps the teacher's shards: Lightning's distributed load asks for every key
        drop_frozen(checkpoint.get("state_dict", {}), frozen_ptrs(self.teacher) if not self.is_sharded() else set())
        checkpoint["fewstep"] = {"method": self.method, "counters": self.counters(), **self.extra_state()}

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Restore the counters and the method's extra state from ``checkpoint["fewstep"]``.

        Args:
            checkpoint: the loaded checkpoint.
        """
        state = checkpoint.get("fewstep", {})
        self.load_counters(state.get("counters", {}))
        self.load_extra_state(state)

    def extra_state(self) -> dict[str, Any]:
        """Method-specific state saved with the counters (override)."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        pass

    @override
    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Accept checkpoints without the (frozen) teacher tensors: those keys are taken from the live module.

        Args:
            state_dict: the saved state (may lack the frozen teacher's tensors).
            strict, assign: as in ``nn.Module.load_state_dict``.
        """
        if self.is_sharded():  # sharded checkpoints hold every key (see on_save_checkpoint)
            return super().load_state_dict(state_dict, strict=strict, assign=assign)
        full = fill_frozen(state_dict, self.state_dict(), frozen_ptrs(self.teacher))
        return super().load_state_dict(full, strict=strict, assign=assign)

    # ---------------------------------------------------------------------------------- sharding (FSDP2)
    @override
    def configure_model(self) -> None:
        """Under ``FSDP2Strategy`` shard teacher, student and critic (``callbacks.sharding``); else nothing."""
        from .sharding import shard_module

        shard_module(self)

    def is_sharded(self) -> bool:
        from .sharding import is_sharded

        return is_sharded(self)

    @override
    def clip_gradients(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """Lightning's clipping, or for sharded parameters the global norm over shards (``sharding``).

        Args:
            optimizer: the optimizer whose parameters are clipped.
            gradient_clip_val: the threshold (``None`` or 0: no clipping).
            gradient_clip_algorithm: ``"norm"`` (``None`` means norm) or ``"value"``.
        """
        if gradient_clip_val and gradient_clip_algorithm in (None, "norm") and self.is_sharded():
            from .sharding import clip_grad_norm

            clip_grad_norm([p for g in optimizer.param_groups for p in g["params"]], float(gradient_clip_val))
            return
        super().clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)

    @override
    def on_after_backward(self) -> None:
        """Sharded + automatic optimization: average the gradients of replicated parameters (guidance adapters);
        FSDP averages the sharded ones."""
        if self.automatic_optimization and self._trainer is not None and self.is_sharded():
            from .sharding import sync_replicated_gradients

            sync_replicated_gradients(self.student_trainable())

    # ---------------------------------------------------------------------------------- manual DDP sync
    def disable_ddp_reducer(self) -> None:
        """For manual optimization with several backward passes per step: gradients are averaged explicitly
        (``sync_gradients``) instead of by DDP's reducer, which expects one backward per forward."""
        gradients.disable_ddp_reducer(self._trainer)

    def sync_gradients(self, params: Sequence[nn.Parameter]) -> None:
        """Average the gradients of ``params`` over processes (no-op for one process)."""
        world, _ = self.world()
        gradients.sync_gradients(params, world, sharded=world > 1 and self.is_sharded())

    # ------------------------------------------------------------------------------------- sampling
    def sampling_plan(self) -> dict[str, Any]:
        """How the student samples: ``{"denoiser", "sampler", "sigmas", "extra"}`` (override)."""
        raise NotImplementedError

    @torch.no_grad()
    def generate_samples(self, labels: Cond, seed: int = 0) -> Tensor:
        """Student samples for ``labels`` (class ids or embeddings) from seeded noise (the current weights; swap EMA
        in first if wanted)."""
        plan = self.sampling_plan()
        ms = plan["denoiser"].model_sampling
        sigmas = check_sigmas(torch.as_tensor(plan["sigmas"], dtype=torch.float32)).to(self.device)
        labels = cond_to(labels if is_embedding_cond(labels) else torch.as_tensor(labels), self.device)
        ids = torch.arange(cond_len(labels))
        z = randn_per_sample(ids, self.sample_shape, "eval/noise", seed, self.device)
        x = ms.noise_scaling(sigmas[0], z, torch.zeros_like(z), max_denoise=True)
        extra = {**self.cond(labels), **plan.get("extra", {})}
        # multi-step students that re-noise (DMD2, LCM, ...): their fresh noise is seeded too
        kw = {"noise_sampler": default_noise_sampler(x, seed=seed)} if plan["sampler"] in ANCESTRAL_SAMPLERS else {}
        return get_sampler(plan["sampler"])(plan["denoiser"], x, sigmas, extra_args=extra, disable=True, **kw)

    # --------------------------------------------------------------------------------------- export
    def student_network(self) -> nn.Module:
        """The student's network (for export)."""
        return getattr(self.student, "model", self.student)

    def export_metadata(self) -> dict[str, Any]:
        plan = self.sampling_plan()
        net = self.student_network()
        cfg = getattr(net, "config", None)
        extra = {k: (v.tolist() if isinstance(v, Tensor) else v) for k, v in plan.get("extra", {}).items()}
        return {
            "method": self.method, "teacher": getattr(self.teacher, "name", type(self.teacher).__name__),
            "architecture": f"{type(net).__module__}.{type(net).__name__}",
            "config": {k: v for k, v in dict(cfg).items() if not k.startswith("_")} if cfg is not None else None,
            "model_sampling": self.model_sampling.config(), "sampler": plan["sampler"],
            "sigmas": [float(s) for s in torch.as_tensor(plan["sigmas"]).tolist()], "sampler_extra": extra,
            "student": self.student_kind, "counters": self.counters(), "cond_key": self.cond_key,
            "null": self.null if not isinstance(self.null, Tensor) and not is_embedding_cond(self.null) else None,
            "conditioning": sorted(self.cond_pool) if is_embedding_cond(self.cond_pool) else None,
        }

    @torch.no_grad()
    def export(self, path: str | Path, lora_prefix: str | None = None, dare_p: float = 0.0, dare_seed: int = 1,
               write_delta: bool = False) -> list[Path]:
        """Write the student with its current weights (swap EMA in first). Returns the written files.

        ``<path>``: full network weights (LoRA merged) + ``<path>.json``; for LoRA students also
        ``<stem>_lora.safetensors`` (ComfyUI LoRA keys with ``lora_prefix``, default ``lora_key_prefix(network)``:
        the kohya form for a diffusers UNet, ComfyUI's generic form otherwise; DARE on rank components if
        ``dare_p > 0``); with ``write_delta`` a ComfyUI "diff" file of ``student - teacher`` (DARE on entries).
        """
        return write_student_files(self.student_network(), getattr(self.teacher, "model", self.teacher), path,
                                   self.export_metadata(), lora_prefix=lora_prefix, dare_p=dare_p,
                                   dare_seed=dare_seed, write_delta=write_delta, sharded=self.is_sharded(),
                                   rank=self.world()[1])
