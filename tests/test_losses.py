"""Distillation losses (core/losses) against naive references and closed forms."""

import math

import pytest
import torch
import torch.nn.functional as F

from fewstep.core.guidance.cfg import CFGDenoiser
from fewstep.core.guidance.scaled import guided_denoise
from fewstep.core.losses import (
    consistency_loss,
    ddim_transfer,
    dmd_gradient,
    dmd_loss,
    f_divergence_weight,
    f_divergence_weights,
    fake_score_loss,
    flow_time,
    fraction_at_sigma,
    gan_discriminator_loss,
    gan_generator_loss,
    guidance_distillation_loss,
    pseudo_huber,
    pseudo_huber_c,
    reflow_huber_loss,
    reflow_loss,
    segment_boundaries,
    segment_end_index,
    sigma_at_fraction,
    sigma_from_flow_time,
    straight_path,
    top_density,
    top_time,
    u_shaped_density,
    u_shaped_time,
)
from fewstep.core.models import EDM, DiscreteVP, FlowMatching
from fewstep.core.models.gaussian_mixture import GaussianMixture, GaussianMixtureDenoiser

torch.set_num_threads(1)
MS = {"vp": DiscreteVP("v", "linear", 1e-4, 0.02), "flow": FlowMatching(shift=3.0), "edm": EDM()}


def _g(seed=0):
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------------------------- DMD
def test_dmd_gradient_matches_per_sample_reference():
    x0, real, fake = (torch.randn(4, 1, 3, 3, generator=_g(i)) for i in range(3))
    w = torch.rand(4, generator=_g(5)) + 0.5
    got = dmd_gradient(x0, real, fake, w)
    for i in range(4):
        p_real, p_fake = x0[i] - real[i], x0[i] - fake[i]
        ref = (p_real - p_fake) / p_real.abs().mean() * w[i]
        torch.testing.assert_close(got[i], ref)


def test_dmd_loss_gradient_is_normalised_score_difference():
    x0 = torch.randn(3, 2, 4, generator=_g(1)).requires_grad_(True)
    real, fake = torch.randn(3, 2, 4, generator=_g(2)), torch.randn(3, 2, 4, generator=_g(3))
    loss = dmd_loss(x0, real, fake)
    (grad,) = torch.autograd.grad(loss, x0)
    torch.testing.assert_close(grad, dmd_gradient(x0, real, fake) / x0.numel())
    # the loss value is 0.5 * mean(grad^2)
    torch.testing.assert_close(loss, 0.5 * dmd_gradient(x0, real, fake).pow(2).mean())


def test_dmd_direction_closed_form_gaussians():
    """Real N(mu_r, s^2), fake N(mu_f, s^2): exact denoisers differ by (mu_r - mu_f) sigma^2 / (s^2 + sigma^2), so
    gradient descent on the DMD loss moves samples along mu_r - mu_f."""
    s, sigma = 0.5, 0.8
    mu_r, mu_f = torch.tensor([[1.0, -2.0, 0.5]]), torch.tensor([[-1.0, 0.0, 2.0]])
    real = GaussianMixtureDenoiser(GaussianMixture(mu_r, torch.full_like(mu_r, s)))
    fake = GaussianMixtureDenoiser(GaussianMixture(mu_f, torch.full_like(mu_f, s)))
    x0 = torch.randn(5, 3, generator=_g(4)) * s + mu_f
    x_t = x0 + sigma * torch.randn(5, 3, generator=_g(6))
    d_real, d_fake = real(x_t, sigma), fake(x_t, sigma)
    torch.testing.assert_close(d_real - d_fake, ((mu_r - mu_f) * sigma**2 / (s**2 + sigma**2)).expand(5, 3),
                               atol=1e-5, rtol=1e-5)
    grad = dmd_gradient(x0, d_real, d_fake)
    direction = -grad / grad.norm(dim=1, keepdim=True)
    torch.testing.assert_close(direction, ((mu_r - mu_f) / (mu_r - mu_f).norm()).expand(5, 3), atol=1e-5, rtol=1e-5)


