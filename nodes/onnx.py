"""ONNX nodes: export a MODEL to a fewstep ONNX file, and load a fewstep ONNX file as a MODEL (``core.export``).

- ``FewstepOnnxExport`` (output node): the network behind a ComfyUI MODEL -> ``<output>/<prefix>_NNNNN_.onnx`` with
  fewstep metadata (model sampling, the sampler and sigmas to use, conditions, folded CFG), optionally fp16, written
  atomically; returns the file's path. It exports the embedded digits models (the network ComfyUI runs,
  ``digits_dit.DigitsDiTNet``, traced by ``core.export.export_onnx``). Other architectures are refused with their
  name. Weight patches (LoRAs) are applied before the export; wrappers and
  attention overrides (caches, sparse attention) are run-time patches and are not part of the file.
- ``FewstepOnnxLoader``: a fewstep ONNX file -> a MODEL that ComfyUI's and fewstep's samplers use like any other:
  a ``ModelPatcher`` around a ``comfy.model_base.BaseModel`` whose diffusion model runs the graph on onnxruntime
  (numpy in and out, on the CPU) and whose ``model_sampling`` is the ComfyUI twin of the file's metadata. ``BaseModel``
  still does the model-sampling maths (``calculate_input``, ``sigma -> timestep``, ``calculate_denoised``), exactly
  as the exported graph expects (it is the raw network ``(x_in, timestep, cond...) -> native output``).

Files are listed from ComfyUI's ``models/onnx`` folder (registered as ``fewstep_onnx``; add more folders in
``extra_model_paths.yaml``) and from the output folder (``name [output]``). The loader's optional ``path`` input takes
the export node's output, so one prompt can export a model and sample the export (a combo value must exist when the
prompt is submitted); it only accepts files inside those folders.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import comfy.latent_formats
import comfy.model_base
import comfy.model_management
import comfy.model_patcher
import comfy.model_sampling
import comfy.patcher_extension
import comfy.supported_models_base
import folder_paths
import numpy as np
import torch
from comfy_api.latest import io
from torch import Tensor, nn

from ..core.export import metadata as md
from ..core.models.embedded import TEACHER_CONFIG
from .embedded_model import COMFY_BETA_SCHEDULE, DigitsDiT, DigitsLatentFormat
from .folders import register_model_folder

CATEGORY = "fewstep/onnx"
FOLDER = "fewstep_onnx"
OUTPUT_TAG = " [output]"
FROM_SIGMAS = "from sigmas input"
FROM_PATH = "from path input"

register_model_folder(FOLDER, "onnx", {".onnx"})


# ---------------------------------------------------------------------------------------------- model sampling
def fewstep_sampling_config(model: Any) -> dict[str, Any]:
    """The fewstep ``ModelSampling.config()`` of a ComfyUI MODEL (discrete VP eps/v/x0 or discrete flow); raises if
    ComfyUI's model sampling has no fewstep twin."""
    from ..core.models.model_sampling import DiscreteVP, FlowMatching

    ms = model.get_model_object("model_sampling")
    base = model.model
    settings = dict(getattr(base.model_config, "sampling_settings", {}) or {})
    cms = comfy.model_sampling
    pred = (None if isinstance(ms, (cms.EDM, cms.IMG_TO_IMG)) else "x0" if isinstance(ms, cms.X0)
            else "v" if isinstance(ms, cms.V_PREDICTION) else "eps" if isinstance(ms, cms.EPS) else None)
    if isinstance(ms, cms.ModelSamplingDiscreteFlow) and isinstance(ms, cms.CONST):
        return FlowMatching(shift=float(ms.shift), multiplier=float(ms.multiplier)).config()
    if isinstance(ms, cms.ModelSamplingDiscrete) and pred is not None:
        fewstep_beta = {v: k for k, v in COMFY_BETA_SCHEDULE.items()}
        comfy_beta = settings.get("beta_schedule", "linear")
        if comfy_beta not in fewstep_beta:
            raise ValueError(f"ONNX export: ComfyUI beta schedule {comfy_beta!r} has no fewstep twin")
        vp = DiscreteVP(pred, fewstep_beta[comfy_beta], settings.get("linear_start", 0.00085),
                        settings.get("linear_end", 0.012), settings.get("timesteps", 1000),
                        zero_terminal_snr=bool(settings.get("zsnr", False)))
        if vp.sigmas.shape != ms.sigmas.shape or not torch.allclose(vp.sigmas, ms.sigmas.float().cpu(), rtol=1e-4):
            raise ValueError("ONNX export: the MODEL's model sampling was changed (e.g. by a ModelSampling node) and "
                             "no longer matches its config; export the unpatched model")
        return vp.config()
    bases = "+".join(c.__name__ for c in type(ms).__mro__[1:3])
    raise ValueError(f"ONNX export: ComfyUI model sampling {bases} has no fewstep twin (discrete VP eps/v/x0 and "
                     "discrete flow are supported)")


