"""Sliced Wasserstein distance between two sample sets (Rabin et al. 2011; Bonneel et al. 2015, eq. 8)."""

from __future__ import annotations

import torch
from torch import Tensor


def sliced_wasserstein(a: Tensor, b: Tensor, projections: int = 256, seed: int = 0) -> float:
    """SW_2 between the empirical distributions of ``a`` (N, ...) and ``b`` (M, ...): the mean over random unit
    directions of the 1-D Wasserstein-2 distance between projected samples (quantiles matched when N != M)."""
    a = a.reshape(a.shape[0], -1).double()
    b = b.reshape(b.shape[0], -1).double()
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"sample sets have different dimensions: {a.shape[1]} vs {b.shape[1]}")
    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(a.shape[1], projections, generator=g, dtype=torch.float64)
    dirs = dirs / dirs.norm(dim=0, keepdim=True)
    pa, _ = torch.sort(a @ dirs, dim=0)
    pb, _ = torch.sort(b @ dirs, dim=0)
    n = max(pa.shape[0], pb.shape[0])
    q = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    qa = torch.quantile(pa, q, dim=0) if pa.shape[0] != n else pa
    qb = torch.quantile(pb, q, dim=0) if pb.shape[0] != n else pb
    return float(((qa - qb) ** 2).mean().sqrt())
