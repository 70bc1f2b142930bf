"""fewstep's ComfyUI nodes, in-process with a real ComfyUI (0.3.75 or 0.33.0: tests/comfyui_env.py).

Every node's ``execute`` is called as ComfyUI calls it, and its output is used through ComfyUI's own nodes
(CFGGuider, RandomNoise, SamplerCustomAdvanced). Sampling through ComfyUI must give what the core sampler gives on
the same denoiser: the nodes are thin adapters.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.comfy


@pytest.fixture(scope="module")
def cn(comfy_root):
    """ComfyUI modules the tests drive, plus fewstep's node modules (importable once comfy is on sys.path)."""
    import comfy.samplers
    import comfy_extras.nodes_custom_sampler as custom_sampler

    from fewstep.nodes import embedded, embedded_model, samplers, schedules

    return type("Comfy", (), dict(samplers=comfy.samplers, cs=custom_sampler, E=embedded, EM=embedded_model,
                                  S=samplers, Sch=schedules))


@pytest.fixture(scope="module")
def digits(cn):
    """The random-init embedded model (stable across teacher retraining) and its class-3 conditioning."""
    model = cn.E.FewstepDigitsModelLoader.execute(cn.EM.RANDOM_NAME)[0]
    pos, neg = cn.E.FewstepDigitsClassCondition.execute(3)
    return model, pos, neg


def _sample(cn, model, pos, neg, sampler, sigmas, batch=2, seed=0, cfg=2.0):
    latent = cn.E.FewstepDigitsEmptyLatent.execute(batch)[0]
    guider = cn.cs.CFGGuider.execute(model, pos, neg, cfg)[0]
    noise = cn.cs.RandomNoise.execute(seed)[0]
    return cn.cs.SamplerCustomAdvanced.execute(noise, guider, sampler, sigmas, latent)[0]["samples"]


def _diffusers_twin(model):
    """diffusers' DiTTransformer2DModel with the embedded MODEL's weights (the core denoiser's network)."""
    from fewstep.core.models.embedded import build_dit

    dit = build_dit()
    dit.load_state_dict(model.model.diffusion_model.dit.state_dict())
    return dit.eval().requires_grad_(False)


def _record_wrapper(model, seen: list, key: str = "record"):
    """A clone of ``model`` with a DIFFUSION_MODEL wrapper (ComfyUI's extension point) recording each call."""
    import comfy.patcher_extension

    def wrapper(executor, *args, **kwargs):
        opts = args[-1] if isinstance(args[-1], dict) else kwargs.get("transformer_options", {})
        seen.append({"t": args[1].clone(), "batch": args[0].shape[0], **{k: opts.get(k) for k in opts
                                                                            if k.startswith("fewstep")}})
        return executor(*args, **kwargs)

    m = model.clone()
    m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, key, wrapper)
    return m


# ------------------------------------------------------------------------------------------------ registry


