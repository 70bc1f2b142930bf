"""Guidance: the CFG convention (``uncond + w (cond - uncond)``), conversions, guidance adapters."""

from .cfg import CFGDenoiser, cfg_combine, from_lcm_omega, from_paper_cfg, to_lcm_omega

__all__ = ["CFGDenoiser", "cfg_combine", "from_lcm_omega", "from_paper_cfg", "to_lcm_omega"]
