"""Schedule nodes: SIGMAS outputs for SamplerCustom / SamplerCustomAdvanced.

- ``FewstepTimestepSchedule``: the explicit timestep list a distilled model was trained on (DMD2's 999/749/499/249,
  LCM's and TCD's skipping-step lists), mapped to sigmas by the connected model's own ``model_sampling``.
- ``FewstepScheduleSearch``: ``core.sampling.search_schedule`` run on the connected model with its conditioning,
  cached by model content + settings.
- ``FewstepPresetSchedule``: the published step schedules of the distilled models people run (``PRESETS``, each with
  its source), as model timesteps (VP models, mapped through the connected model) or as sigmas (flow models).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

import comfy.sample
import torch
from comfy_api.latest import io

from ..core.sampling import check_sigmas, search_schedule, timestep_list
from ..core.sampling.samplers import is_flow
from .guiders import make_guider, run_in_guider
from .hashing import comfy_model_digest, digest
from .lru import LRUResults
from .model_info import model_label, model_sampling_of
from .parsing import parse_numbers

CATEGORY = "fewstep/schedules"
SEARCH_SAMPLERS = ("euler", "heun", "dpmpp_2m", "uni_pc")

#: schedule searches done in this process, keyed by model fingerprint + conditioning + settings
SEARCH_CACHE = LRUResults(size=32)


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
                                       "sample). Core: search_schedule(sampler=...)."),
                io.Int.Input("nfe", default=6, min=1, max=100,
                             tooltip="Model evaluations the schedule may spend (heun: 2 per step but the last)."),
                io.Float.Input("cfg", default=1.0, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="CFG scale to search at; use the cfg you sample with."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF,
                             tooltip="Seed of the search's noise batch."),
                io.Int.Input("search_batch", default=8, min=1, max=256,
                             tooltip="Noise samples the schedule is fitted on; more generalises better, costs "
                                     "proportionally more. Core: the batch of search_schedule's x."),
                io.Int.Input("grid_size", default=40, min=3, max=200,
                             tooltip="Candidate sigmas (log-spaced), at least nfe + 1. The reference costs "
                                     "2 x reference_substeps evaluations per grid point."),
                io.Int.Input("refine_rounds", default=2, min=0, max=10,
                             tooltip="Rounds of coordinate descent on the global error after the DP (0 = DP only)."),
                io.Int.Input("reference_substeps", default=8, min=1, max=64,
                             tooltip="Heun substeps per grid interval of the fine reference trajectory (2 model "
                                     "evaluations each); fewer is faster and less exact. Core: "
                                     "search_schedule(substeps=...)."),
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
        key = digest(comfy_model_digest(model), positive, negative, settings)
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


# ------------------------------------------------------------------------------------------------ presets


def _trailing(n: int, train_steps: int = 1000) -> list[float]:
    """diffusers' ``timestep_spacing="trailing"``: round(arange(T, 0, -T / n)) - 1 (SDXL-Lightning, Hyper-SD)."""
    return [float(round(train_steps - k * train_steps / n) - 1) for k in range(n)]


def _lcm(n: int, original_steps: int = 50, train_steps: int = 1000) -> list[float]:
    """diffusers' ``LCMScheduler.set_timesteps(n)`` with ``original_inference_steps`` (LCM, Luo et al. 2023,
    skipping-step schedule): indices floor(linspace(0, original, n, endpoint=False)) into the reversed
    ``arange(1, original + 1) * (T // original) - 1``."""
    c = train_steps // original_steps
    origin = [k * c - 1 for k in range(original_steps, 0, -1)]
    return [float(origin[int(math.floor(i * original_steps / n))]) for i in range(n)]


def _shifted(n: int, shift: float, last: float | None = None) -> list[float]:
    """Flow sigmas ``shift t / (1 + (shift - 1) t)`` (SD3's time shift, Esser et al. 2024, eq. 23) at
    ``t = linspace(1, 1/n, n)`` (diffusers' flow pipelines' default) or at explicit ``t``."""
    ts = [1.0 - k / n for k in range(n)] if last is None else [1.0 - k * (1.0 - last) / (n - 1) for k in range(n)]
    return [shift * t / (1.0 + (shift - 1.0) * t) for t in ts]


