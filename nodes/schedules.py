"""Schedule nodes: SIGMAS outputs for SamplerCustom / SamplerCustomAdvanced.

- ``FewstepTimestepSchedule``: the explicit timestep list a distilled model was trained on (DMD2's 999/749/499/249,
  LCM's and TCD's skipping-step lists), mapped to sigmas by the connected model's own ``model_sampling``.
- ``FewstepScheduleSearch``: ``core.sampling.search_schedule`` run on the connected model with its conditioning,
  cached by model content + settings.
"""

from __future__ import annotations

import json
from typing import Any

import comfy.sample
import torch
from comfy_api.latest import io

from ..core.sampling import check_sigmas, search_schedule, timestep_list
from ._comfy import ResultCache, digest, make_guider, model_fingerprint, model_sampling_of, parse_numbers, run_in_guider

CATEGORY = "fewstep/schedules"
SEARCH_SAMPLERS = ("euler", "heun", "dpmpp_2m", "uni_pc")

#: schedule searches done in this process, keyed by model fingerprint + conditioning + settings
SEARCH_CACHE = ResultCache(size=32)


def _timestep_range(ms: Any) -> tuple[float, float]:
    """The model's timestep range (0..999 for discrete models, 0..1000 for SD3-style flow, 0..1 for Flux)."""
    return 0.0, float(ms.timestep(torch.as_tensor(float(ms.sigma_max))))


def sigmas_from_list(model: Any, values: list[float], unit: str) -> torch.Tensor:
    """Sigmas (ending in 0) from explicit model timesteps or sigmas, validated against the model's range."""
    ms = model_sampling_of(model)
    if unit == "timestep":
        lo, hi = _timestep_range(ms)
        bad = [v for v in values if v < lo or v > hi * (1 + 1e-6) + 1e-6]
        if bad:
            raise ValueError(f"timesteps {bad} are outside this model's range [{lo:g}, {hi:g}] "
                             f"({type(ms).__name__}); use unit 'sigma' to give sigmas instead")
        sigmas = timestep_list(ms, values)
    elif unit == "sigma":
        if values[-1] != 0.0:
            values = [*values, 0.0]
        sigmas = torch.tensor(values, dtype=torch.float32)
    else:
        raise ValueError(f"unit must be 'timestep' or 'sigma', got {unit!r}")
    return check_sigmas(sigmas.float().cpu())


class FewstepTimestepSchedule(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FewstepTimestepSchedule",
            display_name="fewstep timestep schedule (distilled)",
            category=CATEGORY,
            description="Sigmas at the explicit timesteps a distilled model was trained on (e.g. DMD2's "
                        "999,749,499,249), mapped through the connected model's noise schedule; a final 0 is added.",
            inputs=[
                io.Model.Input("model", tooltip="The model whose noise schedule maps timesteps to sigmas."),
                io.String.Input("timesteps", default="999,749,499,249",
                                tooltip="Comma-separated, strictly decreasing. Model timesteps (0-999 for SD1.5/SDXL, "
                                        "0-1000 for SD3/Wan, 0-1 for Flux) or sigmas, see 'unit'. One step per "
                                        "entry."),
                io.Combo.Input("unit", options=["timestep", "sigma"], default="timestep",
                               tooltip="'timestep': model timesteps, converted with the model's schedule; "
                                       "'sigma': the sigmas themselves."),
            ],
            outputs=[io.Sigmas.Output(tooltip="len(timesteps) steps, ending in sigma 0.")],
        )

    @classmethod
    def execute(cls, model: Any, timesteps: str, unit: str) -> io.NodeOutput:
        values = parse_numbers(timesteps, "timesteps")
        return io.NodeOutput(sigmas_from_list(model, values, unit))


