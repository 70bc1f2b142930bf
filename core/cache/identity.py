"""Model identity for calibration lookup: find the fewstep ``Denoiser`` inside a model, and fingerprint a network by
its configuration (``model_fingerprint``) and, where a host wants it, by its weight values (``weights_fingerprint``)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn


def find_denoiser(model: Any) -> Any:
    """The fewstep ``Denoiser`` inside ``model`` (itself, or behind ``CFGDenoiser`` / counting wrappers), or None."""
    from ..models.denoiser import Denoiser

    probe = model
    for _ in range(8):
        if isinstance(probe, Denoiser):
            return probe
        nxt = getattr(probe, "denoiser", None) or getattr(probe, "inner_model", None)
        if nxt is None:
            return None
        probe = nxt
    return None


def jsonable(obj: Any) -> Any:
    """``obj`` with keys sorted and private keys dropped, non-JSON leaves as ``str`` (for hashing)."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in sorted(obj.items(), key=lambda kv: str(kv[0]))
                if not str(k).startswith("_")}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)


def model_fingerprint(model: nn.Module, model_sampling: Any = None, name: str | None = None) -> tuple[str, str]:
    """``(name, config_hash)`` of a denoiser or network.

    The hash covers the network class, its diffusers ``config`` (or, without one, every parameter's name and
    shape) and the model sampling's ``config()``; not the weight values, so a fine-tune keeps its base model's
    calibration while another architecture, size or parameterisation does not (hosts that load arbitrary
    checkpoints, such as ComfyUI, add ``weights_fingerprint``).
    """
    den = find_denoiser(model)
    net = den.model if den is not None else model
    ms = model_sampling if model_sampling is not None else getattr(den, "model_sampling", None)
    name = name or (den.name if den is not None else type(net).__name__)
    cfg = getattr(net, "config", None)
    if cfg is not None and hasattr(cfg, "items"):
        arch: Any = jsonable(dict(cfg))
    else:
        arch = [[n, list(p.shape)] for n, p in net.named_parameters()]
    ms_cfg = ms.config() if ms is not None and hasattr(ms, "config") else None
    payload = {"class": type(net).__name__, "config": arch, "model_sampling": jsonable(ms_cfg)}
    digest = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]
    return name, digest


@torch.no_grad()
def weights_fingerprint(tensors: Iterable[tuple[str, torch.Tensor]], samples: int = 64) -> str:
    """A 16-hex digest of weight *values*: per tensor its name, shape, dtype and ``samples`` evenly strided values
    (exact bytes, in float64), so two checkpoints of one architecture (a teacher and its students, a random init)
    get different digests at a cost independent of the model size. Equal weights always give equal digests."""
    h = hashlib.sha256()
    for name, t in tensors:
        if not isinstance(t, torch.Tensor):
            continue
        flat = t.detach().reshape(-1)
        n = flat.numel()
        idx = torch.linspace(0, max(n - 1, 0), min(samples, n)).round().long().to(flat.device)
        vals = flat[idx].to("cpu", torch.float64) if n else torch.zeros(0, dtype=torch.float64)
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
        h.update(vals.numpy().tobytes())
    return h.hexdigest()[:16]
