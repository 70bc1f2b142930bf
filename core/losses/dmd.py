"""Distribution matching distillation: DMD / DMD2 generator and critic losses, GAN head losses, f-divergence weights.

DMD (Yin et al. 2024, "One-step Diffusion with Distribution Matching Distillation", eq. 7) trains a generator
``G`` so that its output distribution matches the teacher's: the gradient of ``KL(p_fake || p_real)`` is
``-(s_real(x_t) - s_fake(x_t)) dG/dtheta`` at generator samples re-noised to a random ``t``, where ``s_real`` is the
teacher's score and ``s_fake`` the score of a critic ("fake score") that keeps fitting the generator's own
samples. With denoisers, ``s(x_t) ∝ D(x_t) - x_t``, so the direction is ``D_fake(x_t) - D_real(x_t)``, normalised per
sample by ``mean |x - D_real(x_t)|`` (DMD eq. 8). DMD2 (Yin et al. 2024, "Improved Distribution Matching
Distillation for Fast Image Synthesis", sec. 4, Alg. 1, and its ``sd_guidance.py``) drops the regression loss,
updates the critic several times per generator update, and adds a GAN classifier on the critic's features
(sec. 4.3, non-saturating losses).

f-distill (Xu et al. 2025, "One-step Diffusion Models with f-Divergence Distribution Matching", eq. 8 and Table 1)
generalises the reverse KL: the score difference is weighted per sample by ``h(r) = r^2 f''(r)`` with the density
ratio ``r = p_real / p_fake`` estimated from the GAN discriminator's logit (``r = exp(logit)``), normalised over
the batch. Reverse KL has ``h = 1`` (plain DMD), forward KL ``h = r``, Jensen-Shannon ``h = r / (1 + r)``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from .common import per_sample_mean, weighted_mean

DIVERGENCES = ("reverse_kl", "forward_kl", "js")


def dmd_gradient(x0: Tensor, real_x0: Tensor, fake_x0: Tensor, weights: Tensor | None = None) -> Tensor:
    """The normalised DMD gradient w.r.t. the generator output ``x0`` (DMD eq. 7-8, DMD2 ``sd_guidance.py``):

    ``grad = (p_real - p_fake) / mean|p_real|`` with ``p_real = x0 - D_real(x_t)``, ``p_fake = x0 - D_fake(x_t)``,
    i.e. ``(D_fake - D_real) / mean|x0 - D_real|`` per sample; optional per-sample ``weights`` (f-divergence).
    NaNs (a zero normaliser) become 0. No gradient flows through the result.
    """
    with torch.no_grad():
        x0, real_x0, fake_x0 = x0.detach().float(), real_x0.detach().float(), fake_x0.detach().float()
        p_real = x0 - real_x0
        p_fake = x0 - fake_x0
        dims = tuple(range(1, x0.ndim))
        grad = (p_real - p_fake) / p_real.abs().mean(dim=dims, keepdim=True)
        if weights is not None:
            grad = grad * weights.detach().float().reshape((-1,) + (1,) * (x0.ndim - 1))
        return torch.nan_to_num(grad)


def dmd_loss(x0: Tensor, real_x0: Tensor, fake_x0: Tensor, weights: Tensor | None = None) -> Tensor:
    """DMD2 generator loss ``0.5 * mse(x0, stopgrad(x0 - grad))`` (``sd_guidance.compute_distribution_matching_loss``):
    its gradient w.r.t. ``x0`` is ``dmd_gradient / numel``. ``x0`` must carry the generator's graph."""
    grad = dmd_gradient(x0, real_x0, fake_x0, weights)
    target = (x0.detach().float() - grad).detach()
    return 0.5 * F.mse_loss(x0.float(), target, reduction="mean")


def decoupled_dmd_gradient(x0: Tensor, cond_x0: Tensor, uncond_x0: Tensor, fake_x0: Tensor, guidance_scale: float,
                           ca_weight: float = 1.0, dm_weight: float = 1.0) -> Tensor:
    """Decoupled DMD (Liu et al. 2025, "Decoupled DMD: CFG Augmentation as the Spear, Distribution Matching as the
    Shield", eq. 5-6; the recipe behind Z-Image-Turbo): with the guided real score
    ``D_w = D_c + (w - 1)(D_c - D_u)`` the DMD direction ``D_fake - D_w`` splits into a distribution-matching term
    ``D_fake - D_c`` and a CFG-augmentation term ``-(w - 1)(D_c - D_u)``, weighted separately:

    ``grad = (dm_weight (D_fake - D_c) - ca_weight (w - 1)(D_c - D_u)) / mean|x0 - D_w|``

    (normalised per sample as ``dmd_gradient``). ``ca_weight = dm_weight = 1`` is ``dmd_gradient`` with ``D_w``.
    No gradient flows through the result."""
    with torch.no_grad():
        x0, c, u, f = (t.detach().float() for t in (x0, cond_x0, uncond_x0, fake_x0))
        guided = c + (guidance_scale - 1.0) * (c - u)
        dims = tuple(range(1, x0.ndim))
        direction = dm_weight * (f - c) - ca_weight * (guidance_scale - 1.0) * (c - u)
        return torch.nan_to_num(direction / (x0 - guided).abs().mean(dim=dims, keepdim=True))


def decoupled_dmd_loss(x0: Tensor, cond_x0: Tensor, uncond_x0: Tensor, fake_x0: Tensor, guidance_scale: float,
                       ca_weight: float = 1.0, dm_weight: float = 1.0) -> Tensor:
    """``0.5 * mse(x0, stopgrad(x0 - decoupled_dmd_gradient))``: its gradient w.r.t. ``x0`` is the decoupled
    direction divided by ``numel`` (as ``dmd_loss``)."""
    grad = decoupled_dmd_gradient(x0, cond_x0, uncond_x0, fake_x0, guidance_scale, ca_weight, dm_weight)
    return 0.5 * F.mse_loss(x0.float(), (x0.detach().float() - grad).detach(), reduction="mean")