@dataclass(frozen=True)
class Preset:
    """A published step schedule: ``values`` are model timesteps (``unit="timestep"``, discrete VP models,
    0-999) or sigmas (``unit="sigma"``, flow models, 1 = pure noise); a final 0 is appended when used."""

    values: tuple[float, ...]
    unit: str
    models: str
    source: str


def _hyper_sd(n: int) -> Preset:
    """Hyper-SD's n-step LoRAs (Ren et al. 2024): DDIM with trailing timesteps."""
    return Preset(tuple(_trailing(n)), "timestep", f"Hyper-SD15 / Hyper-SDXL {n}-step LoRA",
                  f"huggingface.co/ByteDance/Hyper-SD README: DDIMScheduler timestep_spacing='trailing', {n} steps")


def _sdxl_lightning(n: int) -> Preset:
    """SDXL-Lightning's n-step UNets / LoRAs (Lin et al. 2024): Euler with trailing timesteps."""
    return Preset(tuple(_trailing(n)), "timestep", f"sdxl_lightning_{n}step(_unet/_lora)",
                  "huggingface.co/ByteDance/SDXL-Lightning README: EulerDiscreteScheduler timestep_spacing='trailing'")


#: preset name -> published schedule (each ``source`` says where the numbers come from)
PRESETS: dict[str, Preset] = {
    "DMD2 SDXL 4-step": Preset((999.0, 749.0, 499.0, 249.0), "timestep", "DMD2 SDXL 4-step UNet / LoRA",
                               "github.com/tianweiy/DMD2 README: LCMScheduler with timesteps=[999, 749, 499, 249] "
                               "(the training timesteps, not LCMScheduler's defaults)"),
    "DMD2 SDXL 1-step": Preset((399.0,), "timestep", "DMD2 SDXL 1-step UNet",
                               "github.com/tianweiy/DMD2 README: dmd2_sdxl_1step_unet_fp16.bin with timesteps=[399]"),
    "LCM 4-step": Preset(tuple(_lcm(4)), "timestep", "LCM-LoRA SD1.5 / SDXL, LCM-distilled SD models",
                         "diffusers LCMScheduler (original_inference_steps=50).set_timesteps(4), as the LCM-LoRA "
                         "model cards use it (latent-consistency/lcm-lora-sdxl)"),
    "LCM 8-step": Preset(tuple(_lcm(8)), "timestep", "LCM-LoRA SD1.5 / SDXL",
                         "diffusers LCMScheduler (original_inference_steps=50).set_timesteps(8)"),
    "TCD 4-step": Preset(tuple(_lcm(4)), "timestep", "TCD-LoRA SD1.5 / SDXL (h1t/TCD-SDXL-LoRA)",
                         "diffusers TCDScheduler (original_inference_steps=50).set_timesteps(4), as the TCD model card "
                         "uses it (gamma/eta 0.3)"),
    "Hyper-SD 8-step": _hyper_sd(8),
    "Hyper-SD 4-step": _hyper_sd(4),
    "Hyper-SDXL 1-step UNet": Preset((800.0,), "timestep", "Hyper-SDXL-1step-Unet",
                                     "huggingface.co/ByteDance/Hyper-SD comfyui/ComfyUI-HyperSDXL1StepUnetScheduler: "
                                     "timesteps [800] (diffusers: TCDScheduler, timesteps=[800])"),
    "SDXL-Lightning 2-step": _sdxl_lightning(2),
    "SDXL-Lightning 4-step": _sdxl_lightning(4),
    "SDXL-Lightning 8-step": _sdxl_lightning(8),
    "Wan 2.2 Lightning 4-step (shift 5)": Preset(
        tuple(_shifted(4, 5.0)), "sigma", "Wan2.2-Lightning / lightx2v Wan 2.2 A14B 4-step (high-noise expert for the "
        "first 2 steps, low-noise for the last 2)",
        "github.com/ModelTC/LightX2V WanStepDistillScheduler: denoising_step_list [1000, 750, 500, 250], "
        "sample_shift 5.0 -> sigmas 1, 0.9375, 0.8333, 0.625"),
    "Qwen-Image Lightning 8-step (shift 3)": Preset(
        tuple(_shifted(8, 3.0)), "sigma", "Qwen-Image-Lightning-8steps",
        "github.com/ModelTC/Qwen-Image-Lightning generate_with_diffusers.py: FlowMatchEulerDiscreteScheduler, "
        "base_shift = max_shift = log(3) ('we use shift=3 in distillation'), sigmas linspace(1, 1/8, 8)"),
    "Qwen-Image Lightning 4-step (shift 3)": Preset(
        tuple(_shifted(4, 3.0)), "sigma", "Qwen-Image-Lightning-4steps",
        "github.com/ModelTC/Qwen-Image-Lightning generate_with_diffusers.py: as the 8-step, sigmas "
        "linspace(1, 1/4, 4)"),
    "Z-Image-Turbo 8-step (shift 3)": Preset(
        tuple(_shifted(8, 3.0)), "sigma", "Tongyi-MAI/Z-Image-Turbo",
        "huggingface.co/Tongyi-MAI/Z-Image-Turbo: 8 NFEs, FlowMatchEulerDiscreteScheduler shift 3.0, guidance 0; "
        "diffusers ZImagePipeline sigmas linspace(1, 1/8, 8)"),
    "Flux schnell 4-step": Preset(
        tuple(_shifted(4, 1.0)), "sigma", "black-forest-labs/FLUX.1-schnell",
        "huggingface.co/black-forest-labs/FLUX.1-schnell: 4 steps, guidance 0, no time shift "
        "(scheduler shift 1.0, use_dynamic_shifting false); sigmas linspace(1, 1/4, 4)"),
}


