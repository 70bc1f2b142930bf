"""The cache state machine: decide per call whether to run the model (or a block range) or reuse/forecast it.

One object, three verbs, driven the same way by every host (the torch hooks in ``core.cache.hooks``, the block-range
runner in ``core.cache.runner``, a ComfyUI wrapper, a diffusers pipeline):

.. code-block:: python

    if cache.should_compute(x, sigma, key=branch, signal=s):   # cheap: indicator + bookkeeping
        out = run_model(x)                                     # the expensive part
        cache.update(x, out, key=branch)                       # remember out - x (the residual)
    else:
        out = cache.predict(x, key=branch)                     # x + cached (or forecast) residual

plus ``reset()`` (drop every tensor), ``set_schedule(sigmas)`` / ``bind(model_sampling=...)`` (where sampling is, for
``start_percent`` / ``end_percent``) and ``stats``.

State is kept **per key and per row**. ``key`` is whatever identifies a guidance branch / call site for the host
(ComfyUI: ``tuple(cond_or_uncond)``; fewstep's ``CFGDenoiser`` stacks cond and uncond in one call, so one key with
2B rows). Every per-sample quantity (accumulated indicator, cached residual, Taylor factors, EasyCache rate) is a
``(B, ...)`` tensor whose row ``i`` only ever depends on row ``i``'s history, so the cond rows never read the uncond
rows' cache. The skip decision is joint for the rows of one call (a model call cannot skip half a batch): the
per-row indicator is reduced with ``reduce`` ("mean" as TeaCache/EasyCache, or "max", the conservative choice).
Calls that arrive separately with the same key at the same sigma (cond then uncond in two calls, or a second
evaluation of a 2nd-order sampler) get separate *slots*: state ``(key, 0)``, ``(key, 1)``, ... .

A new sampling run is detected when sigma increases for a key (every slot of that key is dropped); a change of
batch size, resolution, dtype or device drops that slot and forces a full compute. Nothing is ever reused across
shapes.

The indicators (``indicator=``, one file each in ``core.cache.indicators``) are compared with ``threshold`` (skip
while the estimate stays below it); ``threshold=0`` never skips, for every indicator: the output is then
bit-identical to the uncached model.

Forecast (``forecast=``): ``"reuse"`` returns ``x + r_c`` (the residual of the last full compute); ``"taylor1"`` /
``"taylor2"`` forecast the residual with TaylorSeer (``core.cache.forecast``), ``t`` counting the calls of a slot.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any

import torch
from torch import Tensor

from ..sampling.schedules import starts_new_run
from .forecast import TaylorForecaster
from .indicators import INDICATOR_CLASSES, INDICATORS, Indicator
from .options import (
    REDUCTIONS,
    CacheConfigError,
    check_choice,
    check_count,
    check_percents,
    check_threshold,
    forecast_order,
)
from .tensors import Feature, as_tuple, like, sigma_value, signature

MAX_SLOTS = 8


class _Slot:
    """State of one (key, slot, region): everything is per row, nothing crosses rows."""

    def __init__(self, sig: tuple, order: int, indicator_state: Any) -> None:
        self.signature = sig
        self.step = 0
        self.skips = 0
        self.ind = indicator_state
        self.forecast = TaylorForecaster(order)
        self.residual_mode: tuple[bool, ...] | None = None  # per feature: residual (True) or plain output
        self.pending: tuple[bool, float, Tensor | None] | None = None


class _KeyState:
    __slots__ = ("sigma", "slot")

    def __init__(self) -> None:
        self.sigma: float | None = None
        self.slot = 0


class ResidualCache:
    """Skip-or-compute state machine over residuals ``out - x`` (see the module docstring).

    Args:
        threshold: skip while the indicator estimate is below it; ``0`` never skips (exact). Typical values:
            0.03-0.3 for ``input``/``teacache``/``easycache``/``first_block``, 0.005-0.05 for ``magcache``.
        indicator: one of ``INDICATORS``.
        start_percent, end_percent: the cache is active on ``[start, end)`` of the sampling run (as ComfyUI's
            ``percent_to_sigma``, or step fractions when ``set_schedule`` was given the sigmas); outside, every call
            computes.
        max_consecutive_skips: force a full compute after this many skips in a row (``None``: unlimited).
        forecast: ``"reuse"``, ``"taylor1"`` or ``"taylor2"`` (TaylorSeer).
        calibration: a ``Calibration``, a path to its JSON, or ``None`` (looked up by model name + config hash when
            the cache is applied). Only ``teacache`` and ``magcache`` need one.
        reduce: how per-row indicators make the joint decision for one call: ``"mean"`` or ``"max"``.
        trace: record one dict per call in ``self.trace`` (sigma, key, decision, estimate) for inspection.
    """

    default_indicator = "input"
    indicators: tuple[str, ...] = tuple(INDICATORS)
    #: which calibration curves this cache reads (set by subclasses)
    poly_key = "input"
    mag_key = "step"

    def __init__(
        self,
        threshold: float = 0.1,
        *,
        indicator: str | None = None,
        start_percent: float = 0.0,
        end_percent: float = 1.0,
        max_consecutive_skips: int | None = None,
        forecast: str | int = "reuse",
        calibration: Any = None,
        reduce: str = "mean",
        trace: bool = False,
    ) -> None:
        self.threshold = check_threshold(threshold)
        self.indicator = check_choice("indicator", indicator or self.default_indicator, self.indicators)
        self.start_percent, self.end_percent = check_percents(start_percent, end_percent)
        self.max_consecutive_skips = check_count("max_consecutive_skips", max_consecutive_skips, 0, allow_none=True)
        self.forecast = forecast
        self.order = forecast_order(forecast)
        self.reduce = check_choice("reduce", reduce, REDUCTIONS)
        self.calibration_source = calibration  # what the user gave (None: look up by model name + config hash)
        self.calibration: Any = None  # the resolved Calibration once bound
        self.ind: Indicator = INDICATOR_CLASSES[self.indicator]()
        self._schedule: Tensor | None = None
        self._model_sampling: Any = None
        self.model_name: str | None = None
        self.config_hash: str | None = None
        self.trace: list[dict[str, Any]] | None = [] if trace else None
        self._slots: dict[tuple, _Slot] = {}
        self._keys: dict[Hashable, _KeyState] = {}
        self._pending: dict[Hashable, _Slot] = {}
        self.stats: dict[str, int] = {}
        self.reset_stats()

    # ------------------------------------------------------------------ configuration
    def __repr__(self) -> str:
        return (f"{type(self).__name__}(threshold={self.threshold}, indicator={self.indicator!r}, "
                f"start_percent={self.start_percent}, end_percent={self.end_percent}, "
                f"max_consecutive_skips={self.max_consecutive_skips}, forecast={self.forecast!r})")

    def config(self) -> dict[str, Any]:
        """A JSON-able description (benchmarks, logs)."""
        return {"type": type(self).__name__, "threshold": self.threshold, "indicator": self.indicator,
                "start_percent": self.start_percent, "end_percent": self.end_percent,
                "max_consecutive_skips": self.max_consecutive_skips, "forecast": self.forecast, "reduce": self.reduce}

    def set_schedule(self, sigmas: Tensor | Sequence[float] | None) -> None:
        """Tell the cache the run's sigmas: ``start_percent``/``end_percent`` then mean fractions of the steps."""
        self._schedule = None if sigmas is None else torch.as_tensor(sigmas, dtype=torch.float64).reshape(-1).cpu()

    def calibration_key(self) -> str | None:
        """The calibration map the indicator reads (``polys[poly_key]`` or ``mag[mag_key]``), or None."""
        kind = self.ind.calibration
        return None if kind is None else (self.poly_key if kind == "poly" else self.mag_key)

    def bind(self, model_name: str | None = None, config_hash: str | None = None, model_sampling: Any = None,
             search_dirs: Sequence[Any] | None = None) -> None:
        """Attach the model identity and sampling: resolves the calibration for ``teacache``/``magcache`` (raising
        ``CalibrationMissingError`` / ``CalibrationMismatchError`` with the fix) and lets ``start_percent`` /
        ``end_percent`` map to sigmas through ``model_sampling.percent_to_sigma`` (ComfyUI's convention)."""
        if model_sampling is not None:
            self._model_sampling = model_sampling
        if model_name is not None:
            self.model_name, self.config_hash = model_name, config_hash
        if self.ind.needs_calibration:
            from .calibration.store import resolve_calibration

            cal = resolve_calibration(self.calibration_source, self.model_name, self.config_hash, search_dirs,
                                      needed_by=f"{type(self).__name__}(indicator={self.indicator!r})")
            self.ind.key = self.calibration_key()
            self.ind.bind(cal)
            self.calibration = cal

    def _check_ready(self) -> None:
        if not self.ind.ready:
            from .calibration.store import CalibrationMissingError

            raise CalibrationMissingError(
                f"indicator {self.indicator!r} needs a calibration but none is bound: apply the cache with "
                "fewstep.core.cache.apply_cache(model, cache) (it looks the calibration up by model name and config "
                "hash) or call cache.bind(model_name, config_hash); make one with "
                "fewstep.core.cache.calibrate(denoiser, noise, extra_args)")

    # ------------------------------------------------------------------ state
    def reset(self) -> None:
        """Drop every cached tensor and all per-key state (start of a run, end of a run, model change)."""
        self._slots.clear()
        self._keys.clear()
        self._pending.clear()

    def reset_stats(self) -> None:
        self.stats = {"calls": 0, "computed": 0, "skipped": 0, "forced": 0, "runs": 0}

    @property
    def skip_ratio(self) -> float:
        return self.stats["skipped"] / max(self.stats["calls"], 1)

    def _resolve_slot(self, key: Hashable, s: float) -> tuple:
        ks = self._keys.get(key)
        if ks is None:
            ks = self._keys[key] = _KeyState()
        new_run = starts_new_run(ks.sigma, s)
        if not new_run and s == ks.sigma:
            ks.slot += 1
            if ks.slot >= MAX_SLOTS:  # far more calls at one sigma than branches: treat as a new run
                new_run = True
        elif not new_run:
            ks.slot = 0
        if new_run:
            for k in [k for k in self._slots if k[0] == key]:
                del self._slots[k]
            ks.slot = 0
            self.stats["runs"] += 1
        ks.sigma = s
        return key, ks.slot

    def _before(self, percent: float, s: float) -> bool:
        """True if sigma ``s`` comes before ``percent`` of the run."""
        if self._schedule is not None and len(self._schedule) > 1:
            idx = int((self._schedule - s).abs().argmin())
            return idx / (len(self._schedule) - 1) < percent
        ms = self._model_sampling
        if ms is None or not hasattr(ms, "percent_to_sigma"):
            raise CacheConfigError(
                f"start_percent/end_percent ({self.start_percent}, {self.end_percent}) need to know where sampling "
                "is: apply the cache to a Denoiser (it has a model_sampling), call cache.bind(model_sampling=...) or "
                "cache.set_schedule(sigmas)")
        return s > float(ms.percent_to_sigma(percent))

    def active(self, sigma: Tensor | float) -> bool:
        """Whether skipping is allowed at this sigma (``start_percent <= progress < end_percent``)."""
        if self.start_percent <= 0.0 and self.end_percent >= 1.0:
            return True
        s = sigma_value(sigma)
        return not self._before(self.start_percent, s) and self._before(self.end_percent, s)

    # ------------------------------------------------------------------ the three verbs
    def should_compute(self, x: Feature, sigma: Tensor | float, key: Hashable = None, *,
                       signal: Tensor | None = None, region: Hashable = None) -> bool:
        """Decide for one call: ``True`` = run the model then ``update``; ``False`` = call ``predict``.

        Args:
            x: the input whose residual is cached (a tensor or a tuple such as ``(hidden, encoder_hidden)``).
            sigma: the call's sigma (scalar or per row).
            key: the branch / call site (see the module docstring). Separate keys never share state.
            signal: the indicator's tensor (default ``x``'s first tensor); ``first_block`` needs it.
            region: an extra state key (Delta-DiT's front / back block range).
        """
        self._check_ready()
        xs = as_tuple(x)
        s = sigma_value(sigma)
        slot_key = self._resolve_slot(key, s)
        sig = signature(xs, signal)
        full = (*slot_key, region)
        st = self._slots.get(full)
        self.stats["calls"] += 1
        if st is not None and st.signature != sig:  # batch size / resolution / dtype / device changed
            self.stats["forced"] += 1
            st = None
        if st is None:
            st = self._slots[full] = _Slot(sig, self.order, self.ind.new_state())
        compute, estimate = self._decide(st, xs, s, signal)
        st.pending = (compute, s, signal if signal is not None else xs[0])
        self._pending[key] = st
        if self.trace is not None:
            self.trace.append({"sigma": s, "key": repr(key), "slot": slot_key[1], "region": repr(region),
                               "compute": compute, "estimate": estimate})
        return compute

    def _decide(self, st: _Slot, xs: tuple, s: float, signal: Tensor | None) -> tuple[bool, float | None]:
        if self.ind.needs_signal and signal is None:
            raise CacheConfigError(f"indicator {self.indicator!r} needs signal= (the first blocks' residual); use "
                                   "FirstBlockCache through apply_cache, or indicator='input'")
        est = self.ind.estimate(st.ind, s, signal if signal is not None else xs[0])
        value = None
        if isinstance(est, Tensor):
            value = float(est.mean() if self.reduce == "mean" else est.max())
        elif est is not None:
            value = float(est)
        if not st.forecast.ready or est is None or self.threshold <= 0.0:
            return True, value
        if self.max_consecutive_skips is not None and st.skips >= self.max_consecutive_skips:
            return True, value
        if not self.active(s):
            return True, value
        return not value < self.threshold, value

    def _take(self, key: Hashable, compute: bool) -> tuple[_Slot, float, Tensor]:
        st = self._pending.pop(key, None)
        if st is None or st.pending is None:
            raise RuntimeError(f"{type(self).__name__}: call should_compute(x, sigma, key={key!r}) before "
                               f"{'update' if compute else 'predict'}")
        decided, s, sig = st.pending
        st.pending = None
        if decided != compute:
            raise RuntimeError(f"{type(self).__name__}: should_compute returned {decided} for key {key!r}; call "
                               f"{'update' if decided else 'predict'}, not {'update' if compute else 'predict'}")
        return st, s, sig

    def update(self, x: Feature, out: Feature, key: Hashable = None) -> None:
        """Record a full compute ``out = model(x)`` for ``key`` (after ``should_compute`` returned True)."""
        st, s, sig = self._take(key, compute=True)
        xs, outs = as_tuple(x), as_tuple(out)
        if len(xs) != len(outs):
            raise ValueError(f"update got {len(xs)} inputs but {len(outs)} outputs")
        mode = tuple(o is not None and i is not None and o.shape == i.shape for i, o in zip(xs, outs))
        residual = tuple(None if o is None else (o - i if m else o) for i, o, m in zip(xs, outs, mode))
        if st.residual_mode is not None and st.residual_mode != mode:
            st.forecast = TaylorForecaster(self.order)
        st.residual_mode = mode
        st.forecast.update(residual, st.step)
        st.skips = 0
        self.ind.computed(st.ind, s, sig, outs[0])
        st.step += 1
        self.stats["computed"] += 1

    def predict(self, x: Feature, key: Hashable = None) -> Feature:
        """The cached (or forecast) output for ``x`` (after ``should_compute`` returned False)."""
        st, _, _ = self._take(key, compute=False)
        xs = as_tuple(x)
        residual = st.forecast.predict(st.step)
        mode = st.residual_mode or (True,) * len(xs)
        out = tuple(None if r is None else (i + r if m and i is not None else r) for i, r, m in zip(xs, residual, mode))
        st.skips += 1
        st.step += 1
        self.stats["skipped"] += 1
        return like(x, out)

    def __call__(self, fn: Any, x: Feature, sigma: Tensor | float, key: Hashable = None, *,
                 signal: Tensor | None = None) -> Feature:
        """``fn()`` if a compute is needed (recorded), else the prediction: the three verbs in one call."""
        if self.should_compute(x, sigma, key, signal=signal):
            out = fn()
            self.update(x, out, key)
            return out
        return self.predict(x, key)
