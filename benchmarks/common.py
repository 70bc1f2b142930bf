"""Shared helpers for benchmark scripts: results folder, atomic JSON, machine description."""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Any

import torch

from ..core import io

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict[str, Any]:
    info = {"python": platform.python_version(), "torch": torch.__version__, "cpu": platform.processor() or
            platform.machine(), "threads": torch.get_num_threads(), "cuda": torch.cuda.is_available()}
    if torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name(0)
    return info


def write_json(obj: Any, name: str, out_dir: str | Path | None = None) -> Path:
    out = Path(out_dir) if out_dir else RESULTS
    out.mkdir(parents=True, exist_ok=True)
    path = out / name
    return io.write_json(path, obj)
