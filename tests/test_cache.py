"""Feature caches (core/cache): exactness at threshold 0, honest skip counts, state isolation, patch discipline."""

from __future__ import annotations

import pytest
import torch

from fewstep.core.cache import (
    CacheConfigError,
    DeltaDiTCache,
    FirstBlockCache,
    StepCache,
    TaylorForecaster,
    apply_cache,
    calibrate,
)
from fewstep.core.guidance import CFGDenoiser
from fewstep.core.models.digits import NULL_CLASS
from fewstep.core.models.embedded import load_teacher
from fewstep.core.sampling import get_sigmas, sample_dpmpp_2m, sample_euler

diffusers = pytest.importorskip("diffusers")
from fewstep.core.models.diffusers_adapters import diffusers_denoiser  # noqa: E402

STEPS = 6


pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------------------------ models
def _teacher():
    return load_teacher()  # shipped in core/models/weights: a missing file fails here


def _teacher_case():
    den = _teacher()
    return CFGDenoiser(den, 2.0, null=NULL_CLASS), den, (3, 1, 16, 16), {"class_labels": torch.tensor([1, 4, 7])}


def _dit_case():
    torch.manual_seed(0)
    m = diffusers.DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                        num_layers=3, sample_size=8, patch_size=2, num_embeds_ada_norm=10)
    den = diffusers_denoiser(m.eval())
    return CFGDenoiser(den, 3.0, null=10), den, (2, 4, 8, 8), {"class_labels": torch.tensor([1, 2])}


def _flux_case():
    torch.manual_seed(0)
    m = diffusers.FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2,
                                         attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                         pooled_projection_dim=8, guidance_embeds=False, axes_dims_rope=(2, 2, 4))
    den = diffusers_denoiser(m.eval())
    return den, den, (2, 4, 8, 8), {"encoder_hidden_states": torch.randn(2, 5, 16),
                                    "pooled_projections": torch.randn(2, 8)}


def _sd3_case():
    torch.manual_seed(0)
    m = diffusers.SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=3,
                                        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                        caption_projection_dim=16, pooled_projection_dim=8, out_channels=4,
                                        pos_embed_max_size=16)
    den = diffusers_denoiser(m.eval())
    return den, den, (2, 4, 8, 8), {"encoder_hidden_states": torch.randn(2, 5, 16),
                                    "pooled_projections": torch.randn(2, 8)}


def _unet_case():
    torch.manual_seed(0)
    m = diffusers.UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(16, 32),
                              layers_per_block=1, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                              up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8, num_class_embeds=4)
    den = diffusers_denoiser(m.eval())
    return den, den, (2, 3, 8, 8), {"class_labels": torch.tensor([0, 3])}


CASES = {"teacher": _teacher_case, "dit": _dit_case, "flux": _flux_case, "sd3": _sd3_case, "unet": _unet_case}
_built: dict = {}


def _case(name):
    if name not in _built:
        _built[name] = CASES[name]()
    return _built[name]


@torch.no_grad()
def _sample(model, den, shape, cond, seed=0, sampler=sample_dpmpp_2m, steps=STEPS):
    sig = get_sigmas("karras", den.model_sampling, steps)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    x = den.model_sampling.noise_scaling(sig[0], noise, torch.zeros_like(noise), max_denoise=True)
    return sampler(model, x, sig, extra_args=dict(cond), disable=True)


_cals: dict = {}


def _calibration(name):
    if name not in _cals:
        model, den, shape, cond = _case(name)
        noise = torch.randn(shape, generator=torch.Generator().manual_seed(99))
        guidance = (lambda d: CFGDenoiser(d, model.scale, null=model.null)) if model is not den else None
        _cals[name] = calibrate(den, noise, cond, steps=STEPS, guidance=guidance, degree=2)
    return _cals[name]


