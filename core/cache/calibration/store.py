"""Calibration files: the ``Calibration`` record, its validation, and where it is saved and looked up.

A calibration is keyed by the model's name and a hash of its configuration (``core.cache.identity``):
``<name>--<hash>.json``. A cache that needs one looks it up by both; none for the model raises
``CalibrationMissingError`` (with the call that makes one), one for another configuration raises
``CalibrationMismatchError`` -- never another model's numbers silently. Every value is validated on load (finite, in
range): a bad file is refused with its path, the key, the value, the allowed range and the fix.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ...io import write_text

FORMAT = "fewstep.cache.calibration"
VERSION = 1
PACKAGE_DIR = Path(__file__).resolve().parent.parent / "calibrations"
ENV_DIR = "FEWSTEP_CALIBRATION_DIR"
FIX = "recalibrate the model (fewstep.core.cache.calibrate / the 'fewstep cache calibration' node) or delete the file"


class CalibrationError(ValueError):
    """A calibration is unusable for this model (base class)."""


class CalibrationMissingError(CalibrationError, LookupError):
    """No calibration exists for this model (the message says how to make one)."""


class CalibrationMismatchError(CalibrationError):
    """A calibration exists but was made for another model or configuration."""


def _slug(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)


def calibration_filename(model_name: str, config_hash: str) -> str:
    return f"{_slug(model_name)}--{config_hash}.json"


def default_search_dirs() -> list[Path]:
    """``$FEWSTEP_CALIBRATION_DIR``, ``~/.cache/fewstep/calibrations``, then the calibrations shipped in the package."""
    dirs = []
    if os.environ.get(ENV_DIR):
        dirs.append(Path(os.environ[ENV_DIR]))
    dirs.append(Path.home() / ".cache" / "fewstep" / "calibrations")
    dirs.append(PACKAGE_DIR)
    return dirs


# ------------------------------------------------------------------------------------------------ validation
def _bad(source: str, key: str, value: Any, allowed: str) -> CalibrationError:
    shown = repr(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else type(value).__name__
    return CalibrationError(f"calibration {source}: {key} = {shown} is invalid (allowed: {allowed}); {FIX}")


def _numbers(source: str, key: str, values: Any, allowed: str = "finite numbers", minimum: float | None = None,
             length: int | None = None) -> list[float]:
    if not isinstance(values, list) or not values or (length is not None and len(values) != length):
        n = f"{length} " if length is not None else "a non-empty list of "
        got = type(values).__name__ + (f" of length {len(values)}" if isinstance(values, list) else "")
        raise CalibrationError(f"calibration {source}: {key} must be {n}numbers, got {got}; {FIX}")
    out = []
    for i, v in enumerate(values):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise _bad(source, f"{key}[{i}]", v, allowed)
        if not math.isfinite(v) or (minimum is not None and v < minimum):
            raise _bad(source, f"{key}[{i}]", v, allowed)
        out.append(float(v))
    return out


def validate_maps(source: str, polys: Any, poly_range: Any, mag: Any) -> None:
    """Refuse NaN / infinite / out-of-range calibration values (a NaN switches a cache off, a polynomial that is never
    positive on its range makes it skip almost every step). Raises ``CalibrationError`` naming ``source``, the key,
    the value, the allowed range and the fix."""
    for name, part in (("polys", polys), ("poly_range", poly_range), ("mag", mag)):
        if not isinstance(part, dict):
            raise CalibrationError(f"calibration {source}: {name} must be an object, got {type(part).__name__}; {FIX}")
    for signal, coeffs in polys.items():
        c = _numbers(source, f"polys.{signal}", coeffs)
        lo, hi = _numbers(source, f"poly_range.{signal}", poly_range.get(signal, [0.0, 1.0]),
                          "finite relative changes >= 0", minimum=0.0, length=2)
        if lo > hi:
            raise CalibrationError(f"calibration {source}: poly_range.{signal} = [{lo!r}, {hi!r}] has lo > hi "
                                   f"(allowed: 0 <= lo <= hi); {FIX}")
        with np.errstate(all="ignore"):
            ys = np.polyval(np.asarray(c, dtype=np.float64), np.linspace(lo, hi, 257))
        if not np.isfinite(ys).all():
            raise _bad(source, f"polys.{signal}", float(ys[~np.isfinite(ys)][0]), "finite on its poly_range")
        if float(ys.max()) <= 0.0:
            raise _bad(source, f"polys.{signal} (max on poly_range)", float(ys.max()),
                       "a positive rescaled change somewhere on poly_range; a polynomial <= 0 would skip every step")
    for curve, pts in mag.items():
        if not isinstance(pts, dict):
            raise CalibrationError(f"calibration {source}: mag.{curve} must be an object with log_sigma and "
                                   f"log_norm; {FIX}")
        xs = _numbers(source, f"mag.{curve}.log_sigma", pts.get("log_sigma"))
        _numbers(source, f"mag.{curve}.log_norm", pts.get("log_norm"), length=len(xs))
        if any(b < a for a, b in zip(xs, xs[1:])):
            raise CalibrationError(f"calibration {source}: mag.{curve}.log_sigma is not ascending (allowed: sorted "
                                   f"log sigmas); {FIX}")


# ------------------------------------------------------------------------------------------------ the record
@dataclass
class Calibration:
    """Fitted indicator maps of one model: TeaCache polynomials and MagCache log-magnitude curves.

    ``polys[signal]`` are ``numpy.polyfit`` coefficients (highest power first) mapping the relative L1 change of
    ``signal`` (``input``, ``modulated``, ``range_input``) to the relative L1 change of the network output, fitted on
    ``poly_range[signal]`` (extended proportionally to the input outside it).
    The per-step changes depend on the step count, so calibrate with a schedule like the one you sample with
    (``recipe`` records it). ``mag[curve]`` holds ``log_sigma`` (ascending) and ``log_norm`` for ``step`` (network
    residual) and ``blocks:<h>`` (residual of blocks ``[h, N)``). ``weights`` is the weights fingerprint of the
    model where the host keys calibrations by weights too (ComfyUI), else empty.
    """

    model: str
    config_hash: str
    polys: dict[str, list[float]] = field(default_factory=dict)
    poly_range: dict[str, list[float]] = field(default_factory=dict)
    mag: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    recipe: dict[str, Any] = field(default_factory=dict)
    curves: dict[str, list[float]] = field(default_factory=dict)
    weights: str = ""

    def poly(self, signal: str) -> Callable[[Tensor], Tensor]:
        """TeaCache's rescaled distance for ``signal``: ``max(poly(x), 0)`` on the fitted range (where ``calibrate``
        made it non-decreasing); outside it proportional to ``x`` (polynomials extrapolate wildly): ``poly(lo) x / lo``
        below and ``poly(hi) x / hi`` above, so a change larger than any seen in calibration never looks small."""
        if signal not in self.polys:
            raise CalibrationError(
                f"calibration of {self.model!r} has no TeaCache polynomial for signal {signal!r} (it has "
                f"{sorted(self.polys)}); recalibrate with calibrate(...) on the same model (block signals need a "
                "model with a transformer_blocks list)")
        coeffs = np.asarray(self.polys[signal], dtype=np.float64)
        lo, hi = self.poly_range.get(signal, [0.0, 1.0])
        y_lo = max(float(np.polyval(coeffs, lo)), 0.0)
        y_hi = max(float(np.polyval(coeffs, np.linspace(lo, hi, 257)).max()), 0.0)  # = poly(hi) when monotone

        def rescale(x: Tensor) -> Tensor:
            xs = x.detach().double().cpu().numpy()
            y = np.clip(np.polyval(coeffs, np.clip(xs, lo, hi)), 0.0, None)
            y = np.where(xs < lo, y_lo * xs / max(lo, 1e-12), y)
            y = np.where(xs > hi, y_hi * xs / max(hi, 1e-12), y)
            return torch.as_tensor(y, dtype=torch.float32, device=x.device)

        return rescale

    def mag_curve(self, curve: str) -> Callable[[float], float]:
        """``sigma -> L(log sigma)`` by linear interpolation (clamped at the ends) for ``curve``."""
        if curve not in self.mag:
            raise CalibrationError(
                f"calibration of {self.model!r} has no MagCache curve {curve!r} (it has {sorted(self.mag)}); "
                f"recalibrate with calibrate(..., head_blocks=...) matching the cache's head_blocks")
        xs = np.asarray(self.mag[curve]["log_sigma"], dtype=np.float64)
        ys = np.asarray(self.mag[curve]["log_norm"], dtype=np.float64)

        def curve_fn(sigma: float) -> float:
            return float(np.interp(math.log(max(float(sigma), 1e-12)), xs, ys))

        return curve_fn

    def validate(self, source: str = "<in memory>") -> Calibration:
        """Raise ``CalibrationError`` on NaN / infinite / out-of-range values (see ``validate_maps``)."""
        validate_maps(source, self.polys, self.poly_range, self.mag)
        return self

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "version": VERSION, **asdict(self)}

    @classmethod
    def from_dict(cls, data: Any, source: str = "<dict>") -> Calibration:
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise CalibrationError(f"{source} is not a fewstep cache calibration (no \"format\": \"{FORMAT}\" "
                                   "field); pick a file written by calibrate / the 'fewstep cache calibration' node")
        version = data.get("version", 0)
        if isinstance(version, bool) or not isinstance(version, int):
            raise CalibrationError(f"calibration {source}: version must be an integer; {FIX}")
        if version > VERSION:
            raise CalibrationError(f"{source} has calibration format version {version}; this fewstep reads "
                                   f"up to {VERSION}: upgrade fewstep or recalibrate")
        for key in ("model", "config_hash"):
            if not isinstance(data.get(key), str):
                raise CalibrationError(f"calibration {source}: {key} must be a string; {FIX}")
        keys = {"model", "config_hash", "polys", "poly_range", "mag", "recipe", "curves", "weights"}
        return cls(**{k: v for k, v in data.items() if k in keys}).validate(source)

    def check(self, model_name: str | None, config_hash: str | None) -> None:
        """Raise ``CalibrationMismatchError`` unless this calibration is for ``model_name`` / ``config_hash``."""
        if model_name is not None and model_name != self.model:
            raise CalibrationMismatchError(
                f"calibration is for model {self.model!r} but the cache is applied to {model_name!r}; calibrate "
                f"this model with fewstep.core.cache.calibrate(...) instead of reusing another model's numbers")
        if config_hash is not None and config_hash != self.config_hash:
            raise CalibrationMismatchError(
                f"calibration of {self.model!r} was made for config hash {self.config_hash} but this model has "
                f"config hash {config_hash} (another size, config{', weights' if self.weights else ''} or model "
                "sampling); recalibrate it with fewstep.core.cache.calibrate(...) and save_calibration(...)")


# ------------------------------------------------------------------------------------------------ files
def save_calibration(cal: Calibration, directory: str | Path | None = None) -> Path:
    """Write ``<directory>/<name>--<hash>.json`` atomically (default: ``$FEWSTEP_CALIBRATION_DIR`` or
    ``~/.cache/fewstep/calibrations``). Refuses invalid values (``Calibration.validate``)."""
    cal.validate(f"for {cal.model!r}")
    out = Path(directory) if directory is not None else default_search_dirs()[0]
    out.mkdir(parents=True, exist_ok=True)
    path = out / calibration_filename(cal.model, cal.config_hash)
    write_text(path, json.dumps(cal.to_dict(), indent=1))
    return path


def read_calibration(path: str | Path) -> Calibration:
    """Load and validate one calibration JSON file (errors name the file, never echo its contents)."""
    path = Path(path)
    if not path.is_file():
        raise CalibrationMissingError(f"calibration file {path} does not exist")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        where = f" (line {e.lineno}, column {e.colno})" if isinstance(e, json.JSONDecodeError) else ""
        raise CalibrationError(f"{path} is not valid JSON{where}; delete it and recalibrate") from None
    return Calibration.from_dict(data, source=str(path))


def load_calibration(model_name: str, config_hash: str | None = None,
                     search_dirs: Sequence[str | Path] | None = None) -> Calibration:
    """Find the calibration of ``model_name`` (and ``config_hash`` if given) in ``search_dirs``.

    Raises ``CalibrationMissingError`` if there is none for the model (listing the models that have one) and
    ``CalibrationMismatchError`` if the only ones are for other config hashes.
    """
    dirs = [Path(d) for d in (search_dirs if search_dirs is not None else default_search_dirs())]
    found: list[Path] = []
    for d in dirs:
        if config_hash is not None and (d / calibration_filename(model_name, config_hash)).exists():
            cal = read_calibration(d / calibration_filename(model_name, config_hash))
            cal.check(model_name, config_hash)
            return cal
        found += sorted(d.glob(f"{_slug(model_name)}--*.json")) if d.is_dir() else []
    if found and config_hash is None:
        return read_calibration(found[0])
    if found:
        hashes = sorted({p.stem.split("--")[-1] for p in found})
        raise CalibrationMismatchError(
            f"calibrations for model {model_name!r} exist for config hash(es) {hashes} ({found[0].parent}), but this "
            f"model has config hash {config_hash} (another size, config, weights or model sampling); recalibrate it: "
            "cal = fewstep.core.cache.calibrate(denoiser, noise, extra_args); save_calibration(cal)")
    known = sorted({p.name.split("--")[0] for d in dirs if d.is_dir() for p in d.glob("*--*.json")})
    raise CalibrationMissingError(
        f"no cache calibration for model {model_name!r} (config hash {config_hash}) in "
        f"{', '.join(map(str, dirs))}; calibrations exist for: {known or 'no model'}. Make one (one full-compute "
        "sampling run of a few classes/prompts): cal = fewstep.core.cache.calibrate(denoiser, noise, extra_args); "
        "save_calibration(cal) -- or use an indicator that needs none ('input', 'easycache', 'first_block').")


def resolve_calibration(calibration: Any, model_name: str | None, config_hash: str | None,
                        search_dirs: Sequence[str | Path] | None = None, needed_by: str = "this cache"
                        ) -> Calibration:
    """A ``Calibration`` from an object, a path or a lookup by model name + hash, checked against the model."""
    if isinstance(calibration, Calibration):
        cal = calibration
    elif isinstance(calibration, (str, Path)):
        cal = read_calibration(calibration)
    elif calibration is None:
        if model_name is None:
            raise CalibrationMissingError(
                f"{needed_by} needs a calibration but knows no model to look it up for: pass calibration=... or "
                "apply it with fewstep.core.cache.apply_cache(model, cache) (or cache.bind(model_name, config_hash))")
        cal = load_calibration(model_name, config_hash, search_dirs)
    else:
        raise TypeError(f"calibration must be a Calibration, a path or None, got {type(calibration).__name__}")
    cal.check(model_name, config_hash)
    return cal
