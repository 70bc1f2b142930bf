"""The guidance-adapter node (nodes/guidance.py) in-process with the real ComfyUI 0.3.75: the shipped AGD adapter on
the embedded digits teacher, sampled at cfg 1 through CFGGuider -> SamplerCustomAdvanced, must equal the core
``AdaptedDenoiser`` (diffusers teacher + adapter), leave the input MODEL untouched, draw the requested digit, and
refuse models it was not distilled from."""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.comfy, pytest.mark.usefixtures("one_thread")]

ADAPTER = "digits_agd_adapter.safetensors"
STEPS = "999,899,799,699,599,499,399,299,199,99"


@pytest.fixture(scope="module")
def env(comfy_root):
    import comfy_extras.nodes_custom_sampler as cs

    from fewstep.nodes import embedded, embedded_model, guidance, samplers, schedules

    teacher = embedded.FewstepDigitsModelLoader.execute(embedded_model.TEACHER_NAME)[0]
    return type("Env", (), dict(cs=cs, E=embedded, EM=embedded_model, G=guidance, S=samplers, Sch=schedules,
                                teacher=teacher))


def _sample(env, model, digit: int, cfg: float, batch: int = 4, seed: int = 0, sampler: str = "euler",
            steps: str = STEPS):
    pos, neg = env.E.FewstepDigitsClassCondition.execute(digit)
    latent = env.E.FewstepDigitsEmptyLatent.execute(batch)[0]
    sigmas = env.Sch.FewstepTimestepSchedule.execute(model, steps, "timestep")[0]
    guider = env.cs.CFGGuider.execute(model, pos, neg, cfg)[0]
    noise = env.cs.RandomNoise.execute(seed)[0]
    sampler_obj = env.S.FewstepSamplerTeacher.execute(sampler)[0]
    return env.cs.SamplerCustomAdvanced.execute(noise, guider, sampler_obj, sigmas, latent)[0]["samples"], sigmas


def _load(env, model, scale: float = 2.0, name: str = ADAPTER):
    return env.G.FewstepGuidanceAdapterLoader.execute(model, name, scale)[0]


def _hooks(module: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) for m in module.modules())


def test_node_schema_and_choices(env):
    schema = env.G.FewstepGuidanceAdapterLoader.GET_SCHEMA()
    assert schema.node_id.startswith("Fewstep") and schema.category == "fewstep/guidance"
    assert all(inp.tooltip for inp in schema.inputs)
    assert ADAPTER in env.G.available_adapters()
    assert ADAPTER not in env.EM.available_models()  # an adapter is not a model
    import folder_paths

    assert env.G.ADAPTER_FOLDER in folder_paths.folder_names_and_paths


@pytest.mark.parametrize("scale", [1.5, 3.0])
def test_cfg1_sampling_equals_the_core_adapted_denoiser(env, scale):
    """ComfyUI: teacher MODEL + adapter node at cfg 1. Core: the diffusers teacher + ``GuidanceAdapter.load`` in an
    ``AdaptedDenoiser``, same noise, sigmas and sampler (timesteps rounded as ComfyUI does)."""
    from fewstep.core.guidance import AdaptedDenoiser, GuidanceAdapter
    from fewstep.core.models.embedded import load_teacher
    from fewstep.core.sampling import get_sampler

    seed, batch, digit = 4, 4, 6
    got, sigmas = _sample(env, _load(env, env.teacher, scale), digit, 1.0, batch=batch, seed=seed)
    teacher = load_teacher()
    teacher.model_sampling.quantize = True
    adapter = GuidanceAdapter.load(env.EM.WEIGHTS_DIR / ADAPTER, teacher.model)
    core = AdaptedDenoiser(teacher, adapter, default_scale=scale)
    noise = torch.randn(batch, 1, 16, 16, generator=torch.manual_seed(seed))  # ComfyUI's RandomNoise
    x = noise * (1 + sigmas[0] ** 2) ** 0.5
    with torch.no_grad():
        ref = get_sampler("euler")(core, x, sigmas, extra_args={"class_labels": torch.full((batch,), digit)},
                                   disable=True)
    print(f"scale {scale}: max |ComfyUI - core| = {(got - ref).abs().max():.2e}")
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    plain, _ = _sample(env, env.teacher, digit, 1.0, batch=batch, seed=seed)
    assert (got - plain).abs().max() > 1e-2  # the adapter does guide


