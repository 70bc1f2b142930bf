"""Cache nodes: ``core.cache`` feature caches applied to a ComfyUI MODEL as model-patcher patches.

Three nodes, each a thin adapter (ComfyUI types in, a ``core.cache`` state machine driven by ComfyUI's extension
points, a patched MODEL clone out; no weight copies, nothing monkeypatched):

- ``FewstepStepCache`` -- skip the whole network at a step (TeaCache, Liu et al. 2024, arXiv:2411.19108; EasyCache,
  Zhou et al. 2025, arXiv:2507.02860; MagCache, Ma et al. 2025, arXiv:2506.09045), reusing or forecasting
  (TaylorSeer, Liu et al. 2025, arXiv:2503.06923) its residual. Works on any ComfyUI model: a ``DIFFUSION_MODEL``
  wrapper caches the network's native output (``out - x_in``, as ``core.cache`` does on a fewstep ``Denoiser``);
  models whose diffusion model does not run ``DIFFUSION_MODEL`` wrappers (SD3's MMDiT, HunyuanDiT, ...) are found
  on their first call and cached one level up by an ``APPLY_MODEL`` wrapper in the eps space
  ``(x - denoised) / sigma`` (equal to the native output of eps and flow models).
- ``FewstepBlockCache`` -- First-Block-Cache / TeaCache on the block stack (``core.cache.FirstBlockCache``) or
  Delta-DiT (Chen et al. 2024, arXiv:2406.01125; ``core.cache.DeltaDiTCache``) through
  ``patches_replace["dit"]`` block replacements, on architectures that route their blocks through them (Flux,
  Wan 2.1/2.2, SD3, the embedded digits DiT). A skipped range returns ``input + cached residual`` at its first block
  and passes its input through the rest (Flux's concatenation of the text and image streams between its double and
  single blocks happens in between, as in the unpatched model).
- ``FewstepCacheCalibrate`` -- runs a few full-compute sampling runs of the connected MODEL, fits the TeaCache
  polynomials and MagCache curves (``core.cache.fit_calibration``) and writes ``<name>--<hash>.json`` atomically
  into ComfyUI's ``models/fewstep_cache_calibrations`` folder (registered here through ``folder_paths``; add more
  folders with ``extra_model_paths.yaml``), where the cache nodes then find it by the model's fingerprint.

Calibrations are looked up in that folder, then in ``core.cache.default_search_dirs()`` (``$FEWSTEP_CALIBRATION_DIR``,
``~/.cache/fewstep/calibrations``, the calibrations shipped in the package). A ComfyUI model is identified as
``comfy-<model config class>`` (``comfy-SD15``, ``comfy-Flux``, ``comfy-DigitsDiTConfig``) plus
``core.cache.model_fingerprint`` of its diffusion model (parameter names and shapes) and model sampling.

State: a fresh ``core.cache`` object per sampling run (an ``OUTER_SAMPLE`` wrapper creates it in a clone of the
guider's model options, so no tensor survives a run, a prompt, a batch size or a resolution), keyed inside by
guidance branch (``tuple(transformer_options["cond_or_uncond"])``). After each run the node's statistics (model or
block calls computed and skipped) are logged and kept in ``model.model_options["transformer_options"]
["fewstep_step_cache" / "fewstep_block_cache"].last_stats``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Hashable
from pathlib import Path
from typing import Any

import comfy.model_patcher
import comfy.patcher_extension
import comfy.sample
import comfy.samplers
import folder_paths
from comfy_api.latest import io
from torch import Tensor

from ..core.cache import (
    CalibrationError,
    CalibrationMismatchError,
    CalibrationMissingError,
    CalibrationRecorder,
    DeltaDiTCache,
    FirstBlockCache,
    ResidualCache,
    StepCache,
    default_search_dirs,
    fit_calibration,
    model_fingerprint,
    read_calibration,
    save_calibration,
)
from ..core.cache.policy import CacheConfigError, sigma_value
from ._comfy import make_guider, model_sampling_of, register_model_folder

CATEGORY = "fewstep/caches"
CALIBRATION_FOLDER = "fewstep_cache_calibrations"
STEP_KEY = "fewstep_step_cache"
BLOCK_KEY = "fewstep_block_cache"
CALIBRATE_NODE = "'fewstep cache calibration' (FewstepCacheCalibrate)"
STEP_NODE = "'fewstep step cache' (FewstepStepCache)"

#: step cache method -> core indicator
STEP_METHODS = {"teacache": "teacache", "teacache_uncalibrated": "input", "easycache": "easycache",
                "magcache": "magcache"}
#: block cache method -> (core class, indicator, signal)
BLOCK_METHODS = {"first_block": (FirstBlockCache, "first_block", None),
                 "teacache": (FirstBlockCache, "teacache", "range_input"),
                 "easycache": (FirstBlockCache, "easycache", "range_input"),
                 "magcache": (FirstBlockCache, "magcache", None),
                 "delta_dit": (DeltaDiTCache, "interval", None)}
FORECASTS = {"none": "reuse", "taylor1": "taylor1", "taylor2": "taylor2"}
CALIBRATION_SAMPLERS = ("dpmpp_2m", "euler", "euler_ancestral", "lcm")
THRESHOLD_MAX = 1.0

log = logging.getLogger("fewstep")


# ----------------------------------------------------------------------------------------------- calibrations


def register_calibration_folder() -> None:
    """Register ``models/fewstep_cache_calibrations`` with ComfyUI's ``folder_paths`` (idempotent)."""
    register_model_folder(CALIBRATION_FOLDER, CALIBRATION_FOLDER, {".json"})


