"""Cache nodes (nodes/caches.py) on tiny random-weight instances of ComfyUI's own architectures (SD1.5, SDXL, Flux,
SD3, Wan 2.1) and on the embedded digits DiT, sampled through ComfyUI (CFGGuider -> SamplerCustomAdvanced).

Network and block executions are counted with forward pre-hooks on the real modules, so "skipped" is checked
against what actually ran, not against the cache's own bookkeeping."""

from __future__ import annotations

import json

import pytest
import torch

pytestmark = [pytest.mark.comfy, pytest.mark.usefixtures("one_thread")]

ARCHS = ("sd15", "sdxl", "flux", "sd3", "wan21")
BLOCK_ARCHS = ("flux", "sd3", "wan21", "digits")
STEPS = 6


@pytest.fixture(scope="module")
def env(comfy_root):
    import comfy.samplers
    import comfy_extras.nodes_custom_sampler as cs
    import comfy_tiny_models as tiny
    import folder_paths

    from fewstep.nodes import cache_wrappers, caches, embedded, embedded_model

    models = {arch: tiny.tiny_model(arch) for arch in ARCHS}
    models["digits"] = embedded_model.load_digits_model(embedded_model.RANDOM_NAME)
    return type("Env", (), dict(cs=cs, samplers=comfy.samplers, tiny=tiny, C=caches, W=cache_wrappers, E=embedded,
                                EM=embedded_model,
                                models=models, folder_paths=folder_paths))


@pytest.fixture
def cal_dir(env, tmp_path, monkeypatch):
    """An empty calibration folder in place of models/fewstep_cache_calibrations (and no user/env dirs)."""
    monkeypatch.setitem(env.folder_paths.folder_names_and_paths, env.C.CALIBRATION_FOLDER, ([str(tmp_path)], {".json"}))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("FEWSTEP_CALIBRATION_DIR", raising=False)
    return tmp_path


def _inputs(env, arch, batch=1):
    if arch == "digits":
        pos, neg = env.E.FewstepDigitsClassCondition.execute(3)
        return pos, neg, {"samples": env.EM.empty_latent(batch)}
    return env.tiny.tiny_inputs(arch, batch=batch)


def _sample(env, model, arch, steps=STEPS, cfg=2.0, seed=0, batch=1, sampler="euler", scheduler="karras"):
    pos, neg, latent = _inputs(env, arch, batch)
    guider = env.cs.CFGGuider.execute(model, pos, neg, cfg)[0]
    sigmas = env.samplers.calculate_sigmas(model.get_model_object("model_sampling"), scheduler, steps)
    return env.cs.SamplerCustomAdvanced.execute(env.cs.RandomNoise.execute(seed)[0], guider,
                                                env.samplers.sampler_object(sampler), sigmas, latent)[0]["samples"]


class _Count:
    """Counts forward calls of the diffusion model and of each block module (forward pre-hooks)."""

    def __init__(self, env, model, arch):
        dm = model.model.diffusion_model
        self.net = 0
        self.blocks = 0
        self.handles = [_stem(dm, arch).register_forward_pre_hook(self._net)]
        if arch in BLOCK_ARCHS:
            for mod in _block_modules(dm, arch):
                self.handles.append(mod.register_forward_pre_hook(self._block))

    def _net(self, *_):
        self.net += 1

    def _block(self, *_):
        self.blocks += 1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()


def _stem(dm, arch):
    """The network's first layer: it runs exactly when the network body runs (a step cache's skip avoids it)."""
    return {"sd15": lambda: dm.input_blocks[0][0], "sdxl": lambda: dm.input_blocks[0][0], "flux": lambda: dm.img_in,
            "sd3": lambda: dm.x_embedder, "wan21": lambda: dm.patch_embedding,
            "digits": lambda: dm.dit.pos_embed.proj}[arch]()


def _block_modules(dm, arch):
    if arch == "flux":
        return [*dm.double_blocks, *dm.single_blocks]
    if arch == "sd3":
        return list(dm.joint_blocks)
    if arch == "wan21":
        return list(dm.blocks)
    return list(dm.dit.transformer_blocks)


def _step(env, model, method="easycache", threshold=0.1, forecast="none", start=0.0, end=1.0, max_skips=0,
          calibration="auto", **extra):
    return env.C.FewstepStepCache.execute(model, method, threshold, forecast, start, end, max_skips, calibration,
                                          **extra)[0]


