"""The embedded digits DiT as a ComfyUI MODEL.

ComfyUI samples a ``ModelPatcher`` around a ``comfy.model_base.BaseModel``. ``BaseModel`` takes the network class as
``unet_model`` and builds its ``model_sampling`` from the model config's ``sampling_settings``, so the embedded
teacher needs no ComfyUI subclass, only:

- ``DigitsDiTConfig``: a ``supported_models_base.BASE`` config (1-channel 16x16 pixel "latent", float32);
- ``DigitsDiT``: the DiT (``digits_dit.DigitsDiTNet``: diffusers' parameter names and math, ComfyUI's attention,
  no diffusers import) behind ComfyUI's diffusion-model interface ``forward(x, timesteps, context, control,
  transformer_options)``. Its forward honours ComfyUI's extension points like ComfyUI's own DiTs:
  ``DIFFUSION_MODEL`` wrappers (EasyCache, fewstep's caches), ``patches_replace["dit"][("double_block", i)]`` block
  replacements (with ``block_index`` / ``total_blocks`` in ``transformer_options``) and
  ``transformer_options["optimized_attention_override"]``;
- conditioning: the class label travels as a one-hot "class token" ``(1, 1, 11)`` in the CONDITIONING's
  cross-attention slot (``FewstepDigitsClassCondition``); an all-zero token (``ConditioningZeroOut``) is the null
  class 10, the unconditional branch of classifier-free guidance.

fewstep's ``DiscreteVP`` maps onto ComfyUI's ``ModelSamplingDiscrete``; mind the names: DDPM's *linear* betas are
ComfyUI's ``"sqrt_linear"`` and Stable Diffusion's *scaled_linear* is ComfyUI's ``"linear"``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import comfy.latent_formats
import comfy.model_base
import comfy.model_management
import comfy.model_patcher
import comfy.patcher_extension
import comfy.supported_models_base
import torch
from torch import Tensor, nn

from ..core.models.digits import IMAGE_SIZE, NULL_CLASS, NUM_CLASSES
from ..core.models.embedded import TEACHER_CONFIG, TEACHER_FILE, WEIGHTS_DIR, load_model_file
from .digits_dit import DigitsDiTNet

CLASS_TOKEN_DIM = NUM_CLASSES + 1
TEACHER_NAME = Path(TEACHER_FILE).stem  # "digits_dit_teacher"
RANDOM_NAME = "digits_dit_random_init"

#: fewstep beta schedule name -> ComfyUI's make_beta_schedule name
COMFY_BETA_SCHEDULE = {"linear": "sqrt_linear", "scaled_linear": "linear", "cosine": "cosine"}


class DigitsLatentFormat(comfy.latent_formats.LatentFormat):
    """Pixel space: one grey channel in [-1, 1], no scaling. Previews map it to grey."""

    latent_channels = 1
    latent_dimensions = 2
    scale_factor = 1.0

    def __init__(self) -> None:
        self.latent_rgb_factors = [[1.0, 1.0, 1.0]]
        self.latent_rgb_factors_bias = [0.0, 0.0, 0.0]


class DigitsDiTConfig(comfy.supported_models_base.BASE):
    unet_config = {"image_model": "fewstep_digits_dit"}
    unet_extra_config: dict = {}
    sampling_settings: dict = {}
    latent_format = DigitsLatentFormat
    memory_usage_factor = 1.0
    supported_inference_dtypes = [torch.float32]


def comfy_model_type(model_sampling_config: dict) -> tuple[Any, dict]:
    """fewstep ``DiscreteVP.config()`` -> (ComfyUI ``ModelType``, ``sampling_settings``)."""
    cfg = model_sampling_config
    if cfg.get("type") != "discrete_vp":
        raise ValueError(f"the digits MODEL loader supports discrete VP models, got model sampling {cfg}")
    prediction = {"eps": comfy.model_base.ModelType.EPS, "v": comfy.model_base.ModelType.V_PREDICTION}
    if cfg.get("prediction") not in prediction:
        raise ValueError(f"ComfyUI has no discrete model type for prediction {cfg.get('prediction')!r}")
    settings = {
        "beta_schedule": COMFY_BETA_SCHEDULE[cfg.get("beta_schedule", "scaled_linear")],
        "linear_start": float(cfg.get("linear_start", 0.00085)),
        "linear_end": float(cfg.get("linear_end", 0.012)),
        "timesteps": int(cfg.get("timesteps", 1000)),
        "zsnr": bool(cfg.get("zero_terminal_snr", False)),
    }
    return prediction[cfg["prediction"]], settings


def labels_from_context(context: Tensor | None, batch: int) -> Tensor:
    """Class ids from the one-hot class token ``(B, T, 11)`` (argmax of the first token; all-zero: null class)."""
    if context is None:
        return torch.full((batch,), NULL_CLASS, dtype=torch.long)
    if context.ndim != 3 or context.shape[-1] != CLASS_TOKEN_DIM:
        raise ValueError(
            f"the digits model is conditioned with 'fewstep digit class' (a class token of width {CLASS_TOKEN_DIM}); "
            f"got a conditioning of shape {tuple(context.shape)} (a text encoder's?)"
        )
    token = context[:, 0].float()
    labels = token.argmax(-1)
    labels[token.abs().sum(-1) < 1e-6] = NULL_CLASS
    if labels.shape[0] != batch:
        labels = labels.repeat((batch + labels.shape[0] - 1) // labels.shape[0])[:batch]
    return labels


def class_token(label: int) -> Tensor:
    """The conditioning tensor for one class id (``NULL_CLASS``: all zeros)."""
    token = torch.zeros(1, 1, CLASS_TOKEN_DIM)
    if label != NULL_CLASS:
        token[0, 0, label] = 1.0
    return token


class DigitsDiT(nn.Module):
    """``DigitsDiTNet`` behind ComfyUI's diffusion-model interface (see module docstring)."""

    def __init__(self, dit_config: dict | None = None, image_model: str | None = None, dtype: Any = None,
                 device: Any = None, operations: Any = None, **kwargs: Any) -> None:
        super().__init__()
        self.dit = DigitsDiTNet(dit_config or TEACHER_CONFIG).to(device=device, dtype=dtype)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def forward(self, x: Tensor, timesteps: Tensor, context: Tensor | None = None, control: Any = None,
                transformer_options: dict | None = None, **kwargs: Any) -> Tensor:
        transformer_options = {} if transformer_options is None else transformer_options
        return comfy.patcher_extension.WrapperExecutor.new_class_executor(
            self._forward,
            self,
            comfy.patcher_extension.get_all_wrappers(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL,
                                                     transformer_options),
        ).execute(x, timesteps, context, control, transformer_options, **kwargs)

    def _forward(self, x: Tensor, timesteps: Tensor, context: Tensor | None = None, control: Any = None,
                 transformer_options: dict | None = None, **kwargs: Any) -> Tensor:
        opts = {} if transformer_options is None else transformer_options
        dit = self.dit
        labels = labels_from_context(context, x.shape[0]).to(x.device)
        t = timesteps.to(x.device)
        h = dit.embed(x)
        blocks_replace = opts.get("patches_replace", {}).get("dit", {})
        blocks = dit.transformer_blocks
        opts["total_blocks"] = len(blocks)
        opts["block_type"] = "double"
        for i, block in enumerate(blocks):
            opts["block_index"] = i
            if ("double_block", i) in blocks_replace:

                def block_wrap(args: dict, block: nn.Module = block) -> dict:
                    return {"img": block(args["img"], args["timestep"], args["class_labels"],
                                         args["transformer_options"])}

                out = blocks_replace[("double_block", i)](
                    {"img": h, "txt": None, "vec": None, "timestep": t, "class_labels": labels,
                     "transformer_options": opts},
                    {"original_block": block_wrap},
                )
                h = out["img"]
            else:
                h = block(h, t, labels, opts)
        return dit.head(h, t, labels, x)