register_calibration_folder()


def calibration_dirs() -> list[Path]:
    """Where the cache nodes look for calibrations: ComfyUI's calibration folders, then core's default dirs."""
    register_calibration_folder()
    dirs = [Path(p) for p in folder_paths.get_folder_paths(CALIBRATION_FOLDER)]
    return dirs + [d for d in default_search_dirs() if d not in dirs]


def _calibration_source(calibration: str) -> Any:
    """``"auto"`` -> None (lookup by fingerprint); a file name in the calibration folders or a path -> its Path."""
    text = calibration.strip()
    if text in ("", "auto"):
        return None
    for d in calibration_dirs():
        if (d / text).is_file():
            return d / text
    path = Path(text).expanduser()
    if not path.is_file():
        dirs = ", ".join(map(str, calibration_dirs()))
        raise ValueError(f"calibration {text!r} is neither 'auto' nor a file in {dirs} nor an existing path; leave it "
                         f"at 'auto' or run {CALIBRATE_NODE} first")
    return path


class _ComfyModelSamplingConfig:
    """Gives ComfyUI's ``model_sampling`` the ``config()`` that ``core.cache.model_fingerprint`` hashes."""

    def __init__(self, ms: Any) -> None:
        self.ms = ms

    def config(self) -> dict[str, Any]:
        out: dict[str, Any] = {"class": type(self.ms).__name__}
        for name in ("sigma_min", "sigma_max", "shift", "multiplier", "sigma_data"):
            v = getattr(self.ms, name, None)
            if v is not None:
                out[name] = round(float(v), 6)
        return out


def model_identity(model: Any) -> tuple[str, str]:
    """``(name, config_hash)`` of a ComfyUI MODEL for calibration lookup (see the module docstring)."""
    base = model.model
    name = f"comfy-{type(getattr(base, 'model_config', base)).__name__}"
    return model_fingerprint(base.diffusion_model, _ComfyModelSamplingConfig(model_sampling_of(model)), name)


def _bind(cache: ResidualCache, model: Any, calibration: str, node: str) -> None:
    """Resolve the cache's calibration for ``model`` now, so a missing or foreign one fails this node clearly."""
    name, config_hash = model_identity(model)
    try:
        cache.calibration_source = _calibration_source(calibration)
        cache.bind(name, config_hash, model_sampling_of(model), calibration_dirs())
    except CalibrationMissingError as e:
        raise ValueError(f"{node}: this method needs a calibration of the connected model and there is none. Run "
                         f"{CALIBRATE_NODE} once on this MODEL (it writes models/{CALIBRATION_FOLDER}/<model>--<hash>"
                         ".json, found here with calibration 'auto'), or pick a method that needs none (easycache, "
                         f"teacache_uncalibrated, first_block). Details: {e}") from e
    except CalibrationMismatchError as e:
        raise ValueError(f"{node}: the calibration does not fit the connected model: {e}. Run {CALIBRATE_NODE} on "
                         "this MODEL and leave calibration at 'auto'.") from e
    except CalibrationError as e:
        raise ValueError(f"{node}: unusable calibration: {e}") from e


def _check_threshold(threshold: float, node: str) -> float:
    t = float(threshold)
    if not 0.0 <= t <= THRESHOLD_MAX:
        raise ValueError(f"{node}: threshold must be in [0, {THRESHOLD_MAX}] (0 = never skip, exact; typical "
                         f"0.02-0.3), got {threshold}")
    return t


# ----------------------------------------------------------------------------------------------- run state


def _options(args: tuple, kwargs: dict) -> dict:
    """The ``transformer_options`` of a wrapped call (keyword, or the last / second-to-last positional argument)."""
    opts = kwargs.get("transformer_options")
    if isinstance(opts, dict):
        return opts
    for a in args[-1:-3:-1]:
        if isinstance(a, dict):
            return a
    return {}


def _branch(opts: dict) -> Hashable:
    return tuple(opts.get("cond_or_uncond") or ())


