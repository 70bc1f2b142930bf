"""Cache nodes on the 2026 ComfyUI families (ComfyUI >= 0.33.0: Flux.2, Qwen-Image, Z-Image, Lumina 2, Chroma,
HunyuanVideo 1.5, Wan 2.2 5B and the Wan 2.2 A14B expert pair), tiny random-weight models through ComfyUI's
sampling path. The step cache applies to every family; the block cache to those whose block layout is declared in
``core.cache.layouts`` (the others are refused with a message naming the model). Wan 2.2 A14B runs its high-noise
expert then its low-noise expert (two MODELs, two sampler runs, as ComfyUI's templates do): neither expert ever sees
the other's cache state."""

from __future__ import annotations

import comfy_tiny_models as tiny_archs
import comfy_versions
import pytest
import torch

pytestmark = [pytest.mark.comfy, pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(not comfy_versions.collected().has_2026_families,
                                 reason="the 2026 families need ComfyUI >= 0.33.0 (FEWSTEP_COMFYUI_VERSION=0.33.0)")]

ARCHS = tuple(tiny_archs.ARCHS_2026)
REFUSED = {"zimage": ("ZImage", "NextDiT"), "lumina2": ("Lumina2", "NextDiT")}
STEPS = 4
#: tiny configs with a single transformer block get a second one here
DEEPER = {"qwen_image": {"num_layers": 2}}


@pytest.fixture(scope="module")
def env(comfy_root):
    import comfy.samplers
    import comfy_extras.nodes_custom_sampler as cs
    import comfy_tiny_models as tiny

    from fewstep.core.cache.layouts import resolve_attr
    from fewstep.nodes import cache_wrappers, caches

    models = {arch: tiny.tiny_model(arch) for arch in ARCHS}
    for arch, extra in DEEPER.items():  # a block cache needs a head block and at least one block to cache
        name, cfg, shape = tiny.ARCHS[arch]
        tiny.ARCHS[arch] = (name, {**cfg, **extra}, shape)
        try:
            models[arch] = tiny.tiny_model(arch)
        finally:
            tiny.ARCHS[arch] = (name, cfg, shape)
    models["wan22_a14b_low"] = tiny.tiny_model("wan22_a14b", seed=1)
    return type("Env", (), dict(cs=cs, samplers=comfy.samplers, tiny=tiny, C=caches, W=cache_wrappers, models=models,
                                resolve=resolve_attr))


def _sample(env, model, arch, sigmas=None, cfg=2.0, seed=0, latent=None, noise=True):
    pos, neg, empty = env.tiny.tiny_inputs("wan22_a14b" if arch.startswith("wan22_a14b") else arch)
    guider = env.cs.CFGGuider.execute(model, pos, neg, cfg)[0]
    if sigmas is None:
        sigmas = env.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "simple", STEPS)
    src = env.cs.RandomNoise.execute(seed)[0] if noise else env.cs.DisableNoise.execute()[0]
    return env.cs.SamplerCustomAdvanced.execute(src, guider, env.samplers.sampler_object("euler"), sigmas,
                                                latent or empty)[0]["samples"]


def _blocks(env, model):
    dm = model.model.diffusion_model
    return [b for bl in env.W.comfy_layout(model).lists for b in env.resolve(dm, bl.attr)]


class _Count:
    def __init__(self, modules):
        self.n = 0
        self.handles = [m.register_forward_pre_hook(self._add) for m in modules]

    def _add(self, *_):
        self.n += 1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()


def _step(env, model, threshold, **kw):
    return env.C.FewstepStepCache.execute(model, "teacache_uncalibrated", threshold, "none", 0.0, 1.0,
                                          kw.pop("max_skips", 0), "auto", **kw)[0]


def _block(env, model, threshold):
    return env.C.FewstepBlockCache.execute(model, "first_block", threshold, 1, 2, 0, 0.5, "none", 0.0, 1.0, 0,
                                           "auto")[0]


def _first_module(env, model, arch):
    """A module that runs exactly when the network body runs (the first block, or NextDiT's first layer)."""
    dm = model.model.diffusion_model
    if arch in REFUSED:
        return dm.layers[0]
    return _blocks(env, model)[0]


