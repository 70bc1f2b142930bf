"""Classifier-free guidance: the one convention fewstep uses, and conversions from the others.

fewstep's guidance scale ``w`` always means (Ho & Salimans 2022, eq. 6, written on x0):

    D_w(x, sigma, c) = D(x, sigma, null) + w * (D(x, sigma, c) - D(x, sigma, null))

so ``w = 1`` is the plain conditional model and ``w = 0`` the unconditional one. Other papers write it with an
offset; convert at the boundary with the functions below:

- LCM (Luo et al. 2023, eq. 10) and its ``w`` embedding use ``omega = w - 1``:
  ``eps = eps_c + omega (eps_c - eps_u)``.
- DMD2's code (``sd_guidance.py``) uses the same form as fewstep for its real score, while the original
  CFG paper (Ho & Salimans 2022, eq. 6) writes ``(1 + w_paper) eps_c - w_paper eps_u``, i.e. ``w = w_paper + 1``.

Guidance is linear, so guiding x0 is the same as guiding eps or v at the same sigma (all are affine in the
network output with the same coefficients).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn


def cfg_combine(cond: Tensor, uncond: Tensor, scale: float | Tensor) -> Tensor:
    """``uncond + scale * (cond - uncond)``, broadcasting a per-sample scale over the batch."""
    scale = torch.as_tensor(scale, dtype=cond.dtype, device=cond.device)
    if scale.ndim == 1:
        scale = scale.reshape(-1, *([1] * (cond.ndim - 1)))
    return uncond + scale * (cond - uncond)


def from_lcm_omega(omega: float) -> float:
    """LCM's ``omega`` (eps_c + omega (eps_c - eps_u)) -> fewstep's ``w``."""
    return omega + 1.0


def to_lcm_omega(w: float) -> float:
    """fewstep's ``w`` -> LCM's ``omega`` (what LCM's guidance embedding is fed)."""
    return w - 1.0


def from_paper_cfg(w_paper: float) -> float:
    """Ho & Salimans' ``(1 + w) eps_c - w eps_u`` -> fewstep's ``w`` (= w_paper + 1)."""
    return w_paper + 1.0


class CFGDenoiser(nn.Module):
    """A denoiser that applies classifier-free guidance with one batched forward (cond and uncond stacked).

    ``cond_key`` names the conditioning argument (``class_labels`` for the digits models); ``null`` is the value
    that makes the model unconditional (the null class id, or a tensor such as empty text embeddings).
    ``scale == 1`` skips the unconditional half (one pass instead of two).
    """

    def __init__(self, denoiser: nn.Module, scale: float, cond_key: str = "class_labels", null: Any = 10):
        super().__init__()
        from ..checks import CFG_RANGE, check_scale

        check_scale(scale, CFG_RANGE, "CFG scale", "the usual CFG range (1 = no guidance)")
        self.denoiser = denoiser
        self.model_sampling = denoiser.model_sampling
        self.scale = float(scale)
        self.cond_key, self.null = cond_key, null

    def forward(self, x: Tensor, sigma: Tensor, **cond: Any) -> Tensor:
        if self.cond_key not in cond:
            raise ValueError(f"CFG needs the condition '{self.cond_key}' in the sampler's extra_args")
        if self.scale == 1.0:
            return self.denoiser(x, sigma, **cond)
        c = cond.pop(self.cond_key)
        c = torch.as_tensor(c, device=x.device) if not isinstance(c, Tensor) else c
        if c.ndim == 0:
            c = c.expand(x.shape[0])
        null = torch.as_tensor(self.null, device=x.device, dtype=c.dtype)
        null = null.expand_as(c) if null.ndim == 0 else null.expand(c.shape[0], *null.shape[1:])
        sigma = torch.as_tensor(sigma, device=x.device, dtype=torch.float32).reshape(-1).expand(x.shape[0])
        out = self.denoiser(torch.cat([x, x]), torch.cat([sigma, sigma]), **{self.cond_key: torch.cat([c, null])},
                            **cond)
        cond_out, uncond_out = out.chunk(2)
        return cfg_combine(cond_out, uncond_out, self.scale)
