"""Automatic calibration of the cache indicators, saved as a small JSON per model and config.

- ``store``: the ``Calibration`` record, its validation, ``save_calibration`` / ``read_calibration`` /
  ``load_calibration`` and where they look (``default_search_dirs``);
- ``recorder``: ``CalibrationRecorder`` (any host records its full-compute runs) and ``fit_calibration`` (TeaCache
  polynomials and MagCache curves);
- ``run``: ``calibrate`` -- one full-compute sampling run of a fewstep ``Denoiser`` with recording hooks.

Nothing here imports the cache hooks (``core.cache.hooks``) or the ComfyUI nodes.
"""

from ..identity import find_denoiser, model_fingerprint
from .recorder import CalibrationRecorder, fit_calibration
from .run import calibrate
from .store import (
    ENV_DIR,
    FORMAT,
    PACKAGE_DIR,
    VERSION,
    Calibration,
    CalibrationError,
    CalibrationMismatchError,
    CalibrationMissingError,
    calibration_filename,
    default_search_dirs,
    load_calibration,
    read_calibration,
    resolve_calibration,
    save_calibration,
    validate_maps,
)

__all__ = [
    "ENV_DIR", "FORMAT", "PACKAGE_DIR", "VERSION", "Calibration", "CalibrationError", "CalibrationMismatchError",
    "CalibrationMissingError", "CalibrationRecorder", "calibrate", "calibration_filename", "default_search_dirs",
    "find_denoiser", "fit_calibration", "load_calibration", "model_fingerprint", "read_calibration",
    "resolve_calibration", "save_calibration", "validate_maps",
]
