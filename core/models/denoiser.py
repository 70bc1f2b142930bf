"""The one convention every fewstep op sees: a denoiser ``D(x, sigma, **cond) -> x0_hat``.

``Denoiser`` wraps any ``nn.Module`` that maps ``(scaled input, timestep, **cond)`` to its native
output, together with the ``ModelSampling`` that converts between the two worlds (Karras et al.
2022, eq. 7: ``D(x; sigma) = c_skip x + c_out F(c_in x; c_noise)``). Samplers in
``core.sampling`` take a denoiser and find its ``model_sampling`` attribute, exactly as ComfyUI's
k-diffusion samplers find ``model.inner_model.inner_model.model_sampling``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from .model_sampling import ModelSampling
from .model_sampling import get_model_sampling as get_model_sampling  # re-exported: it moved to model sampling

ModelCall = Callable[..., Tensor]


def default_call(module: nn.Module, x_in: Tensor, timestep: Tensor, **cond: Any) -> Tensor:
    """Call ``module(x_in, timestep, **cond)`` and unwrap diffusers-style outputs (``.sample``/tuple)."""
    out = module(x_in, timestep, **cond)
    return unwrap_output(out)


def unwrap_output(out: Any) -> Tensor:
    """Return the tensor inside a diffusers ``BaseOutput``, tuple or plain tensor."""
    if isinstance(out, Tensor):
        return out
    if hasattr(out, "sample"):
        return out.sample
    if isinstance(out, (tuple, list)):
        return out[0]
    raise TypeError(f"model returned {type(out).__name__}; expected a tensor, a tuple or an object with .sample")


def expand_sigma(sigma: Tensor | float, x: Tensor) -> Tensor:
    """Turn a scalar or ``(B,)`` sigma into a ``(B,)`` tensor on x's device, checking its shape."""
    sigma = torch.as_tensor(sigma, device=x.device, dtype=torch.float32)
    if sigma.ndim == 0:
        return sigma.expand(x.shape[0])
    sigma = sigma.reshape(-1)
    if sigma.shape[0] == 1:
        return sigma.expand(x.shape[0])
    if sigma.shape[0] != x.shape[0]:
        raise ValueError(
            f"sigma has {sigma.shape[0]} entries but x has batch size {x.shape[0]}; "
            "pass one sigma per sample or a scalar"
        )
    return sigma


class Denoiser(nn.Module):
    """``D(x, sigma, **cond) -> x0_hat`` for any network and its ``ModelSampling``.

    Args:
        model: the network. Called as ``call(model, model_sampling.calculate_input(sigma, x),
            model_sampling.timestep(sigma), **cond)``.
        model_sampling: how sigma, timestep and the network's native output relate.
        call: optional adapter for networks with another signature (see ``core.models.diffusers``).
        check_finite: raise a clear error when the network returns NaN/inf (one reduction a call).
        name: used in error messages, calibration files and export metadata.
    """

    def __init__(
        self,
        model: nn.Module,
        model_sampling: ModelSampling,
        call: ModelCall | None = None,
        check_finite: bool = True,
        name: str | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.model_sampling = model_sampling
        self.call = call or default_call
        self.check_finite = check_finite
        self.name = name or type(model).__name__

    def forward(self, x: Tensor, sigma: Tensor | float, **cond: Any) -> Tensor:
        cond.pop("seed", None)  # samplers carry the noise seed in extra_args, as ComfyUI does
        if not isinstance(x, Tensor) or x.ndim < 2 or (not _tracing() and x.shape[0] == 0):
            raise ValueError(f"{self.name}: x must be a batched tensor (B, C, ...) with B >= 1, got "
                             f"{type(x).__name__} {tuple(getattr(x, 'shape', ()))}")
        sigma = expand_sigma(sigma, x)
        ms = self.model_sampling
        x_in = ms.calculate_input(sigma, x)
        t = ms.timestep(sigma).to(x.dtype)
        try:
            out = self.call(self.model, x_in, t, **cond)
        except RuntimeError as e:
            clear = _dtype_error(self, x, e)
            if clear is None:
                raise
            raise clear from e
        if out.shape != x.shape:
            raise ValueError(
                f"{self.name} returned shape {tuple(out.shape)} for input {tuple(x.shape)}; the denoiser "
                "convention needs the native output to match the input (wrap the model with a `call` adapter "
                "that reshapes or drops extra channels, e.g. DiT's learned-sigma half)"
            )
        if self.check_finite and not torch.isfinite(out).all():
            if not torch.isfinite(x).all() or not torch.isfinite(sigma).all():
                raise FloatingPointError(f"{self.name}: the input x or sigma holds NaN/inf (sigma="
                                         f"{sigma.flatten()[:4].tolist()}); check what produced it (e.g. a NaN "
                                         "guidance scale or an earlier step)")
            raise FloatingPointError(
                f"{self.name} produced NaN/inf at sigma={sigma.flatten()[:4].tolist()} from finite inputs; check "
                "the weights and the dtype (fp16 overflow)"
            )
        return ms.calculate_denoised(sigma, out, x)


def _tracing() -> bool:
    return torch.compiler.is_compiling() or torch.compiler.is_exporting()


def _dtype_error(den: Denoiser, x: Tensor, err: RuntimeError) -> TypeError | None:
    """A clear ``TypeError`` when ``err`` comes from an input whose dtype differs from the weights' (else None)."""
    p = next((p for p in den.model.parameters() if p.is_floating_point()), None)
    if p is None or not x.is_floating_point() or x.dtype == p.dtype or torch.is_autocast_enabled(x.device.type):
        return None
    return TypeError(f"{den.name}: input x is {x.dtype} but the model weights are {p.dtype}; cast the input "
                     f"(x.to({p.dtype})) or the model (.to({x.dtype})) so they match (torch: {str(err)[:160]})")


class CastCall:
    """A ``Denoiser`` call adapter that runs the network in ``dtype`` (e.g. a bf16 teacher): the scaled input, the
    timestep and floating conditions are cast to ``dtype``, the output back to the input's dtype, so the model
    sampling around the call stays in float32."""

    def __init__(self, call: ModelCall, dtype: torch.dtype):
        self.call, self.dtype = call, dtype

    def __call__(self, module: nn.Module, x_in: Tensor, t: Tensor, **cond: Any) -> Tensor:
        cast = {k: v.to(self.dtype) if isinstance(v, Tensor) and v.is_floating_point() else v for k, v in cond.items()}
        return self.call(module, x_in.to(self.dtype), t.to(self.dtype), **cast).to(x_in.dtype)


def cast_denoiser(den: Denoiser, dtype: torch.dtype | str) -> Denoiser:
    """Run ``den``'s network in ``dtype`` (weights cast in place, inputs and outputs through ``CastCall``); the model
    sampling stays float32. Returns ``den``."""
    if isinstance(dtype, str):
        dt = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
              "fp32": torch.float32, "float32": torch.float32}.get(dtype)
        if dt is None:
            raise ValueError(f"dtype must be one of bf16, fp16, fp32 (or a torch dtype), got {dtype!r}")
        dtype = dt
    if not isinstance(den, Denoiser):
        raise TypeError(f"cast_denoiser needs a fewstep Denoiser, got {type(den).__name__}")
    den.model.to(dtype)
    if not isinstance(den.call, CastCall):
        den.call = CastCall(den.call, dtype)
    else:
        den.call.dtype = dtype
    return den
