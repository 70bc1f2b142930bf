"""What a ComfyUI MODEL is: its family's name and its ``model_sampling`` (object patches honoured)."""

from __future__ import annotations

from typing import Any

__all__ = ["model_label", "model_sampling_of"]


def model_label(model: Any) -> str:
    """A user-facing name of a ComfyUI MODEL's family: its ``supported_models`` config class (SD15, SDXL, Flux,
    QwenImage, ...), else its model class."""
    inner = getattr(model, "model", model)
    config = getattr(inner, "model_config", None)
    return type(config).__name__ if config is not None else type(inner).__name__


def model_sampling_of(model: Any) -> Any:
    """The ``model_sampling`` object of a ComfyUI MODEL (a ``ModelPatcher``), honouring object patches."""
    return model.get_model_object("model_sampling")
