"""Guidance: the CFG convention (``uncond + w (cond - uncond)``), conversions, guidance adapters."""

from .adapters import AdaptedDenoiser, GuidanceAdapter, adapter_metadata, guidance_scale_embedding
from .cfg import CFGDenoiser, cfg_combine, from_lcm_omega, from_paper_cfg, to_lcm_omega
from .scaled import ScaledCFGDenoiser, guided_denoise

__all__ = [
    "AdaptedDenoiser", "CFGDenoiser", "GuidanceAdapter", "ScaledCFGDenoiser", "adapter_metadata", "cfg_combine",
    "from_lcm_omega", "from_paper_cfg", "guidance_scale_embedding", "guided_denoise", "to_lcm_omega",
]
