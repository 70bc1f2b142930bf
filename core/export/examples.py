"""Example inputs ``export_onnx`` traces with, and the facts about a diffusers class that shape them.

``default_sample_shape`` / ``default_cond`` / ``resolution_multiple`` read a diffusers config; :func:`example_inputs`
builds the traced batch (noise at two noise levels, the conditions, the guidance scale) with the graph's input names.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["ExampleInputs", "add_guidance_input", "class_info", "default_cond", "default_sample_shape",
           "example_inputs", "guidance_embeds", "resolution_multiple"]


def _config(module: nn.Module) -> Any:
    return getattr(module, "config", None)


def default_sample_shape(module: nn.Module) -> tuple[int, int, int]:
    """``(C, H, W)`` of a diffusers model's input from its config (Flux: latent channels = in_channels / 4)."""
    cfg = _config(module)
    name = type(module).__name__
    if cfg is None or not hasattr(cfg, "in_channels"):
        raise ValueError(f"cannot infer the sample shape of {name}; pass sample_shape=(C, H, W)")
    size = getattr(cfg, "sample_size", None) or 16
    size = size[0] if isinstance(size, (tuple, list)) else size
    if name == "FluxTransformer2DModel":
        return cfg.in_channels // 4, 16, 16
    return cfg.in_channels, int(size), int(size)


def default_cond(module: nn.Module, batch: int, generator: torch.Generator | None = None) -> dict[str, Tensor]:
    """Example conditions for the diffusers classes fewstep wraps (shapes from the config; values random)."""
    cfg = _config(module)
    name = type(module).__name__
    g = generator
    if name == "DiTTransformer2DModel":
        return {"class_labels": torch.randint(0, cfg.num_embeds_ada_norm, (batch,), generator=g)}
    if name == "UNet2DModel":
        if cfg.num_class_embeds:
            return {"class_labels": torch.randint(0, cfg.num_class_embeds, (batch,), generator=g)}
        return {}
    if name == "UNet2DConditionModel":
        return {"encoder_hidden_states": torch.randn(batch, 8, cfg.cross_attention_dim, generator=g)}
    if name in ("SD3Transformer2DModel", "FluxTransformer2DModel"):
        cond = {"encoder_hidden_states": torch.randn(batch, 8, cfg.joint_attention_dim, generator=g),
                "pooled_projections": torch.randn(batch, cfg.pooled_projection_dim, generator=g)}
        if getattr(cfg, "guidance_embeds", False):
            cond["guidance"] = torch.full((batch,), 3.5)
        return cond
    return {}


def resolution_multiple(module: nn.Module) -> int:
    """The factor H and W must be multiples of (downsampling of a UNet, patch size of a transformer)."""
    cfg = _config(module)
    name = type(module).__name__
    if name in ("UNet2DModel", "UNet2DConditionModel"):
        return 2 ** (len(cfg.down_block_types) - 1)
    if name == "FluxTransformer2DModel":
        return 2 * int(getattr(cfg, "patch_size", 1) or 1)
    if cfg is not None and getattr(cfg, "patch_size", None):
        return int(cfg.patch_size)
    return 8


def guidance_embeds(module: nn.Module) -> bool:
    """Whether the network takes a guidance scale itself (Flux-dev's ``guidance_embeds``)."""
    return bool(getattr(_config(module), "guidance_embeds", False))


def class_info(module: nn.Module, null: Any) -> dict[str, Any]:
    """Metadata of a ``class_labels`` condition: number of classes and the null (unconditional) label."""
    cfg = _config(module)
    info: dict[str, Any] = {"kind": "class_labels"}
    n = getattr(cfg, "num_embeds_ada_norm", None) or getattr(cfg, "num_class_embeds", None)
    if n:
        info["num_classes"] = int(n)
    if null is not None and not torch.is_tensor(null):
        info["null"] = int(null)
    elif n and type(module).__name__ == "DiTTransformer2DModel":
        info["null"] = int(n)  # diffusers' LabelEmbedding appends the CFG row at index num_classes
    return info


@dataclass
class ExampleInputs:
    """The traced batch: ``args`` in graph-input order under ``names``; ``cond`` the conditions among them."""

    shape: tuple[int, int, int]
    cond: dict[str, Tensor]
    args: list[Tensor]
    names: list[str]
    device: torch.device

    @property
    def cond_names(self) -> list[str]:
        return list(self.cond)

    def feeds(self) -> dict[str, Any]:
        """The same batch as numpy arrays for onnxruntime."""
        return {n: a.cpu().numpy() for n, a in zip(self.names, self.args)}


def example_inputs(module: nn.Module, ms: Any, sample_shape: Sequence[int] | None,
                   cond: Mapping[str, Tensor] | None, batch: int) -> ExampleInputs:
    """Noise at two noise levels (timesteps spread over 20-80 % of the schedule) and the conditions (default from
    a diffusers config), each with the batch size as its first dim."""
    params = list(module.parameters())
    device = params[0].device if params else torch.device("cpu")
    gen = torch.Generator().manual_seed(0)
    shape = tuple(int(s) for s in (sample_shape or default_sample_shape(module)))
    cond = dict(default_cond(module, batch, gen) if cond is None else cond)
    cond = {k: torch.as_tensor(v).to(device) for k, v in cond.items()}
    for k, v in cond.items():
        if v.ndim == 0 or v.shape[0] != batch:
            raise ValueError(f"example condition {k!r} must have the batch size {batch} as its first dim, got "
                             f"{tuple(v.shape)}")
    g = torch.Generator().manual_seed(1)
    x_in = torch.randn(batch, *shape, generator=g).to(device)
    sig = torch.tensor([ms.percent_to_sigma(0.2 + 0.6 * i / max(batch - 1, 1)) for i in range(batch)])
    t = ms.timestep(sig).float().reshape(batch).to(device)
    return ExampleInputs(shape=shape, cond=cond, args=[x_in, t, *cond.values()],  # type: ignore[arg-type]
                         names=["x_in", "timestep", *cond], device=device)


def add_guidance_input(ex: ExampleInputs, kind: str, default: float) -> None:
    """Append the folded-guidance ``guidance_scale`` input: ``kind="cfg"`` the CFG scale for every sample;
    ``"adapter"`` ``w + 0.5 i``, so the trace sees per-sample scales."""
    batch = ex.args[0].shape[0]
    if kind == "cfg":
        ex.args.append(torch.full((batch,), float(default), device=ex.device))
    elif kind == "adapter":
        ex.args.append(default + 0.5 * torch.arange(batch, dtype=torch.float32, device=ex.device))
    else:
        raise ValueError(f"guidance input kind {kind!r}: expected 'cfg' or 'adapter'")
    ex.names.append("guidance_scale")
