"""Training pairs of the consistency students' last-segment stage: the student's own chain and the teacher's
second-order ODE solution from its last boundary (issue 13).

The whole gap of the 4-step consistency student on the digits teacher is its last segment (sigma 0.96 -> 0):
finishing the student's own first steps with the teacher's DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++",
Alg. 2) gives the teacher's FD. A pair is made exactly where the student is used:

- ``x``: the student's own Euler (= DDIM) sampling chain from pure noise, its input at every boundary
  ``sigma_0 .. sigma_{S-1}`` (noise and labels from ``PAIR_SEED + shard``, disjoint from the benchmark's seeds);
- ``pred``: the student's x0 prediction at each of them (the "keep" targets of the earlier segments);
- ``target``: the teacher's CFG solution from ``x[S-1]`` to 0, DPM-Solver++(2M) over the consistency grid
  (``skip`` grid levels per step): the multi-step teacher target of the last segment (nothing bootstrapped).

Shards are written atomically into a folder and a folder that holds them is reused (``make_pairs`` is resumable).
The loss on them is ``core.losses.consistency.last_segment_loss``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from .guidance.cfg import CFGDenoiser
from .io import load_torch, save_torch
from .sampling.samplers import get_sampler

SHARD = 256
PAIR_SEED = 10_000


def grid_index(grid: Tensor, sigma: float) -> int:
    """The grid level of a student boundary sigma (they are grid levels by construction)."""
    i = int(torch.argmin((grid - float(sigma)).abs()))
    if abs(float(grid[i]) - float(sigma)) > 1e-3 * max(1.0, float(sigma)):
        raise ValueError(f"sigma {sigma} is not a level of the {len(grid) - 1}-level consistency grid; the student's "
                         "sigmas must be levels of it (a student trained by ConsistencyDistillation)")
    return i


@torch.no_grad()
def make_shard(student: nn.Module, teacher: nn.Module, sigmas: Tensor, grid: Tensor, shard: int, cfg: float,
               skip: int, size: int = SHARD, cond_key: str = "class_labels", null: int = 10,
               num_classes: int = 10, shape: tuple[int, ...] = (1, 16, 16)) -> dict[str, Tensor]:
    """One shard of ``size`` chains: inputs ``x`` (S, B, ...) at the student's sigmas, the student's x0 predictions
    ``pred`` (S, B, ...), ``labels`` and ``target``: the teacher's DPM-Solver++(2M) CFG solution from ``x[S-1]`` to
    0 over every ``skip``-th level of ``grid`` below ``sigma_{S-1}``."""
    ms = student.model_sampling
    g = torch.Generator().manual_seed(PAIR_SEED + shard)
    labels = torch.randint(0, num_classes, (size,), generator=g)
    noise = torch.randn((size, *shape), generator=g)
    x = ms.noise_scaling(sigmas[0], noise, torch.zeros_like(noise), max_denoise=True)
    xs, preds = [], []

    def keep(step: dict) -> None:  # the sampler's callback: the input and the x0 prediction at each boundary
        xs.append(step["x"].clone())
        preds.append(step["denoised"].clone())

    get_sampler("euler")(student, x, sigmas, extra_args={cond_key: labels}, callback=keep, disable=True)
    top = grid_index(grid, float(sigmas[-2]))
    levels = list(range(top, 0, -skip)) + [0]
    teacher_cfg = CFGDenoiser(teacher, cfg, cond_key=cond_key, null=null)
    target = get_sampler("dpmpp_2m")(teacher_cfg, xs[-1].clone(), grid[levels],
                                     extra_args={cond_key: labels, "seed": PAIR_SEED + shard}, disable=True)
    return {"x": torch.stack(xs), "pred": torch.stack(preds), "target": target, "labels": labels}


def shard_path(folder: str | Path, shard: int) -> Path:
    """Shard ``shard``'s file in a pairs folder."""
    return Path(folder) / f"shard_{int(shard):04d}.pt"


def make_pairs(folder: str | Path, student: nn.Module, teacher: nn.Module, sigmas: Tensor, grid: Tensor, num: int,
               cfg: float, skip: int = 1, size: int = SHARD, log=print, **kwargs) -> list[Path]:
    """Write ``num`` pairs as ``ceil(num / size)`` shards ``shard_NNNN.pt`` into ``folder`` (resumable: shards already
    there are kept; the last shard may be smaller). Returns the shard files."""
    import time

    if int(num) < 1 or int(size) < 1:
        raise ValueError(f"num and size must be >= 1 (pairs, pairs per shard), got num={num}, size={size}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for i in range(-(-int(num) // int(size))):
        f = shard_path(folder, i)
        if not f.exists():
            t0 = time.perf_counter()
            n = min(int(size), int(num) - i * int(size))
            save_torch(make_shard(student, teacher, sigmas, grid, i, cfg, skip, size=n, **kwargs), f,
                       keep_previous=False)
            if log is not None:
                log(f"pairs shard {i}: {time.perf_counter() - t0:.0f} s")
        files.append(f)
    return files


def load_pairs(folder: str | Path, shards: int) -> dict[str, Tensor]:
    """The first ``shards`` shards of ``folder`` concatenated (chains along dim 1, targets and labels along dim 0)."""
    folder = Path(folder)
    missing = [i for i in range(shards) if not shard_path(folder, i).exists()]
    if missing:
        raise FileNotFoundError(f"{shard_path(folder, missing[0])} is missing ({shards} shards needed); make them "
                                "with make_pairs")
    parts = [load_torch(shard_path(folder, i), what="pairs shard") for i in range(shards)]
    return {"x": torch.cat([p["x"] for p in parts], 1), "pred": torch.cat([p["pred"] for p in parts], 1),
            "target": torch.cat([p["target"] for p in parts]), "labels": torch.cat([p["labels"] for p in parts])}
