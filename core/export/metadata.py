"""The fewstep metadata an exported ONNX file carries (pure Python: no torch, no numpy, no onnx).

One JSON document under the ONNX ``metadata_props`` key :data:`METADATA_KEY`. Everything a runtime needs to
sample from the graph without torch and without fewstep's model code::

    {
      "format": "fewstep-onnx", "version": 1,
      "name": "digits-dit-teacher",
      "graph": "network",                       # graph = the raw network: (x_in, timestep, cond...) -> native output
      "inputs": [{"name": "x_in", "role": "sample"}, {"name": "timestep", "role": "timestep"},
                 {"name": "class_labels", "role": "condition"}, {"name": "guidance_scale", "role": "guidance"}],
      "output": "model_output",
      "sample_shape": [1, 16, 16],              # (C, H, W) of the example the graph was traced with
      "dynamic": {"batch": true, "resolution": false, "multiple": 2, "note": "..."},
      "model_sampling": {...},                  # ModelSampling.config(): parameterisation, betas or shift
      "sampler": {"name": "dpmpp_2m", "schedule": "karras", "steps": 8, "sigmas": [...], "timesteps": null},
      "conditions": {"class_labels": {"dtype": "int64", "shape": ["batch"], "kind": "class_labels",
                                      "num_classes": 10, "null": 10}},
      "guidance": {"input": "guidance_scale", "mode": "cfg_folded", "convention": "fewstep", "default": 2.0},
      "precision": "fp32",                      # or "fp16" (graph inputs and outputs stay float32)
      "exporter": {"fewstep": "0.1.0", "torch": "2.13.0", "opset": 20}
    }

``guidance.mode`` is ``"cfg_folded"`` (classifier-free guidance folded into the graph: the graph batches cond and
uncond and returns ``uncond + w (cond - uncond)``, Ho & Salimans 2022 eq. 6 in fewstep's convention) or
``"embedded"`` (the network itself takes a guidance scale: Flux-dev's guidance embedding, LCM's ``w`` embedding
(Luo et al. 2023, sec. 4.2), a student with a guidance adapter folded in). ``convention`` says how the user's
fewstep scale ``w`` is fed to that input: ``"fewstep"`` (as is) or ``"lcm_omega"`` (``w - 1``, see
``core.guidance.cfg``).
"""

from __future__ import annotations

import json
from typing import Any

from ..sampling.registry import RUNTIME_SAMPLERS

METADATA_KEY = "fewstep"
FORMAT = "fewstep-onnx"
VERSION = 1

#: input roles; ``"cache"``: a learned-cache state input of a partial graph (``core.export.learned_cache``)
ROLES = ("sample", "timestep", "condition", "guidance", "target", "cache")
GUIDANCE_MODES = ("cfg_folded", "embedded")
GUIDANCE_CONVENTIONS = ("fewstep", "lcm_omega")
#: samplers the numpy runtime offers: ``RUNTIME_SAMPLERS`` re-exported from ``core.sampling.registry``
__all__ = ["FORMAT", "GUIDANCE_CONVENTIONS", "GUIDANCE_MODES", "METADATA_KEY", "ROLES", "RUNTIME_SAMPLERS",
           "RUNTIME_SCHEDULES", "VERSION", "OnnxModelError", "dumps", "guidance_scale_to_input", "parse", "validate"]
#: named schedules the numpy runtime implements (``core.sampling.schedules``), plus explicit lists
RUNTIME_SCHEDULES = ("simple", "uniform", "normal", "sgm_uniform", "karras", "exponential", "flow_shift")


class OnnxModelError(ValueError):
    """The file is not a usable fewstep ONNX export (missing, corrupt, no or bad fewstep metadata)."""


def dumps(meta: dict[str, Any]) -> str:
    return json.dumps(meta, sort_keys=True, separators=(",", ":"))


def guidance_scale_to_input(guidance: dict[str, Any], scale: float) -> float:
    """The value to feed the graph's guidance input for fewstep scale ``w`` (``uncond + w (cond - uncond)``)."""
    conv = guidance.get("convention", "fewstep")
    if conv == "fewstep":
        return float(scale)
    if conv == "lcm_omega":
        return float(scale) - 1.0
    raise OnnxModelError(f"unknown guidance convention {conv!r}; expected one of {GUIDANCE_CONVENTIONS}")


def parse(text: str | None, source: str = "the ONNX file") -> dict[str, Any]:
    """Parse and validate the metadata JSON; raise :class:`OnnxModelError` with what is wrong."""
    if text is None:
        raise OnnxModelError(
            f"{source} has no '{METADATA_KEY}' metadata: it was not written by fewstep's export_onnx "
            "(`fewstep export <model> out.onnx`). A plain ONNX network needs its model sampling and schedule; "
            "re-export it with fewstep."
        )
    try:
        meta = json.loads(text)
    except json.JSONDecodeError as e:
        raise OnnxModelError(f"{source}: the '{METADATA_KEY}' metadata is not valid JSON ({e})") from None
    validate(meta, source)
    return meta


def validate(meta: Any, source: str = "metadata") -> None:
    """Check the structure a runtime relies on."""
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise OnnxModelError(f"{source}: metadata format is not {FORMAT!r}")
    version = meta.get("version")
    if not isinstance(version, int) or version > VERSION:
        raise OnnxModelError(f"{source}: metadata version {version!r} is newer than this fewstep reads ({VERSION}); "
                             "upgrade fewstep")
    for key in ("inputs", "output", "model_sampling", "sampler", "sample_shape"):
        if key not in meta:
            raise OnnxModelError(f"{source}: metadata lacks {key!r}")
    roles = [i.get("role") for i in meta["inputs"]]
    if roles[:2] != ["sample", "timestep"] or any(r not in ROLES for r in roles):
        raise OnnxModelError(f"{source}: inputs must start with a sample and a timestep input, got roles {roles}")
    g = meta.get("guidance")
    if g is not None:
        if g.get("mode") not in GUIDANCE_MODES or g.get("convention", "fewstep") not in GUIDANCE_CONVENTIONS:
            raise OnnxModelError(f"{source}: bad guidance entry {g}")
        if g.get("input") not in [i["name"] for i in meta["inputs"]]:
            raise OnnxModelError(f"{source}: guidance input {g.get('input')!r} is not a graph input")
