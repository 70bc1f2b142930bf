"""Sample-quality metrics of the embedded benchmark, computed from tensors in the classifier's feature space.

- Frechet distance (Heusel et al. 2017, "GANs Trained by a Two Time-Scale Update Rule Converge to a
  Local Nash Equilibrium", eq. 6 -- the FID formula) between Gaussians fitted to penultimate features
  of ``classifier.DigitsClassifier`` (our stand-in for Inception-v3).
- Improved precision and recall (Kynkaenniemi et al. 2019, "Improved Precision and Recall Metric for
  Assessing Generative Models", eqs. 1-3): k-NN balls around each feature estimate the real and
  generated manifolds.
- Class accuracy of class-conditional samples under the same classifier.

Frechet distance is biased upward at small sample counts, so compare runs with the same number of
samples; ``reference_floors`` gives the floor (real held-out vs real train, 359 images) and the
ceiling (clamped Gaussian noise vs real train, same count) measured the same way.
"""

from __future__ import annotations

import math
import threading
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..models.digits import IMAGE_SIZE, load_digits_tensors
from .classifier import load_classifier

__all__ = [
    "class_accuracy",
    "default_classifier",
    "evaluate_samples",
    "extract_features",
    "frechet_distance",
    "precision_recall",
    "reference_features",
    "reference_floors",
]

_lock = threading.RLock()
_classifier: nn.Module | None = None
_ref_feats: dict[str, Tensor] = {}
_floors: dict[str, float] | None = None


def default_classifier() -> nn.Module:
    """The shipped digits classifier on CPU, loaded once per process (eval mode, no gradients)."""
    global _classifier
    with _lock:
        if _classifier is None:
            _classifier = load_classifier("cpu")
        return _classifier


def _check_images(images: Tensor) -> Tensor:
    images = torch.as_tensor(images)
    if images.ndim == 3:
        images = images.unsqueeze(1)
    if images.ndim != 4 or images.shape[1] != 1 or tuple(images.shape[-2:]) != (IMAGE_SIZE, IMAGE_SIZE):
        raise ValueError(
            f"expected digit images of shape (N, 1, {IMAGE_SIZE}, {IMAGE_SIZE}) in [-1, 1], "
            f"got {tuple(images.shape)}"
        )
    return images


@torch.no_grad()
def extract_features(images: Tensor, classifier: nn.Module | None = None, batch_size: int = 512) -> Tensor:
    """Penultimate classifier features ``(N, feature_dim)`` float32 on CPU for images in ``[-1, 1]``.

    Images are clamped to ``[-1, 1]`` first (as when a sample is quantised to 8 bits) and fed in
    batches of ``batch_size`` on the classifier's device. Non-finite pixels stay non-finite.
    """
    images = _check_images(images)
    model = default_classifier() if classifier is None else classifier
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = []
    try:
        for i in range(0, images.shape[0], batch_size):
            xb = images[i : i + batch_size].to(device=device, dtype=torch.float32).clamp(-1.0, 1.0)
            out.append(model.features(xb).float().cpu())
    finally:
        model.train(was_training)
    if not out:
        return torch.empty(0, getattr(model, "feature_dim", 0))
    return torch.cat(out)


@torch.no_grad()
def class_accuracy(
    images: Tensor, labels: Tensor, classifier: nn.Module | None = None, batch_size: int = 512
) -> float:
    """Fraction of ``images`` the classifier assigns to ``labels`` (class accuracy of conditional samples)."""
    images = _check_images(images)
    labels = torch.as_tensor(labels).reshape(-1).long().cpu()
    if labels.shape[0] != images.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {labels.shape[0]} labels")
    if images.shape[0] == 0:
        raise ValueError("no images")
    model = default_classifier() if classifier is None else classifier
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    correct = 0
    try:
        for i in range(0, images.shape[0], batch_size):
            xb = images[i : i + batch_size].to(device=device, dtype=torch.float32).clamp(-1.0, 1.0)
            correct += (model(xb).argmax(1).cpu() == labels[i : i + batch_size]).sum().item()
    finally:
        model.train(was_training)
    return correct / images.shape[0]


def _mean_cov(feats: Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(
        torch.as_tensor(feats).detach().cpu().double().numpy() if isinstance(feats, Tensor) else feats,
        dtype=np.float64,
    )
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"features must be (N >= 2, D), got shape {x.shape}")
    mu = x.mean(0)
    xc = x - mu
    cov = xc.T @ xc / (x.shape[0] - 1)
    return mu, (cov + cov.T) * 0.5


