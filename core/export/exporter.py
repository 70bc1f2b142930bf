"""Export a fewstep denoiser to ONNX with the torch.export-based exporter (``torch.onnx.export(..., dynamo=True)``).

What is exported is the model's *raw network* behind the denoiser's call adapter,
``(x_in, timestep, *cond) -> native output`` (eps, v, x0 or flow velocity), not the whole denoiser
``D(x, sigma) -> x0`` (Karras et al. 2022, eq. 7). The model-sampling maths (``c_in``, ``sigma -> timestep``,
``c_skip``/``c_out``) runs in numpy at run time from the ``ModelSampling.config()`` stored in the file. Why:

- the runtime stays generic: one numpy implementation of each model sampling serves every exported network,
  and a ComfyUI / other host can wrap the graph with its own model sampling (the graph is exactly what ComfyUI's
  ``apply_model`` calls);
- ``DiscreteVP.timestep`` (log-sigma interpolation over a 1000-entry table: cumsum/argmax/gather) and the
  ``c_skip``/``c_out`` products near ``sigma -> 0`` and ``sigma -> sigma_max`` are cheap in numpy float32 but
  fragile in an fp16 graph; the exported fp16 graph only holds the network;
- schedules, samplers and the guidance scale can change without re-exporting.

The cost is a few numpy element-wise ops per step on the host, which is negligible next to the network.

Classifier-free guidance can be *folded* into the graph (export a ``CFGDenoiser``): the graph stacks cond and
uncond into one batch and returns ``uncond + w (cond - uncond)`` in the network's native output space, with ``w``
a ``guidance_scale`` input — the same as guiding x0 because ``calculate_denoised`` is affine in the network output
with the same coefficients for both halves (``core.guidance.cfg``).

``export_onnx`` is a pipeline of named steps, one module each: check the model (:func:`check_model`), build the
example batch (``examples``), describe guidance and the sampling recipe (``describe``), wrap the network with its
guidance (``graphs``), trace it (``trace``), convert to fp16 (``fp16``), attach the metadata (``describe``), verify it
on onnxruntime (``verify``) and write the file set atomically (:func:`save_model`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from . import describe
from .examples import (
    add_guidance_input,
    class_info,
    default_cond,
    default_sample_shape,
    example_inputs,
    guidance_embeds,
    resolution_multiple,
)
from .graphs import unwrap_denoiser, wrap_guidance
from .trace import OUTPUT, STATIC_RESOLUTION, condition_dims, dynamic_shapes, resolution_plan, trace_graph
from .verify import EXTERNAL_DATA_THRESHOLD, verify_export

__all__ = ["EXTERNAL_DATA_THRESHOLD", "OUTPUT", "STATIC_RESOLUTION", "ExportResult", "check_model", "default_cond",
           "default_sample_shape", "export_onnx", "resolution_multiple", "save_model"]


@dataclass
class ExportResult:
    """What ``export_onnx`` wrote: the file, its metadata, and how well ORT matches torch on the example."""

    path: Path
    metadata: dict[str, Any]
    max_rel_error: float | None = None
    notes: list[str] = field(default_factory=list)


def check_model(module: nn.Module, ms: Any, batch: int) -> None:
    """Refuse what cannot be exported: no ``ModelSampling.config()``, a batch < 2, non-float32 weights."""
    if not hasattr(ms, "config"):
        raise TypeError(f"{type(ms).__name__} has no config(); export needs a fewstep ModelSampling")
    if batch < 2:
        raise ValueError("batch must be >= 2 (torch.export specialises size-1 dimensions)")
    if any(p.dtype != torch.float32 for p in module.parameters() if p.is_floating_point()):
        raise ValueError("export from float32 weights (module.float()); pass fp16=True for an fp16 graph")


def save_model(proto: Any, path: Path, external_data: bool | None, overwrite: bool = True) -> bool:
    """Save and check ``proto`` at ``path`` as one atomic file set (``core.io.atomic_file_set``: the ``.onnx`` and
    its ``.data``); True if the weights went to external data (``None`` = only above ~1.8 GB)."""
    import onnx

    from ..io import atomic_file_set

    size = sum(t.ByteSize() for t in proto.graph.initializer)
    external = size > EXTERNAL_DATA_THRESHOLD if external_data is None else bool(external_data)
    with atomic_file_set(path, overwrite) as tmp:
        onnx.save_model(proto, str(tmp), save_as_external_data=external, all_tensors_to_one_file=True,
                        location=tmp.name + ".data", size_threshold=1024)
        onnx.checker.check_model(str(tmp), full_check=True)
    return external


def export_onnx(
    denoiser: nn.Module,
    path: str | Path,
    *,
    sample_shape: Sequence[int] | None = None,
    cond: Mapping[str, Tensor] | None = None,
    batch: int = 2,
    dynamic_batch: bool = True,
    dynamic_resolution: bool | None = None,
    cond_dynamic: Mapping[str, Mapping[int, str]] | None = None,
    fp16: bool = False,
    external_data: bool | None = None,
    sampler: str | None = None,
    schedule: str | None = None,
    steps: int | None = None,
    timesteps: Sequence[float] | None = None,
    sigmas: Sequence[float] | Tensor | None = None,
    guidance: Mapping[str, Any] | None = None,
    flow_map_target: str | None = None,
    conditions: Mapping[str, Mapping[str, Any]] | None = None,
    opset: int | None = None,
    verify: bool = True,
    name: str | None = None,
    overwrite: bool = True,
) -> ExportResult:
    """Export a fewstep denoiser's network to ONNX with fewstep metadata; check it with ``onnx.checker``.

    Args:
        denoiser: a ``Denoiser`` (any network + its ``ModelSampling``), or a ``CFGDenoiser`` around one to fold
            classifier-free guidance into the graph (input ``guidance_scale``, one value per sample).
        path: output ``.onnx`` file (``<path>.data`` next to it when external data is used).
        sample_shape: ``(C, H, W)`` of the traced example; default from a diffusers config.
        cond: example conditions with a leading batch dimension; default from a diffusers config (class labels,
            text embeddings...). Their names become graph input names.
        batch: example batch size (>= 2 so the exporter does not specialise a size-1 batch).
        dynamic_batch: make the batch dimension dynamic.
        dynamic_resolution: ``True``/``False``, or ``None`` to try it where the model allows; a dynamic graph is
            checked against torch at another resolution and re-exported static if it differs.
        cond_dynamic: extra dynamic condition dims, ``{name: {dim: label}}`` (default: text length of
            ``encoder_hidden_states``).
        fp16: convert to fp16 with the fragile ops kept in fp32 (``fp16.convert_to_fp16``); I/O stays float32.
        external_data: store the weights in ``<path>.data``; ``None`` = only above ~1.8 GB (protobuf's 2 GiB limit).
        sampler, schedule, steps, timesteps, sigmas: the default recipe the runtime uses (``timesteps``: a
            distilled student's training timesteps, e.g. DMD2's ``[999, 749, 499, 249]``).
        guidance: for a network that takes a guidance scale itself (Flux-dev, LCM's w-embedding, a guidance
            adapter folded in): ``{"input": <cond name>, "convention": "fewstep" | "lcm_omega", "default": w}``.
        flow_map_target: the condition that receives the target sigma of a flow-map student
            (``core.sampling.sample_flow_map``'s ``target_key``).
        conditions: metadata to merge per condition (e.g. ``{"class_labels": {"num_classes": 10, "null": 10}}``).
        opset: ONNX opset (default: the exporter's).
        verify: run the exported graph on onnxruntime (CPU) and compare with torch on the example.
        name: model name stored in the metadata (default: the denoiser's name).
        overwrite: replace an existing ``path`` (``False``: ``FileExistsError`` before any work). The file is
            written atomically either way (``core.io.atomic_file_set``): a failed export leaves the old one intact.
    """
    from ..checks import check_opset, check_positive_int
    from ..io import check_new_file

    # 1. arguments and model
    path = check_new_file(path, overwrite)
    check_opset(opset)
    if steps is not None:
        check_positive_int("steps", steps)
    den, cfg, adapted = unwrap_denoiser(denoiser)
    module, ms = den.model, den.model_sampling
    check_model(module, ms, batch)
    notes: list[str] = []

    # 2. example batch, guidance and the default sampling recipe
    ex = example_inputs(module, ms, sample_shape, cond, batch)
    guidance_meta = describe.guidance_metadata(cfg, adapted, guidance, ex.cond_names, guidance_embeds(module))
    sampler_meta = describe.sampler_metadata(ms, sampler, schedule, steps, timesteps, sigmas, flow_map_target,
                                             ex.cond_names)
    if cfg is not None or adapted is not None:
        add_guidance_input(ex, "cfg" if cfg is not None else "adapter", guidance_meta["default"])

    # 3. the graph module and its trace (dynamic resolution tried where the class allows it)
    net = wrap_guidance(den, ex.cond_names, cfg, adapted, ex.device)
    mult = resolution_multiple(module)
    want_res = resolution_plan(type(module).__name__, ex.shape, mult, dynamic_resolution, notes)
    cond_dims = condition_dims(cond_dynamic)
    n_extra = len(ex.args) - 2 - len(ex.cond)

    def spec(res: bool) -> list[dict[int, Any]]:
        return dynamic_shapes(ex.cond_names, cond_dims, batch=dynamic_batch, resolution=res, mult=mult,
                              n_extra=n_extra)

    ref, proto, want_res = trace_graph(net, ex.args, ex.names, spec, resolution=want_res,
                                       force_resolution=bool(dynamic_resolution), mult=mult, opset=opset,
                                       class_name=type(module).__name__, notes=notes)

    # 4. precision
    if fp16:
        from .fp16 import convert_to_fp16

        proto = convert_to_fp16(proto)

    # 5. metadata
    inputs_meta = describe.inputs_metadata(ex.names, ex.args, guidance_meta["input"] if guidance_meta else None,
                                           flow_map_target)
    null = cfg.null if cfg is not None and cfg.cond_key == "class_labels" else None
    meta = describe.network_metadata(
        name=name or den.name, inputs=inputs_meta, output=OUTPUT, sample_shape=ex.shape,
        dynamic={"batch": dynamic_batch, "resolution": want_res, "multiple": mult}, model_sampling=ms.config(),
        sampler=sampler_meta, guidance=guidance_meta, fp16=fp16, proto=proto, notes=notes,
        conditions=describe.conditions_metadata(inputs_meta, ex.args, cond_dims, dynamic_batch,
                                                class_info(module, null), conditions))
    describe.attach_metadata(proto, meta, str(path), f"fewstep export of {meta['name']}: network (x_in, timestep, "
                                                     "cond) -> native output")

    # 6. verification on onnxruntime, then the atomic write
    err = verify_export(proto, ex.feeds(), ref, OUTPUT, fp16, notes) if verify else None
    if save_model(proto, path, external_data, overwrite):
        notes.append(f"weights in {path.name}.data (external data)")
    return ExportResult(path=path, metadata=meta, max_rel_error=err, notes=notes)
