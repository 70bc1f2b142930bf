"""Validate what users pass, once, at the boundary, with a message naming the value, the allowed range and the fix.

Two kinds of checks live here (stdlib + numpy only, so the ONNX runtime can use them without torch):

- ``argparse`` types for the command line (``positive_int``, ``nonneg_int``, ``finite_float``, ...): a bad flag is
  an argparse error (``fewstep export: error: argument --steps: ...``), never a silent substitution;
- checks for the Python API: class labels (:func:`check_class_labels`) and guidance / adapter scales against the
  range a model was trained for (:func:`check_scale`: an error when NaN/inf, a warning when outside the range).
"""

from __future__ import annotations

import argparse
import math
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np

__all__ = ["positive_int", "nonneg_int", "positive_float", "nonneg_float", "finite_float", "int_in",
           "check_class_labels", "check_scale", "check_positive_int", "OPSET_RANGE", "check_opset", "CFG_RANGE"]

#: guidance scales CFG is used with in practice (fewstep's convention, 1 = no guidance); outside: a warning
CFG_RANGE = (0.0, 20.0)

#: ONNX opsets the exporter accepts: torch's dynamo exporter writes opset 18 and newer
OPSET_RANGE = (18, 23)


def _number(text: str, kind: type) -> Any:
    try:
        return kind(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    v = _number(text, int)
    if v < 1:
        raise argparse.ArgumentTypeError(f"{v} is not allowed: give an integer >= 1")
    return v


def nonneg_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    v = _number(text, int)
    if v < 0:
        raise argparse.ArgumentTypeError(f"{v} is not allowed: give an integer >= 0")
    return v


def finite_float(text: str) -> float:
    """argparse type: a finite number (no nan/inf)."""
    v = _number(text, float)
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"{text} is not allowed: give a finite number")
    return v


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    v = finite_float(text)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"{v:g} is not allowed: give a number > 0")
    return v


def nonneg_float(text: str) -> float:
    """argparse type: a finite number >= 0."""
    v = finite_float(text)
    if v < 0:
        raise argparse.ArgumentTypeError(f"{v:g} is not allowed: give a number >= 0")
    return v


def int_in(lo: int, hi: int, hint: str = "") -> Callable[[str], int]:
    """argparse type: an integer in ``lo..hi``."""

    def parse(text: str) -> int:
        v = _number(text, int)
        if not lo <= v <= hi:
            raise argparse.ArgumentTypeError(f"{v} is outside {lo}..{hi}{' (' + hint + ')' if hint else ''}")
        return v

    parse.__name__ = f"int in {lo}..{hi}"
    return parse


def check_positive_int(name: str, value: Any, minimum: int = 1) -> int:
    """``value`` as an int >= ``minimum`` for the Python API (``ValueError`` naming ``name`` otherwise)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def check_opset(opset: int | None) -> int | None:
    """``opset`` unless outside :data:`OPSET_RANGE` (``ValueError``; ``None`` = the exporter's default)."""
    if opset is None:
        return None
    lo, hi = OPSET_RANGE
    try:
        import onnx

        hi = max(hi, int(onnx.defs.onnx_opset_version()))
    except ImportError:
        pass
    if isinstance(opset, bool) or not isinstance(opset, (int, np.integer)) or not lo <= opset <= hi:
        raise ValueError(f"ONNX opset {opset!r} is not supported: the exporter writes opsets {lo}..{hi} "
                         "(omit it for the default)")
    return int(opset)


def check_class_labels(labels: Any, batch: int | None, num_classes: int, null: int | None = None,
                       what: str = "class labels") -> np.ndarray:
    """Class ids as an int64 array of length ``batch`` (a single id is repeated).

    Raises ``ValueError`` naming the problem: not integers (float/bool dtype), a count that is neither 1 nor
    ``batch``, or ids outside ``0..num_classes - 1`` (``null`` = the unconditional id is also allowed).
    Accepts ints, lists, numpy arrays and torch tensors (read through ``.tolist()``/``dtype``).
    """
    dtype = getattr(labels, "dtype", None)
    if dtype is not None:
        name = str(dtype).replace("torch.", "")
        if not (name.startswith("int") or name.startswith("uint")):
            raise ValueError(f"{what} must be integer class ids, got dtype {name} (cast with .long() / "
                             ".astype(np.int64))")
        values = labels.tolist() if hasattr(labels, "tolist") else list(labels)
    else:
        values = labels
    arr = np.asarray(values, dtype=object).reshape(-1)
    if any(isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)) for v in arr.tolist()):
        bad = next(v for v in arr.tolist() if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)))
        raise ValueError(f"{what} must be integer class ids, got {bad!r}")
    y = arr.astype(np.int64)
    if batch is not None:
        if y.size == 1 and batch > 1:
            y = np.repeat(y, batch)
        elif y.size != batch:
            raise ValueError(f"got {y.size} {what} for a batch of {batch}: pass one label per sample or a single "
                             "label for the whole batch")
    allowed = set(range(int(num_classes))) | ({int(null)} if null is not None else set())
    if bad := sorted(set(y.tolist()) - allowed):
        raise ValueError(f"{what} must be in 0..{num_classes - 1}"
                         + (f" (or {null} = unconditional)" if null is not None else "") + f", got {bad}")
    return y


def check_scale(w: Any, trained: tuple[float, float] | None, what: str = "guidance scale",
                source: str = "the range the model was trained for") -> None:
    """Error when a scale is NaN/inf; a ``UserWarning`` when outside the ``trained`` ``(min, max)`` range.

    ``w``: a number, a sequence, or a numpy/torch array of per-sample scales; ``source`` names the range in the
    warning.
    """
    values = w.tolist() if hasattr(w, "tolist") else w
    vals = np.asarray(values, dtype=np.float64).reshape(-1)
    if vals.size and not np.isfinite(vals).all():
        bad = [float(v) for v in vals if not math.isfinite(float(v))][:4]
        raise ValueError(f"{what} must be a finite number, got {bad}")
    if trained is None or not vals.size:
        return
    lo, hi = float(trained[0]), float(trained[1])
    out = vals[(vals < lo) | (vals > hi)]
    if out.size:
        warnings.warn(f"{what} {sorted(set(out.tolist()))[:4]} is outside {lo:g}..{hi:g}, {source}; results there "
                      "are not validated", UserWarning, stacklevel=3)
