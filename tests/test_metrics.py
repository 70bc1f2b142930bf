"""Embedded benchmark: digits data, the shipped feature network and the quality metrics."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fewstep.core.metrics.classifier import CONFIG_PATH, WEIGHTS_PATH, DigitsClassifier, load_classifier
from fewstep.core.metrics.quality import (
    class_accuracy,
    evaluate_samples,
    extract_features,
    frechet_distance,
    precision_recall,
    reference_features,
    reference_floors,
)
from fewstep.core.models.digits import (
    IMAGE_SIZE,
    NULL_CLASS,
    NUM_CLASSES,
    load_digits_tensors,
    split_indices,
)
from fewstep.core.models.grid import to_uint8_grid

# --------------------------------------------------------------------------------------------- data


def test_digits_shapes_ranges_and_split():
    assert (IMAGE_SIZE, NUM_CLASSES, NULL_CLASS) == (16, 10, 10)
    x_all, y_all = load_digits_tensors("all")
    x_tr, y_tr = load_digits_tensors("train")
    x_he, y_he = load_digits_tensors("heldout")
    assert x_all.shape == (1797, 1, 16, 16) and x_all.dtype == torch.float32 and y_all.dtype == torch.int64
    assert len(x_tr) + len(x_he) == 1797 and len(x_he) == 359
    assert x_all.min() == -1.0 and x_all.max() == 1.0
    train_idx, held_idx = split_indices()
    assert not set(train_idx.tolist()) & set(held_idx.tolist())
    assert torch.equal(x_all[torch.from_numpy(held_idx)], x_he) and torch.equal(
        y_all[torch.from_numpy(train_idx)], y_tr
    )
    # stratified: every class is ~20% held out
    frac = torch.bincount(y_he, minlength=10).double() / torch.bincount(y_all, minlength=10).double()
    assert torch.allclose(frac, torch.full((10,), 0.2, dtype=torch.float64), atol=0.01)


def test_digits_resize_matches_interpolate_and_cache_returns_copies():
    from sklearn.datasets import load_digits

    raw = torch.from_numpy(load_digits().images[:5].astype(np.float32)).unsqueeze(1)
    ref = (
        torch.nn.functional.interpolate(raw, size=(16, 16), mode="bilinear", align_corners=False) / 8.0 - 1.0
    )
    x, _ = load_digits_tensors("all")
    assert torch.allclose(x[:5], ref.clamp(-1, 1), atol=1e-6)
    x[:] = 0.0  # callers get copies
    assert load_digits_tensors("all")[0].min() == -1.0
    assert load_digits_tensors("all", size=8)[0].shape == (1797, 1, 8, 8)
    with pytest.raises(ValueError):
        load_digits_tensors("test")


def test_grid_png():
    x, _ = load_digits_tensors("heldout")
    img = to_uint8_grid(x[:12], nrow=5)
    assert img.mode == "L" and img.size == ((5 * 17 + 1) * 4, (3 * 17 + 1) * 4)
    rgb = to_uint8_grid(x[:4].repeat(1, 3, 1, 1) * 2.0, nrow=4, scale=1, padding=0)  # out of range is clamped
    assert rgb.mode == "RGB" and rgb.size == (64, 16)


# -------------------------------------------------------------------------------------- classifier


def test_shipped_classifier_accuracy_and_metadata():
    meta = json.loads(CONFIG_PATH.read_text())
    assert meta["architecture"]["feature_dim"] == 128 and meta["seed"] == 0
    model = load_classifier()
    assert isinstance(model, DigitsClassifier) and not model.training
    x, y = load_digits_tensors("heldout")
    acc = class_accuracy(x, y, model)
    assert acc >= 0.97
    assert acc == pytest.approx(meta["heldout_accuracy"], abs=0.003)
    feats = extract_features(x[:10], model, batch_size=3)
    assert feats.shape == (10, 128) and (feats >= 0).all()
    assert torch.allclose(feats, model.features(x[:10]), atol=1e-5)


def test_missing_weights_error_names_the_script(tmp_path):
    with pytest.raises(FileNotFoundError, match="train_classifier"):
        load_classifier(path=tmp_path / "nope.safetensors")
    assert WEIGHTS_PATH.is_file()


# -------------------------------------------------------------------------------- frechet distance


def test_frechet_distance_zero_on_itself_and_symmetric():
    a, b = reference_features("train"), reference_features("heldout")
    assert abs(frechet_distance(a, a)) < 1e-4 and abs(frechet_distance(b, b)) < 1e-4
    assert frechet_distance(a, b) == pytest.approx(frechet_distance(b, a), rel=1e-9, abs=1e-9)
    # agrees with the scipy.linalg.sqrtm recipe used by pytorch-fid
    pytest.importorskip("scipy")
    assert frechet_distance(a, b) == pytest.approx(frechet_distance(a, b, method="sqrtm"), rel=1e-3, abs=1e-4)


def test_frechet_distance_closed_form_gaussians():
    # FD between N(m1, s1^2 I) and N(m2, s2^2 I) in D dims is |m1-m2|^2 + D (s1 - s2)^2
    g = torch.Generator().manual_seed(0)
    d, n = 4, 200_000
    a = torch.randn(n, d, generator=g, dtype=torch.float64)
    b = 2.0 * torch.randn(n, d, generator=g, dtype=torch.float64) + 1.0
    assert frechet_distance(a, b) == pytest.approx(d * 1.0 + d * 1.0, rel=0.02)
    bad = a[:10].clone()
    bad[0, 0] = float("nan")
    assert np.isnan(frechet_distance(a[:10], bad))


def test_floor_far_below_noise_ceiling():
    floors = reference_floors()
    assert 0.0 < floors["fd_floor"] < 0.1 * floors["fd_ceiling"]
    assert floors["heldout_precision"] > 0.7 and floors["heldout_recall"] > 0.7
    assert floors["noise_precision"] < 0.1


# ------------------------------------------------------------------------------- precision / recall


def test_precision_recall_heldout_vs_train_high():
    p, r = precision_recall(reference_features("train"), reference_features("heldout"), k=3)
    assert p > 0.7 and r > 0.7


def test_mode_collapse_is_caught():
    x, y = load_digits_tensors("heldout")
    threes = x[y == 3]
    collapsed = threes[torch.arange(len(x)) % len(threes)]
    balanced = evaluate_samples(x, y)
    mode = evaluate_samples(collapsed, torch.full((len(x),), 3))
    assert mode["recall"] < 0.5 * balanced["recall"]
    assert mode["fd"] > 20 * balanced["fd"]
    assert mode["accuracy"] > 0.9  # the samples are fine individually ...
    assert mode["precision"] > 0.7  # ... and on the real manifold: only recall and FD see the collapse
    assert set(balanced) >= {"fd", "accuracy", "precision", "recall"}
    assert np.isnan(evaluate_samples(x[:20])["accuracy"])


def test_precision_recall_toy_geometry():
    g = torch.Generator().manual_seed(0)
    real = torch.randn(500, 2, generator=g)
    far = torch.randn(500, 2, generator=g) + 20.0
    assert precision_recall(real, far) == (0.0, 0.0)
    half = real[real[:, 0] > 0]  # a subset of the real points: precise, half the recall
    p, r = precision_recall(real, half)
    assert p == 1.0 and 0.3 < r < 0.7
