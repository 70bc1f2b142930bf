"""Noise schedules: plain functions that return a decreasing sigma tensor ending in 0.

Names and formulas follow k-diffusion / ComfyUI so a schedule is interchangeable between them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from ..models.model_sampling import ModelSampling, flow_time_shift


def append_zero(x: Tensor) -> Tensor:
    return torch.cat([x, x.new_zeros([1])])


def karras(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> Tensor:
    """Karras et al. 2022, eq. 5: ``sigma_i = (s_max^(1/rho) + i/(n-1) (s_min^(1/rho) - s_max^(1/rho)))^rho``."""
    _check_steps(n)
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    min_inv, max_inv = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return append_zero((max_inv + ramp * (min_inv - max_inv)) ** rho).float()


def exponential(n: int, sigma_min: float, sigma_max: float) -> Tensor:
    """Uniform in log-sigma (k-diffusion ``get_sigmas_exponential``)."""
    _check_steps(n)
    return append_zero(torch.linspace(math.log(sigma_max), math.log(sigma_min), n, dtype=torch.float64).exp()).float()


def simple(model_sampling: ModelSampling, n: int) -> Tensor:
    """ComfyUI's "simple": every ``len(sigmas)/n``-th of the model's training sigmas, from the top."""
    _check_steps(n)
    sigmas = _training_sigmas(model_sampling)
    ss = len(sigmas) / n
    return append_zero(torch.stack([sigmas[-(1 + int(i * ss))] for i in range(n)]).float())


def uniform(model_sampling: ModelSampling, n: int, sgm: bool = False) -> Tensor:
    """Uniform in timestep ("normal" in ComfyUI); ``sgm=True`` is SGM's "sgm_uniform" (drops the last point)."""
    _check_steps(n)
    ms = model_sampling
    shift = getattr(ms, "shift", None)
    if shift is not None:  # flow models: uniform in training time, then the time shift (as ComfyUI)
        t_min = float(ms.sigmas[0]) if not sgm else 0.0
        ts = torch.linspace(1.0, t_min, n + 1)[:-1] if sgm else torch.linspace(1.0, t_min, n)
        return append_zero(flow_time_shift(ts, shift).float())
    start = float(ms.timestep(torch.tensor(ms.sigma_max)))
    end = float(ms.timestep(torch.tensor(ms.sigma_min)))
    if sgm:
        ts = torch.linspace(start, end, n + 1)[:-1]
    else:
        ts = torch.linspace(start, end, n)
    return append_zero(torch.stack([ms.sigma(t).reshape(()) for t in ts]).float())


def sgm_uniform(model_sampling: ModelSampling, n: int) -> Tensor:
    return uniform(model_sampling, n, sgm=True)


def flow_shift(n: int, shift: float = 3.0) -> Tensor:
    """Rectified-flow schedule: uniform ``t`` in (1, 0] through the SD3 time shift (Esser et al. 2024, eq. 23)."""
    _check_steps(n)
    return flow_time_shift(torch.linspace(1.0, 0.0, n + 1), shift).float()


def timestep_list(model_sampling: ModelSampling, timesteps: Sequence[float]) -> Tensor:
    """Sigmas at explicit model timesteps, e.g. DMD2's ``[999, 749, 499, 249]`` (Yin et al. 2024, sec. 4.3)."""
    ts = torch.as_tensor(list(timesteps), dtype=torch.float32)
    if ts.ndim != 1 or len(ts) == 0:
        raise ValueError("timestep list must be a non-empty list of numbers")
    if (ts[1:] >= ts[:-1]).any():
        raise ValueError(f"timesteps must be strictly decreasing, got {ts.tolist()}")
    return append_zero(torch.stack([model_sampling.sigma(t).reshape(()) for t in ts]).float())


def _training_sigmas(ms: ModelSampling) -> Tensor:
    sigmas = getattr(ms, "sigmas", None)
    if sigmas is None:  # continuous models: a dense grid in timestep
        ts = torch.linspace(float(ms.timestep(torch.tensor(ms.sigma_min))),
                            float(ms.timestep(torch.tensor(ms.sigma_max))), 1000)
        sigmas = torch.stack([ms.sigma(t).reshape(()) for t in ts])
    return sigmas


def _check_steps(n: int) -> None:
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"number of steps must be a positive integer, got {n!r}")


SCHEDULES = ("simple", "uniform", "normal", "sgm_uniform", "karras", "exponential", "flow_shift")


def get_sigmas(name: str, model_sampling: ModelSampling, steps: int, **kwargs) -> Tensor:
    """Sigmas for ``steps`` steps by schedule name (one of ``SCHEDULES``) for a model."""
    ms = model_sampling
    if name == "simple":
        return simple(ms, steps)
    if name in ("uniform", "normal"):
        return uniform(ms, steps)
    if name == "sgm_uniform":
        return sgm_uniform(ms, steps)
    if name == "karras":
        return karras(steps, ms.sigma_min, ms.sigma_max, rho=kwargs.get("rho", 7.0))
    if name == "exponential":
        return exponential(steps, ms.sigma_min, ms.sigma_max)
    if name == "flow_shift":
        return flow_shift(steps, kwargs.get("shift", getattr(ms, "shift", 3.0)))
    raise ValueError(f"unknown schedule {name!r}; choose one of {', '.join(SCHEDULES)}")


def check_sigmas(sigmas: Tensor) -> Tensor:
    """Validate a sigma schedule: 1-D, at least two entries, finite, non-negative, strictly decreasing."""
    if not isinstance(sigmas, Tensor):
        sigmas = torch.as_tensor(sigmas, dtype=torch.float32)
    if sigmas.ndim != 1 or sigmas.numel() < 2:
        raise ValueError(f"sigmas must be a 1-D tensor with at least 2 entries, got shape {tuple(sigmas.shape)}")
    if not torch.isfinite(sigmas).all():
        raise ValueError(f"sigmas contain NaN or inf: {sigmas.tolist()}")
    if (sigmas < 0).any():
        raise ValueError(f"sigmas must be non-negative, got {sigmas.tolist()}")
    if (sigmas[1:] >= sigmas[:-1]).any():
        raise ValueError(
            f"sigmas must be strictly decreasing (noisiest first), got {[round(float(s), 4) for s in sigmas]}; "
            "did you pass them in reverse order?"
        )
    return sigmas