class CacheHolder:
    """What a cache node stores in the MODEL's ``transformer_options``: how to build the run's core cache, and the
    statistics of past runs (``last_stats``, ``history``)."""

    def __init__(self, kind: str, label: str, make: Callable[[], ResidualCache], model: Any,
                 layout: list[tuple[str, int, tuple[str, ...]]] | None = None) -> None:
        self.kind = kind
        self.label = label
        self.make = make
        self.identity = model_identity(model)
        self.layout = layout
        self.last_stats: dict[str, Any] | None = None
        self.history: list[dict[str, Any]] = []

    def new_run(self, model_sampling: Any) -> _Run:
        cache = self.make()
        cache.bind(*self.identity, model_sampling)
        cache.reset()
        return _Run(self, cache)

    def finish(self, run: _Run) -> None:
        stats = {**run.cache.stats, "label": self.label}
        if self.kind == "step":
            stats["level"] = run.level  # where the network was cached: "diffusion_model" or "apply_model"
        self.last_stats = stats
        self.history.append(stats)
        run.cache.reset()
        if self.kind == "step":
            n = stats["computed"] + stats["skipped"]
            log.info("fewstep step cache (%s): %d model calls, %d computed, %d skipped (%.2fx fewer)", self.label, n,
                     stats["computed"], stats["skipped"], n / max(stats["computed"], 1))
        else:
            n = stats["blocks_run"] + stats["blocks_skipped"]
            log.info("fewstep block cache (%s): %d block calls, %d run, %d skipped (%.2fx fewer)", self.label, n,
                     stats["blocks_run"], stats["blocks_skipped"], n / max(stats["blocks_run"], 1))


class _Call:
    __slots__ = ("sigma", "key", "a", "b", "region", "compute", "head_in", "txt_len", "range_in")

    def __init__(self, sigma: float, key: Hashable, a: int, b: int, region: Hashable) -> None:
        self.sigma, self.key, self.a, self.b, self.region = sigma, key, a, b, region
        self.compute = True
        self.head_in: Tensor | None = None
        self.txt_len = 0
        self.range_in: tuple | None = None


class _Run:
    """One sampling run of a cached MODEL: the core cache and the per-call bookkeeping of the hosts' hooks."""

    def __init__(self, holder: CacheHolder, cache: ResidualCache) -> None:
        self.holder = holder
        self.cache = cache
        self.level: str | None = None  # step cache: "diffusion_model" or "apply_model", found on the first call
        self.call: _Call | None = None

    # ------------------------------------------------------------------ block level (patches_replace["dit"])
    def _streams(self, g: int) -> tuple[str, ...]:
        return self.holder.layout[g][2]

    def _img(self, g: int, args: dict, c: _Call) -> Tensor:
        """The image tokens entering block ``g`` (after Flux's concatenation: the part after the text tokens)."""
        img = args["img"]
        if "txt" not in self._streams(g) and c.txt_len and c.head_in is not None and img.shape != c.head_in.shape:
            img = img[:, c.txt_len:]
        return img

    def block(self, g: int, args: dict, original: Callable[[dict], dict], opts: dict) -> dict:
        cache = self.cache
        n = len(self.holder.layout)
        if g == 0:  # a new model call
            sigmas = opts.get("sigmas")
            if sigmas is None:
                self.call = None
            else:
                s = sigma_value(sigmas)
                a, b, region = cache.block_range(n, s)
                self.call = _Call(s, _branch(opts), a, b, region)
                self.call.head_in = args["img"]
                txt = args.get("txt")
                if "txt" in self._streams(0) and isinstance(txt, Tensor):
                    self.call.txt_len = txt.shape[1]
        c = self.call
        if c is None:
            return original(args)
        streams = self._streams(g)
        if g == c.a:
            state = tuple(args[s] for s in streams)
            signal = None
            source = cache.signal_source()
            if source == "head_residual":
                signal = self._img(g, args, c) - c.head_in
            elif source == "range_input":
                signal = self._img(g, args, c)
            c.compute = cache.should_compute(state, c.sigma, c.key, signal=signal, region=c.region)
            if not c.compute:
                cache.stats["blocks_skipped"] += c.b - c.a
                return dict(zip(streams, cache.predict(state, c.key)))
            c.range_in = state
        elif c.a < g < c.b and not c.compute:
            return {s: args[s] for s in streams}
        out = original(args)
        cache.stats["blocks_run"] += 1
        if g == c.b - 1 and c.range_in is not None:
            end = tuple(out[s] for s in streams)
            if len(c.range_in) == 2 and len(end) == 1:  # crossed Flux's torch.cat((txt, img), 1)
                nt = c.range_in[1].shape[1]
                end = (end[0][:, nt:], end[0][:, :nt])
            cache.update(c.range_in, end, c.key)
            c.range_in = None
        return out


def _outer_sample_wrapper(key: str) -> Callable[..., Any]:
    """``OUTER_SAMPLE`` wrapper: a fresh core cache for this sampling run (in a clone of the guider's model options,
    as ComfyUI's EasyCache does), statistics kept and logged at the end, every cached tensor dropped."""

    def wrapper(executor: Any, *args: Any, **kwargs: Any) -> Any:
        guider = executor.class_obj
        orig = guider.model_options
        holder: CacheHolder | None = orig.get("transformer_options", {}).get(key)
        if not isinstance(holder, CacheHolder):
            return executor(*args, **kwargs)
        guider.model_options = comfy.model_patcher.create_model_options_clone(orig)
        run = holder.new_run(guider.model_patcher.get_model_object("model_sampling"))
        guider.model_options["transformer_options"][f"{key}_run"] = run
        try:
            return executor(*args, **kwargs)
        finally:
            holder.finish(run)
            guider.model_options = orig

    return wrapper


