"""Consistency distillation: LCM with guidance-scale conditioning, multistep / segmented consistency, pseudo-Huber.

Latent Consistency Models (Luo et al. 2023, "Latent Consistency Models", eq. 8-10 and Alg. 1): from a noisy
sample ``x_{t_{n+k}}`` the teacher, guided with scale ``w``, takes one ODE-solver step (DDIM) to ``x̂_{t_n}``; the
student ``f(x, t, w)`` is trained so that ``d(f(x_{t_{n+k}}, t_{n+k}, w), f^-(x̂_{t_n}, t_n, w))`` is small, where
``f^-`` is a stop-gradient (EMA) copy. LCM writes guidance as ``eps_c + omega (eps_c - eps_u)``; fewstep's ``w``
is ``omega + 1`` (``core.guidance.cfg.from_lcm_omega``) and the student's scale embedding is fed ``omega``.

Multistep / segmented consistency (Heek et al. 2024, "Multistep Consistency Models", Alg. 1; MLCM, Xie et al.
2024; Hyper-SD's trajectory-segmented consistency distillation, Ren et al. 2024, sec. 3.1): the noise range is
split into segments and the consistency function maps ``x_t`` to the *end of its segment* ``e(t)`` with a DDIM
step from its x0 prediction, ``F(x, t) = DDIM(x, t -> e(t), f(x, t))``. When the teacher step would leave the
segment it stops at the boundary and the target is ``x̂_{e}`` itself (which enforces the boundary condition
``F(x, e) = x``); one segment ending at 0 is plain LCM. Sampling a student with ``S`` segments is DDIM (Euler in
fewstep's sigma space) over the ``S + 1`` boundaries.

Distance: pseudo-Huber ``sqrt(||a - b||^2 + c^2) - c`` (Song & Dhariwal 2023, "Improved Techniques for Training
Consistency Models", sec. 3.3) with ``c = 0.00054 sqrt(d)``, or squared L2.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .common import ddim_transfer, sigma_at_fraction, weighted_mean


def consistency_grid(model_sampling, num_grid: int = 48) -> Tensor:
    """The solver grid of multistep consistency distillation: sigma 0 and ``num_grid`` levels uniform in the model's
    time fraction (LCM's DDIM grid; segment boundaries are levels of it)."""
    u = torch.arange(1, num_grid + 1, dtype=torch.float32) / num_grid
    return torch.cat([torch.zeros(1), sigma_at_fraction(model_sampling, u).float()])


def pseudo_huber_c(dim: int) -> float:
    """iCT's default ``c = 0.00054 sqrt(d)`` for ``d`` data dimensions (Song & Dhariwal 2023, sec. 3.3)."""
    return 0.00054 * math.sqrt(dim)


def pseudo_huber(a: Tensor, b: Tensor, c: float | None = None) -> Tensor:
    """Per-sample pseudo-Huber distance ``sqrt(||a - b||_2^2 + c^2) - c`` over all but the batch dimension."""
    d = (a.float() - b.float()).reshape(a.shape[0], -1)
    if c is None:
        c = pseudo_huber_c(d.shape[1])
    sq = (d**2).sum(1)
    if c == 0:
        return sq.sqrt()
    return sq / (torch.sqrt(sq + c * c) + c)  # = sqrt(sq + c^2) - c without cancellation for small distances


def consistency_distance(a: Tensor, b: Tensor, kind: str = "huber", c: float | None = None) -> Tensor:
    """Per-sample distance: ``"huber"`` (pseudo-Huber) or ``"l2"`` (mean squared error per sample)."""
    if kind == "huber":
        return pseudo_huber(a, b, c)
    if kind == "l2":
        return ((a.float() - b.float()) ** 2).reshape(a.shape[0], -1).mean(1)
    raise ValueError(f"unknown consistency distance {kind!r}; choose 'huber' or 'l2'")


def segment_boundaries(num_grid: int, segments: int) -> list[int]:
    """Grid indices of the segment boundaries, ascending from 0 (no noise) to ``num_grid`` (the top)."""
    if segments < 1 or num_grid % segments:
        raise ValueError(f"the grid of {num_grid} steps must split into {segments} equal segments")
    return list(range(0, num_grid + 1, num_grid // segments))


def segment_end_index(index: Tensor, num_grid: int, segments: int) -> Tensor:
    """For grid indices ``index`` in ``1..num_grid``, the index of the end of their segment: the largest boundary
    strictly below (segments are ``(b_m, b_{m+1}]``)."""
    seg = num_grid // segments
    return ((index - 1).div(seg, rounding_mode="floor")) * seg


def consistency_loss(model_sampling, x_t: Tensor, sigma_t: Tensor, student_x0: Tensor, x_s: Tensor, sigma_s: Tensor,
                     target_x0: Tensor, sigma_end: Tensor, distance: str = "huber", c: float | None = None,
                     weights: Tensor | None = None) -> Tensor:
    """Multistep consistency loss ``d(F(x_t, t), stopgrad F^-(x̂_s, s))`` with ``F(x, t) = DDIM(x, t -> e, x0)``.

    Args:
        x_t, sigma_t: the noisy input and its sigma (per sample).
        student_x0: the student's x0 prediction at ``(x_t, sigma_t)`` (carries the graph).
        x_s, sigma_s: the teacher's solver step from ``x_t`` (``sigma_end <= sigma_s < sigma_t``).
        target_x0: the target network's x0 prediction at ``(x_s, sigma_s)`` (detached here).
        sigma_end: the segment end ``e`` (0 for plain LCM). Where ``sigma_s == sigma_end`` the target is ``x_s``.
        distance, c: ``"huber"`` (pseudo-Huber with constant ``c``) or ``"l2"``.

    Both sides are compared at ``e`` in the network-input scale (``model_sampling.calculate_input``), so segments
    with large sigma do not dominate; at ``e = 0`` that is plain x0 space.
    """
    ms = model_sampling
    pred = ddim_transfer(ms, x_t, student_x0, sigma_t, sigma_end)
    with torch.no_grad():
        target = ddim_transfer(ms, x_s, target_x0.detach(), sigma_s, sigma_end)
        at_end = (torch.as_tensor(sigma_s) <= torch.as_tensor(sigma_end)).reshape((-1,) + (1,) * (x_s.ndim - 1))
        target = torch.where(at_end.to(x_s.device), x_s, target)
    sig_e = torch.as_tensor(sigma_end, dtype=x_t.dtype, device=x_t.device)
    pred = ms.calculate_input(sig_e, pred)
    target = ms.calculate_input(sig_e, target)
    return weighted_mean(consistency_distance(pred, target, distance, c), weights)


def last_segment_loss(student, pairs: dict[str, Tensor], sigmas: Tensor, idx: Tensor, keep_idx: Tensor,
                      keep_weight: float, cond_key: str = "class_labels") -> tuple[Tensor, dict[str, float]]:
    """The consistency students' last-segment stage (issue 13) on pairs of ``core.consistency_pairs``.

    Last segment (``sigma_{S-1} -> 0``): ``consistency_loss`` with the teacher's ODE solution as the target at the
    segment end 0 (``x_s = target``, ``sigma_s = 0``: the multi-step teacher target of Heek et al. 2024, Alg. 1 with a
    converged solver; at ``e = 0`` the student's ``F`` is its x0 prediction), samples ``idx``. Earlier segments
    (``keep_weight > 0``): ``consistency_loss`` against the initial student's own prediction at the same input
    (``x_s = x_t``, ``sigma_s = sigma_t``), samples ``keep_idx``, weighted by ``keep_weight`` — one network serves
    every sigma, so the first steps must not drift while the last one moves. Returns the loss and its terms.
    """
    ms = student.model_sampling
    S = len(sigmas) - 1
    x, y = pairs["x"][S - 1, idx], pairs["labels"][idx]
    sig = sigmas[S - 1].expand(len(idx))
    zero = torch.zeros(len(idx), device=x.device)
    target = pairs["target"][idx]
    last = consistency_loss(ms, x, sig, student(x, sig, **{cond_key: y}), target, zero, target, zero)
    logs = {"last": float(last.detach())}
    loss = last
    if keep_weight > 0 and S > 1:
        for k in range(S - 1):
            xk, yk = pairs["x"][k, keep_idx], pairs["labels"][keep_idx]
            sk, se = sigmas[k].expand(len(keep_idx)), sigmas[k + 1].expand(len(keep_idx))
            keep = consistency_loss(ms, xk, sk, student(xk, sk, **{cond_key: yk}), xk, sk, pairs["pred"][k, keep_idx],
                                    se)
            logs[f"keep{k}"] = float(keep.detach())
            loss = loss + keep_weight * keep
    return loss, logs
