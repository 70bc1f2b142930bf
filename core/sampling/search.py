"""Per-model step-schedule search: pick the sigmas that best follow a fine-step reference trajectory.

1. Reference: integrate the probability-flow ODE from a batch of noise with a fine Heun solver and record
   the states ``x_ref(sigma_g)`` on a log-spaced candidate grid ``sigma_g`` (plus sigma = 0).
2. Dynamic programming (Watson et al. 2021, "Learning to Efficiently Sample from Diffusion Probabilistic
   Models", sec. 3; in the spirit of BOSS / AutoDiffusion): the cost of a step ``j -> k`` is the RMS distance
   between one solver step started on the reference ``x_ref(sigma_j)`` and ``x_ref(sigma_k)``; the schedule
   with ``n`` steps minimising the summed local error is found exactly in ``O(n M^2)`` on the grid.
3. Optional refinement: coordinate descent on the interior log-sigmas minimising the *global* error of the
   actual sampler (any name in ``SAMPLERS``) to the reference end point.

Only ``M`` (Euler) or ``M^2/2`` (Heun) batched model evaluations are spent on the DP.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from ..models.denoiser import get_model_sampling
from .registry import NFE
from .samplers import get_sampler
from .schedules import append_zero, check_sigmas, karras


def _log_grid(sigma_max: float, sigma_min: float, m: int) -> Tensor:
    return torch.linspace(math.log(sigma_max), math.log(sigma_min), m, dtype=torch.float64).exp().float()


@torch.no_grad()
def fine_solution(model, x: Tensor, sigmas: Tensor, substeps: int = 8, extra_args: dict | None = None) -> list[Tensor]:
    """States of the probability-flow ODE at each of ``sigmas`` (first entry: ``x``), integrated with
    ``substeps`` Heun steps per interval (exponentially spaced); the final step to 0 is the denoiser's x0."""
    extra_args = extra_args or {}
    s_in = x.new_ones([x.shape[0]])
    states = [x]
    for i in range(len(sigmas) - 1):
        s0, s1 = float(sigmas[i]), float(sigmas[i + 1])
        if s1 == 0:
            x = model(x, s0 * s_in, **extra_args)
        else:
            sub = torch.linspace(math.log(s0), math.log(s1), substeps + 1, dtype=torch.float64).exp()
            for a, b in zip(sub[:-1].tolist(), sub[1:].tolist()):
                d = (x - model(x, a * s_in, **extra_args)) / a
                x2 = x + d * (b - a)
                d2 = (x2 - model(x2, b * s_in, **extra_args)) / b
                x = x + (d + d2) / 2 * (b - a)
        states.append(x)
    return states


def _rms(a: Tensor, b: Tensor) -> float:
    return float(((a - b).double() ** 2).mean().sqrt())


