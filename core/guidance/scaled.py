"""Classifier-free guidance with a guidance scale per sample, for training and trajectory generation.

Same convention as ``cfg.py`` (``uncond + w * (cond - uncond)``, Ho & Salimans 2022 eq. 6 on x0), but ``w`` is a
``(B,)`` tensor passed with the call, so one batch can mix scales (LCM's w-conditioned training, AGD's
guided trajectories). Cond and uncond go through the network in one batched pass.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..conditioning import expand_null, is_embedding_cond
from .cfg import cfg_combine


def _null_like(null: Any, c: Tensor, device: torch.device) -> Tensor:
    null_t = torch.as_tensor(null, device=device, dtype=c.dtype)
    if null_t.ndim == 0:
        return null_t.expand_as(c)
    return null_t.expand(c.shape[0], *null_t.shape[-(c.ndim - 1):]) if c.ndim > 1 else null_t.expand_as(c)


def guided_denoise(denoiser: nn.Module, x: Tensor, sigma: Tensor | float, scale: Tensor | float,
                   cond_key: str = "class_labels", null: Any = 10, return_parts: bool = False,
                   **cond: Any) -> Tensor | tuple[Tensor, Tensor, Tensor]:
    """``D_w(x) = D(x, null) + w (D(x, c) - D(x, null))`` with a scalar or per-sample ``w``.

    ``null`` is a class id or, for precomputed text embeddings, a mapping of null embeddings (``core.conditioning``).
    With ``return_parts`` returns ``(guided, cond_out, uncond_out)``. When every scale is 1 and the parts are not
    asked for, the unconditional pass is skipped.
    """
    embed = is_embedding_cond(null)
    missing = [k for k in (null if embed else (cond_key,)) if k not in cond]
    if missing:
        raise ValueError(f"guided_denoise needs the condition(s) {missing}")
    scale_t = torch.as_tensor(scale, dtype=x.dtype, device=x.device).reshape(-1)
    if scale_t.numel() not in (1, x.shape[0]):
        raise ValueError(f"guidance scale has {scale_t.numel()} entries for a batch of {x.shape[0]}")
    if not return_parts and bool((scale_t == 1).all()):
        return denoiser(x, sigma, **cond)
    sigma = torch.as_tensor(sigma, device=x.device, dtype=torch.float32).reshape(-1).expand(x.shape[0])
    if embed:  # precomputed embeddings: the null's keys are replaced, per-sample others (SDXL time ids) repeated
        b = x.shape[0]
        c = {k: cond.pop(k) for k in null}
        nul = expand_null(null, b, x.device)
        both = {k: torch.cat([c[k].expand(b, *c[k].shape[1:]), nul[k].to(c[k].dtype)]) for k in c}
        rest = {k: torch.cat([v, v]) if isinstance(v, Tensor) and v.ndim and v.shape[0] == b else v
                for k, v in cond.items()}
        out = denoiser(torch.cat([x, x]), torch.cat([sigma, sigma]), **both, **rest)
    else:
        c = cond.pop(cond_key)
        c = torch.as_tensor(c, device=x.device)
        if c.ndim == 0:
            c = c.expand(x.shape[0])
        nul = _null_like(null, c, x.device)
        out = denoiser(torch.cat([x, x]), torch.cat([sigma, sigma]), **{cond_key: torch.cat([c, nul])}, **cond)
    cond_out, uncond_out = out.chunk(2)
    guided = cfg_combine(cond_out, uncond_out, scale_t if scale_t.numel() > 1 else scale_t[0])
    return (guided, cond_out, uncond_out) if return_parts else guided


class ScaledCFGDenoiser(nn.Module):
    """A denoiser applying CFG with the per-sample scale given as ``guidance_scale=`` in the call (or
    ``default_scale``). Usable by every sampler through ``extra_args``."""

    def __init__(self, denoiser: nn.Module, default_scale: float | None = None, cond_key: str = "class_labels",
                 null: Any = 10):
        super().__init__()
        self.denoiser = denoiser
        self.model_sampling = denoiser.model_sampling
        self.default_scale = default_scale
        self.cond_key, self.null = cond_key, null

    def forward(self, x: Tensor, sigma: Tensor | float, guidance_scale: Tensor | float | None = None,
                **cond: Any) -> Tensor:
        w = self.default_scale if guidance_scale is None else guidance_scale
        if w is None:
            raise ValueError("ScaledCFGDenoiser needs guidance_scale=... in the call (no default_scale set)")
        from ..checks import CFG_RANGE, check_scale

        check_scale(w, CFG_RANGE, "guidance scale", "the usual CFG range (1 = no guidance)")
        return guided_denoise(self.denoiser, x, sigma, w, self.cond_key, self.null, **cond)
