"""Where the cache nodes find calibrations, and how a ComfyUI MODEL is identified for them.

Calibrations live in ComfyUI's ``models/fewstep_cache_calibrations`` folder (registered through ``folder_paths``; add
more folders with ``extra_model_paths.yaml``) and in ``core.cache.default_search_dirs()``. The nodes' ``calibration``
input is ``"auto"`` (look up by the model's fingerprint) or the *file name* of a ``.json`` inside one of those folders;
anything resolving outside them is refused (as the ONNX loader does), and no error ever shows a file's contents.

A ComfyUI MODEL is identified as ``comfy-<model config class>`` (``comfy-SD15``, ``comfy-Flux``,
``comfy-DigitsDiTConfig``) plus a hash of ``core.cache.model_fingerprint`` (parameter names and shapes, model
sampling) *and* ``core.cache.weights_fingerprint`` of its weights and weight patches (LoRAs): a calibration made on a
teacher is not reused for its students, a fine-tune, another LoRA strength or a random init.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import folder_paths
import torch

from ..core.cache import (
    CalibrationError,
    CalibrationMismatchError,
    CalibrationMissingError,
    ResidualCache,
    default_search_dirs,
    model_fingerprint,
    weights_fingerprint,
)
from .folders import register_model_folder
from .model_info import model_sampling_of

CALIBRATION_FOLDER = "fewstep_cache_calibrations"
#: ComfyUI model folder of learned-cache predictors (``core.cache.learned``: safetensors keyed to a model)
LEARNED_FOLDER = "fewstep_learned_caches"
CALIBRATE_NODE = "'fewstep cache calibration' (FewstepCacheCalibrate)"


def register_calibration_folder() -> None:
    """Register ``models/fewstep_cache_calibrations`` with ComfyUI's ``folder_paths`` (idempotent)."""
    register_model_folder(CALIBRATION_FOLDER, CALIBRATION_FOLDER, {".json"})


register_calibration_folder()


def calibration_dirs() -> list[Path]:
    """Where the cache nodes look for calibrations: ComfyUI's calibration folders, then core's default dirs."""
    register_calibration_folder()
    dirs = [Path(p) for p in folder_paths.get_folder_paths(CALIBRATION_FOLDER)]
    return dirs + [d for d in default_search_dirs() if d not in dirs]


def calibration_source(calibration: str, node: str = "cache node") -> Path | None:
    """``"auto"`` -> None (lookup by fingerprint); the file name of a ``.json`` in the calibration folders -> its
    path. Paths that resolve outside those folders are refused."""
    text = str(calibration).strip()
    if text in ("", "auto"):
        return None
    dirs = calibration_dirs()
    listing = ", ".join(map(str, dirs))
    if not text.lower().endswith(".json"):
        raise ValueError(f"{node}: calibration must be 'auto' or the file name of a .json calibration in {listing}; "
                         f"got a name without .json. Leave it at 'auto' or run {CALIBRATE_NODE} first")
    for d in dirs:
        root = d.resolve()
        cand = (root / text).resolve()
        if cand.is_relative_to(root) and cand.is_file():
            return cand
    raise ValueError(f"{node}: calibration {text!r} is neither 'auto' nor a file in the calibration folders "
                     f"({listing}); only files inside them are read. Put the file into models/{CALIBRATION_FOLDER} "
                     f"(or add a folder with extra_model_paths.yaml) and give its file name, leave it at 'auto', or "
                     f"run {CALIBRATE_NODE} first")


class _ComfyModelSamplingConfig:
    """Gives ComfyUI's ``model_sampling`` the ``config()`` that ``core.cache.model_fingerprint`` hashes."""

    def __init__(self, ms: Any) -> None:
        self.ms = ms

    def config(self) -> dict[str, Any]:
        out: dict[str, Any] = {"class": type(self.ms).__name__}
        for name in ("sigma_min", "sigma_max", "shift", "multiplier", "sigma_data"):
            v = getattr(self.ms, name, None)
            if v is not None:
                out[name] = round(float(v), 6)
        return out


def _tensors_in(obj: Any, prefix: str, depth: int = 0) -> Iterator[tuple[str, torch.Tensor]]:
    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        yield prefix, torch.tensor(float(obj), dtype=torch.float64)
    elif isinstance(obj, (tuple, list)) and depth < 4:
        for i, v in enumerate(obj):
            yield from _tensors_in(v, f"{prefix}.{i}", depth + 1)
    elif hasattr(obj, "weights") and depth < 4:  # ComfyUI's WeightAdapter objects (LoRA, LoHa, ...)
        yield from _tensors_in(obj.weights, f"{prefix}.{type(obj).__name__}", depth + 1)


