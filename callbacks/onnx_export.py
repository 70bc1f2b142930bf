"""ONNX export of the student at the end of ``fit`` (``core.export``), ready for the torch-free runtime.

``OnnxExport`` runs in ``on_train_end`` on rank 0, after every checkpoint of the run has been written. It exports
the student's network with the sampler, sigmas and guidance scale it was trained for (``sampling_plan``) in the
file's fewstep metadata, so ``fewstep run-onnx student.onnx`` / ``core.export.generate`` sample it as trained. The
weights are

- ``"ema"`` (default): the ``StudentEMA`` average swapped in for the export and swapped out again;
- ``"best"``: the student of the best checkpoint of a ``ModelCheckpoint`` (given, or the trainer's own), loaded into
  the module for the export and restored afterwards;
- ``"last"``: the live weights at the end of training.

The file is written atomically (``core.export.export_onnx_atomic``: temporary folder + rename), so a failed export
never leaves a half file, and an earlier file at the path stays as it was.

**When the export fails** the training result is kept first: the checkpoints the ``ModelCheckpoint`` callbacks
wrote are untouched (the export runs after them), and if none was written the student is saved with the module's own
``export`` (safetensors + JSON) to ``<path stem>.safetensors`` next to the ONNX path. Then, by default
(``on_error="raise"``), ``OnnxExportError`` is raised naming the cause and the saved files, so a pipeline that
expects the ONNX file stops at the real problem; ``on_error="warn"`` logs the same message, keeps it in
``self.error`` and lets ``fit`` return normally. A wrong configuration (``weights="ema"`` without ``StudentEMA``,
``weights="best"`` without a monitored ``ModelCheckpoint``) fails in ``setup``, before any training.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import Tensor
from typing_extensions import override

from ..core.conditioning import cond_index, cond_len, is_embedding_cond
from .ema import ema_weights, find_ema

log = logging.getLogger("fewstep")

WEIGHTS = ("ema", "best", "last")


class OnnxExportError(RuntimeError):
    """The ONNX export at the end of training failed (the training result was saved; see the message)."""


class OnnxExport(Callback):
    """Export the student to ONNX (with fewstep metadata) when training ends.

    Args:
        path: the ``.onnx`` file to write.
        weights: ``"ema"``, ``"best"`` or ``"last"`` (see the module docstring).
        checkpoint: the ``ModelCheckpoint`` whose ``best_model_path`` ``weights="best"`` loads (default: the
            trainer's first ``ModelCheckpoint`` with a ``monitor``).
        fp16: write an fp16 graph (inputs and outputs stay float32).
        on_error: ``"raise"`` (default) or ``"warn"`` when the export fails (the training result is saved either way).
        verify: compare onnxruntime with torch on the example inputs (``export_onnx(verify=...)``).
        export_kwargs: more ``export_onnx`` arguments (``opset``, ``dynamic_batch``, ``name`` ...).
    """

    def __init__(self, path: str | Path, weights: str = "ema", checkpoint: ModelCheckpoint | None = None,
                 fp16: bool = False, on_error: str = "raise", verify: bool = True,
                 export_kwargs: Mapping[str, Any] | None = None) -> None:
        if weights not in WEIGHTS:
            raise ValueError(f"weights must be one of {WEIGHTS}, got {weights!r}")
        if on_error not in ("raise", "warn"):
            raise ValueError(f"on_error must be 'raise' or 'warn', got {on_error!r}")
        self.path = Path(path)
        if self.path.suffix != ".onnx":
            raise ValueError(f"the ONNX export path must end in .onnx, got {self.path}")
        self.weights, self.checkpoint, self.fp16, self.on_error, self.verify = weights, checkpoint, fp16, on_error, \
            verify
        self.export_kwargs = dict(export_kwargs or {})
        self.result: Any = None  # core.export.ExportResult of the last export
        self.error: BaseException | None = None
        self.saved: list[Path] = []  # what holds the training result when the export failed

    # ------------------------------------------------------------------------------------------ config
    def _checkpoint(self, trainer: L.Trainer) -> ModelCheckpoint | None:
        if self.checkpoint is not None:
            return self.checkpoint
        return next((cb for cb in trainer.checkpoint_callbacks if getattr(cb, "monitor", None)), None)

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Check the settings against the trainer before fitting starts (EMA callback, monitored checkpoint, module).

        Args:
            trainer: its callbacks are checked.
            pl_module: must be a fewstep distillation module.
            stage: only ``"fit"`` is checked.
        """
        if stage != "fit":
            return
        if self.weights == "ema" and find_ema(trainer) is None:
            raise ValueError("OnnxExport(weights='ema') needs a StudentEMA callback in the trainer; add one or use "
                             "weights='last' (live weights) or 'best'")
        if self.weights == "best":
            ck = self._checkpoint(trainer)
            if ck is None or not ck.monitor:
                raise ValueError("OnnxExport(weights='best') needs a ModelCheckpoint with a monitor (pass "
                                 "checkpoint=ModelCheckpoint(monitor=...)); without one there is no best checkpoint")
            if self.checkpoint is not None and self.checkpoint not in trainer.callbacks:
                raise ValueError("OnnxExport(checkpoint=...) is not one of the trainer's callbacks")
        if not hasattr(pl_module, "sampling_plan"):
            raise TypeError(f"OnnxExport exports fewstep distillation modules (with sampling_plan()); got "
                            f"{type(pl_module).__name__}")

    # ------------------------------------------------------------------------------------------ weights
    @contextmanager
    def _best_weights(self, trainer: L.Trainer, pl_module: L.LightningModule):
        ck = self._checkpoint(trainer)
        best = getattr(ck, "best_model_path", "") if ck is not None else ""
        if not best or not Path(best).is_file():
            raise FileNotFoundError(f"weights='best': the ModelCheckpoint wrote no best checkpoint (best_model_path="
                                    f"{best!r}); was its monitor {getattr(ck, 'monitor', None)!r} ever logged?")
        state = _load_state_dict(Path(best))
        live = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
        with torch.no_grad():
            pl_module.load_state_dict(state, strict=False)
        try:
            yield Path(best)
        finally:
            with torch.no_grad():
                pl_module.load_state_dict(live, strict=False)

    @contextmanager
    def weights_swapped(self, trainer: L.Trainer | None, pl_module: L.LightningModule):
        """Inside the block the student holds the weights to export; yields where they came from."""
        if self.weights == "ema":
            with ema_weights(trainer, pl_module):
                yield "ema"
        elif self.weights == "best":
            with self._best_weights(trainer, pl_module) as p:
                yield str(p)
        else:
            yield "last"

    # ------------------------------------------------------------------------------------------- export
    def export_kwargs_for(self, pl_module: L.LightningModule) -> tuple[Any, dict[str, Any]]:
        """``(denoiser, export_onnx kwargs)`` for the student's sampling plan."""
        plan = pl_module.sampling_plan()
        den = plan["denoiser"]
        extra = dict(plan.get("extra") or {})
        kw: dict[str, Any] = {"sample_shape": tuple(pl_module.sample_shape), "sampler": plan["sampler"],
                              "sigmas": [float(s) for s in torch.as_tensor(plan["sigmas"]).flatten().tolist()],
                              "fp16": self.fp16, "verify": self.verify,
                              "name": f"{getattr(pl_module.teacher, 'name', 'student')}-{pl_module.method}"}
        num_classes = getattr(pl_module, "num_classes", None)
        cond_key = getattr(pl_module, "cond_key", "class_labels")
        pool = getattr(pl_module, "cond_pool", None)
        if is_embedding_cond(pool):  # text embeddings: each keyword becomes a graph input
            kw["cond"] = dict(cond_index(pool, torch.arange(2) % cond_len(pool)))
        elif num_classes:
            kw["cond"] = {cond_key: torch.arange(2) % int(num_classes)}
            info: dict[str, Any] = {"num_classes": int(num_classes)}
            null = getattr(pl_module, "null", None)
            if null is not None and not isinstance(null, Tensor):
                info["null"] = int(null)
            kw["conditions"] = {cond_key: info}
        if "guidance_scale" in extra and not hasattr(den, "adapter"):
            raise ValueError(f"{type(pl_module).__name__} samples with a guidance_scale but its student has no "
                             "guidance adapter to fold into the graph")
        unknown = sorted(set(extra) - {"guidance_scale"})
        if unknown:
            raise ValueError(f"the sampling plan passes {unknown} to the student; OnnxExport cannot map them to "
                             "graph inputs")
        kw.update(self.export_kwargs)
        return den, kw

    def export(self, trainer: L.Trainer | None, pl_module: L.LightningModule) -> Any:
        """Export now (rank 0 only; ``None`` on other ranks). Raises what the export raises."""
        from ..core.export.atomic import export_onnx_atomic

        if trainer is not None and trainer.global_rank != 0:
            return None
        with self.weights_swapped(trainer, pl_module) as source:
            den, kw = self.export_kwargs_for(pl_module)
            extra = dict(pl_module.sampling_plan().get("extra") or {})
            old_default = getattr(den, "default_scale", None)
            if "guidance_scale" in extra and old_default is None:
                den.default_scale = float(extra["guidance_scale"])  # the exported default guidance scale
            device = next(pl_module.parameters()).device
            try:
                pl_module.cpu()
                self.result = export_onnx_atomic(den, self.path, **kw)
            finally:
                pl_module.to(device)
                if hasattr(den, "default_scale"):
                    den.default_scale = old_default
        log.info("fewstep: exported the student (%s weights) to %s", source, self.path)
        return self.result

    def _save_training_result(self, trainer: L.Trainer, pl_module: L.LightningModule) -> list[Path]:
        paths = [getattr(cb, a, "") for cb in trainer.checkpoint_callbacks
                 for a in ("last_model_path", "best_model_path")]
        saved = [Path(p) for p in dict.fromkeys(paths) if p and Path(p).is_file()]
        if saved or not hasattr(pl_module, "export"):
            return saved
        fallback = self.path.with_suffix(".safetensors")
        try:
            with ema_weights(trainer, pl_module) if self.weights == "ema" else nullcontext():
                return list(pl_module.export(fallback))
        except Exception as e:  # noqa: BLE001 - report both failures, never hide the first
            log.error("fewstep: could not save the student to %s either: %s", fallback, e)
            return []

    @override
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Export on rank 0; if that fails, save the student another way and report where (``on_error``).

        Args:
            trainer: rank 0 exports; its checkpoints are the fallback.
            pl_module: the student to export.
        """
        if trainer.global_rank != 0:
            return
        self.error = None
        try:
            self.export(trainer, pl_module)
            return
        except Exception as e:  # noqa: BLE001 - any export failure is reported the same way
            self.error = e
        self.saved = self._save_training_result(trainer, pl_module)
        where = ", ".join(str(p) for p in self.saved) or "nothing (no checkpoint, and saving the student failed)"
        msg = (f"fewstep: ONNX export of the student to {self.path} failed: {type(self.error).__name__}: "
               f"{self.error}. The training result is saved in: {where}. Re-export from it with "
               "fewstep.core.export.export_onnx (or `fewstep export <student.safetensors> out.onnx`).")
        if self.on_error == "raise":
            raise OnnxExportError(msg) from self.error
        log.error(msg)


def _load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The ``state_dict`` of a Lightning checkpoint, read with ``torch.load(weights_only=True)`` (no pickle code
    runs); a torn checkpoint falls back to ``<path>.prev`` (``core.io.load_with_fallback``)."""
    from ..core.io import load_with_fallback

    ckpt, _ = load_with_fallback(path, lambda p: torch.load(p, map_location="cpu", weights_only=True), "checkpoint")
    if "state_dict" not in ckpt:
        raise ValueError(f"{path} is not a Lightning checkpoint (no state_dict)")
    return ckpt["state_dict"]
