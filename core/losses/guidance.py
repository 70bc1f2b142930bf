"""Guidance distillation: regress a one-pass model onto the teacher's classifier-free-guided output.

Guidance distillation (Meng et al. 2023, "On Distillation of Guided Diffusion Models", eq. 6, first stage): a
model that takes the guidance scale ``w`` as input is trained so that ``f(x_t, t, c, w)`` matches
``uncond + w (cond - uncond)`` (fewstep's convention, ``core.guidance.cfg``). Adapter Guidance Distillation (AGD;
Jensen et al. 2025, "Efficient Distillation of Classifier-Free Guidance using Adapters", sec. 3.2) keeps the base
model frozen, trains only small scale-conditioned adapters (``core.guidance.adapters``) and takes the states
``x_t`` from CFG-guided sampling trajectories rather than from forward-noised data, so training sees the states
the adapter will meet at inference.
"""

from __future__ import annotations

from torch import Tensor

from ..guidance.cfg import cfg_combine
from .common import per_sample_mean, weighted_mean


def guidance_target(cond: Tensor, uncond: Tensor, scale: Tensor | float) -> Tensor:
    """The CFG output ``uncond + w (cond - uncond)`` with a scalar or per-sample ``w`` (no gradient needed)."""
    return cfg_combine(cond.detach(), uncond.detach(), scale)


def guidance_distillation_loss(pred: Tensor, cond: Tensor, uncond: Tensor, scale: Tensor | float,
                               weights: Tensor | None = None) -> Tensor:
    """``mean ||pred - (uncond + w (cond - uncond))||^2`` (Meng et al. 2023 eq. 6; AGD sec. 3.2).

    ``pred``, ``cond`` and ``uncond`` must be in the same parameterisation (AGD regresses the network's native
    eps/v output; CFG is linear, so combining native outputs equals combining x0 predictions at one sigma).
    """
    target = guidance_target(cond, uncond, scale)
    return weighted_mean(per_sample_mean((pred.float() - target.float()) ** 2), weights)
