"""ONNX export of a denoiser with its learned cache on (DisCa-style, ``core.cache.learned``): two graphs and a step
plan, so the torch-free runtime (``core.export.cached_runtime``) samples with the cache exactly as core does.

- the *full* graph ``<path>``: the network, ``(x_in, timestep, cond...) -> (model_output, range_input,
  range_residual)``; the two extra outputs are the hidden state entering the cached block range ``[a, b)`` and the
  range's residual ``h_b - h_a``, i.e. what ``LearnedCache.update`` keeps;
- the *partial* graph ``<stem>.skip.onnx``: the head blocks, the predictor in place of the range (Eq. (1) of
  ``core.cache.learned.predictor``: ``h_a + predictor(h_a, r_c, h_a(c), sigma_t, sigma_c)``), the tail blocks and the
  output layers, with the cache state ``(range_input_c, range_residual_c, sigma, sigma_c)`` as extra inputs;
- the full graph's metadata ``learned_cache`` entry: the skip plan (call indices of a run whose range is predicted),
  the block range and the partial graph's file name.

The graphs are traced with the range's blocks swapped for taps (full) or for the predictor and pass-throughs
(partial) inside one trace, then restored; the model itself is not changed. Subset: a ``Denoiser`` (a student with
guidance distilled in, or a teacher without folded CFG) whose block stack is one list of blocks returning the hidden
tensor (``core.cache.layouts``: the embedded DiT, PixArt, Wan); CFG folded into the graph is not supported yet.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..cache.layouts import lookup_layout, resolve_attr
from ..cache.learned import LearnedCache
from . import describe
from .examples import class_info, example_inputs, resolution_multiple
from .exporter import ExportResult, check_model, save_model
from .graphs import NetworkGraph, unwrap_denoiser
from .trace import OUTPUT, condition_dims, dynamic_shapes, eval_mode, torch_export
from .verify import ort_run, rel_err

__all__ = ["CACHE_INPUTS", "FEATURE_OUTPUTS", "export_learned_cache", "partial_path"]

#: extra outputs of the full graph: the hidden state entering the cached range, the range's residual
FEATURE_OUTPUTS = ("range_input", "range_residual")
#: extra inputs of the partial graph: the state the learned cache keeps from its last full compute, and the sigmas
CACHE_INPUTS = ("range_input_c", "range_residual_c", "sigma", "sigma_c")


def partial_path(path: str | Path) -> Path:
    """The partial graph's file next to the full graph ``path``: ``<stem>.skip.onnx``."""
    p = Path(path)
    return p.with_name(f"{p.stem}.skip.onnx")


def block_list(net: nn.Module) -> nn.ModuleList:
    """The one block list of ``net``'s declared diffusers layout; refuses layouts the export does not cover."""
    layout = lookup_layout("diffusers", net)
    if layout is None or len(layout.lists) != 1 or layout.lists[0].returns is not None:
        raise TypeError(f"the learned-cache ONNX export covers networks with one block list returning the hidden "
                        f"tensor (the embedded DiT, PixArt, Wan); {type(net).__name__} has "
                        f"{'no declared layout' if layout is None else 'another block layout'}")
    return resolve_attr(net, layout.lists[0].attr)


class _Tap(nn.Module):
    """A block that records its input (``start``) and/or output (``end``) in ``box`` while running unchanged."""

    def __init__(self, block: nn.Module, box: dict[str, Tensor], start: bool, end: bool) -> None:
        super().__init__()
        self.block, self.box, self.start, self.end = block, box, start, end

    def forward(self, hidden_states: Tensor, *args: Any, **kwargs: Any) -> Any:
        if self.start:
            self.box["h"] = hidden_states
        out = self.block(hidden_states, *args, **kwargs)
        if self.end:
            self.box["r"] = (out[0] if isinstance(out, tuple) else out) - self.box["h"]
        return out


