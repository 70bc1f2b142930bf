"""Content hashes of node inputs: tensors (subsampled), containers, scalars, and a whole ComfyUI MODEL."""

from __future__ import annotations

import hashlib
from typing import Any

import torch
from torch import Tensor

from .model_info import model_sampling_of

__all__ = ["comfy_model_digest", "digest"]


def _update(h: Any, obj: Any, depth: int = 0) -> None:
    if depth > 6:
        h.update(b"<deep>")
        return
    if isinstance(obj, Tensor):
        t = obj.detach()
        h.update(f"T{tuple(t.shape)}{t.dtype}".encode())
        flat = t.reshape(-1)
        if flat.numel() > 4096:
            flat = flat[:: flat.numel() // 4096 + 1]
        try:
            h.update(flat.to("cpu", torch.float64).numpy().tobytes())
        except (RuntimeError, TypeError):  # dtypes without a float64 cast (quantized weights): shape only
            h.update(b"?")
    elif isinstance(obj, dict):
        for k in sorted(obj, key=str):
            h.update(str(k).encode())
            _update(h, obj[k], depth + 1)
    elif isinstance(obj, (list, tuple)):
        h.update(f"L{len(obj)}".encode())
        for v in obj:
            _update(h, v, depth + 1)
    elif obj is None or isinstance(obj, (bool, int, float, str)):
        h.update(repr(obj).encode())
    else:
        h.update(type(obj).__qualname__.encode())


def digest(*objs: Any) -> str:
    """A short, stable hash of tensors (subsampled), containers and scalars; other objects by type name."""
    h = hashlib.sha1()
    for obj in objs:
        _update(h, obj)
    return h.hexdigest()[:16]


def comfy_model_digest(model: Any) -> str:
    """A 16-hex digest identifying a ComfyUI MODEL by content (unlike ``core.cache.model_fingerprint``, which
    returns ``(name, config_hash)`` of the architecture only): architecture, model sampling, a subsample of its
    weights, the ids of its weight patches (LoRAs) and the names of its wrappers / model-function patches."""
    base = model.model
    ms = model_sampling_of(model)
    sd = base.diffusion_model.state_dict() if hasattr(base, "diffusion_model") else base.state_dict()
    keys = sorted(sd)
    picked = [keys[i] for i in sorted({round(j * (len(keys) - 1) / 7) for j in range(8)})] if keys else []
    options = model.model_options
    return digest(
        type(base).__qualname__, str(getattr(base, "model_type", "")), type(ms).__qualname__,
        getattr(ms, "sigmas", None), len(keys), {k: sd[k] for k in picked}, str(getattr(model, "patches_uuid", "")),
        sorted(str(k) for k in options.get("transformer_options", {})), sorted(str(k) for k in options),
    )
