"""Route a diffusers model's self-attention through block-sparse attention, as a patch (no weights copied).

``apply_sparse_attention(model, pattern)`` wraps the attention processor of every self-attention module
(``set_processor``, diffusers' own extension point) in a ``SparseAttnProcessor`` and returns a handle whose
``remove()`` puts the original processors back. The wrapper runs the model's own processor unchanged (projections,
norms, rotary embeddings, joint text+image concatenation) and replaces only its attention product: while it runs, a
``torch.overrides.TorchFunctionMode`` catches ``scaled_dot_product_attention`` (which diffusers' processors and its
native attention-dispatch backend call) and computes it with ``core.attention.sparse_attention``. One wrapper thus
serves DiT, PixArt, SD3, Flux, CogVideoX, Wan and the others without re-implementing their processors.

Calls that are not plain self-attention (an ``attn_mask``, ``is_causal``, dropout, or different query and key
lengths) pass through to dense SDPA. The spatial grid comes from the model's input (patch size from its config) and
the step counter from its ``timestep`` argument, both read by a forward pre-hook on the model; the remaining tokens
of a sequence are the global (text) tokens.

Per-call state is only the step counter; it resets when the timestep goes up (a new sampling run) or on
``reset()``. Guidance branches at the same timestep see the same step. Adaptive masks are recomputed on every call,
so nothing leaks between prompts or batch sizes.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from collections.abc import Callable, Iterator
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from .layout import TokenLayout
from .patterns import SparsePattern
from .schedule import SparsitySchedule
from .sparse import sparse_attention

__all__ = ["SparseAttention", "SparseAttnProcessor", "apply_sparse_attention", "infer_grid"]

logger = logging.getLogger("fewstep.attention")

_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")

#: whether the text / conditioning tokens come before the image tokens in the joint sequence
GLOBAL_FIRST = {
    "FluxTransformer2DModel": True,
    "CogVideoXTransformer3DModel": True,
    "SD3Transformer2DModel": False,
    "HunyuanVideoTransformer3DModel": False,
}


def _patch(cfg: Any, ndim: int) -> tuple[int, ...]:
    p = cfg.get("patch_size", 1) if hasattr(cfg, "get") else 1
    p = 1 if p is None else p
    if isinstance(p, int):
        return (p,) * ndim
    p = tuple(int(x) for x in p)
    return p[-ndim:] if len(p) >= ndim else (1,) * (ndim - len(p)) + p


def infer_grid(model: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[int, ...] | None:
    """The spatial token grid of a diffusers model call, from its input and ``config.patch_size`` (None when it
    cannot be told)."""
    name = type(model).__name__
    cfg = getattr(model, "config", {})
    if name.startswith("Flux"):
        ids = kwargs.get("img_ids")
        if isinstance(ids, Tensor) and ids.shape[-1] >= 3:
            ids = ids[0] if ids.ndim == 3 else ids
            h, w = int(ids[:, 1].max()) + 1, int(ids[:, 2].max()) + 1
            return (h, w) if h * w == ids.shape[0] else None
        return None
    x = kwargs.get("hidden_states", args[0] if args else None)
    if not isinstance(x, Tensor):
        return None
    if x.ndim == 4:  # (B, C, H, W)
        ph, pw = _patch(cfg, 2)
        return (x.shape[2] // ph, x.shape[3] // pw)
    if x.ndim == 5:
        if name.startswith("CogVideoX"):  # (B, F, C, H, W); frames patched only with patch_size_t
            pt = cfg.get("patch_size_t") or 1
            p = cfg.get("patch_size", 1) or 1
            return (x.shape[1] // pt, x.shape[3] // p, x.shape[4] // p)
        pt, ph, pw = _patch(cfg, 3)  # (B, C, F, H, W): Wan, HunyuanVideo, LTX-style 3D inputs
        return (x.shape[2] // pt, x.shape[3] // ph, x.shape[4] // pw)
    return None


def _timestep(args: tuple, kwargs: dict[str, Any]) -> float | None:
    t = kwargs.get("timestep", args[1] if len(args) > 1 else None)
    if isinstance(t, Tensor) and t.numel():
        return float(t.detach().flatten()[0])
    if isinstance(t, (int, float)):
        return float(t)
    return None


class _SDPARouter(TorchFunctionMode):
    """Sends ``scaled_dot_product_attention`` calls made inside one processor call to the handle."""

    def __init__(self, handle: SparseAttention, layer: int) -> None:
        super().__init__()
        self.handle, self.layer = handle, layer

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            out = self.handle._route(self.layer, args, kwargs)
            if out is not None:
                return out
        return func(*args, **kwargs)


class SparseAttnProcessor:
    """Wraps a diffusers attention processor; its attention product goes through ``SparseAttention._route``.

    diffusers reads ``processor.__call__``'s signature to decide which keyword arguments to pass, so the instance
    exposes the wrapped processor's signature there."""

    def __init__(self, inner: Any, handle: SparseAttention, layer: int, name: str = "") -> None:
        self.inner, self.handle, self.layer, self.name = inner, handle, layer, name
        try:
            sig = inspect.signature(inner.__call__)
        except (TypeError, ValueError):  # pragma: no cover - builtin callables
            sig = None

        def call(*args: Any, **kwargs: Any) -> Any:
            return self._run(*args, **kwargs)

        if sig is not None:
            call.__signature__ = sig  # type: ignore[attr-defined]
        self.__call__ = call  # what diffusers inspects; Python's call syntax uses the class method below

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._run(*args, **kwargs)

    def _run(self, *args: Any, **kwargs: Any) -> Any:
        if not self.handle._sparse_now(self.layer):
            return self.inner(*args, **kwargs)
        with _SDPARouter(self.handle, self.layer):
            return self.inner(*args, **kwargs)

    def __repr__(self) -> str:
        return f"SparseAttnProcessor(layer={self.layer}, inner={type(self.inner).__name__})"


