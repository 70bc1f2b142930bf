"""Small tensor helpers shared by the indicators, the state machine and calibration (per-row, float32)."""

from __future__ import annotations

from torch import Tensor

Feature = Tensor | tuple[Tensor | None, ...]
EPS = 1e-8


def rel_l1(a: Tensor, b: Tensor) -> Tensor:
    """Per-row relative L1 distance ``mean|a - b| / mean|b|`` over all but the batch dimension, float32 ``(B,)``."""
    a, b = a.detach().float(), b.detach().float()
    num = (a - b).abs().flatten(1).mean(1)
    return num / b.abs().flatten(1).mean(1).clamp_min(EPS)


def row_mean_abs(a: Tensor) -> Tensor:
    """``mean|a|`` per row, float32 ``(B,)``."""
    return a.detach().float().abs().flatten(1).mean(1)


def sigma_value(sigma: Tensor | float) -> float:
    """The (first) sigma of a call as a Python float (samplers pass one sigma per row, all equal)."""
    if isinstance(sigma, Tensor):
        return float(sigma.detach().reshape(-1)[0])
    return float(sigma)


def as_tuple(x: Feature) -> tuple[Tensor | None, ...]:
    """A cached feature as a tuple of tensors (the first one not None)."""
    if isinstance(x, Tensor):
        return (x,)
    if isinstance(x, (tuple, list)) and x and isinstance(x[0], Tensor):
        return tuple(x)
    raise TypeError(f"cache features must be a tensor or a tuple of tensors (first one not None), got {type(x)}")


def like(template: Feature, values: tuple[Tensor | None, ...]) -> Feature:
    """``values`` in the container type of ``template`` (a tensor or a tuple)."""
    return values[0] if isinstance(template, Tensor) else tuple(values)


def signature(xs: tuple[Tensor | None, ...], signal: Tensor | None) -> tuple:
    """Shapes, dtypes and devices of a call's features and indicator signal: state is never reused across them."""
    parts = [None if t is None else (tuple(t.shape), t.dtype, t.device) for t in xs]
    parts.append(None if signal is None else (tuple(signal.shape), signal.dtype, signal.device))
    return tuple(parts)
