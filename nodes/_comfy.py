"""Glue between ComfyUI objects and fewstep's core, shared by the node families.

Only public ComfyUI entry points are used: ``comfy.samplers.CFGGuider`` / ``KSAMPLER`` to evaluate a MODEL as a
denoiser, ``ModelPatcher.get_model_object`` to read its ``model_sampling``. Nothing is monkeypatched.
"""

from __future__ import annotations

import hashlib
import math
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

# ----------------------------------------------------------------------------------------------- parsing


def parse_numbers(text: str, what: str) -> list[float]:
    """Parse ``"999, 749 499;249"`` into floats, with an error that names ``what`` and the bad item."""
    items = [s for s in text.replace(";", ",").replace("\n", ",").replace(" ", ",").split(",") if s.strip()]
    if not items:
        raise ValueError(f"{what}: expected a comma-separated list of numbers, got {text!r}")
    out = []
    for s in items:
        try:
            v = float(s)
        except ValueError:
            raise ValueError(f"{what}: {s.strip()!r} is not a number (in {text!r})") from None
        if not math.isfinite(v):
            raise ValueError(f"{what}: {s.strip()!r} is not finite")
        out.append(v)
    return out


# ------------------------------------------------------------------------------------------- model folders


def register_model_folder(name: str, subdir: str, extensions: set[str]) -> None:
    """Register ``models/<subdir>`` as ComfyUI model folder ``name`` listing ``extensions`` (idempotent; more
    folders can be added with ComfyUI's ``extra_model_paths.yaml``)."""
    import os

    import folder_paths

    path = os.path.join(folder_paths.models_dir, subdir)
    if name not in folder_paths.folder_names_and_paths:
        folder_paths.folder_names_and_paths[name] = ([path], set(extensions))
    else:
        paths, exts = folder_paths.folder_names_and_paths[name]
        if path not in paths:
            paths.append(path)
        exts.update(extensions)


# ----------------------------------------------------------------------------------- model as a denoiser


def model_label(model: Any) -> str:
    """A user-facing name of a ComfyUI MODEL's family: its ``supported_models`` config class (SD15, SDXL, Flux,
    QwenImage, ...), else its model class."""
    inner = getattr(model, "model", model)
    config = getattr(inner, "model_config", None)
    return type(config).__name__ if config is not None else type(inner).__name__


def model_sampling_of(model: Any) -> Any:
    """The ``model_sampling`` object of a ComfyUI MODEL (a ``ModelPatcher``), honouring object patches."""
    return model.get_model_object("model_sampling")


def make_guider(model: Any, cfg: float, positive: Any = None, negative: Any = None,
                converted_conds: dict[str, list] | None = None) -> Any:
    """A ``comfy.samplers.CFGGuider`` for ``model``: from CONDITIONING inputs, or from another guider's
    already converted conds (``guider.original_conds``)."""
    import comfy.samplers

    guider = comfy.samplers.CFGGuider(model)
    if converted_conds is not None:
        guider.original_conds = {k: list(v) for k, v in converted_conds.items()}
    else:
        conds = {"positive": positive}
        if negative is not None:
            conds["negative"] = negative
        guider.inner_set_conds(conds)
    guider.set_cfg(cfg)
    return guider