def _psd_sqrt(a: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric PSD matrix by eigen-decomposition (negative round-off -> 0)."""
    w, v = np.linalg.eigh(a)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def _trace_sqrt_product_eigh(s1: np.ndarray, s2: np.ndarray) -> float:
    """``tr sqrt(s1 s2)`` as ``tr sqrt(s1^1/2 s2 s1^1/2)``: same eigenvalues, but a symmetric PSD matrix."""
    r = _psd_sqrt(s1)
    m = r @ s2 @ r
    w = np.linalg.eigvalsh((m + m.T) * 0.5)
    return float(np.sqrt(np.clip(w, 0.0, None)).sum())


def _trace_sqrt_product_scipy(s1: np.ndarray, s2: np.ndarray, eps: float = 1e-6) -> float:
    """``tr sqrtm(s1 s2)`` with ``scipy.linalg.sqrtm``, as in pytorch-fid (offset added if not finite)."""
    import warnings

    from scipy import linalg

    with warnings.catch_warnings():  # singular covariances are expected (dead ReLU units)
        warnings.simplefilter("ignore")
        covmean = linalg.sqrtm(s1 @ s2)
        if not np.isfinite(covmean).all():
            offset = np.eye(s1.shape[0]) * eps
            covmean = linalg.sqrtm((s1 + offset) @ (s2 + offset))
    return float(np.real(np.trace(covmean)))


def frechet_distance(
    feats_a: Tensor | np.ndarray, feats_b: Tensor | np.ndarray, method: str = "eigh"
) -> float:
    """Frechet distance between Gaussians fitted to two feature sets (Heusel et al. 2017, eq. 6).

    ``FD = ||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a S_b)^{1/2})``, in float64 with unbiased covariances.

    Args:
        feats_a, feats_b: ``(N_a, D)`` and ``(N_b, D)`` features (e.g. from ``extract_features``).
        method: ``"eigh"`` (default) computes ``tr (S_a S_b)^{1/2}`` as ``tr (S_a^{1/2} S_b S_a^{1/2})^{1/2}``
            by symmetric eigen-decompositions, averaged over both orders so the result is symmetric in
            its arguments and ``FD(x, x)`` is zero to round-off even for rank-deficient covariances;
            ``"sqrtm"`` uses ``scipy.linalg.sqrtm`` of the non-symmetric product (the pytorch-fid recipe),
            for cross-checking.

    Returns ``nan`` if any feature is non-finite (e.g. a diverged sampler), never a negative number.
    """
    mu_a, s_a = _mean_cov(feats_a)
    mu_b, s_b = _mean_cov(feats_b)
    if mu_a.shape != mu_b.shape:
        raise ValueError(f"feature dimensions differ: {mu_a.shape[0]} vs {mu_b.shape[0]}")
    if not (np.isfinite(s_a).all() and np.isfinite(s_b).all()):
        return float("nan")
    if method == "eigh":
        tr_covmean = 0.5 * (_trace_sqrt_product_eigh(s_a, s_b) + _trace_sqrt_product_eigh(s_b, s_a))
    elif method == "sqrtm":
        tr_covmean = _trace_sqrt_product_scipy(s_a, s_b)
    else:
        raise ValueError(f"method must be 'eigh' or 'sqrtm', got {method!r}")
    diff = mu_a - mu_b
    fd = float(diff @ diff) + float(np.trace(s_a) + np.trace(s_b)) - 2.0 * tr_covmean
    return max(fd, 0.0)


def _kth_nn_radii(feats: Tensor, k: int, batch_size: int) -> Tensor:
    """Distance from each row to its k-th nearest other row (the row itself excluded by taking k + 1)."""
    radii = []
    for i in range(0, feats.shape[0], batch_size):
        d = torch.cdist(feats[i : i + batch_size], feats)
        radii.append(d.kthvalue(k + 1, dim=1).values)
    return torch.cat(radii)


def _coverage(points: Tensor, centres: Tensor, radii: Tensor, batch_size: int) -> float:
    """Fraction of ``points`` inside at least one ball ``(centres, radii)``."""
    inside = 0
    for i in range(0, points.shape[0], batch_size):
        d = torch.cdist(points[i : i + batch_size], centres)
        inside += (d <= radii[None, :]).any(dim=1).sum().item()
    return inside / points.shape[0]


def precision_recall(
    real_feats: Tensor, fake_feats: Tensor, k: int = 3, batch_size: int = 1024
) -> tuple[float, float]:
    """Improved precision and recall with k-NN manifolds (Kynkaenniemi et al. 2019, eqs. 1-3).

    Each feature set's manifold is the union of balls around its points with radius the distance to the
    point's k-th nearest neighbour in the same set. Precision is the fraction of generated features inside
    the real manifold, recall the fraction of real features inside the generated manifold. Distances are
    Euclidean, computed in float64 in batches of ``batch_size`` rows.
    """
    real = torch.as_tensor(real_feats).detach().cpu().double()
    fake = torch.as_tensor(fake_feats).detach().cpu().double()
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(
            f"features must be (N, D) with the same D, got {tuple(real.shape)} and {tuple(fake.shape)}"
        )
    if min(real.shape[0], fake.shape[0]) <= k:
        raise ValueError(
            f"need more than k={k} features in each set, got {real.shape[0]} and {fake.shape[0]}"
        )
    real_radii = _kth_nn_radii(real, k, batch_size)
    fake_radii = _kth_nn_radii(fake, k, batch_size)
    precision = _coverage(fake, real, real_radii, batch_size)
    recall = _coverage(real, fake, fake_radii, batch_size)
    return precision, recall


def reference_features(reference: str = "train") -> Tensor:
    """Features of a real split (``"train"``, ``"heldout"``, ``"all"``), shipped classifier, cached."""
    with _lock:
        if reference not in _ref_feats:
            images, _ = load_digits_tensors(reference)
            _ref_feats[reference] = extract_features(images)
        return _ref_feats[reference]


def evaluate_samples(
    images: Tensor,
    labels: Tensor | None = None,
    reference: str = "train",
    classifier: nn.Module | None = None,
    k: int = 3,
) -> dict[str, float]:
    """All benchmark metrics for a set of generated digits.

    Args:
        images: ``(N, 1, 16, 16)`` samples in ``[-1, 1]``; use the held-out count (359) to compare with
            ``reference_floors``.
        labels: the classes the samples were conditioned on (``accuracy`` is ``nan`` without them).
        reference: real split to compare with (its features are cached per process).
        classifier: feature network (default: the shipped one).
        k: neighbourhood size of precision/recall.

    Returns ``{"fd", "accuracy", "precision", "recall", "num_samples"}``.
    """
    images = _check_images(images)
    if classifier is None:
        ref = reference_features(reference)
    else:
        ref = extract_features(load_digits_tensors(reference)[0], classifier)
    fake = extract_features(images, classifier)
    precision, recall = precision_recall(ref, fake, k=k)
    accuracy = math.nan if labels is None else class_accuracy(images, labels, classifier)
    return {
        "fd": frechet_distance(ref, fake),
        "accuracy": accuracy,
        "precision": precision,
        "recall": recall,
        "num_samples": float(images.shape[0]),
    }


def reference_floors(seed: int = 0) -> dict[str, Any]:
    """What good and bad look like on this benchmark, against the ``"train"`` reference.

    ``fd_floor`` is FD(train, held-out) -- real images the model never saw, the best a generator of
    359 samples can expect; ``fd_ceiling`` is FD(train, noise) for as many N(0, 1) images clamped to
    ``[-1, 1]`` (seeded). Also returns the held-out set's accuracy, precision and recall. Cached for
    the default seed.
    """
    global _floors
    with _lock:
        if seed == 0 and _floors is not None:
            return dict(_floors)
        held, held_labels = load_digits_tensors("heldout")
        gen = torch.Generator().manual_seed(seed)
        noise = torch.randn(held.shape, generator=gen).clamp(-1.0, 1.0)
        ref = reference_features("train")
        held_f = reference_features("heldout")
        noise_f = extract_features(noise)
        precision, recall = precision_recall(ref, held_f)
        noise_precision, noise_recall = precision_recall(ref, noise_f)
        out = {
            "fd_floor": frechet_distance(ref, held_f),
            "fd_ceiling": frechet_distance(ref, noise_f),
            "heldout_accuracy": class_accuracy(held, held_labels),
            "heldout_precision": precision,
            "heldout_recall": recall,
            "noise_precision": noise_precision,
            "noise_recall": noise_recall,
            "num_samples": float(held.shape[0]),
        }
        if seed == 0:
            _floors = out
        return dict(out)
