"""Sparse attention: kernel speed against dense attention, and sample quality against density.

``python -m fewstep.benchmarks.sparse_attention [--part kernels|quality|all] [--quick]``

kernels
    Block-sparse attention of one (B, H, S, D) problem at several densities, every available path against dense
    attention on the same machine in the same run. Masks keep exactly ``ceil(density * Kb)`` key blocks per query
    block (the diagonal plus random others: what a top-k pattern produces). Reported per path: seconds per call,
    ``ratio_to_dense`` and ``ratio_to_ideal = t / (density * t_dense)`` (1.0 = perfect scaling with density), and on
    CUDA the speed-up over FlexAttention with the same mask.
    CPU: fp32, S in {1024, 4096}, D = 64: dense SDPA, masked SDPA (the reference), FlexAttention compiled.
    CUDA (runs when a GPU is present; the device is named in the JSON): bf16, S in {4k, 16k, 64k}, D in {64, 128},
    densities 0.05-0.5: dense SDPA (FlashAttention backend), FlexAttention compiled, the Triton kernel.

quality
    The embedded digits teacher sampled (dpmpp_2m, CFG 2) with its self-attention patched at densities 0.25-0.75:
    ``TopKPattern`` (keep ratio = density) and ``SlidingTilePattern`` (the window whose density is closest),
    2x2-token tiles = blocks of 4 tokens (16 blocks over the 8x8 token grid). Frechet distance, class accuracy,
    precision and recall (``core.metrics.quality.evaluate_samples``) against the dense teacher from the same noise,
    plus the dense teacher from other noise (the FD noise level) and top-k with two dense warm-up steps.

Writes ``benchmarks/results/sparse_attention.json`` (each ``--part`` updates its own section) and
``sparse_attention.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from fewstep.kernels import BlockSparseMask, dense_masked_attention
from fewstep.kernels.flex import flex_block_sparse_attention
from fewstep.kernels.triton_block_sparse import triton_block_sparse_attention, triton_unsupported_reason

from ..core import io
from ..core.checks import positive_int
from .common import RESULTS, machine, write_json

__all__ = ["kernel_benchmark", "main", "plot", "quality_benchmark", "random_block_mask"]


# ----------------------------------------------------------------------------------------------------- kernels
def random_block_mask(s: int, block: int, density: float, heads: int = 1, seed: int = 0,
                      device: str | torch.device = "cpu") -> BlockSparseMask:
    """Exactly ``ceil(density * nb)`` key blocks per query block: the diagonal and random others."""
    nb = math.ceil(s / block)
    keep = max(1, min(nb, math.ceil(density * nb)))
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(1, heads, nb, nb, generator=g)
    scores[..., torch.arange(nb), torch.arange(nb)] = 2.0
    idx = scores.topk(keep, dim=-1).indices
    blocks = torch.zeros(1, heads, nb, nb, dtype=torch.bool).scatter(-1, idx, True)
    return BlockSparseMask.from_block_dense(blocks, s, s, block).to(device)


def _time(fn: Callable[[], Any], device: torch.device, reps: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
        times = []
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1000)
        return statistics.median(times)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _bench_problem(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block: int, densities: list[float],
                   reps: int, compile: bool = True) -> list[dict[str, Any]]:
    """Dense SDPA and every block-sparse path on one problem, at each density."""
    dev, cuda = q.device, q.device.type == "cuda"
    _, heads, s, d = q.shape
    t_dense = _time(lambda: F.scaled_dot_product_attention(q, k, v), dev, reps)
    rows: list[dict[str, Any]] = [{"seq": s, "head_dim": d, "density": 1.0, "path": "dense_sdpa",
                                   "seconds": t_dense, "ratio_to_dense": 1.0, "ratio_to_ideal": 1.0}]
    for dens in densities:
        mask = random_block_mask(s, block, dens, heads, seed=s, device=dev)
        real = mask.density()
        flex = "flex_compiled" if compile else "flex_eager"
        paths: dict[str, Callable[[], Any]] = {
            flex: lambda m=mask: flex_block_sparse_attention(q, k, v, m, compile=compile)}
        if cuda:
            if triton_unsupported_reason(q, k, v, mask) is None:
                paths["triton"] = lambda m=mask: triton_block_sparse_attention(q, k, v, m)
        else:
            paths["masked_sdpa"] = lambda m=mask: dense_masked_attention(q, k, v, m)
        # correctness of the fast paths where the dense mask fits in memory
        ref = dense_masked_attention(q.float(), k.float(), v.float(), mask) if s <= 8192 else None
        found: dict[str, float] = {}
        made: dict[str, dict[str, Any]] = {}
        for name, fn in paths.items():
            row = made[name] = {"seq": s, "head_dim": d, "density": round(real, 4), "path": name}
            try:
                t = _time(fn, dev, reps, warmup=2 if name == "flex_compiled" else 1)
                row.update(seconds=t, ratio_to_dense=t / t_dense, ratio_to_ideal=t / (real * t_dense))
                if ref is not None:
                    row["max_abs_err"] = float((fn().float() - ref).abs().max())
                found[name] = t
            except Exception as e:  # record and continue: one path failing must not stop the table
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
            rows.append(row)
        if "triton" in found and "flex_compiled" in found:
            made["triton"]["speedup_vs_flex"] = found["flex_compiled"] / found["triton"]
        print(f"S={s} D={d} density={real:.3f}: " + ", ".join(
            f"{n} {found[n] / t_dense:.2f}x dense" for n in found), flush=True)
    return rows


def kernel_benchmark(quick: bool = False, device: str | None = None, smoke: bool = False) -> dict[str, Any]:
    """The kernel table: dense SDPA and every block-sparse path over sizes and densities. ``smoke``: one tiny CPU
    problem without compilation (checks the pipeline, measures nothing worth reading)."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = dev.type == "cuda"
    if smoke:
        dtype, heads, block, seqs, dims, densities, reps = torch.float32, 2, 64, [256], [32], [0.5], 1
    elif cuda:
        dtype, heads, block = torch.bfloat16, 16, 128
        seqs = [4096, 16384] if quick else [4096, 16384, 65536]
        dims = [64] if quick else [64, 128]
        densities = [0.1, 0.5] if quick else [0.05, 0.1, 0.25, 0.5]
        reps = 10
    else:
        dtype, heads, block = torch.float32, 4, 64
        seqs = [1024] if quick else [1024, 4096]
        dims = [64]
        densities = [0.1, 0.5] if quick else [0.1, 0.25, 0.5]
        reps = 3
    rows: list[dict[str, Any]] = []
    for s in seqs:
        for d in dims:
            g = torch.Generator(device="cpu").manual_seed(s + d)
            q, k, v = (torch.randn(1, heads, s, d, generator=g).to(dev, dtype) for _ in range(3))
            with torch.no_grad():
                rows += _bench_problem(q, k, v, block, densities, reps, compile=not smoke)
    return {"device": machine().get("device", "cpu"), "dtype": str(dtype).replace("torch.", ""), "heads": heads,
            "block": block, "rows": rows}


