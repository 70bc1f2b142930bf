"""TaylorSeer's feature forecast (Liu et al. 2025, "From Reusing to Forecasting: Accelerating Diffusion Models with
TaylorSeers", arXiv:2503.06923), used by the state machine to predict a skipped call's residual."""

from __future__ import annotations

import math

from torch import Tensor


class TaylorForecaster:
    """Keeps the Taylor factors ``[F, Delta F, Delta^2 F, ...]`` of the last full compute at step ``t_c``, updated by
    ``Delta^{i+1} F(t_c) = (Delta^i F(t_c) - Delta^i F(t_prev)) / (t_c - t_prev)``, and predicts
    ``F(t_c + k) = sum_{i <= order} Delta^i F(t_c) k^i / i!`` (TaylorSeer, Eq. 6-8). Order 0 is plain reuse. Features
    are tuples of tensors (``None`` entries pass through).
    """

    def __init__(self, order: int = 0) -> None:
        self.order = order
        self.factors: list[tuple[Tensor | None, ...]] = []
        self.step: int | None = None

    @property
    def ready(self) -> bool:
        return bool(self.factors)

    def update(self, feature: tuple[Tensor | None, ...], step: int) -> None:
        new = [feature]
        if self.factors and self.order > 0 and self.step is not None and step > self.step:
            d = float(step - self.step)
            for i in range(min(self.order, len(self.factors))):
                new.append(tuple(None if a is None or b is None else (a - b) / d
                                 for a, b in zip(new[i], self.factors[i])))
        self.factors, self.step = new, step

    def predict(self, step: int) -> tuple[Tensor | None, ...]:
        if not self.factors or self.step is None:
            raise RuntimeError("TaylorForecaster.predict before any update")
        k = float(step - self.step)
        out = list(self.factors[0])
        for i in range(1, len(self.factors)):
            c = k**i / math.factorial(i)
            out = [None if o is None or f is None else o + c * f for o, f in zip(out, self.factors[i])]
        return tuple(out)