def _block(env, model, method="first_block", threshold=0.1, head_blocks=1, interval=2, delta_blocks=0, boundary=0.5,
           forecast="none", calibration="auto"):
    return env.C.FewstepBlockCache.execute(model, method, threshold, head_blocks, interval, delta_blocks, boundary,
                                           forecast, 0.0, 1.0, 0, calibration)[0]


def _stats(model, key):
    return model.model_options["transformer_options"][key].last_stats


# ------------------------------------------------------------------------------------------------ step cache


@pytest.mark.parametrize("arch", (*ARCHS, "digits"))
def test_step_cache_lossless_and_counted_on_architecture(env, arch):
    base = env.models[arch]
    ref = _sample(env, base, arch)
    for method, forecast in (("easycache", "none"), ("teacache_uncalibrated", "taylor2")):
        patched = _step(env, base, method, threshold=0.0, forecast=forecast)
        with _Count(env, base, arch) as n:
            out = _sample(env, patched, arch)
        assert torch.equal(out, ref), (arch, method)
        st = _stats(patched, env.C.STEP_KEY)
        assert st["computed"] == n.net == STEPS and st["skipped"] == 0
        assert st["level"] == ("apply_model" if arch == "sd3" else "diffusion_model")
    assert "fewstep_step_cache" not in base.model_options["transformer_options"]  # the input MODEL is untouched
    # a real threshold: the network runs exactly as often as the cache says it computed
    for forecast in ("none", "taylor1"):
        patched = _step(env, base, "teacache_uncalibrated", threshold=1.0, forecast=forecast)
        with _Count(env, base, arch) as n:
            out = _sample(env, patched, arch)
        st = _stats(patched, env.C.STEP_KEY)
        assert st["skipped"] > 0 and st["computed"] + st["skipped"] == STEPS
        assert n.net == st["computed"]
        assert torch.isfinite(out).all() and not torch.equal(out, ref)


def test_step_cache_max_skips_and_percent_window(env):
    base = env.models["flux"]
    patched = _step(env, base, "teacache_uncalibrated", threshold=1.0, max_skips=1)
    with _Count(env, base, "flux") as n:
        _sample(env, patched, "flux", scheduler="simple")
    st = _stats(patched, env.C.STEP_KEY)
    assert st == {**st, "computed": 3, "skipped": 3} and n.net == 3  # compute, skip, compute, skip, ...
    # start_percent 0.5: every step before the middle of the run (ComfyUI's percent_to_sigma) computes
    ms = base.get_model_object("model_sampling")
    sigmas = env.samplers.calculate_sigmas(ms, "simple", STEPS)[:-1]
    before = int((sigmas > float(ms.percent_to_sigma(0.5))).sum())
    assert 0 < before < STEPS
    window = _step(env, base, "teacache_uncalibrated", threshold=1.0, start=0.5, end=1.0)
    _sample(env, window, "flux", scheduler="simple")
    late = _stats(window, env.C.STEP_KEY)
    assert late["computed"] >= before and 0 < late["skipped"] <= STEPS - before


def test_step_cache_state_resets_between_runs_and_batch_sizes(env):
    base = env.models["digits"]
    patched = _step(env, base, "teacache_uncalibrated", threshold=0.3)
    holder = patched.model_options["transformer_options"][env.C.STEP_KEY]
    a = _sample(env, patched, "digits", steps=10, batch=2)
    s1 = dict(holder.last_stats)
    b = _sample(env, patched, "digits", steps=10, batch=2)
    assert torch.equal(a, b) and holder.last_stats == s1 and s1["skipped"] > 0
    c = _sample(env, patched, "digits", steps=10, batch=3, seed=1)
    assert c.shape[0] == 3 and holder.last_stats["forced"] == 0  # a fresh state: nothing to invalidate
    d = _sample(env, patched, "digits", steps=10, batch=2)
    assert torch.equal(a, d) and len(holder.history) == 4
    # the same MODEL in another sampler run right after gives the same as a freshly patched one
    fresh = _step(env, base, "teacache_uncalibrated", threshold=0.3)
    assert torch.equal(_sample(env, fresh, "digits", steps=10, batch=3, seed=1), c)


