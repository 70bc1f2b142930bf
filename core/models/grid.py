"""Image grids for looking at samples: ``[-1, 1]`` tensors to a PIL image (then ``.save("x.png")``)."""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image
from torch import Tensor

__all__ = ["to_uint8_grid"]


def to_uint8_grid(
    images: Tensor, nrow: int = 8, scale: int = 4, padding: int = 1, pad_value: float = -1.0
) -> Image.Image:
    """Tile images in ``[-1, 1]`` into one 8-bit PIL image.

    Args:
        images: ``(N, C, H, W)`` or ``(N, H, W)`` with C = 1 (grey) or 3 (RGB); values outside
            ``[-1, 1]`` are clamped.
        nrow: images per row.
        scale: nearest-neighbour upscaling factor (4 makes 16x16 digits readable).
        padding: pixels between tiles (before scaling).
        pad_value: value of the padding in ``[-1, 1]`` (default black).
    """
    x = torch.as_tensor(images).detach().to("cpu", torch.float32)
    if x.ndim == 3:
        x = x.unsqueeze(1)
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"images must be (N, 1|3, H, W) or (N, H, W), got shape {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError("no images to tile")
    if nrow < 1 or scale < 1 or padding < 0:
        raise ValueError("nrow and scale must be >= 1 and padding >= 0")
    n, c, h, w = x.shape
    ncol = min(nrow, n)
    nrows = math.ceil(n / ncol)
    grid = torch.full((c, nrows * (h + padding) + padding, ncol * (w + padding) + padding), float(pad_value))
    for i in range(n):
        r, col = divmod(i, ncol)
        top, left = padding + r * (h + padding), padding + col * (w + padding)
        grid[:, top : top + h, left : left + w] = x[i]
    u8 = ((grid.clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)
    if scale > 1:
        u8 = u8.repeat_interleave(scale, dim=1).repeat_interleave(scale, dim=2)
    arr = np.ascontiguousarray(u8.permute(1, 2, 0).numpy())
    return Image.fromarray(arr[..., 0] if c == 1 else arr)  # uint8 HxW -> "L", HxWx3 -> "RGB"
