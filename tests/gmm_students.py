"""Tiny 2-D students of the exact Gaussian-mixture teacher, trained with fewstep's losses (shared by
``test_mode_coverage.py``). Every method trains in a few seconds of one CPU thread.

The teacher is ``GaussianMixtureDenoiser`` (the exact posterior mean) of an 8-mode ring in EDM sigma space; a
student covers the mixture when every mode receives samples in proportion to its weight.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from fewstep.core.losses.common import ddim_transfer
from fewstep.core.losses.consistency import consistency_loss
from fewstep.core.losses.dmd import (
    dmd_loss,
    fake_score_loss,
    gan_discriminator_loss,
    gan_generator_loss,
    regression_loss,
)
from fewstep.core.losses.reflow import reflow_loss, straight_path
from fewstep.core.models.gaussian_mixture import GaussianMixtureDenoiser, toy_mixture
from fewstep.core.models.model_sampling import EDM

SIGMA_MIN, SIGMA_MAX, SIGMA_DATA = 0.002, 80.0, 3.0


def teacher() -> GaussianMixtureDenoiser:
    return GaussianMixtureDenoiser(toy_mixture(dim=2, components=8, std=0.3, spread=3.0),
                                   EDM(SIGMA_MIN, SIGMA_MAX, sigma_data=SIGMA_DATA))


def mlp(n_in: int, n_out: int, hidden: int = 128, depth: int = 3) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(depth):
        layers += [nn.Linear(n_in if i == 0 else hidden, hidden), nn.SiLU()]
    return nn.Sequential(*layers, nn.Linear(hidden, n_out))


class EDMNet(nn.Module):
    """A 2-D denoiser ``D(x, sigma)`` with EDM preconditioning (Karras et al. 2022, Table 1); ``features`` holds
    the last hidden layer of the latest call (for a GAN head, as DMD2 puts one on its fake score)."""

    def __init__(self, hidden: int = 128):
        super().__init__()
        self.body = mlp(3, hidden, hidden, depth=2)
        self.out = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2))
        self.features: Tensor | None = None

    def forward(self, x: Tensor, sigma: Tensor) -> Tensor:
        s = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1, 1).expand(len(x), 1)
        sd2 = SIGMA_DATA**2
        c_in, c_skip = 1 / (s**2 + sd2).sqrt(), sd2 / (s**2 + sd2)
        c_out = s * SIGMA_DATA / (s**2 + sd2).sqrt()
        self.features = self.body(torch.cat([c_in * x, s.log() / 4], 1))
        return c_skip * x + c_out * self.out(self.features)


def edm_weight(sigma: Tensor) -> Tensor:
    """EDM's loss weight ``(sigma^2 + sigma_data^2) / (sigma sigma_data)^2``: unit weight per network output."""
    return (sigma**2 + SIGMA_DATA**2) / (sigma * SIGMA_DATA) ** 2


def log_uniform_sigma(n: int, lo: float = SIGMA_MIN, hi: float = SIGMA_MAX) -> Tensor:
    return torch.exp(math.log(lo) + (math.log(hi) - math.log(lo)) * torch.rand(n))


@torch.no_grad()
def ode_pairs(den: GaussianMixtureDenoiser, n: int, steps: int = 40) -> tuple[Tensor, Tensor]:
    """``(z, x0)``: unit noises and the teacher's probability-flow ODE endpoints from ``z * sigma_max`` (Heun,
    Karras schedule: the pairs of reflow and DMD's regression loss)."""
    from fewstep.core.sampling.samplers import get_sampler
    from fewstep.core.sampling.schedules import get_sigmas

    z = torch.randn(n, 2)
    sigmas = get_sigmas("karras", den.model_sampling, steps)
    x0 = get_sampler("heun")(den, z * sigmas[0], sigmas, disable=True)
    return z, x0


