import math

import pytest
import torch

from fewstep.core.metrics.sliced import sliced_wasserstein
from fewstep.core.models import EDM, Denoiser, DiscreteVP, FlowMatching, GaussianMixtureDenoiser, toy_mixture
from fewstep.core.sampling import (
    NFE,
    SAMPLERS,
    fine_solution,
    flow_shift,
    get_sampler,
    get_sigmas,
    karras,
    sample_euler,
    sample_lcm,
    sample_tcd,
)
from fewstep.core.sampling import samplers as samplers_module
from fewstep.core.sampling.registry import ANCESTRAL_SAMPLERS, REGISTRY, RUNTIME_SAMPLERS, names


def _setup(ms, n=256, dim=2, seed=0):
    den = GaussianMixtureDenoiser(toy_mixture(dim=dim, components=8), ms)
    noise = torch.randn(n, dim, generator=torch.Generator().manual_seed(seed))
    x = ms.noise_scaling(torch.tensor(ms.sigma_max), noise, torch.zeros_like(noise))
    return den, x


def _sched(ms, n):
    return flow_shift(n, ms.shift) if isinstance(ms, FlowMatching) else karras(n, ms.sigma_min, ms.sigma_max)


def _err(a, b):
    return float(((a - b) ** 2).mean().sqrt())


@pytest.mark.parametrize("ms", [EDM(0.002, 80.0), DiscreteVP("eps", "scaled_linear")], ids=["edm", "vp"])
@pytest.mark.parametrize("name,order", [("euler", 1.0), ("heun", 2.0), ("dpmpp_2m", 2.0), ("uni_pc", 2.0)])
def test_convergence_order(ms, name, order):
    """Error to the exact ODE solution falls at the order the paper claims."""
    den, x = _setup(ms)
    ref = fine_solution(den, x, _sched(ms, 128), substeps=8)[-1]
    steps = [16, 32, 64]
    errs = [_err(get_sampler(name)(den, x, _sched(ms, n), disable=True), ref) for n in steps]
    observed = math.log2(errs[1] / errs[2])
    assert errs[0] > errs[1] > errs[2]
    assert observed > order - 0.3, (name, errs, observed)
    if order == 1.0:
        assert observed < 1.5, (name, errs, observed)


@pytest.mark.parametrize("name", ["euler", "heun", "dpmpp_2m", "uni_pc"])
def test_flow_models_converge(name):
    ms = FlowMatching(shift=3.0)
    den, x = _setup(ms)
    ref = fine_solution(den, x, _sched(ms, 128), substeps=8)[-1]
    errs = [_err(get_sampler(name)(den, x, _sched(ms, n), disable=True), ref) for n in (8, 32)]
    assert errs[1] < errs[0] / 2.5, errs


@pytest.mark.parametrize("ms", [EDM(0.002, 80.0), DiscreteVP("eps", "linear", 1e-4, 0.02), FlowMatching(3.0)],
                         ids=["edm", "vp", "flow"])
def test_tcd_limits(ms):
    """TCD with gamma=0 is DDIM (= Euler in sigma space); gamma=1 is multistep consistency sampling."""
    den, x = _setup(ms, n=64)
    sig = _sched(ms, 6)
    torch.testing.assert_close(sample_tcd(den, x, sig, gamma=0.0, quantize=False, disable=True),
                               sample_euler(den, x, sig, disable=True), atol=1e-4, rtol=1e-4)
    if not isinstance(ms, DiscreteVP):  # discrete TCD lands on timestep 0 (sigma_min), as diffusers
        a = sample_tcd(den, x, sig, gamma=1.0, quantize=False, disable=True, extra_args={"seed": 3})
        b = sample_lcm(den, x, sig, disable=True, extra_args={"seed": 3})
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_ancestral_samples_the_mixture():
    ms = EDM(0.002, 80.0)
    den, x = _setup(ms, n=2000)
    out = get_sampler("euler_ancestral")(den, x, karras(64, 0.002, 80.0), extra_args={"seed": 0}, disable=True)
    data = den.mixture.sample(2000, generator=torch.Generator().manual_seed(1))
    other = den.mixture.sample(2000, generator=torch.Generator().manual_seed(2))
    floor = sliced_wasserstein(data, other)
    assert sliced_wasserstein(out, data) < 3 * floor + 0.05
    assert sliced_wasserstein(torch.randn(2000, 2) * 3, data) > 5 * floor


