"""Training pieces of the learned cache that need no Lightning: the loss, the pairs dataset and its sampler, and
recording pairs from sampling runs. ``callbacks/learned_cache.py`` (Lightning) trains with them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset, Sampler

from .predictor import ResidualPredictor
from .trajectories import record_range

PAIR_KEYS = ("h", "r_c", "h_c", "r_t", "sigma_t", "sigma_c")


def predictor_loss(predictor: ResidualPredictor, batch: dict[str, Tensor]) -> Tensor:
    """Relative squared error of the predicted residual, ``||r_hat - r_t||^2 / ||r_t||^2`` over the batch (DisCa
    trains its predictor by regression to the full model's features; relative so that the loss reads as a fraction
    of the residual whatever the feature scale)."""
    pred = predictor(batch["h"], batch["r_c"], batch["h_c"], batch["sigma_t"], batch["sigma_c"])
    return (pred - batch["r_t"]).pow(2).sum() / batch["r_t"].pow(2).sum().clamp_min(1e-12)


class PairsDataset(Dataset):
    """Training pairs (``Trajectories.pairs``) as a map-style dataset of dicts."""

    def __init__(self, pairs: dict[str, Tensor]) -> None:
        missing = [k for k in PAIR_KEYS if k not in pairs]
        if missing:
            raise ValueError(f"pairs lack {missing}; make them with Trajectories.pairs() or collect_pairs()")
        n = {int(pairs[k].shape[0]) for k in PAIR_KEYS}
        if len(n) != 1:
            raise ValueError(f"pairs have different lengths {sorted(n)}")
        self.pairs = {k: pairs[k] for k in PAIR_KEYS}
        self.n = n.pop()

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {k: v[i] for k, v in self.pairs.items()}


class EpochSeededSampler(Sampler[int]):
    """A shuffle that depends only on ``(seed, epoch)``: Lightning calls ``set_epoch`` each epoch, so a run resumed
    from a checkpoint sees the same order as an uninterrupted one."""

    def __init__(self, n: int, seed: int = 0) -> None:
        self.n, self.seed, self.epoch = int(n), int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())


def dit_sigma_of_call(model_sampling: Any) -> Callable[[tuple, dict], Tensor]:
    """Per-row sigma of a diffusers-style call ``net(x, timestep=t, ...)`` through ``model_sampling.sigma``."""
    def sigma_of_call(args: tuple, kwargs: dict) -> Tensor:
        t = kwargs.get("timestep", args[1] if len(args) > 1 else None)
        if t is None:
            raise TypeError("cannot find the timestep of the network call (keyword 'timestep' or second positional)")
        return model_sampling.sigma(torch.as_tensor(t).float()).reshape(-1)
    return sigma_of_call


@torch.no_grad()
def collect_pairs(run: Callable[[], Any], net: nn.Module, blocks: list[nn.Module], head_blocks: int,
                  tail_blocks: int, sigma_of_call: Callable[[tuple, dict], Tensor], max_gap: int = 1,
                  min_gap: int = 1) -> dict[str, Tensor]:
    """Call ``run()`` (one or more uncached sampling runs of the model that owns ``net``) while recording the block
    range ``[head_blocks, len(blocks) - tail_blocks)``; return the training pairs."""
    with record_range(net, blocks, head_blocks, len(blocks) - tail_blocks, sigma_of_call) as rec:
        run()
    return rec.pairs(max_gap=max_gap, min_gap=min_gap)
