"""Model samplings, schedules (sigma arrays), samplers (KSAMPLER functions), the sampler registry and step-schedule
search.

Model samplings, schedules and samplers are written once over an array namespace (``xp.py``) and import no torch,
so the torch-free ONNX runtime (``core.export.np_sampling``) runs them on numpy. Names resolve lazily: importing
this package imports neither torch nor the samplers.
"""

from __future__ import annotations

from ..lazy import lazy_getattr

_LAZY = {
    **dict.fromkeys(
        ("SAMPLERS", "default_noise_sampler", "get_sampler", "sample_dmd", "sample_dpmpp_2m", "sample_euler",
         "sample_euler_ancestral", "sample_flow_map", "sample_heun", "sample_hybrid", "sample_lcm", "sample_onestep",
         "sample_tcd", "sample_unipc"), "samplers"),
    **dict.fromkeys(("NFE", "REGISTRY", "RUNTIME_SAMPLERS", "SamplerSpec"), "registry"),
    **dict.fromkeys(
        ("SCHEDULES", "check_sigmas", "exponential", "flow_shift", "get_sigmas", "karras", "sgm_uniform", "simple",
         "timestep_list", "uniform"), "schedules"),
    **dict.fromkeys(("fine_solution", "search_schedule"), "search"),
}

__all__ = sorted(_LAZY)
__getattr__ = lazy_getattr(__name__, _LAZY)
