"""Tiny random-initialised but real diffusers architectures with text conditioning (not a test module).

Each builder returns ``Arch(teacher, shape, pool, null)``: the teacher denoiser (``diffusers_denoiser``: eps discrete
for the SDXL-shaped UNet, flow matching for Flux / SD3 / Wan), the shape of one sample, a pool of ``N`` precomputed
"prompt" embeddings (a mapping of ``(N, ...)`` tensors, what a text encoder would have produced) and the null
(empty-prompt) embeddings for classifier-free guidance.

``comfy_sdxl_unet`` is the smallest UNet2DConditionModel that ComfyUI's model detection accepts as an SDXL-family
model (see its docstring); the whole-loop test uses it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

ARCHS = ("sdxl", "flux", "sd3", "wan")


@dataclass
class Arch:
    teacher: Any
    shape: tuple[int, ...]
    pool: dict[str, torch.Tensor]
    null: dict[str, torch.Tensor]


def _structure(net: torch.nn.Module, seed: int) -> torch.nn.Module:
    """diffusers zero-initialises output projections and adaLN modulations: give a random teacher some structure."""
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in net.parameters():
            if p.abs().sum() == 0:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return net.eval().requires_grad_(False)


def sdxl_time_ids(n: int, size: int) -> torch.Tensor:
    """SDXL's six size ids ``(orig_h, orig_w, crop_top, crop_left, target_h, target_w)`` in pixels (latent x 8)."""
    return torch.tensor([[8.0 * size, 8.0 * size, 0.0, 0.0, 8.0 * size, 8.0 * size]]).repeat(n, 1)


def tiny_sdxl_config(context_dim: int = 32, pooled_dim: int = 16, time_dim: int = 8) -> dict[str, Any]:
    """SDXL's UNet config shape (text_time added embedding: pooled text + 6 Fourier-embedded size ids; linear
    transformer projections; cross-attention at the lower levels only) at a tiny width."""
    return {"sample_size": 8, "in_channels": 4, "out_channels": 4, "layers_per_block": 1,
            "block_out_channels": (32, 64), "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
            "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"), "transformer_layers_per_block": (1, 2),
            "attention_head_dim": (2, 4), "cross_attention_dim": context_dim, "use_linear_projection": True,
            "addition_embed_type": "text_time", "addition_time_embed_dim": time_dim,
            "projection_class_embeddings_input_dim": pooled_dim + 6 * time_dim, "norm_num_groups": 8}


def comfy_sdxl_config() -> dict[str, Any]:
    """The smallest UNet that ComfyUI (0.3.75 and 0.33.0) detects as an SDXL-family model.

    ``comfy.model_detection.detect_unet_config`` reads the config off the state dict and
    ``supported_models_base.BASE.matches`` compares only the keys each model fixes. The SDXL family fixes
    ``model_channels`` 320, ``context_dim`` 2048, ``adm_in_channels`` 2816 (1280 pooled + 6 x 256 size ids), linear
    transformer projections and the per-input-block ``transformer_depth``; it leaves ``channel_mult``, the output
    blocks' depths and the middle block free. The shortest depth list is KOALA-700M's ``[0, 2, 5]`` (one res block
    per level; Segmind Vega's ``[0, 0, 1, 1, 2, 2]`` has two per level: 6 more res blocks), so: three levels at 320
    channels (``channel_mult`` [1, 1, 1]), 2 and 5 transformer blocks in the input levels, none in the output
    blocks and no middle block. ComfyUI loads it as ``KOALA_700M`` (an ``SDXL`` subclass: same model class, latent
    format, eps prediction and ``encode_adm``). About 60 M parameters.
    """
    return {"sample_size": 8, "in_channels": 4, "out_channels": 4, "layers_per_block": 1,
            "block_out_channels": (320, 320, 320),
            "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            "up_block_types": ("UpBlock2D", "UpBlock2D", "UpBlock2D"), "mid_block_type": None,
            "transformer_layers_per_block": (1, 2, 5), "attention_head_dim": 5, "cross_attention_dim": 2048,
            "use_linear_projection": True, "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
            "projection_class_embeddings_input_dim": 2816, "norm_num_groups": 32}


def sdxl_pool(n: int, context_dim: int, pooled_dim: int, tokens: int, size: int, seed: int
              ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed + 7)
    pool = {"encoder_hidden_states": torch.randn(n, tokens, context_dim, generator=g),
            "text_embeds": torch.randn(n, pooled_dim, generator=g), "time_ids": sdxl_time_ids(n, size)}
    null = {"encoder_hidden_states": torch.zeros(1, tokens, context_dim), "text_embeds": torch.zeros(1, pooled_dim),
            "time_ids": sdxl_time_ids(1, size)}
    return pool, null


def _text_pool(n: int, tokens: int, dim: int, pooled: int | None, seed: int):
    g = torch.Generator().manual_seed(seed + 7)
    pool = {"encoder_hidden_states": torch.randn(n, tokens, dim, generator=g)}
    null = {"encoder_hidden_states": torch.zeros(1, tokens, dim)}
    if pooled:
        pool["pooled_projections"] = torch.randn(n, pooled, generator=g)
        null["pooled_projections"] = torch.zeros(1, pooled)
    return pool, null


def build(arch: str, seed: int = 0, prompts: int = 8) -> Arch:
    """A tiny teacher of ``arch`` (one of ``ARCHS``) with ``prompts`` random prompt embeddings."""
    import diffusers

    from fewstep.core.models.diffusers_adapters import diffusers_denoiser

    torch.manual_seed(seed)
    if arch == "sdxl":
        net = diffusers.UNet2DConditionModel(**tiny_sdxl_config())
        pool, null = sdxl_pool(prompts, 32, 16, 4, 8, seed)
        shape = (4, 8, 8)
    elif arch == "flux":
        net = diffusers.FluxTransformer2DModel(patch_size=1, in_channels=16, out_channels=16, num_layers=2,
                                               num_single_layers=2, attention_head_dim=16, num_attention_heads=4,
                                               joint_attention_dim=64, pooled_projection_dim=32,
                                               axes_dims_rope=(4, 4, 8))
        pool, null = _text_pool(prompts, 4, 64, 32, seed)
        shape = (4, 8, 8)
    elif arch == "sd3":
        net = diffusers.SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, out_channels=4,
                                              num_layers=2, attention_head_dim=16, num_attention_heads=4,
                                              joint_attention_dim=64, caption_projection_dim=64,
                                              pooled_projection_dim=32, pos_embed_max_size=16)
        pool, null = _text_pool(prompts, 4, 64, 32, seed)
        shape = (4, 8, 8)
    elif arch == "wan":
        net = diffusers.WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=16,
                                              in_channels=4, out_channels=4, text_dim=64, freq_dim=32, ffn_dim=256,
                                              num_layers=2, rope_max_seq_len=32)
        pool, null = _text_pool(prompts, 4, 64, None, seed)
        shape = (4, 2, 8, 8)
    else:
        raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")
    return Arch(diffusers_denoiser(_structure(net, seed)), shape, pool, null)


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
