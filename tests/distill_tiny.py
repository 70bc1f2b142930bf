"""Tiny distillation problems shared by tests/test_lightning*.py and the DDP script (not a test module).

Run as a script to train one or all methods and save the student's weights (used by the DDP test):

    python tests/distill_tiny.py <method|all> <out.pt> <devices> <work_dir> [batches]
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import torch

TINY = {"num_attention_heads": 2, "attention_head_dim": 8, "in_channels": 1, "out_channels": 1, "num_layers": 1,
        "sample_size": 8, "patch_size": 2, "norm_type": "ada_norm_zero", "num_embeds_ada_norm": 10,
        "activation_fn": "gelu-approximate"}
SHAPE = (1, 8, 8)
METHODS = ("dmd2", "consistency", "reflow", "agd")


def save_results(results: dict, out: Path) -> None:
    """Rank 0's results for the parent test: written atomically, plain tensors and numbers (read without pickle)."""
    from fewstep.core.io import save_torch

    save_torch(results, out, keep_previous=False)


def run_ranks(script: str, args: list[str], out: Path, timeout: int = 900) -> dict:
    """Run ``tests/<script> *args`` (it starts its own ranks), with one thread per process; assert it succeeded and
    return what it saved to ``out`` (``torch.load(weights_only=True)``)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve().parent / script), *args], env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return torch.load(out, weights_only=True)


def quiet() -> None:
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*IterableDataset.*")
    warnings.filterwarnings("ignore", ".*LitLogger.*")
    warnings.filterwarnings("ignore", ".*reproducible.*")
    import logging

    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)


def tiny_teacher(seed: int = 0, **over):
    from fewstep.core.models.embedded import build_dit, dit_denoiser

    torch.manual_seed(seed)
    net = build_dit({**TINY, **over}).eval().requires_grad_(False)
    with torch.no_grad():  # diffusers zero-initialises the adaLN modulation: give the teacher some structure
        for p in net.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.02)
    return dit_denoiser(net, name="tiny-dit")


def real_data(n: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 10
    base = torch.linspace(-1, 1, 64).reshape(1, 1, 8, 8)
    x = (base * (labels.float().reshape(-1, 1, 1, 1) / 5 - 1) + 0.1 * torch.randn(n, *SHAPE, generator=g))
    return x.clamp(-1, 1), labels


def trajectories(work: Path, teacher, guidance) -> Path:
    from fewstep.core.trajectories import generate_trajectories

    name = "traj_" + "_".join(str(g) for g in ([guidance] if isinstance(guidance, float) else guidance))
    return generate_trajectories(teacher, work / name, num_samples=32, sample_shape=SHAPE, guidance=guidance,
                                 steps=3, shard_size=16, batch_size=16, progress=False, seed=1)


def build(method: str, work: Path, **over):
    """A tiny module for ``method`` (trajectories are generated into ``work`` once)."""
    from fewstep.callbacks import (
        ConsistencyDistillation,
        DMD2Distillation,
        GuidanceAdapterDistillation,
        ReflowDistillation,
    )

    work = Path(work)
    teacher = over.pop("teacher", None) or tiny_teacher()
    common = {"batch_size": 8, "lr": 1e-3, "seed": 0}
    x, y = real_data()
    if method == "dmd2":
        kw = {**common, "critic_ratio": 2, "gan_weight": 0.01, "gan_critic_weight": 0.01, "divergence": "js",
              "real_data": x, "real_labels": y, **over}
        return DMD2Distillation(teacher, SHAPE, **kw)
    if method == "consistency":
        kw = {**common, "guidance": (1.0, 3.0), "segments": 2, "num_grid": 8, "target_ema": 0.5, "adapter_rank": 2,
              "real_labels": y, **over}
        return ConsistencyDistillation(teacher, SHAPE, x, **kw)
    if method == "reflow":
        kw = {**common, "time_sampling": "u_shaped", **over}
        return ReflowDistillation(teacher, SHAPE, trajectories(work, teacher, 2.0), **kw)
    if method == "agd":
        kw = {**common, "rank": 2, "embed_dim": 16, "hidden": 16, **over}
        return GuidanceAdapterDistillation(teacher, SHAPE, trajectories(work, teacher, (1.0, 3.0)), **kw)
    raise ValueError(method)


def max_steps(module, batches: int) -> int:
    from fewstep.callbacks import dmd2_optimizer_steps

    return dmd2_optimizer_steps(batches, module.critic_ratio, getattr(module, "critic_warmup", 0)) \
        if module.method == "dmd2" else batches


def trainer(module, batches: int, callbacks=(), **kw):
    import lightning as L

    quiet()
    opts = {"accelerator": "cpu", "devices": 1, "max_steps": max_steps(module, batches), "logger": False,
            "enable_checkpointing": False, "enable_progress_bar": False, "enable_model_summary": False,
            "callbacks": list(callbacks), "num_sanity_val_steps": 0, **kw}
    return L.Trainer(**opts)


def trained_state(module) -> dict[str, torch.Tensor]:
    """Everything a run changes: student and critic/head tensors (teacher excluded)."""
    frozen = {t.untyped_storage().data_ptr() for t in list(module.teacher.parameters())
              + list(module.teacher.buffers())}
    return {k: v.detach().clone() for k, v in module.state_dict().items()
            if v.untyped_storage().data_ptr() not in frozen}


def main(argv: list[str]) -> int:
    method, out, devices, work = argv[0], Path(argv[1]), int(argv[2]), Path(argv[3])
    batches = int(argv[4]) if len(argv) > 4 else 4
    torch.set_num_threads(1)
    results, rank = {}, 0
    for m in (METHODS if method == "all" else (method,)):
        module = build(m, work)
        t = trainer(module, batches, devices=devices, strategy="ddp" if devices > 1 else "auto")
        t.fit(module)
        rank = t.global_rank
        results[m] = {"state": trained_state(module), "counters": module.counters()}
    if rank == 0:
        save_results(results, out)
    return 0

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