@torch.no_grad()
def search_schedule(
    model,
    x: Tensor,
    nfe: int,
    sampler: str = "euler",
    grid_size: int = 40,
    sigma_min: float | None = None,
    sigma_max: float | None = None,
    substeps: int = 8,
    refine_rounds: int = 2,
    extra_args: dict | None = None,
    return_info: bool = False,
) -> Tensor | tuple[Tensor, dict[str, Any]]:
    """Search a sigma schedule for ``model`` spending ``nfe`` evaluations with ``sampler``.

    Args:
        model: a denoiser (``core.models.Denoiser`` or a ComfyUI model).
        x: a batch of starting samples at ``sigma_max`` (e.g. ``noise * sigma_max`` for VP models, ``noise``
            for flow models). More samples make the schedule generalise better; 16-64 is typical.
        nfe: model evaluations budget.
        sampler: the sampler the schedule is for; the DP uses its one-step rule for euler/heun and Euler's
            for multistep samplers, the refinement always uses the sampler itself.
        grid_size: number of candidate sigmas (log-spaced between sigma_max and sigma_min).
        refine_rounds: rounds of coordinate descent on the global error (0 disables).
    Returns:
        sigmas (``n + 1`` entries ending in 0), and a dict with the DP and refined errors if ``return_info``.
    """
    ms = get_model_sampling(model)
    sigma_min = float(sigma_min if sigma_min is not None else ms.sigma_min)
    sigma_max = float(sigma_max if sigma_max is not None else ms.sigma_max)
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
    steps = _steps_for_nfe(sampler, nfe)
    if grid_size < steps + 1:
        raise ValueError(f"grid_size={grid_size} is too small for {steps} steps; use at least {steps + 1}")
    extra_args = extra_args or {}
    grid = append_zero(_log_grid(sigma_max, sigma_min, grid_size))  # M+1 points, last is 0
    ref = fine_solution(model, x, grid, substeps=substeps, extra_args=extra_args)
    m = len(grid)
    s_in = x.new_ones([x.shape[0]])

    # local cost matrix c[j, k] for j < k
    cost = torch.full((m, m), float("inf"), dtype=torch.float64)
    den = [model(ref[j], float(grid[j]) * s_in, **extra_args) for j in range(m - 1)]
    for j in range(m - 1):
        d = (ref[j] - den[j]) / grid[j]
        for k in range(j + 1, m):
            if grid[k] == 0 or sampler != "heun":
                x_next = den[j] if grid[k] == 0 else ref[j] + d * (grid[k] - grid[j])
            else:
                x2 = ref[j] + d * (grid[k] - grid[j])
                d2 = (x2 - model(x2, float(grid[k]) * s_in, **extra_args)) / grid[k]
                x_next = ref[j] + (d + d2) / 2 * (grid[k] - grid[j])
            cost[j, k] = _rms(x_next, ref[k])

    # DP: best[n, k] = min_j best[n-1, j] + cost[j, k]
    best = torch.full((steps + 1, m), float("inf"), dtype=torch.float64)
    arg = torch.zeros((steps + 1, m), dtype=torch.long)
    best[0, 0] = 0.0
    for n in range(1, steps + 1):
        tot = best[n - 1][:, None] + cost  # (j, k)
        best[n], arg[n] = tot.min(dim=0)
    path = [m - 1]
    for n in range(steps, 0, -1):
        path.append(int(arg[n, path[-1]]))
    path = path[::-1]
    sigmas = grid[path].clone()
    check_sigmas(sigmas)

    run = get_sampler(sampler)
    target = ref[-1]

    def global_error(sig: Tensor) -> float:
        return _rms(run(model, x, sig, extra_args=extra_args, disable=True), target)

    info: dict[str, Any] = {"steps": steps, "dp_local_cost": float(best[steps, m - 1])}
    err = global_error(sigmas)
    info["dp_error"] = err
    # start from the best of DP and karras, then refine the interior log-sigmas
    kar = karras(steps, sigma_min, sigma_max)
    kerr = global_error(kar)
    if kerr < err:
        sigmas, err = kar, kerr
    for _ in range(refine_rounds):
        improved = False
        for i in range(1, len(sigmas) - 1):
            if sigmas[i + 1] == 0 and i == len(sigmas) - 2:
                lo, hi = math.log(sigma_min), math.log(float(sigmas[i - 1]))
            else:
                lo, hi = math.log(float(sigmas[i + 1])), math.log(float(sigmas[i - 1]))
            cur = math.log(float(sigmas[i]))
            for frac in (0.25, 0.5, 0.75):
                for cand in (cur + (lo - cur) * frac, cur + (hi - cur) * frac):
                    trial = sigmas.clone()
                    trial[i] = math.exp(cand)
                    if (trial[1:] >= trial[:-1]).any():
                        continue
                    e = global_error(trial)
                    if e < err:
                        sigmas, err, cur, improved = trial, e, cand, True
        if not improved:
            break
    info["error"] = err
    return (sigmas, info) if return_info else sigmas


def _steps_for_nfe(sampler: str, nfe: int) -> int:
    if nfe < 1:
        raise ValueError(f"nfe must be >= 1, got {nfe}")
    count = NFE.get(sampler)
    if count is None:
        get_sampler(sampler)  # raises the clear unknown-sampler error
    steps = max(n for n in range(1, nfe + 1) if count(n) <= nfe)
    return steps
