"""Apply a cache to a model as a removable patch: no weight copies, no copied model forwards.

``apply_cache(model, cache)`` returns a ``CacheHandle`` (``.remove()``, or use it as a context manager):

- ``StepCache`` on a fewstep ``Denoiser`` (or a ``CFGDenoiser`` around one) wraps the denoiser's ``call`` adapter
  -- the one place where the network sees ``(x_in, timestep, **cond)`` and returns its native output -- and takes
  sigma from a forward pre-hook on the denoiser; on a bare network it wraps the module's ``forward`` (sigma from
  its model sampling's ``sigma(timestep)``). Skipped steps never enter the network.
- ``FirstBlockCache`` / ``DeltaDiTCache`` on a diffusers transformer wrap each block of its declared block layout
  (``core.cache.layouts``) and hand it to the block-range runner (``core.cache.runner``, the same one ComfyUI's
  wrappers call): the block at the start of the cached range decides, a skip returns ``input + cached residual``
  there and the rest of the range passes its input through; a forward pre-hook on the transformer starts each call
  (sigma, block range) and a forward hook ends it.

Wrapping a module's ``forward`` sets an instance attribute (diffusers' ``HookRegistry`` does the same); removing the
handle restores the previous one and drops every cached tensor (``cache.reset()``). Handles must be removed in the
reverse order of application when several patches wrap the same module.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .caches import BlockCache, CFGBranchCache, StepCache
from .identity import find_denoiser, model_fingerprint
from .layouts import BlockIO, BlockLayout, diffusers_layout, layout_blocks
from .options import CacheConfigError
from .runner import BlockRangeRunner
from .state import ResidualCache
from .tensors import sigma_value


# ------------------------------------------------------------------------------------------------ patching
def patch_attribute(obj: Any, name: str, value: Any) -> Callable[[], None]:
    """Set ``obj.name = value`` on the instance and return a function that restores the previous state."""
    had = name in vars(obj)
    prev = vars(obj).get(name)
    setattr(obj, name, value)

    def restore() -> None:
        if vars(obj).get(name) is not value:
            raise RuntimeError(f"{type(obj).__name__}.{name} was patched again after the cache was applied; remove "
                               "the later patch first (handles must be removed in reverse order)")
        if had:
            setattr(obj, name, prev)
        else:
            delattr(obj, name)

    return restore


class CacheHandle:
    """A cache applied to a model. ``remove()`` (or leaving the ``with`` block) restores the model exactly and
    drops every cached tensor. ``key`` is the branch key the hooks pass to the cache (default ``None``)."""

    def __init__(self, cache: ResidualCache, target: nn.Module, key: Hashable = None) -> None:
        self.cache = cache
        self.target = target
        self.key = key
        self._undo: list[Callable[[], None]] = []
        self.removed = False
        self.pending_sigma: float | None = None
        self.model_name: str | None = None
        self.config_hash: str | None = None

    @property
    def stats(self) -> dict[str, int]:
        return self.cache.stats

    def take_sigma(self, fallback: Callable[[], float]) -> float:
        s, self.pending_sigma = self.pending_sigma, None
        return fallback() if s is None else s

    def remove(self) -> None:
        if self.removed:
            return
        errors = []
        for undo in reversed(self._undo):
            try:
                undo()
            except RuntimeError as e:  # keep restoring the rest, then report
                errors.append(e)
        self._undo.clear()
        self.removed = True
        self.cache.reset()
        _APPLIED.pop(id(self.cache), None)
        if errors:
            raise errors[0]

    def __enter__(self) -> CacheHandle:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()

    def __repr__(self) -> str:
        return f"CacheHandle({self.cache!r} on {type(self.target).__name__}, removed={self.removed})"


_APPLIED: dict[int, CacheHandle] = {}


# ------------------------------------------------------------------------------------------------ blocks
def _timestep_from_call(args: tuple, kwargs: dict) -> Tensor:
    t = kwargs.get("timestep", args[1] if len(args) > 1 else None)
    if t is None:
        raise TypeError("cannot find the timestep of the model call (keyword 'timestep' or second positional)")
    return torch.as_tensor(t)


def _apply_blocks(handle: CacheHandle, net: nn.Module, cache: BlockCache, ms: Any,
                  block_names: Sequence[str] | BlockLayout | None) -> None:
    """Wrap each block's forward so that the block-range runner decides, skips and records (see ``runner``)."""
    layout = diffusers_layout(net, block_names)
    blocks = layout_blocks(net, layout)
    runner = BlockRangeRunner(cache, len(blocks))
    if runner.source == "modulated":
        norm1 = getattr(blocks[0][2], layout.modulated or "", None) if layout.modulated else None
        if not isinstance(norm1, nn.Module):
            raise CacheConfigError(f"signal 'modulated' reads the first block's adaLN ({layout.modulated}), which "
                                   f"{type(blocks[0][2]).__name__} lacks; use indicator='first_block' or "
                                   "signal='range_input'")

        def grab(_m: nn.Module, _a: tuple, out: Any) -> None:
            runner.set_modulated(out[0] if isinstance(out, (tuple, list)) else out)

        handle._undo.append(norm1.register_forward_hook(grab).remove)

    def begin(_m: nn.Module, args: tuple, kwargs: dict) -> None:
        s = handle.take_sigma(lambda: float(ms.sigma(_timestep_from_call(args, kwargs).float()).reshape(-1)[0]))
        runner.begin(s, handle.key)

    def end(_m: nn.Module, _a: tuple, _k: dict, _o: Any) -> None:
        runner.end()

    handle._undo.append(net.register_forward_pre_hook(begin, with_kwargs=True).remove)
    handle._undo.append(net.register_forward_hook(end, with_kwargs=True, always_call=True).remove)

    def make_forward(i: int, io: BlockIO) -> Callable[..., Any]:
        orig = io.block.forward

        def forward(*args: Any, **kwargs: Any) -> Any:
            if not runner.active:  # called outside the transformer's forward: leave it alone
                return orig(*args, **kwargs)
            state = io.state_in(args, kwargs)
            skipped = runner.before(i, state, state[0])
            if skipped is not None:
                return io.make_output(skipped)
            out = orig(*args, **kwargs)
            runner.ran(i, io.state_out(out, state) if runner.wants_output(i) else None)
            return out

        return forward

    for i, (blist, _, block) in enumerate(blocks):
        handle._undo.append(patch_attribute(block, "forward", make_forward(i, BlockIO(block, blist, layout))))


