"""The caching benchmarks' measurement protocol: fidelity to the uncached output, cost in evaluations, wall time.

Cache papers measure fidelity against the *uncached* model from the same noise (TeaCache, MagCache, TaylorSeer,
DisCa all report PSNR to the full-compute output); FD alone misleads at a few hundred samples (on the CFG-2 teacher
FD moves ~8% between noise seeds, and a cache that drifts can lower FD by adding diversity). So every setting gets:

- ``psnr_db``: per-sample PSNR to the uncached sample from the same noise, images mapped to [0, 1]
  (``10 log10(1 / MSE)``), averaged over samples; an identical sample counts as ``PSNR_CAP`` dB;
- ``rms``: per-sample RMS distance on the [-1, 1] images, averaged (the unit of ``caching.json``'s
  ``rmse_vs_baseline``, which is the pooled RMS instead);
- FD and class accuracy on the embedded benchmark (``core.metrics.quality.evaluate_samples``);
- cost: network calls and *block evaluations* counted by forward pre-hooks on every transformer block's
  ``attn1.to_q`` (attention ran) and ``ff.net[0]`` (feed-forward ran) -- submodules that only run when the block
  really computes, whichever library skipped it, weighted by the rows they ran on (FasterCache drops the
  unconditional half of the batch). ``nfe = (attention rows + feed-forward rows) / (2 * blocks * rows of a full
  call)``: network evaluations in block-stack equivalents (an uncached 50-step run is 50);
- wall time of the very generation that was scored; the uncached baseline is generated (and timed) at the start
  and again at the end of the run, and ratios use the mean of the two (both are reported: their gap is the drift
  of the shared machine during the run).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

PSNR_CAP = 100.0


def fidelity(images: Tensor, reference: Tensor) -> dict[str, float]:
    """Per-sample PSNR (dB, images in [-1, 1] mapped to [0, 1]) and RMS (on [-1, 1]) to ``reference``, averaged;
    also the worst sample's PSNR."""
    if images.shape != reference.shape:
        raise ValueError(f"images {tuple(images.shape)} and reference {tuple(reference.shape)} differ in shape")
    d = (images.double() - reference.double()).flatten(1)
    mse01 = (d / 2).pow(2).mean(1)
    psnr = torch.where(mse01 > 0, -10 * torch.log10(mse01.clamp_min(1e-300)), torch.full_like(mse01, PSNR_CAP))
    psnr = psnr.clamp(max=PSNR_CAP)
    rms = d.pow(2).mean(1).sqrt()
    return {"psnr_db": float(psnr.mean()), "psnr_db_min": float(psnr.min()), "rms": float(rms.mean())}


class BlockCounter:
    """Counts network calls and real block work of a DiT-like transformer (see the module docstring)."""

    def __init__(self, net: nn.Module, blocks_attr: str = "transformer_blocks") -> None:
        blocks = getattr(net, blocks_attr)
        self.num_blocks = len(blocks)
        self.counts = {"calls": 0, "attn": 0, "ff": 0}
        self.rows_per_call = 1
        self._handles = [net.register_forward_pre_hook(self._hit("calls"))]
        for b in blocks:
            self._handles.append(b.attn1.to_q.register_forward_pre_hook(self._hit("attn")))
            self._handles.append(b.ff.net[0].register_forward_pre_hook(self._hit("ff")))

    def _hit(self, what: str) -> Callable[..., None]:
        def hook(_m: nn.Module, args: tuple) -> None:
            x = args[0] if args else None
            rows = x.shape[0] if isinstance(x, Tensor) and x.ndim >= 2 else self.rows_per_call
            self.counts[what] += 1 if what == "calls" else rows
        return hook

    def reset(self, rows_per_call: int = 1) -> None:
        """Zero the counts; ``rows_per_call``: the batch rows of one full network call (2 x batch under CFG)."""
        self.counts = dict.fromkeys(self.counts, 0)
        self.rows_per_call = rows_per_call

    @property
    def block_evals(self) -> float:
        """Block evaluations in full-batch units (attention and feed-forward halves averaged)."""
        return (self.counts["attn"] + self.counts["ff"]) / (2 * self.rows_per_call)

    @property
    def nfe(self) -> float:
        """Network evaluations in block-stack equivalents."""
        return self.block_evals / self.num_blocks

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


def baseline_wall(start: float, end: float) -> float:
    return 0.5 * (start + end)


def pareto_front(rows: list[dict], cost: str, quality: str, higher_is_better: bool) -> list[str]:
    """Labels of rows not dominated in (``cost`` down, ``quality`` up or down)."""
    sign = 1.0 if higher_is_better else -1.0
    front = []
    for r in rows:
        q = sign * r[quality]
        if not any(o[cost] <= r[cost] and sign * o[quality] >= q and (o[cost] < r[cost] or sign * o[quality] > q)
                   for o in rows):
            front.append(r["label"])
    return front
