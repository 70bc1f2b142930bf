"""FSDP2 runs of the tiny distillation problems (``distill_tiny``) for tests/test_lightning_fsdp.py (not a test module).

    python tests/fsdp_tiny.py <method|all> <out.pt> <devices> <work_dir> [batches] [resume_at|-] [json overrides]

The JSON overrides go to the module builder, except ``"bf16_methods": [...]`` (methods also trained in
bf16-mixed), ``"lora_methods"`` (also trained with a LoRA student) and ``"ac_methods"`` (with activation
checkpointing).

With ``devices > 1`` every fit runs under ``FSDP2Strategy`` (gloo on CPU). Per method it trains ``batches`` batches
with a ``StudentEMA``, and, if ``resume_at`` is given, trains ``resume_at`` batches, saves a sharded checkpoint,
and resumes it in a fresh module up to ``batches``. Rank 0 saves full (gathered) tensors of every run.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import distill_tiny as tiny  # noqa: E402

LORA = {"student": "lora", "lora_rank": 2}


def full_state(module) -> dict[str, torch.Tensor]:
    """Every tensor of the module's state dict, gathered to full tensors (a collective under FSDP)."""
    from fewstep.callbacks.sharding import full_tensor

    return {k: full_tensor(v.detach()).clone() for k, v in module.state_dict().items()}


def ema_state(ema) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in ema.state_dict()["ema"].items()}


def placement(module, trainer) -> dict[str, object]:
    """How the module's tensors are held: sharded or not per network, and which parameters have optimizer state."""
    from torch.distributed.tensor import DTensor

    teacher = [p for p in module.teacher.parameters() if not p.requires_grad]
    opt_ids = {id(p) for o in trainer.optimizers for p in o.state}
    return {"teacher_params": len(teacher), "teacher_sharded": sum(isinstance(p, DTensor) for p in teacher),
            "teacher_with_optimizer_state": sum(id(p) in opt_ids for p in teacher),
            "student_sharded": sum(isinstance(p, DTensor) for p in module.student_trainable()),
            "student_trainable": len(module.student_trainable())}


def fit(method: str, work: Path, batches: int, devices: int, ckpt_path: str | None = None,
        save_to: Path | None = None, precision: str = "32-true", activation_checkpointing: bool = False,
        **over) -> tuple:
    from fewstep.callbacks import StudentEMA
    from fewstep.callbacks.sharding import FSDP2Strategy

    module = tiny.build(method, work, **over)
    ema = StudentEMA(0.5, warmup=False)
    strategy = FSDP2Strategy(activation_checkpointing=activation_checkpointing) if devices > 1 else "auto"
    t = tiny.trainer(module, batches, callbacks=[ema], devices=devices, strategy=strategy, precision=precision)
    t.fit(module, ckpt_path=ckpt_path)
    if save_to is not None:
        t.save_checkpoint(save_to)
    return t, module, ema


def main(argv: list[str]) -> int:
    method, out, devices, work = argv[0], Path(argv[1]), int(argv[2]), Path(argv[3])
    batches = int(argv[4]) if len(argv) > 4 else 4
    resume_at = int(argv[5]) if len(argv) > 5 and argv[5] != "-" else None
    over = json.loads(argv[6]) if len(argv) > 6 else {}
    bf16 = over.pop("bf16_methods", [])  # also trained with precision="bf16-mixed" (fp32 master weights)
    lora = over.pop("lora_methods", [])  # also trained with a peft LoRA student (rank 2)
    ac = over.pop("ac_methods", [])  # also trained with activation checkpointing of the diffusers blocks
    torch.set_num_threads(1)
    results, rank = {}, 0
    for m in (tiny.METHODS if method == "all" else method.split(",")):
        t, module, ema = fit(m, work, batches, devices, **over)
        rank = t.global_rank
        res = {"state": full_state(module), "ema": ema_state(ema), "counters": module.counters(),
               "sharded": module.is_sharded(), "placement": placement(module, t)}
        if resume_at is not None:
            ckpt = work / f"{m}_sharded.ckpt"
            fit(m, work, resume_at, devices, save_to=ckpt, **over)
            t2, resumed, ema2 = fit(m, work, batches, devices, ckpt_path=str(ckpt), **over)
            res["resumed"] = {"state": full_state(resumed), "ema": ema_state(ema2), "counters": resumed.counters(),
                              "checkpoint_is_dir": ckpt.is_dir()}
        results[m] = res
    for m in bf16:
        t, module, ema = fit(m, work, batches, devices, precision="bf16-mixed", **over)
        results[f"{m}/bf16-mixed"] = {"state": full_state(module), "counters": module.counters()}
    for m in ac:
        t, module, ema = fit(m, work, batches, devices, activation_checkpointing=True, **over)
        checkpointing = [n.gradient_checkpointing for n in (module.student.model, module.critic.model)]
        results[f"{m}/ac"] = {"state": full_state(module), "counters": module.counters(),
                              "gradient_checkpointing": checkpointing}
    for m in lora:
        t, module, ema = fit(m, work, batches, devices, **{**over, **LORA})
        results[f"{m}/lora"] = {"state": full_state(module), "ema": ema_state(ema), "counters": module.counters(),
                                "placement": placement(module, t)}
    if rank == 0:
        tiny.save_results(results, out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