def _caches(name, threshold):
    """Every cache type this model supports (each indicator once, forecasts mixed in), at ``threshold``."""
    cal = _calibration(name)
    out = [StepCache(threshold), StepCache(threshold, indicator="easycache", forecast="taylor2"),
           StepCache(threshold, indicator="teacache", calibration=cal),
           StepCache(threshold, indicator="magcache", calibration=cal, forecast="taylor1")]
    if name != "unet":
        out += [FirstBlockCache(threshold, forecast="taylor1"), FirstBlockCache(threshold, indicator="easycache"),
                FirstBlockCache(threshold, indicator="magcache", calibration=cal),
                DeltaDiTCache(threshold), DeltaDiTCache(threshold, indicator="input", forecast="taylor2")]
        out += [FirstBlockCache(threshold, indicator="teacache", calibration=cal)]  # adaLN norm1 of block 0
    return out


# ------------------------------------------------------------------------------------------------ exactness
@pytest.mark.parametrize("name", list(CASES))
def test_threshold_zero_is_bit_identical(name):
    model, den, shape, cond = _case(name)
    ref = _sample(model, den, shape, cond)
    for cache in _caches(name, 0.0) + [DeltaDiTCache(interval=1)] * (name != "unet"):
        with apply_cache(model, cache) as handle:
            out = _sample(model, den, shape, cond)
        assert torch.equal(out, ref), f"{name}: {cache!r} changed the output at threshold 0"
        assert cache.stats["skipped"] == 0 and cache.stats["computed"] == STEPS, handle
    assert torch.equal(_sample(model, den, shape, cond), ref), "the model was not restored"


@pytest.mark.parametrize("name", list(CASES))
def test_high_threshold_skips_what_it_reports(name):
    model, den, shape, cond = _case(name)
    net = den.model
    calls = {"net": 0}
    net_hook = net.register_forward_hook(lambda *a: calls.__setitem__("net", calls["net"] + 1))
    blocks = list(getattr(net, "transformer_blocks", [])) + list(getattr(net, "single_transformer_blocks", []))
    runs = {"blocks": 0}
    inner = [getattr(b, "attn", None) or b.attn1 for b in blocks]  # only runs when the block really computes
    inner_hooks = [m.register_forward_hook(lambda *a: runs.__setitem__("blocks", runs["blocks"] + 1)) for m in inner]
    try:
        ref = _sample(model, den, shape, cond)
        for cache in _caches(name, 50.0):
            calls["net"] = runs["blocks"] = 0
            with apply_cache(model, cache):
                out = _sample(model, den, shape, cond)
            st = cache.stats
            assert torch.isfinite(out).all()
            assert st["calls"] == STEPS and st["computed"] + st["skipped"] == STEPS
            assert st["skipped"] > 0, f"{cache!r} skipped nothing at a high threshold"
            if isinstance(cache, StepCache):
                assert calls["net"] == st["computed"], f"{cache!r}: {calls['net']} real calls, reports {st}"
                assert not torch.equal(out, ref)
            else:
                assert calls["net"] == STEPS  # block caches always run the embedding / head / final layer
                assert runs["blocks"] == st["blocks_run"] == STEPS * len(blocks) - st["blocks_skipped"]
                assert st["blocks_skipped"] > 0
    finally:
        net_hook.remove()
        for h in inner_hooks:
            h.remove()


def test_max_consecutive_skips_and_window():
    model, den, shape, cond = _case("teacher")
    cache = StepCache(50.0, max_consecutive_skips=2, trace=True)
    with apply_cache(model, cache):
        _sample(model, den, shape, cond, steps=12)
    pattern = "".join("C" if r["compute"] else "." for r in cache.trace)
    assert pattern == "C..C..C..C..", pattern
    cache = StepCache(50.0, start_percent=0.5, end_percent=0.75, trace=True)
    with apply_cache(model, cache):
        sig = get_sigmas("karras", den.model_sampling, 12)
        cache.set_schedule(sig)
        _sample(model, den, shape, cond, steps=12)
    pattern = "".join("C" if r["compute"] else "." for r in cache.trace)
    assert pattern == "CCCCCC...CCC", pattern


# ------------------------------------------------------------------------------------------------ state
@pytest.mark.parametrize("make", [lambda: StepCache(0.5), lambda: FirstBlockCache(0.5, forecast="taylor1")],
                         ids=["step", "first_block"])