def _step_diffusion_model_wrapper(latent_channels: int) -> Callable[..., Any]:
    """``DIFFUSION_MODEL`` wrapper: the step cache on the network's native output (residual ``out - x_in``, ``x_in``
    without concatenated conditioning channels)."""

    def wrapper(executor: Any, *args: Any, **kwargs: Any) -> Any:
        opts = _options(args, kwargs)
        run: _Run | None = opts.get(f"{STEP_KEY}_run")
        x = args[0] if args else None
        if run is None or run.level == "apply_model" or opts.get("sigmas") is None or not isinstance(x, Tensor):
            return executor(*args, **kwargs)
        run.level = "diffusion_model"
        return run.cache(lambda: executor(*args, **kwargs), x[:, :latent_channels], opts["sigmas"], _branch(opts))

    return wrapper


def _step_apply_model_wrapper() -> Callable[..., Any]:
    """``APPLY_MODEL`` wrapper: finds out on the first call whether the diffusion model runs ``DIFFUSION_MODEL``
    wrappers; if not, caches here in eps space ``(x - denoised) / sigma`` against the network input."""

    def wrapper(executor: Any, *args: Any, **kwargs: Any) -> Any:
        opts = _options(args, kwargs)
        run: _Run | None = opts.get(f"{STEP_KEY}_run")
        x, sigma = args[0], args[1]
        if run is None or run.level == "diffusion_model" or opts.get("sigmas") is None:
            return executor(*args, **kwargs)
        if run.level is None:  # first call of the run: let the DIFFUSION_MODEL wrapper claim it
            out = executor(*args, **kwargs)
            if run.level is not None:
                return out
            run.level = "apply_model"
            if bool((sigma > 0).all()):
                x_in, s = _eps_frame(executor.class_obj, x, sigma)
                if run.cache.should_compute(x_in, sigma, _branch(opts)):
                    run.cache.update(x_in, (x - out) / s, _branch(opts))
                else:  # pragma: no cover - a fresh run always computes its first call
                    run.cache.predict(x_in, _branch(opts))
            return out
        if not bool((sigma > 0).all()):
            return executor(*args, **kwargs)
        x_in, s = _eps_frame(executor.class_obj, x, sigma)
        key = _branch(opts)
        if run.cache.should_compute(x_in, sigma, key):
            out = executor(*args, **kwargs)
            run.cache.update(x_in, (x - out) / s, key)
            return out
        return x - run.cache.predict(x_in, key) * s

    return wrapper


def _eps_frame(base: Any, x: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor]:
    s = sigma.reshape(sigma.shape[:1] + (1,) * (x.ndim - 1)).to(x)
    return base.model_sampling.calculate_input(sigma, x), s


class _BlockPatch:
    """``patches_replace["dit"][(kind, i)]``: block ``g`` of the stack, driven by the run's block cache."""

    def __init__(self, g: int) -> None:
        self.g = g

    def __call__(self, args: dict, extra: dict) -> dict:
        opts = args.get("transformer_options") or {}
        run: _Run | None = opts.get(f"{BLOCK_KEY}_run")
        if run is None:
            return extra["original_block"](args)
        return run.block(self.g, args, extra["original_block"], opts)


# ----------------------------------------------------------------------------------------------- architectures


def block_layout(model: Any) -> list[tuple[str, int, tuple[str, ...]]]:
    """The transformer blocks of a MODEL as ``patches_replace["dit"]`` routes them, in execution order:
    ``(block kind, index, streams the block updates)``. Raises ``ValueError`` naming the architecture if its
    blocks are not routed through ``patches_replace["dit"]``."""
    from comfy.ldm.flux.model import Flux
    from comfy.ldm.modules.diffusionmodules.mmdit import MMDiT
    from comfy.ldm.wan.model import WanModel, WanModel_S2V

    from .embedded_model import DigitsDiT

    dm = model.model.diffusion_model
    if isinstance(dm, DigitsDiT):
        return [("double_block", i, ("img",)) for i in range(len(dm.dit.transformer_blocks))]
    if type(dm) is Flux:
        return ([("double_block", i, ("img", "txt")) for i in range(len(dm.double_blocks))]
                + [("single_block", i, ("img",)) for i in range(len(dm.single_blocks))])
    if isinstance(dm, WanModel) and not isinstance(dm, WanModel_S2V):
        return [("double_block", i, ("img",)) for i in range(len(dm.blocks))]
    if isinstance(dm, MMDiT):
        return [("double_block", i, ("img", "txt")) for i in range(len(dm.joint_blocks))]
    arch = type(getattr(model.model, "model_config", model.model)).__name__
    raise ValueError(
        f"the block cache replaces transformer blocks through patches_replace['dit'], which this model "
        f"({arch}, {type(dm).__name__}) does not route its blocks through (supported: Flux, Wan 2.1/2.2, SD3, the "
        f"embedded digits DiT); use {STEP_NODE} instead, which works on every model")


