"""Sampler nodes: SAMPLER outputs for SamplerCustom / SamplerCustomAdvanced.

fewstep's core samplers already have ComfyUI's KSAMPLER signature and find the model sampling through
``model.inner_model.inner_model.model_sampling``, so a node only wraps one in ``comfy.samplers.KSAMPLER``.
Two need a little glue, both through ComfyUI's public machinery:

- flow map: the target sigma of each jump travels to the model in ``transformer_options["fewstep_target_sigma"]``
  (where a flow-map model, or a wrapper that feeds it to the model's second time embedding, reads it);
- hybrid: the second MODEL is evaluated by a nested ``CFGGuider`` run (see ``guiders.run_in_guider``), so it is
  loaded, conditioned, patched and wrapped exactly as ComfyUI samples it.

Noise: every sampler that draws fresh noise (ancestral Euler, LCM, DMD, TCD) draws it from the host's own
``comfy.k_diffusion.sampling.default_noise_sampler(x, seed)``, so a seed gives the same sample as ComfyUI's own
sampler on every ComfyUI version (0.3.75 seeds its CPU noise with ``seed``, 0.6.0 and later with ``seed + 1``).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import comfy.samplers
from comfy_api.latest import io
from torch import Tensor

from ..core.sampling import samplers as core
from ..core.sampling.model_sampling import is_flow
from ..core.sampling.registry import names
from .guiders import make_guider, run_in_guider
from .model_info import model_sampling_of

CATEGORY = "fewstep/samplers"
TARGET_SIGMA_KEY = "fewstep_target_sigma"

TEACHER_SAMPLERS = names("teacher")  # euler, euler_ancestral, heun, dpmpp_2m, uni_pc (core.sampling.registry)
DISTILLED_SAMPLERS = names("distilled")  # lcm, tcd, dmd, flow_map, onestep


def host_noise_sampler(x: Tensor, extra_args: dict | None) -> Callable[[Tensor, Tensor], Tensor]:
    """The host ComfyUI's ancestral noise sampler for ``x`` and the run's seed (``extra_args["seed"]``)."""
    import comfy.k_diffusion.sampling as kds

    return kds.default_noise_sampler(x, seed=(extra_args or {}).get("seed"))


def _takes_noise_sampler(fn: Callable[..., Tensor]) -> bool:
    return "noise_sampler" in inspect.signature(fn).parameters


def _guard(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """ComfyUI may hand a sampler a single sigma (e.g. after SplitSigmas at the end): nothing to do then.

    A sampler that draws fresh noise gets the host's noise sampler (:func:`host_noise_sampler`) unless the caller
    passes one.
    """
    noisy = _takes_noise_sampler(fn)

    def sampler(model, x, sigmas, extra_args=None, callback=None, disable=None, **options):
        if len(sigmas) < 2:
            return x
        if noisy and options.get("noise_sampler") is None:
            options["noise_sampler"] = host_noise_sampler(x, extra_args)
        return fn(model, x, sigmas, extra_args=extra_args, callback=callback, disable=disable, **options)

    sampler.__name__ = getattr(fn, "__name__", "sampler")
    sampler.__doc__ = fn.__doc__
    return sampler


class _TargetSigmaModel:
    """Hands the flow-map sampler's ``sigma_next`` to a ComfyUI model through ``transformer_options``."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.inner_model = getattr(model, "inner_model", None)

    def __call__(self, x: Tensor, sigma: Tensor, sigma_next: Tensor | None = None, model_options: dict | None = None,
                 **kwargs: Any) -> Tensor:
        options = dict(model_options or {})
        options["transformer_options"] = {**options.get("transformer_options", {}), TARGET_SIGMA_KEY: sigma_next}
        return self.model(x, sigma, model_options=options, **kwargs)


def sample_flow_map(model, x, sigmas, extra_args=None, callback=None, disable=None) -> Tensor:  # deterministic
    """``core.sample_flow_map`` on a ComfyUI model: the target sigma goes to ``transformer_options``."""
    return core.sample_flow_map(_TargetSigmaModel(model), x, sigmas, extra_args=extra_args, callback=callback,
                                disable=disable, target_key="sigma_next")


#: ComfyUI-ready sampler functions by core name
COMFY_SAMPLERS: dict[str, Callable[..., Tensor]] = {
    name: _guard(sample_flow_map if name == "flow_map" else core.SAMPLERS[name])
    for name in TEACHER_SAMPLERS + DISTILLED_SAMPLERS
}


def _check_compatible(base_model: Any, distilled: Any) -> None:
    """The hybrid hands a noisy latent from one model to the other: same latent space, same sigma space."""
    f1, f2 = base_model.latent_format, distilled.model.latent_format
    if type(f1) is not type(f2) or f1.latent_channels != f2.latent_channels:
        raise ValueError(f"hybrid sampler: the base model uses latent format {type(f1).__name__} but the distilled "
                         f"model uses {type(f2).__name__}; both must share one latent space (e.g. SDXL + an SDXL "
                         "distilled UNet)")
    if is_flow(base_model.model_sampling) != is_flow(model_sampling_of(distilled)):
        raise ValueError("hybrid sampler: one model is a flow model and the other a diffusion (VP) model; "
                         "their noise levels are not interchangeable")