def run_in_guider(guider: Any, fn: Callable[..., Any], like: Tensor, sigmas: Tensor, seed: int | None = None,
                  noise: Tensor | None = None, latent_image: Tensor | None = None,
                  denoise_mask: Tensor | None = None) -> Any:
    """Run ``fn(model, x, sigmas, extra_args, disable)`` inside a full ComfyUI sampling run of ``guider``.

    ComfyUI only evaluates a MODEL inside ``CFGGuider.sample``: that loads the model on its device, encodes the
    conds for it, applies its patches and wrappers, and hands a sampler the denoiser
    ``model(x, sigma, **extra_args) -> x0`` (``KSamplerX0Inpaint``, whose ``inner_model.inner_model.model_sampling``
    the core samplers read). This runs a ``KSAMPLER`` whose function calls ``fn`` with that denoiser and keeps its
    result, so any core routine (a sampler phase, a schedule search) sees the MODEL exactly as a sampler does.

    ``x`` passed to ``fn`` is ``noise`` scaled to ``sigmas[0]`` by the model's ``noise_scaling`` (as every ComfyUI
    sampler starts). ``like`` gives shape/dtype when ``noise`` is None (zeros are used: pass the state to start
    from through ``fn``'s closure instead). The return value of ``fn`` is returned as is; ComfyUI's own
    post-processing of the sampler output (``process_latent_out``) is not applied to it.
    """
    import comfy.samplers

    box: dict[str, Any] = {}

    def _sampler(model, x, sigmas, extra_args=None, callback=None, disable=None, **_):
        box["out"] = fn(model, x, sigmas, extra_args if extra_args is not None else {}, disable)
        return box["out"] if isinstance(box["out"], Tensor) and box["out"].shape == x.shape else x

    if noise is None:
        noise = torch.zeros_like(like)
    if latent_image is None:
        latent_image = torch.zeros_like(noise)
    guider.sample(noise, latent_image, comfy.samplers.KSAMPLER(_sampler), sigmas, denoise_mask=denoise_mask,
                  disable_pbar=True, seed=seed)
    if "out" not in box:  # pragma: no cover - CFGGuider.sample skips the sampler only for empty sigmas
        raise RuntimeError("ComfyUI did not run the sampler (empty sigmas?)")
    return box["out"]


# ------------------------------------------------------------------------------------------- fingerprints


def _update(h: Any, obj: Any, depth: int = 0) -> None:
    if depth > 6:
        h.update(b"<deep>")
        return
    if isinstance(obj, Tensor):
        t = obj.detach()
        h.update(f"T{tuple(t.shape)}{t.dtype}".encode())
        flat = t.reshape(-1)
        if flat.numel() > 4096:
            flat = flat[:: flat.numel() // 4096 + 1]
        try:
            h.update(flat.to("cpu", torch.float64).numpy().tobytes())
        except (RuntimeError, TypeError):  # dtypes without a float64 cast (quantized weights): shape only
            h.update(b"?")
    elif isinstance(obj, dict):
        for k in sorted(obj, key=str):
            h.update(str(k).encode())
            _update(h, obj[k], depth + 1)
    elif isinstance(obj, (list, tuple)):
        h.update(f"L{len(obj)}".encode())
        for v in obj:
            _update(h, v, depth + 1)
    elif obj is None or isinstance(obj, (bool, int, float, str)):
        h.update(repr(obj).encode())
    else:
        h.update(type(obj).__qualname__.encode())


def digest(*objs: Any) -> str:
    """A short, stable hash of tensors (subsampled), containers and scalars; other objects by type name."""
    h = hashlib.sha1()
    for obj in objs:
        _update(h, obj)
    return h.hexdigest()[:16]


def comfy_model_digest(model: Any) -> str:
    """A 16-hex digest identifying a ComfyUI MODEL by content (unlike ``core.cache.model_fingerprint``, which
    returns ``(name, config_hash)`` of the architecture only): architecture, model sampling, a subsample of its
    weights, the ids of its weight patches (LoRAs) and the names of its wrappers / model-function patches."""
    base = model.model
    ms = model_sampling_of(model)
    sd = base.diffusion_model.state_dict() if hasattr(base, "diffusion_model") else base.state_dict()
    keys = sorted(sd)
    picked = [keys[i] for i in sorted({round(j * (len(keys) - 1) / 7) for j in range(8)})] if keys else []
    options = model.model_options
    return digest(
        type(base).__qualname__, str(getattr(base, "model_type", "")), type(ms).__qualname__,
        getattr(ms, "sigmas", None), len(keys), {k: sd[k] for k in picked}, str(getattr(model, "patches_uuid", "")),
        sorted(str(k) for k in options.get("transformer_options", {})), sorted(str(k) for k in options),
    )


class LRUResults:
    """A small thread-safe LRU of computed results (schedule searches) keyed by a string."""

    def __init__(self, size: int = 32) -> None:
        self.size = size
        self._data: OrderedDict[str, Any] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: str) -> Any:
        with self._lock:
            if key in self._data:
                self._data.move_to_end(key)
                self.hits += 1
                return self._data[key]
            self.misses += 1
            return None

    def put(self, key: str, value: Any) -> None:
        with self._lock:
            self._data[key] = value
            self._data.move_to_end(key)
            while len(self._data) > self.size:
                self._data.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._data.clear()
            self.hits = self.misses = 0
