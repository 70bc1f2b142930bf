"""First-Block-Cache (ParaAttention; diffusers ``FirstBlockCache``, building on TeaCache): the relative L1 distance
between the first block(s)' residual now and at the last full compute."""

from __future__ import annotations

from torch import Tensor

from ..tensors import rel_l1
from .base import Indicator


class _State:
    __slots__ = ("ref_signal",)

    def __init__(self) -> None:
        self.ref_signal: Tensor | None = None  # the head residual at the last full compute


class FirstBlock(Indicator):
    name = "first_block"
    description = "relative L1 distance of the first blocks' residual to the last full compute (First-Block-Cache)"
    needs_signal = True

    def new_state(self) -> _State:
        return _State()

    def estimate(self, st: _State, sigma: float, signal: Tensor) -> Tensor | None:
        return None if st.ref_signal is None else rel_l1(signal, st.ref_signal)

    def computed(self, st: _State, sigma: float, signal: Tensor, out: Tensor | None) -> None:
        st.ref_signal = signal
