"""Trainer options for one process, DDP or FSDP2 (``fewstep train-student --strategy/--devices/--num-nodes/...``).

fewstep has no launcher of its own: Lightning starts the local processes itself (``devices > 1``) or joins the ones
``torchrun`` / SLURM started (it reads their environment variables), so the same command runs on one machine or
many. The checks here fail before any process starts, with the value, the allowed range and the fix.
"""

from __future__ import annotations

from typing import Any

STRATEGIES = ("auto", "ddp", "fsdp2")
PRECISIONS = ("32-true", "bf16-mixed", "16-mixed", "bf16-true", "16-true", "64-true")
FSDP2_PRECISIONS = ("32-true", "bf16-mixed", "bf16-true", "16-true")  # what Lightning's ModelParallelStrategy takes
ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps")


def trainer_options(strategy: str = "auto", devices: int | str = 1, num_nodes: int = 1, precision: str = "32-true",
                    accelerator: str = "cpu", batch_size: int | None = None) -> dict[str, Any]:
    """``lightning.Trainer`` keyword arguments for the given distribution settings (validated).

    Args:
        strategy: ``"auto"`` (one process, or Lightning's choice for several), ``"ddp"`` or ``"fsdp2"``
            (``FSDP2Strategy``: teacher, student and critic sharded over all processes).
        devices: processes per node (an int, or ``"auto"``: every device of the accelerator).
        num_nodes: machines (set by the cluster; with SLURM, match ``--ntasks-per-node`` x ``--nodes``).
        precision: Lightning precision (``"bf16-mixed"``: bf16 autocast, fp32 master weights).
        accelerator: ``"cpu"``, ``"gpu"`` ...
        batch_size: the global batch, checked to split evenly when the world size is known.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"--strategy must be one of {STRATEGIES}, got {strategy!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"--precision must be one of {PRECISIONS}, got {precision!r}")
    if accelerator not in ACCELERATORS:
        raise ValueError(f"--accelerator must be one of {ACCELERATORS}, got {accelerator!r}")
    if devices != "auto":
        try:
            devices = int(devices)
        except (TypeError, ValueError):
            raise ValueError(f"--devices must be a positive integer or 'auto', got {devices!r}") from None
        if devices < 1:
            raise ValueError(f"--devices must be >= 1, got {devices}")
    if int(num_nodes) < 1:
        raise ValueError(f"--num-nodes must be >= 1, got {num_nodes}")
    num_nodes = int(num_nodes)
    if strategy == "fsdp2" and precision not in FSDP2_PRECISIONS:
        raise ValueError(f"--strategy fsdp2 takes --precision in {FSDP2_PRECISIONS}, got {precision!r}; use "
                         "bf16-mixed for mixed precision")
    if batch_size is not None and devices != "auto" and batch_size % (devices * num_nodes):
        raise ValueError(f"--batch-size {batch_size} (global) is not divisible by the {devices * num_nodes} "
                         "processes (--devices x --num-nodes): choose a multiple")
    opts: dict[str, Any] = {"accelerator": accelerator, "devices": devices, "num_nodes": num_nodes,
                            "precision": precision}
    if strategy == "fsdp2":
        from .sharding import FSDP2Strategy

        opts["strategy"] = FSDP2Strategy()
    elif strategy == "ddp":
        opts["strategy"] = "ddp"
    return opts


def is_sharded_run(opts: dict[str, Any]) -> bool:
    """Whether ``opts`` (from ``trainer_options``) shard the networks."""
    from .sharding import FSDP2Strategy

    return isinstance(opts.get("strategy"), FSDP2Strategy)
