"""Trace a graph module to an ONNX proto with torch.export (``torch.onnx.export(..., dynamo=True)``).

- :func:`resolution_plan`: whether to ask for a dynamic resolution (not for the classes in
  :data:`STATIC_RESOLUTION`) and the multiple H and W must keep;
- :func:`dynamic_shapes`: the ``torch.export.Dim`` spec per input (batch, height/width, condition dims);
- :func:`torch_export`: one export, refusing a graph in which a dim asked to be dynamic came out static;
- :func:`trace_graph`: the dynamic-resolution export checked at another size, falling back to a static one.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .verify import have_ort, ort_run, rel_err

__all__ = ["OUTPUT", "STATIC_RESOLUTION", "Specialised", "check_other_resolution", "dynamic_shapes", "quiet",
           "resolution_plan", "torch_export", "trace_graph"]

OUTPUT = "model_output"
#: classes known to export with a wrong graph at a new resolution, and why (checked by ``tests/test_export``)
STATIC_RESOLUTION = {
    "DiTTransformer2DModel": "diffusers' PatchEmbed keeps the sin-cos position table of sample_size; torch.export "
                             "traces the `height != self.height` branch away, so the graph only works at the "
                             "example resolution",
    "SD3Transformer2DModel": "PatchEmbed crops its position table (pos_embed_max_size) at offsets computed from the "
                             "example size; the traced graph is wrong at other sizes",
}
#: extra dynamic condition dims every export gets (the text length of a text encoder's states)
DEFAULT_COND_DYNAMIC = {"encoder_hidden_states": {1: "text_len"}}


class Specialised(RuntimeError):
    """torch.export pinned a dimension that was asked to be dynamic."""


@contextlib.contextmanager
def quiet():
    """The exporter prints progress and diffusers warns about configs: keep the user's terminal readable."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        level = logging.getLogger("torch").level
        logging.getLogger("torch").setLevel(logging.ERROR)
        try:
            yield
        finally:
            logging.getLogger("torch").setLevel(level)


def resolution_plan(class_name: str, shape: Sequence[int], mult: int, dynamic_resolution: bool | None,
                    notes: list[str]) -> bool:
    """Whether to try a dynamic resolution: the user's choice, else yes unless the class is known static (noted)."""
    static_reason = STATIC_RESOLUTION.get(class_name)
    want = (static_reason is None) if dynamic_resolution is None else bool(dynamic_resolution)
    if dynamic_resolution is None and static_reason:
        notes.append(f"static resolution: {static_reason}")
    if want and (shape[1] % mult or shape[2] % mult):
        raise ValueError(f"example resolution {tuple(shape[1:])} is not a multiple of {mult}")
    return want


def condition_dims(cond_dynamic: Mapping[str, Mapping[int, str]] | None) -> dict[str, dict[int, str]]:
    """``{condition: {dim: label}}``: :data:`DEFAULT_COND_DYNAMIC` updated with the user's."""
    dims = {k: dict(v) for k, v in DEFAULT_COND_DYNAMIC.items()}
    dims.update({k: dict(v) for k, v in (cond_dynamic or {}).items()})
    return dims


