"""Schedules (sigma tensors), samplers (KSAMPLER functions) and step-schedule search."""

from .samplers import (
    NFE,
    SAMPLERS,
    default_noise_sampler,
    get_sampler,
    sample_dmd,
    sample_dpmpp_2m,
    sample_euler,
    sample_euler_ancestral,
    sample_flow_map,
    sample_heun,
    sample_hybrid,
    sample_lcm,
    sample_onestep,
    sample_tcd,
    sample_unipc,
)
from .schedules import (
    SCHEDULES,
    check_sigmas,
    exponential,
    flow_shift,
    get_sigmas,
    karras,
    sgm_uniform,
    simple,
    timestep_list,
    uniform,
)
from .search import fine_solution, search_schedule

__all__ = [
    "NFE", "SAMPLERS", "SCHEDULES", "check_sigmas", "default_noise_sampler", "exponential", "fine_solution",
    "flow_shift", "get_sampler", "get_sigmas", "karras", "sample_dmd", "sample_dpmpp_2m", "sample_euler",
    "sample_euler_ancestral", "sample_flow_map", "sample_heun", "sample_hybrid", "sample_lcm", "sample_onestep",
    "sample_tcd", "sample_unipc", "search_schedule", "sgm_uniform", "simple", "timestep_list", "uniform",
]
