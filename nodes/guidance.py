"""Guidance-adapter node: an AGD adapter loaded onto a MODEL, so that sampling at cfg 1 gives guided results in one
model pass per step instead of classifier-free guidance's two.

Adapter Guidance Distillation (Jensen et al. 2025, "Efficient Distillation of Classifier-Free Guidance using
Adapters"): a ``core.guidance.GuidanceAdapter`` (guidance-scale-gated low-rank updates of the attention and MLP
projections (and, for the shipped digits adapter, the DiT's adaLN modulation), a few percent of the base model's
parameters (10.6% for the shipped digits adapter), trained by
``callbacks/guidance_adapter.py``) makes the frozen base model predict ``uncond + w (cond - uncond)`` in one pass.

The node patches a clone of the MODEL, never copying or changing its weights: an ``APPLY_MODEL`` wrapper (present in
every ComfyUI model) attaches the adapter's forward hooks to the diffusion network for the duration of each model
call, with the guidance scale set for the conditional entries of the batch, and removes them afterwards. Entries
of the unconditional branch (only evaluated when the guider's cfg is not 1) run the plain base model. The adapter's
parameters live in that wrapper, on the patcher, and follow the model to its device.

An adapter only fits the weights it was distilled from: the node compares the MODEL's weights fingerprint with the
adapter's (``core.guidance.adapters.base_weights_hash``) and refuses another model (another checkpoint, the random
init, another architecture) with a message naming both. Adapters are offered from the shipped weights
(``core/models/weights``) and ComfyUI's ``models/fewstep_adapters`` folder.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import comfy.patcher_extension
import torch
from comfy_api.latest import io
from torch import Tensor, nn

from ..core.guidance.adapters import FORMAT, GuidanceAdapter, adapter_metadata
from ..core.models.embedded import WEIGHTS_DIR
from .embedded_model import TEACHER_NAME, DigitsDiT
from .folders import register_model_folder

CATEGORY = "fewstep/guidance"
ADAPTER_FOLDER = "fewstep_adapters"
WRAPPER_KEY = "fewstep_guidance_adapter"

log = logging.getLogger("fewstep")


# ---------------------------------------------------------------------------------------------- adapter files


def register_adapter_folder() -> None:
    """Register ComfyUI's ``models/fewstep_adapters`` folder (``.safetensors``) with ``folder_paths``."""
    register_model_folder(ADAPTER_FOLDER, ADAPTER_FOLDER, {".safetensors"})


def _is_adapter(path: Path) -> bool:
    side = path.with_suffix(".json")
    try:
        return json.loads(side.read_text()).get("format") == FORMAT
    except (OSError, ValueError):
        return False


def shipped_adapters() -> dict[str, Path]:
    """The adapters shipped with fewstep (``core/models/weights/*.safetensors`` whose sidecar says adapter)."""
    if not WEIGHTS_DIR.is_dir():
        return {}
    return {p.name: p for p in sorted(WEIGHTS_DIR.glob("*.safetensors")) if _is_adapter(p)}


def available_adapters() -> list[str]:
    """Names the loader offers: the shipped adapters, then the files in ``models/fewstep_adapters``."""
    import folder_paths

    register_adapter_folder()
    shipped = list(shipped_adapters())
    return shipped + [n for n in folder_paths.get_filename_list(ADAPTER_FOLDER) if n not in shipped]


def resolve_adapter(name: str) -> Path:
    """The file of adapter ``name`` (shipped first, then ``models/fewstep_adapters``)."""
    import folder_paths

    shipped = shipped_adapters()
    if name in shipped:
        return shipped[name]
    register_adapter_folder()
    found = folder_paths.get_full_path(ADAPTER_FOLDER, name)
    if found is None:
        raise ValueError(f"unknown guidance adapter {name!r}; choose one of {available_adapters()} (put adapter "
                         f"files in ComfyUI's models/{ADAPTER_FOLDER} folder)")
    return _inside_adapter_folders(name, found)


def _inside_adapter_folders(name: str, found: str) -> Path:
    """``found`` when it lies inside one of the ``models/fewstep_adapters`` folders (a name with ``..`` or an
    absolute path is refused: nothing outside ComfyUI's model folders is opened)."""
    import os

    import folder_paths

    p = Path(os.path.abspath(found))
    roots = [Path(os.path.abspath(r)) for r in folder_paths.get_folder_paths(ADAPTER_FOLDER)]
    if not any(p.is_relative_to(r) for r in roots):
        raise ValueError(f"guidance adapter {name!r} is outside ComfyUI's models/{ADAPTER_FOLDER} folders; only "
                         "files there can be loaded")
    return p


# -------------------------------------------------------------------------------------------------- patching


def adapter_base(model: Any) -> nn.Module:
    """The network an adapter hooks into: the diffusion model (for the digits model, the diffusers-named DiT
    inside ComfyUI's wrapper)."""
    dm = model.get_model_object("diffusion_model")
    return dm.dit if isinstance(dm, DigitsDiT) else dm


