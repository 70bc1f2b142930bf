"""Apply a cache to a model as a removable patch: no weight copies, no copied model forwards.

``apply_cache(model, cache)`` returns a ``CacheHandle`` (``.remove()``, or use it as a context manager):

- ``StepCache`` on a fewstep ``Denoiser`` (or a ``CFGDenoiser`` around one) wraps the denoiser's ``call`` adapter
  -- the one place where the network sees ``(x_in, timestep, **cond)`` and returns its native output -- and takes
  sigma from a forward pre-hook on the denoiser; on a bare network it wraps the module's ``forward`` (sigma from
  its model sampling's ``sigma(timestep)``). Skipped steps never enter the network.
- ``FirstBlockCache`` / ``DeltaDiTCache`` on a diffusers transformer wrap each block of its ``transformer_blocks``
  (then ``single_transformer_blocks``) ``ModuleList``: the block at the start of the cached range decides, a skip
  returns ``input + cached residual`` there and the rest of the range passes its input through; a forward pre-hook
  on the transformer starts each call (sigma, block range) and a forward hook ends it.

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

from .calibration import find_denoiser, model_fingerprint
from .policy import BlockCache, CacheConfigError, ResidualCache, StepCache, sigma_value

BLOCK_LISTS = ("transformer_blocks", "single_transformer_blocks")
#: dual-stream blocks that return ``(encoder_hidden_states, hidden_states)``
ENCODER_FIRST = frozenset({"FluxTransformerBlock", "FluxSingleTransformerBlock", "JointTransformerBlock",
                           "SD3SingleTransformerBlock", "ChromaTransformerBlock", "ChromaSingleTransformerBlock"})


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
def find_blocks(net: nn.Module, names: Sequence[str] | None = None, required: bool = True) -> list[nn.Module]:
    """The transformer blocks of ``net`` in execution order: its ``transformer_blocks`` then
    ``single_transformer_blocks`` ``ModuleList`` (or the given attribute names)."""
    blocks: list[nn.Module] = []
    for name in names or BLOCK_LISTS:
        lst = getattr(net, name, None)
        if isinstance(lst, nn.ModuleList):
            blocks.extend(lst)
        elif names is not None:
            raise CacheConfigError(f"{type(net).__name__} has no ModuleList {name!r}")
    if not blocks and required:
        raise CacheConfigError(
            f"{type(net).__name__} has no transformer_blocks ModuleList: block caches need a diffusers transformer "
            "(DiT, PixArt, SD3, Flux, ...); use StepCache for UNets and other models, or pass blocks=[list names]")
    return blocks


def _param_index(block: nn.Module, name: str) -> int | None:
    try:
        params = list(inspect.signature(block.forward).parameters)
    except (TypeError, ValueError):
        return None
    return params.index(name) if name in params else None


def hidden_from_inputs(block: nn.Module, args: tuple, kwargs: dict) -> Tensor:
    """The ``hidden_states`` a block was called with (keyword or first positional)."""
    h = kwargs.get("hidden_states", args[0] if args else None)
    if not isinstance(h, Tensor):
        raise TypeError(f"cannot find hidden_states in the call of {type(block).__name__}")
    return h


def _output_layout(block: nn.Module, out: Any, hidden_in: Tensor, enc_in: Tensor | None) -> tuple:
    """``("tensor",)`` or ``("tuple", n, hidden_index, encoder_index)`` for a block's return value."""
    if isinstance(out, Tensor):
        return ("tensor",)
    if isinstance(out, (tuple, list)) and len(out) == 2:
        if type(block).__name__ in ENCODER_FIRST:
            return ("tuple", 2, 1, 0)
        matches = [i for i, o in enumerate(out) if isinstance(o, Tensor) and o.shape == hidden_in.shape]
        if len(matches) == 1:
            return ("tuple", 2, matches[0], 1 - matches[0])
    if isinstance(out, (tuple, list)) and len(out) == 1 and isinstance(out[0], Tensor):
        return ("tuple", 1, 0, None)
    raise TypeError(f"cannot tell which output of {type(block).__name__} is the hidden state (got "
                    f"{type(out).__name__} of length {len(out) if isinstance(out, (tuple, list)) else '?'}); add the "
                    "class to fewstep.core.cache.hooks.ENCODER_FIRST or use StepCache")


def hidden_from_output(block: nn.Module, out: Any, hidden_in: Tensor) -> Tensor:
    """The hidden state in a block's return value."""
    layout = _output_layout(block, out, hidden_in, None)
    return out if layout[0] == "tensor" else out[layout[2]]


class _BlockIO:
    """Reads a block's (hidden, encoder_hidden) state from its call and writes a state back in its output format."""

    def __init__(self, block: nn.Module) -> None:
        self.block = block
        self.enc_pos = _param_index(block, "encoder_hidden_states")
        self.layout: tuple | None = None

    def state_in(self, args: tuple, kwargs: dict) -> tuple[Tensor, Tensor | None]:
        h = hidden_from_inputs(self.block, args, kwargs)
        enc = kwargs.get("encoder_hidden_states")
        if enc is None and self.enc_pos is not None and len(args) > self.enc_pos:
            enc = args[self.enc_pos]
        return h, enc if isinstance(enc, Tensor) else None

    def state_out(self, out: Any, state_in: tuple[Tensor, Tensor | None]) -> tuple[Tensor, Tensor | None]:
        if self.layout is None:
            self.layout = _output_layout(self.block, out, state_in[0], state_in[1])
        if self.layout[0] == "tensor":
            return out, state_in[1]
        _, _, hi, ei = self.layout
        return out[hi], (out[ei] if ei is not None else state_in[1])

    def make_output(self, state: tuple[Tensor, Tensor | None]) -> Any:
        if self.layout is None:
            raise RuntimeError(f"{type(self.block).__name__} was never run: cannot skip it yet")
        if self.layout[0] == "tensor":
            return state[0]
        _, n, hi, ei = self.layout
        out: list[Any] = [None] * n
        out[hi] = state[0]
        if ei is not None:
            out[ei] = state[1]
        return tuple(out)


