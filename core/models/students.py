"""Load distilled students written by the Lightning export (``callbacks.export.StudentExport``).

A student file is safetensors of a full network (LoRA merged) with a JSON sidecar (also in the safetensors header)
naming the method, the architecture config, the model sampling and the sampler + sigmas it was trained for.
Guidance adapters are loaded with ``core.guidance.adapters.GuidanceAdapter.load`` onto their base model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from .denoiser import Denoiser
from .model_sampling import model_sampling_from_config


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The fewstep metadata of a student / adapter file (from the safetensors header)."""
    from ..io import CorruptFileError, read_safetensors_metadata

    head = read_safetensors_metadata(path)
    try:
        return json.loads(head.get("fewstep", "{}"))
    except json.JSONDecodeError:
        raise CorruptFileError(f"{path}: the fewstep metadata in its header is not valid JSON; re-export the "
                               "file") from None


def load_student(path: str | Path, device: str | torch.device = "cpu") -> tuple[Denoiser, dict[str, Any]]:
    """A distilled DiT student as ``(Denoiser, metadata)``; sample it with ``metadata["sampler"]`` over
    ``metadata["sigmas"]`` (plus ``metadata["sampler_extra"]`` in the sampler's extra_args)."""
    from ..io import read_safetensors
    from .embedded import build_dit, dit_denoiser

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"student weights not found at {path}; train them with `fewstep train-student`")
    meta = read_metadata(path)
    arch = meta.get("architecture", "")
    if not arch.endswith("DiTTransformer2DModel") or not meta.get("config"):
        raise ValueError(f"{path.name}: load_student builds DiT students only (architecture {arch!r})")
    net = build_dit(meta["config"])
    net.load_state_dict(read_safetensors(path)[0])
    net.eval().requires_grad_(False).to(device)
    ms = model_sampling_from_config(meta["model_sampling"])
    return dit_denoiser(net, ms, name=f"{meta.get('teacher', 'dit')}-{meta.get('method', 'student')}"), meta
