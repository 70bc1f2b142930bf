"""The sparse-attention node (nodes/attention.py) in-process with a real ComfyUI (0.3.75 or 0.33.0): on tiny
random-weight SD1.5 / SDXL / Flux / SD3 / Wan 2.1 models (on 0.33.0 also the 2026 families of test_nodes_arch.py)
and the embedded digits DiT, sampled through CFGGuider ->
SamplerCustomAdvanced. The override must be called, a full mask must reproduce the unpatched model, a sparse mask
must equal dense masked attention on the very q/k/v the model produced, and chaining / bad inputs behave."""

from __future__ import annotations

import pytest
import torch
from test_nodes_arch import ARCHS as ARCH_MATRIX
from test_nodes_arch import TIMESTEPS

pytestmark = [pytest.mark.comfy, pytest.mark.usefixtures("one_thread")]

ARCHS = ARCH_MATRIX  # classic architectures; on ComfyUI 0.33.0 also the 2026 families (test_nodes_arch.py)
KEY = "optimized_attention_override"
#: 2026 families whose text refiner runs self-attention over the text tokens alone (no token grid): top_k applies
#: (those calls are sparse over the sequence), the sliding tile is refused with a message naming the model class
TEXT_SELF_ATTENTION = {"lumina2": "NextDiT", "hunyuan15": "HunyuanVideo"}
#: small blocks: the tiny models have 16 to 64 tokens per attention call
SETTINGS = dict(mass=0.9, block_size=4, dense_first_percent=0.0, self_attention_only=True, backend="reference")


@pytest.fixture(scope="module")
def env(comfy_root):
    import comfy_extras.nodes_custom_sampler as cs
    import comfy_tiny_models as tiny

    from fewstep.nodes import attention, embedded, embedded_model, samplers, schedules

    models = {arch: tiny.tiny_model(arch) for arch in ARCHS}
    digits = embedded.FewstepDigitsModelLoader.execute(embedded_model.RANDOM_NAME)[0]
    return type("Env", (), dict(cs=cs, tiny=tiny, A=attention, E=embedded, S=samplers, Sch=schedules,
                                models=models, digits=digits))


def _sample(env, arch: str, model, cfg: float = 2.0, seed: int = 0):
    if arch == "digits":
        pos, neg = env.E.FewstepDigitsClassCondition.execute(3)
        latent = env.E.FewstepDigitsEmptyLatent.execute(2)[0]
        sigmas = env.Sch.FewstepTimestepSchedule.execute(model, "999,749,499,249", "timestep")[0]
    else:
        pos, neg, latent = env.tiny.tiny_inputs(arch)
        sigmas = env.Sch.FewstepTimestepSchedule.execute(model, TIMESTEPS[arch], "timestep")[0]
    guider = env.cs.CFGGuider.execute(model, pos, neg, cfg)[0]
    noise = env.cs.RandomNoise.execute(seed)[0]
    sampler = env.S.FewstepSamplerTeacher.execute("euler")[0]
    return env.cs.SamplerCustomAdvanced.execute(noise, guider, sampler, sigmas, latent)[0]["samples"]


def _model(env, arch):
    return env.digits if arch == "digits" else env.models[arch]


def _patch(env, model, pattern="top_k", density=0.5, **kw):
    settings = {**SETTINGS, **kw}
    patched = env.A.FewstepSparseAttention.execute(model, pattern, density, settings["mass"], settings["block_size"],
                                                   settings["dense_first_percent"],
                                                   settings["self_attention_only"], settings["backend"])[0]
    return patched, patched.model_options["transformer_options"][KEY]


def _recording(model, record: list):
    """A clone with a pass-through override recording (function name, args, kwargs, output) of every call."""
    def previous(func, *args, **kwargs):
        out = func(*args, **kwargs)
        kept = {k: v for k, v in kwargs.items() if k != "_inside_attn_wrapper"}
        kept["transformer_options"] = dict(kwargs.get("transformer_options") or {})  # UNets update it per level
        record.append((getattr(func, "__name__", ""), args, kept, out))
        return out

    m = model.clone()
    m.model_options.setdefault("transformer_options", {})[KEY] = previous
    return m


def _reference(env, override, args, kwargs):
    """Dense masked attention (kernels.reference) on the call's q/k/v with the pattern's mask, in ComfyUI's layout."""
    from fewstep.core.attention import pattern_mask
    from fewstep.kernels.reference import dense_masked_attention

    names = ("q", "k", "v", "heads")
    call = {**dict(zip(names, args)), **kwargs}
    q, k, v, heads = call["q"], call["k"], call["v"], call["heads"]
    if not call.get("skip_reshape"):
        q, k, v = (t.view(t.shape[0], t.shape[1], heads, -1).transpose(1, 2) for t in (q, k, v))
    layout = override.layout(q.shape[2], call["transformer_options"])
    pattern = override.pattern_for(layout)
    perm, block_mask = pattern_mask(q, k, pattern, layout)
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel())
    token_mask = block_mask.to_dense()[:, :, inv][:, :, :, inv]  # back to the model's token order
    out = dense_masked_attention(q, k, v, token_mask)
    dense = dense_masked_attention(q, k, v, None)
    if not call.get("skip_output_reshape"):
        out, dense = (t.transpose(1, 2).reshape(t.shape[0], t.shape[2], -1) for t in (out, dense))
    return out, dense, block_mask.density()