def test_import_fewstep_does_not_import_comfy():
    code = ("import sys, fewstep; assert fewstep.__version__; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('comfy', 'comfy_api') or m == 'fewstep.nodes']; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_every_node_is_registered_with_schema(cn):
    from comfy_api.latest import ComfyExtension, io

    from fewstep import comfy_entrypoint
    from fewstep.nodes import FAMILIES, NODE_PREFIX, load_nodes

    nodes = load_nodes(strict=True)
    ext = asyncio.run(comfy_entrypoint())
    assert isinstance(ext, ComfyExtension)
    assert asyncio.run(ext.get_node_list()) == nodes
    ids = [n.GET_SCHEMA().node_id for n in nodes]
    assert len(ids) == len(set(ids)) >= 13
    assert set(FAMILIES) >= {"samplers", "schedules", "embedded"}
    for node in nodes:
        schema = node.GET_SCHEMA()
        assert schema.node_id.startswith(NODE_PREFIX)
        assert schema.category.startswith("fewstep/"), schema.node_id
        assert schema.display_name and schema.description, schema.node_id
        for inp in schema.inputs:
            assert inp.tooltip, f"{schema.node_id}.{inp.id} has no tooltip"
        assert schema.outputs, schema.node_id
        info = node.GET_NODE_INFO_V1()  # what /object_info serves
        json.dumps(info)
        assert info["category"] == schema.category
    assert issubclass(nodes[0], io.ComfyNode)


def test_a_broken_family_is_skipped_not_fatal(cn, caplog):
    from fewstep.nodes import load_nodes

    nodes = load_nodes(("samplers", "no_such_family"))
    assert len(nodes) == len(cn.S.NODES)
    assert "no_such_family" in caplog.text
    with pytest.raises(ModuleNotFoundError):
        load_nodes(("no_such_family",), strict=True)


# ------------------------------------------------------------------------------------------ embedded model


@pytest.mark.parametrize("config", [
    dict(prediction="v", beta_schedule="linear", linear_start=1e-4, linear_end=0.02),  # the shipped teacher
    dict(prediction="eps", beta_schedule="scaled_linear", linear_start=0.00085, linear_end=0.012),  # SD's
    dict(prediction="eps", beta_schedule="cosine"),
    dict(prediction="v", beta_schedule="scaled_linear", linear_start=0.00085, linear_end=0.012,
         zero_terminal_snr=True),
], ids=["ddpm-linear-v", "scaled-linear-eps", "cosine-eps", "zsnr-v"])
def test_comfy_model_sampling_matches_fewstep(cn, config):
    """DDPM 'linear' betas are ComfyUI's 'sqrt_linear' (ComfyUI's 'linear' is SD's scaled_linear)."""
    import comfy.model_base

    from fewstep.core.models import DiscreteVP
    from fewstep.core.models.embedded import TEACHER_CONFIG

    ours = DiscreteVP(**config)
    model = cn.EM.build_model(TEACHER_CONFIG, ours.config())
    ms = model.get_model_object("model_sampling")
    assert isinstance(ms, comfy.model_sampling.V_PREDICTION if config["prediction"] == "v"
                      else comfy.model_sampling.EPS)
    if config.get("zero_terminal_snr"):  # ComfyUI rescales sigmas in float32 after the fact: not bit-exact
        torch.testing.assert_close(ms.sigmas[:-1], ours.sigmas[:-1], rtol=1e-4, atol=1e-6)
    else:
        assert torch.equal(ms.sigmas, ours.sigmas)
    assert float(ms.sigma_max) == pytest.approx(ours.sigma_max, rel=1e-5)


def test_loaded_model_matches_the_core_teacher_denoiser(cn, digits):
    from fewstep.core.models import DiscreteVP
    from fewstep.core.models.embedded import dit_denoiser, teacher_model_sampling

    model = digits[0]
    ms = model.get_model_object("model_sampling")
    assert torch.equal(ms.sigmas, teacher_model_sampling().sigmas)
    core = dit_denoiser(_diffusers_twin(model), DiscreteVP("v", "linear", 1e-4, 0.02, quantize=True))  # ComfyUI
    # quantizes timesteps to integers, hence quantize=True
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 1, 16, 16, generator=g) * 4
    sigma = ms.sigmas[[3, 400, 999]]
    labels = torch.tensor([1, 5, 10])
    ctx = torch.cat([cn.EM.class_token(int(c)) for c in labels])
    torch.testing.assert_close(model.model.apply_model(x, sigma, c_crossattn=ctx), core(x, sigma, class_labels=labels),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["digits_dit_random_init", "digits_dit_teacher"])
def test_comfy_dit_equals_the_diffusers_dit(cn, name):
    """The ComfyUI-native DiT loads diffusers' weights unchanged and computes diffusers' forward."""
    from fewstep.core.models.diffusers_adapters import call_dit

    model = cn.EM.load_digits_model(name)
    net = model.model.diffusion_model
    x = torch.randn(3, 1, 16, 16, generator=torch.Generator().manual_seed(1)) * 2
    t = torch.tensor([0.0, 500.0, 999.0])
    labels = torch.tensor([7, 0, 10])
    ctx = torch.cat([cn.EM.class_token(int(c)) for c in labels])
    ref = call_dit(_diffusers_twin(model), x, t, class_labels=labels)
    torch.testing.assert_close(net(x, t, context=ctx, transformer_options={}), ref, rtol=1e-5, atol=1e-5)


