"""The torch-free ONNX runtime's model samplings, schedules and samplers: the core's own, bound to numpy.

``core.sampling`` writes model samplings, schedules and samplers once over an array namespace; this module binds
them to numpy (it imports numpy and no torch). So an ONNX graph of the raw network sampled here runs the very update
rules the torch denoiser runs in the core, in float32 as there (``tests/test_export_runtime`` checks every runtime
sampler of ``core.sampling.registry`` and every schedule against the torch ones on the Gaussian-mixture ground
truth).

A *model* here is any callable ``model(x, sigma, **cond) -> x0`` on numpy arrays with a ``model_sampling``
attribute (``runtime.OnnxDenoiser``), i.e. the k-diffusion / EDM denoiser convention (Karras et al. 2022, eq. 7).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ..sampling import model_sampling as _ms
from ..sampling import schedules as _sched
from ..sampling.registry import ANCESTRAL_SAMPLERS, RUNTIME_SAMPLERS
from ..sampling.samplers import SAMPLERS as _ALL
from ..sampling.samplers import (
    sample_dmd,
    sample_dpmpp_2m,
    sample_euler,
    sample_flow_map,
    sample_lcm,
    sample_onestep,
)
from ..sampling.xp import namespace

F32 = np.float32

# ------------------------------------------------------------------------------------------ model samplings
DiscreteVP = functools.partial(_ms.DiscreteVP, xp="numpy")
FlowMatching = functools.partial(_ms.FlowMatching, xp="numpy")
EDM = functools.partial(_ms.EDM, xp="numpy")
model_sampling_from_config = functools.partial(_ms.model_sampling_from_config, xp="numpy")
flow_time_shift = functools.partial(_ms.flow_time_shift, xp="numpy")

# ----------------------------------------------------------------------------------------------- schedules
karras = functools.partial(_sched.karras, xp="numpy")
exponential = functools.partial(_sched.exponential, xp="numpy")
flow_shift = functools.partial(_sched.flow_shift, xp="numpy")
simple, uniform, sgm_uniform, get_sigmas = _sched.simple, _sched.uniform, _sched.sgm_uniform, _sched.get_sigmas


def timestep_list(ms: _ms.ModelSampling, timesteps: Sequence[float]) -> np.ndarray:
    """Sigmas at explicit model timesteps, e.g. DMD2's ``[999, 749, 499, 249]`` (Yin et al. 2024, sec. 4.3)."""
    return _sched.timestep_list(ms, timesteps)


def check_sigmas(sigmas: Any) -> np.ndarray:
    """Validate a sigma schedule as ``core.sampling.check_sigmas``; the result is a float32 numpy array."""
    return _sched.check_sigmas(np.asarray(sigmas, dtype=F32))


# ------------------------------------------------------------------------------------------------ samplers
def default_noise_sampler(x: np.ndarray, seed: int | None = None) -> Callable[[Any, Any], np.ndarray]:
    """Fresh standard normal noise per call from numpy's PCG64 (not torch's stream: pass a ``noise_sampler`` to
    reproduce a torch run)."""
    return namespace("numpy").noise_sampler(x, seed)


#: the samplers this runtime offers (``runtime=True`` in ``core.sampling.registry``)
SAMPLERS: dict[str, Callable[..., np.ndarray]] = {name: _ALL[name] for name in RUNTIME_SAMPLERS}
#: runtime samplers that add fresh noise each step (``generate`` passes them a seeded ``noise_sampler``)
STOCHASTIC = tuple(n for n in RUNTIME_SAMPLERS if n in ANCESTRAL_SAMPLERS)

__all__ = ["EDM", "SAMPLERS", "STOCHASTIC", "DiscreteVP", "FlowMatching", "check_sigmas", "default_noise_sampler",
           "exponential", "flow_shift", "flow_time_shift", "get_sampler", "get_sigmas", "karras",
           "model_sampling_from_config", "sample_dmd", "sample_dpmpp_2m", "sample_euler", "sample_flow_map",
           "sample_lcm", "sample_onestep", "sgm_uniform", "simple", "timestep_list", "uniform"]


def get_sampler(name: str) -> Callable[..., np.ndarray]:
    """A runtime sampler by name (one of ``SAMPLERS``)."""
    try:
        return SAMPLERS[name]
    except KeyError:
        raise ValueError(f"the ONNX runtime has no sampler {name!r}; choose one of {', '.join(SAMPLERS)}") from None
