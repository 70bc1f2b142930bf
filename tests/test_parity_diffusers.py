"""Parity of fewstep samplers with diffusers' own schedulers on the same eps model (<= 1e-4)."""

import pytest
import torch

from fewstep.core.models import Denoiser, DiscreteVP
from fewstep.core.models.consistency import ConsistencyBoundary
from fewstep.core.sampling import sample_dpmpp_2m, sample_lcm, sample_tcd, sample_unipc

diffusers = pytest.importorskip("diffusers")

BETAS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


class SmoothEps(torch.nn.Module):
    """A small, smooth eps-prediction network ``(x_vp, t) -> eps``."""

    def __init__(self, c=3, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w = torch.nn.Parameter(torch.randn(c, c, generator=g) * 0.5)
        self.b = torch.nn.Parameter(torch.randn(c, generator=g))

    def forward(self, x, t, **kw):
        t = torch.as_tensor(t, dtype=x.dtype).reshape(-1, 1, 1, 1)
        h = torch.einsum("oc,bchw->bohw", self.w, x) + self.b.view(1, -1, 1, 1) * (t / 1000.0)
        return torch.tanh(h) * 0.8


def _vp_to_ve(ms, x_vp, sigma):
    return x_vp * (1 + sigma**2) ** 0.5


def _run_diffusers(sched, net, x_vp, generator=None, **step_kw):
    x = x_vp.clone()
    for t in sched.timesteps:
        out = net(x, t)
        if generator is not None:
            step_kw["generator"] = generator
        x = sched.step(out, t, x, **step_kw).prev_sample
    return x


@torch.no_grad()
def test_lcm_matches_diffusers():
    net, ms = SmoothEps(), DiscreteVP("eps", "scaled_linear")
    sched = diffusers.LCMScheduler(**BETAS)
    sched.set_timesteps(4)
    x_vp = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    ref = _run_diffusers(sched, net, x_vp, generator=torch.Generator().manual_seed(42))

    den = ConsistencyBoundary(Denoiser(net, ms))
    sigmas = torch.cat([ms.sigma(sched.timesteps.float()), torch.zeros(1)])
    x = _vp_to_ve(ms, x_vp, sigmas[0])
    g = torch.Generator().manual_seed(42)
    out = sample_lcm(den, x, sigmas, disable=True,
                     noise_sampler=lambda s, sn: torch.randn(x.shape, generator=g))
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


@torch.no_grad()
@pytest.mark.parametrize("gamma", [0.0, 0.3, 0.7])
def test_tcd_matches_diffusers(gamma):
    net, ms = SmoothEps(), DiscreteVP("eps", "scaled_linear")
    sched = diffusers.TCDScheduler(**BETAS)
    sched.set_timesteps(4)
    x_vp = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    ref = _run_diffusers(sched, net, x_vp, generator=torch.Generator().manual_seed(42), eta=gamma)

    den = Denoiser(net, ms)
    # diffusers' TCD ends on timestep 0 (sigma_min), not on sigma = 0
    sigmas = torch.cat([ms.sigma(sched.timesteps.float()), ms.sigma(torch.tensor([0.0]))])
    x = _vp_to_ve(ms, x_vp, sigmas[0])
    g = torch.Generator().manual_seed(42)
    out = sample_tcd(den, x, sigmas, gamma=gamma, disable=True,
                     noise_sampler=lambda s, sn: torch.randn(x.shape, generator=g))
    out_vp = out / (1 + sigmas[-1] ** 2) ** 0.5
    torch.testing.assert_close(out_vp, ref, atol=1e-4, rtol=1e-4)


@torch.no_grad()
@pytest.mark.parametrize("steps", [5, 10, 20])
def test_dpmpp_2m_matches_diffusers(steps):
    net, ms = SmoothEps(), DiscreteVP("eps", "scaled_linear")
    sched = diffusers.DPMSolverMultistepScheduler(**BETAS, algorithm_type="dpmsolver++", solver_order=2)
    sched.set_timesteps(steps)
    x_vp = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    ref = _run_diffusers(sched, net, x_vp)
    sigmas = sched.sigmas.float()
    out = sample_dpmpp_2m(Denoiser(net, ms), _vp_to_ve(ms, x_vp, sigmas[0]), sigmas, disable=True)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_unipc_matches_diffusers():
    net, ms = SmoothEps(), DiscreteVP("eps", "scaled_linear")
    sched = diffusers.UniPCMultistepScheduler(**BETAS, solver_order=2, solver_type="bh2", predict_x0=True,
                                              lower_order_final=True, final_sigmas_type="zero")
    sched.set_timesteps(10)
    x_vp = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    ref = _run_diffusers(sched, net, x_vp)
    sigmas = sched.sigmas.float()
    out = sample_unipc(Denoiser(net, ms), _vp_to_ve(ms, x_vp, sigmas[0]), sigmas, disable=True)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
