"""Embedded-model nodes: the shipped class-conditional digits DiT as a MODEL, its class conditioning, an empty
16x16 latent and the pixel-space latent -> IMAGE conversion, so every example workflow runs on a CPU with no
download (see ``embedded_model`` for how the DiT becomes a ComfyUI model)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from comfy_api.latest import io

from ..core.models.digits import NULL_CLASS, NUM_CLASSES
from .embedded_model import RANDOM_NAME, TEACHER_NAME, available_models, class_token, empty_latent, load_digits_model

CATEGORY = "fewstep/embedded"


class FewstepDigitsModelLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FewstepDigitsModelLoader",
            display_name="fewstep load digits model (embedded)",
            category=CATEGORY,
            description="Loads the class-conditional DiT that ships with fewstep (16x16 grey digits, v-prediction, "
                        "DDPM linear betas) as a MODEL. Runs on a CPU in milliseconds per step; no download.",
            inputs=[
                io.Combo.Input("model_name", options=available_models(), default=TEACHER_NAME,
                               tooltip=f"'{TEACHER_NAME}': the shipped teacher; digits_<method>_<n>step: shipped "
                                       f"distilled students (sample them at cfg 1 with the steps in their name); "
                                       f"'{RANDOM_NAME}': untrained weights (for tests)."),
            ],
            outputs=[io.Model.Output(tooltip="Use with 'fewstep digit class' conditioning and 'fewstep empty digits "
                                             "latent'.")],
        )

    @classmethod
    def execute(cls, model_name: str) -> io.NodeOutput:
        return io.NodeOutput(load_digits_model(model_name))


class FewstepDigitsClassCondition(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FewstepDigitsClassCondition",
            display_name="fewstep digit class",
            category=CATEGORY,
            description="Class conditioning for the embedded digits model: positive = the digit, negative = the "
                        f"null class {NULL_CLASS} (unconditional), for classifier-free guidance.",
            inputs=[
                io.Int.Input("digit", default=3, min=0, max=NUM_CLASSES - 1,
                             tooltip="The digit to draw (0-9). Core: the class_labels condition."),
            ],
            outputs=[
                io.Conditioning.Output(display_name="positive", tooltip="The requested digit."),
                io.Conditioning.Output(display_name="negative", tooltip="The null class (unconditional)."),
            ],
        )

    @classmethod
    def execute(cls, digit: int) -> io.NodeOutput:
        return io.NodeOutput([[class_token(int(digit)), {}]], [[class_token(NULL_CLASS), {}]])


class FewstepDigitsEmptyLatent(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FewstepDigitsEmptyLatent",
            display_name="fewstep empty digits latent",
            category=CATEGORY,
            description="An empty 1x16x16 pixel-space latent batch for the embedded digits model.",
            inputs=[
                io.Int.Input("batch_size", default=8, min=1, max=4096,
                             tooltip="Number of digits to sample at once."),
            ],
            outputs=[io.Latent.Output()],
        )

    @classmethod
    def execute(cls, batch_size: int) -> io.NodeOutput:
        return io.NodeOutput({"samples": empty_latent(int(batch_size))})


def pixel_latent_to_image(samples: torch.Tensor, scale: int = 1) -> torch.Tensor:
    """(B, 1 or 3, H, W) in [-1, 1] -> ComfyUI IMAGE (B, H*scale, W*scale, 3) in [0, 1] (nearest upscaling)."""
    if samples.ndim != 4 or samples.shape[1] not in (1, 3):
        raise ValueError(f"expected a pixel-space latent (B, 1 or 3, H, W) from the digits model, got shape "
                         f"{tuple(samples.shape)}; decode latents of other models with a VAE instead")
    x = ((samples.float() + 1.0) / 2.0).clamp(0.0, 1.0)
    if scale > 1:
        x = F.interpolate(x, scale_factor=scale, mode="nearest")
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    return x.permute(0, 2, 3, 1).contiguous().cpu()


class FewstepDigitsLatentToImage(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FewstepDigitsLatentToImage",
            display_name="fewstep digits latent to image",
            category=CATEGORY,
            description="Turns the digits model's pixel-space output (values in [-1, 1]) into an IMAGE; no VAE.",
            inputs=[
                io.Latent.Input("samples", tooltip="Output of the sampler on the embedded digits model."),
                io.Int.Input("scale", default=4, min=1, max=64,
                             tooltip="Nearest-neighbour upscaling factor (16x16 digits are tiny on screen)."),
            ],
            outputs=[io.Image.Output()],
        )

    @classmethod
    def execute(cls, samples: dict[str, Any], scale: int) -> io.NodeOutput:
        return io.NodeOutput(pixel_latent_to_image(samples["samples"], int(scale)))


NODES: list[type[io.ComfyNode]] = [
    FewstepDigitsModelLoader,
    FewstepDigitsClassCondition,
    FewstepDigitsEmptyLatent,
    FewstepDigitsLatentToImage,
]
