"""Sparse-attention node: block-sparse self-attention from ``core.attention`` on any ComfyUI MODEL.

The node patches a clone of the MODEL through ComfyUI's own extension points, never its modules:

- ``transformer_options["optimized_attention_override"]``: ComfyUI's ``wrap_attn`` hands every
  ``optimized_attention(q, k, v, heads, mask=..., skip_reshape=..., transformer_options=...)`` call of the model
  (SD1.5 / SDXL UNets, Flux, SD3 MMDiT, Wan, the embedded digits DiT) to ``SparseAttentionOverride(func, *args,
  **kwargs)``, which computes it with ``core.attention.sparse_attention_packed`` (tokens reordered tile by tile, a
  block mask from the pattern, ``fewstep.kernels.block_sparse_attention`` with its backend dispatch) or falls
  through to ``func`` for calls it leaves dense;
- an ``APPLY_MODEL`` wrapper puts the latent's shape into ``transformer_options`` (the token grid of a DiT is the
  latent over its patch size; UNets report their feature-map shape as ``activations_shape`` themselves);
- an ``OUTER_SAMPLE`` wrapper resets the per-run statistics at the start of every sampling run.

Patterns (``core.attention.patterns``): adaptive top-k key blocks by pooled q.k with a keep ratio or a cumulative
softmax mass (SpargeAttn, Zhang et al. 2025; VSA's coarse stage), or Sliding Tile Attention (Zhang et al. 2025) over
the 2D/3D token grid with text tokens global, its window radius chosen per grid to match the requested density.
The first steps of a run stay dense (STA sec. 4: early steps lay out the global structure), as do masked calls and,
unless asked otherwise, cross-attention. A previous override on the MODEL is chained: it still sees every call and
is handed the sparse function as "the attention function" for the calls made sparse.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable
from typing import Any

import comfy.patcher_extension
from comfy_api.latest import io
from torch import Tensor

from ..core.attention import (
    SlidingTilePattern,
    SparsePattern,
    TokenLayout,
    TopKPattern,
    block_sparse_attention,
    latent_token_grid,
    radius_for_density,
    sparse_attention_packed,
    topk_block_mask,
)

CATEGORY = "fewstep/attention"
OVERRIDE_KEY = "optimized_attention_override"
#: transformer_options key of the latent shape (set by the APPLY_MODEL wrapper)
LATENT_SHAPE_KEY = "fewstep_sparse_latent_shape"
WRAPPER_KEY = "fewstep_sparse_attention"
PATTERNS = ("top_k", "top_k_mass", "sliding_tile")
BACKENDS = ("auto", "flex", "triton", "reference")
#: diffusion models whose joint sequence puts the text tokens after the image tokens (default: before)
TEXT_LAST = {"HunyuanVideo"}
#: positional parameters of ComfyUI's optimized_attention functions
_ARGS = ("q", "k", "v", "heads", "mask", "attn_precision", "skip_reshape", "skip_output_reshape")

log = logging.getLogger("fewstep")


def make_pattern(pattern: str, density: float, mass: float, block_size: int) -> Callable[[TokenLayout], SparsePattern]:
    """Validate the node's settings and return ``layout -> SparsePattern`` (the sliding tile's radius depends on the
    grid, so its pattern is made per layout)."""
    if pattern not in PATTERNS:
        raise ValueError(f"sparse attention: unknown pattern {pattern!r}; choose one of {list(PATTERNS)}")
    if not 0.0 < density <= 1.0:
        raise ValueError(f"sparse attention: density must be in (0, 1] (the fraction of key blocks attended), "
                         f"got {density}")
    if pattern == "top_k_mass" and not 0.0 < mass <= 1.0:
        raise ValueError(f"sparse attention: mass must be in (0, 1] (cumulative softmax mass kept), got {mass}")
    if block_size < 1:
        raise ValueError(f"sparse attention: block_size must be positive, got {block_size}")
    if pattern == "top_k":
        shared: SparsePattern = TopKPattern(keep_ratio=density, block_size=block_size)
        return lambda layout: shared
    if pattern == "top_k_mass":
        shared = TopKPattern(mass=mass, block_size=block_size)
        return lambda layout: shared
    tiles: dict[TokenLayout, SparsePattern] = {}

    def sliding(layout: TokenLayout) -> SparsePattern:
        if layout not in tiles:  # the window whose mask (over the pattern's own tile order) is closest to density
            tile = SlidingTilePattern(0, block_size).tile_for(layout)
            radius, _ = radius_for_density(layout, density, block_size, tile)
            tiles[layout] = SlidingTilePattern(radius, block_size, tile)
        return tiles[layout]

    return sliding


def _patch_size(diffusion_model: Any) -> Any:
    """The patch size a diffusion model reports (``patch_size`` on the model or on its inner network)."""
    for obj in (diffusion_model, getattr(diffusion_model, "dit", None)):
        p = getattr(obj, "patch_size", None)
        if isinstance(p, int) or (isinstance(p, (tuple, list)) and all(isinstance(x, int) for x in p)):
            return p
    return None


class SparseAttentionOverride:
    """ComfyUI ``optimized_attention_override``: block-sparse attention for the calls ``should_sparsify`` allows.

    ComfyUI deep-copies ``model_options`` when a MODEL is cloned; the override is shared by the clones instead
    (``__deepcopy__``): its settings never change and its statistics are reset by the ``OUTER_SAMPLE`` wrapper at
    the start of every sampling run.

    Attributes:
        stats: per sampling run, ``calls`` (every attention call of the model), ``sparse`` (computed sparsely),
            ``dense_step`` / ``masked`` / ``cross`` (fell through, by reason), ``no_grid`` (top-k over the sequence
            order), ``bypassed`` (a chained override did not call the sparse function) and ``density_sum`` (see
            ``mean_density``).
    """

    def __init__(self, pattern: str = "top_k", density: float = 0.5, mass: float = 0.9, block_size: int = 64,
                 dense_first_percent: float = 0.0, self_attention_only: bool = True, backend: str = "auto",
                 patch_size: Any = None, text_first: bool = True, model_name: str = "model",
                 inner: Callable[..., Any] | None = None) -> None:
        if not 0.0 <= dense_first_percent <= 100.0:
            raise ValueError(f"sparse attention: dense_first_percent must be in [0, 100], got {dense_first_percent}")
        if backend not in BACKENDS:
            raise ValueError(f"sparse attention: unknown backend {backend!r}; choose one of {list(BACKENDS)}")
        self.pattern_for = make_pattern(pattern, density, mass, block_size)
        self.pattern, self.density, self.mass, self.block_size = pattern, density, mass, int(block_size)
        self.dense_first_percent = float(dense_first_percent)
        self.self_attention_only, self.backend = bool(self_attention_only), backend
        self.patch_size, self.text_first, self.model_name = patch_size, bool(text_first), model_name
        self.inner = inner
        self.stats: dict[str, Any] = {}
        self._warned: set[str] = set()
        self.reset()

    def __deepcopy__(self, memo: dict) -> SparseAttentionOverride:
        return self

    def reset(self) -> None:
        """Forget the statistics (called at the start of each sampling run)."""
        self.stats = {"calls": 0, "sparse": 0, "dense_step": 0, "masked": 0, "cross": 0, "no_grid": 0,
                      "bypassed": 0, "density_sum": 0.0}

    @property
    def mean_density(self) -> float | None:
        """Mean token-pair density of this run's sparse calls (None before any)."""
        n = self.stats["sparse"]
        return self.stats["density_sum"] / n if n else None

    # -------------------------------------------------------------------------------------------------- schedule
    def dense_steps(self, n_steps: int) -> int:
        """How many of ``n_steps`` sampling steps run dense: ``ceil(dense_first_percent% * n_steps)``."""
        return math.ceil(self.dense_first_percent / 100.0 * n_steps - 1e-9)

    def step_of(self, options: dict) -> tuple[int | None, int | None]:
        """``(step, n_steps)`` of the current call from ``transformer_options`` (``sigmas``: the current noise
        level, ``sample_sigmas``: the run's schedule); ``(None, None)`` outside a sampling run."""
        sigma, schedule = options.get("sigmas"), options.get("sample_sigmas")
        if not isinstance(sigma, Tensor) or not isinstance(schedule, Tensor) or schedule.numel() < 2:
            return None, None
        cur = float(sigma.detach().float().max())
        sched = schedule.detach().float().cpu()
        return int((sched > cur * (1 + 1e-4) + 1e-8).sum()), schedule.numel() - 1

    # ---------------------------------------------------------------------------------------------------- layout
    def layout(self, seq_len: int, options: dict) -> TokenLayout | None:
        """Where the tokens of a ``seq_len`` self-attention sit: the UNet's feature map (``activations_shape``),
        else the latent over the model's patch size with the remaining tokens global (text); None if unknown."""
        act = options.get("activations_shape")
        if isinstance(act, (list, tuple)) and len(act) >= 4 and math.prod(act[2:]) == seq_len:
            return TokenLayout(tuple(int(a) for a in act[2:]))
        shape = options.get(LATENT_SHAPE_KEY)
        if shape is None or len(shape) < 4:
            return None
        spatial = tuple(shape[2:])
        if self.patch_size is None and math.prod(spatial) != seq_len:
            return None
        grid = latent_token_grid(spatial, self.patch_size)
        if math.prod(grid) > seq_len:
            return None
        return TokenLayout(grid, seq_len - math.prod(grid), self.text_first)

    # ---------------------------------------------------------------------------------------------------- calls
    def _note(self, reason: str, message: str) -> None:
        self.stats[reason] += 1
        if reason not in self._warned:
            self._warned.add(reason)
            log.info("fewstep sparse attention on %s: %s", self.model_name, message)

    def __call__(self, func: Callable[..., Tensor], *args: Any, **kwargs: Any) -> Tensor:
        call = dict(zip(_ARGS, args))
        call.update(kwargs)
        q, k = call["q"], call["k"]
        options = call.get("transformer_options") or {}
        self.stats["calls"] += 1
        seq_dim = 2 if call.get("skip_reshape") else 1
        sq, skv = q.shape[seq_dim], k.shape[seq_dim]
        sparse = None
        step, n_steps = self.step_of(options)
        if call.get("mask") is not None:
            self._note("masked", "attention calls with a mask stay dense")
        elif step is not None and step < self.dense_steps(n_steps):
            self.stats["dense_step"] += 1
        elif sq != skv:
            if self.self_attention_only or self.pattern == "sliding_tile":
                self._note("cross", "cross-attention stays dense" + (
                    " (the sliding tile needs a token grid on both sides)" if not self.self_attention_only else ""))
            else:
                sparse = self._cross_fn()
        else:
            layout = self.layout(sq, options)
            if layout is None:
                if self.pattern == "sliding_tile":
                    raise ValueError(
                        f"sparse attention: cannot tell the token grid of {self.model_name}'s attention over {sq} "
                        f"tokens (latent shape {options.get(LATENT_SHAPE_KEY)}, patch size {self.patch_size}); "
                        "the sliding tile needs it. Choose the pattern 'top_k', which needs no grid")
                self._note("no_grid", f"no token grid for {sq} tokens: top-k over the sequence order")
                layout = TokenLayout((sq,))
            sparse = self._self_fn(layout)
        if sparse is None:
            return func(*args, **kwargs) if self.inner is None else self.inner(func, *args, **kwargs)
        if self.inner is None:
            return sparse(*args, **kwargs)
        used: list[bool] = []

        @functools.wraps(sparse)
        def handed(*a: Any, **kw: Any) -> Tensor:
            used.append(True)
            return sparse(*a, **kw)

        out = self.inner(handed, *args, **kwargs)
        if not used:
            self._note("bypassed", "the attention override already on the model computed attention itself instead "
                                   "of calling the function it was handed: its result is used, not sparse attention")
        return out

    def _record(self, mask: Any) -> None:
        self.stats["sparse"] += 1
        self.stats["density_sum"] += float(mask.density())

    def _self_fn(self, layout: TokenLayout) -> Callable[..., Tensor]:
        pattern = self.pattern_for(layout)

        def sparse_self_attention(q: Tensor, k: Tensor, v: Tensor, heads: int, mask: Any = None,
                                  attn_precision: Any = None, skip_reshape: bool = False,
                                  skip_output_reshape: bool = False, **_: Any) -> Tensor:
            out, block_mask = sparse_attention_packed(q, k, v, heads, pattern, layout, skip_reshape=skip_reshape,
                                                      skip_output_reshape=skip_output_reshape, backend=self.backend,
                                                      return_mask=True)
            self._record(block_mask)
            return out

        return sparse_self_attention

    def _cross_fn(self) -> Callable[..., Tensor]:
        def sparse_cross_attention(q: Tensor, k: Tensor, v: Tensor, heads: int, mask: Any = None,
                                   attn_precision: Any = None, skip_reshape: bool = False,
                                   skip_output_reshape: bool = False, **_: Any) -> Tensor:
            if not skip_reshape:
                b = q.shape[0]
                q, k, v = (t.view(b, t.shape[1], heads, -1).transpose(1, 2) for t in (q, k, v))
            kw = {"keep_ratio": self.density} if self.pattern == "top_k" else {"mass": self.mass}
            block_mask = topk_block_mask(q, k, self.block_size, **kw)
            self._record(block_mask)
            out = block_sparse_attention(q, k, v, block_mask, backend=self.backend)
            if skip_output_reshape:
                return out
            b, h, s, d = out.shape
            return out.transpose(1, 2).reshape(b, s, h * d)

        return sparse_cross_attention


