"""Metrics of the embedded benchmark: a bundled digits feature network, Frechet distance (Heusel et al.
2017), k-NN precision/recall (Kynkaenniemi et al. 2019) and class accuracy. See ``quality``."""

from .classifier import DigitsClassifier, load_classifier
from .quality import (
    class_accuracy,
    evaluate_samples,
    extract_features,
    frechet_distance,
    precision_recall,
    reference_features,
    reference_floors,
)

__all__ = [
    "DigitsClassifier",
    "class_accuracy",
    "evaluate_samples",
    "extract_features",
    "frechet_distance",
    "load_classifier",
    "precision_recall",
    "reference_features",
    "reference_floors",
]
