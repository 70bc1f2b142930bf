"""ONNX export of the 4-step consistency student with a learned-cache plan on (``core.export.learned_plan``): the
torch-free runtime (``OnnxLearnedPlanDenoiser``) runs the full graph or the planned call's partial graph per call and
matches core's ``LearnedPlanCache`` through the diffusers hooks within fp32 tolerance -- a call with a predictor and
a call without (plain reuse) alike."""

from __future__ import annotations

import numpy as np
import pytest
import torch

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from fewstep.core.cache import apply_cache  # noqa: E402
from fewstep.core.cache.learned import LearnedPlanCache, ResidualPredictor, model_identity  # noqa: E402
from fewstep.core.export.cached_runtime import OnnxLearnedPlanDenoiser  # noqa: E402
from fewstep.core.export.fp16 import read_onnx_metadata  # noqa: E402
from fewstep.core.export.learned_plan import export_learned_plan, plan_partial_path  # noqa: E402
from fewstep.core.export.np_sampling import get_sampler as np_sampler  # noqa: E402
from fewstep.core.models.embedded import WEIGHTS_DIR  # noqa: E402
from fewstep.core.models.students import load_student  # noqa: E402
from fewstep.core.sampling import get_sampler  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

PLAN = {1: 4, 2: 2}  # call 1: blocks [1, 5) predicted; call 2: blocks [1, 3) reused (no predictor)
HEAD = 1


def _predictor(dim: int) -> ResidualPredictor:
    """Every weight nonzero: an untrained predictor is exactly reuse, this one really predicts."""
    pred = ResidualPredictor(dim, rank=8, mix=True)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in pred.parameters():
            p.copy_(0.02 * torch.randn(p.shape, generator=g))
    return pred.eval()


@pytest.fixture(scope="module")
def student():
    return load_student(WEIGHTS_DIR / "digits_consistency_4step.safetensors")  # shipped: missing fails


@pytest.fixture(scope="module")
def exported(student, tmp_path_factory):
    den, meta = student
    cache = LearnedPlanCache(PLAN, {1: _predictor(int(den.model.inner_dim))}, head_blocks=HEAD,
                             identity=model_identity(den))
    path = tmp_path_factory.mktemp("lp") / "student.onnx"
    return export_learned_plan(den, cache, path, sampler=meta["sampler"], sigmas=meta["sigmas"]), cache


def _core_sample(den, meta, cache, x, y):
    sig = torch.tensor(meta["sigmas"])
    with apply_cache(den, cache):
        return get_sampler(meta["sampler"])(den, x, sig, extra_args={"class_labels": y}, disable=True).numpy()


def test_files_and_metadata(exported):
    res, cache = exported
    assert res.max_rel_error is not None and res.max_rel_error < 1e-4
    meta = read_onnx_metadata(res.path)["learned_cache_plan"]
    assert meta["plan"] == {"1": 4, "2": 2} and meta["head_blocks"] == HEAD
    assert meta["residual_outputs"] == {"1": "range_residual_5", "2": "range_residual_3"}
    for k in PLAN:
        part = plan_partial_path(res.path, k)
        assert meta["partials"][str(k)] == part.name and part.is_file()
        assert read_onnx_metadata(part)["graph"] == "learned_cache_partial"
    assert meta["identity"] == cache.identity and list(meta["predictors"]) == ["1"]


def test_runtime_matches_cores_plan_cache(student, exported):
    den, meta = student
    res, cache = exported
    y = torch.tensor([0, 3, 7])
    sig = torch.tensor(meta["sigmas"])
    x = torch.randn(3, 1, 16, 16, generator=torch.Generator().manual_seed(4)) * (1 + sig[0] ** 2) ** 0.5
    core = cache.fresh()
    ref = _core_sample(den, meta, core, x, y)
    m = OnnxLearnedPlanDenoiser(res.path)
    out = np_sampler(meta["sampler"])(m, x.numpy(), sig.numpy(), extra_args={"class_labels": y.numpy()})
    assert m.stats["skipped"] == core.stats["skipped"] == len(PLAN)
    assert m.stats["computed"] == core.stats["computed"] == len(sig) - 1 - len(PLAN)
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4 * float(np.abs(ref).max()))
    # a second run in the same object starts afresh (sigma rises): the same sample
    again = np_sampler(meta["sampler"])(m, x.numpy(), sig.numpy(), extra_args={"class_labels": y.numpy()})
    np.testing.assert_array_equal(again, out)
    assert m.stats["runs"] == 2
    # the predictor matters: plain reuse on the same plan (core) gives another sample
    reuse = _core_sample(den, meta, LearnedPlanCache(PLAN, head_blocks=HEAD), x, y)
    assert np.abs(reuse - out).max() > 1e-3


def test_errors(student, exported, tmp_path):
    den, _ = student
    res, _ = exported
    from fewstep.core.cache.learned import LearnedCache
    from fewstep.core.export.cached_runtime import OnnxLearnedCacheDenoiser
    from fewstep.core.export.metadata import OnnxModelError

    with pytest.raises(OnnxModelError, match="no learned cache"):
        OnnxLearnedCacheDenoiser(res.path)
    with pytest.raises(TypeError, match="LearnedPlanCache"):
        export_learned_plan(den, LearnedCache(_predictor(int(den.model.inner_dim)), [1]), tmp_path / "x.onnx")
    with pytest.raises(ValueError, match="skips past the model"):
        export_learned_plan(den, LearnedPlanCache({1: 9}), tmp_path / "y.onnx")
    with pytest.raises(FileExistsError):
        export_learned_plan(den, LearnedPlanCache(PLAN), res.path, overwrite=False)
