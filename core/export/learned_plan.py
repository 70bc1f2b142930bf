"""ONNX export of a denoiser with a learned-cache *plan* on (``core.cache.learned.LearnedPlanCache``: a block range and
a predictor per call of the run), so the torch-free runtime (``core.export.cached_runtime.OnnxLearnedPlanDenoiser``)
samples with the plan exactly as core does.

- the *full* graph ``<path>``: ``(x_in, timestep, cond...) -> (model_output, range_input, range_residual_<b>...)``:
  the hidden state entering block ``head_blocks`` and, for every end ``b`` of a planned range, the residual
  ``h_b - h_head`` of ``[head_blocks, b)`` -- what ``LearnedPlanCache.update`` / ``observe`` keep from a computed call;
- one *partial* graph ``<stem>.skip<k>.onnx`` per planned call ``k``: the range ``[head_blocks, head_blocks + plan[k])``
  replaced by call ``k``'s predictor (Eq. (1) of ``core.cache.learned.predictor``; a call without one: plain reuse,
  exported as the zero-initial predictor, which returns ``r_c`` exactly), the rest of the network as is, with the cache
  state ``(range_input_c, range_residual_c, sigma, sigma_c)`` as extra inputs (``core.export.learned_cache``'s
  partial graph);
- the full graph's metadata ``learned_cache_plan`` entry: the plan, the partial graphs' file names, which residual
  output feeds which call.

Subset as ``export_learned_cache``: a ``Denoiser`` without folded CFG (a student with guidance distilled in) whose
block stack is one list of blocks returning the hidden tensor; fp32, dynamic batch, static resolution.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..cache.learned import LearnedPlanCache, ResidualPredictor
from . import describe
from .examples import example_inputs
from .exporter import ExportResult, save_model
from .graphs import NetworkGraph
from .learned_cache import (
    CACHE_INPUTS,
    PartialGraph,
    _cache_inputs_metadata,
    _swapped,
    export_metadata,
    unwrap_student,
    verified_error,
)
from .trace import OUTPUT, condition_dims, dynamic_shapes, eval_mode, torch_export
from .verify import ort_run, rel_err

__all__ = ["RANGE_INPUT", "export_learned_plan", "plan_partial_path", "residual_output"]

#: the full graph's output holding the hidden state entering the planned ranges
RANGE_INPUT = "range_input"


def residual_output(end: int) -> str:
    """The full graph's output holding the residual of the range ending at block ``end`` (exclusive)."""
    return f"range_residual_{end}"


def plan_partial_path(path: str | Path, call: int) -> Path:
    """Call ``call``'s partial graph next to the full graph ``path``: ``<stem>.skip<call>.onnx``."""
    p = Path(path)
    return p.with_name(f"{p.stem}.skip{call}.onnx")


class _PlanTap(nn.Module):
    """A block run unchanged that records its input (``start``) and/or, as ``ends`` residual, its output minus the
    recorded input in ``box``."""

    def __init__(self, block: nn.Module, box: dict[Any, Tensor], start: bool, end: int | None) -> None:
        super().__init__()
        self.block, self.box, self.start, self.end = block, box, start, end

    def forward(self, hidden_states: Tensor, *args: Any, **kwargs: Any) -> Any:
        if self.start:
            self.box["h"] = hidden_states
        out = self.block(hidden_states, *args, **kwargs)
        if self.end is not None:
            self.box[self.end] = (out[0] if isinstance(out, tuple) else out) - self.box["h"]
        return out


class PlanFullGraph(nn.Module):
    """``(x_in, timestep, *conds) -> (model_output, range_input, *range_residual_<b>)`` for ``b`` in ``ends``."""

    def __init__(self, net: NetworkGraph, blocks: nn.ModuleList, head: int, ends: Sequence[int]) -> None:
        super().__init__()
        self.net, self.blocks, self.head, self.ends = net, blocks, head, sorted(set(ends))
        self.box: dict[Any, Tensor] = {}

    def forward(self, x_in: Tensor, timestep: Tensor, *conds: Tensor) -> tuple[Tensor, ...]:
        taps: dict[int, nn.Module] = {}
        for b in self.ends:
            taps[b - 1] = _PlanTap(self.blocks[b - 1], self.box, b - 1 == self.head, b)
        if self.head not in taps:
            taps[self.head] = _PlanTap(self.blocks[self.head], self.box, True, None)
        try:
            with _swapped(self.blocks, taps):
                out = self.net(x_in, timestep, *conds)
            return (out, self.box["h"], *(self.box[b] for b in self.ends))
        finally:
            self.box.clear()


def _call_predictor(cache: LearnedPlanCache, call: int, dim: int) -> nn.Module:
    """Call ``call``'s predictor, or plain reuse as the zero-initial predictor (``r_c`` exactly; its rank-1 MLP keeps
    every cache input in the graph)."""
    pred = cache.predictors.get(call)
    return pred if pred is not None else ResidualPredictor(dim, rank=1, mix=False).eval()


