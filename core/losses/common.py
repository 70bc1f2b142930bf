"""Noise-level helpers shared by the distillation losses, written once for every ``ModelSampling``.

In fewstep's sampler space a noisy sample is ``x = a(sigma) x0 + s(sigma) n`` with ``(a, s) = (1, sigma)`` for
VP/EDM models (k-diffusion's variance-exploding form) and ``(1 - sigma, sigma)`` for flow models.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..sampling.model_sampling import alpha_sigma, broadcast_sigma, flow_time_shift
from ..sampling.model_sampling import is_flow as is_flow_sampling  # the losses' historical name


def signal_noise(model_sampling, sigma: Tensor) -> tuple[Tensor, Tensor]:
    """``(a, s)`` with ``x = a x0 + s n`` at ``sigma`` (same shape as ``sigma``): ``alpha_sigma`` on a tensor."""
    return alpha_sigma(model_sampling, torch.as_tensor(sigma))


def sigma_at_fraction(model_sampling, u: Tensor) -> Tensor:
    """Sigma at fraction ``u`` in ``[0, 1]`` of the model's noise range, ``0`` = least noise, ``1`` = most.

    Discrete models: training timestep ``u * (T - 1)`` (DMD2 samples ``t ~ U[0.02 T, 0.98 T]`` this way);
    flow models: ``shift(u)`` (SD3's time shift); continuous EDM-like models: log-linear between
    ``sigma_min`` and ``sigma_max``.
    """
    u = torch.as_tensor(u, dtype=torch.float32)
    ms = model_sampling
    if is_flow_sampling(ms):
        return flow_time_shift(u.clamp(0, 1), getattr(ms, "shift", 1.0)).clamp(min=float(ms.sigma_min))
    n = getattr(ms, "num_timesteps", None)
    if n is not None and hasattr(ms, "sigma"):
        return ms.sigma(u.clamp(0, 1) * (n - 1)).to(u.device)
    lo, hi = math.log(ms.sigma_min), math.log(ms.sigma_max)
    return torch.exp(lo + (hi - lo) * u.clamp(0, 1))


def fraction_at_sigma(model_sampling, sigma: float, iters: int = 40) -> float:
    """Inverse of ``sigma_at_fraction``: the fraction ``u`` in ``[0, 1]`` whose sigma is ``sigma`` (bisection on the
    monotone map, so it holds for every model-sampling kind ``sigma_at_fraction`` covers)."""
    lo, hi = 0.0, 1.0
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        if float(sigma_at_fraction(model_sampling, torch.tensor(mid))) < sigma:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def flow_time(model_sampling, sigma: Tensor) -> Tensor:
    """Rectified-flow time of ``sigma``: ``t = sigma`` for flow models, ``sigma / (1 + sigma)`` for VP/EDM models
    (``x / (1 + sigma) = (1 - t) x0 + t n``, the same path in flow coordinates)."""
    sigma = torch.as_tensor(sigma, dtype=torch.float32)
    if is_flow_sampling(model_sampling):
        return sigma
    return sigma / (1.0 + sigma)


def sigma_from_flow_time(model_sampling, t: Tensor) -> Tensor:
    """Inverse of ``flow_time``."""
    t = torch.as_tensor(t, dtype=torch.float32)
    if is_flow_sampling(model_sampling):
        return t
    return t / (1.0 - t).clamp(min=1e-12)


def ddim_transfer(model_sampling, x: Tensor, x0: Tensor, sigma: Tensor, sigma_to: Tensor) -> Tensor:
    """Deterministic DDIM move of ``x`` at ``sigma`` to ``sigma_to`` given the prediction ``x0`` (Song et al. 2021,
    "Denoising Diffusion Implicit Models", eq. 12 with eta = 0): keep the implied noise
    ``n = (x - a x0) / s`` and return ``a' x0 + s' n``. Exact on the straight path; ``sigma_to = 0`` gives ``x0``
    and ``sigma_to = sigma`` gives ``x``. Per-sample ``(B,)`` sigmas broadcast over ``x``."""
    a, s = signal_noise(model_sampling, torch.as_tensor(sigma, dtype=x.dtype, device=x.device))
    a2, s2 = signal_noise(model_sampling, torch.as_tensor(sigma_to, dtype=x.dtype, device=x.device))
    a, s, a2, s2 = (broadcast_sigma(v, x) for v in (a, s, a2, s2))
    ratio = s2 / s.clamp(min=1e-20)
    return a2 * x0 + ratio * (x - a * x0)


def per_sample_mean(x: Tensor) -> Tensor:
    """Mean over all but the batch dimension, ``(B, ...) -> (B,)``."""
    return x.reshape(x.shape[0], -1).mean(1)


def weighted_mean(per_sample: Tensor, weights: Tensor | None = None) -> Tensor:
    """Batch mean of per-sample losses, optionally weighted (weights are not renormalised)."""
    if weights is None:
        return per_sample.mean()
    return (per_sample * weights.to(per_sample.dtype).reshape(-1)).mean()