def comfy_model_sampling(config: dict[str, Any]) -> nn.Module:
    """ComfyUI's ``model_sampling`` object for a fewstep ``ModelSampling.config()`` (the file's metadata)."""
    cms = comfy.model_sampling
    kind, pred = config.get("type"), config.get("prediction")
    if kind == "discrete_vp":
        beta = config.get("beta_schedule", "scaled_linear")
        if beta not in COMFY_BETA_SCHEDULE:
            raise md.OnnxModelError(f"beta schedule {beta!r} has no ComfyUI twin")
        settings = {"beta_schedule": COMFY_BETA_SCHEDULE[beta], "linear_start": float(config.get("linear_start")),
                    "linear_end": float(config.get("linear_end")), "timesteps": int(config.get("timesteps", 1000)),
                    "zsnr": bool(config.get("zero_terminal_snr", False))}
        parts = {"eps": cms.EPS, "v": cms.V_PREDICTION, "x0": cms.X0}
        if pred not in parts:
            raise md.OnnxModelError(f"discrete VP prediction {pred!r} has no ComfyUI twin")
        sampling, param = cms.ModelSamplingDiscrete, parts[pred]
    elif kind == "flow":
        settings = {"shift": float(config.get("shift", 1.0)), "multiplier": float(config.get("multiplier", 1000.0))}
        sampling, param = cms.ModelSamplingDiscreteFlow, cms.CONST
    elif kind == "edm":
        settings = {k: float(config[k]) for k in ("sigma_min", "sigma_max")}
        settings["sigma_data"] = float(config.get("sigma_data", 1.0))
        sampling, param = cms.ModelSamplingContinuousEDM, cms.X0
    else:
        raise md.OnnxModelError(f"model sampling {config} has no ComfyUI twin (discrete_vp, flow and edm are "
                                "supported)")

    class ModelSampling(sampling, param):
        pass

    return ModelSampling(type("Settings", (), {"sampling_settings": settings})())


# -------------------------------------------------------------------------------------------------- export
def _call_digits(module: nn.Module, x_in: Tensor, timestep: Tensor, class_labels: Tensor) -> Tensor:
    return module(x_in, timestep, class_labels)


def export_denoiser(model: Any) -> tuple[Any, dict[str, Any]]:
    """A fewstep ``Denoiser`` over a copy of the MODEL's network with its current weights (weight patches applied),
    and the export arguments. The digits network exported is the one ComfyUI runs (``digits_dit.DigitsDiTNet``:
    diffusers' math and parameter names, no diffusers import, which a ComfyUI server may not be able to import)."""
    import copy

    from ..core.models.denoiser import Denoiser
    from ..core.models.model_sampling import model_sampling_from_config

    base = model.model
    net = getattr(base, "diffusion_model", None)
    if not isinstance(net, DigitsDiT):
        raise ValueError(f"fewstep ONNX export supports the embedded digits models; this MODEL is "
                         f"{type(base).__name__} with diffusion model {type(net).__name__} "
                         f"({type(net).__module__}), which it cannot export yet")
    ms_config = fewstep_sampling_config(model)
    comfy.model_management.load_models_gpu([model])  # applies weight patches (LoRAs) as sampling does
    dit = copy.deepcopy(net.dit).float().cpu().eval().requires_grad_(False)
    den = Denoiser(dit, model_sampling_from_config(ms_config), call=_call_digits, name="digits-dit")
    cfg = {**TEACHER_CONFIG, **dict(base.model_config.unet_config.get("dit_config") or {})}
    n, size = int(cfg["num_embeds_ada_norm"]), int(cfg["sample_size"])
    return den, {"sample_shape": (int(cfg["in_channels"]), size, size), "dynamic_resolution": False,
                 "cond": {"class_labels": torch.arange(2) % n},
                 "conditions": {"class_labels": {"num_classes": n, "null": n, "comfy": "class_token"}}}


