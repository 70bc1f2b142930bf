"""Cache nodes: ``core.cache`` feature caches applied to a ComfyUI MODEL as model-patcher patches. Node classes
only: the wrappers that drive the core state machine and block-range runner live in ``nodes/cache_wrappers.py``, the
calibration lookup and model identity in ``nodes/cache_store.py``, the calibration run in
``nodes/cache_calibration.py``.

- ``FewstepStepCache`` -- skip the whole network at a step (TeaCache, Liu et al. 2024, arXiv:2411.19108; EasyCache,
  Zhou et al. 2025, arXiv:2507.02860; MagCache, Ma et al. 2025, arXiv:2506.09045), reusing or forecasting
  (TaylorSeer, Liu et al. 2025, arXiv:2503.06923) its residual. Works on any ComfyUI model.
- ``FewstepBlockCache`` -- First-Block-Cache / TeaCache on the block stack (``core.cache.FirstBlockCache``) or
  Delta-DiT (Chen et al. 2024, arXiv:2406.01125; ``core.cache.DeltaDiTCache``) through ``patches_replace["dit"]``
  block replacements, on the architectures whose block layout is declared in ``core.cache.layouts`` (Flux, Wan
  2.1/2.2, SD3, the embedded digits DiT).
- ``FewstepLearnedCache`` -- the learned cache (DisCa, Zou et al. 2025; ``core.cache.learned.LearnedCache``): a
  trained predictor file from ComfyUI's ``models/fewstep_learned_caches`` folder stands in for the middle blocks on a
  fixed skip schedule, through the same block patches; or a *plan* file (``core.cache.learned.LearnedPlanCache``,
  ``save_plan``) gives each call of the run its own block range and predictor. A file trained for other weights is
  refused with both fingerprints named.
- ``FewstepCacheCalibrate`` -- runs a few full-compute sampling runs of the connected MODEL, fits the TeaCache
  polynomials and MagCache curves and writes ``<name>--<hash>.json`` atomically into ComfyUI's
  ``models/fewstep_cache_calibrations`` folder, where the cache nodes then find it by the model's fingerprint
  (architecture, model sampling and weights).
"""

from __future__ import annotations

import json
from typing import Any

import comfy.patcher_extension
import comfy.samplers
from comfy_api.latest import io

from ..core.cache import CacheConfigError, CFGBranchCache, DeltaDiTCache, FirstBlockCache, ResidualCache, StepCache
from ..core.cache.learned import PLAN_FORMAT, LearnedCache, file_format, load_plan, load_predictor, read_header
from ..core.cache.learned.store import check_identity
from .cache_calibration import CALIBRATION_SAMPLERS, calibrate_model
from .cache_store import (
    CALIBRATION_FOLDER,
    LEARNED_FOLDER,
    bind_calibration,
    learned_cache_files,
    learned_cache_path,
    learned_identity,
    model_identity,
)
from .cache_wrappers import (
    BLOCK_KEY,
    STEP_KEY,
    CacheHolder,
    block_layout,
    cfg_reuse_wrapper,
    install_block_cache,
    outer_sample_wrapper,
    step_apply_model_wrapper,
    step_diffusion_model_wrapper,
)

__all__ = ["BLOCK_KEY", "NODES", "STEP_KEY", "FewstepBlockCache", "FewstepCacheCalibrate", "FewstepLearnedCache",
           "FewstepStepCache", "calibrate_model"]

CATEGORY = "fewstep/caches"

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
THRESHOLD_MAX = 1.0


