"""Conditions of a batch: class ids (one tensor) or precomputed text embeddings (a dict of tensors).

A distillation module, a trajectory file and a guided teacher call all handle the condition of a batch of samples
without knowing what it is. Two forms exist:

- a **tensor** (class ids, ``(B,)``), passed to the denoiser as one keyword (the module's ``cond_key``);
- a **mapping** ``{keyword: (B, ...) tensor}`` of precomputed embeddings, passed keyword by keyword, e.g. an
  SDXL-shaped UNet's ``{"encoder_hidden_states": (B, L, D), "text_embeds": (B, P), "time_ids": (B, 6)}`` or
  Flux's / SD3's ``{"encoder_hidden_states", "pooled_projections"}``.

The functions below index, concatenate, move and expand both forms alike, so no caller assumes class labels.
A null condition for classifier-free guidance has the same form: a class id, or a mapping of ``(1, ...)`` tensors
(the empty prompt's embeddings); the keys of a mapping null are the ones guidance replaces (the others, such as
SDXL's size ``time_ids``, stay conditional).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

Cond = Tensor | Mapping[str, Tensor]


def is_embedding_cond(c: Any) -> bool:
    """True for the mapping form (precomputed embeddings)."""
    return isinstance(c, Mapping)


def cond_kwargs(c: Cond | None, cond_key: str) -> dict[str, Any]:
    """The denoiser keywords of a condition: ``{cond_key: c}`` for a tensor, the mapping itself otherwise."""
    if c is None:
        return {}
    if is_embedding_cond(c):
        return dict(c)
    return {cond_key: c}


def cond_len(c: Cond) -> int:
    """Number of samples in a condition batch (checks that every entry of a mapping has the same)."""
    if not is_embedding_cond(c):
        return len(c)
    sizes = {k: v.shape[0] for k, v in c.items()}
    if len(set(sizes.values())) != 1:
        raise ValueError(f"condition entries differ in batch size: {sizes}; every embedding needs one row per sample")
    return next(iter(sizes.values()))


def cond_index(c: Cond, idx: Tensor | Sequence[int]) -> Cond:
    """Rows ``idx`` of a condition batch (indices on the CPU; entries keep their device)."""
    if is_embedding_cond(c):
        return {k: v[torch.as_tensor(idx, device=v.device)] for k, v in c.items()}
    return c[torch.as_tensor(idx, device=c.device)]


def cond_cat(conds: Sequence[Cond]) -> Cond:
    """Concatenate condition batches of one form along the batch."""
    if is_embedding_cond(conds[0]):
        keys = list(conds[0])
        if any(set(c) != set(keys) for c in conds):
            raise ValueError(f"cannot concatenate conditions with different keys: {[sorted(c) for c in conds]}")
        return {k: torch.cat([c[k] for c in conds]) for k in keys}
    return torch.cat(list(conds))


def cond_to(c: Cond, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Cond:
    """Move a condition batch (floating entries of a mapping also cast to ``dtype`` when given)."""
    if is_embedding_cond(c):
        return {k: v.to(device=device, dtype=dtype if dtype is not None and v.is_floating_point() else None)
                for k, v in c.items()}
    return c.to(device)


def expand_null(null: Mapping[str, Tensor], batch: int, device: torch.device | str | None = None) -> dict[str, Tensor]:
    """A mapping null condition (``(1, ...)`` or unbatched tensors) repeated for ``batch`` samples."""
    out = {}
    for k, v in null.items():
        v = torch.as_tensor(v, device=device)
        if v.ndim == 0 or v.shape[0] != 1:
            v = v.unsqueeze(0)
        out[k] = v.expand(batch, *v.shape[1:])
    return out


def check_cond_pool(pool: Any, what: str = "cond_pool") -> Cond:
    """Validate a pool of conditions (rows drawn per sample): a tensor, or a mapping of tensors with equal rows."""
    if is_embedding_cond(pool):
        if not pool:
            raise ValueError(f"{what} is an empty mapping; give {{keyword: (N, ...) tensor}} embeddings")
        bad = [k for k, v in pool.items() if not isinstance(v, Tensor) or v.ndim < 1]
        if bad:
            raise ValueError(f"{what} entries {bad} are not batched tensors; give (N, ...) tensors, one row a sample")
        cond_len(pool)
        return {k: v.detach().cpu() for k, v in pool.items()}
    if not isinstance(pool, Tensor) or pool.ndim < 1 or len(pool) == 0:
        raise ValueError(f"{what} must be a non-empty (N, ...) tensor or a mapping of them, got {type(pool).__name__}")
    return pool.detach().cpu()


def real_conditions(c: Any) -> Cond:
    """The conditions of a data set (real samples, teacher pairs): class ids as int64, or a mapping of embeddings;
    kept on the CPU."""
    if is_embedding_cond(c):
        return check_cond_pool(c, "the data's conditions")
    return torch.as_tensor(c).long().cpu()
