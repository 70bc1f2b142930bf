"""The indicator interface: what a cache measures to decide whether a call may be skipped.

An indicator owns its per-slot fields (``new_state``), its estimate for the current call (``estimate``, compared
with the cache's threshold: skip while below), its update after a full compute (``computed``) and, where it reads
one, its calibration key (``calibration_key``; ``bind`` attaches the fitted map). Every per-sample quantity is a
``(B,)`` tensor whose row ``i`` only depends on row ``i``'s history; the state machine (``core.cache.state``) keeps
one state object per (branch key, slot, region) and never lets rows or branches mix.
"""

from __future__ import annotations

from typing import Any, ClassVar

from torch import Tensor


class Indicator:
    """Base class; subclasses set ``name``, ``description`` and override the four verbs."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    #: ``"poly"`` (TeaCache polynomial), ``"mag"`` (MagCache curve) or None: which calibration map ``key`` names
    calibration: ClassVar[str | None] = None
    #: the estimate needs the host's ``signal=`` (it cannot fall back to the input)
    needs_signal: ClassVar[bool] = False

    def __init__(self, key: str | None = None) -> None:
        self.key = key

    @property
    def needs_calibration(self) -> bool:
        return self.calibration is not None

    def calibration_key(self) -> str | None:
        """The calibration map this indicator reads (``polys[key]`` or ``mag[key]``), or None."""
        return self.key if self.calibration is not None else None

    def bind(self, calibration: Any) -> None:
        """Attach a resolved ``Calibration`` (only indicators with a calibration key read it)."""

    @property
    def ready(self) -> bool:
        """False while a needed calibration is not bound."""
        return True

    def new_state(self) -> Any:
        """The per-slot fields of this indicator (fresh at the start of a run or after a shape change)."""
        return None

    def estimate(self, st: Any, sigma: float, signal: Tensor) -> Tensor | float | None:
        """Update ``st`` for this call and return the estimate (None: cannot estimate yet -> compute)."""
        raise NotImplementedError

    def computed(self, st: Any, sigma: float, signal: Tensor, out: Tensor | None) -> None:
        """Record a full compute at ``sigma`` (``signal`` as passed to ``estimate``, ``out`` the first output)."""