def _check_threshold(threshold: float, node: str) -> float:
    t = float(threshold)
    if not 0.0 <= t <= THRESHOLD_MAX:
        raise ValueError(f"{node}: threshold must be in [0, {THRESHOLD_MAX}] (0 = never skip, exact; typical "
                         f"0.02-0.3), got {threshold}")
    return t


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
                               "'taylor2' forecast it with TaylorSeer (finite differences of the computed ones). "
                               "Core: forecast='reuse' / 'taylor1' / 'taylor2'."),
        io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.01,
                       tooltip="Skipping is allowed from this fraction of the sampling run (ComfyUI's "
                               "percent_to_sigma) ..."),
        io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.01,
                       tooltip="... until this fraction; outside, every call computes."),
        io.Int.Input("max_skips", default=0, min=0, max=100,
                     tooltip="Force a full compute after this many skips in a row (0 = no limit). Core: "
                             "max_consecutive_skips (None = no limit)."),
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
                                       "residual-magnitude ratios (needs a calibration). Core: "
                                       "StepCache(indicator=...), teacache_uncalibrated = 'input'."),
                _threshold_input(0.1),
                *_common_inputs(),
                io.Float.Input("cfg_reuse", default=0.0, min=0.0, max=THRESHOLD_MAX, step=0.001, optional=True,
                               tooltip="CFG-branch reuse (FasterCache): skip the negative (unconditional) branch "
                                       "while the accumulated relative input change stays below this, reusing its "
                                       "difference to the positive branch from the last step both ran. 0 = off "
                                       "(exact). Uses the same start/end percent and max skips. Typical 0.05-0.3."),
            ],
            outputs=[_model_output()],
        )

    @classmethod
    def execute(cls, model: Any, method: str, threshold: float, forecast: str, start_percent: float,
                end_percent: float, max_skips: int, calibration: str, cfg_reuse: float = 0.0) -> io.NodeOutput:
        node = "FewstepStepCache"
        if method not in STEP_METHODS:
            raise ValueError(f"{node}: method must be one of {list(STEP_METHODS)}, got {method!r}")
        kwargs = dict(threshold=_check_threshold(threshold, node), indicator=STEP_METHODS[method],
                      **_core_kwargs(forecast, start_percent, end_percent, max_skips, node))
        try:
            probe = StepCache(**kwargs)
        except CacheConfigError as e:
            raise ValueError(f"{node}: {e}") from e
        identity = model_identity(model)
        bind_calibration(probe, model, calibration, node, identity)
        cal = probe.calibration

        def make() -> StepCache:
            return StepCache(**kwargs, calibration=cal)

        reuse = _check_threshold(cfg_reuse, f"{node} cfg_reuse")
        cfg_kwargs = {**kwargs, "threshold": reuse, "indicator": "input"}

        def make_cfg() -> CFGBranchCache:
            return CFGBranchCache(**cfg_kwargs)

        label = f"{method}, threshold {kwargs['threshold']:g}, forecast {forecast}" + (
            f", cfg_reuse {reuse:g}" if reuse > 0 else "")
        m = model.clone()
        m.model_options["transformer_options"][STEP_KEY] = CacheHolder(
            "step", label, make, model, m, identity=identity, make_cfg=make_cfg if reuse > 0 else None)
        channels = int(model.model.latent_format.latent_channels)
        wmp = comfy.patcher_extension.WrappersMP
        for kind, fn in ((wmp.OUTER_SAMPLE, outer_sample_wrapper(STEP_KEY)),
                         (wmp.APPLY_MODEL, step_apply_model_wrapper()),
                         (wmp.DIFFUSION_MODEL, step_diffusion_model_wrapper(channels)),
                         (wmp.CALC_COND_BATCH, cfg_reuse_wrapper)):
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
                                       "ratios; delta_dit: recompute the cached blocks every 'interval' calls. Core: "
                                       "FirstBlockCache(indicator=...), delta_dit = DeltaDiTCache."),
                _threshold_input(0.1),
                io.Int.Input("head_blocks", default=1, min=1, max=64,
                             tooltip="First-Block-Cache family: blocks that always run before the cached range."),
                io.Int.Input("interval", default=2, min=1, max=16,
                             tooltip="delta_dit: recompute the cached blocks every this many calls (1 = never skip)."),
                io.Int.Input("delta_blocks", default=0, min=0, max=64,
                             tooltip="delta_dit: number of blocks cached (back blocks early, front blocks late); "
                                     "0 = half of the blocks. Core: DeltaDiTCache(num_blocks=...)."),
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
        identity = model_identity(model)
        try:
            probe = cls_(**kwargs)
            bind_calibration(probe, model, calibration, node, identity)
            probe.block_range(len(layout), float("inf"))  # head_blocks / delta_blocks against this model now
        except CacheConfigError as e:
            raise ValueError(f"{node}: {e}") from e
        cal = probe.calibration

        def make() -> ResidualCache:
            return cls_(**kwargs, calibration=cal)

        label = (f"delta_dit, interval {interval}" if cls_ is DeltaDiTCache
                 else f"{method}, threshold {t:g}, head {head_blocks}") + f", forecast {forecast}"
        m = model.clone()
        install_block_cache(m, CacheHolder("block", label, make, model, m, layout, identity), layout)
        return io.NodeOutput(m)


# ----------------------------------------------------------------------------------------------- learned cache


def _parse_skip_steps(text: str, node: str) -> list[int] | None:
    """``"auto"`` / empty -> None (the schedule stored with the predictor); else comma-separated call indices."""
    t = str(text).strip()
    if t in ("", "auto"):
        return None
    try:
        steps = [int(v) for v in t.replace(" ", "").split(",") if v]
    except ValueError:
        raise ValueError(f"{node}: skip_steps must be 'auto' or comma-separated call indices like '1,3', got "
                         f"{text!r}") from None
    if not steps or min(steps) < 1:
        raise ValueError(f"{node}: skip_steps are call indices >= 1 within a run (call 0 always computes), got "
                         f"{text!r}")
    return steps