def dynamic_shapes(cond_names: Sequence[str], cond_dims: Mapping[str, Mapping[int, str]], *, batch: bool,
                   resolution: bool, mult: int, n_extra: int) -> list[dict[int, Any]]:
    """One ``{dim: torch.export.Dim}`` per input: the sample (batch, H, W), the timestep (batch), each condition
    (batch + its labelled dims), then ``n_extra`` per-sample inputs (a guidance scale)."""
    bdim = {0: torch.export.Dim("batch", min=1, max=4096)} if batch else {}
    xd = dict(bdim)
    if resolution:
        xd[2] = mult * torch.export.Dim("height", min=1, max=8192 // mult)
        xd[3] = mult * torch.export.Dim("width", min=1, max=8192 // mult)
    out = [xd, dict(bdim)]
    for k in cond_names:
        d = dict(bdim)
        for i, label in cond_dims.get(k, {}).items():
            d[i] = torch.export.Dim(label, min=1, max=65536)
        out.append(d)
    out.extend(dict(bdim) for _ in range(n_extra))
    return out


def torch_export(module: nn.Module, args: tuple, names: list[str], dyn: list[dict[int, Any]],
                 opset: int | None, outputs: Sequence[str] = (OUTPUT,)) -> Any:
    """The ONNX ``ModelProto`` of ``module(*args)`` (inputs ``names``, outputs ``outputs``); per-node debug
    metadata dropped. Raises :class:`Specialised` if a dim of ``dyn`` came out static."""
    import onnx  # noqa: F401  (a clear ImportError before the exporter's own)

    ds = (*dyn[:2], tuple(dyn[2:])) if len(dyn) > 2 else tuple(dyn)  # *rest is one (possibly absent) group
    with quiet():
        prog = torch.onnx.export(module, args, dynamo=True, input_names=names, output_names=list(outputs),
                                 dynamic_shapes=ds, opset_version=opset, optimize=True, verbose=False)
    proto = prog.model_proto
    for node in proto.graph.node:  # per-node stack traces and module paths: most of a small model's file size
        del node.metadata_props[:]
    # torch.onnx falls back to a draft export when a dynamic dim gets specialised; refuse a silently static graph
    for inp, spec in zip(proto.graph.input, dyn):
        dims = inp.type.tensor_type.shape.dim
        pinned = [i for i in spec if i < len(dims) and not dims[i].dim_param]
        if pinned:
            raise Specialised(
                f"torch.export specialised dims {pinned} of input {inp.name!r} to "
                f"{[dims[i].dim_value for i in pinned]}: the model has a shape-dependent branch on them. Export with "
                "dynamic_batch=False / dynamic_resolution=False, or remove the branch")
    return proto


def check_other_resolution(net: nn.Module, proto: Any, args: list[Tensor], names: list[str], mult: int
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
        out = ort_run(proto, {n: a.cpu().numpy() for n, a in zip(names, alt)}, OUTPUT)
    except Exception as e:  # noqa: BLE001 - any failure at the new size means "not dynamic"
        return f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    if out is None:
        return None  # no onnxruntime here: export_onnx notes that the dynamic graph is unverified
    err = rel_err(out, ref)
    return None if err < 1e-3 else f"relative error {err:.2e} at {h}x{w}"


@contextlib.contextmanager
def eval_mode(net: nn.Module):
    """``net.eval()`` for the trace, then every submodule's own ``training`` flag back (the wrapper is new)."""
    modes = {m: m.training for m in net.modules()}
    net.eval()
    try:
        yield
    finally:
        for m, mode in modes.items():
            m.training = mode


def trace_graph(net: nn.Module, args: list[Tensor], names: list[str], spec: Any, *, resolution: bool,
                force_resolution: bool, mult: int, opset: int | None, class_name: str, notes: list[str]
                ) -> tuple[Any, Any, bool]:
    """``(torch reference output as numpy, ONNX proto, resolution is dynamic)``.

    ``spec(res)`` gives the dynamic shapes; with ``resolution`` a dynamic-resolution export is tried first and
    checked at another batch and size; a failure raises when ``force_resolution`` (the user asked for it), else
    falls back to a static resolution with a note.
    """
    with eval_mode(net), torch.no_grad():
        ref = net(*args).float().cpu().numpy()
        proto, reason = None, None
        if resolution:  # trust, but check at another resolution and batch size
            try:
                proto = torch_export(net, tuple(args), names, spec(True), opset)
                reason = check_other_resolution(net, proto, args, names, mult)
            except Specialised as e:
                reason = str(e)
            if reason and force_resolution:
                raise RuntimeError(f"dynamic resolution failed for {class_name}: {reason}")
            if reason:
                notes.append(f"static resolution: a dynamic-resolution export failed ({reason})")
                resolution = False
            elif not have_ort():
                notes.append("dynamic resolution not verified against torch (onnxruntime not installed)")
        if not resolution:
            proto = torch_export(net, tuple(args), names, spec(False), opset)
    return ref, proto, resolution