def model_label(model: Any) -> str:
    """A readable name for a ComfyUI MODEL in messages: its model config and network classes."""
    base = model.model
    config = type(getattr(base, "model_config", None)).__name__
    return f"{config} / {type(adapter_base(model)).__name__}"


class AdapterWrapper:
    """``APPLY_MODEL`` wrapper: runs the model call with the adapter's hooks attached and ``guidance_scale`` set for
    the conditional batch entries (the unconditional ones get scale 1, i.e. the base model for adapters trained with
    ``zero_at_unit_scale``)."""

    def __init__(self, adapter: GuidanceAdapter, guidance_scale: float) -> None:
        self.adapter, self.guidance_scale = adapter, float(guidance_scale)

    def scales(self, batch: int, cond_or_uncond: list[int] | None) -> Tensor:
        """Per-entry guidance scale of a batch made of ``cond_or_uncond`` chunks (0 = cond, 1 = uncond)."""
        if not cond_or_uncond or batch % len(cond_or_uncond):
            return torch.full((batch,), self.guidance_scale)
        per = batch // len(cond_or_uncond)
        return torch.cat([torch.full((per,), self.guidance_scale if c == 0 else 1.0) for c in cond_or_uncond])

    def __call__(self, executor: Any, *args: Any, **kwargs: Any) -> Tensor:
        x = args[0]
        opts = args[5] if len(args) > 5 else kwargs.get("transformer_options") or {}
        w = self.scales(x.shape[0], opts.get("cond_or_uncond"))
        adapter = self.adapter.to(x.device)
        adapter.attach()
        try:
            with adapter.scale(w):
                return executor(*args, **kwargs)
        finally:
            adapter.detach()


def apply_guidance_adapter(model: Any, path: str | Path, guidance_scale: float,
                           hint: str | None = None) -> tuple[Any, GuidanceAdapter]:
    """A clone of the ComfyUI MODEL ``model`` sampling with the adapter at ``path`` (and the adapter). Raises
    ``ValueError`` naming both models when the adapter was made for other weights (``hint`` says what to load)."""
    from ..core.checks import check_scale

    check_scale(guidance_scale, None, "guidance scale")  # NaN/inf: an error here, not a NaN image later
    path = Path(path)
    meta = adapter_metadata(path)
    try:
        adapter = GuidanceAdapter.load(path, adapter_base(model), attach=False, match="weights",
                                       base_label=f"the connected MODEL, {model_label(model)}")
    except ValueError as e:
        raise ValueError(f"{e}{f' ({hint})' if hint else ''}") from None
    lo, hi = meta.get("scale_range", (1.0, float("inf")))
    if not lo <= guidance_scale <= hi:
        log.warning("fewstep: guidance adapter %s was trained for guidance scales %s..%s; %s is extrapolated",
                    path.name, lo, hi, guidance_scale)
    adapter.requires_grad_(False)
    m = model.clone()
    m.remove_wrappers_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, WRAPPER_KEY)  # one adapter at a time
    m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, WRAPPER_KEY,
                           AdapterWrapper(adapter, guidance_scale))
    return m, adapter


# ----------------------------------------------------------------------------------------------------- nodes


class FewstepGuidanceAdapterLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FewstepGuidanceAdapterLoader",
            display_name="fewstep load guidance adapter (AGD)",
            category=CATEGORY,
            description="Adapter Guidance Distillation (Jensen et al. 2025): loads a guidance adapter (small "
                        "guidance-scale-conditioned low-rank adapters, a few % of the model) onto the MODEL it was "
                        "distilled from, so that sampling at cfg 1 gives the classifier-free-guided result in one "
                        "model pass per step (half the cost of CFG). Set the guider's cfg to 1.",
            inputs=[
                io.Model.Input("model", tooltip="The base model the adapter was distilled from (other weights are "
                                                "refused). Patched, not copied."),
                io.Combo.Input("adapter_name", options=available_adapters(),
                               tooltip=f"A guidance adapter: shipped with fewstep, or a .safetensors file in "
                                       f"ComfyUI's models/{ADAPTER_FOLDER} folder (trained with fewstep's AGD "
                                       "callback)."),
                io.Float.Input("guidance_scale", default=2.0, min=1.0, max=20.0, step=0.05,
                               tooltip="The CFG scale the adapter reproduces (uncond + w (cond - uncond)); 1 = no "
                                       "guidance. Stay within the range it was trained for (in its metadata)."),
            ],
            outputs=[io.Model.Output(tooltip="The guided model: sample it with cfg 1.")],
        )

    @classmethod
    def execute(cls, model: Any, adapter_name: str, guidance_scale: float) -> io.NodeOutput:
        path = resolve_adapter(adapter_name)
        hint = None
        if adapter_name in shipped_adapters() and "digits" in str(adapter_metadata(path).get("base_name")):
            hint = f"connect 'fewstep load digits model (embedded)' with model_name '{TEACHER_NAME}'"
        patched, _ = apply_guidance_adapter(model, path, guidance_scale, hint)
        return io.NodeOutput(patched)


NODES: list[type[io.ComfyNode]] = [FewstepGuidanceAdapterLoader]