def test_two_runs_do_not_share_state(make):
    model, den, shape, _ = _case("teacher")
    cache = make()
    a = {"class_labels": torch.tensor([0, 1, 2])}
    b = {"class_labels": torch.tensor([7, 8, 9])}
    with apply_cache(model, cache):
        _sample(model, den, shape, a, seed=1)
        out_b = _sample(model, den, shape, b, seed=2)
        assert cache.stats["runs"] == 2 and cache.stats["skipped"] > 0
    fresh = make()
    with apply_cache(model, fresh):
        ref_b = _sample(model, den, shape, b, seed=2)
    assert torch.equal(out_b, ref_b)


class _SplitCFG(torch.nn.Module):
    """CFG with cond and uncond in two separate calls (as ComfyUI does when memory is short)."""

    def __init__(self, den, scale, poison_uncond=0.0):
        super().__init__()
        self.denoiser, self.model_sampling, self.scale, self.poison = den, den.model_sampling, scale, poison_uncond
        self.cond_outputs = []

    def forward(self, x, sigma, class_labels):
        c = self.denoiser(x, sigma, class_labels=class_labels)
        u = self.denoiser(x, sigma, class_labels=torch.full_like(class_labels, NULL_CLASS)) + self.poison
        self.cond_outputs.append(c)
        return u + self.scale * (c - u)


@torch.no_grad()
def _fixed_walk(model, den, shape, cond, steps=10):
    """Call ``model`` along a fixed, output-independent path of inputs (so outputs cannot feed back)."""
    sig = get_sigmas("karras", den.model_sampling, steps)[:-1]
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(5))
    target = torch.randn(shape, generator=torch.Generator().manual_seed(6)).clamp(-1, 1)
    for s in sig:
        model(target + s * noise, s.expand(shape[0]), **cond)


def _poison_call(den, rows_from):
    """Add 1000 to the network output of rows >= rows_from (the uncond half of a stacked CFG batch)."""
    orig = den.call

    def call(module, x_in, t, **cond):
        out = orig(module, x_in, t, **cond).clone()
        out[rows_from:] += 1000.0
        return out

    return orig, call


@pytest.mark.parametrize("make", [lambda: StepCache(50.0, max_consecutive_skips=2),
                                  lambda: StepCache(50.0, indicator="easycache", forecast="taylor2")],
                         ids=["input", "easycache_taylor2"])
def test_cond_never_reads_uncond_cache_stacked(make):
    model, den, shape, cond = _case("teacher")
    b = shape[0]
    outs = {}
    for poison in (False, True):
        seen: list = []
        hook = den.register_forward_hook(lambda m, a, o, seen=seen: seen.append(o[:b].clone()))
        orig, poisoned = _poison_call(den, b)
        den.call = poisoned if poison else orig
        cache = make()
        try:
            with apply_cache(model, cache):
                _fixed_walk(model, den, shape, cond)
        finally:
            den.call = orig
            hook.remove()
        assert cache.stats["skipped"] > 0
        outs[poison] = torch.stack(seen)
    assert torch.equal(outs[False], outs[True]), "the cond rows changed when the uncond rows' cache was poisoned"


def test_cond_never_reads_uncond_cache_separate_calls():
    _, den, shape, cond = _case("teacher")
    results = {}
    for poison in (0.0, 1000.0):
        split = _SplitCFG(den, 2.0, poison)
        cache = StepCache(50.0, max_consecutive_skips=1)
        with apply_cache(split, cache):
            _fixed_walk(split, den, shape, cond)
        assert cache.stats["skipped"] > 0 and cache.stats["calls"] == 20
        results[poison] = torch.stack(split.cond_outputs)
    assert torch.equal(results[0.0], results[1000.0])
    # the cond calls alone, with their own cache, give the same outputs: slot 0 is the cond branch throughout
    seen = []
    hook = den.register_forward_hook(lambda m, a, o: seen.append(o.clone()))
    with apply_cache(den, StepCache(50.0, max_consecutive_skips=1)):
        _fixed_walk(den, den, shape, cond)
    hook.remove()
    assert torch.equal(torch.stack(seen), results[0.0])


@torch.no_grad()
@pytest.mark.parametrize("make", [lambda: StepCache(50.0), lambda: FirstBlockCache(50.0),
                                  lambda: DeltaDiTCache(interval=4, boundary=1.0)],
                         ids=["step", "first_block", "delta_dit"])