def test_step_cache_keeps_guidance_branches_apart(env):
    """Branches called separately at the same sigmas (keys ``(0,)`` and ``(1,)`` from ``cond_or_uncond``) keep
    separate state: a still cond input is skipped while a fast-changing uncond input is computed every step."""
    base = env.models["digits"]
    patched = _step(env, base, "teacache_uncalibrated", threshold=0.5)
    holder = patched.model_options["transformer_options"][env.C.STEP_KEY]
    run = holder.new_run(base.get_model_object("model_sampling"))
    wrapper = env.W.step_diffusion_model_wrapper(1)
    ran: list[tuple] = []

    def net(x, t, context, control, opts):
        ran.append(tuple(opts["cond_or_uncond"]))
        return x * 2

    still = torch.ones(1, 1, 16, 16)
    for i, sigma in enumerate((10.0, 8.0, 6.0, 4.0, 2.0)):
        for branch, x in (((0,), still), ((1,), still * 3**i)):
            opts = {"sigmas": torch.tensor([sigma]), "cond_or_uncond": list(branch), f"{env.C.STEP_KEY}_run": run}
            assert torch.equal(wrapper(net, x, torch.tensor([sigma * 100]), None, None, opts), x * 2)
    assert ran.count((0,)) == 1 and ran.count((1,)) == 5
    assert run.cache.stats["skipped"] == 4 and run.cache.stats["computed"] == 6
    # cfg 1 runs the cond branch alone, through the same node
    cond_only = _step(env, base, "teacache_uncalibrated", threshold=0.3)
    _sample(env, cond_only, "digits", steps=10, cfg=1.0)
    assert _stats(cond_only, env.C.STEP_KEY)["calls"] == 10


def test_step_cache_bad_threshold_is_rejected_with_the_range(env):
    with pytest.raises(ValueError, match=r"threshold must be in \[0, 1.0\].*got 1.5"):
        _step(env, env.models["sd15"], threshold=1.5)
    with pytest.raises(ValueError, match=r"threshold must be in \[0, 1.0\]"):
        _block(env, env.models["flux"], threshold=-0.1)
    with pytest.raises(ValueError, match="start_percent <= end_percent"):
        _step(env, env.models["sd15"], start=0.8, end=0.2)


# ------------------------------------------------------------------------------------------------ block cache


@pytest.mark.parametrize("arch", BLOCK_ARCHS)
def test_block_cache_lossless_and_counted_on_architecture(env, arch):
    base = env.models[arch]
    n_blocks = len(env.C.block_layout(base))
    ref = _sample(env, base, arch)
    for method in ("first_block", "easycache"):
        patched = _block(env, base, method, threshold=0.0, forecast="taylor1")
        with _Count(env, base, arch) as n:
            out = _sample(env, patched, arch)
        assert torch.equal(out, ref), (arch, method)
        st = _stats(patched, env.C.BLOCK_KEY)
        assert st["blocks_run"] == n.blocks == STEPS * n_blocks and st["blocks_skipped"] == 0
    delta1 = _block(env, base, "delta_dit", interval=1)  # interval 1: recompute every call
    assert torch.equal(_sample(env, delta1, arch), ref)
    for method, kwargs in (("first_block", dict(threshold=1.0)), ("delta_dit", dict(interval=2)),
                           ("first_block", dict(threshold=1.0, forecast="taylor2"))):
        patched = _block(env, base, method, **kwargs)
        with _Count(env, base, arch) as n:
            out = _sample(env, patched, arch)
        st = _stats(patched, env.C.BLOCK_KEY)
        assert st["blocks_skipped"] > 0 and torch.isfinite(out).all(), (arch, method)
        assert n.blocks == st["blocks_run"] and st["blocks_run"] + st["blocks_skipped"] == STEPS * n_blocks
        assert n.net == STEPS  # the network itself always runs (its embedders and head)


@pytest.mark.parametrize("arch", ("sd15", "sdxl"))
def test_block_cache_on_a_unet_names_the_architecture_and_the_step_cache(env, arch):
    name = {"sd15": "SD15", "sdxl": "SDXL"}[arch]
    with pytest.raises(ValueError, match=rf"\({name}, UNetModel\).*FewstepStepCache"):
        _block(env, env.models[arch])


