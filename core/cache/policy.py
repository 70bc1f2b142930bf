"""The cache state machine: decide per call whether to run the model (or a block range) or reuse/forecast it.

One object, three verbs, driven the same way by every host (the torch hooks in ``core.cache.hooks``, a ComfyUI
``DIFFUSION_MODEL`` wrapper, a diffusers pipeline):

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

Indicators (``indicator=``), all compared with ``threshold`` (skip while the estimate stays below it):

- ``"input"`` -- TeaCache without rescaling (Liu et al. 2024, "Timestep Embedding Tells: It's Time to Cache for
  Video Diffusion Model", arXiv:2411.19108): accumulate the relative L1 change of the signal between
  consecutive calls, ``acc += ||s_t - s_{t-1}||_1 / ||s_{t-1}||_1``, reset to 0 on every full compute.
- ``"teacache"`` -- the same with TeaCache's polynomial rescaling ``acc += poly(rel_l1)`` fitted per model by
  ``core.cache.calibration.calibrate`` (needs a calibration).
- ``"easycache"`` -- EasyCache (Zhou et al. 2025, "Less is Enough: Training-Free Video Diffusion Acceleration via
  Runtime-Adaptive Caching", arXiv:2507.02860): transformation rate ``k = ||dy|| / ||dx||`` measured
  between the last two full computes; at a skipped step ``acc += k ||x_t - x_c||_1 / ||y_c||_1``.
- ``"magcache"`` -- MagCache (Ma et al. 2025, "MagCache: Fast Video Generation with Magnitude-Aware Cache",
  arXiv:2506.09045): the residual magnitude ratio ``gamma_t = ||r_t|| / ||r_{t-1}||`` is a per-model curve,
  calibrated once; after a compute at ``c``, ``err += |1 - prod_{c<i<=t} gamma_i|`` (the product telescopes to
  ``exp(L(sigma_t) - L(sigma_c))`` with ``L`` the calibrated log-magnitude curve; needs a calibration).
- ``"first_block"`` -- First-Block-Cache (ParaAttention / diffusers ``FirstBlockCache``, building on TeaCache): the
  relative L1 distance between the first block(s)' residual now and at the last full compute.
- ``"interval"`` -- no indicator: skip whenever allowed (``max_consecutive_skips`` sets the interval), as the fixed
  schedules of Delta-DiT and TaylorSeer.

``threshold=0`` never skips, for every indicator: the output is then bit-identical to the uncached model.

Forecast (``forecast=``): ``"reuse"`` returns ``x + r_c`` (the residual of the last full compute); ``"taylor1"`` /
``"taylor2"`` forecast the residual with TaylorSeer (Liu et al. 2025, "From Reusing to Forecasting: Accelerating
Diffusion Models with TaylorSeers", arXiv:2503.06923): ``r(t_c + k) = sum_i Delta^i r(t_c) k^i / i!``,
where ``Delta^{i+1} r(t_c) = (Delta^i r(t_c) - Delta^i r(t_prev)) / (t_c - t_prev)`` are finite differences over the
full computes, ``t`` counting the calls of a slot (TaylorSeer's step index).
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from typing import Any

import torch
from torch import Tensor

Feature = Tensor | tuple[Tensor | None, ...]

INDICATORS: dict[str, str] = {
    "input": "relative L1 change of the model input, accumulated (TeaCache, no rescaling)",
    "teacache": "relative L1 change rescaled by a calibrated polynomial, accumulated (TeaCache)",
    "easycache": "input change times the measured transformation rate, accumulated (EasyCache)",
    "magcache": "accumulated error of the calibrated residual-magnitude ratios (MagCache)",
    "first_block": "relative L1 distance of the first blocks' residual to the last full compute (First-Block-Cache)",
    "interval": "none: skip whenever allowed, max_consecutive_skips sets the interval (Delta-DiT, TaylorSeer)",
}
NEEDS_CALIBRATION = frozenset({"teacache", "magcache"})
FORECASTS: dict[str, int] = {"reuse": 0, "taylor1": 1, "taylor2": 2}
REDUCTIONS = ("mean", "max")
MAX_SLOTS = 8
_EPS = 1e-8


class CacheConfigError(ValueError):
    """A cache was configured with an invalid option (the message names the option and the fix)."""


# ------------------------------------------------------------------------------------------------ validation
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
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise CacheConfigError(f"{name} must be an integer >= {minimum}{' or None' if allow_none else ''}, "
                               f"got {value!r}")
    return value


def check_choice(name: str, value: Any, choices: Sequence[str]) -> str:
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


# ------------------------------------------------------------------------------------------------ helpers
def rel_l1(a: Tensor, b: Tensor) -> Tensor:
    """Per-row relative L1 distance ``mean|a - b| / mean|b|`` over all but the batch dimension, float32 ``(B,)``."""
    a, b = a.detach().float(), b.detach().float()
    num = (a - b).abs().flatten(1).mean(1)
    return num / b.abs().flatten(1).mean(1).clamp_min(_EPS)


def row_mean_abs(a: Tensor) -> Tensor:
    """``mean|a|`` per row, float32 ``(B,)``."""
    return a.detach().float().abs().flatten(1).mean(1)


def _as_tuple(x: Feature) -> tuple[Tensor | None, ...]:
    if isinstance(x, Tensor):
        return (x,)
    if isinstance(x, (tuple, list)) and x and isinstance(x[0], Tensor):
        return tuple(x)
    raise TypeError(f"cache features must be a tensor or a tuple of tensors (first one not None), got {type(x)}")


def _like(template: Feature, values: tuple[Tensor | None, ...]) -> Feature:
    return values[0] if isinstance(template, Tensor) else tuple(values)


def sigma_value(sigma: Tensor | float) -> float:
    """The (first) sigma of a call as a Python float (samplers pass one sigma per row, all equal)."""
    if isinstance(sigma, Tensor):
        return float(sigma.detach().reshape(-1)[0])
    return float(sigma)


def _signature(xs: tuple[Tensor | None, ...], signal: Tensor | None) -> tuple:
    parts = [None if t is None else (tuple(t.shape), t.dtype, t.device) for t in xs]
    parts.append(None if signal is None else (tuple(signal.shape), signal.dtype, signal.device))
    return tuple(parts)


class TaylorForecaster:
    """TaylorSeer's feature forecast (Liu et al. 2025, arXiv:2503.06923).

    Keeps the Taylor factors ``[F, Delta F, Delta^2 F, ...]`` of the last full compute at step ``t_c``, updated by
    ``Delta^{i+1} F(t_c) = (Delta^i F(t_c) - Delta^i F(t_prev)) / (t_c - t_prev)``, and predicts
    ``F(t_c + k) = sum_{i <= order} Delta^i F(t_c) k^i / i!``. Order 0 is plain reuse. Features are tuples of tensors
    (``None`` entries pass through).
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


