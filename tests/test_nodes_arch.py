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