def test_batch_or_resolution_change_forces_full_compute(make):
    model, den, shape, cond = _case("teacher")
    sig = get_sigmas("karras", den.model_sampling, 10)
    cache = make()
    with apply_cache(model, cache):
        x = torch.randn(shape) * sig[0]
        for s in sig[:4]:
            model(x, s.expand(shape[0]), **cond)
        x5 = torch.randn(5, *shape[1:])
        y5 = {"class_labels": torch.arange(5)}
        before = dict(cache.stats)
        out = model(x5, sig[4].expand(5), **y5)  # batch size changed mid-run: computed, not reused
        assert cache.stats["forced"] == before["forced"] + 1
        assert cache.stats["computed"] == before["computed"] + 1
    assert torch.equal(out, model(x5, sig[4].expand(5), **y5))


@torch.no_grad()
def test_resolution_change_unet():
    _, den, shape, cond = _case("unet")
    cache = StepCache(50.0)
    with apply_cache(den, cache):
        for s in (10.0, 5.0, 2.0):
            den(torch.randn(shape), torch.tensor(s), **cond)
        big = torch.randn(2, 3, 16, 16)
        out = den(big, torch.tensor(1.0), **cond)
        assert cache.stats["forced"] == 1 and cache.stats["skipped"] == 2
    assert torch.equal(out, den(big, torch.tensor(1.0), **cond))


# ------------------------------------------------------------------------------------------------ patch discipline
def test_apply_and_remove_restore_the_model_exactly():
    model, den, shape, cond = _case("flux")
    net = den.model
    params = {n: p.data_ptr() for n, p in net.named_parameters()}
    call = den.call
    for cache in (StepCache(0.1), FirstBlockCache(0.1), DeltaDiTCache(interval=2)):
        handle = apply_cache(den, cache)
        with pytest.raises(RuntimeError, match="already applied"):
            apply_cache(den, cache)
        _sample(den, den, shape, cond)
        assert cache._slots
        handle.remove()
        assert not cache._slots, "cached tensors must be released on remove"
        assert den.call is call
        assert not den._forward_pre_hooks and not net._forward_pre_hooks and not net._forward_hooks
        assert all("forward" not in vars(b) for b in list(net.transformer_blocks) + list(net.single_transformer_blocks))
    assert {n: p.data_ptr() for n, p in net.named_parameters()} == params


@torch.no_grad()
def test_step_cache_on_a_bare_diffusers_module():
    model, den, shape, cond = _case("dit")  # learned-sigma DiT: output has twice the input channels
    ref = _sample(model, den, shape, cond)
    counter = {"n": 0}
    hook = den.model.pos_embed.register_forward_hook(lambda *a: counter.__setitem__("n", counter["n"] + 1))
    try:
        for threshold in (0.0, 50.0):
            counter["n"] = 0
            cache = StepCache(threshold, max_consecutive_skips=2)
            with apply_cache(den.model, cache):  # the network itself: sigma from its default model sampling
                out = _sample(model, den, shape, cond)
            assert counter["n"] == cache.stats["computed"]
            if threshold == 0:
                assert torch.equal(out, ref)
            else:
                assert cache.stats["skipped"] == 4 and torch.isfinite(out).all()  # C..C..
    finally:
        hook.remove()
    assert "forward" not in vars(den.model)


def test_state_machine_api_for_other_hosts():
    x = torch.ones(2, 3)
    cache = StepCache(0.5)
    with pytest.raises(RuntimeError, match="should_compute"):
        cache.predict(x)
    assert cache.should_compute(x, 10.0, key="cond")
    with pytest.raises(RuntimeError, match="call update"):
        cache.predict(x, key="cond")
    cache = StepCache(0.5)
    assert cache.should_compute(x, 10.0, key="cond")
    cache.update(x, x * 3, key="cond")
    assert cache.should_compute(x * 1.01, 9.0, key="uncond")  # another key: its own, empty state
    cache.update(x * 1.01, x, key="uncond")
    assert not cache.should_compute(x * 1.01, 9.0, key="cond")
    assert torch.allclose(cache.predict(x * 1.01, key="cond"), x * 1.01 + 2 * x)
    out = cache(lambda: x, x * 1.02, 8.0, key="cond")  # the three verbs in one call
    assert torch.allclose(out, x * 1.02 + 2 * x)
    cache.reset()
    assert cache.should_compute(x, 7.0, key="cond")


