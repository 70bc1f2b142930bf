"""The learned cache on a per-call plan (``core.cache.learned.plan``): parity with the single-range learned cache where
the plan is one, exact on linear blocks, training pairs from the plan's own cached runs, store and refusal."""

from __future__ import annotations

import pytest
import torch
from test_cache_learned import D, LinearTail, T, _dit, _trajectory

from fewstep.core.cache import BlockRangeRunner, CacheConfigError, apply_cache
from fewstep.core.cache.learned import (
    LearnedCache,
    LearnedCacheMismatchError,
    LearnedPlanCache,
    ResidualPredictor,
    load_plan,
    model_identity,
    plan_pairs,
    save_plan,
)

pytestmark = pytest.mark.usefixtures("one_thread")

SIGMAS = [3.0, 2.0, 1.0, 0.5]


def _sample_dit(den, cache=None):
    from fewstep.core.sampling import get_sigmas, sample_euler

    sig = get_sigmas("karras", den.model_sampling, 4)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * sig[0]
    cond = {"class_labels": torch.tensor([1, 2])}
    if cache is None:
        return sample_euler(den, x, sig, extra_args=cond, disable=True)
    with apply_cache(den, cache):
        return sample_euler(den, x, sig, extra_args=cond, disable=True)


def test_plan_matches_the_single_range_cache_where_it_is_one():
    """An empty plan is the uncached model bit for bit; a plan with one entry and no predictor is exactly
    ``LearnedCache`` with an untrained (reuse) predictor on that range and call -- also when the range ends inside the
    stack, where the reference comes from the runner's observation of a computed call, not from its range end."""
    den = _dit(0)  # 3 blocks
    ref = _sample_dit(den)
    assert torch.equal(_sample_dit(den, LearnedPlanCache({})), ref)
    for plan, head, tail in (({1: 3}, 0, 0), ({2: 2}, 0, 1), ({3: 1}, 1, 1)):
        (k, n), = plan.items()
        single = LearnedCache(ResidualPredictor(16, rank=4), skip_steps=[k], head_blocks=head, tail_blocks=tail)
        want = _sample_dit(den, single)
        assert not torch.equal(want, ref)
        assert torch.equal(_sample_dit(den, LearnedPlanCache(plan, head_blocks=head)), want), plan


def test_plan_skips_its_blocks_and_resets_per_run():
    den = _dit(0)
    cache = LearnedPlanCache({1: 3, 2: 2})
    out = _sample_dit(den, cache)
    assert cache.stats["skipped"] == 2 and cache.stats["computed"] == 2 and cache.stats["forced"] == 0
    assert cache.stats["blocks_skipped"] == 3 + 2 and cache.stats["blocks_run"] == 3 + 0 + 1 + 3
    assert cache.block_evals(3, 4) == 7
    assert torch.isfinite(out).all()
    assert torch.equal(_sample_dit(den, cache), out)  # a second run starts afresh: same result


def _plan_sample(net, x0):
    def sample(cache):
        runner = BlockRangeRunner(cache, len(net.transformer_blocks)) if cache is not None else None
        return _trajectory(net, x0, SIGMAS, runner)
    return sample


def _sigma_of_call(a, k):
    return k.get("timestep", a[1] if len(a) > 1 else None)


def test_plan_learns_linear_blocks_exactly():
    """Blocks of ``LinearTail`` are linear in the hidden state entering block 0: each call's predictor fits its range
    to float precision, and the planned model matches the uncached one."""
    from fewstep.callbacks.learned_cache import fit_learned_cache

    net = LinearTail()
    blocks = list(net.transformer_blocks)
    x0 = torch.randn(16, T, D, generator=torch.Generator().manual_seed(1))
    plan = {1: 4, 2: 2}
    preds = {}
    for k in sorted(plan):
        pairs = plan_pairs(_plan_sample(net, x0), net, blocks, plan, k, preds, _sigma_of_call)
        module, rec = fit_learned_cache(pairs, rank=4, epochs=2, batch_size=16, stop_below=1e-10, accelerator="cpu")
        assert rec["linear_fit_rel_err"] < 1e-6, k
        preds[k] = module.predictor
    cache = LearnedPlanCache(plan, preds)
    test_x = torch.randn(4, T, D, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = _trajectory(net, test_x, SIGMAS)
        got = _plan_sample(net, test_x)(cache)
    assert cache.stats["skipped"] == 2
    for a, b in zip(ref, got):
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-4)
    # plain reuse on the same plan is not exact: the predictors did the work
    with torch.no_grad():
        reuse = _plan_sample(net, test_x)(LearnedPlanCache(plan))
    assert (reuse[-1] - ref[-1]).abs().max() > 1e-2


