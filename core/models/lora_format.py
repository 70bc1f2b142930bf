"""LoRA and weight-delta files in the key format ComfyUI's LoRA loader reads, and DARE drop-and-rescale.

ComfyUI (``comfy/lora.py`` ``load_lora`` + ``comfy/weight_adapter/lora.py``, v0.3.75) maps a LoRA key prefix ``x``
to a model weight through ``model_lora_keys_unet``; for every model the generic form
``x = "diffusion_model.<module path>"`` names the weight ``diffusion_model.<module path>.weight``. For ``x`` it reads

- ``x.lora_up.weight`` (out x r), ``x.lora_down.weight`` (r x in), optional ``x.alpha`` (scalar): the weight
  becomes ``W + strength * (alpha / r) * up @ down`` (LoRA, Hu et al. 2022, eq. 3);
- ``x.diff`` (a full delta, ``W + strength * diff``) and ``x.diff_b`` (bias delta).

DARE (Yu et al. 2024, "Language Models are Super Mario: Absorbing Abilities from Homologous Models as a Free
Lunch", eq. 1-2): drop each entry of a weight delta with probability ``p`` and rescale the rest by ``1 / (1 - p)``;
the expected delta is unchanged. ``dare_lora`` applies the same idea to the rank-one components of a LoRA
(``up @ down = sum_i up[:, i] down[i]``), which makes the file genuinely smaller (rank ``r -> ~(1 - p) r``).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

COMFY_PREFIX = "diffusion_model."


def lora_scale(alpha: float | None, rank: int) -> float:
    """ComfyUI's and peft's LoRA scale ``alpha / r`` (1 without alpha)."""
    return 1.0 if alpha is None else float(alpha) / rank


def merge_lora(weight: Tensor, down: Tensor, up: Tensor, alpha: float | None = None, strength: float = 1.0) -> Tensor:
    """``W + strength * (alpha / r) * up @ down`` (reshaped to ``W``'s shape), computed in float32."""
    delta = (up.float().flatten(1) @ down.float().flatten(1)) * lora_scale(alpha, down.shape[0])
    return (weight.float() + strength * delta.reshape(weight.shape)).to(weight.dtype)


#: key prefix of the kohya / diffusers-UNet LoRA form: ``lora_unet_<diffusers module path with "_" for ".">``
KOHYA_UNET_PREFIX = "lora_unet_"


def lora_key_prefix(network: object) -> str:
    """The LoRA key prefix ComfyUI maps onto ``network``'s weights: a diffusers ``UNet2DConditionModel`` is loaded
    by ComfyUI under other (ldm) module paths, which ``model_lora_keys_unet`` reaches from the kohya form
    ``lora_unet_<diffusers path>`` (``KOHYA_UNET_PREFIX``); every other network keeps ComfyUI's generic
    ``diffusion_model.<module path>`` (``COMFY_PREFIX``)."""
    return KOHYA_UNET_PREFIX if type(network).__name__ == "UNet2DConditionModel" else COMFY_PREFIX


def comfy_lora_state_dict(factors: Mapping[str, tuple[Tensor, Tensor, float | None]], prefix: str = COMFY_PREFIX,
                          dtype: torch.dtype | None = None) -> dict[str, Tensor]:
    """ComfyUI LoRA tensors from ``{module path: (down (r x in), up (out x r), alpha)}``. With the kohya prefix
    (``KOHYA_UNET_PREFIX``) the module path's dots become underscores."""
    out: dict[str, Tensor] = {}
    for name, (down, up, alpha) in factors.items():
        key = f"{prefix}{name.replace('.', '_')}" if prefix == KOHYA_UNET_PREFIX else f"{prefix}{name}"
        out[f"{key}.lora_down.weight"] = down.detach().to(dtype or down.dtype).contiguous().cpu()
        out[f"{key}.lora_up.weight"] = up.detach().to(dtype or up.dtype).contiguous().cpu()
        if alpha is not None:
            out[f"{key}.alpha"] = torch.tensor(float(alpha))
    return out


def comfy_diff_state_dict(deltas: Mapping[str, Tensor], prefix: str = COMFY_PREFIX,
                          dtype: torch.dtype | None = None) -> dict[str, Tensor]:
    """ComfyUI "diff" tensors from ``{state-dict key: delta}``: ``*.weight -> <prefix><module>.diff``,
    ``*.bias -> <prefix><module>.diff_b``; other keys use the generic ``<prefix><key>.diff`` form (with the kohya
    prefix only weights and biases, dots as underscores)."""
    out: dict[str, Tensor] = {}
    for key, delta in deltas.items():
        d = delta.detach().to(dtype or delta.dtype).contiguous().cpu()
        if prefix == KOHYA_UNET_PREFIX:  # module path with "_" for "."; ComfyUI maps weight and bias through it
            module, _, leaf = key.rpartition(".")
            if leaf in ("weight", "bias"):
                out[f"{prefix}{module.replace('.', '_')}.{'diff' if leaf == 'weight' else 'diff_b'}"] = d
            continue
        if key.endswith(".weight"):
            out[f"{prefix}{key[: -len('.weight')]}.diff"] = d
        elif key.endswith(".bias"):
            out[f"{prefix}{key[: -len('.bias')]}.diff_b"] = d
        else:
            out[f"{prefix}{key}.diff"] = d
    return out


def _check_p(p: float) -> None:
    if not 0.0 <= p < 1.0:
        raise ValueError(f"DARE drop probability must be in [0, 1), got {p}")


def dare(delta: Tensor, p: float, seed: int = 1) -> Tensor:
    """Drop entries of ``delta`` with probability ``p`` and rescale the kept ones by ``1 / (1 - p)`` (DARE eq. 1-2);
    seeded, so an export is reproducible."""
    _check_p(p)
    if p == 0.0:
        return delta.clone()
    g = torch.Generator().manual_seed(int(seed))
    keep = torch.rand(delta.shape, generator=g) >= p
    return torch.where(keep.to(delta.device), delta / (1.0 - p), torch.zeros_like(delta))


def dare_lora(down: Tensor, up: Tensor, alpha: float | None, p: float, seed: int = 1
              ) -> tuple[Tensor, Tensor, float | None]:
    """DARE on the rank-one components of a LoRA: keep each component with probability ``1 - p``, rescale by
    ``1 / (1 - p)``; ``alpha`` is adjusted so ComfyUI's ``alpha / r`` scale stays that of the original rank. At least
    one component is kept. Returns ``(down', up', alpha')`` of rank ``r' <= r``."""
    _check_p(p)
    r = down.shape[0]
    if p == 0.0:
        return down.clone(), up.clone(), alpha
    g = torch.Generator().manual_seed(int(seed))
    keep = torch.rand(r, generator=g) >= p
    if not keep.any():
        keep[torch.randint(r, (1,), generator=g)] = True
    idx = keep.nonzero().flatten()
    r2 = len(idx)
    scale = lora_scale(alpha, r)  # original alpha / r
    # new alpha' with alpha' / r' == scale, and the 1/(1-p) rescale folded into up
    return down[idx].clone(), up[:, idx] / (1.0 - p), scale * r2
