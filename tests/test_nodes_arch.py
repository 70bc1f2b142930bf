"""Architecture coverage: every fewstep sampler / schedule node on tiny random-weight instances of ComfyUI's own
architectures (SD1.5 UNet, SDXL UNet, Flux, SD3 MMDiT, Wan 2.1; on ComfyUI 0.33.0 also the 2026 families Flux.2,
Qwen-Image, Z-Image, Lumina 2, Chroma, HunyuanVideo 1.5, Wan 2.2 5B and the Wan 2.2 A14B expert pair), through
ComfyUI's sampling path (CFGGuider -> SamplerCustomAdvanced), counting model evaluations with an APPLY_MODEL
wrapper."""

from __future__ import annotations

import json

import comfy_tiny_models as tiny_archs
import comfy_versions
import pytest
import torch

pytestmark = pytest.mark.comfy

ARCHS = tiny_archs.CLASSIC + (tuple(tiny_archs.ARCHS_2026) if comfy_versions.collected().has_2026_families else ())
#: model timesteps for a 3-step distilled schedule in each architecture's own timestep units
UNIT = "1.0,0.66,0.33"  # flow models whose timestep is the sigma (multiplier 1)
THOUSAND = "1000,666,333"  # flow models with timestep = 1000 sigma
TIMESTEPS = {"sd15": "999,666,333", "sdxl": "999,666,333", "flux": UNIT, "sd3": THOUSAND, "wan21": THOUSAND,
             "flux2": UNIT, "qwen_image": UNIT, "zimage": UNIT, "lumina2": UNIT, "chroma": UNIT,
             "hunyuan15": THOUSAND, "wan22_5b": THOUSAND, "wan22_a14b": THOUSAND}
SAMPLERS = {  # name -> (node id, args, model evaluations for 3 steps)
    "lcm": ("FewstepSamplerLCM", (), 3),
    "tcd": ("FewstepSamplerTCD", (0.3,), 3),
    "dmd": ("FewstepSamplerDMD", (), 3),
    "flow_map": ("FewstepSamplerFlowMap", (), 3),
    "onestep": ("FewstepSamplerOneStep", (), 1),
    "euler": ("FewstepSamplerTeacher", ("euler",), 3),
    "heun": ("FewstepSamplerTeacher", ("heun",), 5),
    "uni_pc": ("FewstepSamplerTeacher", ("uni_pc",), 3),
}


@pytest.fixture(scope="module")
def env(comfy_root):
    import comfy.patcher_extension
    import comfy.sample
    import comfy_extras.nodes_custom_sampler as cs
    import comfy_tiny_models as tiny

    from fewstep.nodes import embedded_model, samplers, schedules
    models = {arch: tiny.tiny_model(arch) for arch in ARCHS}
    return type("Env", (), dict(cs=cs, S=samplers, Sch=schedules, EM=embedded_model, tiny=tiny, models=models,
                                px=comfy.patcher_extension, sample=comfy.sample))


def _counting(env, model, calls: list):
    def wrapper(executor, *args, **kwargs):
        calls.append(args[0].shape[0])
        return executor(*args, **kwargs)

    m = model.clone()
    m.add_wrapper_with_key(env.px.WrappersMP.APPLY_MODEL, "fewstep-test-count", wrapper)
    return m


def _run(env, arch, model, sampler, sigmas, cfg=2.0, seed=0):
    pos, neg, latent = env.tiny.tiny_inputs(arch)
    guider = env.cs.CFGGuider.execute(model, pos, neg, cfg)[0]
    noise = env.cs.RandomNoise.execute(seed)[0]
    return env.cs.SamplerCustomAdvanced.execute(noise, guider, sampler, sigmas, latent)[0]["samples"]


@pytest.mark.parametrize("sampler", list(SAMPLERS))
@pytest.mark.parametrize("arch", ARCHS)
def test_sampler_node_on_architecture(env, arch, sampler):
    node_id, args, nfe = SAMPLERS[sampler]
    model = env.models[arch]
    sigmas = env.Sch.FewstepTimestepSchedule.execute(model, TIMESTEPS[arch], "timestep")[0]
    assert len(sigmas) == 4
    calls: list = []
    out = _run(env, arch, _counting(env, model, calls), getattr(env.S, node_id).execute(*args)[0], sigmas)
    shape = env.tiny.ARCHS[arch][2]
    assert tuple(out.shape[1:]) == shape and torch.isfinite(out).all()
    assert len(calls) == nfe  # one batched (cond + uncond) model call per evaluation
    assert set(calls) == {2}