# ----------------------------------------------------------------------------------------------------- quality
def quality_benchmark(quick: bool = False, per_class: int = 20, steps: int = 8, cfg: float = 2.0,
                      seed: int = 0) -> dict[str, Any]:
    from fewstep.core.attention import (
        SlidingTilePattern,
        SparsitySchedule,
        TokenLayout,
        TopKPattern,
        apply_sparse_attention,
        radius_for_density,
    )
    from fewstep.core.evaluate import Setting, balanced_labels, generate
    from fewstep.core.metrics.quality import evaluate_samples
    from fewstep.core.models.embedded import load_teacher

    teacher = load_teacher()
    labels = balanced_labels(per_class)
    setting = Setting(f"dpmpp_2m {steps} steps cfg {cfg:g}", "dpmpp_2m", steps, cfg=cfg)
    layout, block, tile = TokenLayout((8, 8)), 4, (2, 2)
    densities = [0.25, 0.5, 0.75] if quick else [0.25, 0.375, 0.5, 0.625, 0.75]

    def measure(name: str, pattern=None, schedule=None, noise_seed: int = seed, **extra: Any) -> dict[str, Any]:
        handle = apply_sparse_attention(teacher, pattern, schedule, backend="reference") if pattern else None
        t0 = time.perf_counter()
        try:
            imgs = generate(teacher, setting, labels, seed=noise_seed)
        finally:
            dens = handle.densities() if handle else {}
            if handle:
                handle.remove()
        secs = time.perf_counter() - t0
        row = {"setting": name, **extra, "seconds": round(secs, 2),
               **{k: float(v) for k, v in evaluate_samples(imgs, labels).items()}}
        if dens:
            row["measured_density"] = round(sum(dens.values()) / len(dens), 4)
        print(f"{name}: FD {row['fd']:.3f} acc {row['accuracy']:.3f}", flush=True)
        return row

    rows = [measure("dense", density=1.0, pattern_kind="dense"),
            measure("dense, other noise", density=1.0, pattern_kind="dense_other_noise", noise_seed=seed + 1000)]
    for dens in densities:
        rows.append(measure(f"top-k {dens:g}", TopKPattern(keep_ratio=dens, block_size=block, tile=tile),
                            density=dens, pattern_kind="topk"))
        radius, real = radius_for_density(layout, dens, block, tile)
        rows.append(measure(f"sliding tile r={radius}", SlidingTilePattern(radius, block_size=block, tile=tile),
                            density=round(real, 4), pattern_kind="sliding_tile", radius=radius))
    for dens in ([0.25] if quick else [0.25, 0.5]):
        rows.append(measure(f"top-k {dens:g}, 2 dense steps", TopKPattern(keep_ratio=dens, block_size=block, tile=tile),
                            SparsitySchedule(dense_steps=2), density=dens, pattern_kind="topk_dense2"))
    return {"setting": setting.name, "per_class": per_class, "num_samples": len(labels), "block": block,
            "tile": tile, "rows": rows}


