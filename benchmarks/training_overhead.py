"""Training overhead of Lightning: one DMD2 step through ``lightning.Trainer`` vs the same step in a bare loop.

One DMD2 step = one generator update + one critic update (``critic_ratio=1``), with the shipped recipe otherwise
(1-step generator, real score with CFG 2, GAN head on the real digits), on the embedded teacher's architecture.
Both arms call the same ``DMD2Distillation.generator_loss`` / ``critic_loss``; the bare arm does
``backward`` / gradient clipping / ``step`` by hand, the Lightning arm is a stock ``Trainer`` (no logger, no
checkpointing, no progress bar). Per-step wall and process CPU time are measured between consecutive steps
(everything a step costs, data and hooks included), in interleaved rounds in one process; the result is the
ratio of medians (target <= 1.05), of CPU time on a CPU (a shared machine's wall time mostly measures waiting for a
core) and of wall time on a GPU. JSON in ``benchmarks/results/training_overhead.json``.

``--sharding`` (``sharding_main``): the same DMD2 step under FSDP2 (``callbacks.sharding.FSDP2Strategy``) vs DDP,
both with ``--devices`` processes (Lightning starts them; gloo on CPU), in interleaved rounds in one run: the ratio of
the median per-step times on rank 0, and a memory table (bytes of parameters and of optimizer state held by one
rank: teacher, student, critic + GAN head) for 1 process (no sharding) vs the sharded run.
JSON in ``benchmarks/results/training_overhead_sharding.json``.
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


def rank_memory(module, optimizers) -> dict[str, dict[str, int]]:
    """Bytes held by this process: parameters per network (local shards of DTensors) and optimizer state."""
    from torch.distributed.tensor import DTensor

    def local(t):
        return t.to_local() if isinstance(t, DTensor) else t

    def nbytes(ts):
        return int(sum(local(t).numel() * local(t).element_size() for t in ts))

    seen: set[int] = set()
    params: dict[str, int] = {}
    for name in ("teacher", "student", "critic", "head"):
        sub = getattr(module, name, None)
        if sub is None:
            continue
        ps = [p for p in sub.parameters() if id(p) not in seen]
        seen.update(id(p) for p in ps)
        params[name] = nbytes(ps)
    opt = nbytes(v for o in optimizers for st in o.state.values() for v in st.values()
                 if torch.is_tensor(v) and v.ndim > 0)
    return {"parameters": params, "parameters_total": sum(params.values()), "optimizer_state": opt,
            "total": sum(params.values()) + opt}


def distributed_steps(module, steps: int, strategy, devices: int) -> tuple[list[tuple[float, float]], object]:
    """``steps`` DMD2 steps with ``devices`` CPU processes under ``strategy``; per-step (wall, CPU) seconds."""
    import lightning as L
    from lightning.pytorch.callbacks import Callback

    from fewstep.callbacks import dmd2_optimizer_steps

    class Timer(Callback):
        def __init__(self) -> None:
            self.times: list[tuple[float, float]] = []
            self._last: tuple[float, float] | None = None

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            now = (time.perf_counter(), time.process_time())
            if self._last is not None:
                self.times.append((now[0] - self._last[0], now[1] - self._last[1]))
            self._last = now

    timer = Timer()
    trainer = L.Trainer(accelerator="cpu", devices=devices, strategy=strategy,
                        max_steps=dmd2_optimizer_steps(steps, module.critic_ratio),  # a new trainer counts from 0
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[timer], num_sanity_val_steps=0)
    trainer.fit(module)
    return timer.times, trainer


def sharding_main(args: argparse.Namespace) -> int:
    """FSDP2 vs DDP step time (ratio, one run) and per-rank memory, 1 process vs ``args.devices`` (see docstring)."""
    import torch.distributed as dist

    from fewstep.callbacks.sharding import FSDP2Strategy

    ddp_mod, fsdp_mod = _module(args.batch_size, "cpu"), _module(args.batch_size, "cpu")
    ddp_t: list[tuple[float, float]] = []
    fsdp_t: list[tuple[float, float]] = []
    trainer = None
    for r in range(args.rounds):  # interleaved, alternating order (first round of each arm is warm-up)
        arms = [("ddp", ddp_mod, ddp_t), ("fsdp2", fsdp_mod, fsdp_t)]
        for name, mod, acc in (arms if r % 2 == 0 else arms[::-1]):
            times, tr = distributed_steps(mod, args.steps, "ddp" if name == "ddp" else FSDP2Strategy(), args.devices)
            if r > 0:
                acc += times
            if name == "fsdp2":
                trainer = tr
    sharded_mem = rank_memory(fsdp_mod, trainer.optimizers)
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank != 0:
        return 0
    single = _module(args.batch_size, "cpu")
    opt_g, opt_c = single.configure_optimizers()  # one step of each player: the optimizers hold their state
    loss_g, x0, _ = single.generator_loss(single.sample_ids())
    loss_g.backward()
    opt_g.step()
    loss_c, _ = single.critic_loss(single.sample_ids(), x0)
    loss_c.backward()
    opt_c.step()
    one_mem = rank_memory(single, [opt_g, opt_c])
    med = {arm: [statistics.median(t[i] for t in ts) for i in (0, 1)] for arm, ts in (("ddp", ddp_t),
                                                                                       ("fsdp2", fsdp_t))}
    ratio_wall, ratio_cpu = med["fsdp2"][0] / med["ddp"][0], med["fsdp2"][1] / med["ddp"][1]
    result = {
        "benchmark": "training_overhead_sharding", "method": "dmd2",
        "step": "1 generator + 1 critic update (critic_ratio=1)", "global_batch_size": args.batch_size,
        "devices": args.devices, "backend": "gloo (CPU)", "rounds": args.rounds, "steps_per_round": args.steps,
        "ddp_step_seconds_median": {"wall": round(med["ddp"][0], 5), "cpu": round(med["ddp"][1], 5)},
        "fsdp2_step_seconds_median": {"wall": round(med["fsdp2"][0], 5), "cpu": round(med["fsdp2"][1], 5)},
        "ratio_fsdp2_over_ddp": {"wall": round(ratio_wall, 4), "cpu": round(ratio_cpu, 4)},
        "ratio_note": "wall time is the primary measure here: both arms run the same processes on the same cores, and "
                      "process CPU time also counts gloo's busy waiting in collectives (FSDP2 makes more of them)",
        "memory_bytes_per_rank": {"1 process": one_mem, f"{args.devices} processes fsdp2": sharded_mem},
        "memory_ratio_sharded_over_one": round(sharded_mem["total"] / one_mem["total"], 4),
        "ddp_step_seconds": [[round(a, 5), round(b, 5)] for a, b in ddp_t],
        "fsdp2_step_seconds": [[round(a, 5), round(b, 5)] for a, b in fsdp_t], "machine": machine(),
    }
    path = write_json(result, "training_overhead_sharding.json", args.out)
    print(f"DMD2 step, {args.devices} CPU processes: DDP {med['ddp'][0] * 1000:.0f} ms, FSDP2 "
          f"{med['fsdp2'][0] * 1000:.0f} ms wall (medians over {len(ddp_t)} / {len(fsdp_t)} steps) -> ratio "
          f"{ratio_wall:.3f} wall, {ratio_cpu:.3f} CPU time")
    print(f"{'per rank (MB)':<22}{'1 process':>12}{'FSDP2 x' + str(args.devices):>12}")
    for key in ("teacher", "student", "critic", "head"):
        if key in one_mem["parameters"]:
            print(f"{'params ' + key:<22}{one_mem['parameters'][key] / 2**20:>12.3f}"
                  f"{sharded_mem['parameters'].get(key, 0) / 2**20:>12.3f}")
    print(f"{'optimizer state':<22}{one_mem['optimizer_state'] / 2**20:>12.3f}"
          f"{sharded_mem['optimizer_state'] / 2**20:>12.3f}")
    print(f"{'total':<22}{one_mem['total'] / 2**20:>12.3f}{sharded_mem['total'] / 2**20:>12.3f}; wrote {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch-size", type=positive_int, default=16)
    p.add_argument("--steps", type=positive_int, default=10, help="steps per round and arm")
    p.add_argument("--rounds", type=positive_int, default=3)
    p.add_argument("--threads", type=positive_int, default=1)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--out", default=None)
    p.add_argument("--sharding", action="store_true", help="FSDP2 vs DDP with --devices CPU processes + memory table")
    p.add_argument("--devices", type=int, default=2, help="processes for --sharding (default 2)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    for pat in (".*does not have many workers.*", ".*IterableDataset.*", ".*LitLogger.*", ".*treespec.*",
                ".*in eval mode.*", ".*max_steps.*"):
        warnings.filterwarnings("ignore", pat)
    import logging

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    if args.sharding:
        return sharding_main(args)
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