@pytest.mark.parametrize("arch", ARCHS)
def test_hybrid_node_on_architecture(env, arch):
    base = env.models[arch]
    distilled = env.tiny.tiny_model(arch, seed=1)
    base_calls: list = []
    dist_calls: list = []
    sampler = env.S.FewstepSamplerHybrid.execute(_counting(env, distilled, dist_calls), 1, "euler", "lcm", 1.0)[0]
    sigmas = env.Sch.FewstepTimestepSchedule.execute(base, TIMESTEPS[arch], "timestep")[0]
    out = _run(env, arch, _counting(env, base, base_calls), sampler, sigmas)
    assert torch.isfinite(out).all()
    assert base_calls == [2] and dist_calls == [1, 1]  # base at cfg 2 (batched), distilled at cfg 1


def test_hybrid_refuses_models_from_different_latent_spaces(env):
    digits = env.EM.load_digits_model(env.EM.RANDOM_NAME)
    sampler = env.S.FewstepSamplerHybrid.execute(digits, 1, "euler", "lcm", 1.0)[0]
    sigmas = env.Sch.FewstepTimestepSchedule.execute(env.models["sd15"], TIMESTEPS["sd15"], "timestep")[0]
    with pytest.raises(ValueError, match="latent format SD15 but the distilled model uses DigitsLatentFormat"):
        _run(env, "sd15", env.models["sd15"], sampler, sigmas)
    flow_sampler = env.S.FewstepSamplerHybrid.execute(env.models["sd3"], 1, "euler", "lcm", 1.0)[0]
    with pytest.raises(ValueError, match="latent format"):
        _run(env, "flux", env.models["flux"], flow_sampler,
             env.Sch.FewstepTimestepSchedule.execute(env.models["flux"], TIMESTEPS["flux"], "timestep")[0])


@pytest.mark.parametrize("arch", ARCHS)
def test_timestep_schedule_node_on_architecture(env, arch):
    model = env.models[arch]
    ms = model.get_model_object("model_sampling")
    values = [float(v) for v in TIMESTEPS[arch].split(",")]
    sigmas = env.Sch.FewstepTimestepSchedule.execute(model, TIMESTEPS[arch], "timestep")[0]
    expected = torch.stack([ms.sigma(torch.tensor(v)).reshape(()) for v in values]).float()
    torch.testing.assert_close(sigmas[:-1], expected)
    assert float(sigmas[0]) == pytest.approx(float(ms.sigma_max), rel=1e-3)
    if arch == "flux":  # Flux timesteps are sigmas in [0, 1]: a clear message for SD-style numbers
        with pytest.raises(ValueError, match=r"outside this model's range \[0, 1\]"):
            env.Sch.FewstepTimestepSchedule.execute(model, "999,499", "timestep")


@pytest.mark.parametrize("arch", ARCHS)
def test_schedule_search_node_on_architecture(env, arch):
    model = env.models[arch]
    pos, neg, latent = env.tiny.tiny_inputs(arch)
    sigmas, report = env.Sch.FewstepScheduleSearch.execute(
        model, pos, neg, latent, "euler", nfe=2, cfg=2.0, seed=0, search_batch=1, grid_size=4, refine_rounds=0,
        reference_substeps=1)
    assert len(sigmas) == 3 and sigmas[-1] == 0 and bool((sigmas[1:] < sigmas[:-1]).all())
    assert json.loads(report)["shape"][1:] == list(env.tiny.ARCHS[arch][2])
    out = _run(env, arch, model, env.S.FewstepSamplerTeacher.execute("euler")[0], sigmas)
    assert torch.isfinite(out).all()


# ------------------------------------------------------------------------------------- step cache, Wan 2.2 experts


def _node_kwargs(node_cls, **overrides):
    """A node's inputs at their schema defaults (so these tests follow the node's current inputs), then overrides."""
    kwargs = {inp.id: getattr(inp, "default", None) for inp in node_cls.GET_SCHEMA().inputs}
    return {**kwargs, **overrides}


class _Evaluations:
    """Counts the network evaluations of ``model``: calls of its diffusion model in which a weight layer ran (a step
    cache skipping at the diffusion-model level still enters the module but runs none of its layers)."""

    def __init__(self, model):
        self.calls: list = []
        self.ran = [False]
        dm = model.model.diffusion_model
        leaves = [m for m in dm.modules() if not list(m.children()) and any(True for _ in m.parameters(False))]
        self.handles = [m.register_forward_pre_hook(lambda mod, args: self.ran.__setitem__(0, True)) for m in leaves]
        self.handles.append(dm.register_forward_pre_hook(lambda mod, args: self.ran.__setitem__(0, False)))
        self.handles.append(dm.register_forward_hook(lambda mod, args, out: self.calls.append(1) if self.ran[0]
                                                     else None))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _evaluations(model) -> tuple[list, _Evaluations]:
    """(list growing by one per network evaluation of ``model``, handle with ``remove()``)."""
    ev = _Evaluations(model)
    return ev.calls, ev


