"""Evaluating a ComfyUI MODEL as a denoiser: a ``CFGGuider`` and a core routine run inside its sampling run.

Only public ComfyUI entry points are used: ``comfy.samplers.CFGGuider`` / ``KSAMPLER`` to evaluate a MODEL as a
denoiser. Nothing is monkeypatched.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

__all__ = ["make_guider", "run_in_guider"]


def make_guider(model: Any, cfg: float, positive: Any = None, negative: Any = None,
                converted_conds: dict[str, list] | None = None) -> Any:
    """A ``comfy.samplers.CFGGuider`` for ``model``: from CONDITIONING inputs, or from another guider's
    already converted conds (``guider.original_conds``)."""
    import comfy.samplers

    guider = comfy.samplers.CFGGuider(model)
    if converted_conds is not None:
        guider.original_conds = {k: list(v) for k, v in converted_conds.items()}
    else:
        conds = {"positive": positive}
        if negative is not None:
            conds["negative"] = negative
        guider.inner_set_conds(conds)
    guider.set_cfg(cfg)
    return guider


def run_in_guider(guider: Any, fn: Callable[..., Any], like: Tensor, sigmas: Tensor, seed: int | None = None,
                  noise: Tensor | None = None, latent_image: Tensor | None = None,
                  denoise_mask: Tensor | None = None) -> Any:
    """Run ``fn(model, x, sigmas, extra_args, disable)`` inside a full ComfyUI sampling run of ``guider``.

    ComfyUI only evaluates a MODEL inside ``CFGGuider.sample``: that loads the model on its device, encodes the
    conds for it, applies its patches and wrappers, and hands a sampler the denoiser
    ``model(x, sigma, **extra_args) -> x0`` (``KSamplerX0Inpaint``, whose ``inner_model.inner_model.model_sampling``
    the core samplers read). This runs a ``KSAMPLER`` whose function calls ``fn`` with that denoiser and keeps its
    result, so any core routine (a sampler phase, a schedule search) sees the MODEL exactly as a sampler does.

    ``x`` passed to ``fn`` is ``noise`` scaled to ``sigmas[0]`` by the model's ``noise_scaling`` (as every ComfyUI
    sampler starts). ``like`` gives shape/dtype when ``noise`` is None (zeros are used: pass the state to start
    from through ``fn``'s closure instead). The return value of ``fn`` is returned as is; ComfyUI's own
    post-processing of the sampler output (``process_latent_out``) is not applied to it.
    """
    import comfy.samplers

    box: dict[str, Any] = {}

    def _sampler(model, x, sigmas, extra_args=None, callback=None, disable=None, **_):
        box["out"] = fn(model, x, sigmas, extra_args if extra_args is not None else {}, disable)
        return box["out"] if isinstance(box["out"], Tensor) and box["out"].shape == x.shape else x

    if noise is None:
        noise = torch.zeros_like(like)
    if latent_image is None:
        latent_image = torch.zeros_like(noise)
    guider.sample(noise, latent_image, comfy.samplers.KSAMPLER(_sampler), sigmas, denoise_mask=denoise_mask,
                  disable_pbar=True, seed=seed)
    if "out" not in box:  # pragma: no cover - CFGGuider.sample skips the sampler only for empty sigmas
        raise RuntimeError("ComfyUI did not run the sampler (empty sigmas?)")
    return box["out"]
