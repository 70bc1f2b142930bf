"""The modules ``export_onnx`` traces: the raw network behind a denoiser, with guidance optionally folded in.

- :class:`NetworkGraph`: ``(x_in, timestep, *conds) -> native output`` (what ComfyUI's ``apply_model`` calls);
- :class:`CFGGraph`: classifier-free guidance folded into one graph (Ho & Salimans 2022, eq. 6);
- :class:`AdaptedGraph`: a guidance adapter folded in (Jensen et al. 2025, sec. 3);
- :func:`unwrap_denoiser`: which of these a user's denoiser asks for.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ..guidance.cfg import CFGDenoiser
from ..models.denoiser import Denoiser

__all__ = ["AdaptedGraph", "CFGGraph", "NetworkGraph", "is_adapted", "unwrap_denoiser", "wrap_guidance"]


class NetworkGraph(nn.Module):
    """The exported graph: ``call(model, x_in, timestep, **cond)`` with the conditions as positional inputs."""

    def __init__(self, denoiser: Denoiser, cond_names: Sequence[str]) -> None:
        super().__init__()
        self.model = denoiser.model
        self.call = denoiser.call
        self.cond_names = tuple(cond_names)

    def forward(self, x_in: Tensor, timestep: Tensor, *conds: Tensor) -> Tensor:
        return self.call(self.model, x_in, timestep, **dict(zip(self.cond_names, conds)))


class CFGGraph(nn.Module):
    """Classifier-free guidance folded into one graph (Ho & Salimans 2022, eq. 6, fewstep convention): cond and
    uncond stacked in one batch, combined as ``uncond + w (cond - uncond)`` with ``w`` the last input."""

    def __init__(self, net: NetworkGraph, cond_key: str, null: Tensor) -> None:
        super().__init__()
        self.net = net
        self.cond_key = cond_key
        self.register_buffer("null", null, persistent=False)

    def forward(self, x_in: Tensor, timestep: Tensor, *rest: Tensor) -> Tensor:
        conds, scale = rest[:-1], rest[-1]
        doubled = []
        for name, v in zip(self.net.cond_names, conds):
            if name == self.cond_key:
                null = self.null.to(v.dtype)
                null = null.expand(v.shape) if null.ndim == 0 else null.expand(v.shape[0], *null.shape[1:])
                doubled.append(torch.cat([v, null]))
            else:
                doubled.append(torch.cat([v, v]))
        out = self.net(torch.cat([x_in, x_in]), torch.cat([timestep, timestep]), *doubled)
        b = x_in.shape[0]
        cond, uncond = out[:b], out[b:]  # not chunk(2): its ceil-division guard pins a dynamic batch to one size
        return uncond + scale.reshape(-1, *([1] * (out.ndim - 1))) * (cond - uncond)


class AdaptedGraph(nn.Module):
    """A network with a guidance adapter folded in (Adapter Guidance Distillation, Jensen et al. 2025, sec. 3;
    ``core.guidance.adapters``): the adapter's hooks run inside the traced forward with the per-sample scale ``w``
    (the last input, fewstep convention), so guidance costs no extra pass on the device."""

    def __init__(self, net: NetworkGraph, adapter: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.adapter = adapter

    def forward(self, x_in: Tensor, timestep: Tensor, *rest: Tensor) -> Tensor:
        with self.adapter.scale(rest[-1]):  # (B,) already: no batch expansion, so no guard on the batch size
            return self.net(x_in, timestep, *rest[:-1])


def is_adapted(m: nn.Module) -> bool:
    """``core.guidance.adapters.AdaptedDenoiser`` (duck-typed: a denoiser plus an adapter with ``scale(w)``)."""
    return hasattr(m, "denoiser") and hasattr(getattr(m, "adapter", None), "scale")


def unwrap_denoiser(denoiser: nn.Module) -> tuple[Denoiser, CFGDenoiser | None, nn.Module | None]:
    """``(inner Denoiser, the CFGDenoiser around it or None, the AdaptedDenoiser around it or None)``."""
    cfg = denoiser if isinstance(denoiser, CFGDenoiser) else None
    adapted = denoiser if cfg is None and is_adapted(denoiser) else None
    inner = cfg.denoiser if cfg is not None else adapted.denoiser if adapted is not None else denoiser
    if isinstance(inner, CFGDenoiser) or is_adapted(inner):
        raise TypeError("export one guidance mechanism: a CFGDenoiser or an AdaptedDenoiser around a Denoiser")
    if not isinstance(inner, Denoiser):
        raise TypeError(
            f"export_onnx needs a fewstep Denoiser (or a CFGDenoiser around one), got {type(inner).__name__}; wrap "
            "your network with fewstep.core.models.Denoiser(module, model_sampling, call=...) or "
            "diffusers_adapters.diffusers_denoiser(model)"
        )
    return inner, cfg, adapted


def wrap_guidance(den: Denoiser, cond_names: Sequence[str], cfg: CFGDenoiser | None, adapted: nn.Module | None,
                  device: torch.device) -> nn.Module:
    """The module to trace: the network, with CFG or a guidance adapter folded in when the user's denoiser has one."""
    net: nn.Module = NetworkGraph(den, cond_names)
    if cfg is not None:
        return CFGGraph(net, cfg.cond_key, torch.as_tensor(cfg.null, device=device))
    if adapted is not None:
        return AdaptedGraph(net, adapted.adapter)
    return net
