"""ComfyUI host of ``core.cache``: the model-patcher wrappers and block patches that drive the core state machine
(step level) and the core block-range runner (block level, ``core.cache.runner``), the per-clone cache holder and the
per-run state. The node classes in ``nodes/caches.py`` install these; the skip algorithm itself lives in core.

- Step cache: a ``DIFFUSION_MODEL`` wrapper caches the network's native output (``out - x_in``, as ``core.cache`` does
  on a fewstep ``Denoiser``); models whose diffusion model does not run ``DIFFUSION_MODEL`` wrappers (SD3's MMDiT,
  HunyuanDiT, ...) are found on their first call and cached one level up by an ``APPLY_MODEL`` wrapper in the eps
  space ``(x - denoised) / sigma`` (equal to the native output of eps and flow models).
- Block cache: ``patches_replace["dit"]`` block replacements, on the architectures declared for host ``"comfy"`` in
  ``core.cache.layouts``; a skipped range returns ``input + cached residual`` at its first block and passes its input
  through the rest (Flux's concatenation of the text and image streams between its double and single blocks happens
  in between, as in the unpatched model).

State: the ``CacheHolder`` in ``model_options["transformer_options"][key]`` is owned by one MODEL clone. ComfyUI >=
0.13 no longer deep-copies it on ``clone()``, so a downstream clone would share it: the ``OUTER_SAMPLE`` wrapper gives
a clone that inherited a holder its own copy (with its own statistics) before the run. Each sampling run gets a fresh
core cache in a clone of the guider's model options (as ComfyUI's EasyCache does), keyed inside by guidance branch
(``tuple(transformer_options["cond_or_uncond"])``) and by the network object making the call (Wan 2.2's two experts
keep separate state), so no tensor survives a run, a prompt, a batch size or a resolution. After each run the
statistics are logged and kept in the holder's ``last_stats`` / ``history``.
"""

from __future__ import annotations

import copy
import logging
import weakref
from collections.abc import Callable, Hashable
from typing import Any

import comfy.model_patcher
from torch import Tensor

from ..core.cache import BlockCache, BlockRangeRunner, ResidualCache
from ..core.cache.layouts import BlockLayout, lookup_layout, resolve_attr
from .cache_store import model_identity

STEP_KEY = "fewstep_step_cache"
BLOCK_KEY = "fewstep_block_cache"
STEP_NODE = "'fewstep step cache' (FewstepStepCache)"

log = logging.getLogger("fewstep")

#: a MODEL's block stack as routed through patches_replace["dit"]: (kind, index, streams), in execution order
Layout = list[tuple[str, int, tuple[str, ...]]]


# ----------------------------------------------------------------------------------------------- architectures


def comfy_layout(model: Any) -> BlockLayout:
    """The declared ``"comfy"`` block layout of a MODEL's diffusion model (``core.cache.layouts``)."""
    dm = model.model.diffusion_model
    layout = lookup_layout("comfy", dm)
    if layout is None:
        from ..core.cache.layouts import known_architectures

        arch = type(getattr(model.model, "model_config", model.model)).__name__
        raise ValueError(
            f"the block cache replaces transformer blocks through patches_replace['dit'], which this model "
            f"({arch}, {type(dm).__name__}) does not route its blocks through (supported diffusion models: "
            f"{', '.join(known_architectures('comfy'))}); use {STEP_NODE} instead, which works on every model")
    return layout


def block_layout(model: Any) -> Layout:
    """The transformer blocks of a MODEL as ``patches_replace["dit"]`` routes them, in execution order:
    ``(block kind, index, streams the block updates)``. Raises ``ValueError`` naming the architecture if none is
    declared."""
    dm = model.model.diffusion_model
    out: Layout = []
    for bl in comfy_layout(model).lists:
        lst = resolve_attr(dm, bl.attr)
        out += [(bl.kind, i, bl.streams) for i in range(len(lst))]
    return out


# ----------------------------------------------------------------------------------------------- run state


def call_options(args: tuple, kwargs: dict) -> dict:
    """The ``transformer_options`` of a wrapped call (keyword, or the last / second-to-last positional argument)."""
    opts = kwargs.get("transformer_options")
    if isinstance(opts, dict):
        return opts
    for a in args[-1:-3:-1]:
        if isinstance(a, dict):
            return a
    return {}


def branch(opts: dict) -> Hashable:
    """The guidance branch of a call (``cond_or_uncond``): separate branches never share cache state."""
    return tuple(opts.get("cond_or_uncond") or ())