def test_node_path_matches_the_core_hooks_on_the_digits_model(env):
    """The step cache through ComfyUI's wrappers and core's torch hooks on the same network (diffusers' DiT with the
    same weights) make the same compute/skip decisions and give the same samples."""
    from fewstep.core.cache import StepCache, apply_cache
    from fewstep.core.guidance import CFGDenoiser
    from fewstep.core.models import DiscreteVP
    from fewstep.core.models.embedded import build_dit, dit_denoiser
    from fewstep.core.sampling import get_sampler
    from fewstep.nodes.samplers import FewstepSamplerTeacher

    base = env.models["digits"]
    twin = build_dit()
    twin.load_state_dict(base.model.diffusion_model.dit.state_dict())
    twin.eval().requires_grad_(False)
    steps, seed, batch, threshold = 12, 3, 2, 0.25
    sigmas = env.samplers.calculate_sigmas(base.get_model_object("model_sampling"), "karras", steps)

    node_ts: list[float] = []
    patched = _step(env, base, "teacache_uncalibrated", threshold=threshold)
    block0 = base.model.diffusion_model.dit.transformer_blocks[0]
    h = block0.register_forward_pre_hook(lambda _m, a: node_ts.append(float(a[1][0])))
    try:
        pos, neg, latent = _inputs(env, "digits", batch)
        guider = env.cs.CFGGuider.execute(patched, pos, neg, 2.0)[0]
        got = env.cs.SamplerCustomAdvanced.execute(env.cs.RandomNoise.execute(seed)[0], guider,
                                                   FewstepSamplerTeacher.execute("euler")[0], sigmas,
                                                   latent)[0]["samples"]
    finally:
        h.remove()

    core_ts: list[float] = []
    den = CFGDenoiser(dit_denoiser(twin, DiscreteVP("v", "linear", 1e-4, 0.02, quantize=True)), scale=2.0)
    cache = StepCache(threshold, indicator="input")
    h = twin.register_forward_pre_hook(lambda _m, a, k: core_ts.append(float(k.get("timestep", a[1] if len(a) > 1
                                                                                      else None)[0])),
                                       with_kwargs=True)
    noise = torch.randn(batch, 1, 16, 16, generator=torch.manual_seed(seed))
    try:
        with apply_cache(den, cache):
            ref = get_sampler("euler")(den, noise * (1 + sigmas[0] ** 2) ** 0.5, sigmas,
                                       extra_args={"class_labels": torch.full((batch,), 3)}, disable=True)
    finally:
        h.remove()
    st = _stats(patched, env.C.STEP_KEY)
    assert 0 < st["skipped"] == cache.stats["skipped"] and st["computed"] == cache.stats["computed"]
    assert node_ts == pytest.approx(core_ts, abs=1e-3)  # the same steps computed
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------------------ calibration


def test_calibration_node_writes_the_file_the_caches_find(env, cal_dir):
    base = env.models["digits"]
    pos, neg, latent = _inputs(env, "digits", 2)
    # without a calibration, the methods that need one say which node makes it
    for make in (lambda: _step(env, base, "teacache", threshold=0.1),
                 lambda: _step(env, base, "magcache", threshold=0.05),
                 lambda: _block(env, base, "teacache", threshold=0.1)):
        with pytest.raises(ValueError, match=r"FewstepCacheCalibrate.*no cache calibration for model "
                                             r"'comfy-DigitsDiTConfig'"):
            make()
    model_out, summary = env.C.FewstepCacheCalibrate.execute(base, pos, neg, latent, "dpmpp_2m", "karras", 8, 2.0,
                                                             0, 2, 1)
    assert model_out is base
    info = json.loads(summary)
    path = cal_dir / f"{info['model']}--{info['config_hash']}.json"
    assert info["path"] == str(path) and path.is_file() and not list(cal_dir.glob("*.tmp"))
    assert info["level"] == "diffusion_model" and info["calls"] == 16  # 2 runs x 8 steps, cond+uncond batched
    assert set(info["polys"]) == {"input", "range_input"} and set(info["mag_curves"]) == {"step", "blocks:1"}
    data = json.loads(path.read_text())
    assert data["recipe"]["host"] == "comfyui" and len(data["mag"]["step"]["log_sigma"]) == 16
    # the caches now find it with calibration 'auto', and every calibrated method runs and skips
    ref = _sample(env, base, "digits", steps=10)
    for patched, key in ((_step(env, base, "teacache", threshold=0.3), env.C.STEP_KEY),
                         (_step(env, base, "magcache", threshold=0.3), env.C.STEP_KEY),
                         (_block(env, base, "teacache", threshold=0.3), env.C.BLOCK_KEY),
                         (_block(env, base, "magcache", threshold=0.3), env.C.BLOCK_KEY)):
        holder = patched.model_options["transformer_options"][key]
        out = _sample(env, patched, "digits", steps=10)
        assert torch.isfinite(out).all() and holder.last_stats["skipped"] > 0, holder.label
    assert torch.equal(_sample(env, _step(env, base, "teacache", threshold=0.0), "digits", steps=10), ref)
    assert torch.equal(_sample(env, _block(env, base, "magcache", threshold=0.0), "digits", steps=10), ref)


