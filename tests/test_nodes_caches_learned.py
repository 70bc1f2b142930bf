"""The learned cache in ComfyUI (``FewstepLearnedCache``): its samples equal core's ``LearnedCache`` through the
diffusers hooks on the same network and noise; a predictor of other weights is refused with both fingerprints named;
state is per run and per clone; only files inside ``models/fewstep_learned_caches`` are read."""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.comfy, pytest.mark.usefixtures("one_thread")]

SKIP = [1, 3]
STEPS, SEED, BATCH, CFG = 5, 3, 2, 2.0


@pytest.fixture(scope="module")
def env(comfy_root):
    import comfy.samplers
    import comfy_extras.nodes_custom_sampler as cs
    import folder_paths

    from fewstep.nodes import caches, embedded, embedded_model

    model = embedded_model.load_digits_model(embedded_model.RANDOM_NAME)
    return type("Env", (), dict(cs=cs, samplers=comfy.samplers, C=caches, E=embedded, EM=embedded_model,
                                model=model, folder_paths=folder_paths))


def _twin(env):
    """Core's diffusers DiT with the ComfyUI model's weights, as a CFG denoiser (scale CFG)."""
    from fewstep.core.guidance import CFGDenoiser
    from fewstep.core.models import DiscreteVP
    from fewstep.core.models.embedded import build_dit, dit_denoiser

    twin = build_dit()
    twin.load_state_dict(env.model.model.diffusion_model.dit.state_dict())
    twin.eval().requires_grad_(False)
    den = dit_denoiser(twin, DiscreteVP("v", "linear", 1e-4, 0.02, quantize=True))
    return den, CFGDenoiser(den, scale=CFG)


def _predictor(dim: int, seed: int = 0):
    """A predictor with every weight nonzero (an untrained one is exactly reuse; this one really predicts)."""
    from fewstep.core.cache.learned import ResidualPredictor

    pred = ResidualPredictor(dim, rank=8, mix=True)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in pred.parameters():
            p.copy_(0.02 * torch.randn(p.shape, generator=g))
    return pred.eval()


@pytest.fixture
def folder(env, tmp_path, monkeypatch):
    """A fresh learned-cache folder in place of models/fewstep_learned_caches holding a predictor of the model."""
    from fewstep.core.cache.learned import model_identity, save_predictor

    monkeypatch.setitem(env.folder_paths.folder_names_and_paths, env.C.LEARNED_FOLDER, ([str(tmp_path)],
                                                                                       {".safetensors"}))
    den, _ = _twin(env)
    pred = _predictor(int(den.model.inner_dim))
    save_predictor(tmp_path / "digits.safetensors", pred, model_identity(den),
                   {"skip_steps": SKIP, "head_blocks": 1, "tail_blocks": 0})
    return tmp_path


def _comfy_sample(env, model):
    from fewstep.nodes.samplers import FewstepSamplerTeacher

    pos, neg = env.E.FewstepDigitsClassCondition.execute(3)
    latent = {"samples": env.EM.empty_latent(BATCH)}
    sigmas = env.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "karras", STEPS)
    guider = env.cs.CFGGuider.execute(model, pos, neg, CFG)[0]
    return env.cs.SamplerCustomAdvanced.execute(env.cs.RandomNoise.execute(SEED)[0], guider,
                                                FewstepSamplerTeacher.execute("euler")[0], sigmas,
                                                latent)[0]["samples"], sigmas


def _stats(model):
    from fewstep.nodes.cache_wrappers import BLOCK_KEY

    return model.model_options["transformer_options"][BLOCK_KEY].last_stats


def test_node_sample_equals_cores_learned_cache_sample(env, folder):
    from fewstep.core.cache import apply_cache
    from fewstep.core.cache.learned import LearnedCache
    from fewstep.core.sampling import get_sampler

    patched = env.C.FewstepLearnedCache.execute(env.model, "digits.safetensors", "auto")[0]
    got, sigmas = _comfy_sample(env, patched)
    den, cfg = _twin(env)
    cache = LearnedCache.load(folder / "digits.safetensors", den)
    noise = torch.randn(BATCH, 1, 16, 16, generator=torch.manual_seed(SEED))
    with apply_cache(cfg, cache):
        ref = get_sampler("euler")(cfg, noise * (1 + sigmas[0] ** 2) ** 0.5, sigmas,
                                   extra_args={"class_labels": torch.full((BATCH,), 3)}, disable=True)
    st = _stats(patched)
    n_blocks = len(den.model.transformer_blocks)
    assert st["skipped"] == cache.stats["skipped"] == len(SKIP)  # cond + uncond in one batch: one key
    assert st["blocks_skipped"] == cache.stats["blocks_skipped"] == len(SKIP) * (n_blocks - 1)
    assert st["blocks_run"] == cache.stats["blocks_run"]
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    # the predictor matters: plain reuse on the same schedule gives another sample
    with apply_cache(cfg, LearnedCache(type(cache.predictor)(cache.predictor.dim, 0, False), SKIP)):
        reuse = get_sampler("euler")(cfg, noise * (1 + sigmas[0] ** 2) ** 0.5, sigmas,
                                     extra_args={"class_labels": torch.full((BATCH,), 3)}, disable=True)
    assert (reuse - got).abs().max() > 1e-3


