"""Calibration of a ComfyUI MODEL for the cache nodes: a few full-compute sampling runs recorded through the same
extension points the caches use (``APPLY_MODEL`` / ``DIFFUSION_MODEL`` wrappers, ``patches_replace["dit"]``), fitted by
``core.cache.fit_calibration`` and written atomically into ``models/fewstep_cache_calibrations`` as
``<name>--<identity hash>.json`` (``nodes/cache_store.py``: the hash covers the architecture, model sampling and
weights)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable
from pathlib import Path
from typing import Any

import comfy.patcher_extension
import comfy.sample
import comfy.samplers
from torch import Tensor

from ..core.cache import CalibrationError, CalibrationRecorder, fit_calibration, read_calibration, save_calibration
from ..core.cache.tensors import sigma_value
from .cache_store import calibration_dirs, model_identity
from .cache_wrappers import block_layout, branch, call_options, eps_frame, reject_cached
from .guiders import make_guider
from .model_info import model_sampling_of

CALIBRATION_SAMPLERS = ("dpmpp_2m", "euler", "euler_ancestral", "lcm")

log = logging.getLogger("fewstep")


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
        key = branch(opts)
        self.calls[key] = self.calls.get(key, 0) + 1
        self.rec.begin(sigma_value(opts["sigmas"]))
        return key

    def _step(self, x_in: Tensor, out: Tensor, key: Hashable) -> None:
        self.rec.change("input", x_in, key)
        self.rec.change("output", out, key)
        self.rec.norm("step", out - x_in if out.shape == x_in.shape else out)

    def diffusion_model(self, executor: Any, *args: Any, **kwargs: Any) -> Any:
        opts = call_options(args, kwargs)
        if opts.get("sigmas") is None or self.level == "apply_model":
            return executor(*args, **kwargs)
        self.level = "diffusion_model"
        key = self._row(opts)
        out = executor(*args, **kwargs)
        self._step(args[0][:, :self.channels], out, key)
        return out

    def apply_model(self, executor: Any, *args: Any, **kwargs: Any) -> Any:
        opts = call_options(args, kwargs)
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
            x_in, s = eps_frame(executor.class_obj, x, sigma)
            self._step(x_in, (x - out) / s, key)
        return out

    def block(self, g: int) -> Callable[[dict, dict], dict]:
        def patch(args: dict, extra: dict) -> dict:
            opts = args.get("transformer_options") or {}
            key = branch(opts)
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



def calibrate_model(model: Any, positive: Any, negative: Any, latent_image: dict, *, sampler_name: str = "dpmpp_2m",
                    scheduler: str = "karras", steps: int = 30, cfg: float = 4.0, seed: int = 0, runs: int = 2,
                    head_blocks: int = 1, directory: str | Path | None = None) -> tuple[Path, dict[str, Any]]:
    """Calibrate a ComfyUI MODEL for the cache nodes (see ``FewstepCacheCalibrate``) and save the calibration into
    ``directory`` (default: the first ``fewstep_cache_calibrations`` folder). Returns ``(path, summary)``."""
    node = "FewstepCacheCalibrate"
    if sampler_name not in CALIBRATION_SAMPLERS:
        raise ValueError(f"{node}: sampler_name must be one of {list(CALIBRATION_SAMPLERS)} (one model call per "
                         f"step), got {sampler_name!r}")
    reject_cached(model, node)
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
    name, config_hash, weights = model_identity(model)
    curves = ["step"] + ([f"blocks:{head_blocks}"] if layout is not None else [])
    try:
        cal = fit_calibration(rec, name, config_hash, degree=4, curves=curves)
    except CalibrationError as e:
        raise ValueError(f"{node}: {e}") from e
    cal.weights = weights
    cal.recipe.update({"host": "comfyui", "level": hooks.level, "sampler": sampler_name, "schedule": scheduler,
                       "steps": n_steps, "runs": int(runs), "cfg": float(cfg), "rows": int(latent.shape[0]),
                       "head_blocks": int(head_blocks), "num_blocks": len(layout) if layout else 0, "degree": 4})
    out_dir = Path(directory) if directory is not None else calibration_dirs()[0]
    try:
        path = save_calibration(cal, out_dir)  # refuses NaN / non-positive fits instead of writing them
    except CalibrationError as e:
        raise ValueError(f"{node}: the fitted calibration is unusable ({e}); calibrate with more steps or runs, or "
                         "another sampler / scheduler") from e
    read_calibration(path).check(name, config_hash)
    summary = {"path": str(path), "model": name, "config_hash": config_hash, "level": hooks.level,
               "polys": sorted(cal.polys), "mag_curves": sorted(cal.mag), "calls": sum(hooks.calls.values()),
               "poly_rmse": {k[len("poly_rmse_"):]: round(v, 5) for k, v in cal.recipe.items()
                             if k.startswith("poly_rmse_")}}
    log.info("fewstep cache calibration written to %s", path)
    return path, summary