def test_calibration_of_another_model_is_refused_with_cores_message(env, cal_dir):
    flux = env.models["flux"]
    pos, neg, latent = _inputs(env, "flux")
    _, summary = env.C.FewstepCacheCalibrate.execute(flux, pos, neg, latent, "euler", "simple", 5, 2.0, 0, 1, 1)
    info = json.loads(summary)
    assert info["model"] == "comfy-Flux" and "blocks:1" in info["mag_curves"]
    assert _step(env, flux, "teacache", threshold=0.1)  # found for Flux ...
    with pytest.raises(ValueError, match=r"calibration does not fit.*calibration is for model 'comfy-Flux' but the "
                                         r"cache is applied to 'comfy-DigitsDiTConfig'"):
        _step(env, env.models["digits"], "teacache", threshold=0.1, calibration=f"{info['model']}--"
                                                                              f"{info['config_hash']}.json")
    with pytest.raises(ValueError, match="neither 'auto' nor a file"):
        _step(env, flux, "teacache", calibration="no_such_file.json")


def test_calibration_needs_an_uncached_model_and_a_one_call_sampler(env, cal_dir):
    base = env.models["digits"]
    pos, neg, latent = _inputs(env, "digits")
    with pytest.raises(ValueError, match="before the cache nodes"):
        env.C.FewstepCacheCalibrate.execute(_step(env, base), pos, neg, latent, "euler", "karras", 6, 2.0, 0, 1, 1)
    with pytest.raises(ValueError, match=r"head_blocks must be in \[1, 4\]"):
        env.C.FewstepCacheCalibrate.execute(base, pos, neg, latent, "euler", "karras", 6, 2.0, 0, 1, 5)
    with pytest.raises(ValueError, match="one model call per step"):
        env.C.FewstepCacheCalibrate.execute(base, pos, neg, latent, "heun", "karras", 6, 2.0, 0, 1, 1)
    assert not list(cal_dir.glob("*.json"))


def test_block_cache_node_matches_the_core_hooks_on_the_digits_model(env):
    """First-Block-Cache through ComfyUI's block patches and through core's diffusers hooks on the same network: both
    drive core's block-range runner, so they make the same decisions and give the same samples."""
    from fewstep.core.cache import FirstBlockCache, apply_cache
    from fewstep.core.guidance import CFGDenoiser
    from fewstep.core.models import DiscreteVP
    from fewstep.core.models.embedded import build_dit, dit_denoiser
    from fewstep.core.sampling import get_sampler
    from fewstep.nodes.samplers import FewstepSamplerTeacher

    base = env.models["digits"]
    twin = build_dit()
    twin.load_state_dict(base.model.diffusion_model.dit.state_dict())
    twin.eval().requires_grad_(False)
    steps, seed, batch, threshold = 10, 3, 2, 0.3
    sigmas = env.samplers.calculate_sigmas(base.get_model_object("model_sampling"), "karras", steps)
    patched = _block(env, base, "first_block", threshold=threshold)
    pos, neg, latent = _inputs(env, "digits", batch)
    guider = env.cs.CFGGuider.execute(patched, pos, neg, 2.0)[0]
    got = env.cs.SamplerCustomAdvanced.execute(env.cs.RandomNoise.execute(seed)[0], guider,
                                               FewstepSamplerTeacher.execute("euler")[0], sigmas, latent)[0]["samples"]
    den = CFGDenoiser(dit_denoiser(twin, DiscreteVP("v", "linear", 1e-4, 0.02, quantize=True)), scale=2.0)
    cache = FirstBlockCache(threshold)
    noise = torch.randn(batch, 1, 16, 16, generator=torch.manual_seed(seed))
    with apply_cache(den, cache):
        ref = get_sampler("euler")(den, noise * (1 + sigmas[0] ** 2) ** 0.5, sigmas,
                                   extra_args={"class_labels": torch.full((batch,), 3)}, disable=True)
    st = _stats(patched, env.C.BLOCK_KEY)
    assert 0 < st["blocks_skipped"] == cache.stats["blocks_skipped"] and st["skipped"] == cache.stats["skipped"]
    assert st["blocks_run"] == cache.stats["blocks_run"]
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------------------ identity, files