def test_seeded_samplers_reproducible():
    ms = DiscreteVP("eps", "scaled_linear")
    den, x = _setup(ms, n=16)
    sig = get_sigmas("karras", ms, 4)
    assert set(ANCESTRAL_SAMPLERS) == {"euler_ancestral", "lcm", "tcd", "dmd"}
    for name in ANCESTRAL_SAMPLERS:
        a = get_sampler(name)(den, x, sig, extra_args={"seed": 7}, disable=True)
        b = get_sampler(name)(den, x, sig, extra_args={"seed": 7}, disable=True)
        c = get_sampler(name)(den, x, sig, extra_args={"seed": 8}, disable=True)
        assert torch.equal(a, b), name
        assert not torch.allclose(a, c), name


def test_nfe_and_callbacks():
    ms = EDM(0.002, 80.0)
    den, x = _setup(ms, n=4)
    sig = karras(5, 0.002, 80.0)
    for name in [n for n in SAMPLERS if n != "hybrid"]:
        den.calls = 0
        seen = []
        get_sampler(name)(den, x, sig, callback=lambda d, seen=seen: seen.append(d["i"]), disable=True)
        assert den.calls == NFE[name](5), name
        assert seen and seen[0] == 0, name


def test_registry_is_the_one_list():
    """Every sampler function is registered, every registry entry names a function, and the flags agree with the
    signatures (an ancestral sampler takes a noise sampler)."""
    import inspect

    functions = {n for n in dir(samplers_module) if n.startswith("sample_")}
    assert functions == {s.function for s in REGISTRY.values()}
    assert set(SAMPLERS) == set(REGISTRY)
    for name, spec in REGISTRY.items():
        params = inspect.signature(SAMPLERS[name]).parameters
        assert list(params)[:6] == ["model", "x", "sigmas", "extra_args", "callback", "disable"], name
        if spec.ancestral:
            assert "noise_sampler" in params, name
        assert spec.family in ("teacher", "distilled", "composite"), name
    assert RUNTIME_SAMPLERS == ("euler", "dpmpp_2m", "lcm", "dmd", "flow_map", "onestep")
    assert names("teacher") == ("euler", "euler_ancestral", "heun", "dpmpp_2m", "uni_pc")
    assert NFE["heun"](5) == 9 and NFE["onestep"](5) == 1 and NFE["dmd"](4) == 4


def test_onestep_and_hybrid():
    ms = EDM(0.002, 80.0)
    den, x = _setup(ms, n=32)
    sig = karras(4, 0.002, 80.0)
    torch.testing.assert_close(get_sampler("onestep")(den, x, sig, disable=True), den(x, sig[0]))
    base = GaussianMixtureDenoiser(toy_mixture(dim=2, components=3, seed=5), ms)
    hybrid = get_sampler("hybrid")
    only_distilled = hybrid(base, x, sig, distilled_model=den, base_steps=0, extra_args={"seed": 1}, disable=True)
    torch.testing.assert_close(only_distilled, sample_lcm(den, x, sig, extra_args={"seed": 1}, disable=True))
    only_base = hybrid(base, x, sig, distilled_model=den, base_steps=4, disable=True)
    torch.testing.assert_close(only_base, sample_euler(base, x, sig, disable=True))
    base.calls = den.calls = 0
    hybrid(base, x, sig, distilled_model=den, base_steps=1, disable=True)
    assert (base.calls, den.calls) == (1, 3)