class CacheHolder:
    """What a cache node stores in the MODEL's ``transformer_options``: how to build the run's core cache, and the
    statistics of past runs (``last_stats``, ``history``). Owned by one MODEL clone (``owner``)."""

    def __init__(self, kind: str, label: str, make: Callable[[], ResidualCache], model: Any, owner: Any,
                 layout: Layout | None = None, identity: tuple[str, str, str] | None = None,
                 make_cfg: Callable[[], ResidualCache] | None = None) -> None:
        self.kind = kind
        self.label = label
        self.make = make
        self.make_cfg = make_cfg  # step cache: the CFG-branch cache (None: off)
        self.identity = identity or model_identity(model)
        self.layout = layout
        self.last_stats: dict[str, Any] | None = None
        self.history: list[dict[str, Any]] = []
        self._owner = weakref.ref(owner)

    def owned_by(self, model: Any) -> bool:
        return self._owner() is model

    def clone_for(self, model: Any) -> CacheHolder:
        """A copy owned by ``model`` with empty statistics (the settings and calibration are shared, read-only)."""
        new = copy.copy(self)
        new.last_stats, new.history, new._owner = None, [], weakref.ref(model)
        return new

    def new_run(self, model_sampling: Any) -> Run:
        caches = []
        for make in (self.make, self.make_cfg):
            cache = make() if make is not None else None
            if cache is not None:
                cache.bind(*self.identity[:2], model_sampling)
                cache.reset()
            caches.append(cache)
        return Run(self, caches[0], caches[1])

    def finish(self, run: Run) -> None:
        stats = {**run.cache.stats, "label": self.label}
        if self.kind == "step":
            stats["level"] = run.level  # where the network was cached: "diffusion_model" or "apply_model"
        if run.cfg is not None:
            stats["cfg"] = dict(run.cfg.stats)  # uncond branch: computed / skipped (reused)
            run.cfg.reset()
            log.info("fewstep CFG-branch reuse (%s): unconditional branch computed %d, reused %d", self.label,
                     stats["cfg"]["computed"], stats["cfg"]["skipped"])
        self.last_stats = stats
        self.history.append(stats)
        run.cache.reset()
        if self.kind == "step":
            n = stats["computed"] + stats["skipped"]
            log.info("fewstep step cache (%s): %d model calls, %d computed, %d skipped (%.2fx fewer)", self.label, n,
                     stats["computed"], stats["skipped"], n / max(stats["computed"], 1))
        else:
            n = stats["blocks_run"] + stats["blocks_skipped"]
            log.info("fewstep block cache (%s): %d block calls, %d run, %d skipped (%.2fx fewer)", self.label, n,
                     stats["blocks_run"], stats["blocks_skipped"], n / max(stats["blocks_run"], 1))


class Run:
    """One sampling run of a cached MODEL: the core cache, and for block caches the core block-range runner."""

    def __init__(self, holder: CacheHolder, cache: ResidualCache, cfg: ResidualCache | None = None) -> None:
        self.holder = holder
        self.cache = cache
        self.cfg = cfg
        self.level: str | None = None  # step cache: "diffusion_model" or "apply_model", found on the first call
        self.runner = BlockRangeRunner(cache, len(holder.layout)) if isinstance(cache, BlockCache) else None
        self.txt_len = 0
        self.head_shape: tuple | None = None
        self._experts: dict[int, int] = {}
        self.current_expert = 0  # block cache: set by the DIFFUSION_MODEL wrapper around each network call

    def expert(self, model: Any) -> int:
        """The index of the network object making this call within the run (0, 1, ...): part of every state key, so
        a run that switches networks mid-way (Wan 2.2's high- and low-noise experts) never reuses one expert's
        residual for the other; the first call of a new expert computes."""
        return self._experts.setdefault(id(model), len(self._experts))

    # ------------------------------------------------------------------ block level (patches_replace["dit"])
    def _streams(self, g: int) -> tuple[str, ...]:
        return self.holder.layout[g][2]

    def _img(self, g: int, args: dict) -> Tensor:
        """The image tokens entering block ``g`` (after Flux's concatenation: the part after the text tokens)."""
        img = args["img"]
        if "txt" not in self._streams(g) and self.txt_len and tuple(img.shape) != self.head_shape:
            img = img[:, self.txt_len:]
        return img

    def block(self, g: int, args: dict, original: Callable[[dict], dict], opts: dict) -> dict:
        runner = self.runner
        if g == 0:  # a new model call
            sigmas = opts.get("sigmas")
            if sigmas is None:
                runner.end()
            else:
                runner.begin(sigmas, (branch(opts), self.current_expert))
                self.head_shape = tuple(args["img"].shape)
                txt = args.get("txt")
                self.txt_len = txt.shape[1] if "txt" in self._streams(0) and isinstance(txt, Tensor) else 0
        if not runner.active:
            return original(args)
        streams = self._streams(g)
        state = tuple(args[s] for s in streams)
        skipped = runner.before(g, state, self._img(g, args))
        if skipped is not None:
            return dict(zip(streams, skipped))
        out = original(args)
        end = None
        if runner.wants_output(g):
            end = tuple(out[s] for s in streams)
            a = runner.call.a
            if len(self._streams(a)) == 2 and len(end) == 1:  # crossed Flux's torch.cat((txt, img), 1)
                nt = self.txt_len
                end = (end[0][:, nt:], end[0][:, :nt])
        runner.ran(g, end)
        return out