# --------------------------------------------------------------------------------------------------- tests


def test_node_schema(env):
    schema = env.A.FewstepSparseAttention.GET_SCHEMA()
    assert schema.node_id.startswith("Fewstep") and schema.category == "fewstep/attention"
    assert all(inp.tooltip for inp in schema.inputs)
    assert env.A.NODES == [env.A.FewstepSparseAttention]


@pytest.mark.parametrize("pattern", ["top_k", "sliding_tile"])
@pytest.mark.parametrize("arch", ARCHS + ("digits",))
def test_override_is_called_on_each_architecture(env, arch, pattern):
    model = _model(env, arch)
    ref = _sample(env, arch, model)
    patched, override = _patch(env, model, pattern, 0.5)
    if arch in TEXT_SELF_ATTENTION and pattern == "sliding_tile":
        with pytest.raises(ValueError, match=rf"token grid of {TEXT_SELF_ATTENTION[arch]}'s attention over "
                                             rf"{env.tiny.TOKENS} tokens .* Choose the pattern 'top_k'"):
            _sample(env, arch, patched)
        return
    out = _sample(env, arch, patched)
    assert torch.isfinite(out).all() and out.shape == ref.shape
    st = override.stats
    assert st["sparse"] > 0 and st["calls"] >= st["sparse"], st
    if arch in TEXT_SELF_ATTENTION:  # only the text refiner's calls have no grid
        assert 0 < st["no_grid"] < st["sparse"], st
    else:
        assert st["no_grid"] == 0  # the token grid was found from the latent / feature map
    assert 0.0 < override.mean_density < 1.0
    assert not torch.allclose(out, ref, atol=1e-6)  # sparse attention changed the result
    if arch in ("sd15", "sdxl", "wan21"):  # cross-attention to the text stays dense
        assert st["cross"] > 0
    assert KEY not in model.model_options.get("transformer_options", {})  # the input MODEL is untouched
    torch.testing.assert_close(_sample(env, arch, model), ref, rtol=0, atol=0)


@pytest.mark.parametrize("pattern", ["top_k", "sliding_tile"])
@pytest.mark.parametrize("arch", ARCHS + ("digits",))
def test_full_density_reproduces_the_unpatched_model(env, arch, pattern):
    model = _model(env, arch)
    ref = _sample(env, arch, model)
    patched, override = _patch(env, model, pattern, 1.0)
    if arch in TEXT_SELF_ATTENTION and pattern == "sliding_tile":
        with pytest.raises(ValueError, match=f"token grid of {TEXT_SELF_ATTENTION[arch]}'s attention"):
            _sample(env, arch, patched)
        return
    out = _sample(env, arch, patched)
    assert override.stats["sparse"] > 0 and override.mean_density == pytest.approx(1.0)
    # float32 rounding only (the tiny random models' samples reach magnitudes of ~100)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("pattern,density", [("top_k", 0.4), ("sliding_tile", 0.4), ("top_k_mass", 0.4)])
@pytest.mark.parametrize("arch", ("digits", "flux", "sd15", "wan21"))
def test_sparse_call_equals_dense_masked_reference_on_the_same_qkv(env, arch, pattern, density):
    """A pass-through override already on the MODEL is chained: it sees every call, and for the sparse ones it is
    handed the sparse function; its records give the model's own q/k/v to check each call against the reference."""
    model = _model(env, arch)
    plain, _ = _patch(env, model, pattern, density, mass=density)
    expected = _sample(env, arch, plain)
    record: list = []
    patched, override = _patch(env, _recording(model, record), pattern, density, mass=density)
    out = _sample(env, arch, patched)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)  # the chained pass-through changes nothing
    sparse_calls = [r for r in record if r[0] == "sparse_self_attention"]
    assert len(sparse_calls) == override.stats["sparse"] > 0
    assert len(record) == override.stats["calls"]  # the previous override saw every call
    differs = 0
    for _, args, kwargs, got in sparse_calls:
        ref, dense, mask_density = _reference(env, override, args, kwargs)
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
        differs += mask_density < 1 and not torch.allclose(got, dense, atol=1e-4)
    assert differs > 0  # some masks really dropped blocks and changed the attention output