class FewstepLearnedCache(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FewstepLearnedCache",
            display_name="fewstep learned cache (DisCa-style predictor)",
            category=CATEGORY,
            description="Skips the model's middle transformer blocks at the listed calls of each run and predicts "
                        "their residual with a small trained network (DisCa, Zou et al. 2025) instead of reusing "
                        "it: for few-step students, where rule-based caches find nothing to skip. A plan file "
                        "(LearnedPlanCache) gives each call its own block range and predictor instead. The file "
                        f"(models/{LEARNED_FOLDER}) is keyed to the weights it was trained on; another "
                        "model's is refused. State per guidance branch, reset every run.",
            inputs=[
                io.Model.Input("model", tooltip="The model the predictor was trained for (the embedded digits DiT "
                                                "or another DiT with a declared block layout)."),
                io.Combo.Input("predictor", options=learned_cache_files(),
                               tooltip=f"A learned-cache predictor or plan (.safetensors) in models/{LEARNED_FOLDER}, "
                                       "written by fewstep's learned-cache training (LearnedCacheExport / "
                                       "save_plan)."),
                io.String.Input("skip_steps", default="auto",
                                tooltip="Calls of each sampling run (0-based) whose middle blocks are predicted: "
                                        "'auto' = the schedule the predictor was trained for, or e.g. '1,3'. A plan "
                                        "file carries its own calls and ranges: keep 'auto'."),
            ],
            outputs=[_model_output()],
        )

    @classmethod
    def execute(cls, model: Any, predictor: str, skip_steps: str = "auto") -> io.NodeOutput:
        node = "FewstepLearnedCache"
        path = learned_cache_path(predictor, node)
        if file_format(path) == PLAN_FORMAT:
            return _plan_cache(model, path, skip_steps, node)
        try:
            header = read_header(path)
            check_identity(header["identity"], learned_identity(model), keys=("weights_hash",))
        except (ValueError, KeyError) as e:  # LearnedCacheMismatchError names both fingerprints
            raise ValueError(f"{node}: {e}") from e
        pred, _ = load_predictor(path)
        meta = header.get("meta", {})
        steps = _parse_skip_steps(skip_steps, node)
        steps = steps if steps is not None else meta.get("skip_steps")
        if not steps:
            raise ValueError(f"{node}: {path.name} stores no skip schedule; give skip_steps, e.g. '1,3'")
        layout = block_layout(model)
        kwargs = dict(head_blocks=int(meta.get("head_blocks", 1)), tail_blocks=int(meta.get("tail_blocks", 0)))
        try:
            LearnedCache(pred, steps, **kwargs).block_range(len(layout), float("inf"))
        except CacheConfigError as e:
            raise ValueError(f"{node}: {e}") from e

        def make() -> LearnedCache:  # identity checked above (weights); core's config hash is not comparable here
            return LearnedCache(pred, steps, **kwargs)

        label = f"learned {path.name}, skip {list(steps)}"
        m = model.clone()
        install_block_cache(m, CacheHolder("block", label, make, model, m, layout), layout)
        return io.NodeOutput(m)


def _plan_cache(model: Any, path: Any, skip_steps: str, node: str) -> io.NodeOutput:
    """``FewstepLearnedCache`` on a plan file: ``core.cache.learned.LearnedPlanCache`` (loaded once, checked against
    the MODEL's weights; a fresh cache with the shared predictors per sampling run) through the block patches."""
    if _parse_skip_steps(skip_steps, node) is not None:
        raise ValueError(f"{node}: {path.name} is a learned-cache plan (its own calls and block ranges); set "
                         f"skip_steps to 'auto', got {skip_steps!r}")
    try:
        plan = load_plan(path, identity=learned_identity(model), keys=("weights_hash",))
    except (ValueError, KeyError) as e:  # LearnedCacheMismatchError names both fingerprints
        raise ValueError(f"{node}: {e}") from e
    layout = block_layout(model)
    try:
        plan.block_range(len(layout), float("inf"))
    except CacheConfigError as e:
        raise ValueError(f"{node}: {e}") from e
    label = f"learned plan {path.name}, " + ", ".join(f"call {k}: {n} blocks" for k, n in plan.plan.items())
    m = model.clone()
    install_block_cache(m, CacheHolder("block", label, plan.fresh, model, m, layout), layout)
    return io.NodeOutput(m)


# ----------------------------------------------------------------------------------------------- calibration


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
                                       "steps. Core: calibrate(sampler=...)."),
                io.Combo.Input("scheduler", options=list(comfy.samplers.SCHEDULER_NAMES), default="karras",
                               tooltip="Scheduler; calibrate with a schedule like the one you sample with. Core: "
                                       "calibrate(schedule=...)."),
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


NODES: list[type[io.ComfyNode]] = [FewstepStepCache, FewstepBlockCache, FewstepLearnedCache, FewstepCacheCalibrate]