# ------------------------------------------------------------------------------------------------ step level
def _rewrap(template: Any, tensor: Tensor) -> Any:
    if isinstance(template, Tensor):
        return tensor
    if isinstance(template, tuple):
        return (tensor,)
    if hasattr(template, "sample"):
        return type(template)(sample=tensor)
    raise TypeError(f"cannot rebuild a {type(template).__name__} output")


def _apply_step_module(handle: CacheHandle, net: nn.Module, cache: StepCache, ms: Any) -> None:
    from ..models.denoiser import unwrap_output

    orig = net.forward
    first = next(iter(inspect.signature(orig).parameters), None)
    template: dict[str, Any] = {}

    def forward(*args: Any, **kwargs: Any) -> Any:
        x = args[0] if args else kwargs.get(first) if first else None
        if not isinstance(x, Tensor):
            raise TypeError(f"StepCache cannot find the input tensor of {type(net).__name__}")
        s = handle.take_sigma(lambda: float(ms.sigma(_timestep_from_call(args, kwargs).float()).reshape(-1)[0]))
        if cache.should_compute(x, s, handle.key):
            out = orig(*args, **kwargs)
            template["out"] = out
            cache.update(x, unwrap_output(out), handle.key)
            return out
        return _rewrap(template["out"], cache.predict(x, handle.key))

    handle._undo.append(patch_attribute(net, "forward", forward))


def _apply_step_denoiser(handle: CacheHandle, den: nn.Module, cache: StepCache) -> None:
    ms = den.model_sampling
    orig_call = den.call

    def call(module: nn.Module, x_in: Tensor, t: Tensor, **cond: Any) -> Tensor:
        s = handle.take_sigma(lambda: float(ms.sigma(torch.as_tensor(t).float()).reshape(-1)[0]))
        if cache.should_compute(x_in, s, handle.key):
            out = orig_call(module, x_in, t, **cond)
            cache.update(x_in, out, handle.key)
            return out
        return cache.predict(x_in, handle.key)

    handle._undo.append(patch_attribute(den, "call", call))