def test_identity_is_keyed_by_the_weights(env):
    """Same architecture and model sampling, other weights (teacher, a student, two random inits, a LoRA-style weight
    patch): other identities. The same weights loaded twice: the same identity."""
    from fewstep.nodes.cache_store import model_identity

    em = env.EM
    teacher, teacher2 = em.load_digits_model(em.TEACHER_NAME), em.load_digits_model(em.TEACHER_NAME)
    student = em.load_digits_model("digits_consistency_4step")
    rand0, rand1 = em.load_digits_model(em.RANDOM_NAME, seed=0), em.load_digits_model(em.RANDOM_NAME, seed=1)
    ids = {k: model_identity(m) for k, m in dict(teacher=teacher, student=student, rand0=rand0, rand1=rand1).items()}
    assert model_identity(teacher2) == ids["teacher"]
    assert len({i[1] for i in ids.values()}) == 4 and len({i[2] for i in ids.values()}) == 4
    assert len({i[0] for i in ids.values()}) == 1  # one architecture name: only the weights tell them apart
    lora = teacher.clone()
    key = next(k for k in teacher.model.state_dict() if k.endswith("weight") and "transformer_blocks.0" in k)
    shape = teacher.model.state_dict()[key].shape
    lora.add_patches({key: (torch.full(shape, 0.01),)}, 0.5)
    assert model_identity(lora)[1] != ids["teacher"][1]


def test_teacher_calibration_is_not_reused_for_students_or_random_init(env, cal_dir):
    em = env.EM
    teacher = em.load_digits_model(em.TEACHER_NAME)
    pos, neg, latent = _inputs(env, "digits", 2)
    _, summary = env.C.FewstepCacheCalibrate.execute(teacher, pos, neg, latent, "euler", "karras", 6, 2.0, 0, 1, 1)
    info = json.loads(summary)
    data = json.loads((cal_dir / f"{info['model']}--{info['config_hash']}.json").read_text())
    assert data["weights"] and data["weights"] != info["config_hash"]
    assert _step(env, teacher, "teacache", threshold=0.1)  # found for the teacher
    for name in ("digits_consistency_4step", em.RANDOM_NAME):
        other = em.load_digits_model(name)
        with pytest.raises(ValueError, match=r"calibration does not fit.*config hash.*weights.*(?s:.*)keyed by the "
                                             r"model's architecture, model sampling and weights"):
            _step(env, other, "teacache", threshold=0.1)  # 'auto': the teacher's file is not this model's
        with pytest.raises(ValueError, match=rf"made for config hash {info['config_hash']} but this model has config "
                                             r"hash [0-9a-f]{16} \(another size, config, weights or model sampling\)"):
            _step(env, other, "magcache", threshold=0.1, calibration=f"{info['model']}--{info['config_hash']}.json")


SECRET = "TOP-SECRET-LINE-do-not-echo"


def test_calibration_input_resolves_only_inside_the_calibration_folders(env, cal_dir, tmp_path_factory):
    base = env.models["digits"]
    outside = tmp_path_factory.mktemp("outside")
    (outside / "secret.json").write_text(json.dumps({"format": SECRET, "model": SECRET}))
    (outside / "passwd").write_text(SECRET + "\n")
    rel = f"../{outside.name}/secret.json"
    for value in (str(outside / "secret.json"), rel, str(outside / "passwd"), "../../../../etc/passwd"):
        with pytest.raises(ValueError) as e:
            _step(env, base, "teacache", threshold=0.1, calibration=value)
        msg = str(e.value)
        assert SECRET not in msg and "root:" not in msg
        assert "calibration folders" in msg or "must be 'auto' or the file name of a .json" in msg, msg
    # files inside the folder that are not calibrations: refused by name, contents never echoed
    (cal_dir / "notjson.json").write_text(SECRET + " {")
    (cal_dir / "foreign.json").write_text(json.dumps({"format": SECRET, "payload": SECRET}))
    for name, match in (("notjson.json", "is not valid JSON"), ("foreign.json", "is not a fewstep cache calibration")):
        with pytest.raises(ValueError, match=match) as e:
            _step(env, base, "teacache", threshold=0.1, calibration=name)
        assert SECRET not in str(e.value) and name in str(e.value)


@pytest.mark.parametrize("key, value, where", [
    (("polys", "input", 0), float("nan"), r"polys\.input\[0\] = nan"),
    (("poly_range", "input", 0), -0.5, r"poly_range\.input\[0\] = -0\.5 .*allowed: finite relative changes >= 0"),
    (("mag", "step", "log_norm", 1), float("inf"), r"mag\.step\.log_norm\[1\] = inf"),
])
def test_bad_calibration_values_are_refused_by_the_node(env, cal_dir, key, value, where):
    base = env.models["digits"]
    pos, neg, latent = _inputs(env, "digits", 1)
    _, summary = env.C.FewstepCacheCalibrate.execute(base, pos, neg, latent, "euler", "karras", 6, 2.0, 0, 1, 1)
    path = cal_dir / f"{json.loads(summary)['model']}--{json.loads(summary)['config_hash']}.json"
    data = json.loads(path.read_text())
    node = data
    for k in key[:-1]:
        node = node[k]
    node[key[-1]] = value
    path.write_text(json.dumps(data))
    method = "magcache" if key[0] == "mag" else "teacache"
    with pytest.raises(ValueError, match=rf"unusable calibration: calibration {path}: {where}.*recalibrate") as e:
        _step(env, base, method, threshold=0.1)
    assert "allowed: " in str(e.value)