def regression_loss(x0: Tensor, target: Tensor, weights: Tensor | None = None) -> Tensor:
    """DMD's regression loss (Yin et al. 2024, DMD eq. 9) on teacher ODE pairs: the generator's output for a noise
    ``z`` against the teacher's deterministic-sampler endpoint from the same ``z``, here as the mean squared
    error per sample (DMD uses LPIPS), batch mean optionally weighted per sample (not renormalised). It
    anchors the generator to the teacher's noise-to-image map, so it cannot put every noise of a class
    onto one image."""
    return weighted_mean(per_sample_mean((x0.float() - target.detach().float()) ** 2), weights)


def fake_score_loss(pred: Tensor, target: Tensor, weights: Tensor | None = None) -> Tensor:
    """Critic ("fake score") denoising loss on generator samples (DMD eq. 6, DMD2 Alg. 1 line 11): mean squared
    error between the critic's prediction and the target in one parameterisation (x0, or the teacher's native
    eps/v output), optionally weighted per sample. The generator samples must be detached by the caller."""
    return weighted_mean(per_sample_mean((pred.float() - target.float()) ** 2), weights)


def gan_generator_loss(fake_logits: Tensor) -> Tensor:
    """Non-saturating generator loss ``E[softplus(-D(G(z)))]`` (Goodfellow et al. 2014, sec. 3; DMD2 sec. 4.3)."""
    return F.softplus(-fake_logits.float()).mean()


def gan_discriminator_loss(real_logits: Tensor, fake_logits: Tensor) -> Tensor:
    """Discriminator loss ``E[softplus(-D(x))] + E[softplus(D(G(z)))]`` (logistic loss; DMD2 sec. 4.3)."""
    return F.softplus(-real_logits.float()).mean() + F.softplus(fake_logits.float()).mean()


def f_divergence_weight(log_ratio: Tensor, divergence: str = "reverse_kl") -> Tensor:
    """Unnormalised f-distill weight ``h(r) = r^2 f''(r)`` at ``r = exp(log_ratio)`` (f-distill Table 1):
    ``reverse_kl`` (``f = -log r``) -> 1, ``forward_kl`` (``f = r log r``) -> ``r``,
    ``js`` (``f = r log r - (1 + r) log((1 + r) / 2)``) -> ``r / (1 + r)``."""
    lr = log_ratio.detach().float()
    if divergence == "reverse_kl":
        return torch.ones_like(lr)
    if divergence == "forward_kl":
        return lr.clamp(max=50.0).exp()
    if divergence == "js":
        return torch.sigmoid(lr)  # r / (1 + r)
    raise ValueError(f"unknown divergence {divergence!r}; choose one of {DIVERGENCES}")


def f_divergence_weights(log_ratio: Tensor, divergence: str = "reverse_kl",
                         batch_mean: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """Per-sample f-divergence weights normalised to mean 1 over the batch (f-distill sec. 4.2), detached.

    ``log_ratio`` is the discriminator logit (``log p_real/p_fake`` at the optimum of the logistic loss).
    ``batch_mean`` computes the batch mean (pass an all-reduce mean under data parallelism so every process
    normalises by the global batch).
    """
    h = f_divergence_weight(log_ratio, divergence).reshape(-1)
    mean = batch_mean(h.mean()) if batch_mean is not None else h.mean()
    return (h / mean.clamp(min=1e-12)).detach()


def subinterval_transition(a_s: Tensor, s_s: Tensor, a_t: Tensor, s_t: Tensor) -> tuple[Tensor, Tensor]:
    """Forward kernel from noise level ``s`` to a higher level ``t`` of ``x = a x0 + s n``: ``x_t = k x_s + b n'``
    with ``k = a_t / a_s`` and ``b = sqrt(s_t^2 - k^2 s_s^2)`` (the Markov property of Gaussian diffusion that Phased
    DMD, Fan et al. 2025, sec. 3, builds its subintervals on). Returns ``(k, b)``."""
    k = a_t / a_s
    return k, (s_t**2 - (k * s_s) ** 2).clamp(min=0.0).sqrt()


def subinterval_denoising_target(x_t: Tensor, x_s: Tensor, a_s: Tensor, s_s: Tensor, a_t: Tensor,
                                 s_t: Tensor) -> Tensor:
    """Denoiser target for score matching within a subinterval (Phased DMD, Fan et al. 2025, "Few-step Distribution
    Matching Distillation via Score Matching within Subintervals", sec. 3.2): the fake score of a phase whose
    generator outputs noisy samples ``x_s`` (level ``s``, not clean images) is trained at levels ``t > s`` on
    ``x_t = k x_s + b n'`` (``subinterval_transition``). Denoising score matching with ``x_s`` as the data gives the
    conditional score ``-(x_t - k x_s) / b^2``, whose conditional mean given ``x_t`` is the marginal score of
    ``p_t``; with ``score = (a_t D - x_t) / s_t^2`` the denoiser regression target is

    ``D* = (x_t - s_t^2 (x_t - k x_s) / b^2) / a_t``

    (``s = 0``, i.e. ``a_s = 1``, ``s_s = 0``, gives ``D* = x0``, the ordinary DMD critic target). The ``a``/``s``
    tensors broadcast against the samples (shape ``(N, 1, ...)``)."""
    k, b = subinterval_transition(a_s, s_s, a_t, s_t)
    return (x_t - s_t**2 * (x_t - k * x_s) / b**2) / a_t