def test_state_is_per_run_and_per_clone(env, folder):
    a = env.C.FewstepLearnedCache.execute(env.model, "digits.safetensors", "auto")[0]
    b = env.C.FewstepLearnedCache.execute(env.model, "digits.safetensors", "2")[0]
    first, _ = _comfy_sample(env, a)
    other, _ = _comfy_sample(env, b)
    again, _ = _comfy_sample(env, a)
    torch.testing.assert_close(first, again, rtol=0, atol=0)  # nothing of run 1 survives into run 2
    assert _stats(a)["skipped"] == len(SKIP) and _stats(b)["skipped"] == 1
    assert (first - other).abs().max() > 1e-4
    assert len(a.model_options["transformer_options"][env.C.BLOCK_KEY].history) == 2


def test_predictor_of_other_weights_is_refused_with_both_fingerprints(env, folder):
    from fewstep.core.cache.learned import read_header
    from fewstep.nodes.cache_store import learned_identity

    teacher = env.EM.load_digits_model(env.EM.TEACHER_NAME)
    with pytest.raises(ValueError) as e:
        env.C.FewstepLearnedCache.execute(teacher, "digits.safetensors", "auto")
    msg = str(e.value)
    assert "FewstepLearnedCache" in msg
    assert read_header(folder / "digits.safetensors")["identity"]["weights_hash"] in msg
    assert learned_identity(teacher)["weights_hash"] in msg
    # a weight patch (LoRA-style) changes the weights too
    lora = env.model.clone()
    key = next(k for k in env.model.model.state_dict() if k.endswith("weight") and "transformer_blocks.0" in k)
    lora.add_patches({key: (torch.full(env.model.model.state_dict()[key].shape, 0.01),)}, 0.5)
    with pytest.raises(ValueError, match="trained for"):
        env.C.FewstepLearnedCache.execute(lora, "digits.safetensors", "auto")


@pytest.mark.parametrize("name, skip, match", [("../digits.safetensors", "auto", "only files inside"),
                                               ("missing.safetensors", "auto", "only files inside"),
                                               ("digits.safetensors", "0,2", "call indices >= 1"),
                                               ("digits.safetensors", "one", "comma-separated")])
def test_bad_inputs_are_refused(env, folder, name, skip, match):
    with pytest.raises(ValueError, match=match):
        env.C.FewstepLearnedCache.execute(env.model, name, skip)


# ----------------------------------------------------------------------------------------------- plan files
PLAN = {1: 5, 2: 2, 4: 3}


@pytest.fixture
def plan_file(env, folder):
    """A learned-cache plan of the model (``save_plan``) beside the predictor, every predictor weight nonzero."""
    from fewstep.core.cache.learned import LearnedPlanCache, model_identity, save_plan

    den, _ = _twin(env)
    dim = int(den.model.inner_dim)
    cache = LearnedPlanCache(PLAN, {k: _predictor(dim, seed=k) for k in PLAN}, head_blocks=0)
    save_plan(folder / "plan.safetensors", cache, model_identity(den))
    return folder / "plan.safetensors"


def _core_sample(env, cfg, cache, sigmas):
    from fewstep.core.cache import apply_cache
    from fewstep.core.sampling import get_sampler

    noise = torch.randn(BATCH, 1, 16, 16, generator=torch.manual_seed(SEED))
    with apply_cache(cfg, cache):
        return get_sampler("euler")(cfg, noise * (1 + sigmas[0] ** 2) ** 0.5, sigmas,
                                    extra_args={"class_labels": torch.full((BATCH,), 3)}, disable=True)


