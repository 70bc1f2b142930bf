"""The embedded benchmark's image set: scikit-learn's bundled handwritten digits.

``sklearn.datasets.load_digits`` ships 1,797 grey 8x8 images of the digits 0-9 (the UCI "Optical
Recognition of Handwritten Digits" test set, Alpaydin & Kaynak 1998) inside the scikit-learn wheel, so
the benchmark needs no download. Images are upsampled to ``IMAGE_SIZE`` x ``IMAGE_SIZE`` with bilinear
interpolation (``align_corners=False``, no antialiasing) and scaled from the raw 0..16 intensities to
[-1, 1], the range the embedded diffusion models are trained on.

A fixed stratified split (``HELDOUT_FRACTION`` of every class, seed ``SPLIT_SEED``) gives a ``"train"``
set for the teacher and the feature network and a ``"heldout"`` set that serves as the real reference
for metrics (its Frechet distance to the train set is the benchmark's floor).
"""

from __future__ import annotations

import threading

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "HELDOUT_FRACTION",
    "IMAGE_SIZE",
    "NULL_CLASS",
    "NUM_CLASSES",
    "SPLIT_SEED",
    "load_digits_tensors",
    "split_indices",
]

IMAGE_SIZE: int = 16
"""Side length of the benchmark images (the bundled 8x8 digits are upsampled 2x)."""
NUM_CLASSES: int = 10
"""Number of real classes (digits 0-9)."""
NULL_CLASS: int = 10
"""Class id of the empty condition used for classifier-free guidance (one past the real classes)."""
HELDOUT_FRACTION: float = 0.2
"""Fraction of every class kept out of training (stratified split)."""
SPLIT_SEED: int = 0
"""Seed of the fixed train/held-out split."""

_RAW_MAX = 16.0  # load_digits intensities are integers 0..16

_lock = threading.Lock()
_raw_cache: tuple[np.ndarray, np.ndarray] | None = None
_split_cache: tuple[np.ndarray, np.ndarray] | None = None
_tensor_cache: dict[tuple[str, int], tuple[Tensor, Tensor]] = {}


def _raw() -> tuple[np.ndarray, np.ndarray]:
    """The bundled digits as ``(images (N, 8, 8) float32 in 0..16, labels (N,) int64)``."""
    global _raw_cache
    if _raw_cache is None:
        from sklearn.datasets import load_digits

        ds = load_digits()
        _raw_cache = (np.asarray(ds.images, dtype=np.float32), np.asarray(ds.target, dtype=np.int64))
    return _raw_cache


def split_indices() -> tuple[np.ndarray, np.ndarray]:
    """Indices ``(train, heldout)`` of the fixed stratified split, each sorted ascending.

    Every class contributes ``round(HELDOUT_FRACTION * n_class)`` images to the held-out set, chosen by a
    ``numpy.random.default_rng(SPLIT_SEED)`` permutation per class, so the split does not depend on the
    scikit-learn version's splitter implementation.
    """
    global _split_cache
    if _split_cache is None:
        _, labels = _raw()
        rng = np.random.default_rng(SPLIT_SEED)
        held: list[np.ndarray] = []
        for c in range(NUM_CLASSES):
            idx = np.flatnonzero(labels == c)
            n_held = int(round(HELDOUT_FRACTION * len(idx)))
            held.append(rng.permutation(idx)[:n_held])
        heldout = np.sort(np.concatenate(held))
        mask = np.ones(len(labels), dtype=bool)
        mask[heldout] = False
        _split_cache = (np.flatnonzero(mask), heldout)
    return _split_cache


def load_digits_tensors(split: str = "train", size: int = IMAGE_SIZE) -> tuple[Tensor, Tensor]:
    """Load the benchmark digits as ``(images (N, 1, size, size) float32 in [-1, 1], labels (N,) int64)``.

    Args:
        split: ``"train"`` (80%), ``"heldout"`` (20%, stratified, seed 0) or ``"all"`` (1,797 images).
        size: output side length; the 8x8 originals are resized bilinearly (``align_corners=False``,
            ``antialias=False``). ``size=8`` returns the originals, only rescaled.

    Results are cached in-process; callers get fresh clones so they may modify them freely.
    """
    if split not in ("train", "heldout", "all"):
        raise ValueError(f"split must be 'train', 'heldout' or 'all', got {split!r}")
    if int(size) < 1:
        raise ValueError(f"size must be a positive integer, got {size!r}")
    key = (split, int(size))
    with _lock:
        if key not in _tensor_cache:
            images, labels = _raw()
            if split != "all":
                train_idx, held_idx = split_indices()
                idx = train_idx if split == "train" else held_idx
                images, labels = images[idx], labels[idx]
            x = torch.from_numpy(np.ascontiguousarray(images)).unsqueeze(1)  # (N, 1, 8, 8) in 0..16
            if x.shape[-1] != size:
                x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=False)
            x = (x / _RAW_MAX * 2.0 - 1.0).clamp_(-1.0, 1.0).contiguous()
            _tensor_cache[key] = (x, torch.from_numpy(labels.copy()))
        images_t, labels_t = _tensor_cache[key]
    return images_t.clone(), labels_t.clone()