def _output_dir() -> Path:
    return Path(folder_paths.get_output_directory()).resolve()


def save_path(filename_prefix: str) -> Path:
    """``<output>/<prefix>_NNNNN_.onnx`` with ComfyUI's counter (refuses paths outside the output folder)."""
    out = str(_output_dir())
    folder, name, counter, _, _ = folder_paths.get_save_image_path(filename_prefix, out)
    Path(folder).mkdir(parents=True, exist_ok=True)
    path = Path(folder) / f"{name}_{counter:05}_.onnx"
    while path.exists():  # an export in another format at that counter
        counter += 1
        path = Path(folder) / f"{name}_{counter:05}_.onnx"
    return path


def export_model(model: Any, filename_prefix: str, sampler: str, schedule: str, steps: int, cfg: float = 1.0,
                 fp16: bool = False, sigmas: Tensor | None = None) -> Any:
    """Export ``model`` (see ``FewstepOnnxExport``); returns ``core.export.ExportResult``."""
    from ..core.export.atomic import export_onnx_atomic
    from ..core.guidance.cfg import CFGDenoiser

    den, kw = export_denoiser(model)
    if cfg != 1.0:
        null = kw["conditions"]["class_labels"]["null"]
        den = CFGDenoiser(den, float(cfg), cond_key="class_labels", null=null)
    recipe: dict[str, Any] = {"sampler": sampler}
    if sigmas is not None:
        recipe["sigmas"] = [float(s) for s in sigmas.flatten().tolist()]
    elif schedule == FROM_SIGMAS:
        raise ValueError("schedule is 'from sigmas input' but no SIGMAS are connected")
    else:
        recipe.update(schedule=schedule, steps=int(steps))
    return export_onnx_atomic(den, save_path(filename_prefix), fp16=bool(fp16), **kw, **recipe)


# -------------------------------------------------------------------------------------------------- loader
class OnnxLatentFormat(comfy.latent_formats.LatentFormat):
    """An unscaled latent with the exported channel count (the graph's own space)."""

    scale_factor = 1.0
    latent_dimensions = 2

    def __init__(self, channels: int = 4) -> None:
        self.latent_channels = channels
        self.latent_rgb_factors = None


class OnnxConfig(comfy.supported_models_base.BASE):
    unet_config = {"image_model": "fewstep_onnx", "disable_unet_model_creation": True}
    unet_extra_config: dict = {}
    sampling_settings: dict = {}
    latent_format = OnnxLatentFormat
    memory_usage_factor = 1.0
    supported_inference_dtypes = [torch.float32]


