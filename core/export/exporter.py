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
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ... import __version__
from ..guidance.cfg import CFGDenoiser
from ..models.denoiser import Denoiser
from ..sampling.model_sampling import is_flow
from ..sampling.schedules import get_sigmas, timestep_list
from . import metadata as md

OUTPUT = "model_output"
#: models above this are saved with external data (protobuf's hard limit is 2 GiB)
EXTERNAL_DATA_THRESHOLD = 1_800_000_000
#: classes known to export with a wrong graph at a new resolution, and why (checked by ``tests/test_export``)
STATIC_RESOLUTION = {
    "DiTTransformer2DModel": "diffusers' PatchEmbed keeps the sin-cos position table of sample_size; torch.export "
                             "traces the `height != self.height` branch away, so the graph only works at the "
                             "example resolution",
    "SD3Transformer2DModel": "PatchEmbed crops its position table (pos_embed_max_size) at offsets computed from the "
                             "example size; the traced graph is wrong at other sizes",
}


class _Specialised(RuntimeError):
    """torch.export pinned a dimension that was asked to be dynamic."""


@dataclass
class ExportResult:
    """What ``export_onnx`` wrote: the file, its metadata, and how well ORT matches torch on the example."""

    path: Path
    metadata: dict[str, Any]
    max_rel_error: float | None = None
    notes: list[str] = field(default_factory=list)


class _Network(nn.Module):
    """The exported graph: ``call(model, x_in, timestep, **cond)`` with the conditions as positional inputs."""

    def __init__(self, denoiser: Denoiser, cond_names: Sequence[str]) -> None:
        super().__init__()
        self.model = denoiser.model
        self.call = denoiser.call
        self.cond_names = tuple(cond_names)

    def forward(self, x_in: Tensor, timestep: Tensor, *conds: Tensor) -> Tensor:
        return self.call(self.model, x_in, timestep, **dict(zip(self.cond_names, conds)))


class _CFGNetwork(nn.Module):
    """Classifier-free guidance folded into one graph (Ho & Salimans 2022, eq. 6, fewstep convention): cond and
    uncond stacked in one batch, combined as ``uncond + w (cond - uncond)`` with ``w`` the last input."""

    def __init__(self, net: _Network, cond_key: str, null: Tensor) -> None:
        super().__init__()
        self.net = net
        self.cond_key = cond_key
        self.register_buffer("null", null, persistent=False)

    def forward(self, x_in: Tensor, timestep: Tensor, *rest: Tensor) -> Tensor:
        conds, scale = rest[:-1], rest[-1]
        doubled = []
        for name, v in zip(self.net.cond_names, conds):
            if name == self.cond_key:
                null = self.null.to(v.dtype)
                null = null.expand(v.shape) if null.ndim == 0 else null.expand(v.shape[0], *null.shape[1:])
                doubled.append(torch.cat([v, null]))
            else:
                doubled.append(torch.cat([v, v]))
        out = self.net(torch.cat([x_in, x_in]), torch.cat([timestep, timestep]), *doubled)
        b = x_in.shape[0]
        cond, uncond = out[:b], out[b:]  # not chunk(2): its ceil-division guard pins a dynamic batch to one size
        return uncond + scale.reshape(-1, *([1] * (out.ndim - 1))) * (cond - uncond)