def test_comfy_dit_honours_block_patches_and_attention_override(cn, digits):
    net = digits[0].model.diffusion_model
    x = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([10.0, 900.0])
    ctx = torch.cat([cn.EM.class_token(7), cn.EM.class_token(10)])
    ref = net(x, t, context=ctx, transformer_options={})
    blocks, attn = [], []

    def replace(args, extra):
        blocks.append(args["transformer_options"]["block_index"])
        return extra["original_block"](args)

    def override(func, *args, **kwargs):
        attn.append(args[0].shape)
        return func(*args, **kwargs)

    opts = {"patches_replace": {"dit": {("double_block", i): replace for i in range(5)}},
            "optimized_attention_override": override}
    assert torch.equal(net(x, t, context=ctx, transformer_options=opts), ref)
    assert blocks == [0, 1, 2, 3, 4] and opts["total_blocks"] == 5
    assert attn == [(2, 64, 96)] * 5  # (batch, 8x8 patch tokens, 4 heads x 24)


def test_class_token_conditioning(cn):
    EM = cn.EM
    pos, neg = cn.E.FewstepDigitsClassCondition.execute(7)
    assert EM.labels_from_context(pos[0][0], 3).tolist() == [7, 7, 7]
    assert EM.labels_from_context(neg[0][0], 1).tolist() == [10]
    assert EM.labels_from_context(torch.zeros(2, 1, 11), 2).tolist() == [10, 10]  # ConditioningZeroOut
    assert EM.labels_from_context(None, 2).tolist() == [10, 10]
    with pytest.raises(ValueError, match="fewstep digit class"):
        EM.labels_from_context(torch.zeros(1, 77, 768), 1)


def test_loader_names_and_clear_errors(cn, monkeypatch, tmp_path):
    EM = cn.EM
    names = EM.available_models()
    assert names[0] == EM.TEACHER_NAME and names[-1] == EM.RANDOM_NAME
    with pytest.raises(ValueError, match="unknown digits model"):
        EM.load_digits_model("../../etc/passwd")
    monkeypatch.setattr(EM, "WEIGHTS_DIR", tmp_path)  # fewstep's own module attribute: no teacher there
    with pytest.raises(FileNotFoundError, match="fewstep train-teacher"):
        cn.E.FewstepDigitsModelLoader.execute(EM.TEACHER_NAME)


def test_latent_and_image_nodes(cn):
    latent = cn.E.FewstepDigitsEmptyLatent.execute(5)[0]
    assert latent["samples"].shape == (5, 1, 16, 16) and not latent["samples"].any()
    x = torch.linspace(-2, 2, 16 * 16).reshape(1, 1, 16, 16)
    img = cn.E.FewstepDigitsLatentToImage.execute({"samples": x}, 3)[0]
    assert img.shape == (1, 48, 48, 3) and img.min() == 0 and img.max() == 1
    torch.testing.assert_close(img[0, ::3, ::3, 0], ((x[0, 0] + 1) / 2).clamp(0, 1))
    with pytest.raises(ValueError, match="VAE"):
        cn.E.FewstepDigitsLatentToImage.execute({"samples": torch.zeros(1, 4, 8, 8)}, 1)


# ---------------------------------------------------------------------------------------------- samplers


SAMPLER_NODES = {
    "lcm": ("FewstepSamplerLCM", ()),
    "tcd": ("FewstepSamplerTCD", (0.3,)),
    "dmd": ("FewstepSamplerDMD", ()),
    "onestep": ("FewstepSamplerOneStep", ()),
    "euler": ("FewstepSamplerTeacher", ("euler",)),
    "dpmpp_2m": ("FewstepSamplerTeacher", ("dpmpp_2m",)),
    "uni_pc": ("FewstepSamplerTeacher", ("uni_pc",)),
    "euler_ancestral": ("FewstepSamplerTeacher", ("euler_ancestral",)),
}


