"""Lightning distillation modules (one per method) and callbacks. Needs the ``train`` extra (lightning, peft).

Modules: ``DMD2Distillation``, ``ConsistencyDistillation`` (and its last-segment stage ``ConsistencyLastSegment``),
``ReflowDistillation``, ``GuidanceAdapterDistillation``. Callbacks: ``StudentEMA``, ``SampleGrid``, ``QualityEval``,
``StudentExport``, ``DivergenceGuard``, ``CollapseMonitor``; ``SafeCheckpointIO`` (atomic checkpoints, resume falls
back to the previous one). Run them with a stock ``lightning.Trainer``; see ``callbacks/train_students.py`` for the
shipped students of the embedded teacher.
"""

from .base import DistillationModule, ticker_dataloader
from .checkpoint_io import SafeCheckpointIO
from .collapse import CollapseMonitor, CollapseWarning
from .consistency import ConsistencyDistillation
from .consistency_last_segment import ConsistencyLastSegment
from .dmd2 import DMD2Distillation, dmd2_optimizer_steps
from .ema import StudentEMA
from .export import DivergenceError, DivergenceGuard, StudentExport
from .guidance_adapter import GuidanceAdapterDistillation
from .monitor import QualityEval, SampleGrid
from .onnx_export import OnnxExport, OnnxExportError
from .reflow import ReflowDistillation

__all__ = [
    "CollapseMonitor", "CollapseWarning",
    "ConsistencyDistillation", "ConsistencyLastSegment", "DMD2Distillation", "DistillationModule", "DivergenceError",
    "DivergenceGuard",
    "GuidanceAdapterDistillation", "QualityEval", "ReflowDistillation", "SampleGrid", "StudentEMA", "StudentExport",
    "OnnxExport", "OnnxExportError", "SafeCheckpointIO",
    "dmd2_optimizer_steps", "ticker_dataloader",
]