class OnnxDiffusionModel(nn.Module):
    """ComfyUI's diffusion-model interface ``forward(x, timesteps, context, control, transformer_options)`` over
    ``OnnxDenoiser.network`` (numpy on onnxruntime). ComfyUI's conditioning maps to the graph's conditions:
    class labels from the class token in the cross-attention slot (argmax; all zeros = the null class, as for the
    embedded digits model), ``encoder_hidden_states`` from the cross-attention context, other conditions from the
    model's extra conds by name; a guidance input gets ``guidance_scale`` (fewstep convention)."""

    def __init__(self, runtime: Any, guidance_scale: float | None = None) -> None:
        super().__init__()
        self.runtime = runtime
        self.guidance_scale = guidance_scale

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    def _labels(self, name: str, info: dict[str, Any], context: Tensor | None, batch: int) -> np.ndarray:
        n = info.get("num_classes")
        null = info.get("null")
        if context is None:
            if null is None:
                raise ValueError(f"{self.runtime.name}: condition {name!r} needs a class (no conditioning given)")
            return np.full(batch, null, np.int64)
        if n is None or context.ndim != 3 or context.shape[-1] != int(n) + 1:
            raise ValueError(f"{self.runtime.name} is conditioned on {name!r} ({n} classes): give it a class token "
                             f"of width {None if n is None else int(n) + 1} (e.g. 'fewstep digit class'); got a "
                             f"conditioning of shape {tuple(context.shape)} (a text encoder's?)")
        token = context[:, 0].float()
        labels = token.argmax(-1)
        if null is not None:
            labels[token.abs().sum(-1) < 1e-6] = int(null)
        if labels.shape[0] != batch:
            labels = labels.repeat((batch + labels.shape[0] - 1) // labels.shape[0])[:batch]
        return labels.cpu().numpy().astype(np.int64)

    def forward(self, x: Tensor, timesteps: Tensor, context: Tensor | None = None, control: Any = None,
                transformer_options: dict | None = None, **kwargs: Any) -> Tensor:
        transformer_options = {} if transformer_options is None else transformer_options
        return comfy.patcher_extension.WrapperExecutor.new_class_executor(
            self._forward, self,
            comfy.patcher_extension.get_all_wrappers(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL,
                                                     transformer_options),
        ).execute(x, timesteps, context, control, transformer_options, **kwargs)

    def _forward(self, x: Tensor, timesteps: Tensor, context: Tensor | None = None, control: Any = None,
                 transformer_options: dict | None = None, **kwargs: Any) -> Tensor:
        rt = self.runtime
        b = x.shape[0]
        feeds: dict[str, Any] = {}
        for name in rt.condition_names:
            info = rt.conditions.get(name, {})
            if info.get("kind") == "class_labels":
                feeds[name] = self._labels(name, info, context, b)
            elif name == "encoder_hidden_states" and context is not None:
                feeds[name] = context.detach().float().cpu().numpy()
            elif name in kwargs and kwargs[name] is not None:
                feeds[name] = torch.as_tensor(kwargs[name]).detach().cpu().numpy()
            else:
                raise ValueError(f"{rt.name}: ComfyUI gives no value for the graph input {name!r}")
        if rt.guidance is not None:
            w = rt.guidance.get("default", 1.0) if self.guidance_scale is None else self.guidance_scale
            feeds[rt.guidance["input"]] = np.full(b, md.guidance_scale_to_input(rt.guidance, float(w)), np.float32)
        t = timesteps.detach().float().cpu().reshape(-1).numpy()
        if t.size == 1 and b > 1:
            t = np.repeat(t, b)
        out = rt.network(x.detach().float().cpu().numpy(), t, **feeds)
        return torch.from_numpy(np.ascontiguousarray(out)).to(device=x.device, dtype=x.dtype)


def onnx_choices() -> list[str]:
    """ONNX files in the ``fewstep_onnx`` model folders, then those in the output folder (``name [output]``)."""
    names = [FROM_PATH]
    names += [n for n in folder_paths.get_filename_list(FOLDER) if n.lower().endswith(".onnx")]
    out = _output_dir()
    if out.is_dir():
        names += sorted(p.relative_to(out).as_posix() + OUTPUT_TAG for p in out.rglob("*.onnx")
                        if not any(part.startswith(".") for part in p.relative_to(out).parts))
    return names


def _allowed_roots() -> list[Path]:
    return [_output_dir(), *(Path(p).resolve() for p in folder_paths.get_folder_paths(FOLDER))]


def resolve_onnx(name: str | None, path: str | None) -> Path:
    """The file for a combo value (``name``, or ``name [output]``) or a path (absolute, or relative to the output
    folder) that must lie inside the ONNX model folders or the output folder."""
    if name == FROM_PATH:
        name = None
    if path:
        p = Path(path)
        p = (p if p.is_absolute() else _output_dir() / p).resolve()
        if not any(p.is_relative_to(r) for r in _allowed_roots()):
            raise ValueError(f"ONNX loader: {path!r} is outside the ComfyUI output folder and the '{FOLDER}' model "
                             "folders; only files there can be loaded")
    elif name:
        if name.endswith(OUTPUT_TAG):
            p = (_output_dir() / name[: -len(OUTPUT_TAG)]).resolve()
            if not p.is_relative_to(_output_dir()):
                raise ValueError(f"ONNX loader: {name!r} is outside the output folder")
        else:
            full = folder_paths.get_full_path(FOLDER, name)
            if full is None:
                raise FileNotFoundError(f"ONNX file {name!r} not found in the '{FOLDER}' model folders "
                                        f"{folder_paths.get_folder_paths(FOLDER)}; choose one of {onnx_choices()}")
            p = Path(full)
    else:
        raise ValueError(f"ONNX loader: onnx_name is '{FROM_PATH}' but no path is connected; choose a file or "
                         "connect a path (e.g. from 'fewstep ONNX export')")
    if not p.is_file():
        raise FileNotFoundError(f"ONNX file not found: {p}")
    return p


def load_onnx_model(path: str | Path, guidance_scale: float | None = None, threads: int | None = None) -> Any:
    """A ComfyUI MODEL (``ModelPatcher``) running the fewstep ONNX file ``path`` on onnxruntime (CPU)."""
    from ..core.export.runtime import OnnxDenoiser

    rt = OnnxDenoiser(path, providers=["CPUExecutionProvider"], threads=threads)
    if rt.target_input is not None:
        raise md.OnnxModelError(f"{rt.name}: flow-map graphs (a target-sigma input {rt.target_input!r}) are not "
                                "supported by the ComfyUI loader; sample them with `fewstep run-onnx`")
    if guidance_scale is not None and rt.guidance is None:
        guidance_scale = None  # nothing to feed: the graph has no guidance input
    ms = comfy_model_sampling(rt.meta["model_sampling"])
    channels = int(rt.sample_shape[0])
    digits_like = channels == 1 and rt.conditions.get("class_labels", {}).get("comfy") == "class_token"
    config = OnnxConfig({"image_model": "fewstep_onnx", "disable_unet_model_creation": True})
    config.latent_format = DigitsLatentFormat() if digits_like else OnnxLatentFormat(channels)
    config.set_inference_dtype(torch.float32, None)
    cpu = torch.device("cpu")
    base = comfy.model_base.BaseModel(config, device=cpu)
    base.diffusion_model = OnnxDiffusionModel(rt, guidance_scale)
    base.model_sampling = ms
    base.eval().requires_grad_(False)
    return comfy.model_patcher.ModelPatcher(base, load_device=cpu, offload_device=cpu)


# --------------------------------------------------------------------------------------------------- nodes
class FewstepOnnxExport(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FewstepOnnxExport",
            display_name="fewstep ONNX export",
            category=CATEGORY,
            description="Exports the MODEL's network to an ONNX file with fewstep metadata (model sampling, sampler "
                        "and sigmas, conditions) for onnxruntime (`fewstep run-onnx`, 'fewstep ONNX loader'). "
                        "Supports the embedded digits models; LoRA weight patches are baked in, wrappers are not.",
            inputs=[
                io.Model.Input("model", tooltip="The MODEL to export (an embedded digits teacher or student)."),
                io.String.Input("filename_prefix", default="fewstep/onnx/model",
                                tooltip="File name prefix under ComfyUI's output folder; the file is "
                                        "<prefix>_NNNNN_.onnx."),
                io.Combo.Input("sampler", options=list(md.RUNTIME_SAMPLERS), default="euler",
                               tooltip="Sampler recorded as the file's default recipe (the ONNX runtime's twin of "
                                       "fewstep's samplers): euler / flow-map for consistency students, onestep for "
                                       "one-step students, dpmpp_2m for teachers."),
                io.Combo.Input("schedule", options=[FROM_SIGMAS, *md.RUNTIME_SCHEDULES], default=FROM_SIGMAS,
                               tooltip="Schedule of the recorded recipe; 'from sigmas input' records the connected "
                                       "SIGMAS (e.g. a student's distilled timesteps)."),
                io.Int.Input("steps", default=4, min=1, max=1000,
                             tooltip="Steps of the recorded recipe with a named schedule (ignored with sigmas)."),
                io.Float.Input("cfg", default=1.0, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="1 = export the network alone. Otherwise fold classifier-free guidance into "
                                       "the graph (cond and null class in one batch; this is the default scale, "
                                       "changeable at run time): one ONNX call per step at any scale. Core: "
                                       "export_onnx of CFGDenoiser(scale=cfg)."),
                io.Boolean.Input("fp16", default=False,
                                 tooltip="Write an fp16 graph (half the size, for GPUs; inputs and outputs stay "
                                         "float32). fp32 matches the torch model to ~1e-6."),
                io.Sigmas.Input("sigmas", optional=True,
                                tooltip="Sigmas recorded as the recipe (used when schedule is 'from sigmas input')."),
            ],
            outputs=[io.String.Output(display_name="path", tooltip="Absolute path of the written .onnx file.")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, model: Any, filename_prefix: str, sampler: str, schedule: str, steps: int, cfg: float,
                fp16: bool, sigmas: Tensor | None = None) -> io.NodeOutput:
        use = sigmas if schedule == FROM_SIGMAS else None
        res = export_model(model, filename_prefix, sampler, schedule, int(steps), float(cfg), bool(fp16), use)
        err = "" if res.max_rel_error is None else f", ORT vs torch {res.max_rel_error:.1e}"
        text = f"{res.path} ({res.metadata['precision']}{err})"
        return io.NodeOutput(str(res.path), ui={"text": [text]})


class FewstepOnnxLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FewstepOnnxLoader",
            display_name="fewstep ONNX loader",
            category=CATEGORY,
            description="Loads a fewstep ONNX file as a MODEL that runs on onnxruntime (CPU): use it with CFGGuider "
                        "and SamplerCustomAdvanced and fewstep's samplers like the torch model. The model sampling "
                        "comes from the file's metadata.",
            inputs=[
                io.Combo.Input("onnx_name", options=onnx_choices(), default=FROM_PATH,
                               tooltip=f"A .onnx file from models/onnx (the '{FOLDER}' folder) or the output folder "
                                       "('[output]', e.g. written by 'fewstep ONNX export'), or 'from path input'."),
                io.String.Input("path", optional=True, force_input=True,
                                tooltip="Connect 'fewstep ONNX export' here to sample the file it writes in the same "
                                        "prompt; overrides onnx_name. Only files in the output folder or models/onnx."),
                io.Float.Input("guidance_scale", default=0.0, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="For graphs with guidance folded in or a guidance input: the scale "
                                       "(uncond + w (cond - uncond)); 0 = the file's default. Ignored otherwise."),
                io.Int.Input("threads", default=0, min=0, max=256,
                             tooltip="onnxruntime intra-op threads (0 = onnxruntime's choice)."),
            ],
            outputs=[io.Model.Output(tooltip="A MODEL running the ONNX graph; sample it with CFGGuider + "
                                             "SamplerCustomAdvanced.")],
        )

    @classmethod
    def execute(cls, onnx_name: str, guidance_scale: float, threads: int, path: str | None = None) -> io.NodeOutput:
        p = resolve_onnx(onnx_name, path)
        w = float(guidance_scale) if guidance_scale else None
        return io.NodeOutput(load_onnx_model(p, w, int(threads) or None))


NODES: list[type[io.ComfyNode]] = [FewstepOnnxExport, FewstepOnnxLoader]