def _is_dit_weights(path: Path) -> bool:
    """A full digits DiT (teacher or distilled student), not an adapter: its JSON sidecar names the architecture."""
    import json

    side = path.with_suffix(".json")
    try:
        meta = json.loads(side.read_text())
    except (OSError, ValueError):
        return False
    return str(meta.get("architecture", "")).endswith("DiTTransformer2DModel") and bool(meta.get("config"))


def available_models() -> list[str]:
    """Names the loader offers: the shipped teacher, the shipped distilled students (``digits_<method>_<n>step``,
    full DiT weights with a JSON sidecar), a random init."""
    names = [TEACHER_NAME]
    if WEIGHTS_DIR.is_dir():
        names += sorted(p.stem for p in WEIGHTS_DIR.glob("digits_*.safetensors")
                        if p.stem != TEACHER_NAME and _is_dit_weights(p))
    return [*names, RANDOM_NAME]


def build_model(dit_config: dict, model_sampling_config: dict, state_dict: dict[str, Tensor] | None = None) -> Any:
    """A ``ModelPatcher`` around a ``BaseModel`` running ``DigitsDiT`` (random weights if no state dict)."""
    model_type, settings = comfy_model_type(model_sampling_config)
    model_config = DigitsDiTConfig({"image_model": "fewstep_digits_dit", "dit_config": dict(dit_config)})
    model_config.sampling_settings = settings
    model_config.set_inference_dtype(torch.float32, None)
    base = comfy.model_base.BaseModel(model_config, model_type=model_type, device=torch.device("cpu"),
                                      unet_model=DigitsDiT)
    if state_dict is not None:
        base.diffusion_model.dit.load_state_dict(state_dict)
    base.eval().requires_grad_(False)
    return comfy.model_patcher.ModelPatcher(base, load_device=comfy.model_management.get_torch_device(),
                                            offload_device=comfy.model_management.unet_offload_device())


def load_digits_model(name: str, seed: int = 0) -> Any:
    """The shipped digits model ``name`` (see ``available_models``) as a ComfyUI MODEL."""
    from ..core.models.embedded import teacher_model_sampling

    if name == RANDOM_NAME:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            state = DigitsDiTNet(TEACHER_CONFIG).state_dict()
        return build_model(TEACHER_CONFIG, teacher_model_sampling().config(), state)
    if name != Path(name).name or name not in available_models():
        raise ValueError(f"unknown digits model {name!r}; choose one of {available_models()}")
    state, meta = load_model_file(WEIGHTS_DIR / f"{name}.safetensors", f"digits model {name!r}",
                                  "Train the teacher with `fewstep train-teacher`, or pick "
                                  f"'{RANDOM_NAME}' for an untrained model.")
    ms_config = meta.get("model_sampling", teacher_model_sampling().config())
    return build_model(meta.get("config", TEACHER_CONFIG), ms_config, state)


def empty_latent(batch_size: int) -> Tensor:
    return torch.zeros(batch_size, 1, IMAGE_SIZE, IMAGE_SIZE)
