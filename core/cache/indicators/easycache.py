"""EasyCache (Zhou et al. 2025, "Less is Enough: Training-Free Video Diffusion Acceleration via Runtime-Adaptive
Caching", arXiv:2507.02860): the transformation rate ``k = ||dy|| / ||dx||`` measured between the last two full
computes (Eq. 3); at a skipped step ``acc += k ||x_t - x_c||_1 / ||y_c||_1`` (Eq. 4-5)."""

from __future__ import annotations

from torch import Tensor

from ..tensors import EPS, row_mean_abs
from .base import Indicator


class _State:
    __slots__ = ("accum", "x_c", "y_c", "y_norm", "rate", "in_change")

    def __init__(self) -> None:
        self.accum: Tensor | None = None
        self.x_c: Tensor | None = None  # input at the last full compute
        self.y_c: Tensor | None = None  # output at the last full compute
        self.y_norm: Tensor | None = None
        self.rate: Tensor | None = None
        self.in_change: Tensor | None = None


class EasyCache(Indicator):
    name = "easycache"
    description = "input change times the measured transformation rate, accumulated (EasyCache)"

    def new_state(self) -> _State:
        return _State()

    def estimate(self, st: _State, sigma: float, signal: Tensor) -> Tensor | None:
        if st.x_c is None:
            return None
        st.in_change = row_mean_abs(signal - st.x_c)
        if st.rate is None:
            return None
        d = st.rate * st.in_change / st.y_norm
        st.accum = d if st.accum is None else st.accum + d
        return st.accum

    def computed(self, st: _State, sigma: float, signal: Tensor, out: Tensor | None) -> None:
        st.accum = None
        if out is None:
            return
        if st.y_c is not None and st.in_change is not None:
            st.rate = row_mean_abs(out - st.y_c) / st.in_change.clamp_min(EPS)
        st.x_c, st.y_c, st.y_norm = signal, out, row_mean_abs(out).clamp_min(EPS)
        st.in_change = None