def test_plan_pairs_come_from_the_cached_prefix():
    """Pairs for call 2 are recorded with call 1 skipped: their inputs are those of cached sampling (not of the
    uncached run), their reference is call 0 (gap 2), and their targets are the true range residual there."""
    net = LinearTail()
    blocks = list(net.transformer_blocks)
    x0 = torch.randn(3, T, D, generator=torch.Generator().manual_seed(2))
    sample = _plan_sample(net, x0)
    first = plan_pairs(sample, net, blocks, {1: 4, 2: 2}, 1, {}, _sigma_of_call)
    second = plan_pairs(sample, net, blocks, {1: 4, 2: 2}, 2, {}, _sigma_of_call)
    alone = plan_pairs(sample, net, blocks, {2: 2}, 2, {}, _sigma_of_call)  # no prefix: uncached inputs, from call 1
    assert first["gap"].unique().tolist() == [1] and second["gap"].unique().tolist() == [2]
    assert alone["gap"].unique().tolist() == [1]
    assert not torch.allclose(second["h"], alone["h"])  # call 1 was predicted (reuse) before call 2
    assert torch.equal(second["h_c"], first["h_c"])  # both refer to call 0
    with torch.no_grad():  # the target is what blocks [0, 2) really do to that input
        h = second["h"]
        want = blocks[1](hidden_states=blocks[0](hidden_states=h)) - h
    assert torch.allclose(second["r_t"], want, atol=1e-6)
    with pytest.raises(ValueError, match="not in the plan"):
        plan_pairs(sample, net, blocks, {1: 4}, 2, {}, _sigma_of_call)


def test_plan_store_roundtrip_and_refusal(tmp_path):
    a, b = _dit(0), _dit(1)
    ia, ib = model_identity(a), model_identity(b)
    pred = ResidualPredictor(16, rank=4)
    torch.nn.init.normal_(pred.up.weight, std=0.1)
    cache = LearnedPlanCache({1: 3, 2: 2}, {1: pred}, identity=ia)
    path = save_plan(tmp_path / "plan.safetensors", cache, ia, {"note": "test"})
    back = load_plan(path, a)
    assert back.plan == {1: 3, 2: 2} and sorted(back.predictors) == [1] and back.identity == ia
    for (n1, v1), (n2, v2) in zip(pred.state_dict().items(), back.predictors[1].state_dict().items()):
        assert n1 == n2 and torch.equal(v1, v2)
    assert torch.equal(_sample_dit(a, back), _sample_dit(a, LearnedPlanCache({1: 3, 2: 2}, {1: pred})))
    with pytest.raises(LearnedCacheMismatchError) as e:
        load_plan(path, b)
    assert ia["weights_hash"] in str(e.value) and ib["weights_hash"] in str(e.value)
    assert not list(tmp_path.glob(".*tmp*"))  # the atomic write left no temp file


def test_bad_plans_are_refused():
    with pytest.raises(CacheConfigError, match="call index >= 1"):
        LearnedPlanCache({0: 2})
    with pytest.raises(CacheConfigError, match=">= 1 skipped block"):
        LearnedPlanCache({1: 0})
    with pytest.raises(CacheConfigError, match="does not skip"):
        LearnedPlanCache({1: 2}, {2: ResidualPredictor(16, rank=0)})
    with pytest.raises(CacheConfigError, match="past the model's 3 blocks"):
        _sample_dit(_dit(0), LearnedPlanCache({1: 3}, head_blocks=1))


def test_benchmark_plan_option_parses_and_refuses():
    from fewstep.benchmarks.caching_learned import parse_plans, plan_label

    plans = parse_plans("1:5,2:5,3:5,7:5; 1:5,2:3;")
    assert plans == [{1: 5, 2: 5, 3: 5, 7: 5}, {1: 5, 2: 3}]
    assert [plan_label(p) for p in plans] == ["1:5,2:5,3:5,7:5", "1:5,2:3"]
    assert parse_plans("") == []
    with pytest.raises(SystemExit, match="call:blocks"):
        parse_plans("1-5")