def model_weights_fingerprint(model: Any) -> str:
    """``weights_fingerprint`` of the diffusion model's parameters and of the MODEL's weight patches (LoRA keys,
    strengths and sampled values), as they will be when ComfyUI applies them."""
    dm = model.model.diffusion_model

    def items() -> Iterator[tuple[str, torch.Tensor]]:
        yield from dm.named_parameters()
        for key in sorted(getattr(model, "patches", {}) or {}, key=str):
            yield from _tensors_in(list(model.patches[key]), f"patch:{key}")

    return weights_fingerprint(items())


def model_identity(model: Any) -> tuple[str, str, str]:
    """``(name, identity hash, weights fingerprint)`` of a ComfyUI MODEL (see the module docstring); the identity
    hash covers the configuration and the weights and is what calibration files are keyed by."""
    base = model.model
    name = f"comfy-{type(getattr(base, 'model_config', base)).__name__}"
    _, config_hash = model_fingerprint(base.diffusion_model, _ComfyModelSamplingConfig(model_sampling_of(model)), name)
    weights = model_weights_fingerprint(model)
    return name, hashlib.sha256(f"{config_hash}|{weights}".encode()).hexdigest()[:16], weights


def bind_calibration(cache: ResidualCache, model: Any, calibration: str, node: str,
                     identity: tuple[str, str, str] | None = None) -> None:
    """Resolve the cache's calibration for ``model`` now, so a missing or foreign one fails this node clearly."""
    name, ident, _ = identity or model_identity(model)
    try:
        cache.calibration_source = calibration_source(calibration, node)
        cache.bind(name, ident, model_sampling_of(model), calibration_dirs())
    except CalibrationMissingError as e:
        raise ValueError(f"{node}: this method needs a calibration of the connected model and there is none. Run "
                         f"{CALIBRATE_NODE} once on this MODEL (it writes models/{CALIBRATION_FOLDER}/<model>--<hash>"
                         ".json, found here with calibration 'auto'), or pick a method that needs none (easycache, "
                         f"teacache_uncalibrated, first_block). Details: {e}") from e
    except CalibrationMismatchError as e:
        raise ValueError(f"{node}: the calibration does not fit the connected model: {e}. A calibration is keyed by "
                         "the model's architecture, model sampling and weights (a student, a fine-tune, a LoRA or a "
                         f"random init needs its own). Run {CALIBRATE_NODE} on this MODEL and leave calibration at "
                         "'auto'.") from e
    except CalibrationError as e:
        raise ValueError(f"{node}: unusable calibration: {e}") from e


# ----------------------------------------------------------------------------------------------- learned caches


def register_learned_folder() -> None:
    """Register ``models/fewstep_learned_caches`` with ComfyUI's ``folder_paths`` (idempotent)."""
    register_model_folder(LEARNED_FOLDER, LEARNED_FOLDER, {".safetensors"})


def learned_cache_files() -> list[str]:
    """The predictor files in the learned-cache folders (what the node's combo lists)."""
    register_learned_folder()
    return list(folder_paths.get_filename_list(LEARNED_FOLDER))


def learned_cache_path(name: str, node: str) -> Path:
    """The file ``name`` inside one of the learned-cache folders; a name resolving outside them is refused."""
    register_learned_folder()
    dirs = [Path(p) for p in folder_paths.get_folder_paths(LEARNED_FOLDER)]
    text = str(name).strip()
    for d in dirs:
        root = d.resolve()
        cand = (root / text).resolve()
        if text and cand.is_relative_to(root) and cand.is_file():
            return cand
    raise ValueError(f"{node}: predictor {text!r} is not a file in the learned-cache folders "
                     f"({', '.join(map(str, dirs))}); only files inside them are read. Put the .safetensors written "
                     f"by fewstep's learned-cache training (LearnedCacheExport) into models/{LEARNED_FOLDER} and pick "
                     "it by file name")


def block_network(model: Any) -> torch.nn.Module:
    """The network whose blocks a block cache walks, with diffusers' parameter names where fewstep has a twin (the
    embedded digits DiT inside ComfyUI's wrapper), else the diffusion model."""
    dm = model.model.diffusion_model
    inner = getattr(dm, "dit", None)
    return inner if isinstance(inner, torch.nn.Module) else dm


def learned_identity(model: Any) -> dict[str, str]:
    """The MODEL's learned-cache fingerprint: ``core.cache.learned.network_weights_hash`` of its block network's
    weights, plus its weight patches (LoRAs: a predictor learns one set of weights). ComfyUI cannot recompute core's
    config hash, so a predictor is checked against the weights alone (``check_identity(keys=("weights_hash",))``)."""
    from ..core.cache.learned.store import network_weights_hash

    net = block_network(model)
    patches = getattr(model, "patches", {}) or {}

    def items() -> Iterator[tuple[str, torch.Tensor]]:
        yield from net.named_parameters()
        for key in sorted(patches, key=str):
            yield from _tensors_in(list(patches[key]), f"~patch:{key}")

    name = f"comfy-{type(getattr(model.model, 'model_config', model.model)).__name__}"
    return {"name": name, "config_hash": "(not compared in ComfyUI)", "weights_hash": network_weights_hash(items())}
