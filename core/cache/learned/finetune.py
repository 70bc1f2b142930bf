"""End-to-end fine-tuning of a learned cache on its own skip plan (the predictor in the sampling loop).

The regression of ``train.py`` fits the predictor to pairs from *uncached* trajectories, but at sampling time a
skipped call's inputs come from the *cached* trajectory, and its errors compound over the few steps of a distilled
sampler. DisCa (Zou et al. 2025, sec. 3) trains its predictor on the student's own sampling distribution; here the
loss is the distance of the cached sample to the uncached sample from the same noise,

    L(phi) = E_{z, y} || S_phi(z, y) - S(z, y) ||^2 / E || S(z, y) ||^2,                                   (2)

with ``S`` the uncached sampler and ``S_phi`` the same sampler with ``LearnedCache(predictor_phi, skip_steps)`` on:
the gradient flows through the predicted residuals, the tail blocks and every later step (the network's weights stay
frozen). It optimises exactly the benchmark's fidelity (PSNR to the uncached output) for one skip plan.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from .cache import LearnedCache


def differentiable(sampler: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """A core sampler without its ``torch.no_grad`` wrapper (``core.sampling.samplers._sampler``)."""
    return getattr(sampler, "__wrapped__", sampler)


def finetune_end_to_end(cache: LearnedCache, apply: Callable[[LearnedCache], Any],
                        sample: Callable[[Tensor, Mapping[str, Tensor]], Tensor], noise: Tensor,
                        cond: Mapping[str, Tensor], *, iters: int = 150, batch: int = 24, lr: float = 1e-3,
                        seed: int = 0, log: Callable[[str], None] | None = None) -> tuple[LearnedCache, dict[str, Any]]:
    """Fine-tune a copy of ``cache``'s predictor by Eq. (2) on ``noise`` (training noise, not the scored noise).

    Args:
        cache: the starting ``LearnedCache`` (regression-trained); it is not modified.
        apply: ``apply(c)`` returns a context manager that applies cache ``c`` to the model (``apply_cache``).
        sample: ``sample(noise, cond)`` runs the sampler from that noise with gradients enabled (see
            :func:`differentiable`); the same function gives the uncached targets.
        noise, cond: training noise ``(N, ...)`` and per-sample conditions (each ``(N, ...)``).
        iters, batch, lr, seed: AdamW steps, samples per step, learning rate, the minibatch order's seed.
        log: progress lines (every 25 steps).

    Returns:
        the fine-tuned ``LearnedCache`` (same plan and range) and a record (seconds, first/last loss).
    """
    if iters < 1 or batch < 1:
        raise ValueError(f"iters and batch must be >= 1, got {iters}, {batch}")
    t0 = time.perf_counter()
    with torch.no_grad():
        targets = torch.cat([sample(noise[i:i + batch], {k: v[i:i + batch] for k, v in cond.items()})
                             for i in range(0, len(noise), batch)])
    pred: nn.Module = copy.deepcopy(cache.predictor).train().requires_grad_(True)
    opt = torch.optim.AdamW(pred.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    for it in range(iters):
        idx = torch.randperm(len(noise), generator=g)[:batch]
        c = LearnedCache(pred, sorted(cache.skip_steps), head_blocks=cache.head_blocks, tail_blocks=cache.tail_blocks,
                         identity=cache.identity)
        c.predictor.requires_grad_(True).train()
        c.trainable = True
        with apply(c):
            out = sample(noise[idx], {k: v[idx] for k, v in cond.items()})
        tgt = targets[idx]
        loss = (out - tgt).pow(2).sum() / tgt.pow(2).sum().clamp_min(1e-12)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        if log is not None and (it % 25 == 0 or it == iters - 1):
            log(f"e2e step {it}: relative sample error {losses[-1]:.5f}")
    pred.eval().requires_grad_(False)
    out_cache = LearnedCache(pred, sorted(cache.skip_steps), head_blocks=cache.head_blocks,
                             tail_blocks=cache.tail_blocks, identity=cache.identity)
    return out_cache, {"e2e_steps": iters, "e2e_batch": batch, "e2e_seconds": round(time.perf_counter() - t0, 1),
                       "e2e_first_loss": losses[0], "e2e_last_loss": float(sum(losses[-10:]) / len(losses[-10:]))}
