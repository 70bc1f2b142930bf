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

import torch
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


#: per-sample weightings of the guidance-distillation loss over the scale ``w`` (``guidance_scale_weights``)
SCALE_WEIGHTINGS = ("none", "inverse_square")


def guidance_scale_weights(scale: Tensor, kind: str = "inverse_square", floor: float = 0.1) -> Tensor:
    """Per-sample loss weights over the guidance scale: ``"none"`` -> 1, ``"inverse_square"`` ->
    ``1 / max(w - 1, floor)^2``.

    The CFG target departs from the conditional output by ``(w - 1)(cond - uncond)``, so with plain MSE a batch
    with ``w`` in ``[1, 4]`` is dominated by its large scales (a residual of the same relative size costs
    ``(w - 1)^2`` times more) and the small scales used at inference (``w = 1.25``) are barely trained (issue 13).
    Dividing by ``(w - 1)^2`` makes the loss a *relative* error of the guidance direction, equal across scales;
    ``floor`` bounds the weight near ``w = 1`` (at most ``1 / floor^2``).
    """
    if kind not in SCALE_WEIGHTINGS:
        raise ValueError(f"scale weighting must be one of {SCALE_WEIGHTINGS}, got {kind!r}")
    if not floor > 0:
        raise ValueError(f"the scale-weight floor must be > 0, got {floor}")
    w = torch.as_tensor(scale, dtype=torch.float32).reshape(-1)
    if kind == "none":
        return torch.ones_like(w)
    return 1.0 / (w - 1.0).clamp_min(float(floor)) ** 2


#: per-sample loss weightings over the size of the guidance direction (``guidance_delta_weights``)
DELTA_WEIGHTINGS = ("none", "inverse_delta")


def guidance_delta_weights(cond: Tensor, uncond: Tensor, kind: str = "inverse_delta", floor: float = 1e-4) -> Tensor:
    """Per-sample loss weights over the size of the guidance direction: ``"none"`` -> 1, ``"inverse_delta"`` ->
    ``1 / max(mean((cond - uncond)^2), floor)``.

    The guidance term of the CFG target is ``(w - 1)(cond - uncond)`` (Ho & Salimans 2022, eq. 6). Its size varies by
    orders of magnitude with the noise level, so under plain MSE (Meng et al. 2023 eq. 6) the steps where it is small
    barely count, and a distilled adapter applies too little guidance there (issue 13: effective scale 1.19 for
    ``w = 1.25`` at the low-sigma steps of the shipped adapter). Dividing each sample's squared error by
    ``mean((cond - uncond)^2)`` (and, with ``guidance_scale_weights``' ``"inverse_square"``, by ``(w - 1)^2``) makes
    the loss the squared *relative* error of the guidance term, ``||pred - target||^2 / ||(w - 1)(cond - uncond)||^2``,
    equal across noise levels. ``floor`` (in squared native units) bounds the weight where the two passes agree.
    ``cond`` and ``uncond`` are taken without gradient.
    """
    if kind not in DELTA_WEIGHTINGS:
        raise ValueError(f"delta weighting must be one of {DELTA_WEIGHTINGS}, got {kind!r}")
    if not floor > 0:
        raise ValueError(f"the delta-weight floor must be > 0, got {floor}")
    if kind == "none":
        return torch.ones(cond.shape[0], dtype=torch.float32, device=cond.device)
    d2 = per_sample_mean((cond.detach().float() - uncond.detach().float()) ** 2)
    return 1.0 / d2.clamp_min(float(floor))
