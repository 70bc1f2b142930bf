"""ONNX export of the 4-step consistency student with its learned cache on (``core.export.learned_cache``): the
torch-free runtime (``core.export.cached_runtime``) switches between the full and the partial graph per the exported
skip plan and matches core's cached sampling (``LearnedCache`` through the diffusers hooks) within fp32 tolerance."""

from __future__ import annotations

import numpy as np
import pytest
import torch

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from fewstep.core.cache import apply_cache  # noqa: E402
from fewstep.core.cache.learned import LearnedCache, ResidualPredictor, model_identity  # noqa: E402
from fewstep.core.export.cached_runtime import OnnxLearnedCacheDenoiser  # noqa: E402
from fewstep.core.export.fp16 import read_onnx_metadata  # noqa: E402
from fewstep.core.export.learned_cache import export_learned_cache, partial_path  # noqa: E402
from fewstep.core.export.np_sampling import get_sampler as np_sampler  # noqa: E402
from fewstep.core.export.runtime import OnnxDenoiser  # noqa: E402
from fewstep.core.models.embedded import WEIGHTS_DIR  # noqa: E402
from fewstep.core.models.students import load_student  # noqa: E402
from fewstep.core.sampling import get_sampler  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

SKIP = (1, 3)


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
    den, meta = load_student(WEIGHTS_DIR / "digits_consistency_4step.safetensors")  # shipped: missing fails
    return den, meta


@pytest.fixture(scope="module")
def exported(student, tmp_path_factory):
    den, meta = student
    cache = LearnedCache(_predictor(int(den.model.inner_dim)), SKIP, head_blocks=1, tail_blocks=1,
                         identity=model_identity(den))
    path = tmp_path_factory.mktemp("lc") / "student.onnx"
    res = export_learned_cache(den, cache, path, sampler=meta["sampler"], sigmas=meta["sigmas"])
    return res, cache


def _core_sample(den, meta, cache, x, y):
    sig = torch.tensor(meta["sigmas"])
    with apply_cache(den, cache):
        return get_sampler(meta["sampler"])(den, x, sig, extra_args={"class_labels": y}, disable=True).numpy()


def test_files_and_metadata(exported):
    res, cache = exported
    assert res.max_rel_error is not None and res.max_rel_error < 1e-4
    meta = read_onnx_metadata(res.path)
    plan = meta["learned_cache"]
    assert plan["skip_steps"] == list(SKIP) and plan["block_range"] == [1, plan["num_blocks"] - 1]
    assert plan["partial"] == partial_path(res.path).name and partial_path(res.path).is_file()
    part = read_onnx_metadata(partial_path(res.path))
    assert part["graph"] == "learned_cache_partial"
    assert [i["name"] for i in part["inputs"] if i["role"] == "cache"] == list(plan["cache_inputs"])
    assert plan["identity"] == cache.identity


def test_runtime_matches_cores_cached_sampling(student, exported):
    den, meta = student
    res, cache = exported
    y = torch.tensor([0, 3, 7])
    sig = torch.tensor(meta["sigmas"])
    x = torch.randn(3, 1, 16, 16, generator=torch.Generator().manual_seed(4)) * (1 + sig[0] ** 2) ** 0.5
    core = LearnedCache(cache.predictor, SKIP, head_blocks=1, tail_blocks=1)
    ref = _core_sample(den, meta, core, x, y)
    m = OnnxLearnedCacheDenoiser(res.path)
    out = np_sampler(meta["sampler"])(m, x.numpy(), sig.numpy(), extra_args={"class_labels": y.numpy()})
    assert m.stats["skipped"] == core.stats["skipped"] == len(SKIP)
    assert m.stats["computed"] == core.stats["computed"] == len(sig) - 1 - len(SKIP)
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4 * float(np.abs(ref).max()))
    # a second run in the same object starts afresh (sigma rises): the same sample
    again = np_sampler(meta["sampler"])(m, x.numpy(), sig.numpy(), extra_args={"class_labels": y.numpy()})
    np.testing.assert_array_equal(again, out)
    assert m.stats["runs"] == 2
    # the cache really changes the sample (vs the uncached full graph), and plain reuse differs from the predictor
    plain = np_sampler(meta["sampler"])(OnnxDenoiser(res.path), x.numpy(), sig.numpy(),
                                        extra_args={"class_labels": y.numpy()})
    assert np.abs(plain - out).max() > 1e-3
    ref_plain = get_sampler(meta["sampler"])(den, x, sig, extra_args={"class_labels": y}, disable=True).numpy()
    np.testing.assert_allclose(plain, ref_plain, rtol=1e-4, atol=1e-4 * float(np.abs(ref_plain).max()))


def test_runtime_skip_override_and_errors(student, exported, tmp_path):
    den, meta = student
    res, cache = exported
    m = OnnxLearnedCacheDenoiser(res.path, skip_steps=[2])
    sig = np.asarray(meta["sigmas"], np.float32)
    x = np.random.default_rng(0).standard_normal((2, 1, 16, 16)).astype(np.float32) * sig[0]
    np_sampler(meta["sampler"])(m, x, sig, extra_args={"class_labels": np.array([1, 2])})
    assert m.stats["skipped"] == 1
    with pytest.raises(ValueError, match="call indices >= 1"):
        OnnxLearnedCacheDenoiser(res.path, skip_steps=[0])
    from fewstep.core.export import export_onnx
    from fewstep.core.export.metadata import OnnxModelError

    plain = export_onnx(den, tmp_path / "plain.onnx", verify=False)
    with pytest.raises(OnnxModelError, match="no learned cache"):
        OnnxLearnedCacheDenoiser(plain.path)
    with pytest.raises(TypeError, match="LearnedCache"):
        export_learned_cache(den, object(), tmp_path / "x.onnx")
