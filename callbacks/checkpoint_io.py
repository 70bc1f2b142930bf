"""A Lightning ``CheckpointIO`` that never leaves a torn checkpoint and resumes from the previous good one.

Lightning's ``ModelCheckpoint`` writes through ``trainer.strategy.checkpoint_io``; passing
``SafeCheckpointIO()`` in ``Trainer(plugins=[...])`` makes every checkpoint write go through ``core.io.atomic_path``
(temp file in the same folder, fsync, rename) with the replaced checkpoint kept as ``<name>.ckpt.prev``. On resume a
truncated or corrupt checkpoint (a full disk, a killed copy) is moved aside to ``<name>.ckpt.corrupt`` and training
resumes from ``<name>.ckpt.prev``, with a warning naming the corrupt file (``core.io.load_with_fallback``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.types import _PATH
from typing_extensions import override

from ..core.io import load_with_fallback, save_torch

__all__ = ["SafeCheckpointIO"]


class SafeCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` with atomic writes, the previous checkpoint kept, and a fallback to it on resume."""

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        """Write ``checkpoint`` to ``path`` atomically, keeping the replaced file as ``<path>.prev``.

        Args:
            checkpoint: what Lightning saves.
            path: the checkpoint file.
            storage_options: not supported (must be ``None``).
        """
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        save_torch(checkpoint, Path(path))

    @override
    def load_checkpoint(self, path: _PATH, map_location: Callable | None = lambda storage, loc: storage,
                        weights_only: bool | None = None) -> dict[str, Any]:
        """Load ``path``; a torn or corrupt file is moved aside and ``<path>.prev`` is loaded instead (with a warning).

        Args:
            path: the checkpoint file to resume from.
            map_location, weights_only: as in ``torch.load``.
        """
        parent = super().load_checkpoint

        def load(p: Path) -> dict[str, Any]:
            return parent(p, map_location=map_location, weights_only=weights_only)

        ckpt, _ = load_with_fallback(Path(path), load, "checkpoint")
        return ckpt
