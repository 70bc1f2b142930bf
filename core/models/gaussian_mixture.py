"""Analytic denoiser for a Gaussian mixture: the exact ground truth for every sampler test.

For data ``x0 ~ sum_k pi_k N(mu_k, diag(s_k^2))`` and ``x = x0 + sigma * n``, the marginal at sigma is
``sum_k pi_k N(mu_k, diag(s_k^2 + sigma^2))`` and the ideal denoiser (Tweedie / posterior mean,
Karras et al. 2022 eq. 3 with the Gaussian closed form) is

    E[x0 | x] = sum_k r_k(x) (mu_k + s_k^2 / (s_k^2 + sigma^2) * (x - mu_k)),
    r_k(x) ∝ pi_k N(x; mu_k, diag(s_k^2 + sigma^2)).

Wrapped in any ``ModelSampling`` (VP, flow, EDM) the same exact denoiser is expressed in that
model's sigma space, so samplers are tested on all parameterisations.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .model_sampling import EDM, FlowMatching, ModelSampling


class GaussianMixture(nn.Module):
    """Diagonal Gaussian mixture in ``dim`` dimensions (samples are reshaped to ``shape``)."""

    def __init__(self, means: Tensor, stds: Tensor, weights: Tensor | None = None,
                 shape: tuple[int, ...] | None = None):
        super().__init__()
        means = torch.as_tensor(means, dtype=torch.float64)
        if means.ndim != 2:
            raise ValueError(f"means must be (K, D), got shape {tuple(means.shape)}")
        stds = torch.as_tensor(stds, dtype=torch.float64).expand_as(means).clone()
        if (stds <= 0).any():
            raise ValueError("mixture standard deviations must be > 0")
        k = means.shape[0]
        weights = torch.full((k,), 1.0 / k, dtype=torch.float64) if weights is None else torch.as_tensor(
            weights, dtype=torch.float64)
        if weights.shape != (k,) or (weights < 0).any():
            raise ValueError(f"weights must be {k} non-negative numbers")
        self.register_buffer("means", means)
        self.register_buffer("stds", stds)
        self.register_buffer("weights", weights / weights.sum())
        self.shape = tuple(shape) if shape is not None else (means.shape[1],)
        if math.prod(self.shape) != means.shape[1]:
            raise ValueError(f"shape {self.shape} does not hold {means.shape[1]} dimensions")

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        comp = torch.multinomial(self.weights.float(), n, replacement=True, generator=generator)
        noise = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        x = self.means[comp] + self.stds[comp] * noise
        return x.float().reshape(n, *self.shape)

    def posterior_mean(self, x: Tensor, sigma: Tensor) -> Tensor:
        """Exact ``E[x0 | x0 + sigma n = x]`` (module docstring), computed in float64."""
        b = x.shape[0]
        xf = x.reshape(b, -1).double()
        if xf.shape[1] != self.dim:
            raise ValueError(f"x has {xf.shape[1]} dimensions per sample, the mixture has {self.dim}")
        s2 = torch.as_tensor(sigma, dtype=torch.float64, device=x.device).reshape(-1, 1, 1) ** 2  # (B|1,1,1)
        var = self.stds[None] ** 2 + s2  # (B,K,D)
        diff = xf[:, None, :] - self.means[None]  # (B,K,D)
        logp = -0.5 * ((diff**2) / var + var.log()).sum(-1) + self.weights.log()[None]
        r = torch.softmax(logp, dim=1)  # (B,K)
        comp_mean = self.means[None] + (self.stds[None] ** 2 / var) * diff
        out = (r[..., None] * comp_mean).sum(1)
        return out.to(x.dtype).reshape(x.shape)


class GaussianMixtureDenoiser(nn.Module):
    """Exact denoiser of a ``GaussianMixture`` in the sigma space of ``model_sampling``.

    For VP/EDM models ``x = x0 + sigma n`` directly. For flow models ``x = (1-s) x0 + s n`` is the
    VE sample ``x / (1-s)`` at ``sigma_ve = s / (1-s)`` (Esser et al. 2024, sec. 2).
    ``calls`` counts forward calls (NFE) for tests and benchmarks.
    """

    def __init__(self, mixture: GaussianMixture, model_sampling: ModelSampling | None = None):
        super().__init__()
        self.mixture = mixture
        self.model_sampling = model_sampling or EDM(sigma_min=0.002, sigma_max=80.0)
        self.calls = 0

    def forward(self, x: Tensor, sigma: Tensor | float, **cond) -> Tensor:
        self.calls += 1
        sigma = torch.as_tensor(sigma, dtype=torch.float64, device=x.device).reshape(-1)
        if isinstance(self.model_sampling, FlowMatching):
            s = sigma.clamp(max=1 - 1e-7)
            scale = (1 - s).reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype)
            return self.mixture.posterior_mean(x / scale, s / (1 - s))
        return self.mixture.posterior_mean(x, sigma)


def toy_mixture(dim: int = 2, components: int = 8, seed: int = 0, spread: float = 3.0, std: float = 0.3,
                shape: tuple[int, ...] | None = None) -> GaussianMixture:
    """A seeded mixture: ``components`` well-separated modes with random centres and weights."""
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(components, dim, generator=g, dtype=torch.float64) * spread / math.sqrt(max(dim / 2, 1))
    if dim == 2:  # a ring is the classic 2D toy: modes clearly separated
        ang = torch.arange(components, dtype=torch.float64) * 2 * math.pi / components
        means = torch.stack([ang.cos(), ang.sin()], 1) * spread
    weights = 0.5 + torch.rand(components, generator=g, dtype=torch.float64)
    return GaussianMixture(means, torch.full_like(means, std), weights, shape=shape)