class _ExactFlowMap(torch.nn.Module):
    """Flow map of the Gaussian mixture, built from a fine ODE solve, in the x0 form sample_flow_map expects."""

    def __init__(self, den):
        super().__init__()
        self.den, self.model_sampling = den, den.model_sampling

    def forward(self, x, sigma, sigma_next=None, **kw):
        s, sn = float(sigma.reshape(-1)[0]), float(sigma_next.reshape(-1)[0])
        grid = karras(200, sn, s)[:-1] if sn > 0 else karras(200, 0.002, s)
        target = fine_solution(self.den, x, grid, substeps=4)[-1]
        if sn == 0:
            return target
        return x - s * (target - x) / (sn - s)


def test_flow_map_one_step_is_exact():
    ms = EDM(0.002, 80.0)
    den, x = _setup(ms, n=64)
    ref = fine_solution(den, x, karras(128, 0.002, 80.0), substeps=8)[-1]
    fm = _ExactFlowMap(den)
    one = get_sampler("flow_map")(fm, x, torch.tensor([80.0, 0.0]), disable=True)
    two = get_sampler("flow_map")(fm, x, torch.tensor([80.0, 1.0, 0.0]), disable=True)
    eul = sample_euler(den, x, karras(2, 0.002, 80.0), disable=True)
    assert _err(one, ref) < 2e-2 and _err(two, ref) < 2e-2
    assert _err(eul, ref) > 10 * _err(one, ref)


# ---------------------------------------------------------------------------------------------- bad input
def test_bad_sigmas():
    ms = EDM(0.002, 80.0)
    den, x = _setup(ms, n=2)
    with pytest.raises(ValueError, match="strictly decreasing"):
        sample_euler(den, x, torch.tensor([0.0, 1.0, 2.0]))
    with pytest.raises(ValueError, match="non-negative"):
        sample_euler(den, x, torch.tensor([1.0, -0.5]))
    with pytest.raises(ValueError, match="NaN"):
        sample_euler(den, x, torch.tensor([1.0, float("nan"), 0.0]))
    with pytest.raises(ValueError, match="at least 2"):
        sample_euler(den, x, torch.tensor([1.0]))
    with pytest.raises(ValueError, match="gamma"):
        sample_tcd(den, x, torch.tensor([1.0, 0.0]), gamma=1.5)


def test_unknown_names():
    with pytest.raises(ValueError, match="unknown sampler 'eulr'.*euler"):
        get_sampler("eulr")
    with pytest.raises(ValueError, match="unknown schedule 'karas'.*karras"):
        get_sigmas("karas", EDM(), 4)
    with pytest.raises(ValueError, match="positive integer"):
        karras(0, 0.1, 10.0)


class _Net(torch.nn.Module):
    def __init__(self, out=None):
        super().__init__()
        self.out = out

    def forward(self, x, t, **kw):
        return self.out(x) if self.out else x * 0.5


def test_denoiser_errors():
    ms = DiscreteVP("eps")
    x = torch.randn(2, 3, 4, 4)
    nan = Denoiser(_Net(lambda x: x * float("nan")), ms, name="broken")
    with pytest.raises(FloatingPointError, match="broken produced NaN"):
        sample_euler(nan, x, torch.tensor([5.0, 1.0, 0.0]))
    bad_shape = Denoiser(_Net(lambda x: x[:, :1]), ms)
    with pytest.raises(ValueError, match=r"returned shape \(2, 1, 4, 4\) for input \(2, 3, 4, 4\)"):
        bad_shape(x, 1.0)
    ok = Denoiser(_Net(), ms)
    with pytest.raises(ValueError, match="sigma has 3 entries but x has batch size 2"):
        ok(x, torch.tensor([1.0, 2.0, 3.0]))
    with pytest.raises(ValueError, match="batched tensor"):
        sample_euler(ok, torch.randn(5), torch.tensor([1.0, 0.0]))
    with pytest.raises(AttributeError, match="no model_sampling"):
        sample_lcm(_Net(), x, torch.tensor([1.0, 0.0]))