def preset_sigmas(model: Any, name: str) -> torch.Tensor:
    """Sigmas (ending in 0) of preset ``name`` for ``model``; refuses a preset of the other model family."""
    if name not in PRESETS:
        raise ValueError(f"unknown schedule preset {name!r}; choose one of {list(PRESETS)}")
    preset = PRESETS[name]
    ms = model_sampling_of(model)
    flow = is_flow(ms)
    if flow != (preset.unit == "sigma"):
        kind = "flow-matching" if preset.unit == "sigma" else "discrete-timestep (SD1.5 / SDXL)"
        raise ValueError(f"schedule preset {name!r} is for {kind} models ({preset.models}); the connected model "
                         f"{model_label(model)} samples with {type(ms).__name__}. Pick a preset of its "
                         "family, or give its timesteps to 'fewstep timestep schedule'")
    return sigmas_from_list(model, list(preset.values), preset.unit)


class FewstepPresetSchedule(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FewstepPresetSchedule",
            display_name="fewstep distilled-model schedule preset",
            category=CATEGORY,
            description="The published step schedule of a distilled model (DMD2, LCM, TCD, Hyper-SD, SDXL-Lightning, "
                        "Wan 2.2 / Qwen-Image Lightning, Z-Image-Turbo, Flux schnell), with its shift. Timestep "
                        "presets go through the connected model's noise schedule; flow presets are sigmas.",
            inputs=[
                io.Model.Input("model", tooltip="The distilled model (its family must match the preset)."),
                io.Combo.Input("preset", options=list(PRESETS), default="DMD2 SDXL 4-step",
                               tooltip="; ".join(f"{k}: {v.models}" for k, v in PRESETS.items())),
            ],
            outputs=[io.Sigmas.Output(tooltip="The preset's steps, ending in sigma 0.")],
        )

    @classmethod
    def execute(cls, model: Any, preset: str) -> io.NodeOutput:
        return io.NodeOutput(preset_sigmas(model, preset))


NODES: list[type[io.ComfyNode]] = [FewstepTimestepSchedule, FewstepScheduleSearch, FewstepPresetSchedule]