def test_taylor_forecaster():
    f = TaylorForecaster(order=1)
    f.update((torch.tensor(1.0),), step=0)
    assert f.predict(3)[0] == 1.0  # order 0 until there are two points
    f.update((torch.tensor(3.0),), step=2)
    assert torch.allclose(f.predict(5)[0], torch.tensor(6.0))  # linear: exact
    g = TaylorForecaster(order=2)
    for step in (0, 1, 2):
        g.update((torch.tensor(float(step**2)), None), step=step)
    pred, none = g.predict(3)
    assert none is None and abs(float(pred) - 9.0) <= 1.0  # backward differences: close, not exact


# ------------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("kwargs, match", [
    ({"threshold": -0.1}, "threshold must be a finite number >= 0"),
    ({"threshold": float("nan")}, "threshold must be a finite number >= 0"),
    ({"threshold": float("inf")}, "threshold must be a finite number >= 0"),
    ({"threshold": "high"}, "threshold must be a number"),
    ({"start_percent": 0.8, "end_percent": 0.2}, "start_percent .* is after end_percent"),
    ({"start_percent": -0.1}, r"start_percent must be in \[0, 1\]"),
    ({"end_percent": 1.5}, r"end_percent must be in \[0, 1\]"),
    ({"max_consecutive_skips": -1}, "max_consecutive_skips must be an integer >= 0"),
    ({"indicator": "magic"}, "unknown indicator 'magic'"),
    ({"forecast": "taylor9"}, "forecast must be one of"),
    ({"reduce": "median"}, "unknown reduce"),
])
def test_bad_options_are_clear(kwargs, match):
    with pytest.raises(CacheConfigError, match=match):
        StepCache(**kwargs)


def test_bad_block_options_are_clear():
    model, den, _, _ = _case("teacher")
    with pytest.raises(CacheConfigError, match="head_blocks=5 leaves nothing to cache"):
        apply_cache(model, FirstBlockCache(0.1, head_blocks=5))
    with pytest.raises(CacheConfigError, match="num_blocks=5 would cache every block"):
        apply_cache(model, DeltaDiTCache(interval=2, num_blocks=5))
    with pytest.raises(CacheConfigError, match="interval must be an integer >= 1"):
        DeltaDiTCache(interval=0)
    with pytest.raises(CacheConfigError, match="boundary must be a fraction"):
        DeltaDiTCache(boundary=2.0)
    with pytest.raises(CacheConfigError, match="unknown indicator 'first_block'"):
        StepCache(0.1, indicator="first_block")
    _, unet, _, _ = _case("unet")
    with pytest.raises(CacheConfigError, match="no transformer_blocks ModuleList.*use StepCache"):
        apply_cache(unet, FirstBlockCache(0.1))
    assert "forward" not in vars(unet.model) and not unet._forward_pre_hooks  # nothing left behind


def test_euler_and_heun_style_samplers_run():
    model, den, shape, cond = _case("dit")
    from fewstep.core.sampling import sample_heun

    ref = {}
    for sampler in (sample_euler, sample_heun):
        ref[sampler] = _sample(model, den, shape, cond, sampler=sampler)
        cache = FirstBlockCache(0.2)
        with apply_cache(model, cache):
            out = _sample(model, den, shape, cond, sampler=sampler)
        st = cache.stats
        calls = STEPS if sampler is sample_euler else 2 * STEPS - 1  # heun: 2 calls per step but the last
        assert torch.isfinite(out).all() and st["calls"] == calls == st["computed"] + st["skipped"]
        assert st["skipped"] > 0 and st["blocks_skipped"] > 0, f"{sampler.__name__}: the cache never skipped: {st}"
        assert not torch.equal(out, ref[sampler])  # a skip changes the sample (the residual is reused, not exact)
        assert (out - ref[sampler]).abs().max() < 0.5 * ref[sampler].abs().max()  # ... but stays close to it


