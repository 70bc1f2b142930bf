"""DMD2 on a tiny real architecture with text embeddings, under FSDP2 or on one process (not a test module).

    python tests/fsdp_real.py <arch> <out.pt> <devices> [fsdp2|ddp] [lora]

With ``lora`` the student is a peft LoRA (rank 2) and every process takes part in ``export`` (a collective under
FSDP2) into ``<out>.export/student.safetensors``.

Used by tests/test_real_archs.py: rank 0 saves the full (gathered) trained tensors and the counters.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import distill_tiny as tiny  # noqa: E402
import real_archs as ra  # noqa: E402

BATCHES = 3


def fit(arch: str, devices: int, strategy: str = "fsdp2", lora: bool = False):
    from fewstep.callbacks import DMD2Distillation
    from fewstep.callbacks.sharding import FSDP2Strategy

    a = ra.build(arch)
    module = DMD2Distillation(a.teacher, a.shape, guidance_scale=2.0, critic_ratio=2, num_classes=None,
                              cond_pool=a.pool, null=a.null, batch_size=4, lr=1e-3, seed=0,
                              **({"student": "lora", "lora_rank": 2} if lora else {}))
    strat = (FSDP2Strategy() if strategy == "fsdp2" else strategy) if devices > 1 else "auto"
    t = tiny.trainer(module, BATCHES, devices=devices, strategy=strat)
    t.fit(module)
    return t, module


def main(argv: list[str]) -> int:
    arch, out, devices = argv[0], Path(argv[1]), int(argv[2])
    torch.set_num_threads(1)
    import fsdp_tiny

    lora = len(argv) > 4 and argv[4] == "lora"
    t, module = fit(arch, devices, argv[3] if len(argv) > 3 else "fsdp2", lora)
    if lora:
        module.export(out.with_suffix(".export") / "student.safetensors")
    res = {"state": fsdp_tiny.full_state(module), "counters": module.counters(), "sharded": module.is_sharded()}
    if t.global_rank == 0:
        tiny.save_results(res, out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