def mode_fractions(samples: Tensor, den: GaussianMixtureDenoiser) -> tuple[Tensor, float]:
    """Fraction of samples nearest to each mode, and the fraction within 4 standard deviations of their mode."""
    means, std = den.mixture.means.float(), float(den.mixture.stds[0, 0])
    d = torch.cdist(samples.float(), means)
    near, idx = d.min(1)
    frac = torch.bincount(idx, minlength=len(means)).float() / len(samples)
    return frac, float((near < 4 * std).float().mean())


def covers_all_modes(samples: Tensor, den: GaussianMixtureDenoiser, min_share: float = 0.3,
                     min_precision: float = 0.7) -> tuple[bool, str]:
    """Every mode receives at least ``min_share`` of its weight, and ``min_precision`` of the samples lie near a
    mode. Returns ``(ok, description)``."""
    frac, prec = mode_fractions(samples, den)
    w = den.mixture.weights.float()
    ok = bool((frac >= min_share * w).all()) and prec >= min_precision
    return ok, f"mode shares {[round(v, 3) for v in frac.tolist()]} vs weights " \
               f"{[round(v, 3) for v in w.tolist()]}, near a mode {prec:.2f}"


class Generator(nn.Module):
    """One-step generator ``z -> x0`` (an MLP with a skip ``sigma_data * z``: it starts spread out, as a generator
    initialised from a reflow student does)."""

    def __init__(self, hidden: int = 128, skip: float = SIGMA_DATA):
        super().__init__()
        self.net = mlp(2, 2, hidden)
        self.skip = skip

    def forward(self, z: Tensor) -> Tensor:
        return self.skip * z + self.net(z)


def train_dmd(gan_weight: float = 0.0, regression_weight: float = 0.0, steps: int = 400, critic_ratio: int = 3,
              batch: int = 128, seed: int = 0, collapsed_start: bool = False) -> tuple[Generator, dict]:
    """DMD / DMD2 on the mixture: exact real score, learned fake score (``EDMNet``), optional GAN head on the
    fake score's features and optional regression on ODE pairs. ``collapsed_start``: the generator starts at
    one point (every noise -> the same x0), the hardest case for distribution matching."""
    torch.manual_seed(seed)
    den = teacher()
    gen, fake = Generator(64), EDMNet(64)
    if collapsed_start:  # every noise -> (nearly) the origin: the last layer and the skip start at zero
        with torch.no_grad():
            gen.net[-1].weight.zero_()
            gen.net[-1].bias.zero_()
        gen.skip = 0.01
    head = nn.Sequential(nn.SiLU(), nn.Linear(64, 1))
    opt_g = torch.optim.AdamW(gen.parameters(), lr=1e-3, betas=(0.9, 0.999), weight_decay=0.0)
    opt_c = torch.optim.AdamW(list(fake.parameters()) + list(head.parameters()), lr=1e-3, betas=(0.9, 0.999))
    pairs = ode_pairs(den, 2048) if regression_weight > 0 else None
    logs: dict[str, list[float]] = {"gan_d": [], "dmd": []}

    def gan_logits(x0: Tensor) -> Tensor:
        sig = log_uniform_sigma(len(x0), SIGMA_MIN, 0.5)  # low noise levels: the GAN looks at the clean layout
        fake(x0 + sig[:, None] * torch.randn_like(x0), sig)
        return head(fake.features).squeeze(-1)

    for _ in range(steps):
        for _ in range(critic_ratio):
            with torch.no_grad():
                x0 = gen(torch.randn(batch, 2))
            sig = log_uniform_sigma(batch)
            x_t = x0 + sig[:, None] * torch.randn_like(x0)
            loss_c = fake_score_loss(fake(x_t, sig), x0, edm_weight(sig))
            if gan_weight > 0:
                real = den.mixture.sample(batch)
                d = gan_discriminator_loss(gan_logits(real), gan_logits(x0))
                logs["gan_d"].append(float(d.detach()))
                loss_c = loss_c + d
            opt_c.zero_grad()
            loss_c.backward()
            opt_c.step()
        x0 = gen(torch.randn(batch, 2))
        sig = log_uniform_sigma(batch, 0.02, SIGMA_MAX)
        x_t = x0 + sig[:, None] * torch.randn_like(x0)
        with torch.no_grad():
            real_x0, fake_x0 = den(x_t.detach(), sig).float(), fake(x_t.detach(), sig)
        loss = dmd_loss(x0, real_x0, fake_x0)
        logs["dmd"].append(float(loss.detach()))
        if gan_weight > 0:
            for p in list(fake.parameters()) + list(head.parameters()):
                p.requires_grad_(False)
            loss = loss + gan_weight * gan_generator_loss(gan_logits(x0))
            for p in list(fake.parameters()) + list(head.parameters()):
                p.requires_grad_(True)
        if pairs is not None:
            idx = torch.randint(0, len(pairs[0]), (batch,))
            loss = loss + regression_weight * regression_loss(gen(pairs[0][idx]), pairs[1][idx])
        opt_g.zero_grad()
        loss.backward()
        opt_g.step()
    return gen, logs