class _Predict(nn.Module):
    """The cached range's first block replaced by the predictor: ``h + predictor(h, r_c, h_c, sigma_t, sigma_c)``
    (the cache state comes from ``box``, set by the partial graph's forward)."""

    def __init__(self, predictor: nn.Module, box: dict[str, Tensor]) -> None:
        super().__init__()
        self.predictor, self.box = predictor, box

    def forward(self, hidden_states: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        b = self.box
        return hidden_states + self.predictor(hidden_states, b["r_c"], b["h_c"], b["sigma"], b["sigma_c"])


class _Pass(nn.Module):
    def forward(self, hidden_states: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        return hidden_states


@contextlib.contextmanager
def _swapped(blocks: nn.ModuleList, replacement: dict[int, nn.Module]) -> Iterator[None]:
    """Blocks ``i`` replaced by ``replacement[i]`` inside the block, the originals back afterwards."""
    orig = {i: blocks[i] for i in replacement}
    try:
        for i, m in replacement.items():
            blocks[i] = m
        yield
    finally:
        for i, m in orig.items():
            blocks[i] = m


class FullGraph(nn.Module):
    """``(x_in, timestep, *conds) -> (model_output, range_input, range_residual)`` (see the module docstring)."""

    def __init__(self, net: NetworkGraph, blocks: nn.ModuleList, a: int, b: int) -> None:
        super().__init__()
        self.net, self.blocks, self.a, self.b = net, blocks, a, b
        self.box: dict[str, Tensor] = {}

    def forward(self, x_in: Tensor, timestep: Tensor, *conds: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        a, last = self.a, self.b - 1
        taps = {a: _Tap(self.blocks[a], self.box, True, a == last)}
        if last != a:
            taps[last] = _Tap(self.blocks[last], self.box, False, True)
        with _swapped(self.blocks, taps):
            out = self.net(x_in, timestep, *conds)
        h, r = self.box.pop("h"), self.box.pop("r")
        return out, h, r


class PartialGraph(nn.Module):
    """``(x_in, timestep, *conds, range_input_c, range_residual_c, sigma, sigma_c) -> model_output``: the range
    ``[a, b)`` predicted (see the module docstring)."""

    def __init__(self, net: NetworkGraph, blocks: nn.ModuleList, a: int, b: int, predictor: nn.Module) -> None:
        super().__init__()
        self.net, self.blocks, self.a, self.b = net, blocks, a, b
        self.box: dict[str, Tensor] = {}
        self.predict = _Predict(predictor, self.box)

    def forward(self, x_in: Tensor, timestep: Tensor, *rest: Tensor) -> Tensor:
        conds, (h_c, r_c, sigma, sigma_c) = rest[:-4], rest[-4:]
        self.box.update(h_c=h_c, r_c=r_c, sigma=sigma, sigma_c=sigma_c)
        repl: dict[int, nn.Module] = {self.a: self.predict, **{i: _Pass() for i in range(self.a + 1, self.b)}}
        try:
            with _swapped(self.blocks, repl):
                return self.net(x_in, timestep, *conds)
        finally:
            self.box.clear()


def _cache_inputs_metadata() -> list[dict[str, Any]]:
    return [{"name": n, "role": "cache", "dtype": "float32"} for n in CACHE_INPUTS]


def unwrap_student(denoiser: nn.Module, batch: int) -> tuple[Any, nn.Module, Any, nn.ModuleList]:
    """``(denoiser, network, model_sampling, blocks)`` of a ``Denoiser`` the learned-cache exports take: no folded
    guidance (a student with CFG distilled in), a network ``check_model`` accepts, one list of blocks."""
    den, cfg, adapted = unwrap_denoiser(denoiser)
    if cfg is not None or adapted is not None:
        raise TypeError("the learned-cache ONNX export takes a Denoiser without folded guidance (a student with CFG "
                        "distilled in); CFG folded into the graph is not supported with the learned cache yet")
    module, ms = den.model, den.model_sampling
    check_model(module, ms, batch)
    return den, module, ms, block_list(module)


def verified_error(errs: list[float], notes: list[str], what: str) -> float | None:
    """The largest onnxruntime-vs-torch relative error of an export's graphs (``None`` and a note when onnxruntime
    is not installed); raises when it is not finite or above 1e-4."""
    err = max(errs) if errs else None
    if err is None:
        notes.append("not verified on onnxruntime (not installed)")
    elif not np.isfinite(err) or err > 1e-4:
        raise RuntimeError(f"{what}: onnxruntime differs from torch by {err:.2e} (relative)")
    return err


def export_metadata(den: Any, module: nn.Module, ms: Any, ex: Any, sampler_meta: Any, notes: list[str],
                    name: str | None) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The graph inputs' metadata and the fields every graph of a learned-cache export shares (fp32, dynamic batch,
    static resolution, no folded guidance)."""
    cond_dims = condition_dims(None)
    inputs_meta = describe.inputs_metadata(ex.names, ex.args, None, None)
    conds_meta = describe.conditions_metadata(inputs_meta, ex.args, cond_dims, True, class_info(module, None), None)
    common = dict(name=name or den.name, output=OUTPUT, sample_shape=ex.shape, model_sampling=ms.config(),
                  dynamic={"batch": True, "resolution": False, "multiple": resolution_multiple(module)},
                  sampler=sampler_meta, conditions=conds_meta, guidance=None, fp16=False, notes=notes)
    return inputs_meta, common


def export_learned_cache(
    denoiser: nn.Module,
    cache: LearnedCache,
    path: str | Path,
    *,
    sample_shape: Sequence[int] | None = None,
    cond: Mapping[str, Tensor] | None = None,
    batch: int = 2,
    sampler: str | None = None,
    schedule: str | None = None,
    steps: int | None = None,
    timesteps: Sequence[float] | None = None,
    sigmas: Sequence[float] | Tensor | None = None,
    opset: int | None = None,
    verify: bool = True,
    name: str | None = None,
    overwrite: bool = True,
) -> ExportResult:
    """Export ``denoiser``'s network with ``cache`` (a ``LearnedCache``) on: the full graph at ``path``, the partial
    graph at ``partial_path(path)`` (see the module docstring); fp32, dynamic batch, static resolution.

    Args:
        denoiser: a fewstep ``Denoiser`` (no CFG folded in; a student with guidance distilled in is one).
        cache: the ``LearnedCache`` (its predictor, skip plan and block range) to export with it.
        path: the full graph's ``.onnx`` file; the partial graph is written next to it.
        sample_shape, cond, batch, sampler, schedule, steps, timesteps, sigmas, opset, name: as ``export_onnx``.
        verify: compare both graphs with torch on onnxruntime (CPU).
        overwrite: replace existing files (``False``: ``FileExistsError`` before any work). Each file is written
            atomically; the partial graph first, so the full graph never names a missing file.

    Returns:
        the full graph's ``ExportResult`` (``max_rel_error``: the larger of both graphs' errors).
    """
    from ..checks import check_opset
    from ..io import check_new_file

    if not isinstance(cache, LearnedCache):
        raise TypeError(f"export_learned_cache needs a core.cache.learned.LearnedCache, got {type(cache).__name__}")
    path = check_new_file(path, overwrite)
    skip_file = check_new_file(partial_path(path), overwrite)
    check_opset(opset)
    den, module, ms, blocks = unwrap_student(denoiser, batch)
    a, b, _ = cache.block_range(len(blocks), float("inf"))
    notes: list[str] = ["static resolution: the learned cache's predictor is sized to the token grid"]
    ex = example_inputs(module, ms, sample_shape, cond, batch)
    sampler_meta = describe.sampler_metadata(ms, sampler, schedule, steps, timesteps, sigmas, None, ex.cond_names)
    net = NetworkGraph(den, ex.cond_names)
    full, part = FullGraph(net, blocks, a, b), PartialGraph(net, blocks, a, b, cache.predictor)
    cond_dims = condition_dims(None)

    with eval_mode(full), eval_mode(part), torch.no_grad():
        ref_full = [t.float().cpu().numpy() for t in full(*ex.args)]
        h, r = torch.as_tensor(ref_full[1]), torch.as_tensor(ref_full[2])
        sig = ms.sigma(ex.args[1].float().cpu())
        cache_args = [0.9 * h, r, sig, sig * 1.5]  # a previous compute at a larger sigma, a moved input
        part_args = [*ex.args, *(t.to(ex.device) for t in cache_args)]
        ref_part = part(*part_args).float().cpu().numpy()
        dyn = dynamic_shapes(ex.cond_names, cond_dims, batch=True, resolution=False, mult=1, n_extra=0)
        proto_full = torch_export(full, tuple(ex.args), ex.names, dyn, opset, outputs=(OUTPUT, *FEATURE_OUTPUTS))
        dyn = dynamic_shapes(ex.cond_names, cond_dims, batch=True, resolution=False, mult=1, n_extra=4)
        part_names = [*ex.names, *CACHE_INPUTS]
        proto_part = torch_export(part, tuple(part_args), part_names, dyn, opset)

    err = None
    if verify:
        feeds = ex.feeds()
        errs = [rel_err(o, ref) for o, ref in ((ort_run(proto_full, feeds, n), ref_full[i])
                                                for i, n in enumerate((OUTPUT, *FEATURE_OUTPUTS))) if o is not None]
        pfeeds = {n: t.cpu().numpy() for n, t in zip(part_names, part_args)}
        o = ort_run(proto_part, pfeeds, OUTPUT)
        if o is not None:
            errs.append(rel_err(o, ref_part))
        err = verified_error(errs, notes, "learned-cache export")

    inputs_meta, common = export_metadata(den, module, ms, ex, sampler_meta, notes, name)
    plan = {"skip_steps": sorted(cache.skip_steps), "block_range": [a, b], "num_blocks": len(blocks),
            "partial": skip_file.name, "feature_outputs": list(FEATURE_OUTPUTS), "cache_inputs": list(CACHE_INPUTS),
            "predictor": cache.predictor.config(), "identity": cache.identity}
    meta_part = describe.network_metadata(inputs=inputs_meta + _cache_inputs_metadata(),
                                          proto=proto_part, graph="learned_cache_partial", **common)
    describe.attach_metadata(proto_part, meta_part, str(skip_file), f"fewstep learned-cache partial graph of "
                             f"{common['name']}: blocks [{a}, {b}) predicted")
    meta = describe.network_metadata(inputs=inputs_meta, proto=proto_full, learned_cache=plan, **common)
    describe.attach_metadata(proto_full, meta, str(path), f"fewstep export of {common['name']} with its learned "
                             f"cache: network (x_in, timestep, cond) -> native output, range input, range residual")
    save_model(proto_part, skip_file, None, overwrite)
    save_model(proto_full, path, None, overwrite)
    return ExportResult(path=path, metadata=meta, max_rel_error=err, notes=notes)