def test_a_previous_override_that_ignores_its_function_is_reported(env, caplog):
    calls: list = []

    def replacing(func, *args, **kwargs):  # e.g. another attention backend: computes attention itself
        import comfy.ldm.modules.attention as attention

        calls.append(1)
        return attention.attention_pytorch(*args, **kwargs)

    m = env.digits.clone()
    m.model_options.setdefault("transformer_options", {})[KEY] = replacing
    ref = _sample(env, "digits", m)
    patched, override = _patch(env, m, "top_k", 0.3)
    with caplog.at_level("INFO", logger="fewstep"):
        out = _sample(env, "digits", patched)
    assert override.stats["bypassed"] == override.stats["calls"] > 0 and override.stats["sparse"] == 0
    assert "instead of calling the function it was handed" in caplog.text
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)


def test_dense_first_steps_and_state_reset_per_run(env):
    patched, override = _patch(env, env.digits, "top_k", 0.5, dense_first_percent=50.0)
    _sample(env, "digits", patched)
    first = dict(override.stats)
    # 4 steps, 5 attention layers, cond + uncond batched into one call: 2 dense steps, 2 sparse steps
    assert first["calls"] == 20 and first["dense_step"] == 10 and first["sparse"] == 10
    _sample(env, "digits", patched, seed=1)
    assert override.stats["calls"] == 20  # reset at the start of the run, not accumulated
    assert override.dense_steps(4) == 2 and override.dense_steps(3) == 2 and override.dense_steps(10) == 5


def test_cross_attention_follows_self_attention_only(env):
    model = env.models["sd15"]
    patched, override = _patch(env, model, "top_k", 0.5)
    _sample(env, "sd15", patched)
    assert override.stats["cross"] > 0 and override.stats["sparse"] + override.stats["cross"] == \
        override.stats["calls"]
    patched, override = _patch(env, model, "top_k", 0.5, self_attention_only=False)
    out = _sample(env, "sd15", patched)
    assert torch.isfinite(out).all()
    assert override.stats["cross"] == 0 and override.stats["sparse"] == override.stats["calls"]


def test_bad_inputs_give_clear_errors(env):
    for density in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match=r"density must be in \(0, 1\]"):
            _patch(env, env.digits, "top_k", density)
    with pytest.raises(ValueError, match=r"mass must be in \(0, 1\]"):
        _patch(env, env.digits, "top_k_mass", 0.5, mass=0.0)
    with pytest.raises(ValueError, match="unknown pattern 'diagonal'"):
        _patch(env, env.digits, "diagonal", 0.5)
    with pytest.raises(ValueError, match="unknown backend 'cuda'"):
        _patch(env, env.digits, "top_k", 0.5, backend="cuda")
    # no latent shape, no feature-map shape: the sliding tile cannot know the grid and says what to use instead
    override = env.A.SparseAttentionOverride("sliding_tile", 0.5, block_size=4, patch_size=2, model_name="Net")
    q = torch.randn(1, 20, 8)
    with pytest.raises(ValueError, match="cannot tell the token grid of Net's attention over 20 tokens.*'top_k'"):
        override(lambda *a, **k: q, q, q, q, 2, transformer_options={})
    topk = env.A.SparseAttentionOverride("top_k", 0.5, block_size=4, patch_size=2)
    assert topk(lambda *a, **k: q, q, q, q, 2, transformer_options={}).shape == q.shape
    assert topk.stats["no_grid"] == 1 and topk.stats["sparse"] == 1


def test_layout_comes_from_the_latent_and_patch_size(env):
    from fewstep.core.attention import TokenLayout, latent_token_grid

    assert latent_token_grid((8, 8), 2) == (4, 4)
    assert latent_token_grid((7, 9), 2) == (4, 5)  # DiTs pad to the patch
    assert latent_token_grid((2, 8, 8), (1, 2, 2)) == (2, 4, 4)
    assert latent_token_grid((8, 8), (1, 2, 2)) == (4, 4)  # the last dims of a longer patch
    with pytest.raises(ValueError):
        latent_token_grid((0, 8), 2)
    flux = env.A.SparseAttentionOverride(patch_size=2)
    assert flux.layout(23, {env.A.LATENT_SHAPE_KEY: (2, 16, 8, 8)}) == TokenLayout((4, 4), 7, True)
    assert flux.layout(10, {env.A.LATENT_SHAPE_KEY: (2, 16, 8, 8)}) is None
    unet = env.A.SparseAttentionOverride(patch_size=None)
    assert unet.layout(16, {"activations_shape": [2, 64, 4, 4], env.A.LATENT_SHAPE_KEY: (2, 4, 8, 8)}) == \
        TokenLayout((4, 4))
    assert unet.layout(16, {env.A.LATENT_SHAPE_KEY: (2, 4, 8, 8)}) is None
