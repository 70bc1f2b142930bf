"""Check an exported graph against torch: run it on onnxruntime (CPU) and compare with the torch output."""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np

__all__ = ["EXTERNAL_DATA_THRESHOLD", "have_ort", "ort_run", "rel_err", "verify_export"]

#: models above this are saved with external data (protobuf's hard limit is 2 GiB) and are not run in memory here
EXTERNAL_DATA_THRESHOLD = 1_800_000_000


def have_ort() -> bool:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def ort_run(proto: Any, feeds: dict[str, np.ndarray], output: str) -> np.ndarray | None:
    """``output`` of the in-memory model ``proto`` on onnxruntime's CPU provider; ``None`` without onnxruntime or
    above :data:`EXTERNAL_DATA_THRESHOLD`."""
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    if proto.ByteSize() > EXTERNAL_DATA_THRESHOLD:
        return None
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run([output], feeds)[0]


def rel_err(a: np.ndarray, ref: np.ndarray) -> float:
    """``||a - ref|| / ||ref||`` (Frobenius norms)."""
    return float(np.linalg.norm((a - ref).ravel()) / max(np.linalg.norm(ref.ravel()), 1e-12))


def verify_export(proto: Any, feeds: dict[str, np.ndarray], ref: np.ndarray, output: str, fp16: bool,
                  notes: list[str]) -> float | None:
    """Relative error of onnxruntime against the torch reference ``ref`` on the example; a note (and a warning
    above 1e-4, 1e-2 for fp16) in ``notes``; ``None`` when it could not run."""
    out = ort_run(proto, feeds, output)
    if out is None:
        notes.append("not verified on onnxruntime (not installed, or model > 2 GB)")
        return None
    err = rel_err(out, ref)
    tol = 1e-2 if fp16 else 1e-4
    if not math.isfinite(err) or err > tol:
        notes.append(f"onnxruntime differs from torch by {err:.2e} (relative) on the example")
        warnings.warn(f"fewstep export: onnxruntime differs from torch by {err:.2e} (relative; tolerance "
                      f"{tol:g})", stacklevel=3)
    return err
