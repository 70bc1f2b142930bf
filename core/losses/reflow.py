"""Reflow / rectified flow on teacher ODE pairs (InstaFlow) with optional U-shaped time sampling.

Rectified flow (Liu et al. 2023, "Flow Straight and Fast", eq. 1) regresses a velocity field onto the straight
path between coupled endpoints; reflow couples noise ``z`` with the teacher ODE's endpoint ``x0 = ODE(z)`` so the
learnt flow becomes straight and one Euler step lands near ``x0``. InstaFlow (Liu et al. 2024, "InstaFlow: One
Step is Enough for High-Quality Diffusion-Based Text-to-Image Generation", eq. 3-4) applies this to a
classifier-free-guided teacher (2-rectified flow) and then distils the straightened flow into one step (the same
loss at the top noise level only).

The straight path runs from ``x0`` (sigma 0) to the teacher's starting state ``x_T`` (sigma ``sigma_T``) and is a
line in fewstep's sampler space for every parameterisation: ``x(sigma) = x0 + (sigma / sigma_T) (x_T - x0)``
(VP: ``x0 + sigma z``; flow: ``(1 - sigma) x0 + sigma z``). In flow coordinates with flow time ``t`` its velocity
is ``z - x0`` and a denoiser's implied velocity error is ``(x0_hat - x0) / t``, so the velocity loss is
``||x0_hat - x0||^2 / t^2``.

U-shaped time sampling (Lee et al. 2024, "Improving the Training of Rectified Flows", sec. 3.2): the loss is
hardest near ``t = 0`` and ``t = 1``, so ``t`` is drawn with density ``∝ exp(a t) + exp(a (1 - t))``
(``∝ cosh(a (t - 1/2))``, ``a = 4``; their implementation mirrors a sample of ``exp(a t)``), sampled here by its
closed-form inverse CDF.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .common import per_sample_mean, weighted_mean


def u_shaped_time(u: Tensor, a: float = 4.0) -> Tensor:
    """Map uniforms ``u`` in ``[0, 1]`` to ``t`` with density ``p(t) ∝ cosh(a (t - 1/2))`` on ``[0, 1]``.

    CDF ``F(t) = (sinh(a (t - 1/2)) + sinh(a/2)) / (2 sinh(a/2))`` -> ``t = 1/2 + asinh((2u - 1) sinh(a/2)) / a``.
    ``a -> 0`` gives the uniform distribution.
    """
    u = torch.as_tensor(u, dtype=torch.float32)
    if a <= 1e-6:
        return u.clone()
    return 0.5 + torch.asinh((2 * u - 1) * math.sinh(a / 2)) / a


def u_shaped_density(t: Tensor, a: float = 4.0) -> Tensor:
    """The density of ``u_shaped_time``: ``a cosh(a (t - 1/2)) / (2 sinh(a/2))`` on ``[0, 1]``."""
    t = torch.as_tensor(t, dtype=torch.float64)
    if a <= 1e-6:
        return torch.ones_like(t)
    return a * torch.cosh(a * (t - 0.5)) / (2 * math.sinh(a / 2))


def straight_path(x0: Tensor, x_start: Tensor, sigma: Tensor, sigma_start: Tensor | float) -> Tensor:
    """The point at ``sigma`` on the straight line from ``x0`` (sigma 0) to ``x_start`` (sigma ``sigma_start``)."""
    lam = (torch.as_tensor(sigma, dtype=x0.dtype, device=x0.device)
           / torch.as_tensor(sigma_start, dtype=x0.dtype, device=x0.device))
    lam = lam.reshape((-1,) + (1,) * (x0.ndim - 1)) if lam.ndim else lam
    return x0 + lam * (x_start - x0)


def reflow_loss(x0_pred: Tensor, x0_target: Tensor, t: Tensor, weights: Tensor | None = None,
                t_min: float = 1e-3) -> Tensor:
    """Velocity loss on the straight path in flow time ``t``: ``mean ||x0_pred - x0_target||^2 / t^2``
    (InstaFlow eq. 3 written for a denoiser; ``t`` is clamped below by ``t_min``)."""
    t = torch.as_tensor(t, dtype=torch.float32, device=x0_pred.device).reshape(-1).clamp(min=t_min)
    per = per_sample_mean((x0_pred.float() - x0_target.float()) ** 2) / t**2
    return weighted_mean(per, weights)
