"""Train the embedded digits teacher (``fewstep train-teacher``): seeded, resumable, with a progress bar.

Objective: denoising score matching in the model's native parameterisation (Ho et al. 2020, eq. 14, with the
v target of Salimans & Ho 2022): sample a training timestep uniformly, noise a digit to it, regress the
network's output onto ``output_from_denoised(sigma, x0, x)``. Label dropout (10%, inside diffusers' DiT label
embedding) teaches the null class for classifier-free guidance. Weights are an EMA of the online model.
"""

from __future__ import annotations

import copy
import math
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..io import load_torch, save_torch
from .digits import load_digits_tensors
from .embedded import TEACHER_CONFIG, TEACHER_FILE, build_dit, save_model, teacher_model_sampling


def lr_at(step: int, total: int, base: float, warmup: int) -> float:
    """Linear warm-up then cosine decay to 10% of ``base``."""
    if step < warmup:
        return base * (step + 1) / warmup
    p = (step - warmup) / max(1, total - warmup)
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, p))))


def train_teacher(
    out: str | Path | None = None,
    steps: int = 4000,
    batch_size: int = 64,
    lr: float = 4e-4,
    warmup: int = 250,
    ema_decay: float = 0.999,
    seed: int = 0,
    checkpoint_every: int = 200,
    threads: int | None = None,
    progress: bool = True,
    stop_at: int | None = None,
) -> Path:
    """Train (or resume) the teacher and write ``out`` (safetensors + JSON). Returns the path.

    ``out`` defaults to ``./fewstep-teacher/digits_dit_teacher.safetensors``; the package's shipped weights are
    never written (``core.io.check_not_shipped``).

    A checkpoint ``<out>.ckpt`` (model, EMA, optimiser, step, RNG states) is written atomically every
    ``checkpoint_every`` steps; running again with the same arguments resumes from it. ``stop_at`` ends this
    process after that step (with a checkpoint), as an interruption would; the schedule still spans ``steps``.
    """
    from ..checks import check_positive_int
    from ..io import check_not_shipped, check_writable_dir

    check_positive_int("steps", steps)
    check_positive_int("batch_size", batch_size)
    check_positive_int("checkpoint_every", checkpoint_every)
    if threads:
        torch.set_num_threads(threads)
    out = check_not_shipped(Path(out) if out else Path("fewstep-teacher") / TEACHER_FILE)
    check_writable_dir(out.parent)
    ckpt_path = out.with_suffix(".ckpt")
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = build_dit(TEACHER_CONFIG)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.99))
    ms = teacher_model_sampling()
    images, labels = load_digits_tensors("train")
    gen = torch.Generator().manual_seed(seed)
    step, elapsed = 0, 0.0
    losses: list[float] = []
    if ckpt_path.exists():
        ck = load_torch(ckpt_path, "teacher checkpoint")
        model.load_state_dict(ck["model"])
        ema.load_state_dict(ck["ema"])
        opt.load_state_dict(ck["opt"])
        gen.set_state(ck["gen"])
        torch.set_rng_state(ck["torch_rng"])
        step, elapsed, losses = int(ck["step"]), float(ck["elapsed"]), list(ck["losses"])
    model.train()
    sigmas = ms.sigmas
    t0 = time.time() - elapsed
    bar = tqdm(total=steps, initial=step, desc="train teacher", disable=not progress)
    while step < steps:
        idx = torch.randint(0, images.shape[0], (batch_size,), generator=gen)
        x0, y = images[idx], labels[idx]
        t = torch.randint(0, ms.num_timesteps, (batch_size,), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        sigma = sigmas[t]
        x = ms.noise_scaling(sigma, noise, x0)
        target = ms.output_from_denoised(sigma, x0, x)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, lr, warmup)
        pred = model(ms.calculate_input(sigma, x), timestep=t.float(), class_labels=y).sample
        loss = torch.nn.functional.mse_loss(pred, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        d = min(ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.lerp_(pm, 1 - d)
        step += 1
        losses.append(float(loss.detach()))
        bar.update(1)
        if step % 20 == 0:
            bar.set_postfix(loss=f"{sum(losses[-100:]) / len(losses[-100:]):.4f}")
        if step % checkpoint_every == 0 or step == steps or step == stop_at:
            save_torch({"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                                "gen": gen.get_state(), "torch_rng": torch.get_rng_state(), "step": step,
                                "elapsed": time.time() - t0, "losses": losses}, ckpt_path)
        if step == stop_at:
            bar.close()
            return ckpt_path
    bar.close()
    meta = {
        "config": TEACHER_CONFIG,
        "model_sampling": ms.config(),
        "architecture": "diffusers.DiTTransformer2DModel",
        "steps": steps,
        "batch_size": batch_size,
        "lr": lr,
        "ema_decay": ema_decay,
        "seed": seed,
        "train_seconds": round(time.time() - t0, 1),
        "final_loss_avg100": sum(losses[-100:]) / max(1, len(losses[-100:])),
        "null_class": 10,
        "label_dropout": 0.1,
        "torch_threads": torch.get_num_threads(),
    }
    save_model(ema, out, meta)
    return out