def _step_cache(model, threshold):
    from fewstep.nodes import caches

    kwargs = _node_kwargs(caches.FewstepStepCache, model=model, method="teacache_uncalibrated", threshold=threshold)
    return caches.FewstepStepCache.execute(**kwargs)[0]


@pytest.mark.parametrize("arch", ARCHS)
def test_step_cache_on_architecture(env, arch):
    """The step cache works through the generic model wrappers on every family: threshold 0 reproduces the
    unpatched sample with every evaluation, a high threshold skips evaluations and stays finite."""
    model = env.models[arch]
    sigmas = env.cs.BasicScheduler.execute(model, "karras", 8, 1.0)[0]
    sampler = env.S.FewstepSamplerTeacher.execute("euler")[0]
    calls, handle = _evaluations(model)
    try:
        ref = _run(env, arch, model, sampler, sigmas)
        n_ref = len(calls)
        calls.clear()
        exact = _run(env, arch, _step_cache(model, 0.0), sampler, sigmas)
        n_exact = len(calls)
        calls.clear()
        fast = _run(env, arch, _step_cache(model, 1.0), sampler, sigmas)
        n_fast = len(calls)
    finally:
        handle.remove()
    assert n_ref == 8 and n_exact == 8
    torch.testing.assert_close(exact, ref, rtol=1e-5, atol=1e-5)
    assert 0 < n_fast < 8 and torch.isfinite(fast).all()


def test_wan22_experts_switch_mid_run(env):
    """Wan 2.2 A14B: a high-noise expert for sigmas above the boundary, a low-noise expert below (both Wan 2.1
    architecture). fewstep's hybrid sampler switching experts mid-run equals ComfyUI's own two-pass graph (SplitSigmas
    -> SamplerCustomAdvanced twice, the second without new noise); with a step cache on each expert, threshold 0 is
    exact across the switch and each expert's cache only ever sees its own steps."""
    if "wan22_a14b" not in ARCHS:
        pytest.skip("the 2026 families are tested on ComfyUI 0.33.0 (FEWSTEP_COMFYUI_VERSION=0.33.0)")
    high = env.models["wan22_a14b"]
    low = env.tiny.tiny_model("wan22_a14b", seed=1)
    sigmas = env.cs.BasicScheduler.execute(high, "simple", 8, 1.0)[0]
    k = int((sigmas[:-1] >= 0.875).sum())  # Wan 2.2 T2V's boundary: sigma 0.875
    assert 0 < k < 8
    pos, neg, latent = env.tiny.tiny_inputs("wan22_a14b")
    euler = env.S.FewstepSamplerTeacher.execute("euler")[0]

    def two_pass(hi, lo):
        s_high, s_low = env.cs.SplitSigmas.execute(sigmas, k)[0:2]
        first = env.cs.SamplerCustomAdvanced.execute(env.cs.RandomNoise.execute(0)[0],
                                                     env.cs.CFGGuider.execute(hi, pos, neg, 2.0)[0], euler, s_high,
                                                     latent)[0]
        return env.cs.SamplerCustomAdvanced.execute(env.cs.DisableNoise.execute()[0],
                                                    env.cs.CFGGuider.execute(lo, pos, neg, 2.0)[0], euler, s_low,
                                                    first)[0]["samples"]

    def hybrid(hi, lo):
        sampler = env.S.FewstepSamplerHybrid.execute(lo, k, "euler", "euler", 2.0)[0]
        return _run(env, "wan22_a14b", hi, sampler, sigmas)

    high_calls, h1 = _evaluations(high)
    low_calls, h2 = _evaluations(low)
    try:
        ref = two_pass(high, low)
        assert (len(high_calls), len(low_calls)) == (k, 8 - k)
        high_calls.clear()
        low_calls.clear()
        ours = hybrid(high, low)
        assert (len(high_calls), len(low_calls)) == (k, 8 - k)  # both experts, switched at the boundary
        torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)
        cached = hybrid(_step_cache(high, 0.0), _step_cache(low, 0.0))
        torch.testing.assert_close(cached, ref, rtol=1e-5, atol=1e-5)
        high_calls.clear()
        low_calls.clear()
        fast = two_pass(_step_cache(high, 1.0), _step_cache(low, 1.0))
        assert torch.isfinite(fast).all() and len(high_calls) <= k and 0 < len(low_calls) < 8 - k
    finally:
        h1.remove()
        h2.remove()