# -------------------------------------------------------------------------------------------------------- plot
def plot(result: dict[str, Any], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    parts = [p for p in ("quality", "kernels") if p in result]
    fig, axes = plt.subplots(1, len(parts), figsize=(6.5 * len(parts), 4.2), squeeze=False)
    for ax, part in zip(axes[0], parts):
        if part == "quality":
            rows = result["quality"]["rows"]
            dense = next(r for r in rows if r["pattern_kind"] == "dense")
            other = next(r for r in rows if r["pattern_kind"] == "dense_other_noise")
            for kind, style in (("topk", "o-"), ("sliding_tile", "s-"), ("topk_dense2", "^--")):
                rs = sorted((r for r in rows if r["pattern_kind"] == kind), key=lambda r: r["density"])
                if rs:
                    ax.plot([r["density"] for r in rs], [r["fd"] for r in rs], style, label=kind)
            ax.axhline(dense["fd"], color="k", ls=":", label="dense")
            ax.axhline(other["fd"], color="gray", ls=":", label="dense, other noise")
            ax.set(xlabel="attention density (fraction of token pairs)", ylabel="FD (lower is better)",
                   title=f"embedded teacher, {result['quality']['setting']}")
        else:
            kr = result["kernels"]
            for (s, d, path_name), style in _kernel_series(kr["rows"]):
                rs = [r for r in kr["rows"] if (r["seq"], r["head_dim"], r["path"]) == (s, d, path_name)
                      and "seconds" in r and r["path"] != "dense_sdpa"]
                ax.plot([r["density"] for r in rs], [r["ratio_to_dense"] for r in rs], style,
                        label=f"{path_name} S={s} D={d}")
            xs = sorted({r["density"] for r in kr["rows"]})
            ax.plot(xs, xs, "k:", label="ideal (density x dense)")
            ax.axhline(1.0, color="gray", ls=":")
            ax.set(xlabel="density", ylabel="time / dense SDPA time", yscale="log",
                   title=f"kernels on {kr['device']} ({kr['dtype']})")
        ax.legend(fontsize=7)
    fig.tight_layout()
    with io.atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=90)
    plt.close(fig)


def _kernel_series(rows):
    keys = sorted({(r["seq"], r["head_dim"], r["path"]) for r in rows if r["path"] != "dense_sdpa"})
    styles = ["o-", "s-", "^-", "d-", "v-", "x-", "+-", "*-"]
    return [(k, styles[i % len(styles)]) for i, k in enumerate(keys)]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--part", choices=["kernels", "quality", "all"], default="all")
    ap.add_argument("--quick", action="store_true", help="fewer sizes and densities")
    ap.add_argument("--device", default=None, help="kernels: cpu or cuda (default: cuda when available)")
    ap.add_argument("--per-class", type=positive_int, default=20)
    ap.add_argument("--steps", type=positive_int, default=8)
    ap.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    args = ap.parse_args(argv)
    out_dir = Path(args.out) if args.out else RESULTS
    path = out_dir / "sparse_attention.json"
    # each part updates its own section of the one results file, so the parts can run separately
    result: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
    command = "python -m fewstep.benchmarks.sparse_attention " + " ".join(argv if argv is not None else sys.argv[1:])
    if args.part in ("kernels", "all"):
        result["kernels"] = {**kernel_benchmark(args.quick, args.device), "machine": machine(), "command": command}
    if args.part in ("quality", "all"):
        result["quality"] = {**quality_benchmark(args.quick, args.per_class, args.steps), "machine": machine(),
                             "command": command}
    path = write_json(result, path.name, out_dir)
    plot(result, path.with_suffix(".png"))
    print(f"wrote {path} and {path.with_suffix('.png').name}")
    return result


if __name__ == "__main__":
    main()