def outer_sample_wrapper(key: str) -> Callable[..., Any]:
    """``OUTER_SAMPLE`` wrapper: the holder owned by the sampled MODEL clone, a fresh core cache for this sampling run
    (in a clone of the guider's model options, as ComfyUI's EasyCache does), statistics kept and logged at the end,
    every cached tensor dropped."""

    def wrapper(executor: Any, *args: Any, **kwargs: Any) -> Any:
        guider = executor.class_obj
        orig = guider.model_options
        holder: CacheHolder | None = orig.get("transformer_options", {}).get(key)
        if not isinstance(holder, CacheHolder):
            return executor(*args, **kwargs)
        patcher = guider.model_patcher
        if not holder.owned_by(patcher):  # inherited through clone() (shared since ComfyUI 0.13): own a copy
            holder = holder.clone_for(patcher)
            patcher.model_options.setdefault("transformer_options", {})[key] = holder
        guider.model_options = comfy.model_patcher.create_model_options_clone(orig)
        guider.model_options["transformer_options"][key] = holder
        run = holder.new_run(patcher.get_model_object("model_sampling"))
        guider.model_options["transformer_options"][f"{key}_run"] = run
        try:
            return executor(*args, **kwargs)
        finally:
            holder.finish(run)
            guider.model_options = orig

    return wrapper


def step_diffusion_model_wrapper(latent_channels: int) -> Callable[..., Any]:
    """``DIFFUSION_MODEL`` wrapper: the step cache on the network's native output (residual ``out - x_in``, ``x_in``
    without concatenated conditioning channels)."""

    def wrapper(executor: Any, *args: Any, **kwargs: Any) -> Any:
        opts = call_options(args, kwargs)
        run: Run | None = opts.get(f"{STEP_KEY}_run")
        x = args[0] if args else None
        if run is None or run.level == "apply_model" or opts.get("sigmas") is None or not isinstance(x, Tensor):
            return executor(*args, **kwargs)
        run.level = "diffusion_model"
        key = (branch(opts), run.expert(getattr(executor, "class_obj", None)))
        return run.cache(lambda: executor(*args, **kwargs), x[:, :latent_channels], opts["sigmas"], key)

    return wrapper


def block_diffusion_model_wrapper(executor: Any, *args: Any, **kwargs: Any) -> Any:
    """``DIFFUSION_MODEL`` wrapper of the block cache: tells the run which network object the blocks belong to, so
    state is partitioned per expert within a run (see ``Run.expert``)."""
    run: Run | None = call_options(args, kwargs).get(f"{BLOCK_KEY}_run")
    if run is not None:
        run.current_expert = run.expert(getattr(executor, "class_obj", None))
    return executor(*args, **kwargs)