def train_consistency(steps: int = 4000, batch: int = 128, grid: int = 12, ema: float = 0.95,
                      seed: int = 0) -> EDMNet:
    """Consistency distillation (Song et al. 2023, Alg. 2) with ``consistency_loss`` at segment end 0: the exact
    teacher's Heun step between neighbouring Karras grid points, an EMA target network."""
    import copy

    from fewstep.core.sampling.schedules import get_sigmas

    torch.manual_seed(seed)
    den = teacher()
    ms = den.model_sampling
    sig_grid = get_sigmas("karras", ms, grid).flip(0)  # ascending: 0, sigma_min, ..., sigma_max
    student = EDMNet(64)
    target = copy.deepcopy(student).requires_grad_(False)
    opt = torch.optim.Adam(student.parameters(), lr=1e-3)
    for _ in range(steps):
        x0 = den.mixture.sample(batch)
        i = torch.randint(2, len(sig_grid), (batch,))
        s_t, s_s = sig_grid[i], sig_grid[i - 1]
        x_t = x0 + s_t[:, None] * torch.randn_like(x0)
        with torch.no_grad():  # the teacher's Heun step from s_t to s_s (Karras et al. 2022, Alg. 1)
            d_t = den(x_t, s_t).float()
            x_e = ddim_transfer(ms, x_t, d_t, s_t, s_s)
            x_s = ddim_transfer(ms, x_t, 0.5 * (d_t + den(x_e, s_s).float()), s_t, s_s)
            tgt = target(x_s, s_s)
        loss = consistency_loss(ms, x_t, s_t, student(x_t, s_t), x_s, s_s, tgt, torch.zeros(batch), distance="l2")
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            for pt, ps in zip(target.parameters(), student.parameters()):
                pt.lerp_(ps, 1 - ema)
    return student


def train_reflow(steps: int = 1500, batch: int = 128, seed: int = 0) -> nn.Module:
    """Rectified flow (Liu et al. 2023) on the teacher's ODE pairs with ``reflow_loss``: an x0 predictor trained on
    the straight line from the teacher's endpoint (``t = 0``) to its start ``sigma_max z`` (``t = 1``), at
    ``sigma = t sigma_max``; one step is ``D(sigma_max z, sigma_max)``."""
    torch.manual_seed(seed)
    den = teacher()
    z, x_end = ode_pairs(den, 2048, steps=24)
    student = EDMNet(64)
    opt = torch.optim.Adam(student.parameters(), lr=1e-3)
    for _ in range(steps):
        idx = torch.randint(0, len(z), (batch,))
        t = torch.rand(batch).clamp(min=1e-3)
        x_t = straight_path(x_end[idx], SIGMA_MAX * z[idx], t * SIGMA_MAX, SIGMA_MAX)
        loss = reflow_loss(student(x_t, t * SIGMA_MAX), x_end[idx], t)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return student
