"""Feature caching: skip recomputing a model (step level) or most of its blocks (block level) when its input barely
changed, and reuse or forecast what it would have produced. Pure torch; patches, never forks.

- ``StepCache`` -- TeaCache / EasyCache / MagCache family on the whole network (any model).
- ``FirstBlockCache`` -- First-Block-Cache and TeaCache on a transformer's block stack.
- ``DeltaDiTCache`` -- Delta-DiT front/back block caching by sampling phase.
- ``CFGBranchCache`` -- FasterCache's CFG reuse: the unconditional branch reused across steps (on a ``CFGDenoiser``).
- ``forecast="taylor1"/"taylor2"`` on any of them -- TaylorSeer forecasting instead of plain reuse.
- ``calibrate`` / ``save_calibration`` / ``load_calibration`` -- per-model TeaCache polynomials and MagCache curves,
  keyed by model name and config hash; ``CalibrationRecorder`` + ``fit_calibration`` let other hosts (ComfyUI)
  record their own sampling runs and fit the same curves.
- ``apply_cache(model, cache)`` -> ``CacheHandle`` (``remove()`` / context manager).

Layout (one job per module; no module imports a host):

- ``options`` (validation, ``CacheConfigError``), ``tensors`` (per-row helpers), ``forecast`` (TaylorSeer);
- ``indicators/`` -- one file per indicator (``teacache``: input/teacache, ``easycache``, ``magcache``,
  ``first_block``, ``interval``), each a class with its per-slot fields, its estimate, its update and its
  calibration key; ``INDICATOR_CLASSES`` is the registry;
- ``state`` -- ``ResidualCache``, the skip-or-compute state machine (``should_compute`` / ``update`` / ``predict`` /
  ``reset``), state per branch key, slot, region and row; ``caches`` -- ``StepCache``, ``BlockCache``,
  ``FirstBlockCache``, ``DeltaDiTCache`` (which unit is cached, which indicators fit);
- ``runner`` -- ``BlockRangeRunner``, the block-level skip algorithm that every host calls (below);
- ``layouts`` -- block layouts declared per architecture (``register_block_layout``), for diffusers and ComfyUI;
- ``identity`` -- ``find_denoiser``, ``model_fingerprint`` (config), ``weights_fingerprint`` (weight values);
- ``calibration/`` -- ``store`` (record, validation, files), ``recorder`` (record + fit), ``run`` (``calibrate``);
- ``hooks`` -- ``apply_cache``: the torch/diffusers host (denoiser ``call`` wrapper, module forward, block forwards).

Runner API (host-independent; ``nodes/cache_wrappers.py`` and ``hooks`` both drive it, so a new cache -- e.g. a
learned one -- plugs in as a ``BlockCache`` / ``ResidualCache`` subclass and runs on every host):

.. code-block:: python

    # step level: the state machine's three verbs (or cache(fn, x, sigma, key) for all three)
    if cache.should_compute(x, sigma, key=branch, signal=None):
        out = model(x); cache.update(x, out, key=branch)      # residual out - x kept per branch and row
    else:
        out = cache.predict(x, key=branch)                    # x + cached / forecast residual

    # block level: one BlockRangeRunner per model and run
    runner = BlockRangeRunner(block_cache, num_blocks)
    runner.begin(sigma, key=branch)                  # each model call
    for i in range(num_blocks):
        skipped = runner.before(i, streams, hidden)  # streams: tuple entering block i (hidden first); hidden: image
        if skipped is not None:                      #   tokens entering block i
            streams = skipped; continue              # block i not run: streams leaving it
        streams = run_block(i, streams)
        runner.ran(i, streams if runner.wants_output(i) else None)
    runner.end()

``BlockCache`` subclasses choose the cached range per call (``block_range(num_blocks, sigma) -> (a, b, region)``) and
the indicator's signal (``signal_source()``: ``"head_residual"``, ``"modulated"``, ``"range_input"`` or None);
``ResidualCache.update`` / ``predict`` keep and return the range's residual (TaylorSeer via ``forecast``). State
discipline: ``cache.reset()`` drops every tensor (hosts call it at the start and end of a run); state never crosses
branch keys, rows, shapes or regions; ``stats`` counts ``calls``, ``computed``, ``skipped``, ``forced``, ``runs`` (and
``blocks_run`` / ``blocks_skipped`` for block caches).
"""

from .caches import BlockCache, CFGBranchCache, DeltaDiTCache, FirstBlockCache, StepCache
from .calibration import (
    Calibration,
    CalibrationError,
    CalibrationMismatchError,
    CalibrationMissingError,
    CalibrationRecorder,
    calibrate,
    default_search_dirs,
    fit_calibration,
    load_calibration,
    read_calibration,
    save_calibration,
)
from .forecast import TaylorForecaster
from .hooks import CacheHandle, apply_cache
from .identity import find_denoiser, model_fingerprint, weights_fingerprint
from .indicators import INDICATORS
from .layouts import BlockLayout, BlockList, find_blocks, register_block_layout
from .options import CacheConfigError
from .runner import BlockRangeRunner
from .state import ResidualCache

__all__ = [
    "INDICATORS", "BlockCache", "BlockLayout", "BlockList", "BlockRangeRunner", "CFGBranchCache", "CacheConfigError",
    "CacheHandle",
    "Calibration", "CalibrationError", "CalibrationMismatchError", "CalibrationMissingError", "CalibrationRecorder",
    "DeltaDiTCache", "FirstBlockCache", "ResidualCache", "StepCache", "TaylorForecaster", "apply_cache", "calibrate",
    "default_search_dirs", "find_blocks", "find_denoiser", "fit_calibration", "load_calibration",
    "model_fingerprint", "read_calibration", "register_block_layout", "save_calibration", "weights_fingerprint",
]
