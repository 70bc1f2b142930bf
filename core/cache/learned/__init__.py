"""Learned feature cache (DisCa-style): a light predictor of a skipped block range's residual, trained on the
model's own trajectories, applied through the same cache API as the rule-based caches.

- ``predictor`` -- ``ResidualPredictor`` (Eq. (1): reuse + linear map + low-rank token MLP with a grid mix);
- ``trajectories`` -- ``record_range`` (block-range features along sampling runs) and the training pairs;
- ``train`` -- the loss, the pairs dataset and its resumable sampler, ``collect_pairs`` (Lightning's
  ``callbacks/learned_cache.py`` trains with them);
- ``store`` -- safetensors + fingerprint (name, config hash, weights hash): another model's predictor is refused;
- ``cache`` -- ``LearnedCache``, a ``BlockCache`` on a fixed skip schedule: ``apply_cache(model, cache)`` (diffusers
  hooks) or the ``BlockRangeRunner`` of any host;
- ``plan`` -- ``LearnedPlanCache``, a block range *per call* (e.g. all blocks at call 1, two at call 2), one predictor
  per skipped call trained on the plan's own cached trajectories (``plan_pairs``), stored by ``save_plan`` /
  ``load_plan``.
"""

from .cache import LearnedCache
from .plan import PLAN_FORMAT, LearnedPlanCache, load_plan, plan_pairs, save_plan
from .predictor import ResidualPredictor, sigma_features
from .store import LearnedCacheMismatchError, file_format, load_predictor, model_identity, read_header, save_predictor
from .train import EpochSeededSampler, PairsDataset, collect_pairs, dit_sigma_of_call, predictor_loss
from .trajectories import Trajectories, record_range

__all__ = [
    "PLAN_FORMAT", "EpochSeededSampler", "LearnedCache", "LearnedCacheMismatchError", "LearnedPlanCache",
    "PairsDataset", "ResidualPredictor", "Trajectories", "collect_pairs", "dit_sigma_of_call", "file_format",
    "load_plan", "load_predictor", "model_identity", "plan_pairs", "predictor_loss", "read_header", "record_range",
    "save_plan", "save_predictor", "sigma_features",
]