@pytest.mark.parametrize("name", list(SAMPLER_NODES))
def test_sampling_through_comfyui_equals_the_core_sampler(cn, digits, name):
    """SamplerCustomAdvanced + a fewstep sampler node == the core sampler on the core denoiser with CFG.

    Samplers that draw fresh noise draw it with the host's noise sampler inside ComfyUI (seeded per the host's
    convention: ``seed`` on 0.3.75, ``seed + 1`` on the CPU since 0.6.0), so the reference gets the same one."""
    import comfy.k_diffusion.sampling as kds

    from fewstep.core.guidance import CFGDenoiser
    from fewstep.core.models import DiscreteVP
    from fewstep.core.models.embedded import dit_denoiser
    from fewstep.core.sampling import get_sampler

    model, pos, neg = digits
    node_id, args = SAMPLER_NODES[name]
    sampler = getattr(cn.S, node_id).execute(*args)[0]
    assert isinstance(sampler, cn.samplers.KSAMPLER)
    sigmas = cn.Sch.FewstepTimestepSchedule.execute(model, "999,749,499,249", "timestep")[0]
    seed, batch = 5, 2
    got = _sample(cn, model, pos, neg, sampler, sigmas, batch=batch, seed=seed)

    core = CFGDenoiser(dit_denoiser(_diffusers_twin(model), DiscreteVP("v", "linear", 1e-4, 0.02, quantize=True)),
                       scale=2.0)
    noise = torch.randn(batch, 1, 16, 16, generator=torch.manual_seed(seed))  # ComfyUI's RandomNoise
    x = noise * (1 + sigmas[0] ** 2) ** 0.5  # ComfyUI starts at sigma_max with VP's max-denoise scaling
    extra = {"class_labels": torch.full((batch,), 3), "seed": seed}
    opts = dict(gamma=0.3) if name == "tcd" else {}
    if name in ("lcm", "tcd", "dmd", "euler_ancestral"):
        opts["noise_sampler"] = kds.default_noise_sampler(x, seed=seed)
    ref = get_sampler(name)(core, x, sigmas, extra_args=extra, disable=True, **opts)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("student", ["digits_consistency_4step", "digits_dmd2_1step"])
def test_shipped_student_in_comfyui_equals_the_core_student(cn, student):
    """The loader offers the shipped students; sampled at cfg 1 over the timesteps they were distilled for (the
    student's own sampler from its metadata), ComfyUI gives what ``core.models.load_student`` gives. ComfyUI's
    ``ModelSamplingDiscrete`` rounds timesteps to integers (the consistency student's 749.25 -> 749), so the core
    reference rounds too; unrounded, the samples differ by at most a few hundredths."""
    from fewstep.core.models.students import load_student
    from fewstep.core.sampling import get_sampler

    path = cn.EM.WEIGHTS_DIR / f"{student}.safetensors"
    assert student in cn.EM.available_models() and "digits_agd_adapter" not in cn.EM.available_models()
    core, meta = load_student(path)
    core.model_sampling.quantize = True
    model = cn.E.FewstepDigitsModelLoader.execute(student)[0]
    pos, neg = cn.E.FewstepDigitsClassCondition.execute(4)
    sigmas = torch.tensor(meta["sigmas"], dtype=torch.float32)
    node = {"euler": ("FewstepSamplerTeacher", ("euler",)), "onestep": ("FewstepSamplerOneStep", ())}
    node_id, args = node[meta["sampler"]]
    seed, batch = 3, 4
    got = _sample(cn, model, pos, neg, getattr(cn.S, node_id).execute(*args)[0], sigmas, batch=batch, seed=seed,
                  cfg=1.0)
    noise = torch.randn(batch, 1, 16, 16, generator=torch.manual_seed(seed))
    x = noise * (1 + sigmas[0] ** 2) ** 0.5
    extra = {"class_labels": torch.full((batch,), 4)}
    ref = get_sampler(meta["sampler"])(core, x, sigmas, extra_args=extra, disable=True)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    core.model_sampling.quantize = False
    unrounded = get_sampler(meta["sampler"])(core, x, sigmas, extra_args=extra, disable=True)
    assert (got - unrounded).abs().max() < 0.05


