"""Noise schedules: plain functions that return a decreasing sigma array ending in 0.

Names and formulas follow k-diffusion / ComfyUI so a schedule is interchangeable between them. Each is written once
over an array namespace (``core.sampling.xp``): torch tensors by default, numpy arrays with ``xp="numpy"`` or a
numpy model sampling (the torch-free ONNX runtime, ``core.export.np_sampling``). Results are float32.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

from .model_sampling import ModelSampling, flow_time_shift
from .xp import Array, array_namespace, namespace


def _ns_of(model_sampling: Any) -> Any:
    """The namespace of a model sampling: its own for fewstep's, torch for ComfyUI's."""
    return namespace(getattr(model_sampling, "xp_name", "torch"))


def append_zero(x: Array) -> Array:
    ns = array_namespace(x)
    return ns.concatenate([x, ns.zeros_like(x[:1])])


def karras(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0, xp: str = "torch") -> Array:
    """Karras et al. 2022, eq. 5: ``sigma_i = (s_max^(1/rho) + i/(n-1) (s_min^(1/rho) - s_max^(1/rho)))^rho``."""
    _check_steps(n)
    ns = namespace(xp)
    ramp = ns.linspace(0, 1, n, dtype=ns.float64)
    min_inv, max_inv = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return ns.astype(append_zero((max_inv + ramp * (min_inv - max_inv)) ** rho), ns.float32)


def exponential(n: int, sigma_min: float, sigma_max: float, xp: str = "torch") -> Array:
    """Uniform in log-sigma (k-diffusion ``get_sigmas_exponential``)."""
    _check_steps(n)
    ns = namespace(xp)
    log_sigmas = ns.linspace(math.log(sigma_max), math.log(sigma_min), n, dtype=ns.float64)
    return ns.astype(append_zero(ns.exp(log_sigmas)), ns.float32)


def simple(model_sampling: ModelSampling, n: int) -> Array:
    """ComfyUI's "simple": every ``len(sigmas)/n``-th of the model's training sigmas, from the top."""
    _check_steps(n)
    ns = _ns_of(model_sampling)
    sigmas = _training_sigmas(model_sampling)
    ss = len(sigmas) / n
    return append_zero(ns.astype(ns.stack([sigmas[-(1 + int(i * ss))] for i in range(n)]), ns.float32))


def uniform(model_sampling: ModelSampling, n: int, sgm: bool = False) -> Array:
    """Uniform in timestep ("normal" in ComfyUI); ``sgm=True`` is SGM's "sgm_uniform" (drops the last point)."""
    _check_steps(n)
    ms, ns = model_sampling, _ns_of(model_sampling)
    shift = getattr(ms, "shift", None)
    if shift is not None:  # flow models: uniform in training time, then the time shift (as ComfyUI)
        t_min = float(ms.sigmas[0]) if not sgm else 0.0
        ts = ns.linspace(1.0, t_min, n + 1, dtype=ns.float32)[:-1] if sgm else ns.linspace(1.0, t_min, n,
                                                                                            dtype=ns.float32)
        return append_zero(ns.astype(flow_time_shift(ts, shift), ns.float32))
    start = float(ms.timestep(ns.asarray(ms.sigma_max, dtype=ns.float32)))
    end = float(ms.timestep(ns.asarray(ms.sigma_min, dtype=ns.float32)))
    if sgm:
        ts = ns.linspace(start, end, n + 1, dtype=ns.float32)[:-1]
    else:
        ts = ns.linspace(start, end, n, dtype=ns.float32)
    return append_zero(ns.astype(ns.stack([ms.sigma(t).reshape(()) for t in ts]), ns.float32))


def sgm_uniform(model_sampling: ModelSampling, n: int) -> Array:
    return uniform(model_sampling, n, sgm=True)


def flow_shift(n: int, shift: float = 3.0, xp: str = "torch") -> Array:
    """Rectified-flow schedule: uniform ``t`` in (1, 0] through the SD3 time shift (Esser et al. 2024, eq. 23)."""
    _check_steps(n)
    ns = namespace(xp)
    return ns.astype(flow_time_shift(ns.linspace(1.0, 0.0, n + 1, dtype=ns.float32), shift), ns.float32)


