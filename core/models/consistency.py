"""Consistency-model boundary condition (Song et al. 2023, Consistency Models, eq. 7; LCM, Luo et al. 2023, eq. 9).

``f(x, t) = c_skip(t) x + c_out(t) F(x, t)`` with ``c_skip = sd^2 / ((s t)^2 + sd^2)`` and
``c_out = s t / sqrt((s t)^2 + sd^2)``, where ``t`` is the discrete timestep, ``s`` the timestep scaling (10 in
LCM) and ``sd = 0.5``. It makes ``f(x, 0) = x`` exactly. LCM checkpoints expect it around their x0 prediction.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .model_sampling import broadcast_sigma


def lcm_boundary_scalings(timestep: Tensor, sigma_data: float = 0.5, timestep_scaling: float = 10.0
                          ) -> tuple[Tensor, Tensor]:
    """``(c_skip, c_out)`` of LCM's discrete boundary condition at model ``timestep``."""
    scaled = torch.as_tensor(timestep, dtype=torch.float32) * timestep_scaling
    c_skip = sigma_data**2 / (scaled**2 + sigma_data**2)
    c_out = scaled / (scaled**2 + sigma_data**2) ** 0.5
    return c_skip, c_out


class ConsistencyBoundary(nn.Module):
    """Wrap a denoiser so its x0 obeys LCM's boundary condition: ``c_out x0 + c_skip x_in`` where ``x_in`` is the
    network input (the VP-scaled sample, exactly as diffusers' ``LCMScheduler``)."""

    def __init__(self, denoiser: nn.Module, sigma_data: float = 0.5, timestep_scaling: float = 10.0):
        super().__init__()
        self.denoiser = denoiser
        self.model_sampling = denoiser.model_sampling
        self.sigma_data, self.timestep_scaling = sigma_data, timestep_scaling

    def forward(self, x: Tensor, sigma: Tensor, **cond: Any) -> Tensor:
        ms = self.model_sampling
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1).expand(x.shape[0])
        c_skip, c_out = lcm_boundary_scalings(ms.timestep(sigma).round(), self.sigma_data, self.timestep_scaling)
        x0 = self.denoiser(x, sigma, **cond)
        return broadcast_sigma(c_out, x) * x0 + broadcast_sigma(c_skip, x) * ms.calculate_input(sigma, x)