def test_sampler_handles_a_single_sigma(cn, digits):
    model, pos, neg = digits
    sampler = cn.S.FewstepSamplerLCM.execute()[0]
    x = torch.randn(1, 1, 16, 16)
    assert sampler.sampler_function(None, x, torch.tensor([1.0])) is x


def test_flow_map_passes_the_target_sigma_in_transformer_options(cn, digits):
    model, pos, neg = digits
    seen: list = []
    sigmas = cn.Sch.FewstepTimestepSchedule.execute(model, "999,499,99", "timestep")[0]
    _sample(cn, _record_wrapper(model, seen), pos, neg, cn.S.FewstepSamplerFlowMap.execute()[0], sigmas)
    targets = [float(s["fewstep_target_sigma"][0]) for s in seen]
    assert targets == pytest.approx(sigmas[1:].tolist())


def test_hybrid_runs_base_then_distilled_model(cn, digits):
    model, pos, neg = digits
    other = cn.EM.load_digits_model(cn.EM.RANDOM_NAME, seed=1)  # a different "distilled" model
    base_calls: list = []
    dist_calls: list = []
    base = _record_wrapper(model, base_calls)
    dist = _record_wrapper(other, dist_calls)
    sigmas = cn.Sch.FewstepTimestepSchedule.execute(model, "999,749,499,249", "timestep")[0]
    sampler = cn.S.FewstepSamplerHybrid.execute(dist, 2, "euler", "lcm", 1.0)[0]

    steps = []
    guider = cn.cs.CFGGuider.execute(base, pos, neg, 2.0)[0]
    latent = torch.zeros(2, 1, 16, 16)
    noise = cn.cs.RandomNoise.execute(0)[0].generate_noise({"samples": latent})
    out = guider.sample(noise, latent, sampler, sigmas, callback=lambda i, *a: steps.append(i), disable_pbar=True,
                        seed=0)
    assert torch.isfinite(out).all()
    assert steps == [0, 1, 2, 3]  # the distilled phase continues the step count
    assert len(base_calls) == 2 and len(dist_calls) == 2
    assert [c["batch"] for c in base_calls] == [4, 4]  # cfg 2: cond + uncond batched
    assert [c["batch"] for c in dist_calls] == [2, 2]  # distilled_cfg 1: one pass

    # all steps on the base model == plain euler; none == lcm on the distilled model alone
    def run(m, s):
        return _sample(cn, m, pos, neg, s, sigmas, seed=0)

    torch.testing.assert_close(run(model, cn.S.FewstepSamplerHybrid.execute(other, 4, "euler", "lcm", 2.0)[0]),
                               run(model, cn.S.FewstepSamplerTeacher.execute("euler")[0]), rtol=0, atol=1e-6)
    torch.testing.assert_close(run(model, cn.S.FewstepSamplerHybrid.execute(other, 0, "euler", "lcm", 2.0)[0]),
                               run(other, cn.S.FewstepSamplerLCM.execute()[0]), rtol=0, atol=1e-6)
    # explicit conditioning for the distilled model (here: another digit) is used instead of the base run's
    pos7, neg7 = cn.E.FewstepDigitsClassCondition.execute(7)
    with_own = cn.S.FewstepSamplerHybrid.execute(other, 0, "euler", "lcm", 2.0, pos7, neg7)[0]
    torch.testing.assert_close(run(model, with_own), _sample(cn, other, pos7, neg7,
                                                             cn.S.FewstepSamplerLCM.execute()[0], sigmas, seed=0),
                               rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="distilled_negative"):
        cn.S.FewstepSamplerHybrid.execute(other, 0, "euler", "lcm", 2.0, pos7)


# --------------------------------------------------------------------------------------------- schedules


