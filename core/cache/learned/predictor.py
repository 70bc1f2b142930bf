"""The residual predictor of the learned cache: a light network that stands in for a skipped block range.

DisCa (Zou et al. 2025, "DisCa: Accelerating Video Diffusion Transformers with Distillation-Compatible Learnable
Feature Caching") replaces the training-free reuse/forecast of a cache by a small learned predictor of the skipped
features. Here, for a range of blocks ``[a, b)`` whose residual ``r_t = h_b(t) - h_a(t)`` is cached:

    r_hat_t = r_c + W u + w + U gelu(mix(V [u, e(sigma_t, sigma_c)])),   u = [h_a(t), r_c, h_a(t) - h_a(c)]   (1)

- ``h_a(t)``: the hidden state entering the range *now* (the head blocks did run), per token;
- ``r_c``: the range's residual at the last full compute ``c`` (what a reuse cache returns alone);
- ``h_a(t) - h_a(c)``: how far the range's input moved since then (First-Block-Cache's signal; with it the linear map
  is a learned first-order expansion ``r_t ~ r_c + J (h_a(t) - h_a(c))``);
- ``e``: features of ``log sigma_t``, ``log sigma_c`` and their difference;
- ``W, w``: a linear map (exact for linear blocks), ``V, U``: a low-rank per-token MLP (rank ``rank``), ``mix``: an
  optional depthwise 3x3 convolution over the token grid (the skipped blocks attend; the MLP alone cannot mix
  tokens). ``W, w, U`` start at zero, so an untrained predictor is exactly reuse (``r_hat = r_c``).

Cost per token: ``3 D * D + (3 D + F) * rank + rank * D`` multiply-adds against ``~12 D^2`` per transformer block
(attention projections ``4 D^2``, feed-forward ``8 D^2``): at ``rank = D / 2`` about a fifth of one block.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

SIGMA_FEATURES = 9


def sigma_features(sigma_t: Tensor, sigma_c: Tensor) -> Tensor:
    """``(B, SIGMA_FEATURES)``: scaled log sigmas now and at the cached compute, their gap, and sin/cos of both."""
    lt = torch.log(sigma_t.clamp_min(1e-4)).float() / 4
    lc = torch.log(sigma_c.clamp_min(1e-4)).float() / 4
    return torch.stack([lt, lc, lt - lc, torch.sin(lt), torch.cos(lt), torch.sin(2 * lt), torch.cos(2 * lt),
                        torch.sin(lc), torch.cos(lc)], dim=-1)


class ResidualPredictor(nn.Module):
    """Eq. (1) above. ``forward(h, r_c, h_c, sigma_t, sigma_c)`` with ``h, r_c, h_c``: ``(B, T, D)``, sigmas:
    ``(B,)``.

    Args:
        dim: hidden width ``D`` of the transformer.
        rank: width of the low-rank MLP (0: linear part only).
        mix: depthwise 3x3 convolution over the square token grid inside the MLP.
    """

    def __init__(self, dim: int, rank: int = 48, mix: bool = True) -> None:
        super().__init__()
        if dim < 1 or rank < 0:
            raise ValueError(f"ResidualPredictor needs dim >= 1 and rank >= 0, got dim={dim}, rank={rank}")
        self.dim, self.rank, self.mix = int(dim), int(rank), bool(mix and rank > 0)
        self.linear = nn.Linear(3 * dim, dim)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)
        if rank > 0:
            self.down = nn.Linear(3 * dim + SIGMA_FEATURES, rank)
            self.conv = nn.Conv2d(rank, rank, 3, padding=1, groups=rank) if self.mix else None
            self.pool = nn.Linear(rank, rank, bias=False) if self.mix else None
            self.up = nn.Linear(rank, dim, bias=False)
            nn.init.zeros_(self.up.weight)

    def config(self) -> dict[str, Any]:
        return {"dim": self.dim, "rank": self.rank, "mix": self.mix}

    def forward(self, h: Tensor, r_c: Tensor, h_c: Tensor, sigma_t: Tensor, sigma_c: Tensor) -> Tensor:
        if h.shape != r_c.shape or h.shape != h_c.shape or h.ndim != 3 or h.shape[-1] != self.dim:
            raise ValueError(f"ResidualPredictor(dim={self.dim}) expects h, r_c and h_c of shape (B, T, {self.dim}), "
                             f"got {tuple(h.shape)}, {tuple(r_c.shape)} and {tuple(h_c.shape)}")
        dtype = h.dtype
        x, rf = self._inputs(h, r_c, h_c)
        out = rf + self.linear(x)
        if self.rank > 0:
            b, t, _ = h.shape
            e = sigma_features(sigma_t.reshape(-1).expand(b), sigma_c.reshape(-1).expand(b))
            z = self.down(torch.cat([x, e.to(x.dtype)[:, None, :].expand(b, t, -1)], dim=-1))
            if self.conv is not None:
                side = math.isqrt(t)
                if side * side != t:
                    raise ValueError(f"mix=True needs a square token grid, got {t} tokens; build the predictor with "
                                     "mix=False for this model")
                z = z + self.conv(z.transpose(1, 2).reshape(b, self.rank, side, side)).flatten(2).transpose(1, 2)
                z = z + self.pool(z.mean(dim=1, keepdim=True))
            out = out + self.up(torch.nn.functional.gelu(z))
        return out.to(dtype)

    def _inputs(self, h: Tensor, r_c: Tensor, h_c: Tensor) -> tuple[Tensor, Tensor]:
        dt = self.linear.weight.dtype
        hf, rf, cf = h.to(dt), r_c.to(dt), h_c.to(dt)
        return torch.cat([hf, rf, hf - cf], dim=-1), rf

    @torch.no_grad()
    def fit_linear(self, h: Tensor, r_c: Tensor, h_c: Tensor, r_t: Tensor, sigma_t: Tensor, sigma_c: Tensor,
                   ridge: float = 1e-10) -> float:
        """Least-squares fit of ``W, w`` (float64 SVD solve; singular values below ``ridge`` of the largest are
        dropped) to ``r_t - r_c`` with the MLP's contribution removed; returns the relative residual error of the
        fit. Exact for linear blocks."""
        xin = self._inputs(h, r_c, h_c)[0]
        x = xin.reshape(-1, 3 * self.dim).double()
        y = (r_t - r_c).reshape(-1, self.dim).double()
        if self.rank > 0:
            mlp = self(h, r_c, h_c, sigma_t, sigma_c) - r_c - self.linear(xin)
            y = y - mlp.reshape(-1, self.dim).double()
        xa = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], dim=1)
        scale = xa.abs().amax(0).clamp_min(1e-12)  # column scaling for conditioning
        sol = torch.linalg.lstsq(xa / scale, y, rcond=ridge, driver="gelsd").solution / scale[:, None]
        self.linear.weight.copy_(sol[:-1].T.to(self.linear.weight.dtype))
        self.linear.bias.copy_(sol[-1].to(self.linear.bias.dtype))
        err = (xa @ sol - y).norm() / y.norm().clamp_min(1e-12)
        return float(err)
