"""Tiny randomly initialised diffusers models wrapped as denoisers: export smoke tests, parity tests, CLI examples.

Each is a real diffusers class (``UNet2DModel``, ``DiTTransformer2DModel``, ``FluxTransformer2DModel``) at a few
thousand parameters, seeded, so an export of it exercises the same exporter paths as the full-size model.
"""

from __future__ import annotations

import torch

from ..models.denoiser import Denoiser
from ..models.diffusers_adapters import diffusers_denoiser
from ..models.model_sampling import DiscreteVP, FlowMatching


def tiny_unet(seed: int = 0) -> Denoiser:
    """Class-conditional ``UNet2DModel``: 3x16x16, two levels (one attention level), eps prediction."""
    from diffusers import UNet2DModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        m = UNet2DModel(sample_size=16, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(16, 32),
                        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                        up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8, num_class_embeds=10,
                        attention_head_dim=8)
    return diffusers_denoiser(m.eval().requires_grad_(False), DiscreteVP("eps", "scaled_linear"))


def tiny_dit(seed: int = 0) -> Denoiser:
    """Class-conditional ``DiTTransformer2DModel`` with a learned-variance head (out = 2 x in channels), 4x8x8."""
    from diffusers import DiTTransformer2DModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        m = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                  num_layers=2, sample_size=8, patch_size=2, norm_type="ada_norm_zero",
                                  num_embeds_ada_norm=10)
    return diffusers_denoiser(m.eval().requires_grad_(False), DiscreteVP("eps", "linear", 1e-4, 0.02))


def tiny_flux(seed: int = 0, guidance_embeds: bool = True) -> Denoiser:
    """``FluxTransformer2DModel`` (one double + one single block) on a 4x16x16 latent with text embeddings, pooled
    projections and (by default) Flux-dev's guidance embedding; flow matching, timestep = sigma."""
    from diffusers import FluxTransformer2DModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        m = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                   attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                   pooled_projection_dim=32, guidance_embeds=guidance_embeds, axes_dims_rope=(4, 6, 6))
    return diffusers_denoiser(m.eval().requires_grad_(False), FlowMatching(shift=3.0, multiplier=1.0))


TINY = {"tiny-unet": tiny_unet, "tiny-dit": tiny_dit, "tiny-flux": tiny_flux}