def test_plan_node_sample_equals_cores_plan_cache_sample(env, plan_file):
    from fewstep.core.cache.learned import LearnedPlanCache, load_plan

    patched = env.C.FewstepLearnedCache.execute(env.model, "plan.safetensors", "auto")[0]
    got, sigmas = _comfy_sample(env, patched)
    den, cfg = _twin(env)
    cache = load_plan(plan_file, den)  # core's own fingerprint check (config + weights)
    ref = _core_sample(env, cfg, cache, sigmas)
    st = _stats(patched)
    skipped = sum(PLAN.values())
    assert st["skipped"] == cache.stats["skipped"] == len(PLAN)  # cond + uncond in one batch: one key
    assert st["blocks_skipped"] == cache.stats["blocks_skipped"] == skipped
    assert st["blocks_run"] == cache.stats["blocks_run"] == STEPS * len(den.model.transformer_blocks) - skipped
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    # the predictors matter: plain reuse on the same plan gives another sample
    reuse = _core_sample(env, cfg, LearnedPlanCache(PLAN), sigmas)
    assert (reuse - got).abs().max() > 1e-3


def test_plan_state_is_per_run_and_per_clone(env, plan_file):
    a = env.C.FewstepLearnedCache.execute(env.model, "plan.safetensors", "auto")[0]
    b = env.C.FewstepLearnedCache.execute(env.model, "digits.safetensors", "auto")[0]
    first, _ = _comfy_sample(env, a)
    other, _ = _comfy_sample(env, b)
    again, _ = _comfy_sample(env, a)
    torch.testing.assert_close(first, again, rtol=0, atol=0)  # nothing of run 1 survives into run 2
    hist = a.model_options["transformer_options"][env.C.BLOCK_KEY].history
    assert len(hist) == 2 and hist[0]["skipped"] == hist[1]["skipped"] == len(PLAN)
    assert hist[0]["runs"] == hist[1]["runs"] == 1  # a fresh core cache per run
    assert (first - other).abs().max() > 1e-4


def test_plan_state_is_per_guidance_branch(env, plan_file):
    """cond and uncond in separate model calls (ComfyUI splits a batch that does not fit): each branch keeps its own
    reference, so the sample equals the one-batch run's."""

    patched = env.C.FewstepLearnedCache.execute(env.model, "plan.safetensors", "auto")[0]
    together, _ = _comfy_sample(env, patched)
    split = patched.clone()

    def one_branch_per_call(apply_model, args):  # a model-function wrapper that runs each branch on its own
        x, t, c, cou = args["input"], args["timestep"], args["c"], args["cond_or_uncond"]
        outs = []
        for i, b in enumerate(cou):
            n = x.shape[0] // len(cou)
            sl = slice(i * n, (i + 1) * n)
            ci = {k: (v[sl] if isinstance(v, torch.Tensor) and v.shape[:1] == x.shape[:1] else v)
                  for k, v in c.items()}
            ci["transformer_options"] = {**c.get("transformer_options", {}), "cond_or_uncond": [b]}
            outs.append(apply_model(x[sl], t[sl], **ci))
        return torch.cat(outs)

    split.set_model_unet_function_wrapper(one_branch_per_call)
    apart, _ = _comfy_sample(env, split)
    st = _stats(split)
    assert st["skipped"] == 2 * len(PLAN)  # one skip per branch and planned call
    torch.testing.assert_close(apart, together, rtol=1e-4, atol=1e-4)


def test_plan_of_other_weights_is_refused_with_both_fingerprints(env, plan_file):
    from fewstep.core.cache.learned import read_header
    from fewstep.nodes.cache_store import learned_identity

    teacher = env.EM.load_digits_model(env.EM.TEACHER_NAME)
    with pytest.raises(ValueError) as e:
        env.C.FewstepLearnedCache.execute(teacher, "plan.safetensors", "auto")
    msg = str(e.value)
    assert "FewstepLearnedCache" in msg and "plan" in msg
    assert read_header(plan_file, "fewstep-learned-cache-plan/1")["identity"]["weights_hash"] in msg
    assert learned_identity(teacher)["weights_hash"] in msg


def test_plan_file_takes_no_skip_steps(env, plan_file):
    with pytest.raises(ValueError, match="set skip_steps to 'auto'"):
        env.C.FewstepLearnedCache.execute(env.model, "plan.safetensors", "1,3")


def test_plan_past_the_models_blocks_is_refused(env, folder):
    from fewstep.core.cache.learned import LearnedPlanCache, model_identity, save_plan

    den, _ = _twin(env)
    save_plan(folder / "long.safetensors", LearnedPlanCache({1: 9}), model_identity(den))
    with pytest.raises(ValueError, match="FewstepLearnedCache: plan .* skips past the model's 5 blocks"):
        env.C.FewstepLearnedCache.execute(env.model, "long.safetensors", "auto")
