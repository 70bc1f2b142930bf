"""Write an ONNX export atomically: a reader never sees a half-written ``.onnx`` (or ``.onnx.data``) file.

``export_onnx`` saves straight to its path, which a crash, a full disk or a failed check can leave half written.
``export_onnx_atomic`` exports into a fresh hidden folder next to the target, under the *final* file name (the
external-data location recorded inside the model is a file name, so the name must not change afterwards), checks
it there, then moves it into place with ``os.replace`` (the ``.data`` file first, the ``.onnx`` last). On any error
the temporary folder is removed and an existing file at the target is left untouched.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["export_onnx_atomic", "replace_atomic"]


def replace_atomic(tmp_dir: Path, name: str, target: Path) -> None:
    """Move ``tmp_dir/name`` (and ``tmp_dir/name.data`` if present) to ``target`` (``target.data``)."""
    src, data = tmp_dir / name, tmp_dir / f"{name}.data"
    old_data = target.with_name(target.name + ".data")
    if data.exists():
        os.replace(data, old_data)
    elif old_data.exists():
        old_data.unlink()  # a stale external-data file from an earlier, larger export
    os.replace(src, target)


def export_onnx_atomic(denoiser: Any, path: str | Path, **kwargs: Any) -> Any:
    """``export_onnx(denoiser, path, **kwargs)`` written atomically (see the module docstring).

    Returns the ``ExportResult`` with ``path`` set to the final file.
    """
    from .exporter import export_onnx

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        res = export_onnx(denoiser, tmp_dir / path.name, **kwargs)
        replace_atomic(tmp_dir, path.name, path)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    res.path = path
    return res
