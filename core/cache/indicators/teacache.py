"""TeaCache (Liu et al. 2024, "Timestep Embedding Tells: It's Time to Cache for Video Diffusion Model",
arXiv:2411.19108): accumulate the relative L1 change of an indicator signal between consecutive calls,
``acc += ||s_t - s_{t-1}||_1 / ||s_{t-1}||_1`` (``"input"``), or its rescaling by a per-model polynomial
``acc += poly(rel_l1)`` (``"teacache"``, Eq. 4-5), reset to 0 on every full compute."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from ..tensors import rel_l1
from .base import Indicator


class _State:
    __slots__ = ("accum", "prev_signal")

    def __init__(self) -> None:
        self.accum: Tensor | None = None
        self.prev_signal: Tensor | None = None


class InputChange(Indicator):
    """``"input"``: TeaCache without rescaling (no calibration)."""

    name = "input"
    description = "relative L1 change of the model input, accumulated (TeaCache, no rescaling)"

    def new_state(self) -> _State:
        return _State()

    def _rescale(self, d: Tensor) -> Tensor:
        return d

    def estimate(self, st: _State, sigma: float, signal: Tensor) -> Tensor | None:
        est = None
        if st.prev_signal is not None:
            d = self._rescale(rel_l1(signal, st.prev_signal))
            st.accum = d if st.accum is None else st.accum + d
            est = st.accum
        st.prev_signal = signal
        return est

    def computed(self, st: _State, sigma: float, signal: Tensor, out: Tensor | None) -> None:
        st.accum = None


class TeaCache(InputChange):
    """``"teacache"``: the change rescaled by the calibrated polynomial ``polys[key]``."""

    name = "teacache"
    description = "relative L1 change rescaled by a calibrated polynomial, accumulated (TeaCache)"
    calibration = "poly"

    def __init__(self, key: str | None = None) -> None:
        super().__init__(key)
        self.poly: Any = None

    def bind(self, calibration: Any) -> None:
        self.poly = calibration.poly(self.key)

    @property
    def ready(self) -> bool:
        return self.poly is not None

    def _rescale(self, d: Tensor) -> Tensor:
        return self.poly(d)
