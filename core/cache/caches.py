"""The cache families on top of the state machine (``core.cache.state.ResidualCache``): what unit is cached (the whole
network, or a range of transformer blocks) and which indicators fit it. The hosts (``core.cache.hooks``, the
block-range runner ``core.cache.runner``, ComfyUI's wrappers in ``nodes/cache_wrappers.py``) read ``block_range`` and
``signal_source`` from these; the skip algorithm itself lives in ``state`` and ``runner``."""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

from .options import CacheConfigError, check_choice, check_count, check_fraction
from .state import ResidualCache


class StepCache(ResidualCache):
    """Step-level cache: skip the whole network at a denoising step and reuse its output-minus-input residual.

    The TeaCache / EasyCache / MagCache family (see the module docstring for the indicators; default ``"input"``,
    the relative L1 change of the network input accumulated across skipped steps). Works on any model (UNet, DiT,
    Flux, a plain ``nn.Module``): apply it with ``apply_cache(denoiser_or_module, StepCache(...))``.
    """

    default_indicator = "input"
    indicators = ("input", "teacache", "easycache", "magcache", "interval")
    poly_key = "input"
    mag_key = "step"


class BlockCache(ResidualCache):
    """Base class of block-level caches: the cached unit is a range of transformer blocks (see ``hooks``).
    ``stats`` also counts block forwards run and skipped (``blocks_run``, ``blocks_skipped``)."""

    def reset_stats(self) -> None:
        super().reset_stats()
        self.stats.update({"blocks_run": 0, "blocks_skipped": 0})

    def block_range(self, num_blocks: int, sigma: float) -> tuple[int, int, Hashable]:
        """The block range ``[a, b)`` whose residual is cached at this sigma, and its state region."""
        raise NotImplementedError

    def signal_source(self) -> str | None:
        """Which tensor feeds the indicator: ``head_residual``, ``modulated``, ``range_input`` or None."""
        raise NotImplementedError

    def observed_blocks(self) -> frozenset[int]:
        """Blocks inside a *computed* range whose output streams the cache also wants (``observe``); none here."""
        return frozenset()

    def observe(self, i: int, out: Any, key: Hashable = None) -> None:
        """The streams leaving block ``i`` (one of ``observed_blocks``) of a computed range; ignored here."""


class FirstBlockCache(BlockCache):
    """First-Block-Cache (ParaAttention; diffusers ``FirstBlockCache``) and TeaCache on the block stack.

    The first ``head_blocks`` transformer blocks always run; the rest ``[head_blocks, N)`` are skipped when the
    indicator says the step barely changed, and their residual ``h_N - h_head`` is reused (or forecast).

    Indicators: ``"first_block"`` (default: relative L1 distance between the head blocks' residual now and at the
    last full compute), ``"teacache"`` / ``"input"`` (accumulated relative L1 change of the *timestep-modulated
    input* -- the output of the first block's ``norm1`` (adaLN), as TeaCache uses), ``"easycache"``, ``"magcache"``
    (calibrated magnitude ratios of the block-stack residual), ``"interval"``.
    ``signal`` overrides the indicator's tensor: ``"head_residual"``, ``"modulated"`` or ``"range_input"`` (the
    hidden state entering the skipped range).
    """

    default_indicator = "first_block"
    indicators = ("first_block", "input", "teacache", "easycache", "magcache", "interval")

    def __init__(self, threshold: float = 0.1, *, head_blocks: int = 1, signal: str | None = None,
                 **kwargs: Any) -> None:
        self.head_blocks = check_count("head_blocks", head_blocks, 1)
        super().__init__(threshold, **kwargs)
        default = {"first_block": "head_residual", "input": "modulated", "teacache": "modulated",
                   "easycache": "range_input"}.get(self.indicator)
        self.signal = signal or default
        if self.signal is not None:
            check_choice("signal", self.signal, ("head_residual", "modulated", "range_input"))
        if self.indicator == "first_block" and self.signal != "head_residual":
            raise CacheConfigError("indicator 'first_block' compares the head blocks' residual: leave signal unset "
                                   "or use signal='head_residual'")
        self.poly_key = self.signal or "modulated"
        self.mag_key = f"blocks:{self.head_blocks}"

    def config(self) -> dict[str, Any]:
        return {**super().config(), "head_blocks": self.head_blocks, "signal": self.signal}

    def block_range(self, num_blocks: int, sigma: float) -> tuple[int, int, Hashable]:
        if self.head_blocks >= num_blocks:
            raise CacheConfigError(f"head_blocks={self.head_blocks} leaves nothing to cache in a model with "
                                   f"{num_blocks} blocks; use head_blocks < {num_blocks}")
        return self.head_blocks, num_blocks, None

    def signal_source(self) -> str | None:
        return self.signal


