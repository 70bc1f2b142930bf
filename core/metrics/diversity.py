"""Within-class diversity of generated samples: the number that mode collapse drives to zero.

A class-conditional generator that maps every noise of a class to the same image can keep a good class accuracy and
a fair Frechet distance while its recall (Kynkaenniemi et al. 2019) and its within-class spread fall. The spread is
measured here as the mean pairwise Euclidean distance between the features (the shipped classifier's, as for FD)
of the samples of each class, averaged over classes; real digits set the scale (``reference_diversity``).
"""

from __future__ import annotations

import torch
from torch import Tensor


def per_class_diversity(features: Tensor, labels: Tensor) -> dict[int, float]:
    """Mean pairwise L2 distance between the ``(N, D)`` ``features`` of each class in ``labels`` (classes with
    fewer than two samples are left out)."""
    feats = torch.as_tensor(features).detach().double().cpu()
    labels = torch.as_tensor(labels).reshape(-1).cpu()
    if feats.ndim != 2 or len(feats) != len(labels):
        raise ValueError(f"features must be (N, D) with one label each, got {tuple(feats.shape)} and "
                         f"{tuple(labels.shape)} labels")
    out: dict[int, float] = {}
    for c in labels.unique().tolist():
        f = feats[labels == c]
        n = len(f)
        if n < 2:
            continue
        d = torch.cdist(f, f)
        out[int(c)] = float(d.sum() / (n * (n - 1)))
    return out


def mean_class_diversity(features: Tensor, labels: Tensor) -> float:
    """``per_class_diversity`` averaged over classes."""
    per = per_class_diversity(features, labels)
    if not per:
        raise ValueError("need at least two samples of one class to measure diversity")
    return sum(per.values()) / len(per)


def reference_diversity(reference: str = "train", per_class: int | None = None, seed: int = 0) -> float:
    """``mean_class_diversity`` of real digits of a split (optionally ``per_class`` random ones per class, so the
    sample count matches a generated batch)."""
    from ..models.digits import load_digits_tensors
    from .quality import reference_features

    feats = reference_features(reference)
    _, labels = load_digits_tensors(reference)
    if per_class is not None:
        g = torch.Generator().manual_seed(seed)
        keep = []
        for c in labels.unique().tolist():
            idx = (labels == c).nonzero().reshape(-1)
            keep.append(idx[torch.randperm(len(idx), generator=g)[:per_class]])
        idx = torch.cat(keep)
        feats, labels = feats[idx], labels[idx]
    return mean_class_diversity(feats, labels)
