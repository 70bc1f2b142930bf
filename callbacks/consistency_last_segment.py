"""The consistency students' last-segment stage as a LightningModule (issue 13).

A multistep consistency student made by ``ConsistencyDistillation`` on the digits teacher loses all of its gap to
the teacher in its last segment (``sigma_{S-1} -> 0``). This stage fine-tunes it there on pairs made once from its
own sampling chain (``core.consistency_pairs``): the teacher's DPM-Solver++(2M) solution from the student's input at
the last boundary is the target at the segment end 0 (Heek et al. 2024's multistep consistency loss with a
converged multi-step teacher target, pseudo-Huber), and a "keep" term holds the earlier segments at the initial
student's predictions (``core.losses.consistency.last_segment_loss``). ``fewstep train-student consistency`` runs it
after each segment stage; ``benchmarks/consistency_student.py`` is the same stage with its training curve.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from typing_extensions import override

from ..core.distill import randint_per_sample
from ..core.losses.consistency import last_segment_loss
from .base import DistillationModule


class ConsistencyLastSegment(DistillationModule):
    """Fine-tune a ``len(sigmas) - 1``-step consistency student on its last segment.

    Args (besides ``DistillationModule``'s; ``student`` is the consistency student to fine-tune):
        pairs: ``core.consistency_pairs.load_pairs`` of this student (``x``, ``pred``, ``target``, ``labels``).
        sigmas: the student's sampling sigmas (its ``S + 1`` boundaries, ending at 0).
        keep_weight: weight of the keep term on the earlier segments (0: last segment only).
        keep_batch: samples per earlier segment in the keep term (each batch).
        guidance_scale: the teacher CFG the pairs were made with (recorded in the exported metadata).
        stage: a description of the stage recorded in the metadata (pairs, teacher steps ...).

    Defaults follow the shipped recipe: Adam (0.9, 0.999) at lr 2e-5, no gradient clipping.
    """

    method = "consistency"

    def __init__(self, teacher: nn.Module, sample_shape: Sequence[int], student: nn.Module,
                 pairs: dict[str, Tensor], sigmas: Sequence[float] | Tensor, keep_weight: float = 1.0,
                 keep_batch: int = 8, guidance_scale: float | None = None, stage: dict[str, Any] | None = None,
                 lr: float = 2e-5, grad_clip: float = 0.0, **kwargs: Any):
        super().__init__(teacher, sample_shape, student=student, lr=lr, grad_clip=grad_clip, **kwargs)
        self.sigmas = torch.as_tensor(sigmas, dtype=torch.float32).reshape(-1)
        S = len(self.sigmas) - 1
        if S < 1 or float(self.sigmas[-1]) != 0.0:
            raise ValueError(f"sigmas must be the student's S + 1 >= 2 boundaries ending at 0, got {self.sigmas}")
        n = int(pairs["target"].shape[0])
        if pairs["x"].shape[:2] != (S, n) or pairs["pred"].shape[:2] != (S, n) or len(pairs["labels"]) != n:
            raise ValueError(f"pairs do not match a {S}-step student: x {tuple(pairs['x'].shape)}, pred "
                             f"{tuple(pairs['pred'].shape)}, {n} targets, {len(pairs['labels'])} labels")
        if not float(keep_weight) >= 0:
            raise ValueError(f"keep_weight must be >= 0, got {keep_weight}")
        if int(keep_batch) < 1:
            raise ValueError(f"keep_batch must be >= 1, got {keep_batch}")
        self.pairs = {k: v.detach() for k, v in pairs.items()}
        self.num_pairs = n
        self.keep_weight, self.keep_batch = float(keep_weight), int(keep_batch)
        self.guidance_scale = guidance_scale
        self.stage = dict(stage or {})
        self.student.requires_grad_(True)

    @override
    def on_fit_start(self) -> None:
        """The base checks, then the pairs on the module's device."""
        super().on_fit_start()
        self.pairs = {k: v.to(self.device) for k, v in self.pairs.items()}

    @override
    def configure_optimizers(self):
        """Adam (AdamW with the module's ``weight_decay``, 0 by default) over the student at ``lr``."""
        return torch.optim.AdamW(self.student_trainable(), lr=self.lr, betas=self.betas,
                                 weight_decay=self.weight_decay)

    def batch_indices(self) -> tuple[Tensor, Tensor]:
        """Pair indices of this step: the last-segment samples (this process's share of the global batch) and the
        keep samples (``keep_batch``, the same on every process), drawn from the batch's global indices."""
        ids = self.sample_ids()
        keep_ids = torch.arange(self.batches_seen * self.keep_batch, (self.batches_seen + 1) * self.keep_batch)
        return (randint_per_sample(ids, self.num_pairs, "pair", self.seed, self.device),
                randint_per_sample(keep_ids, self.num_pairs, "keep", self.seed, self.device))

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        """One update of ``last_segment_loss``; returns the loss.

        Args:
            batch, batch_idx: unused: the pairs are drawn from the batch's global indices.
        """
        idx, keep_idx = self.batch_indices()
        loss, logs = last_segment_loss(self.student, self.pairs, self.sigmas.to(self.device), idx, keep_idx,
                                       self.keep_weight, cond_key=self.cond_key)
        return self.counted_update(loss, {"loss": loss.detach(), **logs}, len(idx))

    def sampling_plan(self) -> dict[str, Any]:
        return {"denoiser": self.student, "sampler": "euler", "sigmas": self.sigmas, "extra": {}}

    def export_metadata(self) -> dict[str, Any]:
        meta = super().export_metadata()
        w = self.guidance_scale
        meta.update({"segments": len(self.sigmas) - 1, "guidance_range": [w, w] if w is not None else None,
                     "guidance_scale": w, "guidance_conditioned": False,
                     "last_segment_stage": {**self.stage, "keep_weight": self.keep_weight,
                                            "keep_batch": self.keep_batch, "batch_size": self.batch_size,
                                            "lr": self.lr, "pairs": self.num_pairs}})
        return meta