def test_timestep_schedule_node(cn, digits):
    from fewstep.core.models.embedded import teacher_model_sampling
    from fewstep.core.sampling import timestep_list

    model = digits[0]
    node = cn.Sch.FewstepTimestepSchedule
    sigmas = node.execute(model, "999, 749, 499, 249", "timestep")[0]
    torch.testing.assert_close(sigmas, timestep_list(teacher_model_sampling(), [999, 749, 499, 249]))
    assert len(sigmas) == 5 and sigmas[-1] == 0
    assert node.execute(model, "10, 2.5, 0.5", "sigma")[0].tolist() == [10.0, 2.5, 0.5, 0.0]
    with pytest.raises(ValueError, match="'abc' is not a number"):
        node.execute(model, "999,abc", "timestep")
    with pytest.raises(ValueError, match="strictly decreasing"):
        node.execute(model, "249,499", "timestep")
    with pytest.raises(ValueError, match=r"outside this model's range \[0, 999\]"):
        node.execute(model, "1500,999", "timestep")


def test_schedule_search_node_runs_on_the_model_and_caches(cn, digits):
    model, pos, neg = digits
    node, cache = cn.Sch.FewstepScheduleSearch, cn.Sch.SEARCH_CACHE
    cache.clear()
    latent = cn.E.FewstepDigitsEmptyLatent.execute(1)[0]
    args = dict(positive=pos, negative=neg, latent_image=latent, sampler_name="euler", nfe=3, cfg=2.0, seed=0,
                search_batch=1, grid_size=5, refine_rounds=1, reference_substeps=1)
    sigmas, report = node.execute(model, **args)
    report = json.loads(report)
    assert len(sigmas) == 4 and sigmas[-1] == 0 and bool((sigmas[1:] < sigmas[:-1]).all())
    assert report["cached"] is False and report["steps"] == 3 and report["error"] <= report["dp_error"]
    assert float(sigmas[0]) == pytest.approx(float(model.get_model_object("model_sampling").sigma_max))
    again, report2 = node.execute(model.clone(), **args)  # a clone is the same model: cache hit
    assert json.loads(report2)["cached"] is True and torch.equal(again, sigmas)
    _, report3 = node.execute(model, **{**args, "seed": 1, "refine_rounds": 0})
    assert json.loads(report3)["cached"] is False
    assert cache.hits == 1 and cache.misses == 2
    # the searched schedule samples with the matching teacher sampler
    out = _sample(cn, model, pos, neg, cn.S.FewstepSamplerTeacher.execute("euler")[0], sigmas)
    assert torch.isfinite(out).all()


def test_comfy_model_digest_follows_weights_and_patches(cn, digits):
    from fewstep.nodes.hashing import comfy_model_digest

    model = digits[0]
    other = cn.EM.load_digits_model(cn.EM.RANDOM_NAME, seed=1)
    assert comfy_model_digest(model) == comfy_model_digest(model.clone())
    assert comfy_model_digest(model) != comfy_model_digest(other)
    patched = model.clone()
    key = next(iter(patched.model_state_dict()))
    patched.add_patches({key: (torch.zeros_like(patched.model_state_dict()[key]),)}, 0.5)
    assert comfy_model_digest(model) != comfy_model_digest(patched)


def test_embedded_model_works_with_comfyui_easycache(cn, digits):
    """ComfyUI's own EasyCache (DIFFUSION_MODEL wrapper) runs on the embedded MODEL and really skips: the network's
    first layer runs fewer times than without the cache, and the sample changes (a reused output, not a rerun)."""
    import comfy_extras.nodes_easycache as easycache

    model, pos, neg = digits
    calls: list[int] = []
    hook = model.model.diffusion_model.dit.pos_embed.proj.register_forward_hook(lambda *a: calls.append(1))
    try:
        sigmas = cn.cs.BasicScheduler.execute(model, "karras", 8, 1.0)[0]
        sampler = cn.S.FewstepSamplerTeacher.execute("euler")[0]
        ref = _sample(cn, model, pos, neg, sampler, sigmas)
        n_ref = len(calls)
        calls.clear()
        cached = easycache.EasyCacheNode.execute(model, 0.2, 0.0, 1.0, False)[0]
        out = _sample(cn, cached, pos, neg, sampler, sigmas)
        n_cached = len(calls)
    finally:
        hook.remove()
    assert out.shape == ref.shape == (2, 1, 16, 16) and torch.isfinite(out).all()
    assert n_ref >= 8 and 0 < n_cached < n_ref, (n_ref, n_cached)  # uncached: at least one network call per step
    assert not torch.equal(out, ref)