# ------------------------------------------------------------------------------------------------ state per clone


def test_clones_with_different_settings_do_not_share_state(env):
    """Two cache settings on clones of one MODEL in one graph, including a downstream clone that inherited the
    holder object itself (ComfyUI >= 0.13 no longer deep-copies it on clone()): each clone keeps its own holder and
    statistics, and each one's samples equal a freshly patched model's."""
    base = env.models["digits"]
    a = _step(env, base, "teacache_uncalibrated", threshold=0.3)
    holder_a = a.model_options["transformer_options"][env.C.STEP_KEY]
    inherited = a.clone()
    inherited.model_options["transformer_options"][env.C.STEP_KEY] = holder_a  # what 0.13+ clone() does
    b = _block(env, inherited, "first_block", threshold=1.0)  # another setting on the downstream clone
    out_a = _sample(env, a, "digits", steps=10)
    stats_a = dict(holder_a.last_stats)
    out_inh = _sample(env, inherited, "digits", steps=10, seed=1, batch=2)
    out_b = _sample(env, b, "digits", steps=10, seed=2)
    assert holder_a.last_stats == stats_a and len(holder_a.history) == 1  # the clones' runs never touched a's holder
    own = inherited.model_options["transformer_options"][env.C.STEP_KEY]
    assert own is not holder_a and own.label == holder_a.label and len(own.history) == 1
    b_holders = b.model_options["transformer_options"]
    assert b_holders[env.C.BLOCK_KEY].last_stats["blocks_skipped"] > 0
    assert b_holders[env.C.STEP_KEY] is not holder_a and b_holders[env.C.STEP_KEY] is not own
    assert torch.equal(out_a, _sample(env, _step(env, base, "teacache_uncalibrated", threshold=0.3), "digits",
                                      steps=10))
    fresh = _step(env, base, "teacache_uncalibrated", threshold=0.3)
    assert torch.equal(out_inh, _sample(env, fresh, "digits", steps=10, seed=1, batch=2))
    assert torch.equal(out_b, _sample(env, _block(env, fresh, "first_block", threshold=1.0), "digits", steps=10,
                                      seed=2))


# ------------------------------------------------------------------------------------------------ CFG-branch reuse


class _Rows:
    """Rows entering the network's first layer (cond + uncond rows of a batched call)."""

    def __init__(self, model, arch):
        self.n = 0
        self.h = _stem(model.model.diffusion_model, arch).register_forward_pre_hook(self._add)

    def _add(self, _m, a):
        self.n += a[0].shape[0]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.h.remove()


@pytest.mark.parametrize("arch", ("digits", "flux", "sd15"))
def test_cfg_branch_reuse_skips_the_negative_branch(env, arch):
    base = env.models[arch]
    ref = _sample(env, base, arch)
    for reuse in (0.0, 1e-12):  # off, and on but never below the threshold: both the unpatched sample, bit for bit
        patched = _step(env, base, "teacache_uncalibrated", threshold=0.0, cfg_reuse=reuse)
        assert torch.equal(_sample(env, patched, arch), ref), reuse
    cfg = _stats(patched, env.C.STEP_KEY)["cfg"]
    assert cfg["computed"] == STEPS and cfg["skipped"] == 0
    patched = _step(env, base, "teacache_uncalibrated", threshold=0.0, cfg_reuse=1.0, max_skips=1)
    with _Rows(base, arch) as rows:
        out = _sample(env, patched, arch)
    st = _stats(patched, env.C.STEP_KEY)
    assert st["cfg"]["computed"] == 3 and st["cfg"]["skipped"] == 3  # compute, reuse, compute, ...
    assert rows.n == 3 * 2 + 3 * 1  # computed steps: positive + negative rows; reused steps: positive only
    assert st["skipped"] == 0 and torch.isfinite(out).all() and not torch.equal(out, ref)
    # per run: a second run of the same MODEL starts from nothing and repeats the first exactly
    again = _sample(env, patched, arch)
    assert torch.equal(again, out) and _stats(patched, env.C.STEP_KEY)["cfg"] == st["cfg"]
    # cfg 1 has no negative branch: nothing to reuse, nothing changed
    one = _step(env, base, "teacache_uncalibrated", threshold=0.0, cfg_reuse=1.0)
    assert torch.equal(_sample(env, one, arch, cfg=1.0), _sample(env, base, arch, cfg=1.0))
    assert _stats(one, env.C.STEP_KEY)["cfg"]["calls"] == 0


