"""The learned cache trained while a student distils (``callbacks.learned_cache.LearnedCacheDuringDistillation``): it
records the student's own trajectories during fit, its predictor beats plain reuse on the student's features, it is
saved keyed to the final student's fingerprint, and a resumed fit continues the same predictor exactly."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("lightning")
sys.path.insert(0, str(Path(__file__).parent))
import distill_tiny as tiny  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("lcd")


def _callback(path=None):
    from fewstep.callbacks.learned_cache import LearnedCacheDuringDistillation

    return LearnedCacheDuringDistillation([1], head_blocks=1, rank=4, lr=1e-2, every_n_steps=2, samples=6, updates=6,
                                          max_gap=1, path=path, seed=3)


def _fit(work, batches, cb, ckpt=None, save=None):
    module = tiny.build("consistency", work, teacher=tiny.tiny_teacher(num_layers=3))
    t = tiny.trainer(module, batches, callbacks=[cb])
    t.fit(module, ckpt_path=ckpt)
    if save:
        t.save_checkpoint(save)
    return module


def test_trains_on_the_students_features_and_saves_keyed_to_the_student(work, tmp_path):
    from fewstep.core.cache.learned import ResidualPredictor, model_identity, predictor_loss, read_header

    cb = _callback(tmp_path / "lc.safetensors")
    module = _fit(work, 6, cb)
    assert cb.records == 3 and len(cb.history) == 3
    plan, den, blocks = cb._network(module)
    header = read_header(cb.written)
    assert header["identity"] == model_identity(den)
    assert header["identity"]["weights_hash"] != model_identity(module.teacher)["weights_hash"]
    assert header["meta"]["skip_steps"] == [1] and header["meta"]["records"] == 3
    # on fresh trajectories of the final student, the trained predictor beats plain reuse (the zero-initial one)
    cb.seed = 99
    pairs = cb._record(module)
    reuse = ResidualPredictor(cb.predictor.dim, 4, True)
    with torch.no_grad():
        trained, plain = float(predictor_loss(cb.predictor, pairs)), float(predictor_loss(reuse, pairs))
    assert trained < 0.9 * plain, (trained, plain)


def test_resumed_fit_continues_the_same_predictor(work, tmp_path):
    full = _callback()
    _fit(work, 6, full)
    _fit(work, 4, _callback(), save=tmp_path / "mid.ckpt")
    resumed = _callback()
    _fit(work, 6, resumed, ckpt=tmp_path / "mid.ckpt")
    assert resumed.records == full.records == 3 and resumed.batches == full.batches == 6
    for k, v in full.predictor.state_dict().items():
        assert torch.equal(v, resumed.predictor.state_dict()[k]), k