def _reject_cached(model: Any, node: str) -> None:
    opts = model.model_options.get("transformer_options", {})
    if any(isinstance(opts.get(k), CacheHolder) for k in (STEP_KEY, BLOCK_KEY)):
        raise ValueError(f"{node}: the connected MODEL already has a fewstep cache; connect the calibration node "
                         "before the cache nodes (calibration needs every model call computed)")


# ----------------------------------------------------------------------------------------------- inputs


def _threshold_input(default: float) -> io.Float.Input:
    return io.Float.Input("threshold", default=default, min=0.0, max=THRESHOLD_MAX, step=0.001,
                          tooltip="Skip while the method's accumulated change estimate stays below this. 0 never "
                                  "skips (output identical to the uncached model). Typical: easycache / teacache "
                                  "0.05-0.3, first_block 0.05-0.2, magcache 0.01-0.1.")


def _common_inputs() -> list:
    return [
        io.Combo.Input("forecast", options=list(FORECASTS), default="none",
                       tooltip="What a skipped call returns: 'none' reuses the last computed residual; 'taylor1' / "
                               "'taylor2' forecast it with TaylorSeer (finite differences of the computed ones)."),
        io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.01,
                       tooltip="Skipping is allowed from this fraction of the sampling run (ComfyUI's "
                               "percent_to_sigma) ..."),
        io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.01,
                       tooltip="... until this fraction; outside, every call computes."),
        io.Int.Input("max_skips", default=0, min=0, max=100,
                     tooltip="Force a full compute after this many skips in a row (0 = no limit)."),
        io.String.Input("calibration", default="auto",
                        tooltip="Only teacache and magcache read one. 'auto' looks up the connected model's "
                                "calibration (by its fingerprint) in models/fewstep_cache_calibrations, "
                                "~/.cache/fewstep/calibrations and the ones shipped with fewstep; or a file name "
                                "there / a path. Make one with 'fewstep cache calibration'."),
    ]


def _core_kwargs(forecast: str, start_percent: float, end_percent: float, max_skips: int, node: str) -> dict:
    if forecast not in FORECASTS:
        raise ValueError(f"{node}: forecast must be one of {list(FORECASTS)}, got {forecast!r}")
    if not 0.0 <= start_percent <= end_percent <= 1.0:
        raise ValueError(f"{node}: need 0 <= start_percent <= end_percent <= 1, got {start_percent}, {end_percent}")
    return {"forecast": FORECASTS[forecast], "start_percent": float(start_percent), "end_percent": float(end_percent),
            "max_consecutive_skips": int(max_skips) if max_skips > 0 else None}


def _model_output() -> io.Model.Output:
    return io.Model.Output(tooltip="The MODEL with the cache applied (a patched clone; the input MODEL is unchanged).")


# ----------------------------------------------------------------------------------------------- nodes


class FewstepStepCache(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FewstepStepCache",
            display_name="fewstep step cache (TeaCache / EasyCache / MagCache)",
            category=CATEGORY,
            description="Skips whole model calls whose input barely changed and reuses (or TaylorSeer-forecasts) the "
                        "last computed residual: TeaCache (arXiv:2411.19108), EasyCache (arXiv:2507.02860), "
                        "MagCache (arXiv:2506.09045). Any model. State per guidance branch, reset every run; "
                        "calls computed / skipped are logged after each run.",
            inputs=[
                io.Model.Input("model", tooltip="The model to accelerate."),
                io.Combo.Input("method", options=list(STEP_METHODS), default="easycache",
                               tooltip="teacache: calibrated input change (needs a calibration); "
                                       "teacache_uncalibrated: raw relative input change; easycache: input change x "
                                       "measured transformation rate (no calibration); magcache: calibrated "
                                       "residual-magnitude ratios (needs a calibration)."),
                _threshold_input(0.1),
                *_common_inputs(),
            ],
            outputs=[_model_output()],
        )

    @classmethod
    def execute(cls, model: Any, method: str, threshold: float, forecast: str, start_percent: float,
                end_percent: float, max_skips: int, calibration: str) -> io.NodeOutput:
        node = "FewstepStepCache"
        if method not in STEP_METHODS:
            raise ValueError(f"{node}: method must be one of {list(STEP_METHODS)}, got {method!r}")
        kwargs = dict(threshold=_check_threshold(threshold, node), indicator=STEP_METHODS[method],
                      **_core_kwargs(forecast, start_percent, end_percent, max_skips, node))
        try:
            probe = StepCache(**kwargs)
        except CacheConfigError as e:
            raise ValueError(f"{node}: {e}") from e
        _bind(probe, model, calibration, node)
        cal = probe.calibration

        def make() -> StepCache:
            return StepCache(**kwargs, calibration=cal)

        label = f"{method}, threshold {kwargs['threshold']:g}, forecast {forecast}"
        m = model.clone()
        m.model_options["transformer_options"][STEP_KEY] = CacheHolder("step", label, make, model)
        channels = int(model.model.latent_format.latent_channels)
        wmp = comfy.patcher_extension.WrappersMP
        for kind, fn in ((wmp.OUTER_SAMPLE, _outer_sample_wrapper(STEP_KEY)),
                         (wmp.APPLY_MODEL, _step_apply_model_wrapper()),
                         (wmp.DIFFUSION_MODEL, _step_diffusion_model_wrapper(channels))):
            m.remove_wrappers_with_key(kind, STEP_KEY)
            m.add_wrapper_with_key(kind, STEP_KEY, fn)
        return io.NodeOutput(m)


