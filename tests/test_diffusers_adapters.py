"""Tiny random-weight diffusers models of real architectures become fewstep denoisers and sample."""

import pytest
import torch

from fewstep.core.models import DiscreteVP, FlowMatching
from fewstep.core.models.diffusers_adapters import diffusers_denoiser
from fewstep.core.sampling import get_sampler, get_sigmas

diffusers = pytest.importorskip("diffusers")


def _unet2d():
    m = diffusers.UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(16, 32),
                              layers_per_block=1, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                              up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8,
                              num_class_embeds=4)
    return m, (2, 3, 8, 8), {"class_labels": torch.tensor([0, 3])}


def _unet_cond():
    m = diffusers.UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32),
                                       layers_per_block=1, cross_attention_dim=16, attention_head_dim=4,
                                       norm_num_groups=8,
                                       down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                       up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    return m, (2, 4, 8, 8), {"encoder_hidden_states": torch.randn(2, 5, 16)}


def _dit():
    m = diffusers.DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                        num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=10)
    return m, (2, 4, 8, 8), {"class_labels": torch.tensor([1, 2])}


def _sd3():
    m = diffusers.SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=2,
                                        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                        caption_projection_dim=16, pooled_projection_dim=8, out_channels=4,
                                        pos_embed_max_size=16)
    return m, (2, 4, 8, 8), {"encoder_hidden_states": torch.randn(2, 5, 16), "pooled_projections": torch.randn(2, 8)}


def _flux():
    m = diffusers.FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                         attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                         pooled_projection_dim=8, guidance_embeds=False, axes_dims_rope=(2, 2, 4))
    return m, (2, 4, 8, 8), {"encoder_hidden_states": torch.randn(2, 5, 16), "pooled_projections": torch.randn(2, 8)}


@pytest.mark.parametrize("build", [_unet2d, _unet_cond, _dit, _sd3, _flux], ids=["unet2d", "unet_cond", "dit", "sd3",
                                                                                 "flux"])
@torch.no_grad()
def test_adapter_denoises_and_samples(build):
    torch.manual_seed(0)
    module, shape, cond = build()
    den = diffusers_denoiser(module.eval())
    ms = den.model_sampling
    assert isinstance(ms, FlowMatching if type(module).__name__ in ("SD3Transformer2DModel", "FluxTransformer2DModel")
                      else DiscreteVP)
    x = torch.randn(shape)
    sigma = torch.tensor([0.5, 0.9]) if isinstance(ms, FlowMatching) else torch.tensor([1.0, 5.0])
    x0 = den(x, sigma, **cond)
    assert x0.shape == x.shape and torch.isfinite(x0).all()
    # the adapter is the model's own output put through the model sampling
    native = ms.output_from_denoised(sigma, x0, x)
    assert torch.isfinite(native).all()
    sig = get_sigmas("simple", ms, 3)
    out = get_sampler("dpmpp_2m")(den, x * (sig[0] if not isinstance(ms, FlowMatching) else 1.0), sig,
                                  extra_args=cond, disable=True)
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_unknown_diffusers_class_is_clear():
    with pytest.raises(TypeError, match="no diffusers adapter for Linear"):
        diffusers_denoiser(torch.nn.Linear(2, 2))