def test_fake_score_and_gan_losses_match_references():
    pred, target = torch.randn(4, 3, generator=_g(0)), torch.randn(4, 3, generator=_g(1))
    torch.testing.assert_close(fake_score_loss(pred, target), F.mse_loss(pred, target))
    w = torch.tensor([1.0, 0.0, 2.0, 1.0])
    torch.testing.assert_close(fake_score_loss(pred, target, w), (((pred - target) ** 2).mean(1) * w).mean())
    fake, real = torch.randn(6, generator=_g(2)) * 3, torch.randn(6, generator=_g(3)) * 3
    torch.testing.assert_close(gan_generator_loss(fake), -torch.log(torch.sigmoid(fake)).mean())
    ref_d = -torch.log(torch.sigmoid(real)).mean() - torch.log(1 - torch.sigmoid(fake)).mean()
    torch.testing.assert_close(gan_discriminator_loss(real, fake), ref_d, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("divergence,f", [
    ("reverse_kl", lambda r: -torch.log(r)),
    ("forward_kl", lambda r: r * torch.log(r)),
    ("js", lambda r: r * torch.log(r) - (1 + r) * torch.log((1 + r) / 2)),
])
def test_f_divergence_weight_is_r2_fpp(divergence, f):
    """h(r) = r^2 f''(r) (f-distill Table 1), checked with autograd second derivatives of f."""
    log_r = torch.linspace(-3, 3, 13, dtype=torch.float64)
    r = log_r.exp().requires_grad_(True)
    (d1,) = torch.autograd.grad(f(r).sum(), r, create_graph=True)
    (d2,) = torch.autograd.grad(d1.sum(), r)
    ref = (r.detach() ** 2 * d2).float()
    torch.testing.assert_close(f_divergence_weight(log_r.float(), divergence), ref, atol=1e-4, rtol=1e-4)


def test_f_divergence_weights_normalised_and_reduced():
    logits = torch.tensor([-1.0, 0.0, 2.0])
    w = f_divergence_weights(logits, "forward_kl")
    torch.testing.assert_close(w.mean(), torch.tensor(1.0))
    torch.testing.assert_close(w, logits.exp() / logits.exp().mean())
    assert torch.equal(f_divergence_weights(logits, "reverse_kl"), torch.ones(3))
    w2 = f_divergence_weights(logits, "js", batch_mean=lambda m: m * 2)  # e.g. an all-reduce
    torch.testing.assert_close(w2, torch.sigmoid(logits) / (2 * torch.sigmoid(logits).mean()))
    with pytest.raises(ValueError, match="unknown divergence"):
        f_divergence_weight(logits, "tv")


# ------------------------------------------------------------------------------------------ consistency
def test_pseudo_huber_reference_and_limits():
    a, b = torch.randn(3, 2, 5, generator=_g(0)), torch.randn(3, 2, 5, generator=_g(1))
    c = 0.3
    ref = torch.stack([torch.sqrt(((a[i] - b[i]) ** 2).sum() + c * c) - c for i in range(3)])
    torch.testing.assert_close(pseudo_huber(a, b, c), ref)
    assert pseudo_huber_c(256) == pytest.approx(0.00054 * 16)
    small = 1e-3 * torch.ones(1, 4)
    assert float(pseudo_huber(small, torch.zeros(1, 4), 1.0)) == pytest.approx(4e-6 / 2, rel=1e-3)  # ~ d^2 / 2c
    big = 1e3 * torch.ones(1, 4)
    assert float(pseudo_huber(big, torch.zeros(1, 4), 0.01)) == pytest.approx(2e3, rel=1e-4)  # ~ ||d||


@pytest.mark.parametrize("kind", ["vp", "flow", "edm"])
def test_ddim_transfer_is_exact_on_the_noising_path(kind):
    ms = MS[kind]
    x0, n = torch.randn(4, 3, generator=_g(0)), torch.randn(4, 3, generator=_g(1))
    sig, sig2 = torch.tensor([0.9, 0.5, 0.3, 0.7]), torch.tensor([0.2, 0.1, 0.0, 0.7])
    x = ms.noise_scaling(sig, n, x0)
    out = ddim_transfer(ms, x, x0, sig, sig2)
    torch.testing.assert_close(out, ms.noise_scaling(sig2, n, x0), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out[2], x0[2])  # sigma_to = 0 -> x0
    torch.testing.assert_close(out[3], x[3])  # sigma_to = sigma -> x


def test_segment_end_index_reference():
    n, s = 12, 4
    assert segment_boundaries(n, s) == [0, 3, 6, 9, 12]
    j = torch.arange(1, n + 1)
    ref = torch.tensor([max(b for b in range(0, n + 1, 3) if b < int(i)) for i in j])
    assert torch.equal(segment_end_index(j, n, s), ref)
    with pytest.raises(ValueError, match="equal segments"):
        segment_boundaries(10, 4)


def test_consistency_loss_one_segment_is_lcm_and_boundary_target():
    ms = MS["vp"]
    x0, n = torch.randn(3, 1, 2, 2, generator=_g(0)), torch.randn(3, 1, 2, 2, generator=_g(1))
    sig_t, sig_s, end = torch.tensor([2.0, 1.0, 0.5]), torch.tensor([1.5, 0.6, 0.0]), torch.zeros(3)
    x_t = ms.noise_scaling(sig_t, n, x0)
    x_s = ms.noise_scaling(sig_s, n, x0)
    student, target = torch.randn(3, 1, 2, 2, generator=_g(2)), torch.randn(3, 1, 2, 2, generator=_g(3))
    loss = consistency_loss(ms, x_t, sig_t, student, x_s, sig_s, target, end, "huber", 0.1)
    # plain LCM: d(f(x_t), f(x_s)) in x0 space; where sigma_s reached the end (0) the target is x_s itself
    ref_target = torch.stack([target[0], target[1], x_s[2]])
    torch.testing.assert_close(loss, pseudo_huber(student, ref_target, 0.1).mean())


def test_consistency_loss_segments_compare_at_the_segment_end():
    ms = MS["flow"]
    x0, n = torch.randn(2, 4, generator=_g(0)), torch.randn(2, 4, generator=_g(1))
    sig_t, sig_s, end = torch.tensor([0.9, 0.6]), torch.tensor([0.8, 0.5]), torch.tensor([0.5, 0.5])
    x_t, x_s = ms.noise_scaling(sig_t, n, x0), ms.noise_scaling(sig_s, n, x0)
    student, target = torch.randn(2, 4, generator=_g(2)), torch.randn(2, 4, generator=_g(3))
    loss = consistency_loss(ms, x_t, sig_t, student, x_s, sig_s, target, end, "l2")
    pred_e = ddim_transfer(ms, x_t, student, sig_t, end)
    targ_e = torch.stack([ddim_transfer(ms, x_s, target, sig_s, end)[0], x_s[1]])
    torch.testing.assert_close(loss, ((pred_e - targ_e) ** 2).mean(1).mean())


# ------------------------------------------------------------------------------------------------ reflow
def test_u_shaped_time_matches_its_density():
    a = 4.0
    u = (torch.arange(20000, dtype=torch.float64) + 0.5) / 20000
    t = u_shaped_time(u.float(), a).double()
    # inverse CDF: the integral of the density up to t(u) is u
    grid = torch.linspace(0, 1, 20001, dtype=torch.float64)
    cdf = torch.cumulative_trapezoid(u_shaped_density(grid, a), grid, dim=0)
    cdf = torch.cat([torch.zeros(1, dtype=torch.float64), cdf])
    torch.testing.assert_close(torch.from_numpy(__import__("numpy").interp(t.numpy(), grid.numpy(), cdf.numpy())),
                               u, atol=1e-5, rtol=0)
    assert float(cdf[-1]) == pytest.approx(1.0, abs=1e-6)
    # U-shaped: ends 2 cosh(a/2)/2 times denser than the middle, symmetric about 1/2
    assert float(u_shaped_density(torch.tensor(0.0), a) / u_shaped_density(torch.tensor(0.5), a)) == pytest.approx(
        math.cosh(a / 2))
    torch.testing.assert_close(u_shaped_time(1 - u.float(), a), 1 - u_shaped_time(u.float(), a), atol=1e-6, rtol=0)
    torch.testing.assert_close(u_shaped_time(u.float(), 0.0), u.float())


def test_top_time_matches_its_density():
    """``top_time``: density a exp(a t) / (exp(a) - 1) on [0, 1], by its CDF; more mass near 1 than near 0."""
    a = 4.0
    u = (torch.arange(20000, dtype=torch.float64) + 0.5) / 20000
    t = top_time(u.float(), a).double()
    grid = torch.linspace(0, 1, 20001, dtype=torch.float64)
    cdf = torch.cat([torch.zeros(1, dtype=torch.float64),
                     torch.cumulative_trapezoid(top_density(grid, a), grid, dim=0)])
    torch.testing.assert_close(torch.from_numpy(__import__("numpy").interp(t.numpy(), grid.numpy(), cdf.numpy())),
                               u, atol=1e-5, rtol=0)
    assert float(cdf[-1]) == pytest.approx(1.0, abs=1e-6)
    assert float(top_density(torch.tensor(1.0), a) / top_density(torch.tensor(0.0), a)) == pytest.approx(math.exp(a))
    # hand-computed: the median is log((1 + e^a) / 2) / a
    assert float(top_time(torch.tensor(0.5), a)) == pytest.approx(math.log((1 + math.exp(a)) / 2) / a, rel=1e-6)
    assert float(t.mean()) == pytest.approx(1 / (1 - math.exp(-a)) - 1 / a, abs=1e-4)  # E[t] of the density
    torch.testing.assert_close(top_time(u.float(), 0.0), u.float())


def test_reflow_huber_loss_is_pseudo_huber_of_the_velocity_error():
    """Lee et al. 2024 sec. 3.3: sqrt(||v_hat - v||^2 + c^2) - c per sample, v_hat - v = (x0 - x0_hat) / t."""
    x0, pred = torch.randn(3, 1, 4, 4, generator=_g(0)), torch.randn(3, 1, 4, 4, generator=_g(1))
    t = torch.tensor([0.2, 0.5, 0.99])
    c = 0.3
    ref = torch.stack([torch.sqrt((((pred[i] - x0[i]) / t[i]) ** 2).sum() + c * c) - c for i in range(3)]).mean()
    torch.testing.assert_close(reflow_huber_loss(pred, x0, t, c), ref)
    # default c = 0.00054 sqrt(d), d = 16 here; weights scale each sample (batch mean, as reflow_loss)
    c16 = 0.00054 * 4
    per = torch.stack([torch.sqrt((((pred[i] - x0[i]) / t[i]) ** 2).sum() + c16 * c16) - c16 for i in range(3)])
    torch.testing.assert_close(reflow_huber_loss(pred, x0, t), per.mean())
    w = torch.tensor([1.0, 0.0, 3.0])
    torch.testing.assert_close(reflow_huber_loss(pred, x0, t, weights=w), (per * w).mean())  # not renormalised
    # hand-computed: error 3 and 4 on two pixels at t = 0.5 -> ||v err|| = 10; c = 0 gives the norm itself
    e = torch.zeros(1, 1, 2, 2)
    e[0, 0, 0, 0], e[0, 0, 1, 1] = 3.0, 4.0
    assert float(reflow_huber_loss(e, torch.zeros_like(e), torch.tensor([0.5]), 1e-12)) == pytest.approx(10.0)
    assert float(reflow_huber_loss(e, torch.zeros_like(e), torch.tensor([0.5]), 1.0)) == pytest.approx(
        math.sqrt(101) - 1)
    # its gradient has unit norm per sample in the velocity (for c -> 0): outliers pull no harder than others
    p = (x0 + 5.0 * torch.randn(3, 1, 4, 4, generator=_g(2))).requires_grad_(True)
    reflow_huber_loss(p, x0, torch.ones(3), 1e-9).backward()
    torch.testing.assert_close(p.grad.reshape(3, -1).norm(dim=1), torch.full((3,), 1 / 3))


@pytest.mark.parametrize("kind", ["vp", "flow"])
def test_reflow_loss_is_velocity_mse_in_flow_coordinates(kind):
    ms = MS[kind]
    x0, z = torch.randn(4, 6, generator=_g(0)), torch.randn(4, 6, generator=_g(1))
    sig_start = torch.tensor(float(ms.sigma_max) if kind == "flow" else 30.0)
    x_start = ms.noise_scaling(sig_start, z, torch.zeros_like(z), max_denoise=True)
    t = torch.tensor([0.1, 0.4, 0.7, 0.95]) * float(flow_time(ms, sig_start))
    sigma = sigma_from_flow_time(ms, t)
    torch.testing.assert_close(flow_time(ms, sigma), t)
    x = straight_path(x0, x_start, sigma, sig_start)
    pred = x0 + 0.1 * torch.randn(4, 6, generator=_g(2))
    # flow coordinates: x_f = x (flow) or x / (1 + sigma) (VP); velocity v = (x_f - x0) / t, constant on the path
    scale = 1.0 if kind == "flow" else 1.0 / (1.0 + sigma[:, None])
    xf = x * scale
    v_true, v_pred = (xf - x0) / t[:, None], (xf - pred) / t[:, None]
    torch.testing.assert_close(reflow_loss(pred, x0, t), ((v_pred - v_true) ** 2).mean(1).mean(), rtol=1e-4,
                               atol=1e-6)
    # the path: straight in sigma, x0 at 0, x_start at sigma_start
    torch.testing.assert_close(straight_path(x0, x_start, torch.zeros(4), sig_start), x0)
    torch.testing.assert_close(straight_path(x0, x_start, sig_start.expand(4), sig_start), x_start)
    v1 = (xf - x0) / t[:, None]
    half = sigma * 0.5
    xf2 = straight_path(x0, x_start, half, sig_start) * (1.0 if kind == "flow" else 1 / (1 + half[:, None]))
    t2 = flow_time(ms, half)
    torch.testing.assert_close((xf2 - x0) / t2[:, None], v1, rtol=1e-4, atol=1e-5)  # same velocity: straight


# --------------------------------------------------------------------------------------- guidance / misc
class _LabelNet(torch.nn.Module):
    model_sampling = EDM()

    def forward(self, x, sigma, class_labels=None):
        return 0.1 * x * torch.as_tensor(sigma).reshape(-1, 1) + class_labels.float().reshape(-1, 1)


def test_guided_denoise_per_sample_scales_and_agd_loss():
    net = _LabelNet()
    x, y, sigma = torch.randn(3, 2, generator=_g(0)), torch.tensor([1, 4, 7]), torch.tensor([0.5, 1.0, 2.0])
    w = torch.tensor([0.0, 1.0, 3.5])
    guided, cond, uncond = guided_denoise(net, x, sigma, w, null=10, return_parts=True, class_labels=y)
    for i in range(3):
        ref = CFGDenoiser(net, float(w[i]), null=10)(x[i: i + 1], sigma[i: i + 1], class_labels=y[i: i + 1])
        torch.testing.assert_close(guided[i: i + 1], ref)
    pred = torch.randn(3, 2, generator=_g(1))
    ref = ((pred - (uncond + w[:, None] * (cond - uncond))) ** 2).mean()
    torch.testing.assert_close(guidance_distillation_loss(pred, cond, uncond, w), ref)


@pytest.mark.parametrize("kind", ["vp", "flow", "edm"])
def test_sigma_at_fraction_spans_the_model_range(kind):
    ms = MS[kind]
    ends = sigma_at_fraction(ms, torch.tensor([0.0, 1.0]))
    assert float(ends[0]) == pytest.approx(float(ms.sigma_min), rel=1e-4)
    assert float(ends[1]) == pytest.approx(float(ms.sigma_max), rel=1e-4)
    mid = sigma_at_fraction(ms, torch.linspace(0, 1, 11))
    assert bool((mid[1:] > mid[:-1]).all())


@pytest.mark.parametrize("kind", ["vp", "flow", "edm"])
def test_fraction_at_sigma_inverts_sigma_at_fraction(kind):
    ms = MS[kind]
    for u in (0.0, 0.13, 0.5, 0.87, 1.0):
        assert fraction_at_sigma(ms, float(sigma_at_fraction(ms, torch.tensor(u)))) == pytest.approx(u, abs=1e-4)
