"""The block-range runner: the block-level skip algorithm, once, for every host.

A host (the diffusers hooks in ``core.cache.hooks``, ComfyUI's ``patches_replace["dit"]`` wrappers in
``nodes/cache_wrappers.py``) walks a model call's block stack and asks the runner at each block what to do; the
runner asks the ``BlockCache`` state machine (``core.cache.state``) whether the cached range may be skipped, returns
``input + cached residual`` (or its TaylorSeer forecast, ``core.cache.forecast``) at the range's first block, passes
the state through the rest of the range, and records the range's residual after a full compute:

.. code-block:: python

    runner = BlockRangeRunner(cache, num_blocks)        # one per model (clone) and run; validates the range
    runner.begin(sigma, key)                            # a model call starts (key: its guidance branch)
    for i, block in enumerate(blocks):
        skipped = runner.before(i, state, hidden)       # state: tuple of the streams entering block i, hidden first
        if skipped is not None:                         # hidden: the image tokens entering block i (head/range signal)
            state = skipped                             # the streams leaving block i, without running it
            continue
        state = block(state)
        runner.ran(i, state if runner.wants_output(i) else None)
    runner.end()

The state tuples are what the cache keeps residuals of: ``(hidden, encoder_hidden)`` for diffusers' dual-stream
blocks, ``(img, txt)`` for ComfyUI's; a host that changes the stream layout inside the range (Flux's concatenation of
text and image tokens before its single blocks) maps the output back to the input layout before ``ran``.
``set_modulated(t)`` feeds TeaCache's modulated input (the first block's adaLN output) when the cache reads it.
"""

from __future__ import annotations

from collections.abc import Hashable

from torch import Tensor

from .caches import BlockCache
from .options import CacheConfigError
from .tensors import sigma_value

Streams = tuple[Tensor | None, ...]


class _Call:
    __slots__ = ("sigma", "key", "a", "b", "region", "compute", "head_in", "modulated", "range_in")

    def __init__(self, sigma: float, key: Hashable, a: int, b: int, region: Hashable) -> None:
        self.sigma, self.key, self.a, self.b, self.region = sigma, key, a, b, region
        self.compute = True
        self.head_in: Tensor | None = None
        self.modulated: Tensor | None = None
        self.range_in: Streams | None = None


class BlockRangeRunner:
    """Drives a ``BlockCache`` over one model's block stack (see the module docstring for the protocol).

    Args:
        cache: a ``FirstBlockCache``, ``DeltaDiTCache`` or another ``BlockCache`` (its state: per branch key, slot
            and region, reset per run by the host through ``cache.reset()``).
        num_blocks: blocks in the stack; ``cache.block_range`` is validated against it now.
    """

    def __init__(self, cache: BlockCache, num_blocks: int) -> None:
        if not isinstance(cache, BlockCache):
            raise TypeError(f"BlockRangeRunner needs a BlockCache, got {type(cache).__name__}")
        self.cache = cache
        self.num_blocks = num_blocks
        self.source = cache.signal_source()
        self.observed = cache.observed_blocks()
        self.call: _Call | None = None
        cache.block_range(num_blocks, float("inf"))  # head_blocks / num_blocks against this model now

    @property
    def active(self) -> bool:
        """Whether a model call is in progress (between ``begin`` and ``end``)."""
        return self.call is not None

    def begin(self, sigma: Tensor | float, key: Hashable = None) -> None:
        """A model call at ``sigma`` for branch ``key`` starts: picks the cached range for this sigma."""
        s = sigma_value(sigma)
        a, b, region = self.cache.block_range(self.num_blocks, s)
        if self.source == "modulated" and a < 1:
            raise CacheConfigError("signal 'modulated' needs the first block to run before the cached range")
        self.call = _Call(s, key, a, b, region)

    def end(self) -> None:
        """The model call ended (also after an exception): nothing of it is kept but the cache's state."""
        self.call = None

    def set_modulated(self, t: Tensor) -> None:
        if self.call is not None:
            self.call.modulated = t

    def _signal(self, c: _Call, hidden: Tensor) -> Tensor | None:
        if self.source == "head_residual":
            return hidden - c.head_in
        if self.source == "modulated":
            return c.modulated
        if self.source == "range_input":
            return hidden
        return None

    def before(self, i: int, state: Streams, hidden: Tensor) -> Streams | None:
        """Before block ``i``: None = run it (then ``ran``); a tuple = the streams leaving it, block not run."""
        c = self.call
        if c is None:
            return None
        if i == 0:
            c.head_in = hidden
        if i == c.a:
            cache = self.cache
            c.compute = cache.should_compute(state, c.sigma, c.key, signal=self._signal(c, hidden), region=c.region)
            if not c.compute:  # input + cached residual here, identity for the rest of the range
                cache.stats["blocks_skipped"] += c.b - c.a
                return tuple(cache.predict(state, c.key))
            c.range_in = state
        elif c.a < i < c.b and not c.compute:
            return state
        return None

    def wants_output(self, i: int) -> bool:
        """Whether ``ran(i, ...)`` needs the streams leaving block ``i`` (the end of a computed range)."""
        c = self.call
        return c is not None and c.range_in is not None and (i == c.b - 1 or i in self.observed)

    def ran(self, i: int, state_out: Streams | None = None) -> None:
        """Block ``i`` ran; ``state_out`` (in the layout of the range's input) where ``wants_output(i)``."""
        c = self.call
        if c is None:
            return
        self.cache.stats["blocks_run"] += 1
        if i in self.observed and c.range_in is not None and state_out is not None:
            self.cache.observe(i, state_out, c.key)
        if i == c.b - 1 and c.range_in is not None:
            if state_out is None:
                raise RuntimeError(f"BlockRangeRunner.ran({i}) ends the cached range: pass the streams leaving it")
            self.cache.update(c.range_in, state_out, c.key)
            c.range_in = None