def step_apply_model_wrapper() -> Callable[..., Any]:
    """``APPLY_MODEL`` wrapper: finds out on the first call whether the diffusion model runs ``DIFFUSION_MODEL``
    wrappers; if not, caches here in eps space ``(x - denoised) / sigma`` against the network input."""

    def wrapper(executor: Any, *args: Any, **kwargs: Any) -> Any:
        opts = call_options(args, kwargs)
        run: Run | None = opts.get(f"{STEP_KEY}_run")
        x, sigma = args[0], args[1]
        if run is None or run.level == "diffusion_model" or opts.get("sigmas") is None:
            return executor(*args, **kwargs)
        if run.level is None:  # first call of the run: let the DIFFUSION_MODEL wrapper claim it
            out = executor(*args, **kwargs)
            if run.level is not None:
                return out
            run.level = "apply_model"
            if bool((sigma > 0).all()):
                x_in, s = eps_frame(executor.class_obj, x, sigma)
                key = (branch(opts), run.expert(executor.class_obj))
                if run.cache.should_compute(x_in, sigma, key):
                    run.cache.update(x_in, (x - out) / s, key)
                else:  # pragma: no cover - a fresh run always computes its first call
                    run.cache.predict(x_in, key)
            return out
        if not bool((sigma > 0).all()):
            return executor(*args, **kwargs)
        x_in, s = eps_frame(executor.class_obj, x, sigma)
        key = (branch(opts), run.expert(executor.class_obj))
        if run.cache.should_compute(x_in, sigma, key):
            out = executor(*args, **kwargs)
            run.cache.update(x_in, (x - out) / s, key)
            return out
        return x - run.cache.predict(x_in, key) * s

    return wrapper


def cfg_reuse_wrapper(executor: Any, model: Any, conds: list, x_in: Tensor, timestep: Tensor, model_options: dict,
                      *args: Any, **kwargs: Any) -> Any:
    """``CALC_COND_BATCH`` wrapper: CFG-branch reuse (``core.cache.CFGBranchCache``, FasterCache's CFG-Cache). The
    cache decides from the step's input; a computed step is ComfyUI's usual batched cond + uncond call (the branch
    difference is recorded), a skipped one evaluates the positive conds only and returns ``cond + cached
    difference`` as the negative output."""
    run: Run | None = model_options.get("transformer_options", {}).get(f"{STEP_KEY}_run")
    cache = run.cfg if run is not None else None
    if cache is None or len(conds) != 2 or conds[0] is None or conds[1] is None:
        return executor(model, conds, x_in, timestep, model_options, *args, **kwargs)
    if cache.should_compute(x_in, timestep, "cfg", signal=x_in):
        out = executor(model, conds, x_in, timestep, model_options, *args, **kwargs)
        cache.update(out[0], out[1], "cfg")
        return out
    out = executor(model, [conds[0], None], x_in, timestep, model_options, *args, **kwargs)
    return [out[0], cache.predict(out[0], "cfg")]


def eps_frame(base: Any, x: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor]:
    """The network input ``calculate_input(sigma, x)`` and sigma broadcast to ``x``."""
    s = sigma.reshape(sigma.shape[:1] + (1,) * (x.ndim - 1)).to(x)
    return base.model_sampling.calculate_input(sigma, x), s


def install_block_cache(m: Any, holder: CacheHolder, layout: Layout) -> None:
    """Put ``holder`` on the MODEL clone ``m`` and install the block cache's wrappers (``OUTER_SAMPLE``: a fresh core
    cache per run; ``DIFFUSION_MODEL``: the expert of each call) and one ``BlockPatch`` per block of ``layout``."""
    import comfy.patcher_extension

    m.model_options["transformer_options"][BLOCK_KEY] = holder
    wmp = comfy.patcher_extension.WrappersMP
    for kind, fn in ((wmp.OUTER_SAMPLE, outer_sample_wrapper(BLOCK_KEY)),
                     (wmp.DIFFUSION_MODEL, block_diffusion_model_wrapper)):
        m.remove_wrappers_with_key(kind, BLOCK_KEY)
        m.add_wrapper_with_key(kind, BLOCK_KEY, fn)
    for g, (kind, i, _) in enumerate(layout):
        m.set_model_patch_replace(BlockPatch(g), "dit", kind, i)


class BlockPatch:
    """``patches_replace["dit"][(kind, i)]``: block ``g`` of the stack, driven by the run's block-range runner."""

    def __init__(self, g: int) -> None:
        self.g = g

    def __call__(self, args: dict, extra: dict) -> dict:
        opts = args.get("transformer_options") or {}
        run: Run | None = opts.get(f"{BLOCK_KEY}_run")
        if run is None:
            return extra["original_block"](args)
        return run.block(self.g, args, extra["original_block"], opts)


def reject_cached(model: Any, node: str) -> None:
    """Calibration needs every model call computed: refuse a MODEL that already carries a fewstep cache."""
    opts = model.model_options.get("transformer_options", {})
    if any(isinstance(opts.get(k), CacheHolder) for k in (STEP_KEY, BLOCK_KEY)):
        raise ValueError(f"{node}: the connected MODEL already has a fewstep cache; connect the calibration node "
                         "before the cache nodes (calibration needs every model call computed)")