class _Slot:
    """State of one (key, slot, region): everything is per row, nothing crosses rows."""

    def __init__(self, signature: tuple, order: int) -> None:
        self.signature = signature
        self.step = 0
        self.skips = 0
        self.accum: Tensor | float | None = None
        self.prev_signal: Tensor | None = None  # input / teacache: signal at the previous call
        self.ref_signal: Tensor | None = None  # first_block: signal at the last full compute
        self.x_c: Tensor | None = None  # easycache: input at the last full compute
        self.y_c: Tensor | None = None  # easycache: output at the last full compute
        self.y_norm: Tensor | None = None
        self.rate: Tensor | None = None
        self.in_change: Tensor | None = None
        self.mag_sigma: float | None = None  # magcache: sigma of the last full compute
        self.mag_err = 0.0
        self.forecast = TaylorForecaster(order)
        self.residual_mode: tuple[bool, ...] | None = None  # per feature: residual (True) or plain output
        self.pending: tuple[bool, float, Tensor | None] | None = None


class _KeyState:
    __slots__ = ("sigma", "slot")

    def __init__(self) -> None:
        self.sigma: float | None = None
        self.slot = 0


# ------------------------------------------------------------------------------------------------ the policy
class ResidualCache:
    """Skip-or-compute state machine over residuals ``out - x`` (see the module docstring for the indicators).

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
        self._poly = None
        self._mag = None
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

    def bind(self, model_name: str | None = None, config_hash: str | None = None, model_sampling: Any = None,
             search_dirs: Sequence[Any] | None = None) -> None:
        """Attach the model identity and sampling: resolves the calibration for ``teacache``/``magcache`` (raising
        ``CalibrationMissingError`` / ``CalibrationMismatchError`` with the fix) and lets ``start_percent`` /
        ``end_percent`` map to sigmas through ``model_sampling.percent_to_sigma`` (ComfyUI's convention)."""
        if model_sampling is not None:
            self._model_sampling = model_sampling
        if model_name is not None:
            self.model_name, self.config_hash = model_name, config_hash
        if self.indicator in NEEDS_CALIBRATION:
            from .calibration import resolve_calibration

            cal = resolve_calibration(self.calibration_source, self.model_name, self.config_hash, search_dirs,
                                      needed_by=f"{type(self).__name__}(indicator={self.indicator!r})")
            if self.indicator == "teacache":
                self._poly = cal.poly(self.poly_key)
            else:
                self._mag = cal.mag_curve(self.mag_key)
            self.calibration = cal

    def _check_ready(self) -> None:
        if self.indicator == "teacache" and self._poly is None or self.indicator == "magcache" and self._mag is None:
            from .calibration import CalibrationMissingError

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
        new_run = ks.sigma is None or s > ks.sigma * (1 + 1e-6) + 1e-12
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
        xs = _as_tuple(x)
        s = sigma_value(sigma)
        slot_key = self._resolve_slot(key, s)
        sig = _signature(xs, signal)
        full = (*slot_key, region)
        st = self._slots.get(full)
        self.stats["calls"] += 1
        if st is not None and st.signature != sig:  # batch size / resolution / dtype / device changed
            self.stats["forced"] += 1
            st = None
        if st is None:
            st = self._slots[full] = _Slot(sig, self.order)
        compute, estimate = self._decide(st, xs, s, signal)
        st.pending = (compute, s, signal if signal is not None else xs[0])
        self._pending[key] = st
        if self.trace is not None:
            self.trace.append({"sigma": s, "key": repr(key), "slot": slot_key[1], "region": repr(region),
                               "compute": compute, "estimate": estimate})
        return compute

    def _estimate(self, st: _Slot, s: float, sig: Tensor) -> Tensor | float | None:
        """Update the indicator state for this call and return the current estimate (None: cannot estimate)."""
        ind = self.indicator
        if ind in ("input", "teacache"):
            est = None
            if st.prev_signal is not None:
                d = rel_l1(sig, st.prev_signal)
                if ind == "teacache":
                    d = self._poly(d)
                st.accum = d if st.accum is None else st.accum + d
                est = st.accum
            st.prev_signal = sig
            return est
        if ind == "easycache":
            if st.x_c is None:
                return None
            st.in_change = row_mean_abs(sig - st.x_c)
            if st.rate is None:
                return None
            d = st.rate * st.in_change / st.y_norm
            st.accum = d if st.accum is None else st.accum + d
            return st.accum
        if ind == "magcache":
            if st.mag_sigma is None:
                return None
            ratio = math.exp(self._mag(s) - self._mag(st.mag_sigma))
            st.mag_err += abs(1.0 - ratio)
            return st.mag_err
        if ind == "first_block":
            return None if st.ref_signal is None else rel_l1(sig, st.ref_signal)
        return 0.0  # interval

    def _decide(self, st: _Slot, xs: tuple, s: float, signal: Tensor | None) -> tuple[bool, float | None]:
        if self.indicator == "first_block" and signal is None:
            raise CacheConfigError("indicator 'first_block' needs signal= (the first blocks' residual); use "
                                   "FirstBlockCache through apply_cache, or indicator='input'")
        sig = signal if signal is not None else xs[0]
        est = self._estimate(st, s, sig)
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
        xs, outs = _as_tuple(x), _as_tuple(out)
        if len(xs) != len(outs):
            raise ValueError(f"update got {len(xs)} inputs but {len(outs)} outputs")
        mode = tuple(o is not None and i is not None and o.shape == i.shape for i, o in zip(xs, outs))
        residual = tuple(None if o is None else (o - i if m else o) for i, o, m in zip(xs, outs, mode))
        if st.residual_mode is not None and st.residual_mode != mode:
            st.forecast = TaylorForecaster(self.order)
        st.residual_mode = mode
        st.forecast.update(residual, st.step)
        st.accum = None
        st.skips = 0
        if self.indicator == "first_block":
            st.ref_signal = sig
        elif self.indicator == "easycache":
            y = outs[0]
            if st.y_c is not None and st.in_change is not None:
                st.rate = row_mean_abs(y - st.y_c) / st.in_change.clamp_min(_EPS)
            st.x_c, st.y_c, st.y_norm = sig, y, row_mean_abs(y).clamp_min(_EPS)
            st.in_change = None
        elif self.indicator == "magcache":
            st.mag_sigma, st.mag_err = s, 0.0
        st.step += 1
        self.stats["computed"] += 1

    def predict(self, x: Feature, key: Hashable = None) -> Feature:
        """The cached (or forecast) output for ``x`` (after ``should_compute`` returned False)."""
        st, _, _ = self._take(key, compute=False)
        xs = _as_tuple(x)
        residual = st.forecast.predict(st.step)
        mode = st.residual_mode or (True,) * len(xs)
        out = tuple(None if r is None else (i + r if m and i is not None else r) for i, r, m in zip(xs, residual, mode))
        st.skips += 1
        st.step += 1
        self.stats["skipped"] += 1
        return _like(x, out)

    def __call__(self, fn: Any, x: Feature, sigma: Tensor | float, key: Hashable = None, *,
                 signal: Tensor | None = None) -> Feature:
        """``fn()`` if a compute is needed (recorded), else the prediction: the three verbs in one call."""
        if self.should_compute(x, sigma, key, signal=signal):
            out = fn()
            self.update(x, out, key)
            return out
        return self.predict(x, key)


class StepCache(ResidualCache):
    """Step-level cache: skip the whole network at a denoising step and reuse its output-minus-input residual.

    The TeaCache / EasyCache / MagCache family (see the module docstring for the indicators; default ``"input"``,
    the relative L1 change of the network input accumulated across skipped steps). Works on any model (UNet, DiT,
    Flux, a plain ``nn.Module``): apply it with ``apply_cache(denoiser_or_module, StepCache(...))``.
    """

    default_indicator = "input"
    indicators = ("input", "teacache", "easycache", "magcache", "interval")
    poly_key = "input"
    mag_key = "step"


class BlockCache(ResidualCache):
    """Base class of block-level caches: the cached unit is a range of transformer blocks (see ``hooks``).
    ``stats`` also counts block forwards run and skipped (``blocks_run``, ``blocks_skipped``)."""

    def reset_stats(self) -> None:
        super().reset_stats()
        self.stats.update({"blocks_run": 0, "blocks_skipped": 0})

    def block_range(self, num_blocks: int, sigma: float) -> tuple[int, int, Hashable]:
        """The block range ``[a, b)`` whose residual is cached at this sigma, and its state region."""
        raise NotImplementedError

    def signal_source(self) -> str | None:
        """Which tensor feeds the indicator: ``head_residual``, ``modulated``, ``range_input`` or None."""
        raise NotImplementedError


class FirstBlockCache(BlockCache):
    """First-Block-Cache (ParaAttention; diffusers ``FirstBlockCache``) and TeaCache on the block stack.

    The first ``head_blocks`` transformer blocks always run; the rest ``[head_blocks, N)`` are skipped when the
    indicator says the step barely changed, and their residual ``h_N - h_head`` is reused (or forecast).

    Indicators: ``"first_block"`` (default: relative L1 distance between the head blocks' residual now and at the
    last full compute), ``"teacache"`` / ``"input"`` (accumulated relative L1 change of the *timestep-modulated
    input* -- the output of the first block's ``norm1`` (adaLN), as TeaCache uses), ``"easycache"``, ``"magcache"``
    (calibrated magnitude ratios of the block-stack residual), ``"interval"``.
    ``signal`` overrides the indicator's tensor: ``"head_residual"``, ``"modulated"`` or ``"range_input"`` (the
    hidden state entering the skipped range).
    """

    default_indicator = "first_block"
    indicators = ("first_block", "input", "teacache", "easycache", "magcache", "interval")

    def __init__(self, threshold: float = 0.1, *, head_blocks: int = 1, signal: str | None = None,
                 **kwargs: Any) -> None:
        self.head_blocks = check_count("head_blocks", head_blocks, 1)
        super().__init__(threshold, **kwargs)
        default = {"first_block": "head_residual", "input": "modulated", "teacache": "modulated",
                   "easycache": "range_input"}.get(self.indicator)
        self.signal = signal or default
        if self.signal is not None:
            check_choice("signal", self.signal, ("head_residual", "modulated", "range_input"))
        if self.indicator == "first_block" and self.signal != "head_residual":
            raise CacheConfigError("indicator 'first_block' compares the head blocks' residual: leave signal unset "
                                   "or use signal='head_residual'")
        self.poly_key = self.signal or "modulated"
        self.mag_key = f"blocks:{self.head_blocks}"

    def config(self) -> dict[str, Any]:
        return {**super().config(), "head_blocks": self.head_blocks, "signal": self.signal}

    def block_range(self, num_blocks: int, sigma: float) -> tuple[int, int, Hashable]:
        if self.head_blocks >= num_blocks:
            raise CacheConfigError(f"head_blocks={self.head_blocks} leaves nothing to cache in a model with "
                                   f"{num_blocks} blocks; use head_blocks < {num_blocks}")
        return self.head_blocks, num_blocks, None

    def signal_source(self) -> str | None:
        return self.signal


class DeltaDiTCache(BlockCache):
    """Delta-DiT (Chen et al. 2024, "Delta-DiT: A Training-Free Acceleration Method Tailored for Diffusion
    Transformers", arXiv:2406.01125, the Delta-Cache): cache the *deviation* ``Delta = F_out - F_in`` of a
    block range rather than its output. Early in sampling (progress < ``boundary``, outline generation) the back
    ``num_blocks`` blocks are cached; later (detail generation) the front ``num_blocks`` blocks. The cached range is
    recomputed every ``interval`` calls (interval 1 = no caching, exact), or, with an adaptive indicator
    (``"input"`` / ``"easycache"`` on the hidden state entering the range), whenever it says so.
    """

    default_indicator = "interval"
    indicators = ("interval", "input", "easycache")

    def __init__(self, threshold: float | None = None, *, interval: int = 2, num_blocks: int | None = None,
                 boundary: float = 0.5, **kwargs: Any) -> None:
        self.interval = check_count("interval", interval, 1)
        self.num_blocks = check_count("num_blocks", num_blocks, 1, allow_none=True)
        try:
            self.boundary = float(boundary)
        except (TypeError, ValueError):
            raise CacheConfigError(f"boundary must be a fraction in [0, 1], got {boundary!r}") from None
        if not 0.0 <= self.boundary <= 1.0:
            raise CacheConfigError(f"boundary must be a fraction in [0, 1] of the sampling run, got {boundary!r}")
        indicator = kwargs.get("indicator") or self.default_indicator
        if threshold is None:
            threshold = 1.0 if indicator == "interval" else 0.1
        if indicator == "interval":
            if kwargs.get("max_consecutive_skips") is not None:
                raise CacheConfigError("DeltaDiTCache(indicator='interval') sets max_consecutive_skips from "
                                       "interval; pass interval= instead")
            kwargs["max_consecutive_skips"] = self.interval - 1
        super().__init__(threshold, **kwargs)

    def config(self) -> dict[str, Any]:
        return {**super().config(), "interval": self.interval, "num_blocks": self.num_blocks,
                "boundary": self.boundary}

    def block_range(self, num_blocks: int, sigma: float) -> tuple[int, int, Hashable]:
        k = self.num_blocks if self.num_blocks is not None else max(1, num_blocks // 2)
        if k >= num_blocks:
            raise CacheConfigError(f"num_blocks={k} would cache every block of a {num_blocks}-block model; use "
                                   f"num_blocks < {num_blocks} (or StepCache to skip the whole network)")
        if self._before(self.boundary, sigma):
            return num_blocks - k, num_blocks, "back"
        return 0, k, "front"

    def signal_source(self) -> str | None:
        return None if self.indicator == "interval" else "range_input"
