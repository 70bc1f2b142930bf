"""``calibrate``: one full-compute sampling run of a fewstep ``Denoiser`` with recording hooks on the denoiser and on
its declared block stack (``core.cache.layouts``), fitted by ``recorder.fit_calibration``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from ..identity import find_denoiser, model_fingerprint
from ..layouts import BlockIO, diffusers_layout, layout_blocks
from .recorder import CalibrationRecorder, fit_calibration
from .store import Calibration, CalibrationError


@torch.no_grad()
def calibrate(
    model: nn.Module,
    noise: Tensor,
    extra_args: dict[str, Any] | None = None,
    *,
    sampler: str = "dpmpp_2m",
    steps: int = 50,
    schedule: str = "karras",
    sigmas: Tensor | None = None,
    guidance: Callable[[nn.Module], nn.Module] | None = None,
    head_blocks: int = 1,
    degree: int = 4,
    name: str | None = None,
) -> Calibration:
    """Run ``sampler`` once at full compute and fit the TeaCache polynomials and MagCache curves of ``model``.

    Args:
        model: a fewstep ``Denoiser`` (e.g. ``load_teacher()`` or ``diffusers_denoiser(unet)``).
        noise: unit Gaussian noise ``(B, ...)``; use a few classes / prompts (rows are pooled).
        extra_args: the conditioning (e.g. ``{"class_labels": torch.arange(10)}``).
        sampler: a single-evaluation sampler (``euler``, ``dpmpp_2m``, ``euler_ancestral``, ``lcm`` ...), so that
            consecutive calls are consecutive steps.
        steps, schedule, sigmas: the schedule (``sigmas`` overrides).
        guidance: wraps the denoiser for sampling, e.g. ``lambda d: CFGDenoiser(d, 2.0)`` (cond and uncond rows are
            pooled).
        head_blocks: the head of ``FirstBlockCache`` whose block-stack curve is recorded (``blocks:<h>``).
        degree: TeaCache polynomial degree (TeaCache uses 4).
        name: overrides the model name (default: the denoiser's ``name``).
    """
    from ...models.denoiser import unwrap_output
    from ...sampling.samplers import get_sampler
    from ...sampling.schedules import get_sigmas
    den = find_denoiser(model)
    if den is None:
        raise TypeError(f"calibrate needs a fewstep Denoiser, got {type(model).__name__}; wrap the network with "
                        "fewstep.core.models.Denoiser(...) or diffusers_adapters.diffusers_denoiser(...)")
    model_name, config_hash = model_fingerprint(den, name=name)
    ms = den.model_sampling
    sig = torch.as_tensor(sigmas, dtype=torch.float32) if sigmas is not None else get_sigmas(schedule, ms, steps)
    rec = CalibrationRecorder()
    handles: list[Any] = []
    orig_call = den.call

    def pre(_mod: nn.Module, args: tuple, kwargs: dict) -> None:
        s = args[1] if len(args) > 1 else kwargs["sigma"]
        rec.begin(float(torch.as_tensor(s).reshape(-1)[0]))

    def call(module: nn.Module, x_in: Tensor, t: Tensor, **cond: Any) -> Tensor:
        out = orig_call(module, x_in, t, **cond)
        rec.change("input", x_in)
        rec.change("output", out)
        rec.norm("step", out - x_in)
        return out

    layout = diffusers_layout(den.model, required=False)
    listed = layout_blocks(den.model, layout) if layout is not None else []
    blocks = [b for _, _, b in listed]
    if blocks and not 1 <= head_blocks < len(blocks):
        raise CalibrationError(f"head_blocks must be in [1, {len(blocks) - 1}] for {len(blocks)} blocks")
    handles.append(den.register_forward_pre_hook(pre, with_kwargs=True))
    den.call = call
    if blocks:
        first_io = BlockIO(blocks[head_blocks], listed[head_blocks][0], layout)
        last_io = BlockIO(blocks[-1], listed[-1][0], layout)
        state: dict[str, Tensor] = {}

        def range_in(_m: nn.Module, args: tuple, kwargs: dict) -> None:
            h = first_io.hidden_in(args, kwargs)
            state["range_in"] = h
            rec.change("range_input", h)

        def last_out(_m: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
            h_out = last_io.state_out(out, last_io.state_in(args, kwargs))[0]
            if "range_in" in state and h_out.shape == state["range_in"].shape:
                rec.norm(f"blocks:{head_blocks}", h_out - state.pop("range_in"))

        handles.append(blocks[head_blocks].register_forward_pre_hook(range_in, with_kwargs=True))
        handles.append(blocks[-1].register_forward_hook(last_out, with_kwargs=True))
        norm1 = getattr(blocks[0], layout.modulated, None) if layout.modulated else None
        if isinstance(norm1, nn.Module):
            def modulated(_m: nn.Module, _a: tuple, out: Any) -> None:
                rec.change("modulated", out[0] if isinstance(out, (tuple, list)) else unwrap_output(out))

            handles.append(norm1.register_forward_hook(modulated))
    try:
        runner = guidance(den) if guidance is not None else den
        x = ms.noise_scaling(sig[0], noise, torch.zeros_like(noise), max_denoise=True)
        get_sampler(sampler)(runner, x, sig, extra_args=dict(extra_args or {}), disable=True)
    finally:
        for h in handles:
            h.remove()
        den.call = orig_call
    calls = len(rec.rows)
    if calls != len(sig) - 1:
        raise CalibrationError(f"sampler {sampler!r} made {calls} model calls for {len(sig) - 1} steps; calibrate "
                               "with a single-evaluation sampler (euler, dpmpp_2m, euler_ancestral)")
    cal = fit_calibration(rec, model_name, config_hash, degree=degree, curves=["step"] + (
        [f"blocks:{head_blocks}"] if blocks else []))
    cal.recipe.update({"sampler": sampler, "steps": len(sig) - 1, "schedule": schedule if sigmas is None else "custom",
                       "rows": int(noise.shape[0]), "guidance": guidance is not None, "head_blocks": head_blocks,
                       "degree": degree, "num_blocks": len(blocks) if blocks else 0})
    return cal


