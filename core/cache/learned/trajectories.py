"""Training data of the learned cache: block-range features recorded along uncached sampling trajectories.

``record_range(net, a, b)`` hooks a transformer's blocks ``a`` (input) and ``b - 1`` (output) and collects, per
network call, the hidden state entering the range and the range's residual, with the call's sigma. Run any sampler
(teacher with CFG, a distilled student) inside it; ``Trajectories.pairs(max_gap)`` then makes the training pairs of
Eq. (1) in ``predictor.py``: for every call ``t`` and earlier call ``c`` of the same run with ``t - c <= max_gap``,
input ``(h_a(t), r(c), h_a(c), sigma_t, sigma_c)`` and target ``r(t)`` -- exactly what the cache has at a skipped step
whose last full compute was ``c`` steps back.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ...sampling.schedules import starts_new_run


def _hidden_in(args: tuple, kwargs: dict) -> Tensor:
    h = kwargs.get("hidden_states", args[0] if args else None)
    if not isinstance(h, Tensor):
        raise TypeError("cannot find hidden_states in the block call (keyword or first positional)")
    return h


def _hidden_out(out: object) -> Tensor:
    if isinstance(out, Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        return out[0]
    raise TypeError(f"cannot read the hidden state from a block output of type {type(out).__name__}")


@dataclass
class Trajectories:
    """Per network call: ``h`` (hidden entering the range), ``r`` (range residual), ``sigma`` (per row); ``run``
    numbers the sampling runs (a call whose sigma rises starts a new run)."""

    h: list[Tensor] = field(default_factory=list)
    r: list[Tensor] = field(default_factory=list)
    sigma: list[Tensor] = field(default_factory=list)
    run: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.h)

    def pairs(self, max_gap: int = 1, min_gap: int = 1) -> dict[str, Tensor]:
        """Training pairs (see the module docstring) as stacked tensors: ``h``, ``r_c``, ``h_c``, ``r_t`` ``(N, T, D)``,
        ``sigma_t``, ``sigma_c`` ``(N,)``, ``gap`` ``(N,)``."""
        if min_gap < 1 or max_gap < min_gap:
            raise ValueError(f"need 1 <= min_gap <= max_gap, got min_gap={min_gap}, max_gap={max_gap}")
        out: dict[str, list[Tensor]] = {k: [] for k in ("h", "r_c", "h_c", "r_t", "sigma_t", "sigma_c", "gap")}
        for t in range(len(self)):
            for c in range(max(0, t - max_gap), t - min_gap + 1):
                if self.run[c] != self.run[t] or self.h[c].shape != self.h[t].shape:
                    continue
                n = self.h[t].shape[0]
                out["h"].append(self.h[t])
                out["r_c"].append(self.r[c])
                out["h_c"].append(self.h[c])
                out["r_t"].append(self.r[t])
                out["sigma_t"].append(self.sigma[t])
                out["sigma_c"].append(self.sigma[c])
                out["gap"].append(torch.full((n,), t - c))
        if not out["h"]:
            raise ValueError(f"no training pairs: {len(self)} recorded calls with max_gap={max_gap}; record at least "
                             "two calls of one sampling run")
        return {k: torch.cat(v) for k, v in out.items()}


@contextlib.contextmanager
def record_range(net: nn.Module, blocks: list[nn.Module], a: int, b: int,
                 sigma_of_call: callable[[tuple, dict], Tensor]) -> Iterator[Trajectories]:
    """Record the range ``[a, b)`` of ``blocks`` on every call of ``net`` (see the module docstring).

    ``sigma_of_call(args, kwargs)`` maps the network call to per-row sigmas (e.g. ``model_sampling.sigma`` of the
    timestep argument).
    """
    if not 0 <= a < b <= len(blocks):
        raise ValueError(f"block range [{a}, {b}) is outside the model's {len(blocks)} blocks; use 0 <= a < b <= "
                         f"{len(blocks)}")
    rec = Trajectories()
    cur: dict[str, object] = {}

    def begin(_m: nn.Module, args: tuple, kwargs: dict) -> None:
        s = sigma_of_call(args, kwargs).detach().float().reshape(-1)
        prev = rec.sigma[-1] if rec.sigma else None
        if prev is None or starts_new_run(float(prev.max()), float(s.max())) or s.shape != prev.shape:
            cur["run"] = int(cur.get("run", -1)) + 1
        cur["sigma"] = s

    def grab_in(_m: nn.Module, args: tuple, kwargs: dict) -> None:
        cur["h"] = _hidden_in(args, kwargs).detach()

    def grab_out(_m: nn.Module, _a: tuple, _k: dict, out: object) -> None:
        h = cur.pop("h", None)
        if h is None:
            return
        rec.h.append(h.clone())
        rec.r.append((_hidden_out(out).detach() - h).clone())
        s = cur["sigma"]
        rec.sigma.append(s.expand(h.shape[0]).clone() if s.numel() == 1 else s.clone())
        rec.run.append(int(cur["run"]))

    handles = [net.register_forward_pre_hook(begin, with_kwargs=True),
               blocks[a].register_forward_pre_hook(grab_in, with_kwargs=True),
               blocks[b - 1].register_forward_hook(grab_out, with_kwargs=True)]
    try:
        yield rec
    finally:
        for hd in handles:
            hd.remove()
