"""Record a host's full-compute sampling runs and fit the calibration maps:

- TeaCache's rescaling polynomial (Liu et al. 2024, arXiv:2411.19108, Eq. 5): ``y ~ poly(x)`` where ``x`` is the
  relative L1 change between consecutive steps of an indicator signal (the network input, the timestep-modulated
  input of the first block, or the hidden state entering the cached block range) and ``y`` the relative L1 change of
  the network output, by least squares (``numpy.polyfit``) over every row and step, of the highest degree up to
  ``degree`` (4, as TeaCache) that is non-decreasing on the data's range;
- MagCache's magnitude curve (Ma et al. 2025, arXiv:2506.09045): ``L(sigma) = mean_rows log mean|r|`` of the residual
  ``r`` (network output minus input; block-stack output minus its input), so that the magnitude ratio between any
  two steps of any schedule is ``exp(L(sigma_b) - L(sigma_a))`` (MagCache's per-step ratios ``gamma_t``, made
  schedule-independent by interpolating in log sigma).

No host code here: ``core.cache.calibration.run.calibrate`` (torch hooks) and ComfyUI's calibration node drive the
recorder.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..tensors import rel_l1, row_mean_abs
from .store import Calibration, CalibrationError


class CalibrationRecorder:
    """Per-call measurements of one or more full-compute sampling runs, for ``fit_calibration``.

    A host (``calibrate`` here, a ComfyUI wrapper in ``nodes/caches.py``) calls ``begin(sigma)`` at each model call,
    then ``change(name, tensor, key)`` for signals whose relative L1 change between consecutive calls is wanted
    (``input``, ``output``, ``modulated``, ``range_input``) and ``norm(name, tensor)`` for residuals whose log
    magnitude is wanted (``step``, ``blocks:<h>``). ``key`` separates call sites (guidance branches called
    separately): a change is always measured against the previous call with the same key. ``new_run()`` starts
    another sampling run (changes are never measured across runs).
    """

    def __init__(self) -> None:
        self.prev: dict[Any, Tensor] = {}
        self.rows: list[dict[str, Any]] = []
        self.cur: dict[str, Any] = {}
        self.runs = 1

    def begin(self, sigma: float) -> dict[str, Any]:
        """Start the record of one model call at ``sigma``."""
        self.cur = {"sigma": float(sigma)}
        self.rows.append(self.cur)
        return self.cur

    def new_run(self) -> None:
        self.prev.clear()
        self.runs += 1

    def change(self, name: str, t: Tensor, key: Any = None) -> None:
        t = t.detach().float()
        prev = self.prev.get((name, key))
        if prev is not None and prev.shape == t.shape:
            self.cur[f"{name}_rel"] = rel_l1(t, prev).cpu()
        self.prev[(name, key)] = t

    def norm(self, name: str, t: Tensor) -> None:
        self.cur[f"{name}_norm"] = row_mean_abs(t).clamp_min(1e-12).log().mean().item()



def _polyfit(x: np.ndarray, y: np.ndarray, degree: int) -> tuple[list[float], list[float], float]:
    """Least-squares polynomial ``y ~ poly(x)`` of the highest degree <= ``degree`` that is non-decreasing on the
    data's range (a larger input change must not predict a smaller output change; high degrees wiggle at the edges
    of noisy data). Degree 0 (the mean) if not even a line rises."""
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    if x.size < degree + 2:
        raise CalibrationError(f"too few calibration points ({x.size}) for a degree-{degree} fit; use more steps")
    grid = np.linspace(x.min(), x.max(), 257)
    coeffs = np.array([y.mean()])
    for d in range(degree, 0, -1):
        c = np.polyfit(x, y, d)
        v = np.polyval(c, grid)
        if np.all(np.diff(v) >= -1e-9 * max(np.abs(v).max(), 1e-12)):
            coeffs = c
            break
    rmse = float(np.sqrt(np.mean((np.polyval(coeffs, x) - y) ** 2)))
    return [float(c) for c in coeffs], [float(x.min()), float(x.max())], rmse


def fit_calibration(rec: CalibrationRecorder, model_name: str, config_hash: str, *, degree: int = 4,
                    curves: Sequence[str] = ("step",)) -> Calibration:
    """Fit TeaCache polynomials (every recorded ``<signal>_rel`` against ``output_rel``) and MagCache log-magnitude
    curves (``curves``, from ``<curve>_norm``) to a recorder's rows; see the module docstring."""
    cal = Calibration(model=model_name, config_hash=config_hash)
    target = [r.get("output_rel") for r in rec.rows]
    for signal in ("input", "modulated", "range_input"):
        pairs = [(r[f"{signal}_rel"], y) for r, y in zip(rec.rows, target) if f"{signal}_rel" in r and y is not None]
        if not pairs:
            continue
        xs = torch.cat([p[0] for p in pairs]).numpy().astype(np.float64)
        ys = torch.cat([p[1] for p in pairs]).numpy().astype(np.float64)
        coeffs, rng, rmse = _polyfit(xs, ys, degree)
        cal.polys[signal], cal.poly_range[signal] = coeffs, rng
        cal.recipe[f"poly_rmse_{signal}"] = rmse
        cal.recipe[f"poly_degree_{signal}"] = len(coeffs) - 1
        cal.curves[f"{signal}_rel"] = [float(p[0].mean()) for p in pairs]
    cal.curves["output_rel"] = [float(y.mean()) for y in target if y is not None]
    for curve in curves:
        pts = sorted((math.log(max(r["sigma"], 1e-12)), r[f"{curve}_norm"]) for r in rec.rows if f"{curve}_norm" in r)
        if pts:
            cal.mag[curve] = {"log_sigma": [p[0] for p in pts], "log_norm": [p[1] for p in pts]}
    cal.curves["sigma"] = [r["sigma"] for r in rec.rows]
    return cal
