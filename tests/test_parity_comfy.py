"""Parity with ComfyUI's own k-diffusion samplers (comfy/k_diffusion/sampling.py), max abs diff <= 1e-5.

Both samplers get the same ComfyUI-style model object (``model.inner_model.inner_model.model_sampling`` is
ComfyUI's ModelSamplingDiscrete + EPS/V_PREDICTION), so this also proves a fewstep sampler runs on a ComfyUI
model unchanged.
"""

import pytest
import torch

from fewstep.core.models import DiscreteVP
from fewstep.core.sampling import get_sampler, get_sigmas

pytestmark = pytest.mark.comfy


class SmoothNet(torch.nn.Module):
    def __init__(self, c=3, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w = torch.randn(c, c, generator=g) * 0.5
        self.b = torch.randn(c, generator=g)

    def forward(self, x, t):
        t = torch.as_tensor(t, dtype=x.dtype).reshape(-1, 1, 1, 1)
        w, b = self.w.to(x.dtype), self.b.to(x.dtype)
        return torch.tanh(torch.einsum("oc,bchw->bohw", w, x) + b.view(1, -1, 1, 1) * t / 1000) * 0.8


class ComfyStyleModel(torch.nn.Module):
    """Mimics KSamplerX0Inpaint -> CFGGuider -> BaseModel: x0 from a net through ComfyUI's model_sampling."""

    def __init__(self, model_sampling):
        super().__init__()
        self.net = SmoothNet()
        base = torch.nn.Module()
        base.model_sampling = model_sampling
        guider = torch.nn.Module()
        guider.inner_model = base
        self.inner_model = guider

    def forward(self, x, sigma, **kwargs):
        ms = self.inner_model.inner_model.model_sampling
        out = self.net(ms.calculate_input(sigma, x), ms.timestep(sigma).float())
        return ms.calculate_denoised(sigma, out, x)


def _comfy_ms(kind):
    import comfy.model_sampling as cms

    class MS(cms.ModelSamplingDiscrete, kind(cms)):
        pass

    return MS()


@pytest.mark.parametrize("kind", [lambda c: c.EPS, lambda c: c.V_PREDICTION], ids=["eps", "v"])
@pytest.mark.parametrize("name", ["euler", "dpmpp_2m", "lcm", "euler_ancestral"])
def test_sampler_matches_comfyui(comfy_ksampling, name, kind):
    ms = _comfy_ms(kind)
    model = ComfyStyleModel(ms)
    ours_ms = DiscreteVP("eps", "scaled_linear")  # ComfyUI's "linear" is diffusers' scaled_linear
    torch.testing.assert_close(ours_ms.sigmas, ms.sigmas.float(), rtol=1e-5, atol=1e-6)
    # float64 so the comparison measures the algorithms, not float32 rounding of values up to ~20
    sigmas = get_sigmas("karras", ours_ms, 8).double()
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * sigmas[0]
    ref = getattr(comfy_ksampling, f"sample_{name}")(model, x.clone(), sigmas, extra_args={"seed": 42}, disable=True)
    ours = get_sampler(name)(model, x.clone(), sigmas, extra_args={"seed": 42}, disable=True)
    assert float((ours - ref).abs().max()) <= 1e-5


def test_fewstep_denoiser_matches_comfyui_model_sampling(comfy_root):
    """Our DiscreteVP (eps and v) computes the same x0 as ComfyUI's EPS / V_PREDICTION classes."""
    from fewstep.core.models import Denoiser

    net = SmoothNet()
    for pred, kind in (("eps", lambda c: c.EPS), ("v", lambda c: c.V_PREDICTION)):
        cms = _comfy_ms(kind)
        ours = Denoiser(lambda x, t: net(x, t), DiscreteVP(pred, "scaled_linear", quantize=True))
        x = torch.randn(2, 3, 4, 4)
        sigma = torch.tensor([0.5, 3.0])
        ref = cms.calculate_denoised(sigma, net(cms.calculate_input(sigma, x), cms.timestep(sigma).float()), x)
        torch.testing.assert_close(ours(x, sigma), ref, atol=1e-5, rtol=1e-5)