# ------------------------------------------------------------------------------------------------ the runner
class _ToyBlocks(torch.nn.Module):
    """A block stack driven by hand, as a host would: each block adds ``tanh(W h)``."""

    def __init__(self, n=4, dim=6):
        super().__init__()
        torch.manual_seed(0)
        self.blocks = torch.nn.ModuleList(torch.nn.Linear(dim, dim) for _ in range(n))
        self.runs = 0

    def run(self, h, sigma, runner=None, key=None):
        if runner is not None:
            runner.begin(sigma, key)
        state = (h,)
        for i, block in enumerate(self.blocks):
            if runner is not None:
                skipped = runner.before(i, state, state[0])
                if skipped is not None:
                    state = skipped
                    continue
            self.runs += 1
            state = (state[0] + torch.tanh(block(state[0])),)
            if runner is not None:
                runner.ran(i, state if runner.wants_output(i) else None)
        if runner is not None:
            runner.end()
        return state[0]


@torch.no_grad()
def test_block_range_runner_is_host_independent():
    """The runner on a hand-driven block stack: threshold 0 is exact; a skip runs only the head block and returns
    the range input plus the residual of the last full compute of that range, per branch key."""
    from fewstep.core.cache import BlockRangeRunner

    toy = _ToyBlocks()
    xs = [torch.randn(2, 6, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    walk = [(x0 * (1 + 0.001 * k), 10.0 - k) for k in range(5) for x0 in xs[:1]]
    ref = [toy.run(x, s) for x, s in walk]
    exact = BlockRangeRunner(FirstBlockCache(0.0), 4)
    assert all(torch.equal(toy.run(x, s, exact), r) for (x, s), r in zip(walk, ref))
    assert exact.cache.stats["blocks_skipped"] == 0 and exact.cache.stats["blocks_run"] == 20
    cache = FirstBlockCache(0.5, trace=True)
    runner = BlockRangeRunner(cache, 4)
    toy.runs = 0
    outs = [toy.run(x, s, runner) for x, s in walk]
    assert "".join("C" if t["compute"] else "." for t in cache.trace) == "C...."
    assert toy.runs == 4 + 4 * 1 == cache.stats["blocks_run"] and cache.stats["blocks_skipped"] == 12
    assert torch.equal(outs[0], ref[0])
    # a skipped call: h1 (after the head block, computed now) + (h4 - h1) of the first call
    h1_first = walk[0][0] + torch.tanh(toy.blocks[0](walk[0][0]))
    h1 = walk[3][0] + torch.tanh(toy.blocks[0](walk[3][0]))
    assert torch.allclose(outs[3], h1 + (ref[0] - h1_first))
    # another branch key has its own state: its first call computes
    other = toy.run(xs[1], 5.0, runner, key="uncond")
    assert cache.trace[-1]["compute"] and torch.equal(other, toy.run(xs[1], 5.0))
    with pytest.raises(CacheConfigError, match="head_blocks=4 leaves nothing to cache"):
        BlockRangeRunner(FirstBlockCache(0.1, head_blocks=4), 4)


# ------------------------------------------------------------------------------------------------ CFG-branch reuse
def _count_rows(den):
    rows = {"n": 0}
    return rows, den.register_forward_pre_hook(lambda _m, a: rows.__setitem__("n", rows["n"] + a[0].shape[0]))


@pytest.mark.parametrize("name", ["teacher", "dit"])
def test_cfg_branch_reuse_exact_at_threshold_zero_and_skips_uncond(name):
    from fewstep.core.cache import CFGBranchCache

    model, den, shape, cond = _case(name)
    ref = _sample(model, den, shape, cond, steps=8)
    for cache in (CFGBranchCache(0.0), CFGBranchCache(0.0, indicator="easycache", forecast="taylor1")):
        with apply_cache(model, cache):
            assert torch.equal(_sample(model, den, shape, cond, steps=8), ref), f"{cache!r} at threshold 0"
        assert cache.stats["skipped"] == 0 and cache.stats["computed"] == 8
    rows, hook = _count_rows(den)
    try:
        cache = CFGBranchCache(50.0, max_consecutive_skips=1)
        with apply_cache(model, cache):
            out = _sample(model, den, shape, cond, steps=8)
    finally:
        hook.remove()
    b = shape[0]
    assert cache.stats["skipped"] == 4 and cache.stats["computed"] == 4  # C.C.C.C.
    assert rows["n"] == 4 * 2 * b + 4 * b  # computed steps: cond + uncond rows; skipped: cond rows only
    assert torch.isfinite(out).all() and not torch.equal(out, ref)
    if name == "teacher":  # a trained model: the reused branch difference keeps the sample close (random init: no)
        assert (out - ref).abs().mean() < 0.25 * ref.abs().mean()


def test_cfg_branch_reuse_state_per_branch_and_per_run():
    from fewstep.core.cache import CFGBranchCache

    model, den, shape, cond = _case("teacher")
    cache = CFGBranchCache(0.5, max_consecutive_skips=2)
    a = {"class_labels": torch.tensor([0, 1, 2])}
    b = {"class_labels": torch.tensor([7, 8, 9])}
    with apply_cache(model, cache):
        _sample(model, den, shape, a, seed=1, steps=8)
        out_b = _sample(model, den, shape, b, seed=2, steps=8)
        assert cache.stats["runs"] == 2 and cache.stats["skipped"] > 0
    fresh = CFGBranchCache(0.5, max_consecutive_skips=2)
    with apply_cache(model, fresh):
        assert torch.equal(_sample(model, den, shape, b, seed=2, steps=8), out_b)  # nothing carried over runs
    # per branch key: two guidance sites interleaved at the same sigmas == each alone
    x = torch.ones(2, 3)
    both, alone = CFGBranchCache(0.5), CFGBranchCache(0.5)
    for sigma, k in ((10.0, 1.0), (9.0, 1.001), (8.0, 1.002)):
        for key, scale in (("site-a", 1.0), ("site-b", 5.0)):
            cond_out, uncond_out = x * k * scale, x * (k + 1) * scale
            got = both(lambda u=uncond_out: u, cond_out, sigma, key, signal=x * k)
            if key == "site-a":
                assert torch.equal(got, alone(lambda u=uncond_out: u, cond_out, sigma, key, signal=x * k))
    assert both.stats["skipped"] == 4 and both.stats["computed"] == 2  # each key computes its own first call
    with pytest.raises(CacheConfigError, match="apply it to a CFGDenoiser"):
        apply_cache(den, CFGBranchCache(0.1))
    with pytest.raises(CacheConfigError, match="unknown indicator 'magcache'"):
        CFGBranchCache(0.1, indicator="magcache")


# ------------------------------------------------------------------------------------------------ declared layouts
def _wan():
    torch.manual_seed(0)
    net = diffusers.WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8,
                                          in_channels=4, out_channels=4, text_dim=16, freq_dim=16, ffn_dim=32,
                                          num_layers=3, rope_max_seq_len=32).eval()
    ctx = torch.randn(1, 5, 16)
    return net, (1, 4, 2, 8, 8), lambda x, t: net(hidden_states=x, timestep=t, encoder_hidden_states=ctx,
                                                  return_dict=False)[0], list(net.blocks)


def _qwen():
    torch.manual_seed(0)
    net = diffusers.QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=3,
                                                attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                                axes_dims_rope=(2, 2, 4)).eval()
    ctx, mask = torch.randn(1, 5, 16), torch.ones(1, 5, dtype=torch.long)
    def call(x, t):
        return net(hidden_states=x, encoder_hidden_states=ctx, encoder_hidden_states_mask=mask, timestep=t / 1000,
                   img_shapes=[(1, 4, 4)], return_dict=False)[0]

    return net, (1, 16, 16), call, list(net.transformer_blocks)


