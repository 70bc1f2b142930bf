"""The fewstep metadata of an export (``core.export.metadata`` documents the format), built from the export's
inputs: the guidance entry, the default sampling recipe, the per-input roles and conditions, and the whole
document attached to the ONNX proto."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from ... import __version__
from ..sampling.model_sampling import is_flow
from ..sampling.schedules import get_sigmas, timestep_list
from . import metadata as md

__all__ = ["attach_metadata", "conditions_metadata", "exporter_versions", "guidance_metadata", "inputs_metadata",
           "network_metadata", "sampler_metadata"]

_ROLES = {"x_in": "sample", "timestep": "timestep", "guidance_scale": "guidance"}


def guidance_metadata(cfg: Any, adapted: Any, guidance: Mapping[str, Any] | None, cond_names: Sequence[str],
                      embeds_guidance: bool) -> dict[str, Any] | None:
    """The ``guidance`` entry: CFG folded into the graph, a folded adapter, a network's own guidance input (the
    user's ``guidance``, or Flux-dev's ``guidance`` condition), or ``None``."""
    meta: dict[str, Any] | None = None
    if cfg is not None:
        if cfg.cond_key not in cond_names:
            raise ValueError(f"CFG folding needs the condition {cfg.cond_key!r} in cond (have {list(cond_names)})")
        meta = {"input": "guidance_scale", "mode": "cfg_folded", "convention": "fewstep",
                "default": float(cfg.scale), "cond": cfg.cond_key}
    elif adapted is not None:
        default = getattr(adapted, "default_scale", None)
        meta = {"input": "guidance_scale", "mode": "embedded", "convention": "fewstep",
                "default": float(default) if default is not None else 1.0, "adapter": True}
    elif guidance is not None:
        meta = {"mode": "embedded", "convention": "fewstep", **dict(guidance)}
    elif "guidance" in cond_names and embeds_guidance:
        meta = {"input": "guidance", "mode": "embedded", "convention": "fewstep", "default": 3.5}
    if meta is not None and meta["mode"] == "embedded" and adapted is None and meta.get("input") not in cond_names:
        raise ValueError(f"guidance input {meta.get('input')!r} is not one of the conditions {list(cond_names)}")
    return meta


def sampler_metadata(ms: Any, sampler: str | None, schedule: str | None, steps: int | None,
                     timesteps: Sequence[float] | None, sigmas: Sequence[float] | Tensor | None,
                     flow_map_target: str | None, cond_names: Sequence[str]) -> dict[str, Any]:
    """The default recipe the runtime samples with: sampler (a runtime twin), schedule and its sigmas."""
    flow = is_flow(ms)
    sampler = sampler or ("euler" if flow else "dpmpp_2m")
    if sampler not in md.RUNTIME_SAMPLERS:
        raise ValueError(f"sampler {sampler!r} has no ONNX runtime twin; choose one of {md.RUNTIME_SAMPLERS}")
    ts_out = None
    if sigmas is not None:
        sig = torch.as_tensor(sigmas, dtype=torch.float32)
        schedule = "custom"
    elif timesteps is not None:
        sig = timestep_list(ms, timesteps)
        schedule, ts_out = "timesteps", [float(t) for t in timesteps]
    else:
        schedule = schedule or ("flow_shift" if flow else "karras")
        if schedule not in md.RUNTIME_SCHEDULES:
            raise ValueError(f"schedule {schedule!r} has no ONNX runtime twin; choose one of {md.RUNTIME_SCHEDULES}")
        sig = get_sigmas(schedule, ms, int(steps or 8))
    if flow_map_target is not None and flow_map_target not in cond_names:
        raise ValueError(f"flow_map_target {flow_map_target!r} is not one of the conditions {list(cond_names)}")
    return {"name": sampler, "schedule": schedule, "steps": len(sig) - 1, "sigmas": [float(s) for s in sig],
            "timesteps": ts_out, "flow_map_target": flow_map_target}


def _dims(shape: Sequence[int], dyn: Mapping[int, Any]) -> list[Any]:
    return [str(dyn[i]) if i in dyn else int(d) for i, d in enumerate(shape)]


def inputs_metadata(names: Sequence[str], args: Sequence[Tensor], guidance_input: str | None,
                    flow_map_target: str | None) -> list[dict[str, Any]]:
    """One ``{name, role, dtype}`` per graph input (roles: ``metadata.ROLES``)."""
    out = []
    for n, a in zip(names, args):
        role = _ROLES.get(n, "condition")
        if n == guidance_input:
            role = "guidance"
        elif n == flow_map_target:
            role = "target"
        out.append({"name": n, "role": role, "dtype": str(a.cpu().numpy().dtype)})
    return out


def conditions_metadata(inputs: Sequence[dict[str, Any]], args: Sequence[Tensor], cond_dims: Mapping[str, Any],
                        dynamic_batch: bool, class_labels: dict[str, Any],
                        conditions: Mapping[str, Mapping[str, Any]] | None) -> dict[str, dict[str, Any]]:
    """Per condition input: dtype, shape with dynamic dims named, ``class_labels``' class info, the user's extras."""
    out: dict[str, dict[str, Any]] = {}
    for entry_in, a in zip(inputs, args):
        if entry_in["role"] != "condition":
            continue
        n = entry_in["name"]
        labels = {0: "batch"} if dynamic_batch else {}
        labels.update(cond_dims.get(n, {}))
        entry: dict[str, Any] = {"dtype": entry_in["dtype"], "shape": _dims(a.shape, labels)}
        if n == "class_labels":
            entry.update(class_labels)
        entry.update(dict((conditions or {}).get(n, {})))
        out[n] = entry
    return out


def exporter_versions(proto: Any) -> dict[str, Any]:
    """The versions that wrote the file (fewstep, torch, onnx, the opset in the proto)."""
    import onnx

    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    return {"fewstep": __version__, "torch": torch.__version__, "onnx": onnx.__version__, "opset": opset}


def network_metadata(*, name: str, inputs: list[dict[str, Any]], output: str, sample_shape: Sequence[int],
                     dynamic: dict[str, Any], model_sampling: dict[str, Any], sampler: dict[str, Any],
                     conditions: dict[str, Any], guidance: dict[str, Any] | None, fp16: bool, proto: Any,
                     notes: list[str], graph: str = "network", **extra: Any) -> dict[str, Any]:
    """The whole metadata document of a network graph (``core.export.metadata`` documents the fields); ``extra``
    adds top-level entries (e.g. ``learned_cache``)."""
    return {
        "format": md.FORMAT, "version": md.VERSION, "name": name, "graph": graph, "inputs": inputs, "output": output,
        "sample_shape": list(sample_shape), "dynamic": dynamic, "model_sampling": model_sampling, "sampler": sampler,
        "conditions": conditions, "guidance": guidance, "precision": "fp16" if fp16 else "fp32",
        "io_dtype": "float32", "exporter": exporter_versions(proto), "notes": notes, **extra,
    }


def attach_metadata(proto: Any, meta: dict[str, Any], source: str, doc: str) -> None:
    """Validate ``meta`` and store it as the proto's only metadata property (:data:`metadata.METADATA_KEY`)."""
    import onnx

    md.validate(meta, source)
    del proto.metadata_props[:]
    onnx.helper.set_model_props(proto, {md.METADATA_KEY: md.dumps(meta)})
    proto.doc_string = doc