class FewstepBlockCache(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FewstepBlockCache",
            display_name="fewstep block cache (First-Block-Cache / Delta-DiT)",
            category=CATEGORY,
            description="Runs the first transformer block(s) every step and skips the rest while they barely "
                        "change (First-Block-Cache, TeaCache on blocks), or caches the back / front blocks by "
                        "sampling phase (Delta-DiT, arXiv:2406.01125), through patches_replace block "
                        "replacements. For DiTs that route their blocks through them (Flux, Wan, SD3, the embedded "
                        "digits DiT); UNets: use the step cache.",
            inputs=[
                io.Model.Input("model", tooltip="A DiT-style model (Flux, Wan 2.1/2.2, SD3, the embedded digits DiT)."),
                io.Combo.Input("method", options=list(BLOCK_METHODS), default="first_block",
                               tooltip="first_block: change of the head blocks' residual (First-Block-Cache); "
                                       "teacache: calibrated change of the hidden state entering the cached blocks; "
                                       "easycache: its change x transformation rate; magcache: calibrated magnitude "
                                       "ratios; delta_dit: recompute the cached blocks every 'interval' calls."),
                _threshold_input(0.1),
                io.Int.Input("head_blocks", default=1, min=1, max=64,
                             tooltip="First-Block-Cache family: blocks that always run before the cached range."),
                io.Int.Input("interval", default=2, min=1, max=16,
                             tooltip="delta_dit: recompute the cached blocks every this many calls (1 = never skip)."),
                io.Int.Input("delta_blocks", default=0, min=0, max=64,
                             tooltip="delta_dit: number of blocks cached (back blocks early, front blocks late); "
                                     "0 = half of the blocks."),
                io.Float.Input("boundary", default=0.5, min=0.0, max=1.0, step=0.01,
                               tooltip="delta_dit: fraction of the run where caching moves from the back blocks to "
                                       "the front blocks."),
                *_common_inputs(),
            ],
            outputs=[_model_output()],
        )

    @classmethod
    def execute(cls, model: Any, method: str, threshold: float, head_blocks: int, interval: int, delta_blocks: int,
                boundary: float, forecast: str, start_percent: float, end_percent: float, max_skips: int,
                calibration: str) -> io.NodeOutput:
        node = "FewstepBlockCache"
        if method not in BLOCK_METHODS:
            raise ValueError(f"{node}: method must be one of {list(BLOCK_METHODS)}, got {method!r}")
        layout = block_layout(model)
        cls_, indicator, signal = BLOCK_METHODS[method]
        common = _core_kwargs(forecast, start_percent, end_percent, max_skips, node)
        t = _check_threshold(threshold, node)
        if cls_ is DeltaDiTCache:
            if common["max_consecutive_skips"] is not None:
                raise ValueError(f"{node}: delta_dit sets the skips from 'interval'; leave max_skips at 0")
            common.pop("max_consecutive_skips")
            kwargs = dict(threshold=1.0, interval=int(interval), num_blocks=int(delta_blocks) or None,
                          boundary=float(boundary), indicator=indicator, **common)
        else:
            kwargs = dict(threshold=t, head_blocks=int(head_blocks), indicator=indicator, signal=signal, **common)
        try:
            probe = cls_(**kwargs)
            _bind(probe, model, calibration, node)
            probe.block_range(len(layout), float("inf"))  # head_blocks / delta_blocks against this model now
        except CacheConfigError as e:
            raise ValueError(f"{node}: {e}") from e
        cal = probe.calibration

        def make() -> ResidualCache:
            return cls_(**kwargs, calibration=cal)

        label = (f"delta_dit, interval {interval}" if cls_ is DeltaDiTCache
                 else f"{method}, threshold {t:g}, head {head_blocks}") + f", forecast {forecast}"
        m = model.clone()
        m.model_options["transformer_options"][BLOCK_KEY] = CacheHolder("block", label, make, model, layout)
        wmp = comfy.patcher_extension.WrappersMP
        m.remove_wrappers_with_key(wmp.OUTER_SAMPLE, BLOCK_KEY)
        m.add_wrapper_with_key(wmp.OUTER_SAMPLE, BLOCK_KEY, _outer_sample_wrapper(BLOCK_KEY))
        for g, (kind, i, _) in enumerate(layout):
            m.set_model_patch_replace(_BlockPatch(g), "dit", kind, i)
        return io.NodeOutput(m)


# ----------------------------------------------------------------------------------------------- calibration


