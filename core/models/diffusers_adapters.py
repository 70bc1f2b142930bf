"""Adapters that turn diffusers models into fewstep denoisers (``D(x, sigma, **cond) -> x0``).

diffusers is imported lazily by the caller; this module only looks at class names and call signatures, so
``import fewstep`` never imports diffusers. Each adapter is a ``call(module, x_in, timestep, **cond)``
function for ``Denoiser``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .denoiser import Denoiser, unwrap_output
from .model_sampling import DiscreteVP, FlowMatching, ModelSampling

#: condition keywords an SDXL-style UNet2DConditionModel takes inside ``added_cond_kwargs`` (addition_embed_type
#: "text_time": the pooled text embedding and the six size/crop ids, Podell et al. 2023, "SDXL", sec. 2.2)
ADDED_COND_KEYS = ("text_embeds", "time_ids", "image_embeds", "hint")


def call_unet(module: nn.Module, x_in: Tensor, t: Tensor, **cond: Any) -> Tensor:
    """UNet2DModel(sample, timestep, class_labels=...) / UNet2DConditionModel(sample, timestep,
    encoder_hidden_states=..., added_cond_kwargs=...). The added conditions of an SDXL-shaped UNet come as flat
    keywords (``text_embeds``, ``time_ids``: one row per sample, like every other condition) and are gathered into
    ``added_cond_kwargs`` here."""
    added = {k: cond.pop(k) for k in ADDED_COND_KEYS if k in cond}
    if added:
        cond["added_cond_kwargs"] = {**cond.get("added_cond_kwargs", {}), **added}
    return unwrap_output(module(x_in, t, **cond))


def tracing() -> bool:
    """True inside ``torch.export`` / ``torch.compile`` tracing, where value checks on inputs cannot run."""
    return torch.compiler.is_compiling() or torch.compiler.is_exporting()


def call_dit(module: nn.Module, x_in: Tensor, t: Tensor, **cond: Any) -> Tensor:
    """DiTTransformer2DModel(hidden_states, timestep, class_labels): drops the learned-variance half
    (Peebles & Xie 2023, sec. 3.1) when ``out_channels == 2 * in_channels``. Class labels are checked first
    (integers, one per sample or one for all, ``0..num_classes`` where the last id is the null class)."""
    n = getattr(getattr(module, "config", None), "num_embeds_ada_norm", None)
    if n is not None and cond.get("class_labels") is not None and not tracing():
        from ..checks import check_class_labels

        y = cond["class_labels"]
        size = y.numel() if isinstance(y, Tensor) else len(y) if isinstance(y, (list, tuple)) else 1
        check_class_labels(y, None if size == 1 else x_in.shape[0], int(n), null=int(n))
    out = unwrap_output(module(x_in, timestep=t, **cond))
    if out.shape[1] == 2 * x_in.shape[1]:
        out = out[:, : x_in.shape[1]]
    return out


def call_sd3(module: nn.Module, x_in: Tensor, t: Tensor, **cond: Any) -> Tensor:
    """SD3Transformer2DModel(hidden_states, encoder_hidden_states, pooled_projections, timestep)."""
    return unwrap_output(module(hidden_states=x_in, timestep=t, **cond))


def _flux_ids(h: int, w: int, device, dtype) -> Tensor:
    ids = torch.zeros(h, w, 3, device=device, dtype=dtype)
    ids[..., 1] = torch.arange(h, device=device, dtype=dtype)[:, None]
    ids[..., 2] = torch.arange(w, device=device, dtype=dtype)[None, :]
    return ids.reshape(h * w, 3)


def call_flux(module: nn.Module, x_in: Tensor, t: Tensor, encoder_hidden_states: Tensor,
              pooled_projections: Tensor, guidance: Tensor | float | None = None, **cond: Any) -> Tensor:
    """FluxTransformer2DModel on a (B, C, H, W) latent: 2x2 patch packing to tokens and back (Black Forest
    Labs' Flux, as diffusers' FluxPipeline ``_pack_latents``); timestep is sigma in [0, 1]."""
    b, c, h, w = x_in.shape
    if h % 2 or w % 2:
        raise ValueError(f"Flux latents need even height and width, got {h}x{w}")
    tokens = x_in.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)
    img_ids = _flux_ids(h // 2, w // 2, x_in.device, x_in.dtype)
    txt_ids = torch.zeros(encoder_hidden_states.shape[1], 3, device=x_in.device, dtype=x_in.dtype)
    if guidance is not None:
        guidance = torch.as_tensor(guidance, device=x_in.device, dtype=x_in.dtype).expand(b)
    out = unwrap_output(module(hidden_states=tokens, timestep=t, guidance=guidance,
                               encoder_hidden_states=encoder_hidden_states, pooled_projections=pooled_projections,
                               img_ids=img_ids, txt_ids=txt_ids, **cond))
    return out.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


def call_wan(module: nn.Module, x_in: Tensor, t: Tensor, encoder_hidden_states: Tensor, **cond: Any) -> Tensor:
    """WanTransformer3DModel(hidden_states (B, C, F, H, W), timestep, encoder_hidden_states) (Wan 2.1, Wan Team
    2025; flow matching with timestep = 1000 sigma); the sample is the 5-D video latent itself."""
    return unwrap_output(module(hidden_states=x_in, timestep=t, encoder_hidden_states=encoder_hidden_states,
                                **cond))


_CALLS = {
    "UNet2DModel": call_unet,
    "UNet2DConditionModel": call_unet,
    "DiTTransformer2DModel": call_dit,
    "SD3Transformer2DModel": call_sd3,
    "FluxTransformer2DModel": call_flux,
    "WanTransformer3DModel": call_wan,
}


def default_model_sampling(module: nn.Module) -> ModelSampling:
    """A sensible ``ModelSampling`` for a diffusers class: SD-style discrete eps for UNets/DiT, flow for
    SD3 (timestep = 1000 sigma), Flux (timestep = sigma) and Wan 2.1 (timestep = 1000 sigma, shift 5 as its 480p
    pipeline)."""
    name = type(module).__name__
    if name == "WanTransformer3DModel":
        return FlowMatching(shift=5.0, multiplier=1000.0)
    if name == "FluxTransformer2DModel":
        return FlowMatching(shift=3.0, multiplier=1.0)
    if name == "SD3Transformer2DModel":
        return FlowMatching(shift=3.0, multiplier=1000.0)
    return DiscreteVP("eps", "scaled_linear")


def diffusers_denoiser(module: nn.Module, model_sampling: ModelSampling | None = None, **kwargs: Any) -> Denoiser:
    """Wrap a diffusers model (UNet2DModel, UNet2DConditionModel, DiTTransformer2DModel, SD3Transformer2DModel,
    FluxTransformer2DModel, WanTransformer3DModel) as a fewstep ``Denoiser``."""
    name = type(module).__name__
    call = _CALLS.get(name)
    if call is None:
        raise TypeError(
            f"no diffusers adapter for {name}; supported: {', '.join(_CALLS)}. For another model pass "
            "Denoiser(model, model_sampling, call=your_call)"
        )
    return Denoiser(module, model_sampling or default_model_sampling(module), call=call, name=name, **kwargs)