def timestep_list(model_sampling: ModelSampling, timesteps: Sequence[float]) -> Array:
    """Sigmas at explicit model timesteps, e.g. DMD2's ``[999, 749, 499, 249]`` (Yin et al. 2024, sec. 4.3)."""
    ns = _ns_of(model_sampling)
    ts = ns.asarray(list(timesteps), dtype=ns.float32)
    if ts.ndim != 1 or len(ts) == 0:
        raise ValueError("timestep list must be a non-empty list of numbers")
    if (ts[1:] >= ts[:-1]).any():
        raise ValueError(f"timesteps must be strictly decreasing, got {ts.tolist()}")
    return append_zero(ns.astype(ns.stack([model_sampling.sigma(t).reshape(()) for t in ts]), ns.float32))


def _training_sigmas(ms: ModelSampling) -> Array:
    sigmas = getattr(ms, "sigmas", None)
    if sigmas is None:  # continuous models: a dense grid in timestep
        ns = _ns_of(ms)
        ts = ns.linspace(float(ms.timestep(ns.asarray(ms.sigma_min, dtype=ns.float32))),
                         float(ms.timestep(ns.asarray(ms.sigma_max, dtype=ns.float32))), 1000, dtype=ns.float32)
        sigmas = ns.stack([ms.sigma(t).reshape(()) for t in ts])
    return sigmas


def _check_steps(n: int) -> None:
    if not isinstance(n, numbers.Integral) or n < 1:
        raise ValueError(f"number of steps must be a positive integer, got {n!r}")


SCHEDULES = ("simple", "uniform", "normal", "sgm_uniform", "karras", "exponential", "flow_shift")


def get_sigmas(name: str, model_sampling: ModelSampling, steps: int, **kwargs: Any) -> Array:
    """Sigmas for ``steps`` steps by schedule name (one of ``SCHEDULES``) for a model, in its array namespace."""
    ms, xp = model_sampling, _ns_of(model_sampling).name
    if name == "simple":
        return simple(ms, steps)
    if name in ("uniform", "normal"):
        return uniform(ms, steps)
    if name == "sgm_uniform":
        return sgm_uniform(ms, steps)
    if name == "karras":
        return karras(steps, ms.sigma_min, ms.sigma_max, rho=kwargs.get("rho", 7.0), xp=xp)
    if name == "exponential":
        return exponential(steps, ms.sigma_min, ms.sigma_max, xp=xp)
    if name == "flow_shift":
        return flow_shift(steps, kwargs.get("shift", getattr(ms, "shift", 3.0)), xp=xp)
    raise ValueError(f"unknown schedule {name!r}; choose one of {', '.join(SCHEDULES)}")


def check_sigmas(sigmas: Any, xp: str = "torch") -> Array:
    """Validate a sigma schedule: 1-D, at least two entries, finite, non-negative, strictly decreasing.

    An array keeps its namespace and dtype; anything else becomes a float32 array of namespace ``xp``."""
    if hasattr(sigmas, "ndim") and not isinstance(sigmas, (int, float)):
        ns = array_namespace(sigmas)
    else:
        ns = namespace(xp)
        sigmas = ns.asarray(sigmas, dtype=ns.float32)
    if sigmas.ndim != 1 or sigmas.shape[0] < 2:
        raise ValueError(f"sigmas must be a 1-D tensor with at least 2 entries, got shape {tuple(sigmas.shape)}")
    if not ns.isfinite(sigmas).all():
        raise ValueError(f"sigmas contain NaN or inf: {sigmas.tolist()}")
    if (sigmas < 0).any():
        raise ValueError(f"sigmas must be non-negative, got {sigmas.tolist()}")
    if (sigmas[1:] >= sigmas[:-1]).any():
        raise ValueError(
            f"sigmas must be strictly decreasing (noisiest first), got {[round(float(s), 4) for s in sigmas]}; "
            "did you pass them in reverse order?"
        )
    return sigmas


def starts_new_run(previous_sigma: float | None, sigma: float, rel_tol: float = 1e-6) -> bool:
    """True when a denoiser call at ``sigma`` begins a new sampling run after a call at ``previous_sigma``: the
    first call, or sigma *rising* (beyond float round-off: every sampler's sigmas fall within a run). The one rule
    the caches' per-run state (core and the torch-free ONNX runtime) and the trajectory recorders share."""
    return previous_sigma is None or sigma > previous_sigma * (1 + rel_tol) + 1e-12