class DeltaDiTCache(BlockCache):
    """Delta-DiT (Chen et al. 2024, "Delta-DiT: A Training-Free Acceleration Method Tailored for Diffusion
    Transformers", arXiv:2406.01125, the Delta-Cache): cache the *deviation* ``Delta = F_out - F_in`` of a
    block range rather than its output. Early in sampling (progress < ``boundary``, outline generation) the back
    ``num_blocks`` blocks are cached; later (detail generation) the front ``num_blocks`` blocks. The cached range is
    recomputed every ``interval`` calls (interval 1 = no caching, exact), or, with an adaptive indicator
    (``"input"`` / ``"easycache"`` on the hidden state entering the range), whenever it says so.
    """

    default_indicator = "interval"
    indicators = ("interval", "input", "easycache")

    def __init__(self, threshold: float | None = None, *, interval: int = 2, num_blocks: int | None = None,
                 boundary: float = 0.5, **kwargs: Any) -> None:
        self.interval = check_count("interval", interval, 1)
        self.num_blocks = check_count("num_blocks", num_blocks, 1, allow_none=True)
        self.boundary = check_fraction("boundary", boundary)
        indicator = kwargs.get("indicator") or self.default_indicator
        if threshold is None:
            threshold = 1.0 if indicator == "interval" else 0.1
        if indicator == "interval":
            if kwargs.get("max_consecutive_skips") is not None:
                raise CacheConfigError("DeltaDiTCache(indicator='interval') sets max_consecutive_skips from "
                                       "interval; pass interval= instead")
            kwargs["max_consecutive_skips"] = self.interval - 1
        super().__init__(threshold, **kwargs)

    def config(self) -> dict[str, Any]:
        return {**super().config(), "interval": self.interval, "num_blocks": self.num_blocks,
                "boundary": self.boundary}

    def block_range(self, num_blocks: int, sigma: float) -> tuple[int, int, Hashable]:
        k = self.num_blocks if self.num_blocks is not None else max(1, num_blocks // 2)
        if k >= num_blocks:
            raise CacheConfigError(f"num_blocks={k} would cache every block of a {num_blocks}-block model; use "
                                   f"num_blocks < {num_blocks} (or StepCache to skip the whole network)")
        if self._before(self.boundary, sigma):
            return num_blocks - k, num_blocks, "back"
        return 0, k, "front"

    def signal_source(self) -> str | None:
        return None if self.indicator == "interval" else "range_input"


class CFGBranchCache(ResidualCache):
    """Reuse of the unconditional branch across steps -- FasterCache's CFG-Cache (Lv et al. 2024, "FasterCache:
    Training-Free Video Diffusion Model Acceleration with High Quality", arXiv:2410.19355, Sec. 3.3): the conditional
    branch runs every step; the unconditional one only when the indicator says the step moved, and in between it is
    ``cond_t + (uncond_c - cond_c)``, the conditional output now plus the branch difference of the last step where
    both ran (or its TaylorSeer forecast with ``forecast="taylor1"``). FasterCache splits that difference into low and
    high frequencies weighted over time; here it is reused whole.

    On the state machine: ``x`` is the conditional output and ``out`` the unconditional one, so the cached "residual"
    is the branch difference, kept per row and per key; ``signal`` (default: the model input of the step) drives the
    indicator. Hosts decide *before* running the network, so a computed step is the host's usual batched call
    (threshold 0 is bit-identical to the uncached model): ``apply_cache(CFGDenoiser, CFGBranchCache(...))`` here, the
    step cache node's ``cfg_reuse`` input in ComfyUI.
    """

    default_indicator = "input"
    indicators = ("input", "easycache", "interval")
