"""Training overhead of Lightning: one DMD2 step through ``lightning.Trainer`` vs the same step in a bare loop.

One DMD2 step = one generator update + one critic update (``critic_ratio=1``), with the shipped recipe otherwise
(1-step generator, real score with CFG 2, GAN head on the real digits), on the embedded teacher's architecture.
Both arms call the same ``DMD2Distillation.generator_loss`` / ``critic_loss``; the bare arm does
``backward`` / gradient clipping / ``step`` by hand, the Lightning arm is a stock ``Trainer`` (no logger, no
checkpointing, no progress bar). Per-step wall and process CPU time are measured between consecutive steps
(everything a step costs, data and hooks included), in interleaved rounds in one process; the result is the
ratio of medians (target <= 1.05), of CPU time on a CPU (a shared machine's wall time mostly measures waiting for a
core) and of wall time on a GPU. JSON in ``benchmarks/results/training_overhead.json``.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch

from ..core.checks import positive_int
from .common import machine, write_json


def _module(batch_size: int, device: str):
    from fewstep.callbacks import DMD2Distillation
    from fewstep.core.models.digits import load_digits_tensors
    from fewstep.core.models.embedded import TEACHER_CONFIG, build_dit, dit_denoiser

    torch.manual_seed(0)
    teacher = dit_denoiser(build_dit(TEACHER_CONFIG).eval().requires_grad_(False).to(device), name="teacher")
    x, y = load_digits_tensors("train")
    return DMD2Distillation(teacher, (1, 16, 16), guidance_scale=2.0, critic_ratio=1, batch_size=batch_size,
                            gan_weight=3e-3, gan_critic_weight=1e-2, real_data=x, real_labels=y, lr=2e-5,
                            critic_lr=1e-4).to(device)


def bare_steps(module, steps: int) -> list[float]:
    """``steps`` DMD2 steps in a plain PyTorch loop; ``(wall, process CPU)`` seconds of every step but the first."""
    opt_g, opt_c = module.configure_optimizers()
    gen, crit = module.student_trainable(), module.critic_parameters()
    times, last = [], None
    for _ in range(steps):
        ids = module.sample_ids()
        loss_g, x0, _ = module.generator_loss(ids)
        opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        torch.nn.utils.clip_grad_norm_(gen, module.grad_clip)
        opt_g.step()
        loss_c, _ = module.critic_loss(ids, x0)
        opt_c.zero_grad(set_to_none=True)
        loss_c.backward()
        torch.nn.utils.clip_grad_norm_(crit, module.grad_clip)
        opt_c.step()
        module.batches_seen += 1
        if module.device.type == "cuda":
            torch.cuda.synchronize()
        now = (time.perf_counter(), time.process_time())
        if last is not None:
            times.append((now[0] - last[0], now[1] - last[1]))
        last = now
    return times


def lightning_steps(module, steps: int, device: str) -> list[float]:
    """``steps`` DMD2 steps through a stock ``lightning.Trainer``; ``(wall, process CPU)`` seconds per step."""
    import lightning as L
    from lightning.pytorch.callbacks import Callback

    from fewstep.callbacks import dmd2_optimizer_steps

    class SyncTimer(Callback):
        def __init__(self) -> None:
            self.times: list[tuple[float, float]] = []
            self._last: tuple[float, float] | None = None

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            if pl_module.device.type == "cuda":
                torch.cuda.synchronize()
            now = (time.perf_counter(), time.process_time())
            if self._last is not None:
                self.times.append((now[0] - self._last[0], now[1] - self._last[1]))
            self._last = now

    timer = SyncTimer()
    trainer = L.Trainer(accelerator="gpu" if device == "cuda" else "cpu", devices=1,
                        max_steps=dmd2_optimizer_steps(steps, module.critic_ratio), logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[timer], num_sanity_val_steps=0)
    trainer.fit(module)  # the module's own counters continue from the previous round
    return timer.times


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch-size", type=positive_int, default=16)
    p.add_argument("--steps", type=positive_int, default=10, help="steps per round and arm")
    p.add_argument("--rounds", type=positive_int, default=3)
    p.add_argument("--threads", type=positive_int, default=1)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    for pat in (".*does not have many workers.*", ".*IterableDataset.*", ".*LitLogger.*", ".*treespec.*",
                ".*in eval mode.*", ".*max_steps.*"):
        warnings.filterwarnings("ignore", pat)
    import logging

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    bare_mod, light_mod = _module(args.batch_size, args.device), _module(args.batch_size, args.device)
    bare_steps(bare_mod, 2)  # warm-up both arms
    lightning_steps(light_mod, 2, args.device)
    bare_t: list[tuple[float, float]] = []
    light_t: list[tuple[float, float]] = []
    for r in range(args.rounds):  # interleaved, alternating order: a shared machine's load hits both arms alike
        if r % 2:
            bare_t += bare_steps(bare_mod, args.steps)
            light_t += lightning_steps(light_mod, args.steps, args.device)
        else:
            light_t += lightning_steps(light_mod, args.steps, args.device)
            bare_t += bare_steps(bare_mod, args.steps)
    med = {arm: [statistics.median(t[i] for t in ts) for i in (0, 1)] for arm, ts in (("bare", bare_t),
                                                                                       ("lightning", light_t))}
    ratio_wall, ratio_cpu = med["lightning"][0] / med["bare"][0], med["lightning"][1] / med["bare"][1]
    # on a CPU shared with other processes wall time includes waiting for a core; process CPU time does not
    primary = ratio_cpu if args.device == "cpu" else ratio_wall
    result = {
        "benchmark": "training_overhead", "method": "dmd2", "step": "1 generator + 1 critic update (critic_ratio=1)",
        "batch_size": args.batch_size, "device": args.device, "rounds": args.rounds, "steps_per_round": args.steps,
        "bare_step_seconds_median": {"wall": round(med["bare"][0], 5), "cpu": round(med["bare"][1], 5)},
        "lightning_step_seconds_median": {"wall": round(med["lightning"][0], 5), "cpu": round(med["lightning"][1], 5)},
        "ratio": round(primary, 4), "ratio_measure": "process CPU time" if args.device == "cpu" else "wall time",
        "ratio_wall": round(ratio_wall, 4), "ratio_cpu": round(ratio_cpu, 4), "target_ratio": 1.05,
        "bare_step_seconds": [[round(a, 5), round(b, 5)] for a, b in bare_t],
        "lightning_step_seconds": [[round(a, 5), round(b, 5)] for a, b in light_t], "machine": machine(),
    }
    path = write_json(result, "training_overhead.json", args.out)
    print(f"DMD2 step ({result['ratio_measure']}): bare {med['bare'][1 if args.device == 'cpu' else 0] * 1000:.1f} ms, "
          f"Lightning {med['lightning'][1 if args.device == 'cpu' else 0] * 1000:.1f} ms (medians over {len(bare_t)} / "
          f"{len(light_t)} steps) -> ratio {primary:.3f} (wall-time ratio {ratio_wall:.3f}; target <= 1.05); "
          f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