class _Call:
    __slots__ = ("sigma", "range", "region", "compute", "head_in", "modulated", "range_in")

    def __init__(self, sigma: float, rng: tuple[int, int], region: Hashable) -> None:
        self.sigma = sigma
        self.range = rng
        self.region = region
        self.compute = True
        self.head_in: Tensor | None = None
        self.modulated: Tensor | None = None
        self.range_in: tuple | None = None


def _timestep_from_call(args: tuple, kwargs: dict) -> Tensor:
    t = kwargs.get("timestep", args[1] if len(args) > 1 else None)
    if t is None:
        raise TypeError("cannot find the timestep of the model call (keyword 'timestep' or second positional)")
    return torch.as_tensor(t)


def _apply_blocks(handle: CacheHandle, net: nn.Module, cache: BlockCache, ms: Any,
                  block_names: Sequence[str] | None) -> None:
    blocks = find_blocks(net, block_names)
    n = len(blocks)
    ios = [_BlockIO(b) for b in blocks]
    source = cache.signal_source()
    current: dict[str, _Call | None] = {"call": None}
    cache.block_range(n, float("inf"))  # validates head_blocks / num_blocks against this model now
    if source == "modulated":
        norm1 = getattr(blocks[0], "norm1", None)
        if not isinstance(norm1, nn.Module):
            raise CacheConfigError(f"signal 'modulated' reads the first block's norm1 (adaLN), which "
                                   f"{type(blocks[0]).__name__} lacks; use indicator='first_block' or "
                                   "signal='range_input'")

        def grab(_m: nn.Module, _a: tuple, out: Any) -> None:
            c = current["call"]
            if c is not None:
                c.modulated = out[0] if isinstance(out, (tuple, list)) else out

        handle._undo.append(norm1.register_forward_hook(grab).remove)

    def begin(_m: nn.Module, args: tuple, kwargs: dict) -> None:
        s = handle.take_sigma(lambda: float(ms.sigma(_timestep_from_call(args, kwargs).float()).reshape(-1)[0]))
        a, b, region = cache.block_range(n, s)
        if source == "modulated" and a < 1:
            raise CacheConfigError("signal 'modulated' needs the first block to run before the cached range")
        current["call"] = _Call(s, (a, b), region)

    def end(_m: nn.Module, _a: tuple, _k: dict, _o: Any) -> None:
        current["call"] = None

    handle._undo.append(net.register_forward_pre_hook(begin, with_kwargs=True).remove)
    handle._undo.append(net.register_forward_hook(end, with_kwargs=True, always_call=True).remove)

    def make_forward(i: int, block: nn.Module, io: _BlockIO) -> Callable[..., Any]:
        orig = block.forward

        def forward(*args: Any, **kwargs: Any) -> Any:
            c = current["call"]
            if c is None:  # called outside the transformer's forward: leave it alone
                return orig(*args, **kwargs)
            a, b = c.range
            if i == 0 and source == "head_residual":
                c.head_in = hidden_from_inputs(block, args, kwargs)
            if i == a:
                s_in = io.state_in(args, kwargs)
                signal = None
                if source == "head_residual":
                    signal = s_in[0] - c.head_in
                elif source == "modulated":
                    signal = c.modulated
                elif source == "range_input":
                    signal = s_in[0]
                c.compute = cache.should_compute(s_in, c.sigma, handle.key, signal=signal, region=c.region)
                if not c.compute:  # input + cached residual here, identity for the rest of the range
                    cache.stats["blocks_skipped"] += b - a
                    return io.make_output(cache.predict(s_in, handle.key))
                c.range_in = s_in
            elif a < i < b and not c.compute:
                return io.make_output(io.state_in(args, kwargs))
            out = orig(*args, **kwargs)
            cache.stats["blocks_run"] += 1
            if io.layout is None or (i == b - 1 and c.range_in is not None):
                s_out = io.state_out(out, io.state_in(args, kwargs))
                if i == b - 1 and c.range_in is not None:
                    cache.update(c.range_in, s_out, handle.key)
                    c.range_in = None
            return out

        return forward

    for i, (block, io) in enumerate(zip(blocks, ios)):
        handle._undo.append(patch_attribute(block, "forward", make_forward(i, block, io)))


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


# ------------------------------------------------------------------------------------------------ entry point
def apply_cache(
    model: nn.Module,
    cache: ResidualCache,
    *,
    model_sampling: Any = None,
    name: str | None = None,
    key: Hashable = None,
    blocks: Sequence[str] | None = None,
    calibration_dirs: Sequence[Any] | None = None,
) -> CacheHandle:
    """Patch ``model`` with ``cache``; returns a handle to remove it (also a context manager).

    Args:
        model: a fewstep ``Denoiser`` (or a wrapper around one such as ``CFGDenoiser``), or a bare network (a
            diffusers model: then ``model_sampling`` defaults to ``diffusers_adapters.default_model_sampling``).
        cache: a ``StepCache``, ``FirstBlockCache`` or ``DeltaDiTCache`` (one model at a time).
        model_sampling: overrides the denoiser's (maps timesteps to sigma and ``start_percent`` to sigma).
        name: the model name used for calibration lookup (default: the denoiser's ``name``).
        key: branch key passed to the cache for every call made through this handle.
        blocks: ModuleList attribute names of the block stack (default ``transformer_blocks``,
            ``single_transformer_blocks``).
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
        if isinstance(cache, BlockCache):
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
