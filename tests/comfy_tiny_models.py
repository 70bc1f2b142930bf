"""Tiny random-weight instances of ComfyUI's own architectures, built through ``comfy.supported_models``.

``tiny_model(arch)`` returns a ``ModelPatcher`` (the MODEL type of ComfyUI's nodes) around the real ComfyUI model
class (SD1.5 UNet, SDXL UNet, Flux, SD3 MMDiT, Wan 2.1; and on ComfyUI 0.33.0 the 2026 families of
``ARCHS_2026``: Flux.2, Qwen-Image, Z-Image, Lumina 2, Chroma, HunyuanVideo 1.5, Wan 2.2 5B and the Wan 2.2 A14B
expert pair), with a few thousand to a million weights, seeded
normal initialisation of weights and buffers (ComfyUI's ops leave them uninitialised), float32 on the CPU;
``tiny_inputs(arch)`` gives matching positive / negative CONDITIONING and an empty LATENT. Nothing is copied
from ComfyUI: only its public model configs and classes are instantiated. Import after
``comfyui_env.import_comfy``.
"""

from __future__ import annotations

from typing import Any

import comfy_versions
import torch

CONTEXT_DIM = 32
TOKENS = 7

#: arch -> (supported_models class name, unet_config, latent shape (without batch))
ARCHS: dict[str, tuple[str, dict[str, Any], tuple[int, ...]]] = {
    "sd15": ("SD15", dict(
        image_size=32, in_channels=4, out_channels=4, model_channels=32, num_res_blocks=[1, 1], channel_mult=[1, 2],
        transformer_depth=[1, 1], transformer_depth_output=[1, 1, 1, 1], transformer_depth_middle=1,
        context_dim=CONTEXT_DIM, use_linear_in_transformer=False, adm_in_channels=None,
        use_temporal_attention=False, use_spatial_transformer=True, legacy=False, num_heads=2, num_head_channels=-1,
    ), (4, 8, 8)),
    "sdxl": ("SDXL", dict(
        image_size=32, in_channels=4, out_channels=4, model_channels=32, num_res_blocks=[1, 1], channel_mult=[1, 2],
        transformer_depth=[0, 1], transformer_depth_output=[0, 0, 1, 1], transformer_depth_middle=1,
        context_dim=CONTEXT_DIM, use_linear_in_transformer=True, adm_in_channels=2816, num_classes="sequential",
        use_temporal_attention=False, use_spatial_transformer=True, legacy=False, num_head_channels=16,
    ), (4, 8, 8)),
    "flux": ("Flux", dict(
        image_model="flux", in_channels=16, out_channels=16, vec_in_dim=24, context_in_dim=CONTEXT_DIM,
        hidden_size=64, mlp_ratio=2.0, num_heads=2, depth=1, depth_single_blocks=1, axes_dim=[8, 12, 12],
        theta=10000, patch_size=2, qkv_bias=True, guidance_embed=True,
    ), (16, 8, 8)),
    "sd3": ("SD3", dict(
        in_channels=16, out_channels=16, patch_size=2, depth=2, num_patches=64, pos_embed_max_size=8,
        adm_in_channels=24, pos_embed_scaling_factor=None,
        context_embedder_config={"target": "torch.nn.Linear", "params": {"in_features": CONTEXT_DIM,
                                                                          "out_features": 128}},
    ), (16, 8, 8)),
    "wan21": ("WAN21_T2V", dict(
        image_model="wan2.1", model_type="t2v", patch_size=(1, 2, 2), in_dim=16, dim=64, ffn_dim=128, freq_dim=32,
        text_dim=CONTEXT_DIM, out_dim=16, num_heads=2, num_layers=2,
    ), (16, 2, 8, 8)),
}


