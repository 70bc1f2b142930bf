"""Learned feature cache (DisCa-style): a light predictor of a skipped block range's residual, trained on the
model's own trajectories, applied through the same cache API as the rule-based caches.

- ``predictor`` -- ``ResidualPredictor`` (Eq. (1): reuse + linear map + low-rank token MLP with a grid mix);
- ``trajectories`` -- ``record_range`` (block-range features along sampling runs) and the training pairs;
- ``train`` -- the loss, the pairs dataset and its resumable sampler, ``collect_pairs`` (Lightning's
  ``callbacks/learned_cache.py`` trains with them);
- ``store`` -- safetensors + fingerprint (name, config hash, weights hash): another model's predictor is refused;
- ``cache`` -- ``LearnedCache``, a ``BlockCache`` on a fixed skip schedule: ``apply_cache(model, cache)`` (diffusers
  hooks) or the ``BlockRangeRunner`` of any host.
"""

from .cache import LearnedCache
from .predictor import ResidualPredictor, sigma_features
from .store import LearnedCacheMismatchError, load_predictor, model_identity, read_header, save_predictor
from .train import EpochSeededSampler, PairsDataset, collect_pairs, dit_sigma_of_call, predictor_loss
from .trajectories import Trajectories, record_range

__all__ = [
    "EpochSeededSampler", "LearnedCache", "LearnedCacheMismatchError", "PairsDataset", "ResidualPredictor",
    "Trajectories", "collect_pairs", "dit_sigma_of_call", "load_predictor", "model_identity", "predictor_loss",
    "read_header", "record_range", "save_predictor", "sigma_features",
]
