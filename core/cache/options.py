"""Validation of cache options: every bad value raises ``CacheConfigError`` naming the option, the allowed range and
the fix."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

FORECASTS: dict[str, int] = {"reuse": 0, "taylor1": 1, "taylor2": 2}
REDUCTIONS = ("mean", "max")


class CacheConfigError(ValueError):
    """A cache was configured with an invalid option (the message names the option and the fix)."""


def check_threshold(threshold: Any) -> float:
    """A finite number >= 0 (0 disables skipping)."""
    try:
        value = float(threshold)
    except (TypeError, ValueError):
        raise CacheConfigError(f"threshold must be a number >= 0, got {threshold!r}") from None
    if not math.isfinite(value) or value < 0:
        raise CacheConfigError(
            f"threshold must be a finite number >= 0 (0 = never skip; typical 0.05-0.5), got {threshold!r}")
    return value


def check_percents(start_percent: Any, end_percent: Any) -> tuple[float, float]:
    """``0 <= start_percent <= end_percent <= 1`` (fractions of the sampling run)."""
    out = []
    for name, v in (("start_percent", start_percent), ("end_percent", end_percent)):
        try:
            f = float(v)
        except (TypeError, ValueError):
            raise CacheConfigError(f"{name} must be a number in [0, 1], got {v!r}") from None
        if not 0.0 <= f <= 1.0:
            raise CacheConfigError(f"{name} must be in [0, 1] (a fraction of the sampling run), got {v!r}")
        out.append(f)
    if out[0] > out[1]:
        raise CacheConfigError(
            f"start_percent ({out[0]}) is after end_percent ({out[1]}): the cache would never be active; "
            "swap them or set start_percent <= end_percent")
    return out[0], out[1]


def check_count(name: str, value: Any, minimum: int, allow_none: bool = False) -> int | None:
    """An integer ``>= minimum`` (or None where allowed)."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise CacheConfigError(f"{name} must be an integer >= {minimum}{' or None' if allow_none else ''}, "
                               f"got {value!r}")
    return value


def check_fraction(name: str, value: Any) -> float:
    """A number in ``[0, 1]``."""
    try:
        f = float(value)
    except (TypeError, ValueError):
        raise CacheConfigError(f"{name} must be a fraction in [0, 1], got {value!r}") from None
    if not 0.0 <= f <= 1.0:
        raise CacheConfigError(f"{name} must be a fraction in [0, 1] of the sampling run, got {value!r}")
    return f


def check_choice(name: str, value: Any, choices: Sequence[str]) -> str:
    """One of ``choices``."""
    if value not in choices:
        raise CacheConfigError(f"unknown {name} {value!r}; choose one of {', '.join(map(repr, choices))}")
    return value


def forecast_order(forecast: str | int) -> int:
    """``"reuse"`` / ``"taylor1"`` / ``"taylor2"`` (or 0 / 1 / 2) -> Taylor order."""
    if isinstance(forecast, int) and not isinstance(forecast, bool) and forecast in (0, 1, 2):
        return forecast
    if isinstance(forecast, str) and forecast in FORECASTS:
        return FORECASTS[forecast]
    raise CacheConfigError(f"forecast must be one of {', '.join(map(repr, FORECASTS))} (or order 0, 1, 2), "
                           f"got {forecast!r}")