def export_learned_plan(
    denoiser: nn.Module,
    cache: LearnedPlanCache,
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
    """Export ``denoiser``'s network with the plan cache ``cache`` on: the full graph at ``path``, one partial graph
    per planned call at ``plan_partial_path(path, k)`` (see the module docstring).

    Args:
        denoiser: a fewstep ``Denoiser`` (no CFG folded in; a student with guidance distilled in is one).
        cache: the ``LearnedPlanCache`` (plan, predictors, ``head_blocks``) to export with it.
        path: the full graph's ``.onnx`` file; the partial graphs are written next to it.
        sample_shape, cond, batch, sampler, schedule, steps, timesteps, sigmas, opset, name: as ``export_onnx``.
        verify: compare every graph with torch on onnxruntime (CPU).
        overwrite: replace existing files (``False``: ``FileExistsError`` before any work). Each file is written
            atomically; the partial graphs first, so the full graph never names a missing file.

    Returns:
        the full graph's ``ExportResult`` (``max_rel_error``: the largest of all graphs' errors).
    """
    from ..checks import check_opset
    from ..io import check_new_file

    if not isinstance(cache, LearnedPlanCache):
        raise TypeError(f"export_learned_plan needs a core.cache.learned.LearnedPlanCache, got "
                        f"{type(cache).__name__}")
    if not cache.plan:
        raise ValueError("export_learned_plan: the plan skips no call; export the network with export_onnx instead")
    path = check_new_file(path, overwrite)
    skip_files = {k: check_new_file(plan_partial_path(path, k), overwrite) for k in cache.plan}
    check_opset(opset)
    den, module, ms, blocks = unwrap_student(denoiser, batch)
    head = cache.block_range(len(blocks), float("inf"))[0]  # validates the plan against the block count
    ends = {k: head + n for k, n in cache.plan.items()}
    notes: list[str] = ["static resolution: the learned cache's predictors are sized to the token grid"]
    ex = example_inputs(module, ms, sample_shape, cond, batch)
    sampler_meta = describe.sampler_metadata(ms, sampler, schedule, steps, timesteps, sigmas, None, ex.cond_names)
    net = NetworkGraph(den, ex.cond_names)
    full = PlanFullGraph(net, blocks, head, list(ends.values()))
    out_names = (OUTPUT, RANGE_INPUT, *(residual_output(b) for b in full.ends))
    cond_dims = condition_dims(None)
    part_names = [*ex.names, *CACHE_INPUTS]

    with eval_mode(full), torch.no_grad():
        ref_full = [t.float().cpu().numpy() for t in full(*ex.args)]
        h = torch.as_tensor(ref_full[1])
        res = {b: torch.as_tensor(ref_full[2 + i]) for i, b in enumerate(full.ends)}
        sig = ms.sigma(ex.args[1].float().cpu())
        dyn = dynamic_shapes(ex.cond_names, cond_dims, batch=True, resolution=False, mult=1, n_extra=0)
        proto_full = torch_export(full, tuple(ex.args), ex.names, dyn, opset, outputs=out_names)
        parts: dict[int, tuple[Any, list[Tensor], np.ndarray]] = {}
        for k, b in ends.items():
            part = PartialGraph(net, blocks, head, b, _call_predictor(cache, k, int(h.shape[-1])))
            with eval_mode(part):
                cache_args = [0.9 * h, res[b], sig, sig * 1.5]  # a previous compute at a larger sigma, a moved input
                args = [*ex.args, *(t.to(ex.device) for t in cache_args)]
                ref = part(*args).float().cpu().numpy()
                dyn = dynamic_shapes(ex.cond_names, cond_dims, batch=True, resolution=False, mult=1, n_extra=4)
                parts[k] = (torch_export(part, tuple(args), part_names, dyn, opset), args, ref)

    err = None
    if verify:
        feeds = ex.feeds()
        errs = [rel_err(o, ref_full[i]) for i, o in enumerate(ort_run(proto_full, feeds, n) for n in out_names)
                if o is not None]
        for proto, args, ref in parts.values():
            o = ort_run(proto, {n: t.cpu().numpy() for n, t in zip(part_names, args)}, OUTPUT)
            if o is not None:
                errs.append(rel_err(o, ref))
        err = verified_error(errs, notes, "learned-cache plan export")

    inputs_meta, common = export_metadata(den, module, ms, ex, sampler_meta, notes, name)
    plan_meta = {"plan": {str(k): n for k, n in cache.plan.items()}, "head_blocks": head, "num_blocks": len(blocks),
                 "range_input": RANGE_INPUT, "residual_outputs": {str(k): residual_output(b) for k, b in ends.items()},
                 "partials": {str(k): f.name for k, f in skip_files.items()}, "cache_inputs": list(CACHE_INPUTS),
                 "predictors": {str(k): p.config() for k, p in cache.predictors.items()}, "identity": cache.identity}
    for k, (proto, _, _) in parts.items():
        meta_part = describe.network_metadata(inputs=inputs_meta + _cache_inputs_metadata(), proto=proto,
                                              graph="learned_cache_partial", **common)
        describe.attach_metadata(proto, meta_part, str(skip_files[k]), f"fewstep learned-cache plan partial graph of "
                                 f"{common['name']}: call {k}, blocks [{head}, {ends[k]}) predicted")
    meta = describe.network_metadata(inputs=inputs_meta, proto=proto_full, learned_cache_plan=plan_meta, **common)
    describe.attach_metadata(proto_full, meta, str(path), f"fewstep export of {common['name']} with its learned-cache "
                             "plan: network (x_in, timestep, cond) -> native output, range input, range residuals")
    for k, (proto, _, _) in parts.items():
        save_model(proto, skip_files[k], None, overwrite)
    save_model(proto_full, path, None, overwrite)
    return ExportResult(path=path, metadata=meta, max_rel_error=err, notes=notes)