def _apply_cfg_branch(handle: CacheHandle, cfg: nn.Module, cache: CFGBranchCache) -> None:
    """Wrap a ``CFGDenoiser``'s forward: the cache decides from the step's input; a computed step is the usual
    batched cond+uncond call, a skipped one runs the conditional rows only and reuses the branch difference."""
    from ..guidance.cfg import cfg_combine

    orig = cfg.forward

    def forward(x: Tensor, sigma: Tensor, **cond: Any) -> Tensor:
        if cfg.scale == 1.0 or cfg.cond_key not in cond:
            return orig(x, sigma, **cond)
        if cache.should_compute(x, sigma_value(sigma), handle.key, signal=x):
            out: list[Tensor] = []
            hook = cfg.denoiser.register_forward_hook(lambda _m, _a, o: out.append(o))
            try:
                result = orig(x, sigma, **cond)
            finally:
                hook.remove()
            cond_out, uncond_out = out[-1].chunk(2)
            cache.update(cond_out, uncond_out, handle.key)
            return result
        cond_out = cfg.denoiser(x, sigma, **cond)
        return cfg_combine(cond_out, cache.predict(cond_out, handle.key), cfg.scale)

    handle._undo.append(patch_attribute(cfg, "forward", forward))


# ------------------------------------------------------------------------------------------------ entry point
def apply_cache(
    model: nn.Module,
    cache: ResidualCache,
    *,
    model_sampling: Any = None,
    name: str | None = None,
    key: Hashable = None,
    blocks: Sequence[str] | BlockLayout | None = None,
    calibration_dirs: Sequence[Any] | None = None,
) -> CacheHandle:
    """Patch ``model`` with ``cache``; returns a handle to remove it (also a context manager).

    Args:
        model: a fewstep ``Denoiser`` (or a wrapper around one such as ``CFGDenoiser``), or a bare network (a
            diffusers model: then ``model_sampling`` defaults to ``diffusers_adapters.default_model_sampling``).
        cache: a ``StepCache``, ``FirstBlockCache``, ``DeltaDiTCache`` or ``CFGBranchCache`` (on a ``CFGDenoiser``),
            one model at a time.
        model_sampling: overrides the denoiser's (maps timesteps to sigma and ``start_percent`` to sigma).
        name: the model name used for calibration lookup (default: the denoiser's ``name``).
        key: branch key passed to the cache for every call made through this handle.
        blocks: ModuleList attribute names of the block stack (a subset of its declared layout, in order), or a
            ``BlockLayout`` for an architecture not in the registry (default: the declared layout).
        calibration_dirs: where to look for calibrations (default ``calibration.default_search_dirs()``).
    """
    if not isinstance(cache, ResidualCache):
        raise TypeError(f"cache must be a StepCache, FirstBlockCache or DeltaDiTCache, got {type(cache).__name__}")
    if id(cache) in _APPLIED and not _APPLIED[id(cache)].removed:
        raise RuntimeError(f"{cache!r} is already applied ({_APPLIED[id(cache)]!r}); remove that handle first or "
                           "create another cache object (state must not be shared between models)")
    den = find_denoiser(model)
    net = den.model if den is not None else model
    ms = model_sampling if model_sampling is not None else getattr(den, "model_sampling", None)
    if ms is None:
        from ..models.diffusers_adapters import default_model_sampling

        ms = default_model_sampling(net)
    model_name, config_hash = model_fingerprint(den if den is not None else net, ms, name)
    cache.bind(model_name, config_hash, ms, calibration_dirs)
    cache.reset()
    handle = CacheHandle(cache, model, key)
    handle.model_name, handle.config_hash = model_name, config_hash
    try:
        if den is not None:
            def grab_sigma(_m: nn.Module, args: tuple, kwargs: dict) -> None:
                s = args[1] if len(args) > 1 else kwargs.get("sigma")
                handle.pending_sigma = None if s is None else sigma_value(torch.as_tensor(s))

            handle._undo.append(den.register_forward_pre_hook(grab_sigma, with_kwargs=True).remove)
        if isinstance(cache, CFGBranchCache):
            from ..guidance.cfg import CFGDenoiser

            if not isinstance(model, CFGDenoiser):
                raise CacheConfigError(f"CFGBranchCache reuses the unconditional branch of classifier-free guidance: "
                                       f"apply it to a CFGDenoiser, got {type(model).__name__}")
            _apply_cfg_branch(handle, model, cache)
        elif isinstance(cache, BlockCache):
            _apply_blocks(handle, net, cache, ms, blocks)
        elif den is not None:
            _apply_step_denoiser(handle, den, cache)
        else:
            _apply_step_module(handle, net, cache, ms)
    except Exception:
        handle.remove()
        raise
    _APPLIED[id(cache)] = handle
    return handle