def _hunyuan():
    torch.manual_seed(0)
    net = diffusers.HunyuanVideoTransformer3DModel(in_channels=4, out_channels=4, num_attention_heads=2,
                                                   attention_head_dim=8, num_layers=2, num_single_layers=2,
                                                   num_refiner_layers=1, text_embed_dim=16, pooled_projection_dim=8,
                                                   rope_axes_dim=(2, 2, 4), guidance_embeds=False).eval()
    ctx, mask, pooled = torch.randn(1, 5, 16), torch.ones(1, 5, dtype=torch.long), torch.randn(1, 8)

    def call(x, t):
        return net(hidden_states=x, timestep=t, encoder_hidden_states=ctx, encoder_attention_mask=mask,
                   pooled_projections=pooled, return_dict=False)[0]

    return net, (1, 4, 1, 8, 8), call, [*net.transformer_blocks, *net.single_transformer_blocks]


def _cogvideox():
    torch.manual_seed(0)
    net = diffusers.CogVideoXTransformer3DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4,
                                                out_channels=4, time_embed_dim=16, text_embed_dim=16, num_layers=3,
                                                sample_width=8, sample_height=8, sample_frames=1,
                                                temporal_compression_ratio=1, max_text_seq_length=5).eval()
    ctx = torch.randn(1, 5, 16)
    return net, (1, 1, 4, 8, 8), lambda x, t: net(hidden_states=x, encoder_hidden_states=ctx, timestep=t,
                                                  return_dict=False)[0], list(net.transformer_blocks)


