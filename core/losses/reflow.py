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
closed-form inverse CDF. For a one-step student only the top of the path is queried: ``top_time`` draws ``t`` with
density ``∝ exp(a t)`` (one half of Lee et al.'s mirrored sampler), concentrated near ``t = 1``.

Pseudo-Huber loss (Lee et al. 2024, sec. 3.3, following iCT, Song & Dhariwal 2023): the squared velocity error is
replaced by ``sqrt(||v_hat - v||^2 + c^2) - c`` (``c = 0.00054 sqrt(d)``), which behaves like ``||v_hat - v||`` for
large errors, so outlying pairs pull less and a one-step regression is less drawn to the conditional mean
(``reflow_huber_loss``; their LPIPS term is not used: no feature network enters a loss here).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .common import per_sample_mean, weighted_mean
from .consistency import pseudo_huber


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


def top_time(u: Tensor, a: float = 4.0) -> Tensor:
    """Map uniforms ``u`` in ``[0, 1]`` to ``t`` with density ``p(t) = a exp(a t) / (exp(a) - 1)`` on ``[0, 1]``.

    CDF ``F(t) = (exp(a t) - 1) / (exp(a) - 1)`` -> ``t = log(1 + u (exp(a) - 1)) / a``; ``a -> 0`` gives the uniform
    distribution, larger ``a`` concentrates ``t`` near 1 (the one-step query).
    """
    u = torch.as_tensor(u, dtype=torch.float32)
    if a <= 1e-6:
        return u.clone()
    return torch.log1p(u * math.expm1(a)) / a


def top_density(t: Tensor, a: float = 4.0) -> Tensor:
    """The density of ``top_time``: ``a exp(a t) / (exp(a) - 1)`` on ``[0, 1]``."""
    t = torch.as_tensor(t, dtype=torch.float64)
    if a <= 1e-6:
        return torch.ones_like(t)
    return a * torch.exp(a * t) / math.expm1(a)


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


def reflow_huber_loss(x0_pred: Tensor, x0_target: Tensor, t: Tensor, c: float | None = None,
                      weights: Tensor | None = None, t_min: float = 1e-3) -> Tensor:
    """Pseudo-Huber velocity loss on the straight path (Lee et al. 2024, sec. 3.3):
    ``mean sqrt(||x0_pred - x0_target||^2 / t^2 + c^2) - c``, the norm over all data dimensions ``d`` of a sample
    (the velocity error is ``(x0_pred - x0_target) / t``), ``c`` defaulting to ``0.00054 sqrt(d)``; ``t`` is clamped
    below by ``t_min``."""
    t = torch.as_tensor(t, dtype=torch.float32, device=x0_pred.device).reshape(-1).clamp(min=t_min)
    scale = t.reshape((-1,) + (1,) * (x0_pred.ndim - 1))
    per = pseudo_huber(x0_pred.float() / scale, x0_target.float() / scale, c)
    return weighted_mean(per, weights)