def hybrid_sampler(distilled: Any, base_steps: int, base_sampler: str, distilled_sampler: str, distilled_cfg: float,
                   positive: Any = None, negative: Any = None) -> Callable[..., Tensor]:
    """A KSAMPLER function: ``base_steps`` steps of the sampled (base) model, the rest with ``distilled``.

    The distilled phase runs ``distilled`` in a nested ``CFGGuider`` at ``distilled_cfg`` with the base run's
    conditioning (or ``positive``/``negative`` when given), starting from the base phase's state; progress
    callbacks continue the base run's step count.
    """
    base_fn, dist_fn = COMFY_SAMPLERS[base_sampler], COMFY_SAMPLERS[distilled_sampler]
    if positive is not None and negative is None and distilled_cfg != 1.0:
        raise ValueError("hybrid sampler: distilled_cfg != 1 needs distilled_negative as well as distilled_positive "
                         "(or leave both unconnected to reuse the base run's conditioning)")

    def sample_hybrid(model, x, sigmas, extra_args=None, callback=None, disable=None) -> Tensor:
        extra_args = {} if extra_args is None else extra_args
        n = len(sigmas) - 1
        k = min(base_steps, n)
        if k > 0:
            x = base_fn(model, x, sigmas[: k + 1], extra_args=extra_args, callback=callback, disable=disable)
        if k >= n:
            return x
        base_guider = model.inner_model  # KSamplerX0Inpaint -> the guider running this sampler
        _check_compatible(base_guider.inner_model, distilled)
        if positive is not None:
            guider = make_guider(distilled, distilled_cfg, positive, negative)
        else:
            guider = make_guider(distilled, distilled_cfg, converted_conds=base_guider.original_conds)
        start = x

        def step_callback(d: dict) -> None:
            callback({**d, "i": d["i"] + k})

        def phase(model2, x2, sigmas2, extra_args2, disable2):
            return dist_fn(model2, start.to(x2), sigmas2, extra_args=extra_args2,
                           callback=step_callback if callback is not None else None, disable=disable2)

        mask = extra_args.get("denoise_mask")
        noise = latent = None
        if mask is not None:  # inpainting: hand over the unscaled latent and the noise the base run used
            latent = base_guider.inner_model.process_latent_out(model.latent_image)
            noise = model.noise
        out = run_in_guider(guider, phase, x, sigmas[k:], seed=extra_args.get("seed"), noise=noise,
                            latent_image=latent, denoise_mask=mask)
        return out.to(x)

    return sample_hybrid


# ------------------------------------------------------------------------------------------------- nodes


def _sampler_output() -> io.Sampler.Output:
    return io.Sampler.Output(tooltip="Connect to SamplerCustom or SamplerCustomAdvanced.")


def _fixed_sampler_node(node_id: str, display_name: str, sampler: str, description: str) -> type[io.ComfyNode]:
    """A node without inputs whose SAMPLER is fewstep's ``sampler`` (``COMFY_SAMPLERS``)."""

    class _Node(io.ComfyNode):
        @classmethod
        def define_schema(cls) -> io.Schema:
            return io.Schema(node_id=node_id, display_name=display_name, category=CATEGORY, description=description,
                             inputs=[], outputs=[_sampler_output()])

        @classmethod
        def execute(cls) -> io.NodeOutput:
            return io.NodeOutput(comfy.samplers.KSAMPLER(COMFY_SAMPLERS[sampler]))

    _Node.__name__ = _Node.__qualname__ = node_id
    return _Node


FewstepSamplerLCM = _fixed_sampler_node(
    "FewstepSamplerLCM", "fewstep LCM / multistep consistency sampler", "lcm",
    "Multistep consistency sampling (Song et al. 2023; LCM, Luo et al. 2023): jump to the "
    "model's x0 prediction, re-noise to the next sigma with fresh noise. For consistency / LCM "
    "distilled models, 1-8 steps.",
)


class FewstepSamplerTCD(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FewstepSamplerTCD",
            display_name="fewstep TCD sampler",
            category=CATEGORY,
            description="Trajectory Consistency Distillation's strategic stochastic sampling (Zheng et al. 2024): a "
                        "deterministic jump to (1 - gamma) * t_next, then fresh noise up to t_next.",
            inputs=[
                io.Float.Input("gamma", default=0.3, min=0.0, max=1.0, step=0.01,
                               tooltip="Stochasticity: 0 = deterministic (DDIM), 1 = multistep consistency "
                                       "sampling (LCM). 0.3 is TCD's default; lower keeps more detail."),
            ],
            outputs=[_sampler_output()],
        )

    @classmethod
    def execute(cls, gamma: float) -> io.NodeOutput:
        return io.NodeOutput(comfy.samplers.KSAMPLER(COMFY_SAMPLERS["tcd"], extra_options={"gamma": float(gamma)}))