class FewstepScheduleSearch(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FewstepScheduleSearch",
            display_name="fewstep step-schedule search",
            category=CATEGORY,
            description="Searches the sigmas that make the chosen sampler follow a fine-step reference of the "
                        "connected model (dynamic programming over a candidate grid, then refinement on the global "
                        "error). Runs the model a few hundred times once; the result is cached for this model, "
                        "conditioning and settings.",
            inputs=[
                io.Model.Input("model", tooltip="The model to search a schedule for (with its patches)."),
                io.Conditioning.Input("positive", tooltip="Conditioning the reference trajectories are run with."),
                io.Conditioning.Input("negative", tooltip="Negative conditioning (used when cfg != 1)."),
                io.Latent.Input("latent_image", tooltip="Gives the latent shape (resolution, channels) to search at; "
                                                        "its content is not used."),
                io.Combo.Input("sampler_name", options=list(SEARCH_SAMPLERS), default="euler",
                               tooltip="The sampler the schedule is for (use the same fewstep teacher sampler to "
                                       "sample)."),
                io.Int.Input("nfe", default=6, min=1, max=100,
                             tooltip="Model evaluations the schedule may spend (heun: 2 per step but the last)."),
                io.Float.Input("cfg", default=1.0, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="CFG scale to search at; use the cfg you sample with."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF,
                             tooltip="Seed of the search's noise batch."),
                io.Int.Input("search_batch", default=8, min=1, max=256,
                             tooltip="Noise samples the schedule is fitted on; more generalises better, costs "
                                     "proportionally more."),
                io.Int.Input("grid_size", default=40, min=3, max=200,
                             tooltip="Candidate sigmas (log-spaced), at least nfe + 1. The reference costs "
                                     "2 x reference_substeps evaluations per grid point."),
                io.Int.Input("refine_rounds", default=2, min=0, max=10,
                             tooltip="Rounds of coordinate descent on the global error after the DP (0 = DP only)."),
                io.Int.Input("reference_substeps", default=8, min=1, max=64,
                             tooltip="Heun substeps per grid interval of the fine reference trajectory (2 model "
                                     "evaluations each); fewer is faster and less exact."),
            ],
            outputs=[
                io.Sigmas.Output(tooltip="The searched sigmas, ending in 0."),
                io.String.Output(display_name="report", tooltip="JSON: sigmas, errors, whether it came from cache."),
            ],
        )

    @classmethod
    def execute(cls, model: Any, positive: Any, negative: Any, latent_image: dict, sampler_name: str, nfe: int,
                cfg: float, seed: int, search_batch: int, grid_size: int, refine_rounds: int,
                reference_substeps: int = 8) -> io.NodeOutput:
        latent = comfy.sample.fix_empty_latent_channels(model, latent_image["samples"])
        shape = (int(search_batch), *latent.shape[1:])
        settings = dict(sampler=sampler_name, nfe=int(nfe), cfg=float(cfg), seed=int(seed), shape=list(shape),
                        grid_size=int(grid_size), refine_rounds=int(refine_rounds),
                        substeps=int(reference_substeps))
        key = digest(model_fingerprint(model), positive, negative, settings)
        hit = SEARCH_CACHE.get(key)
        if hit is None:
            hit = search_for_model(model, positive, negative, **settings)
            SEARCH_CACHE.put(key, hit)
            cached = False
        else:
            cached = True
        sigmas, info = hit
        report = {"sigmas": [round(float(s), 6) for s in sigmas], **settings, **info, "cached": cached}
        return io.NodeOutput(sigmas.clone(), json.dumps(report))


def search_for_model(model: Any, positive: Any, negative: Any, sampler: str, nfe: int, cfg: float, seed: int,
                     shape: list[int], grid_size: int, refine_rounds: int, substeps: int = 8
                     ) -> tuple[torch.Tensor, dict]:
    """Run ``core.sampling.search_schedule`` on a ComfyUI MODEL with its conditioning (no cache)."""
    ms = model_sampling_of(model)
    sigma_max = float(ms.sigma_max)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)
    guider = make_guider(model, cfg, positive, negative)

    def fn(denoiser, x, sigmas, extra_args, disable):
        start = denoiser.inner_model.inner_model.model_sampling.noise_scaling(
            torch.tensor(sigma_max, device=x.device), noise.to(x), torch.zeros_like(x))
        return search_schedule(denoiser, start, nfe, sampler=sampler, grid_size=grid_size,
                               refine_rounds=refine_rounds, substeps=substeps, extra_args=extra_args,
                               return_info=True)

    sigmas, info = run_in_guider(guider, fn, noise, torch.tensor([sigma_max, 0.0]), seed=seed)
    return sigmas.float().cpu(), {k: (float(v) if isinstance(v, float) else v) for k, v in info.items()}


NODES: list[type[io.ComfyNode]] = [FewstepTimestepSchedule, FewstepScheduleSearch]