class _CalibrationHooks:
    """Records one calibration run through the same extension points the caches use."""

    def __init__(self, rec: CalibrationRecorder, layout: list | None, head_blocks: int, channels: int) -> None:
        self.rec = rec
        self.layout = layout
        self.head = head_blocks
        self.channels = channels
        self.level: str | None = None
        self.calls: dict[Hashable, int] = {}
        self.range_in: Tensor | None = None
        self.txt_len = 0

    def _row(self, opts: dict) -> Hashable:
        key = _branch(opts)
        self.calls[key] = self.calls.get(key, 0) + 1
        self.rec.begin(sigma_value(opts["sigmas"]))
        return key

    def _step(self, x_in: Tensor, out: Tensor, key: Hashable) -> None:
        self.rec.change("input", x_in, key)
        self.rec.change("output", out, key)
        self.rec.norm("step", out - x_in if out.shape == x_in.shape else out)

    def diffusion_model(self, executor: Any, *args: Any, **kwargs: Any) -> Any:
        opts = _options(args, kwargs)
        if opts.get("sigmas") is None or self.level == "apply_model":
            return executor(*args, **kwargs)
        self.level = "diffusion_model"
        key = self._row(opts)
        out = executor(*args, **kwargs)
        self._step(args[0][:, :self.channels], out, key)
        return out

    def apply_model(self, executor: Any, *args: Any, **kwargs: Any) -> Any:
        opts = _options(args, kwargs)
        if opts.get("sigmas") is None or self.level == "diffusion_model":
            return executor(*args, **kwargs)
        x, sigma = args[0], args[1]
        if self.level == "apply_model":
            key = self._row(opts)
        out = executor(*args, **kwargs)
        if self.level is None:  # the diffusion model did not run DIFFUSION_MODEL wrappers
            self.level = "apply_model"
            key = self._row(opts)
        if self.level == "apply_model" and bool((sigma > 0).all()):
            x_in, s = _eps_frame(executor.class_obj, x, sigma)
            self._step(x_in, (x - out) / s, key)
        return out

    def block(self, g: int) -> Callable[[dict, dict], dict]:
        def patch(args: dict, extra: dict) -> dict:
            opts = args.get("transformer_options") or {}
            key = _branch(opts)
            streams = self.layout[g][2]
            if g == 0:
                txt = args.get("txt")
                self.txt_len = txt.shape[1] if "txt" in streams and isinstance(txt, Tensor) else 0
            img = args["img"]
            if "txt" not in streams and self.txt_len:
                img = img[:, self.txt_len:]
            if g == self.head and opts.get("sigmas") is not None:
                self.rec.change("range_input", img, key)
                self.range_in = img
            out = extra["original_block"](args)
            if g == len(self.layout) - 1 and self.range_in is not None:
                end = out["img"][:, self.txt_len:] if "txt" not in streams and self.txt_len else out["img"]
                if end.shape == self.range_in.shape:
                    self.rec.norm(f"blocks:{self.head}", end - self.range_in)
                self.range_in = None
            return out

        return patch


class FewstepCacheCalibrate(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FewstepCacheCalibrate",
            display_name="fewstep cache calibration",
            category=CATEGORY,
            description="Samples the connected model a few times at full compute and fits the TeaCache "
                        "polynomials and MagCache curves the caches read, written to models/"
                        f"{CALIBRATION_FOLDER}/<model>--<hash>.json; the cache nodes then find it with "
                        "calibration 'auto'. Run once per model (architecture + model sampling).",
            inputs=[
                io.Model.Input("model", tooltip="The model to calibrate (before any cache node)."),
                io.Conditioning.Input("positive", tooltip="Positive conditioning of typical prompts."),
                io.Conditioning.Input("negative", tooltip="Negative conditioning (used when cfg != 1)."),
                io.Latent.Input("latent_image", tooltip="A typical latent (size and batch of your generations)."),
                io.Combo.Input("sampler_name", options=list(CALIBRATION_SAMPLERS), default="dpmpp_2m",
                               tooltip="A one-evaluation-per-step sampler, so consecutive calls are consecutive "
                                       "steps."),
                io.Combo.Input("scheduler", options=list(comfy.samplers.SCHEDULER_NAMES), default="karras",
                               tooltip="Scheduler; calibrate with a schedule like the one you sample with."),
                io.Int.Input("steps", default=30, min=4, max=200,
                             tooltip="Steps per calibration run (like the step count you sample with)."),
                io.Float.Input("cfg", default=4.0, min=0.0, max=100.0, step=0.1,
                               tooltip="Classifier-free guidance scale of the calibration runs."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=False,
                             tooltip="Noise seed of the first run (run k uses seed + k)."),
                io.Int.Input("runs", default=2, min=1, max=16,
                             tooltip="Number of calibration runs (different noise), pooled in the fit."),
                io.Int.Input("head_blocks", default=1, min=1, max=64,
                             tooltip="For the block cache: the head_blocks whose block-stack curve is recorded "
                                     "(use the value of the block cache node)."),
            ],
            outputs=[
                io.Model.Output(tooltip="The input MODEL, unchanged (connect it to the cache nodes)."),
                io.String.Output(display_name="summary", tooltip="Where the calibration was written and what it "
                                                                "holds (JSON)."),
            ],
        )

    @classmethod
    def execute(cls, model: Any, positive: Any, negative: Any, latent_image: dict, sampler_name: str, scheduler: str,
                steps: int, cfg: float, seed: int, runs: int, head_blocks: int) -> io.NodeOutput:
        path, summary = calibrate_model(model, positive, negative, latent_image, sampler_name=sampler_name,
                                        scheduler=scheduler, steps=steps, cfg=cfg, seed=seed, runs=runs,
                                        head_blocks=head_blocks)
        return io.NodeOutput(model, json.dumps(summary, indent=1))