class _AdaptedNetwork(nn.Module):
    """A network with a guidance adapter folded in (Adapter Guidance Distillation, Jensen et al. 2025, sec. 3;
    ``core.guidance.adapters``): the adapter's hooks run inside the traced forward with the per-sample scale ``w``
    (the last input, fewstep convention), so guidance costs no extra pass on the device."""

    def __init__(self, net: _Network, adapter: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.adapter = adapter

    def forward(self, x_in: Tensor, timestep: Tensor, *rest: Tensor) -> Tensor:
        with self.adapter.scale(rest[-1]):  # (B,) already: no batch expansion, so no guard on the batch size
            return self.net(x_in, timestep, *rest[:-1])


# ------------------------------------------------------------------------------------------- example inputs
def _config(module: nn.Module) -> Any:
    return getattr(module, "config", None)


def default_sample_shape(module: nn.Module) -> tuple[int, int, int]:
    """``(C, H, W)`` of a diffusers model's input from its config (Flux: latent channels = in_channels / 4)."""
    cfg = _config(module)
    name = type(module).__name__
    if cfg is None or not hasattr(cfg, "in_channels"):
        raise ValueError(f"cannot infer the sample shape of {name}; pass sample_shape=(C, H, W)")
    size = getattr(cfg, "sample_size", None) or 16
    size = size[0] if isinstance(size, (tuple, list)) else size
    if name == "FluxTransformer2DModel":
        return cfg.in_channels // 4, 16, 16
    return cfg.in_channels, int(size), int(size)


def default_cond(module: nn.Module, batch: int, generator: torch.Generator | None = None) -> dict[str, Tensor]:
    """Example conditions for the diffusers classes fewstep wraps (shapes from the config; values random)."""
    cfg = _config(module)
    name = type(module).__name__
    g = generator
    if name == "DiTTransformer2DModel":
        return {"class_labels": torch.randint(0, cfg.num_embeds_ada_norm, (batch,), generator=g)}
    if name == "UNet2DModel":
        if cfg.num_class_embeds:
            return {"class_labels": torch.randint(0, cfg.num_class_embeds, (batch,), generator=g)}
        return {}
    if name == "UNet2DConditionModel":
        return {"encoder_hidden_states": torch.randn(batch, 8, cfg.cross_attention_dim, generator=g)}
    if name in ("SD3Transformer2DModel", "FluxTransformer2DModel"):
        cond = {"encoder_hidden_states": torch.randn(batch, 8, cfg.joint_attention_dim, generator=g),
                "pooled_projections": torch.randn(batch, cfg.pooled_projection_dim, generator=g)}
        if getattr(cfg, "guidance_embeds", False):
            cond["guidance"] = torch.full((batch,), 3.5)
        return cond
    return {}


def resolution_multiple(module: nn.Module) -> int:
    """The factor H and W must be multiples of (downsampling of a UNet, patch size of a transformer)."""
    cfg = _config(module)
    name = type(module).__name__
    if name in ("UNet2DModel", "UNet2DConditionModel"):
        return 2 ** (len(cfg.down_block_types) - 1)
    if name == "FluxTransformer2DModel":
        return 2 * int(getattr(cfg, "patch_size", 1) or 1)
    if cfg is not None and getattr(cfg, "patch_size", None):
        return int(cfg.patch_size)
    return 8


def _class_info(module: nn.Module, null: Any) -> dict[str, Any]:
    cfg = _config(module)
    info: dict[str, Any] = {"kind": "class_labels"}
    n = getattr(cfg, "num_embeds_ada_norm", None) or getattr(cfg, "num_class_embeds", None)
    if n:
        info["num_classes"] = int(n)
    if null is not None and not torch.is_tensor(null):
        info["null"] = int(null)
    elif n and type(module).__name__ == "DiTTransformer2DModel":
        info["null"] = int(n)  # diffusers' LabelEmbedding appends the CFG row at index num_classes
    return info


# --------------------------------------------------------------------------------------------------- export
def _is_adapted(m: nn.Module) -> bool:
    """``core.guidance.adapters.AdaptedDenoiser`` (duck-typed: a denoiser plus an adapter with ``scale(w)``)."""
    return hasattr(m, "denoiser") and hasattr(getattr(m, "adapter", None), "scale")


def _unwrap(denoiser: nn.Module) -> tuple[Denoiser, CFGDenoiser | None, nn.Module | None]:
    cfg = denoiser if isinstance(denoiser, CFGDenoiser) else None
    adapted = denoiser if cfg is None and _is_adapted(denoiser) else None
    inner = cfg.denoiser if cfg is not None else adapted.denoiser if adapted is not None else denoiser
    if isinstance(inner, CFGDenoiser) or _is_adapted(inner):
        raise TypeError("export one guidance mechanism: a CFGDenoiser or an AdaptedDenoiser around a Denoiser")
    if not isinstance(inner, Denoiser):
        raise TypeError(
            f"export_onnx needs a fewstep Denoiser (or a CFGDenoiser around one), got {type(inner).__name__}; wrap "
            "your network with fewstep.core.models.Denoiser(module, model_sampling, call=...) or "
            "diffusers_adapters.diffusers_denoiser(model)"
        )
    return inner, cfg, adapted


def _sampler_meta(ms: Any, sampler: str | None, schedule: str | None, steps: int | None,
                  timesteps: Sequence[float] | None, sigmas: Sequence[float] | Tensor | None) -> dict[str, Any]:
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
    return {"name": sampler, "schedule": schedule, "steps": len(sig) - 1, "sigmas": [float(s) for s in sig],
            "timesteps": ts_out}


def _dims(shape: Sequence[int], dyn: Mapping[int, Any]) -> list[Any]:
    return [str(dyn[i]) if i in dyn else int(d) for i, d in enumerate(shape)]


@contextlib.contextmanager
def _quiet():
    """The exporter prints progress and diffusers warns about configs: keep the user's terminal readable."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        level = logging.getLogger("torch").level
        logging.getLogger("torch").setLevel(logging.ERROR)
        try:
            yield
        finally:
            logging.getLogger("torch").setLevel(level)


def _torch_export(module: nn.Module, args: tuple, names: list[str], dyn: list[dict[int, Any]],
                  opset: int | None) -> Any:
    import onnx  # noqa: F401  (a clear ImportError before the exporter's own)

    ds = (*dyn[:2], tuple(dyn[2:])) if len(dyn) > 2 else tuple(dyn)  # *conds is one (possibly absent) group
    with _quiet():
        prog = torch.onnx.export(module, args, dynamo=True, input_names=names, output_names=[OUTPUT],
                                 dynamic_shapes=ds, opset_version=opset, optimize=True, verbose=False)
    proto = prog.model_proto
    for node in proto.graph.node:  # per-node stack traces and module paths: most of a small model's file size
        del node.metadata_props[:]
    # torch.onnx falls back to a draft export when a dynamic dim gets specialised; refuse a silently static graph
    for inp, spec in zip(proto.graph.input, dyn):
        dims = inp.type.tensor_type.shape.dim
        pinned = [i for i in spec if i < len(dims) and not dims[i].dim_param]
        if pinned:
            raise _Specialised(
                f"torch.export specialised dims {pinned} of input {inp.name!r} to "
                f"{[dims[i].dim_value for i in pinned]}: the model has a shape-dependent branch on them. Export with "
                "dynamic_batch=False / dynamic_resolution=False, or remove the branch")
    return proto


def _have_ort() -> bool:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def _ort_run(proto: Any, feeds: dict[str, np.ndarray]) -> np.ndarray | None:
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    if proto.ByteSize() > EXTERNAL_DATA_THRESHOLD:
        return None
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run([OUTPUT], feeds)[0]


def _rel_err(a: np.ndarray, ref: np.ndarray) -> float:
    return float(np.linalg.norm((a - ref).ravel()) / max(np.linalg.norm(ref.ravel()), 1e-12))


def _save(proto: Any, path: Path, external_data: bool | None, overwrite: bool = True) -> bool:
    """Save and check ``proto`` at ``path`` atomically (``atomic.atomic_onnx_path``); True if external data."""
    import onnx

    from ..io import atomic_file_set as atomic_onnx_path

    size = sum(t.ByteSize() for t in proto.graph.initializer)
    external = size > EXTERNAL_DATA_THRESHOLD if external_data is None else bool(external_data)
    with atomic_onnx_path(path, overwrite) as tmp:
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
    import onnx

    from ..checks import check_opset, check_positive_int
    from ..io import check_new_file

    path = check_new_file(path, overwrite)
    check_opset(opset)
    if steps is not None:
        check_positive_int("steps", steps)
    den, cfg, adapted = _unwrap(denoiser)
    module, ms = den.model, den.model_sampling
    if not hasattr(ms, "config"):
        raise TypeError(f"{type(ms).__name__} has no config(); export needs a fewstep ModelSampling")
    if batch < 2:
        raise ValueError("batch must be >= 2 (torch.export specialises size-1 dimensions)")
    params = list(module.parameters())
    device = params[0].device if params else torch.device("cpu")
    if any(p.dtype != torch.float32 for p in params if p.is_floating_point()):
        raise ValueError("export from float32 weights (module.float()); pass fp16=True for an fp16 graph")
    gen = torch.Generator().manual_seed(0)
    shape = tuple(int(s) for s in (sample_shape or default_sample_shape(module)))
    cond = dict(default_cond(module, batch, gen) if cond is None else cond)
    cond = {k: torch.as_tensor(v).to(device) for k, v in cond.items()}
    for k, v in cond.items():
        if v.ndim == 0 or v.shape[0] != batch:
            raise ValueError(f"example condition {k!r} must have the batch size {batch} as its first dim, got "
                             f"{tuple(v.shape)}")
    cond_names = list(cond)
    notes: list[str] = []

    # guidance
    guidance_meta: dict[str, Any] | None = None
    if cfg is not None:
        if cfg.cond_key not in cond:
            raise ValueError(f"CFG folding needs the condition {cfg.cond_key!r} in cond (have {cond_names})")
        guidance_meta = {"input": "guidance_scale", "mode": "cfg_folded", "convention": "fewstep",
                         "default": float(cfg.scale), "cond": cfg.cond_key}
    elif adapted is not None:
        default = getattr(adapted, "default_scale", None)
        guidance_meta = {"input": "guidance_scale", "mode": "embedded", "convention": "fewstep",
                         "default": float(default) if default is not None else 1.0, "adapter": True}
    elif guidance is not None:
        guidance_meta = {"mode": "embedded", "convention": "fewstep", **dict(guidance)}
    elif "guidance" in cond and getattr(_config(module), "guidance_embeds", False):
        guidance_meta = {"input": "guidance", "mode": "embedded", "convention": "fewstep", "default": 3.5}
    if guidance_meta is not None and guidance_meta["mode"] == "embedded" and adapted is None \
            and guidance_meta.get("input") not in cond:
        raise ValueError(f"guidance input {guidance_meta.get('input')!r} is not one of the conditions {cond_names}")

    sampler_meta = _sampler_meta(ms, sampler, schedule, steps, timesteps, sigmas)
    sampler_meta["flow_map_target"] = flow_map_target
    if flow_map_target is not None and flow_map_target not in cond:
        raise ValueError(f"flow_map_target {flow_map_target!r} is not one of the conditions {cond_names}")

    # example inputs (timesteps at two noise levels)
    g = torch.Generator().manual_seed(1)
    x_in = torch.randn(batch, *shape, generator=g).to(device)
    sig = torch.tensor([ms.percent_to_sigma(0.2 + 0.6 * i / max(batch - 1, 1)) for i in range(batch)])
    t = ms.timestep(sig).float().reshape(batch).to(device)
    net: nn.Module = _Network(den, cond_names)
    args: list[Tensor] = [x_in, t, *cond.values()]
    names = ["x_in", "timestep", *cond_names]
    if cfg is not None:
        net = _CFGNetwork(net, cfg.cond_key, torch.as_tensor(cfg.null, device=device))
        args.append(torch.full((batch,), float(cfg.scale), device=device))
        names.append("guidance_scale")
    elif adapted is not None:
        net = _AdaptedNetwork(net, adapted.adapter)
        args.append(guidance_meta["default"] + 0.5 * torch.arange(batch, dtype=torch.float32, device=device))
        names.append("guidance_scale")

    # dynamic shapes
    mult = resolution_multiple(module)
    static_reason = STATIC_RESOLUTION.get(type(module).__name__)
    want_res = (static_reason is None) if dynamic_resolution is None else bool(dynamic_resolution)
    if dynamic_resolution is None and static_reason:
        notes.append(f"static resolution: {static_reason}")
    if want_res and (shape[1] % mult or shape[2] % mult):
        raise ValueError(f"example resolution {shape[1:]} is not a multiple of {mult}")
    cond_dyn = {"encoder_hidden_states": {1: "text_len"}}
    cond_dyn.update({k: dict(v) for k, v in (cond_dynamic or {}).items()})
    Bd = torch.export.Dim("batch", min=1, max=4096)

    def dyn_spec(res: bool) -> list[dict[int, Any]]:
        bdim = {0: Bd} if dynamic_batch else {}
        xd = dict(bdim)
        if res:
            xd[2] = mult * torch.export.Dim("height", min=1, max=8192 // mult)
            xd[3] = mult * torch.export.Dim("width", min=1, max=8192 // mult)
        out = [xd, dict(bdim)]
        for k in cond_names:
            d = dict(bdim)
            for i, label in cond_dyn.get(k, {}).items():
                d[i] = torch.export.Dim(label, min=1, max=65536)
            out.append(d)
        if cfg is not None or adapted is not None:
            out.append(dict(bdim))
        return out

    modes = {m: m.training for m in net.modules()}  # the wrapper is new (training=True): restore the model's own
    net.eval()
    try:
        with torch.no_grad():
            ref = net(*args).float().cpu().numpy()
            proto, reason = None, None
            if want_res:  # trust, but check at another resolution and batch size
                try:
                    proto = _torch_export(net, tuple(args), names, dyn_spec(True), opset)
                    reason = _check_other_resolution(net, proto, args, names, mult)
                except _Specialised as e:
                    reason = str(e)
                if reason and dynamic_resolution:
                    raise RuntimeError(f"dynamic resolution failed for {type(module).__name__}: {reason}")
                if reason:
                    notes.append(f"static resolution: a dynamic-resolution export failed ({reason})")
                    want_res = False
                elif not _have_ort():
                    notes.append("dynamic resolution not verified against torch (onnxruntime not installed)")
            if not want_res:
                proto = _torch_export(net, tuple(args), names, dyn_spec(False), opset)
    finally:
        for m, mode in modes.items():
            m.training = mode

    feeds = {n: a.cpu().numpy() for n, a in zip(names, args)}
    if fp16:
        from .fp16 import convert_to_fp16

        proto = convert_to_fp16(proto)

    # metadata
    roles = {"x_in": "sample", "timestep": "timestep", "guidance_scale": "guidance"}
    gin = guidance_meta["input"] if guidance_meta else None
    inputs_meta = []
    for n_, a in zip(names, args):
        role = roles.get(n_, "condition")
        if n_ == gin:
            role = "guidance"
        elif n_ == flow_map_target:
            role = "target"
        inputs_meta.append({"name": n_, "role": role, "dtype": str(a.cpu().numpy().dtype)})
    conds_meta: dict[str, dict[str, Any]] = {}
    for i, n_ in enumerate(names):
        if inputs_meta[i]["role"] != "condition":
            continue
        labels = {0: "batch"} if dynamic_batch else {}
        labels.update(cond_dyn.get(n_, {}))
        entry: dict[str, Any] = {"dtype": inputs_meta[i]["dtype"], "shape": _dims(args[i].shape, labels)}
        if n_ == "class_labels":
            entry.update(_class_info(module, cfg.null if cfg is not None and cfg.cond_key == n_ else None))
        entry.update(dict((conditions or {}).get(n_, {})))
        conds_meta[n_] = entry
    opset_used = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    meta: dict[str, Any] = {
        "format": md.FORMAT, "version": md.VERSION,
        "name": name or den.name,
        "graph": "network",
        "inputs": inputs_meta,
        "output": OUTPUT,
        "sample_shape": list(shape),
        "dynamic": {"batch": dynamic_batch, "resolution": want_res, "multiple": mult},
        "model_sampling": ms.config(),
        "sampler": sampler_meta,
        "conditions": conds_meta,
        "guidance": guidance_meta,
        "precision": "fp16" if fp16 else "fp32",
        "io_dtype": "float32",
        "exporter": {"fewstep": __version__, "torch": torch.__version__, "onnx": onnx.__version__,
                     "opset": opset_used},
        "notes": notes,
    }
    md.validate(meta, str(path))
    del proto.metadata_props[:]
    onnx.helper.set_model_props(proto, {md.METADATA_KEY: md.dumps(meta)})
    proto.doc_string = f"fewstep export of {meta['name']}: network (x_in, timestep, cond) -> native output"

    err = None
    if verify:
        out = _ort_run(proto, feeds)
        if out is None:
            notes.append("not verified on onnxruntime (not installed, or model > 2 GB)")
        else:
            err = _rel_err(out, ref)
            tol = 1e-2 if fp16 else 1e-4
            if not math.isfinite(err) or err > tol:
                notes.append(f"onnxruntime differs from torch by {err:.2e} (relative) on the example")
                warnings.warn(f"fewstep export: onnxruntime differs from torch by {err:.2e} (relative; tolerance "
                              f"{tol:g})", stacklevel=2)
    external = _save(proto, path, external_data, overwrite)
    if external:
        notes.append(f"weights in {path.name}.data (external data)")
    return ExportResult(path=path, metadata=meta, max_rel_error=err, notes=notes)


def _check_other_resolution(net: nn.Module, proto: Any, args: list[Tensor], names: list[str], mult: int
                            ) -> str | None:
    """Run torch and ORT at batch 3 and a non-square, larger resolution; a reason string if they disagree."""
    x = args[0]
    b, (h, w) = 3, (x.shape[2] + mult, x.shape[3] + 2 * mult)
    g = torch.Generator().manual_seed(2)
    alt = [torch.randn(b, x.shape[1], h, w, generator=g).to(x.device)]
    for a in args[1:]:
        idx = torch.arange(b) % a.shape[0]
        alt.append(a[idx.to(a.device)])
    try:
        ref = net(*alt).float().cpu().numpy()
        out = _ort_run(proto, {n: a.cpu().numpy() for n, a in zip(names, alt)})
    except Exception as e:  # noqa: BLE001 - any failure at the new size means "not dynamic"
        return f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    if out is None:
        return None  # no onnxruntime here: export_onnx notes that the dynamic graph is unverified
    err = _rel_err(out, ref)
    return None if err < 1e-3 else f"relative error {err:.2e} at {h}x{w}"
