"""No indicator: skip whenever allowed, ``max_consecutive_skips`` sets the interval -- the fixed schedules of
Delta-DiT (Chen et al. 2024, arXiv:2406.01125) and TaylorSeer (Liu et al. 2025, arXiv:2503.06923)."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from .base import Indicator


class Interval(Indicator):
    name = "interval"
    description = "none: skip whenever allowed, max_consecutive_skips sets the interval (Delta-DiT, TaylorSeer)"

    def estimate(self, st: Any, sigma: float, signal: Tensor) -> float:
        return 0.0