FewstepSamplerDMD = _fixed_sampler_node(
    "FewstepSamplerDMD", "fewstep DMD multistep sampler", "dmd",
    "DMD2 multistep generation (Yin et al. 2024): predict x0 at each of the generator's "
    "training timesteps and forward-diffuse it to the next. Pair it with 'fewstep timestep "
    "schedule' set to the model's timesteps (e.g. 999,749,499,249).",
)


FewstepSamplerFlowMap = _fixed_sampler_node(
    "FewstepSamplerFlowMap", "fewstep flow-map / any-step sampler", "flow_map",
    "Any-step sampling with a flow map (Boffi et al. 2025; Sabour et al. 2025): "
    "x_s = x_t + (s - t) u(x_t, t, s). The target sigma s is passed to the model in "
    f"transformer_options['{TARGET_SIGMA_KEY}']; a model that ignores it samples with Euler.",
)


FewstepSamplerOneStep = _fixed_sampler_node(
    "FewstepSamplerOneStep", "fewstep one-step sampler", "onestep",
    "One-step generation (InstaFlow, DMD one-step): a single model evaluation at the first "
    "sigma gives the sample; the remaining sigmas are ignored.",
)


class FewstepSamplerTeacher(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FewstepSamplerTeacher",
            display_name="fewstep teacher sampler",
            category=CATEGORY,
            description="fewstep's ODE/SDE samplers for undistilled (teacher) models, the references the distilled "
                        "samplers are measured against. Exact for flow models as well as diffusion models.",
            inputs=[
                io.Combo.Input("sampler_name", options=list(TEACHER_SAMPLERS), default="uni_pc",
                               tooltip="euler / heun: Karras et al. 2022; euler_ancestral: stochastic; dpmpp_2m: "
                                       "DPM-Solver++(2M); uni_pc: UniPC-2 (bh2), good at 5-10 steps. Core: "
                                       "get_sampler(name)."),
            ],
            outputs=[_sampler_output()],
        )

    @classmethod
    def execute(cls, sampler_name: str) -> io.NodeOutput:
        return io.NodeOutput(comfy.samplers.KSAMPLER(COMFY_SAMPLERS[sampler_name]))


class FewstepSamplerHybrid(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FewstepSamplerHybrid",
            display_name="fewstep hybrid base -> distilled sampler",
            category=CATEGORY,
            description="The sampled (base) model sets the composition in the first steps, where distilled models "
                        "lose diversity; the distilled model finishes the rest (Gandikota & Bau 2025). Both models "
                        "must share the latent space (e.g. SDXL + an SDXL distilled UNet).",
            inputs=[
                io.Model.Input("distilled_model",
                               tooltip="The distilled model that finishes the run (same latent space as the model "
                                       "connected to the guider)."),
                io.Int.Input("base_steps", default=1, min=0, max=1000,
                             tooltip="Steps done by the base model (the guider's model); the remaining steps of the "
                                     "sigmas go to the distilled model. 0 = distilled model only."),
                io.Combo.Input("base_sampler", options=list(TEACHER_SAMPLERS + DISTILLED_SAMPLERS), default="euler",
                               tooltip="Sampler for the base model's steps."),
                io.Combo.Input("distilled_sampler", options=list(DISTILLED_SAMPLERS + TEACHER_SAMPLERS),
                               default="lcm", tooltip="Sampler for the distilled model's steps."),
                io.Float.Input("distilled_cfg", default=1.0, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="CFG scale for the distilled model (uncond + cfg * (cond - uncond)); "
                                       "distilled models usually run at 1.0 (one pass per step)."),
                io.Conditioning.Input("distilled_positive", optional=True,
                                      tooltip="Positive conditioning for the distilled model. Leave unconnected to "
                                              "reuse the base run's conditioning (same text encoder)."),
                io.Conditioning.Input("distilled_negative", optional=True,
                                      tooltip="Negative conditioning for the distilled model (only used with "
                                              "distilled_positive and distilled_cfg != 1). Core: distilled_cfg and "
                                              "the conditionings become sample_hybrid's distilled_extra_args."),
            ],
            outputs=[_sampler_output()],
        )

    @classmethod
    def execute(cls, distilled_model: Any, base_steps: int, base_sampler: str, distilled_sampler: str,
                distilled_cfg: float, distilled_positive: Any = None, distilled_negative: Any = None) -> io.NodeOutput:
        fn = hybrid_sampler(distilled_model, int(base_steps), base_sampler, distilled_sampler, float(distilled_cfg),
                            distilled_positive, distilled_negative)
        return io.NodeOutput(comfy.samplers.KSAMPLER(fn))


NODES: list[type[io.ComfyNode]] = [
    FewstepSamplerLCM,
    FewstepSamplerTCD,
    FewstepSamplerDMD,
    FewstepSamplerFlowMap,
    FewstepSamplerOneStep,
    FewstepSamplerHybrid,
    FewstepSamplerTeacher,
]