def test_input_model_is_unchanged_and_no_hooks_remain(env):
    base = env.G.adapter_base(env.teacher)
    state = {k: v.clone() for k, v in base.state_dict().items()}
    before, _ = _sample(env, env.teacher, 2, 1.0, seed=1)
    patched = _load(env, env.teacher, 2.5)
    adapted, _ = _sample(env, patched, 2, 1.0, seed=1)
    after, _ = _sample(env, env.teacher, 2, 1.0, seed=1)
    assert torch.equal(before, after) and not torch.equal(before, adapted)
    assert _hooks(base) == 0  # hooks only exist during a model call
    assert all(torch.equal(v, state[k]) for k, v in base.state_dict().items())
    assert not env.teacher.get_wrappers("apply_model", env.G.WRAPPER_KEY)
    assert len(patched.get_wrappers("apply_model", env.G.WRAPPER_KEY)) == 1
    # loading again onto the patched model replaces the adapter rather than stacking a second one
    twice = _load(env, patched, 2.5)
    assert len(twice.get_wrappers("apply_model", env.G.WRAPPER_KEY)) == 1
    again, _ = _sample(env, twice, 2, 1.0, seed=1)
    torch.testing.assert_close(again, adapted, rtol=0, atol=0)


def test_unconditional_entries_run_the_base_model(env):
    """At cfg != 1 ComfyUI batches cond and uncond: the adapter guides the cond entries, the uncond ones stay the
    plain model (scale 1)."""
    wrapper = env.G.FewstepGuidanceAdapterLoader.execute(env.teacher, ADAPTER, 3.0)[0].get_wrappers(
        "apply_model", env.G.WRAPPER_KEY)[0]
    net = env.teacher.model
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 1, 16, 16, generator=g) * 3
    t = torch.tensor([5.0, 5.0])
    ctx = torch.cat([env.EM.class_token(4), env.EM.class_token(4)])

    def run(cond_or_uncond):
        return wrapper(net._apply_model, x, t, None, ctx, None, {"cond_or_uncond": cond_or_uncond})

    plain = net._apply_model(x, t, None, ctx, None, {})
    torch.testing.assert_close(run([1]), plain, rtol=0, atol=0)
    guided = run([0])
    assert (guided - plain).abs().max() > 1e-3
    mixed = wrapper(net._apply_model, x, t, None, ctx, None, {"cond_or_uncond": [0, 1]})
    torch.testing.assert_close(mixed[:1], guided[:1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mixed[1:], plain[1:], rtol=1e-5, atol=1e-5)
    assert wrapper.scales(4, [0, 1]).tolist() == [3.0, 3.0, 1.0, 1.0]


def test_refuses_models_it_was_not_distilled_from(env, comfy_root):
    import comfy_tiny_models as tiny

    random_init = env.E.FewstepDigitsModelLoader.execute(env.EM.RANDOM_NAME)[0]
    with pytest.raises(ValueError) as err:
        _load(env, random_init)
    msg = str(err.value)
    assert "was trained for base model 'digits-dit-teacher'" in msg
    assert "the connected MODEL, DigitsDiTConfig / DigitsDiTNet" in msg and "weights fingerprint" in msg
    assert "model_name 'digits_dit_teacher'" in msg  # the fix
    with pytest.raises(ValueError, match=r"trained for base model 'digits-dit-teacher'.*SD15 / UNetModel"):
        _load(env, tiny.tiny_model("sd15"))
    with pytest.raises(ValueError, match="unknown guidance adapter 'nope.safetensors'"):
        _load(env, env.teacher, name="nope.safetensors")


def test_user_folder_adapters_are_offered(env, tmp_path, monkeypatch):
    import shutil

    import folder_paths

    env.G.register_adapter_folder()
    paths, exts = folder_paths.folder_names_and_paths[env.G.ADAPTER_FOLDER]
    monkeypatch.setitem(folder_paths.folder_names_and_paths, env.G.ADAPTER_FOLDER, ([str(tmp_path)], exts))
    shutil.copy(env.EM.WEIGHTS_DIR / ADAPTER, tmp_path / "my_adapter.safetensors")
    (tmp_path / "notes.txt").write_text("not an adapter")
    folder_paths.filename_list_cache.pop(env.G.ADAPTER_FOLDER, None)
    assert env.G.available_adapters() == [ADAPTER, "my_adapter.safetensors"]
    out, _ = _sample(env, _load(env, env.teacher, 2.0, "my_adapter.safetensors"), 1, 1.0, batch=1)
    ref, _ = _sample(env, _load(env, env.teacher, 2.0), 1, 1.0, batch=1)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    (tmp_path / "bad.safetensors").write_bytes(b"not safetensors")
    folder_paths.filename_list_cache.pop(env.G.ADAPTER_FOLDER, None)
    with pytest.raises(ValueError, match="bad.safetensors is not a fewstep guidance adapter"):
        _load(env, env.teacher, 2.0, "bad.safetensors")


def test_cfg1_with_the_adapter_draws_the_requested_digit(env):
    """The classifier recognises the requested digit in the adapter's one-pass-per-step samples (cfg 1)."""
    from fewstep.core.metrics import class_accuracy

    accs = {}
    for digit in (0, 3, 7):
        out, _ = _sample(env, _load(env, env.teacher, 2.0), digit, 1.0, batch=8, seed=digit, sampler="dpmpp_2m")
        accs[digit] = class_accuracy(out.clamp(-1, 1), torch.full((8,), digit))
    print("class accuracy at cfg 1 with the adapter (w=2):", accs)
    assert min(accs.values()) >= 0.75, accs
