"""``LearnedCache``: a block cache whose skipped range is predicted by a trained ``ResidualPredictor``.

Same three verbs as every fewstep cache (``should_compute`` / ``update`` / ``predict``, see ``core.cache``), so it is
applied with ``apply_cache(model, cache)`` -- the block-range runner calls it at the first block of the range:

- ``should_compute``: a fixed schedule of call indices within a sampling run (``skip_steps``): few-step models have
  fixed schedules and no two consecutive steps alike, so an indicator has nothing to measure (the issue's point);
- ``update``: remembers the range's input ``h_a(c)``, its residual ``r_c = h_b - h_a`` and its sigma;
- ``predict``: ``h_a + predictor(h_a, r_c, h_a(c), sigma_t, sigma_c)`` (Eq. (1) of ``predictor.py``).

State is kept per key (guidance branch / call site) and reset when sigma rises (a new run) or the batch shape changes;
a skip with no residual of the same shape computes instead. The predictor's rows are independent, so the cond rows of
a CFG batch never read the uncond rows.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ...sampling.schedules import starts_new_run
from ..caches import BlockCache
from ..options import CacheConfigError
from ..tensors import sigma_value
from .predictor import ResidualPredictor
from .store import check_identity, load_predictor

Feature = Tensor | tuple[Tensor | None, ...]


def _hidden(x: Feature) -> Tensor:
    h = x[0] if isinstance(x, tuple) else x
    if not isinstance(h, Tensor):
        raise TypeError("LearnedCache needs the hidden state tensor entering the cached block range")
    return h


def _with_hidden(x: Feature, h: Tensor) -> Feature:
    return (h, *x[1:]) if isinstance(x, tuple) else h


class _State:
    __slots__ = ("step", "sigma", "r_c", "h_c", "sigma_c", "pending")

    def __init__(self) -> None:
        self.step = 0
        self.sigma: float | None = None
        self.r_c: Tensor | None = None
        self.h_c: Tensor | None = None
        self.sigma_c: float | None = None
        self.pending: tuple[bool, float] | None = None


class LearnedCache(BlockCache):
    """Learned block cache (DisCa-style; see the module docstring).

    Args:
        predictor: a trained ``ResidualPredictor`` for this model and block range.
        skip_steps: call indices (0-based, within one sampling run and key) at which the range is predicted; the
            first call always computes.
        head_blocks: blocks that always run before the range (the range starts here).
        tail_blocks: blocks that always run after the range.
        identity: the model fingerprint the predictor was trained for; checked when the cache is applied.
    """

    def __init__(self, predictor: ResidualPredictor, skip_steps: Sequence[int], *, head_blocks: int = 1,
                 tail_blocks: int = 0, identity: dict[str, str] | None = None) -> None:
        super().__init__(1.0, indicator="interval")
        if not isinstance(predictor, ResidualPredictor):
            raise TypeError(f"predictor must be a ResidualPredictor, got {type(predictor).__name__}")
        steps = sorted({int(s) for s in skip_steps})
        if steps and steps[0] < 1:
            raise CacheConfigError(f"skip_steps must be call indices >= 1 (call 0 computes the first residual), got "
                                   f"{list(skip_steps)}")
        if head_blocks < 0 or tail_blocks < 0:
            raise CacheConfigError(f"head_blocks and tail_blocks must be >= 0, got {head_blocks}, {tail_blocks}")
        self.predictor = predictor.eval().requires_grad_(False)
        self.skip_steps = frozenset(steps)
        self.head_blocks, self.tail_blocks = int(head_blocks), int(tail_blocks)
        self.identity = identity
        #: end-to-end training (``core.cache.learned.finetune``): gradients flow through the predictor
        self.trainable = False
        self._state: dict[Hashable, _State] = {}

    @classmethod
    def load(cls, path: str | Path, model: nn.Module, skip_steps: Sequence[int] | None = None) -> LearnedCache:
        """A ``LearnedCache`` from a saved predictor, refusing one trained for another model (both fingerprints are
        named). ``skip_steps`` defaults to the schedule it was trained for."""
        pred, header = load_predictor(path, model)
        meta = header.get("meta", {})
        steps = skip_steps if skip_steps is not None else meta.get("skip_steps")
        if steps is None:
            raise CacheConfigError(f"{Path(path).name} names no skip_steps; pass skip_steps=[...]")
        return cls(pred, steps, head_blocks=meta.get("head_blocks", 1), tail_blocks=meta.get("tail_blocks", 0),
                   identity=header["identity"])

    def config(self) -> dict[str, Any]:
        return {"type": type(self).__name__, "skip_steps": sorted(self.skip_steps), "head_blocks": self.head_blocks,
                "tail_blocks": self.tail_blocks, "predictor": self.predictor.config()}

    def __repr__(self) -> str:
        return (f"LearnedCache(skip_steps={sorted(self.skip_steps)}, head_blocks={self.head_blocks}, "
                f"tail_blocks={self.tail_blocks}, predictor={self.predictor.config()})")

    # ------------------------------------------------------------------ runner interface
    def bind(self, model_name: str | None = None, config_hash: str | None = None, model_sampling: Any = None,
             search_dirs: Sequence[Any] | None = None) -> None:
        super().bind(model_name, config_hash, model_sampling, search_dirs)
        if self.identity is not None and config_hash is not None and self.identity.get("config_hash") != config_hash:
            check_identity(self.identity, {"name": model_name, "config_hash": config_hash,
                                           "weights_hash": "(not checked at apply time)"})

    def block_range(self, num_blocks: int, sigma: float) -> tuple[int, int, Hashable]:
        a, b = self.head_blocks, num_blocks - self.tail_blocks
        if not 0 <= a < b <= num_blocks:
            raise CacheConfigError(f"head_blocks={self.head_blocks} + tail_blocks={self.tail_blocks} leave no block "
                                   f"to predict in a {num_blocks}-block model")
        return a, b, None

    def signal_source(self) -> str | None:
        return None

    def reset(self) -> None:
        super().reset()
        self._state.clear()

    # ------------------------------------------------------------------ the three verbs
    def should_compute(self, x: Feature, sigma: Tensor | float, key: Hashable = None, *,
                       signal: Tensor | None = None, region: Hashable = None) -> bool:
        s = sigma_value(sigma)
        st = self._state.get(key)
        if st is None or starts_new_run(st.sigma, s):
            st = self._state[key] = _State()
            self.stats["runs"] += 1
        h = _hidden(x)
        compute = st.step not in self.skip_steps or st.r_c is None or st.r_c.shape != h.shape
        if not compute and st.r_c.device != h.device:
            compute = True
        if st.step in self.skip_steps and compute:
            self.stats["forced"] += 1
        st.sigma = s
        st.pending = (compute, s)
        self.stats["calls"] += 1
        return compute

    def _take(self, key: Hashable, compute: bool) -> tuple[_State, float]:
        st = self._state.get(key)
        if st is None or st.pending is None:
            raise RuntimeError(f"LearnedCache: call should_compute(x, sigma, key={key!r}) before "
                               f"{'update' if compute else 'predict'}")
        decided, s = st.pending
        if decided != compute:
            raise RuntimeError(f"LearnedCache: should_compute returned {decided} for key {key!r}; call "
                               f"{'update' if decided else 'predict'}")
        st.pending = None
        st.step += 1
        return st, s

    def update(self, x: Feature, out: Feature, key: Hashable = None) -> None:
        st, s = self._take(key, True)
        st.h_c = _hidden(x)
        st.r_c = _hidden(out) - st.h_c
        st.sigma_c = s
        self.stats["computed"] += 1

    def predict(self, x: Feature, key: Hashable = None) -> Feature:
        with torch.set_grad_enabled(self.trainable and torch.is_grad_enabled()):
            return self._predict(x, key)

    def _predict(self, x: Feature, key: Hashable = None) -> Feature:
        st, s = self._take(key, False)
        h = _hidden(x)
        dev = next(self.predictor.parameters()).device
        if dev != h.device:
            self.predictor.to(h.device)
        n = h.shape[0]
        r = self.predictor(h, st.r_c, st.h_c, torch.full((n,), s, device=h.device),
                           torch.full((n,), float(st.sigma_c), device=h.device))
        self.stats["skipped"] += 1
        return _with_hidden(x, h + r)