# ------------------------------------------------------------------------------------------------- patch


def _record_latent_shape(executor: Any, *args: Any, **kwargs: Any) -> Tensor:
    """``APPLY_MODEL`` wrapper: the latent's shape into ``transformer_options`` (the token grid comes from it)."""
    opts = args[5] if len(args) > 5 else kwargs.get("transformer_options")
    if isinstance(opts, dict):
        opts[LATENT_SHAPE_KEY] = tuple(args[0].shape)
    return executor(*args, **kwargs)


def apply_sparse_attention(model: Any, pattern: str = "top_k", density: float = 0.5, mass: float = 0.9,
                           block_size: int = 64, dense_first_percent: float = 0.0, self_attention_only: bool = True,
                           backend: str = "auto") -> tuple[Any, SparseAttentionOverride]:
    """A clone of the ComfyUI MODEL ``model`` whose attention runs through a ``SparseAttentionOverride`` (returned
    too); an override already on ``model`` is chained (see module docstring)."""
    m = model.clone()
    dm = m.get_model_object("diffusion_model")
    options = m.model_options.setdefault("transformer_options", {})
    name = type(dm).__name__
    override = SparseAttentionOverride(pattern, density, mass, block_size, dense_first_percent, self_attention_only,
                                       backend, patch_size=_patch_size(dm), text_first=name not in TEXT_LAST,
                                       model_name=name, inner=options.get(OVERRIDE_KEY))
    options[OVERRIDE_KEY] = override

    def reset_per_run(executor: Any, *args: Any, **kwargs: Any) -> Any:
        override.reset()
        return executor(*args, **kwargs)

    wrappers = comfy.patcher_extension.WrappersMP
    m.remove_wrappers_with_key(wrappers.APPLY_MODEL, WRAPPER_KEY)  # one is enough for any number of overrides
    m.add_wrapper_with_key(wrappers.APPLY_MODEL, WRAPPER_KEY, _record_latent_shape)
    m.add_wrapper_with_key(wrappers.OUTER_SAMPLE, WRAPPER_KEY, reset_per_run)
    return m, override


