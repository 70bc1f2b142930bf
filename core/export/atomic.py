"""Write an ONNX export atomically: a reader never sees a half-written ``.onnx`` (or ``.onnx.data``) file.

A model with external data is two files, and the external-data location recorded inside the ``.onnx`` is a file
*name*, so ``export_onnx`` and ``convert_file_to_fp16`` save into a fresh hidden folder next to the target under the
*final* file name (``core.io.atomic_file_set``, re-exported here as :func:`atomic_onnx_path`), check the model
there, fsync it, then move it into place with ``os.replace`` (the ``.data`` file first, the ``.onnx`` last). On any
error the temporary folder is removed and an existing file at the target is left untouched. ``export_onnx_atomic``
is therefore ``export_onnx`` (kept for the callers that name it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..io import atomic_file_set as atomic_onnx_path
from ..io import replace_with_companions

__all__ = ["atomic_onnx_path", "export_onnx_atomic", "replace_atomic"]


def replace_atomic(tmp_dir: Path, name: str, target: Path) -> None:
    """Move ``tmp_dir/name`` (and ``tmp_dir/name.data`` if present) to ``target`` (``target.data``), fsync-ed."""
    replace_with_companions(tmp_dir, name, target, (".data",))


def export_onnx_atomic(denoiser: Any, path: str | Path, **kwargs: Any) -> Any:
    """``export_onnx(denoiser, path, **kwargs)``, which writes atomically (see the module docstring).

    Returns the ``ExportResult`` with ``path`` set to the final file.
    """
    from .exporter import export_onnx

    return export_onnx(denoiser, path, **kwargs)
