"""MagCache (Ma et al. 2025, "MagCache: Fast Video Generation with Magnitude-Aware Cache", arXiv:2506.09045): the
residual magnitude ratio ``gamma_t = ||r_t|| / ||r_{t-1}||`` is a per-model curve, calibrated once; after a compute
at ``c``, ``err += |1 - prod_{c<i<=t} gamma_i|`` (Eq. 4-5; the product telescopes to ``exp(L(sigma_t) -
L(sigma_c))`` with ``L`` the calibrated log-magnitude curve ``mag[key]``)."""

from __future__ import annotations

import math
from typing import Any

from torch import Tensor

from .base import Indicator


class _State:
    __slots__ = ("sigma_c", "err")

    def __init__(self) -> None:
        self.sigma_c: float | None = None  # sigma of the last full compute
        self.err = 0.0


class MagCache(Indicator):
    name = "magcache"
    description = "accumulated error of the calibrated residual-magnitude ratios (MagCache)"
    calibration = "mag"

    def __init__(self, key: str | None = None) -> None:
        super().__init__(key)
        self.curve: Any = None

    def bind(self, calibration: Any) -> None:
        self.curve = calibration.mag_curve(self.key)

    @property
    def ready(self) -> bool:
        return self.curve is not None

    def new_state(self) -> _State:
        return _State()

    def estimate(self, st: _State, sigma: float, signal: Tensor) -> float | None:
        if st.sigma_c is None:
            return None
        st.err += abs(1.0 - math.exp(self.curve(sigma) - self.curve(st.sigma_c)))
        return st.err

    def computed(self, st: _State, sigma: float, signal: Tensor, out: Tensor | None) -> None:
        st.sigma_c, st.err = sigma, 0.0
