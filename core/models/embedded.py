"""The embedded teacher: a class-conditional DiT on the bundled digits, shipped as safetensors.

Architecture: diffusers' ``DiTTransformer2DModel`` (Peebles & Xie 2023, "Scalable Diffusion Models with
Transformers") at 16x16x1, patch 2 (64 tokens), adaLN-Zero conditioning on the timestep and the class label.
Its label table has one extra row, class ``NULL_CLASS`` = 10, learnt through label dropout (10%), so
classifier-free guidance works (Ho & Salimans 2022).

Parameterisation: discrete VP, DDPM linear betas 1e-4..0.02 over 1000 steps (Ho et al. 2020), v-prediction
(Salimans & Ho 2022) — seen by everything else through the denoiser convention.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from .denoiser import Denoiser
from .diffusers_adapters import call_dit
from .digits import IMAGE_SIZE, NULL_CLASS, NUM_CLASSES
from .model_sampling import DiscreteVP, ModelSampling, model_sampling_from_config

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
TEACHER_FILE = "digits_dit_teacher.safetensors"

TEACHER_CONFIG: dict[str, Any] = {
    "num_attention_heads": 4,
    "attention_head_dim": 24,
    "in_channels": 1,
    "out_channels": 1,
    "num_layers": 5,
    "sample_size": IMAGE_SIZE,
    "patch_size": 2,
    "norm_type": "ada_norm_zero",
    "num_embeds_ada_norm": NUM_CLASSES,
    "activation_fn": "gelu-approximate",
}


#: CFG scale (fewstep convention) with the best FD for the shipped teacher: 32-step DPM-Solver++(2M), 360 samples
#: (``benchmarks/quality.py``): FD 0.37 at 1.25 vs 0.60 at 1.0 and 0.80 at 1.5; the real-vs-real floor is 0.15.
TEACHER_CFG = 1.25


def teacher_model_sampling() -> DiscreteVP:
    return DiscreteVP(prediction="v", beta_schedule="linear", linear_start=1e-4, linear_end=0.02, timesteps=1000)


def build_dit(config: dict[str, Any] | None = None) -> nn.Module:
    """A randomly initialised ``DiTTransformer2DModel`` with the teacher's (or the given) config."""
    try:
        from diffusers import DiTTransformer2DModel
    except ImportError as e:  # pragma: no cover - diffusers is a core dependency
        raise ImportError("the embedded teacher needs diffusers: pip install 'diffusers>=0.32'") from e
    return DiTTransformer2DModel(**(config or TEACHER_CONFIG))


def class_labels(labels: torch.Tensor | list[int] | int, batch: int | None = None) -> torch.Tensor:
    """Validate class ids for the digits models (0-9, or ``NULL_CLASS`` for unconditional)."""
    y = torch.as_tensor(labels, dtype=torch.long)
    if y.ndim == 0:
        y = y.expand(batch or 1)
    if ((y < 0) | (y > NULL_CLASS)).any():
        raise ValueError(f"class labels must be in 0..{NUM_CLASSES - 1} (or {NULL_CLASS} = unconditional), "
                         f"got {sorted(set(y.tolist()))}")
    return y


def dit_denoiser(module: nn.Module, model_sampling: ModelSampling | None = None, name: str = "digits-dit"
                 ) -> Denoiser:
    """Wrap a digits DiT as a denoiser taking ``class_labels`` as its condition."""
    return Denoiser(module, model_sampling or teacher_model_sampling(), call=call_dit, name=name)


def save_model(module: nn.Module, path: str | Path, meta: dict[str, Any]) -> None:
    """Write weights (safetensors) and a JSON sidecar atomically (temp file + rename)."""
    from ..io import save_safetensors

    save_safetensors(module.state_dict(), path, meta)


def load_model_file(path: str | Path, what: str, hint: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Load a safetensors file and its JSON metadata with a clear error if it is missing."""
    from ..io import read_json, read_safetensors

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{what} weights not found at {path}. {hint}")
    state, _ = read_safetensors(path)
    side = path.with_suffix(".json")
    meta = read_json(side) if side.exists() else {}
    return state, meta


def load_teacher(path: str | Path | None = None, device: str | torch.device = "cpu") -> Denoiser:
    """The shipped class-conditional digits teacher as a ``Denoiser`` (call with ``class_labels=...``)."""
    state, meta = load_model_file(path or WEIGHTS_DIR / TEACHER_FILE, "embedded teacher",
                                  "Train it with `fewstep train-teacher` (about 30-60 min on 2 CPU cores).")
    module = build_dit(meta.get("config", TEACHER_CONFIG))
    module.load_state_dict(state)
    module.eval().requires_grad_(False).to(device)
    ms = model_sampling_from_config(meta["model_sampling"]) if "model_sampling" in meta else teacher_model_sampling()
    return dit_denoiser(module, ms, name="digits-dit-teacher")