@pytest.mark.parametrize("arch", ARCHS)
def test_step_cache_on_the_2026_families(env, arch):
    base = env.models[arch]
    ref = _sample(env, base, arch)
    patched = _step(env, base, 0.0)
    with _Count([_first_module(env, base, arch)]) as n:
        assert torch.equal(_sample(env, patched, arch), ref), arch
    st = patched.model_options["transformer_options"][env.W.STEP_KEY].last_stats
    assert st["computed"] == n.n == STEPS and st["skipped"] == 0
    patched = _step(env, base, 1.0, max_skips=1, cfg_reuse=1.0)
    with _Count([_first_module(env, base, arch)]) as n:
        out = _sample(env, patched, arch)
    st = patched.model_options["transformer_options"][env.W.STEP_KEY].last_stats
    assert st["skipped"] > 0 and n.n == st["computed"]  # one body run per computed call (batched or cond-only)
    assert st["cfg"]["skipped"] > 0 and torch.isfinite(out).all()


@pytest.mark.parametrize("arch", ARCHS)
def test_block_cache_on_the_2026_families(env, arch):
    base = env.models[arch]
    if arch in REFUSED:
        config, net = REFUSED[arch]
        with pytest.raises(ValueError, match=rf"\({config}, {net}\).*does not route its blocks.*FewstepStepCache"):
            _block(env, base, 0.1)
        return
    blocks = _blocks(env, base)
    ref = _sample(env, base, arch)
    patched = _block(env, base, 0.0)
    with _Count(blocks) as n:
        assert torch.equal(_sample(env, patched, arch), ref), arch
    st = patched.model_options["transformer_options"][env.W.BLOCK_KEY].last_stats
    assert st["blocks_run"] == n.n == STEPS * len(blocks) and st["blocks_skipped"] == 0
    patched = _block(env, base, 1.0)
    with _Count(blocks) as n:
        out = _sample(env, patched, arch)
    st = patched.model_options["transformer_options"][env.W.BLOCK_KEY].last_stats
    assert st["blocks_skipped"] > 0 and n.n == st["blocks_run"] == STEPS * len(blocks) - st["blocks_skipped"]
    assert torch.isfinite(out).all()


def test_wan22_experts_keep_their_own_cache_state(env):
    """High-noise expert on the first half of the schedule, low-noise expert on the rest (two MODELs, two runs):
    at threshold 0 the two-stage sample is the uncached one; with a real threshold the low-noise expert's first call
    computes (it never starts from the high-noise expert's residual) and each expert's holder counts its own calls."""
    high, low = env.models["wan22_a14b"], env.models["wan22_a14b_low"]
    sigmas = env.samplers.calculate_sigmas(high.get_model_object("model_sampling"), "simple", 6)
    first, second = sigmas[:4], sigmas[3:]

    def two_stage(h, lo):
        mid = _sample(env, h, "wan22_a14b", sigmas=first)
        return _sample(env, lo, "wan22_a14b", sigmas=second, latent={"samples": mid}, noise=False)

    ref = two_stage(high, low)
    assert torch.equal(two_stage(_step(env, high, 0.0), _step(env, low, 0.0)), ref)
    for make in (lambda m: _step(env, m, 1.0), lambda m: _block(env, m, 1.0)):
        ph, pl = make(high), make(low)
        with _Count([_blocks(env, low)[0]]) as n_low:
            out = two_stage(ph, pl)
        key = env.W.STEP_KEY if env.W.STEP_KEY in pl.model_options["transformer_options"] else env.W.BLOCK_KEY
        sh = ph.model_options["transformer_options"][key]
        sl = pl.model_options["transformer_options"][key]
        assert sh is not sl and len(sh.history) == len(sl.history) == 1
        assert sh.last_stats["calls"] == 3 and sl.last_stats["calls"] == 3
        assert sl.last_stats["computed"] >= 1 and sl.last_stats["skipped"] > 0
        assert n_low.n >= 1 and torch.isfinite(out).all()
        assert sl.last_stats["runs"] == 1 and sl.last_stats["forced"] == 0  # a fresh state: nothing inherited