def test_cfg_branch_reuse_bad_value_is_rejected(env):
    with pytest.raises(ValueError, match=r"cfg_reuse: threshold must be in \[0, 1.0\].*got -0.5"):
        _step(env, env.models["digits"], cfg_reuse=-0.5)


def test_expert_switch_mid_run_never_reuses_the_other_experts_residual(env):
    """Wan 2.2 style: one run calls a high-noise expert, then a low-noise expert (another network object). State is
    keyed by the network too: the low-noise expert's first call computes and every output is its own network's
    (a shared state would return the high-noise expert's residual there)."""
    base = env.models["digits"]
    patched = _step(env, base, "teacache_uncalibrated", threshold=0.9)
    holder = patched.model_options["transformer_options"][env.C.STEP_KEY]
    run = holder.new_run(base.get_model_object("model_sampling"))
    wrapper = env.W.step_diffusion_model_wrapper(1)

    class Expert:
        def __init__(self, scale):
            self.scale, self.calls = scale, 0
            self.class_obj = object()  # the diffusion model object ComfyUI's executor carries

        def __call__(self, x, t, context, control, opts):
            self.calls += 1
            return x * self.scale

    high, low = Expert(2.0), Expert(-3.0)
    x = torch.ones(1, 1, 16, 16)
    outs = []
    for i, sigma in enumerate((10.0, 8.0, 6.0, 4.0, 2.0, 1.0)):
        expert = high if i < 3 else low
        opts = {"sigmas": torch.tensor([sigma]), "cond_or_uncond": [0], f"{env.C.STEP_KEY}_run": run}
        outs.append(wrapper(expert, x, torch.tensor([sigma * 100]), None, None, opts))
    assert high.calls == 1 and low.calls == 1  # each expert computed its first call, then reused its own residual
    assert all(torch.equal(o, x * 2.0) for o in outs[:3]) and all(torch.equal(o, x * -3.0) for o in outs[3:])
    assert run.cache.stats["computed"] == 2 and run.cache.stats["skipped"] == 4


def test_block_cache_state_is_partitioned_per_expert_within_a_run(env):
    """The block cache's run state is keyed by the network object too (set by its DIFFUSION_MODEL wrapper): a second
    network called in the same run with the same block patches starts from its own, empty state."""
    base = env.models["digits"]
    patched = _block(env, base, "first_block", threshold=1.0)
    holder = patched.model_options["transformer_options"][env.C.BLOCK_KEY]
    run = holder.new_run(base.get_model_object("model_sampling"))
    n = len(holder.layout)

    class Expert:
        def __init__(self, scale):
            self.class_obj, self.scale, self.runs = object(), scale, 0

        def __call__(self, x, opts):  # a network body: n blocks, each through its patches_replace entry
            state = {"img": x}
            for g in range(n):
                def original(args, scale=self.scale if g else 1.5):  # the same head block in both experts
                    self.runs += 1
                    return {"img": args["img"] * scale}
                state = env.W.BlockPatch(g)({"img": state["img"], "transformer_options": opts},
                                            {"original_block": original})
            return state["img"]

    high, low = Expert(1.5), Expert(0.5)
    x = torch.ones(1, 4, 8)
    outs = []
    for i, sigma in enumerate((10.0, 8.0, 6.0, 4.0, 2.0, 1.0)):
        expert = high if i < 3 else low
        opts = {"sigmas": torch.tensor([sigma]), "cond_or_uncond": [0], f"{env.C.BLOCK_KEY}_run": run}
        outs.append(_with_class(env, expert, x, opts))
    # the low-noise expert's first call computed all its blocks (a shared state would have skipped it: the head
    # residual is the same, and returned the high-noise expert's residual)
    assert torch.equal(outs[3], x * 1.5 * 0.5 ** (n - 1)) and torch.equal(outs[2], x * 1.5**n)
    assert high.runs == n + 2 * 1 and low.runs == n + 2 * 1  # then the head block only, per expert
    assert run.cache.stats["computed"] == 2 and run.cache.stats["skipped"] == 4


def _with_class(env, expert, x, opts):
    class Executor:
        class_obj = expert.class_obj

        def __call__(self, x, opts):
            return expert(x, opts)

    return env.W.block_diffusion_model_wrapper(Executor(), x, opts)
