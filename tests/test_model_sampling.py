import pytest
import torch

from fewstep.core.models import EDM, DiscreteVP, FlowMatching, model_sampling_from_config

ALL = [
    DiscreteVP("eps", "scaled_linear"),
    DiscreteVP("v", "linear", 1e-4, 0.02),
    DiscreteVP("x0", "cosine"),
    DiscreteVP("v", "scaled_linear", zero_terminal_snr=True),
    FlowMatching(shift=3.0),
    FlowMatching(shift=1.0, multiplier=1.0),
    EDM(0.002, 80.0),
]


@pytest.mark.parametrize("ms", ALL, ids=lambda m: f"{type(m).__name__}-{m.prediction}")
def test_output_denoised_roundtrip(ms):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 5, 5, generator=g)
    sigma = torch.tensor([0.05, 0.3, 0.7, 0.95]) * min(ms.sigma_max, 10.0)
    out = torch.randn(4, 3, 5, 5, generator=g)
    den = ms.calculate_denoised(sigma, out, x)
    back = ms.output_from_denoised(sigma, den, x)
    torch.testing.assert_close(back, out, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("ms", ALL, ids=lambda m: f"{type(m).__name__}-{m.prediction}")
def test_timestep_sigma_roundtrip(ms):
    sig = torch.linspace(ms.sigma_min * 1.01, ms.sigma_max * 0.99, 37)
    torch.testing.assert_close(ms.sigma(ms.timestep(sig)), sig, rtol=1e-3, atol=1e-6)
    assert ms.config() == model_sampling_from_config(ms.config()).config()


def test_vp_matches_ddpm_forward_process():
    """x_ve = x0 + sigma n  <=>  x_vp = sqrt(abar) x0 + sqrt(1 - abar) n (Ho et al. 2020, eq. 4)."""
    ms = DiscreteVP("eps", "linear", 1e-4, 0.02)
    t = 500
    abar = ms.alphas_cumprod[t]
    sigma = ms.sigmas[t]
    x0, n = torch.randn(2, 8), torch.randn(2, 8)
    x_ve = ms.noise_scaling(sigma, n, x0)
    x_vp = ms.calculate_input(sigma, x_ve)
    torch.testing.assert_close(x_vp, abar.sqrt() * x0 + (1 - abar).sqrt() * n, atol=1e-5, rtol=1e-5)
    assert abs(float(ms.timestep(sigma)) - t) < 1e-3


def test_v_prediction_exact():
    """With the true v (Salimans & Ho 2022) the v model's denoised output is x0 exactly."""
    ms = DiscreteVP("v", "scaled_linear")
    sigma = torch.tensor(2.0)
    x0, n = torch.randn(3, 4), torch.randn(3, 4)
    x = ms.noise_scaling(sigma, n, x0)
    a = 1 / (1 + sigma**2).sqrt()
    s = sigma * a
    v = a * n - s * x0
    torch.testing.assert_close(ms.calculate_denoised(sigma, v, x), x0, atol=1e-5, rtol=1e-5)


def test_flow_noise_scaling_and_inverse():
    ms = FlowMatching(shift=3.0)
    x0, n = torch.randn(2, 4), torch.randn(2, 4)
    s = torch.tensor(0.4)
    x = ms.noise_scaling(s, n, x0)
    torch.testing.assert_close(x, 0.6 * x0 + 0.4 * n)
    v = n - x0
    torch.testing.assert_close(ms.calculate_denoised(s, v, x), x0, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(float(ms.sigma(ms.timestep(torch.tensor(0.5)))), 0.5, atol=1e-6, rtol=0)


def test_bad_config_errors():
    with pytest.raises(ValueError, match="prediction"):
        DiscreteVP("flow")
    with pytest.raises(ValueError, match="beta schedule"):
        DiscreteVP("eps", "quadratic")
    with pytest.raises(ValueError, match="unknown model sampling"):
        model_sampling_from_config({"type": "nope"})
    with pytest.raises(ValueError, match="shift"):
        FlowMatching(shift=0.0)