#: the model families of 2026, configured for ComfyUI 0.33.0's ``supported_models`` (key names follow its
#: ``model_detection.py``; sizes are tiny). "wan22_a14b" is one expert of Wan 2.2 A14B (the high-noise and the
#: low-noise expert are both Wan 2.1-architecture models; build the pair with seeds 0 and 1).
ARCHS_2026: dict[str, tuple[str, dict[str, Any], tuple[int, ...]]] = {
    "flux2": ("Flux2", dict(
        image_model="flux2", in_channels=128, out_channels=128, vec_in_dim=None, context_in_dim=CONTEXT_DIM,
        hidden_size=64, mlp_ratio=3.0, num_heads=2, depth=1, depth_single_blocks=1, axes_dim=[8, 8, 8, 8], theta=2000,
        patch_size=1, qkv_bias=False, guidance_embed=False, global_modulation=True, mlp_silu_act=True, ops_bias=False,
        default_ref_method="index", ref_index_scale=10.0, txt_ids_dims=[3],
    ), (128, 4, 4)),
    "qwen_image": ("QwenImage", dict(
        image_model="qwen_image", patch_size=2, in_channels=64, out_channels=16, num_layers=1, attention_head_dim=32,
        num_attention_heads=2, joint_attention_dim=CONTEXT_DIM, axes_dims_rope=(8, 12, 12),
    ), (16, 1, 8, 8)),
    "zimage": ("ZImage", dict(  # adaLN width is min(dim, 256): the smallest consistent dim is 256
        image_model="lumina2", patch_size=2, in_channels=16, dim=256, cap_feat_dim=CONTEXT_DIM, n_layers=1,
        n_refiner_layers=1, qk_norm=True, n_heads=8, n_kv_heads=8, axes_dims=[8, 12, 12], axes_lens=[64, 64, 64],
        rope_theta=256.0, ffn_dim_multiplier=8.0 / 3.0, multiple_of=16, z_image_modulation=True, time_scale=1000.0,
        pad_tokens_multiple=32,
    ), (16, 8, 8)),
    "lumina2": ("Lumina2", dict(
        image_model="lumina2", patch_size=2, in_channels=16, dim=64, cap_feat_dim=CONTEXT_DIM, n_layers=1,
        n_refiner_layers=1, qk_norm=True, n_heads=2, n_kv_heads=1, axes_dims=[8, 12, 12], axes_lens=[64, 64, 64],
        rope_theta=10000.0, ffn_dim_multiplier=4.0, multiple_of=16,
    ), (16, 8, 8)),
    "chroma": ("Chroma", dict(
        image_model="chroma", in_channels=64, out_channels=64, context_in_dim=CONTEXT_DIM, hidden_size=64,
        mlp_ratio=2.0, num_heads=2, depth=1, depth_single_blocks=1, axes_dim=[8, 12, 12], theta=10000, patch_size=2,
        qkv_bias=True, in_dim=64, out_dim=64, hidden_dim=32, n_layers=1, txt_ids_dims=[], vec_in_dim=None,
    ), (16, 8, 8)),
    "hunyuan15": ("HunyuanVideo15", dict(  # 65 input channels: 32 latent + 32 image condition + 1 mask
        image_model="hunyuan_video", in_channels=65, out_channels=32, vec_in_dim=None, context_in_dim=CONTEXT_DIM,
        hidden_size=64, mlp_ratio=2.0, num_heads=2, depth=1, depth_single_blocks=1, axes_dim=[8, 12, 12], theta=256,
        patch_size=[1, 1, 1], qkv_bias=True, guidance_embed=False, byt5=False, meanflow=False,
        use_cond_type_embedding=True, vision_in_dim=16, meanflow_sum=False,
    ), (32, 2, 8, 8)),
    "wan22_5b": ("WAN22_T2V", dict(
        image_model="wan2.1", model_type="t2v", patch_size=(1, 2, 2), in_dim=48, dim=64, ffn_dim=128, freq_dim=32,
        text_dim=CONTEXT_DIM, out_dim=48, num_heads=2, num_layers=2,
    ), (48, 2, 8, 8)),
    "wan22_a14b": ("WAN21_T2V", dict(
        image_model="wan2.1", model_type="t2v", patch_size=(1, 2, 2), in_dim=16, dim=64, ffn_dim=128, freq_dim=32,
        text_dim=CONTEXT_DIM, out_dim=16, num_heads=2, num_layers=2,
    ), (16, 2, 8, 8)),
}
ARCHS.update(ARCHS_2026)
CLASSIC = ("sd15", "sdxl", "flux", "sd3", "wan21")


def available_archs() -> tuple[str, ...]:
    """The ``ARCHS`` keys the imported ComfyUI can build: the 2026 families on ComfyUI >= 0.33.0 only."""
    return CLASSIC + (tuple(ARCHS_2026) if comfy_versions.host().has_2026_families else ())


def tiny_model(arch: str, seed: int = 0, std: float = 0.05) -> Any:
    """A ComfyUI MODEL (``ModelPatcher``) of architecture ``arch`` (a key of ``ARCHS``) with random weights."""
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models

    cls_name, unet_config, _ = ARCHS[arch]
    extra = comfy_versions.host().unet_config_extra.get(arch, {})
    model_config = getattr(comfy.supported_models, cls_name)({**unet_config, **extra})
    model_config.set_inference_dtype(torch.float32, None)
    model = model_config.get_model({})
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
        for b in model.diffusion_model.buffers():  # e.g. SD3's pos_embed, allocated with torch.empty
            if b.is_floating_point():
                b.copy_(torch.randn(b.shape, generator=g) * std)
    model.eval()
    return comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(),
                                            offload_device=mm.unet_offload_device())


def tiny_inputs(arch: str, batch: int = 1, seed: int = 0) -> tuple[list, list, dict]:
    """(positive, negative, latent) for ``tiny_model(arch)``: random text-like conditioning, an empty latent."""
    g = torch.Generator().manual_seed(seed)

    def cond() -> list:
        extra: dict[str, Any] = {}
        if arch == "sdxl":
            extra = {"pooled_output": torch.randn(1, 1280, generator=g), "width": 64, "height": 64}
        elif arch == "hunyuan15":  # its encode_adm reads a pooled output (unused without vec_in)
            extra = {"pooled_output": torch.randn(1, 8, generator=g)}
        elif arch in ("flux", "sd3"):
            extra = {"pooled_output": torch.randn(1, 24, generator=g)}
            if arch == "flux":
                extra["guidance"] = 3.5
        return [[torch.randn(1, TOKENS, CONTEXT_DIM, generator=g), extra]]

    shape = ARCHS[arch][2]
    return cond(), cond(), {"samples": torch.zeros(batch, *shape)}
