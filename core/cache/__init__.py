"""Feature caching: skip recomputing a model (step level) or most of its blocks (block level) when its input barely
changed, and reuse or forecast what it would have produced. Pure torch; patches, never forks.

- ``StepCache`` -- TeaCache / EasyCache / MagCache family on the whole network (any model).
- ``FirstBlockCache`` -- First-Block-Cache and TeaCache on a transformer's block stack.
- ``DeltaDiTCache`` -- Delta-DiT front/back block caching by sampling phase.
- ``forecast="taylor1"/"taylor2"`` on any of them -- TaylorSeer forecasting instead of plain reuse.
- ``calibrate`` / ``save_calibration`` / ``load_calibration`` -- per-model TeaCache polynomials and MagCache curves,
  keyed by model name and config hash; ``CalibrationRecorder`` + ``fit_calibration`` let other hosts (ComfyUI)
  record their own sampling runs and fit the same curves.
- ``apply_cache(model, cache)`` -> ``CacheHandle`` (``remove()`` / context manager).

The state machine (``ResidualCache.should_compute`` / ``update`` / ``predict`` / ``reset``) is host-agnostic: the
torch hooks here and a ComfyUI model wrapper drive the same object.
"""

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
    model_fingerprint,
    read_calibration,
    save_calibration,
)
from .hooks import CacheHandle, apply_cache, find_blocks
from .policy import (
    INDICATORS,
    BlockCache,
    CacheConfigError,
    DeltaDiTCache,
    FirstBlockCache,
    ResidualCache,
    StepCache,
    TaylorForecaster,
)

__all__ = [
    "INDICATORS", "BlockCache", "CacheConfigError", "CacheHandle", "Calibration", "CalibrationError",
    "CalibrationMismatchError", "CalibrationMissingError", "CalibrationRecorder", "DeltaDiTCache", "FirstBlockCache",
    "ResidualCache", "StepCache", "TaylorForecaster", "apply_cache", "calibrate", "default_search_dirs", "find_blocks",
    "fit_calibration", "load_calibration", "model_fingerprint", "read_calibration", "save_calibration",
]
