"""Save and load a learned-cache predictor as safetensors keyed to its model's fingerprint.

The fingerprint is the calibration key (``model_fingerprint``: name + architecture/sampling config hash) plus
``weights_fingerprint`` of the weight values: a predictor learns one network's features, so a fine-tune or a
distilled student of the same architecture needs its own (unlike a TeaCache/MagCache calibration, which transfers
across fine-tunes). Loading a predictor for another model raises ``LearnedCacheMismatchError`` naming both
fingerprints.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ...io import read_safetensors, read_safetensors_metadata, save_safetensors
from .predictor import ResidualPredictor

FORMAT = "fewstep-learned-cache/1"


class LearnedCacheMismatchError(ValueError):
    """A learned-cache predictor was loaded for a model it was not trained on."""


def network_weights_hash(named: Iterable[tuple[str, torch.Tensor]]) -> str:
    """``weights_fingerprint`` of named weights in name order, so two hosts that hold the same network with the same
    parameter names (core's diffusers DiT, ComfyUI's digits DiT) agree whatever order their modules register in."""
    from ..identity import weights_fingerprint

    return weights_fingerprint(sorted(named, key=lambda kv: kv[0]))


def model_identity(model: nn.Module, model_sampling: Any = None, name: str | None = None) -> dict[str, str]:
    """``{"name", "config_hash", "weights_hash"}`` of a denoiser (or a wrapper around one) or a bare network."""
    from ..identity import find_denoiser, model_fingerprint

    den = find_denoiser(model)
    net = den.model if den is not None else model
    model_name, config_hash = model_fingerprint(model, model_sampling, name)
    return {"name": model_name, "config_hash": config_hash,
            "weights_hash": network_weights_hash(net.named_parameters())}


def describe(identity: dict[str, str]) -> str:
    return f"{identity.get('name')} (config {identity.get('config_hash')}, weights {identity.get('weights_hash')})"


def check_identity(expected: dict[str, str], actual: dict[str, str], what: str = "predictor",
                   keys: Sequence[str] = ("config_hash", "weights_hash")) -> None:
    """Raise ``LearnedCacheMismatchError`` naming both fingerprints unless the hashes ``keys`` agree (a host that
    cannot compute core's config hash, such as ComfyUI, compares the weights alone)."""
    if any(expected.get(k) != actual.get(k) for k in keys):
        raise LearnedCacheMismatchError(
            f"this learned-cache {what} was trained for {describe(expected)} but the model is {describe(actual)}; "
            "train one for this model (fewstep.callbacks.learned_cache.LearnedCacheModule) or load the predictor "
            "that belongs to it")


def write_with_header(path: str | Path, tensors: dict[str, torch.Tensor], header: dict[str, Any]) -> Path:
    """Write ``tensors`` with ``header`` as JSON under the safetensors metadata key ``"fewstep"`` (``core.io``'s
    atomic ``save_safetensors``: temp file in the same folder, fsync, rename; no sidecar)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return save_safetensors(tensors, path, meta=header, sidecar=False)


def file_format(path: str | Path) -> str | None:
    """The ``format`` of a learned-cache file's header (a predictor's ``FORMAT``, a plan's ``plan.PLAN_FORMAT``), or
    None where the file has no fewstep header; a missing or torn file raises ``core.io``'s errors, which name it."""
    return json.loads(read_safetensors_metadata(Path(path)).get("fewstep", "{}")).get("format")


def read_header(path: str | Path, fmt: str = FORMAT, what: str = "learned-cache predictor") -> dict[str, Any]:
    """The ``"fewstep"`` header of a file written by ``write_with_header``; ``ValueError`` unless its format is
    ``fmt``; a missing or torn file raises ``core.io``'s errors, which name it."""
    path = Path(path)
    header = json.loads(read_safetensors_metadata(path).get("fewstep", "{}"))
    if header.get("format") != fmt:
        raise ValueError(f"{path.name} is not a fewstep {what} (format {header.get('format')!r}, expected {fmt!r})")
    return header


def save_predictor(path: str | Path, predictor: ResidualPredictor, identity: dict[str, str],
                   meta: dict[str, Any] | None = None) -> Path:
    """Write ``predictor`` to ``path`` (safetensors; header metadata holds the identity, the predictor config and
    ``meta``) atomically: temp file in the same folder, fsync, rename."""
    header = {"format": FORMAT, "identity": identity, "predictor": predictor.config(), "meta": meta or {}}
    return write_with_header(path, predictor.state_dict(), header)


def load_predictor(path: str | Path, model: nn.Module | None = None, identity: dict[str, str] | None = None
                   ) -> tuple[ResidualPredictor, dict[str, Any]]:
    """``(predictor, header)`` from ``path``; with ``model`` (or its ``identity``) given, refuses a predictor
    trained for another model (``LearnedCacheMismatchError`` naming both fingerprints)."""
    header = read_header(path)
    if model is not None or identity is not None:
        check_identity(header["identity"], identity if identity is not None else model_identity(model))
    pred = ResidualPredictor(**header["predictor"])
    pred.load_state_dict(read_safetensors(path)[0])
    return pred.eval().requires_grad_(False), header