def _flux2():
    torch.manual_seed(0)
    net = diffusers.Flux2Transformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=3,
                                            attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                            timestep_guidance_channels=16, axes_dims_rope=(2, 2, 2, 2),
                                            guidance_embeds=False).eval()
    ctx = torch.randn(1, 5, 16)
    img_ids = torch.stack([torch.zeros(16), torch.arange(16) // 4, torch.arange(16) % 4, torch.zeros(16)], -1)
    txt_ids = torch.stack([torch.zeros(5), torch.zeros(5), torch.zeros(5), torch.arange(5.0)], -1)

    def call(x, t):
        return net(hidden_states=x, encoder_hidden_states=ctx, timestep=t / 1000, img_ids=img_ids, txt_ids=txt_ids,
                   return_dict=False)[0]

    return net, (1, 16, 16), call, list(net.single_transformer_blocks)


@torch.no_grad()
@pytest.mark.parametrize("build", [_wan, _qwen, _hunyuan, _cogvideox, _flux2],
                         ids=["wan", "qwen_image", "hunyuan_video", "cogvideox", "flux2"])
def test_declared_layouts_of_video_and_qwen_transformers(build):
    """Block caches on diffusers' Wan, Qwen-Image, HunyuanVideo, CogVideoX and Flux.2 transformers (tiny random
    instances) through their declared layouts (Wan: a tensor per block, the text as context; Qwen-Image: (encoder,
    hidden) streams; HunyuanVideo / CogVideoX: (hidden, encoder); Flux.2: its single-stream blocks): exact at
    threshold 0, real skips above."""
    from fewstep.core.models import FlowMatching

    net, shape, call, blocks = build()
    ms = FlowMatching(multiplier=1000.0)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    walk = [(noise * s, torch.tensor([1000.0 * s])) for s in (0.9, 0.8, 0.7, 0.6, 0.5)]
    ref = [call(x, t) for x, t in walk]
    runs = {"n": 0}
    inner = [getattr(b, "attn1", None) or b.attn for b in blocks]  # runs only when the block really computes
    hooks = [m.register_forward_pre_hook(lambda *a: runs.__setitem__("n", runs["n"] + 1)) for m in inner]
    try:
        for threshold in (0.0, 50.0):
            runs["n"] = 0
            cache = FirstBlockCache(threshold, max_consecutive_skips=1)
            with apply_cache(net, cache, model_sampling=ms):
                outs = [call(x, t) for x, t in walk]
            st = cache.stats
            assert runs["n"] == st["blocks_run"] == 5 * len(blocks) - st["blocks_skipped"]
            if threshold == 0:
                assert all(torch.equal(o, r) for o, r in zip(outs, ref)) and st["blocks_skipped"] == 0
            else:
                assert st["skipped"] == 2 and st["blocks_skipped"] == 2 * (len(blocks) - 1)  # C.C.C
                assert all(torch.isfinite(o).all() for o in outs) and not torch.equal(outs[1], ref[1])
                assert torch.equal(outs[2], ref[2])  # a computed call after a skip is the model's own output
    finally:
        for h in hooks:
            h.remove()
    assert all("forward" not in vars(b) for b in blocks)