def _is_self_attention(module: nn.Module) -> bool:
    return (hasattr(module, "set_processor") and hasattr(module, "processor") and module.processor is not None
            and not getattr(module, "is_cross_attention", False))


class SparseAttention:
    """A sparse-attention patch on a diffusers model (see module docstring). Create with ``apply_sparse_attention``.

    Attributes:
        pattern, schedule, backend, compile: how attention is computed.
        enabled: False makes every layer dense (the processors stay installed).
        step: the current sampling step (from the model's ``timestep``), or None before the first call.
        layers: the patched module names, by layer index.
        stats: per layer, ``{"calls", "sparse_calls", "mask"}`` (the block mask of the last sparse call);
            ``densities()`` summarises them.
    """

    def __init__(self, model: nn.Module, pattern: SparsePattern, schedule: SparsitySchedule | None = None,
                 backend: str = "auto", compile: bool | None = None, grid: tuple[int, ...] | None = None,
                 global_first: bool | None = None, track_steps: bool = True,
                 layer_filter: Callable[[str, nn.Module], bool] | None = None) -> None:
        if hasattr(model, "model_sampling") and isinstance(getattr(model, "model", None), nn.Module):
            model = model.model  # a fewstep Denoiser: patch the network inside
        self.model = model
        self.pattern = pattern
        self.schedule = schedule or SparsitySchedule()
        self.backend, self.compile = backend, compile
        self.fixed_grid = tuple(grid) if grid is not None else None
        self.global_first = GLOBAL_FIRST.get(type(self.model).__name__, True) if global_first is None \
            else global_first
        self.track_steps = track_steps
        self.layer_filter = layer_filter
        self.enabled = True
        self.step: int | None = None
        self._last_t: float | None = None
        self._grid: tuple[int, ...] | None = None
        self._originals: list[tuple[nn.Module, Any]] = []
        self._hook: Any = None
        self.layers: list[str] = []
        self.stats: dict[int, dict[str, Any]] = {}

    # ------------------------------------------------------------------------------------------- patch / unpatch
    def apply(self) -> SparseAttention:
        if self._originals:
            raise RuntimeError("sparse attention is already applied to this model; remove() it first")
        for name, module in self.model.named_modules():
            if not _is_self_attention(module) or (self.layer_filter and not self.layer_filter(name, module)):
                continue
            if isinstance(module.processor, nn.Module):
                logger.info("skipping %s: its processor %s has weights", name, type(module.processor).__name__)
                continue
            layer = len(self.layers)
            self._originals.append((module, module.processor))
            module.set_processor(SparseAttnProcessor(module.processor, self, layer, name))
            self.layers.append(name)
        if not self._originals:
            raise ValueError(f"{type(self.model).__name__} has no diffusers self-attention module to patch")
        self._hook = self.model.register_forward_pre_hook(self._pre_forward, with_kwargs=True)
        return self

    def remove(self) -> None:
        """Put the original processors back and drop the hook (the model is as before ``apply``)."""
        for module, proc in reversed(self._originals):
            module.set_processor(proc)
        self._originals.clear()
        self.layers.clear()
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def __enter__(self) -> SparseAttention:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()

    @contextlib.contextmanager
    def disabled(self) -> Iterator[None]:
        """Dense attention inside the block (e.g. the teacher pass of a distillation step)."""
        prev, self.enabled = self.enabled, False
        try:
            yield
        finally:
            self.enabled = prev

    # ------------------------------------------------------------------------------------------------ state
    def reset(self) -> None:
        """Forget the step counter and the grid (call at the start of a sampling run when timesteps are not
        monotone, e.g. under a custom sampler)."""
        self.step, self._last_t, self._grid = None, None, None
        self.stats.clear()

    def set_step(self, step: int | None) -> None:
        """Set the sampling step by hand (turns automatic tracking off)."""
        self.track_steps = False
        self.step = step

    def _pre_forward(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        self._grid = self.fixed_grid or infer_grid(module, args, kwargs)
        if not self.track_steps:
            return
        t = _timestep(args, kwargs)
        if t is None:
            return
        if self._last_t is None or t > self._last_t + 1e-6:
            self.step = 0  # first call, or the noise level went up: a new sampling run
        elif t < self._last_t - 1e-6:
            self.step = (self.step or 0) + 1
        self._last_t = t

    def _sparse_now(self, layer: int) -> bool:
        st = self.stats.setdefault(layer, {"calls": 0, "sparse_calls": 0})
        st["calls"] += 1
        return self.enabled and not self.schedule.is_dense(self.step, layer)

    # ------------------------------------------------------------------------------------------------ compute
    def layout_for(self, seq_len: int) -> TokenLayout:
        return TokenLayout.for_sequence(seq_len, self._grid, self.global_first)

    def _route(self, layer: int, args: tuple, kwargs: dict[str, Any]) -> Tensor | None:
        call = dict(zip(_SDPA_ARGS, args))
        call.update(kwargs)
        q, k, v = call.get("query"), call.get("key"), call.get("value")
        if not all(isinstance(t, Tensor) and t.ndim == 4 for t in (q, k, v)):
            return None
        if call.get("attn_mask") is not None or call.get("is_causal") or call.get("dropout_p", 0.0):
            logger.debug("layer %d: attention with a mask, causal or dropout stays dense", layer)
            return None
        if q.shape[2] != k.shape[2]:
            return None  # cross-attention
        out, mask = sparse_attention(q, k, v, self.pattern, self.layout_for(q.shape[2]), scale=call.get("scale"),
                                     backend=self.backend, compile=self.compile,
                                     dense_heads=self.schedule.dense_heads, return_mask=True)
        st = self.stats[layer]
        st["sparse_calls"] += 1
        st["mask"] = mask
        return out

    def densities(self) -> dict[int, float]:
        """Token-pair density of the last sparse call of each layer (1.0 for layers that only ran dense)."""
        return {layer: (st["mask"].density() if "mask" in st else 1.0) for layer, st in sorted(self.stats.items())}

    def __repr__(self) -> str:
        return (f"SparseAttention({type(self.model).__name__}, layers={len(self.layers)}, pattern={self.pattern}, "
                f"schedule={self.schedule}, backend={self.backend!r})")


def apply_sparse_attention(model: nn.Module, pattern: SparsePattern, schedule: SparsitySchedule | None = None, *,
                           backend: str = "auto", compile: bool | None = None, grid: tuple[int, ...] | None = None,
                           global_first: bool | None = None, track_steps: bool = True,
                           layer_filter: Callable[[str, nn.Module], bool] | None = None) -> SparseAttention:
    """Patch ``model``'s self-attention (a diffusers model, or a fewstep ``Denoiser`` wrapping one) with ``pattern``
    under ``schedule``; returns the handle (``remove()`` undoes it; also a context manager).

    Args:
        backend / compile: passed to ``fewstep.kernels.block_sparse_attention``.
        grid: the spatial token grid; default inferred from each call's input and the model's patch size.
        global_first: text tokens before (Flux, CogVideoX) or after (SD3) the image tokens; default by class.
        track_steps: count sampling steps from the ``timestep`` argument (for ``schedule.dense_steps``).
        layer_filter: ``(name, module) -> bool`` choosing which self-attention modules to patch.
    """
    return SparseAttention(model, pattern, schedule, backend, compile, grid, global_first, track_steps,
                           layer_filter).apply()