def calibrate_model(model: Any, positive: Any, negative: Any, latent_image: dict, *, sampler_name: str = "dpmpp_2m",
                    scheduler: str = "karras", steps: int = 30, cfg: float = 4.0, seed: int = 0, runs: int = 2,
                    head_blocks: int = 1, directory: str | Path | None = None) -> tuple[Path, dict[str, Any]]:
    """Calibrate a ComfyUI MODEL for the cache nodes (see ``FewstepCacheCalibrate``) and save the calibration into
    ``directory`` (default: the first ``fewstep_cache_calibrations`` folder). Returns ``(path, summary)``."""
    node = "FewstepCacheCalibrate"
    if sampler_name not in CALIBRATION_SAMPLERS:
        raise ValueError(f"{node}: sampler_name must be one of {list(CALIBRATION_SAMPLERS)} (one model call per "
                         f"step), got {sampler_name!r}")
    _reject_cached(model, node)
    try:
        layout: list | None = block_layout(model)
    except ValueError:
        layout = None
    if layout is not None and not 1 <= head_blocks < len(layout):
        raise ValueError(f"{node}: head_blocks must be in [1, {len(layout) - 1}] for this model's {len(layout)} "
                         f"blocks, got {head_blocks}")
    rec = CalibrationRecorder()
    hooks = _CalibrationHooks(rec, layout, int(head_blocks), int(model.model.latent_format.latent_channels))
    m = model.clone()
    wmp = comfy.patcher_extension.WrappersMP
    m.add_wrapper_with_key(wmp.APPLY_MODEL, "fewstep_calibrate", hooks.apply_model)
    m.add_wrapper_with_key(wmp.DIFFUSION_MODEL, "fewstep_calibrate", hooks.diffusion_model)
    for g, (kind, i, _) in enumerate(layout or []):
        m.set_model_patch_replace(hooks.block(g), "dit", kind, i)
    sigmas = comfy.samplers.calculate_sigmas(model_sampling_of(model), scheduler, int(steps)).cpu()
    latent = comfy.sample.fix_empty_latent_channels(m, latent_image["samples"])
    guider = make_guider(m, cfg, positive, negative)
    sampler = comfy.samplers.sampler_object(sampler_name)
    for r in range(int(runs)):
        if r:
            rec.new_run()
        noise = comfy.sample.prepare_noise(latent, int(seed) + r)
        guider.sample(noise, latent, sampler, sigmas, disable_pbar=True, seed=int(seed) + r)
    n_steps = len(sigmas) - 1
    bad = {k: v for k, v in hooks.calls.items() if v != n_steps * int(runs)}
    if not hooks.calls or bad:
        raise ValueError(f"{node}: expected {n_steps} model calls per run and guidance branch, got "
                         f"{hooks.calls or 'none'}; use a one-evaluation sampler ({', '.join(CALIBRATION_SAMPLERS)})")
    name, config_hash = model_identity(model)
    curves = ["step"] + ([f"blocks:{head_blocks}"] if layout is not None else [])
    try:
        cal = fit_calibration(rec, name, config_hash, degree=4, curves=curves)
    except CalibrationError as e:
        raise ValueError(f"{node}: {e}") from e
    cal.recipe.update({"host": "comfyui", "level": hooks.level, "sampler": sampler_name, "schedule": scheduler,
                       "steps": n_steps, "runs": int(runs), "cfg": float(cfg), "rows": int(latent.shape[0]),
                       "head_blocks": int(head_blocks), "num_blocks": len(layout) if layout else 0, "degree": 4})
    out_dir = Path(directory) if directory is not None else calibration_dirs()[0]
    path = save_calibration(cal, out_dir)
    read_calibration(path).check(name, config_hash)
    summary = {"path": str(path), "model": name, "config_hash": config_hash, "level": hooks.level,
               "polys": sorted(cal.polys), "mag_curves": sorted(cal.mag), "calls": sum(hooks.calls.values()),
               "poly_rmse": {k[len("poly_rmse_"):]: round(v, 5) for k, v in cal.recipe.items()
                             if k.startswith("poly_rmse_")}}
    log.info("fewstep cache calibration written to %s", path)
    return path, summary


NODES: list[type[io.ComfyNode]] = [FewstepStepCache, FewstepBlockCache, FewstepCacheCalibrate]