# ------------------------------------------------------------------------------------------------- nodes


class FewstepSparseAttention(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FewstepSparseAttention",
            display_name="fewstep sparse attention",
            category=CATEGORY,
            description="Block-sparse self-attention (fewer attended tokens) through ComfyUI's attention override: "
                        "adaptive top-k key blocks by pooled q.k (SpargeAttn / VSA style) or Sliding Tile Attention "
                        "over the latent's token grid (Zhang et al. 2025). Works on UNets and DiTs (SD1.5, SDXL, "
                        "Flux, SD3, Wan, the digits DiT); the first steps, masked calls and cross-attention stay "
                        "dense. Pays off on long sequences (large images, video) with a GPU kernel.",
            inputs=[
                io.Model.Input("model", tooltip="The model whose self-attention becomes block-sparse (patched, not "
                                                "copied; an attention override already on it is chained)."),
                io.Combo.Input("pattern", options=list(PATTERNS), default="top_k",
                               tooltip="top_k: each query block keeps the key blocks with the largest pooled q.k "
                                       "(adaptive, per call). top_k_mass: the fewest blocks reaching 'mass' of the "
                                       "softmax. sliding_tile: a window around each tile of the token grid "
                                       "(static; text tokens always attended). Core: TopKPattern(keep_ratio), "
                                       "TopKPattern(mass), SlidingTilePattern(radius)."),
                io.Float.Input("density", default=0.5, min=0.0, max=1.0, step=0.01,
                               tooltip="Fraction of key blocks attended, in (0, 1]: the keep ratio of top_k, the "
                                       "target mask density of sliding_tile (its window is sized to match). 1.0 = "
                                       "dense. Not used by top_k_mass. Core: keep_ratio / radius_for_density."),
                io.Float.Input("mass", default=0.9, min=0.0, max=1.0, step=0.01,
                               tooltip="top_k_mass only: keep the fewest key blocks whose share of the (pooled) "
                                       "softmax reaches this, in (0, 1]."),
                io.Int.Input("block_size", default=64, min=1, max=1024,
                             tooltip="Tokens per block of the mask (a square/cubic tile of the token grid). 64 suits "
                                     "GPU kernels (multiples of 16 for triton); smaller blocks give finer masks."),
                io.Float.Input("dense_first_percent", default=20.0, min=0.0, max=100.0, step=1.0,
                               tooltip="Run the first N% of the sampling steps with dense attention (they lay out "
                                       "the global structure); the step is read from the run's sigmas. Core: "
                                       "SparsitySchedule(dense_steps) counts steps instead."),
                io.Boolean.Input("self_attention_only", default=True,
                                 tooltip="Leave cross-attention (queries and keys of different lengths, e.g. to the "
                                         "text) dense. Off: top-k patterns sparsify it too."),
                io.Combo.Input("backend", options=list(BACKENDS), default="auto",
                               tooltip="Kernel: auto picks triton (CUDA), FlexAttention or the dense masked "
                                       "reference; a backend that cannot run falls back, with the reason logged."),
            ],
            outputs=[io.Model.Output(tooltip="The model with sparse attention; sample it as usual.")],
        )

    @classmethod
    def execute(cls, model: Any, pattern: str, density: float, mass: float, block_size: int,
                dense_first_percent: float, self_attention_only: bool, backend: str) -> io.NodeOutput:
        patched, _ = apply_sparse_attention(model, pattern, density, mass, block_size, dense_first_percent,
                                            self_attention_only, backend)
        return io.NodeOutput(patched)


NODES: list[type[io.ComfyNode]] = [FewstepSparseAttention]
