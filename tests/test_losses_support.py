"""Guidance adapters, per-sample randomness, input checks, LoRA/DARE export format and teacher trajectories."""

import json

import pytest
import torch
from safetensors.torch import load_file

from fewstep.core.distill import (
    check_guidance_range,
    check_null_condition,
    check_same_output_shape,
    rand_per_sample,
    randint_per_sample,
    randn_per_sample,
)
from fewstep.core.guidance.adapters import (
    AdaptedDenoiser,
    GuidanceAdapter,
    base_config_hash,
    guidance_scale_embedding,
)
from fewstep.core.guidance.cfg import to_lcm_omega
from fewstep.core.models.embedded import TEACHER_CONFIG, build_dit, dit_denoiser
from fewstep.core.models.lora_format import comfy_lora_state_dict, dare, dare_lora, merge_lora
from fewstep.core.trajectories import generate_trajectories, load_trajectories

torch.set_num_threads(1)
TINY = dict(TEACHER_CONFIG, num_layers=1, num_attention_heads=2, attention_head_dim=8, sample_size=8)
SHAPE = (1, 8, 8)


def tiny_teacher(seed=0, **over):
    torch.manual_seed(seed)
    return dit_denoiser(build_dit(dict(TINY, **over)).eval().requires_grad_(False), name="tiny-dit")


# ----------------------------------------------------------------------------------- per-sample RNG
def test_per_sample_randomness_does_not_depend_on_the_split():
    ids = torch.arange(10, 18)
    full = randn_per_sample(ids, (2, 3), "noise", seed=3)
    parts = torch.cat([randn_per_sample(ids[:3], (2, 3), "noise", 3), randn_per_sample(ids[3:], (2, 3), "noise", 3)])
    assert torch.equal(full, parts)
    assert not torch.equal(full, randn_per_sample(ids, (2, 3), "other", 3))
    assert not torch.equal(full, randn_per_sample(ids, (2, 3), "noise", 4))
    u = rand_per_sample(torch.arange(4000), 1, "u")
    assert 0.0 <= float(u.min()) and float(u.max()) < 1.0 and abs(float(u.mean()) - 0.5) < 0.02
    k = randint_per_sample(torch.arange(5000), 10, "k")
    assert set(k.tolist()) == set(range(10))
    assert float(randn_per_sample(torch.arange(2000), (1,), "n").std()) == pytest.approx(1.0, abs=0.05)


# -------------------------------------------------------------------------------------------- checks
def test_guidance_range_checks():
    assert check_guidance_range(2.0) == (2.0, 2.0)
    assert check_guidance_range((1.0, 4.0)) == (1.0, 4.0)
    for bad in [(4.0, 2.0), [], (1.0, float("nan"))]:
        with pytest.raises(ValueError, match="range"):
            check_guidance_range(bad)


def test_null_class_and_output_shape_checks():
    teacher = tiny_teacher()
    check_null_condition(teacher, 10, SHAPE)  # diffusers' DiT has a row for the null class
    no_null = tiny_teacher()
    emb = no_null.model.transformer_blocks[0].norm1.emb.class_embedder
    emb.embedding_table = torch.nn.Embedding(10, emb.embedding_table.embedding_dim)
    with pytest.raises(ValueError, match="no null class"):
        check_null_condition(no_null, 10, SHAPE)
    with pytest.raises(ValueError, match="null condition"):
        check_null_condition(teacher, None, SHAPE)
    cond = {"class_labels": torch.zeros(1, dtype=torch.long)}
    wide = tiny_teacher(out_channels=2, in_channels=2)
    with pytest.raises(ValueError, match="(?i)teacher and student"):
        check_same_output_shape(teacher, wide, SHAPE, cond)

    class Cropper(torch.nn.Module):  # a student that is not a fewstep Denoiser and returns another shape
        model_sampling = teacher.model_sampling

        def forward(self, x, sigma, **cond):
            return x[..., :4, :4]

    with pytest.raises(ValueError, match="output shapes differ"):
        check_same_output_shape(teacher, Cropper(), SHAPE, cond)


# ----------------------------------------------------------------------------------- guidance adapter
def test_guidance_scale_embedding_matches_lcm():
    from diffusers.models.embeddings import get_timestep_embedding

    w = torch.tensor([1.0, 2.0, 7.5])
    # LCM's w_embedding (diffusers LatentConsistencyModelPipeline.get_guidance_scale_embedding) of omega = w - 1
    ref = get_timestep_embedding(to_lcm_omega(w) * 1000.0, 32, flip_sin_to_cos=False, downscale_freq_shift=1)
    torch.testing.assert_close(guidance_scale_embedding(w, 32), ref, atol=5e-4, rtol=0)  # fp32 sin of ~7e3
    assert guidance_scale_embedding(w, 33).shape == (3, 33)


def test_adapter_is_a_removable_patch_with_its_own_state():
    teacher = tiny_teacher()
    x, s, y = torch.randn(2, *SHAPE), torch.tensor([3.0, 0.5]), torch.tensor([1, 2])
    before = {k: v.clone() for k, v in teacher.model.state_dict().items()}
    base_out = teacher(x, s, class_labels=y)
    ad = GuidanceAdapter(teacher.model, rank=2, base_name="tiny")
    with torch.no_grad():
        for layer in ad.layers:
            layer.up.normal_()
    adapted = AdaptedDenoiser(teacher, ad)
    torch.testing.assert_close(teacher(x, s, class_labels=y), base_out)  # inactive outside scale()
    torch.testing.assert_close(adapted(x, s, guidance_scale=1.0, class_labels=y), base_out)  # zero at w = 1
    assert not torch.allclose(adapted(x, s, guidance_scale=3.0, class_labels=y), base_out)
    per_sample = adapted(x, s, guidance_scale=torch.tensor([1.0, 3.0]), class_labels=y)
    torch.testing.assert_close(per_sample[0], base_out[0])
    assert set(ad.state_dict()) == {k for k in ad.state_dict() if k.startswith(("layers.", "gate."))}
    ad.detach()
    torch.testing.assert_close(teacher(x, s, class_labels=y), base_out)
    assert all(torch.equal(before[k], v) for k, v in teacher.model.state_dict().items())
    with pytest.raises(ValueError, match="rank 17 is larger than layer"):
        GuidanceAdapter(teacher.model, rank=17)


def test_adapter_save_load_and_wrong_base(tmp_path):
    teacher = tiny_teacher()
    ad = GuidanceAdapter(teacher.model, rank=2, base_name="tiny-dit", scale_range=(1.0, 5.0))
    with torch.no_grad():
        for p in ad.parameters():
            p.add_(0.01 * torch.randn_like(p))
    path = ad.save(tmp_path / "a.safetensors")
    assert all(k.startswith(("layers.", "gate.")) for k in load_file(str(path)))
    meta = json.loads(path.with_suffix(".json").read_text())
    assert meta["base_name"] == "tiny-dit" and meta["base_config_hash"] == base_config_hash(teacher.model)
    ad.detach()
    loaded = GuidanceAdapter.load(path, teacher.model)
    for k, v in ad.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v)
    other = tiny_teacher(num_layers=2)
    with pytest.raises(ValueError, match="trained for base model 'tiny-dit'"):
        GuidanceAdapter.load(path, other.model)


def test_adapter_is_about_two_percent_of_the_teacher():
    net = build_dit(TEACHER_CONFIG)
    ad = GuidanceAdapter(net, rank=2, embed_dim=32, hidden=32, attach=False)
    assert 0.01 < ad.parameter_fraction() < 0.03


# ------------------------------------------------------------------------------------- LoRA / DARE
def test_merge_lora_and_comfy_keys():
    w, down, up = torch.randn(6, 4), torch.randn(2, 4), torch.randn(6, 2)
    torch.testing.assert_close(merge_lora(w, down, up, alpha=1.0), w + 0.5 * up @ down)
    sd = comfy_lora_state_dict({"blocks.0.attn.to_q": (down, up, 1.0)})
    assert set(sd) == {"diffusion_model.blocks.0.attn.to_q.lora_down.weight",
                       "diffusion_model.blocks.0.attn.to_q.lora_up.weight", "diffusion_model.blocks.0.attn.to_q.alpha"}


def test_dare_keeps_the_expected_delta():
    delta = torch.randn(64, 64)
    out = dare(delta, 0.9, seed=1)
    assert float((out == 0).float().mean()) == pytest.approx(0.9, abs=0.02)
    kept = out != 0
    torch.testing.assert_close(out[kept], delta[kept] / 0.1)
    mean = torch.stack([dare(delta, 0.5, seed=s) for s in range(400)]).mean(0)
    assert float((mean - delta).abs().mean()) < 0.1 * float(delta.abs().mean())
    assert torch.equal(dare(delta, 0.5, seed=3), dare(delta, 0.5, seed=3))
    with pytest.raises(ValueError):
        dare(delta, 1.0)


def test_dare_lora_drops_rank_components_unbiasedly():
    down, up = torch.randn(16, 8), torch.randn(10, 16)
    full = merge_lora(torch.zeros(10, 8), down, up, 4.0)
    d2, u2, a2 = dare_lora(down, up, 4.0, 0.5, seed=2)
    assert d2.shape[0] < 16 and d2.shape[0] == u2.shape[1]
    avg = torch.stack([merge_lora(torch.zeros(10, 8), *dare_lora(down, up, 4.0, 0.5, seed=s)) for s in range(800)])
    assert float((avg.mean(0) - full).abs().mean()) < 0.1 * float(full.abs().mean())


def test_comfy_lora_loader_reads_the_export(comfy_root):
    """ComfyUI's own loader (comfy/lora.py load_lora + weight_adapter) merges our file to our merged weight."""
    import comfy.lora

    w, down, up = torch.randn(6, 4), torch.randn(2, 4), torch.randn(6, 2)
    sd = comfy_lora_state_dict({"blocks.0.proj": (down, up, 3.0)})
    key_map = {"diffusion_model.blocks.0.proj": "diffusion_model.blocks.0.proj.weight"}
    patches = comfy.lora.load_lora(sd, key_map)
    assert set(patches) == {"diffusion_model.blocks.0.proj.weight"}
    merged = comfy.lora.calculate_weight([(1.0, patches["diffusion_model.blocks.0.proj.weight"], 1.0, None, None)],
                                         w.clone(), "diffusion_model.blocks.0.proj.weight")
    torch.testing.assert_close(merged, merge_lora(w, down, up, 3.0))


# -------------------------------------------------------------------------------------- trajectories
def test_trajectories_resumable_and_checked(tmp_path):
    teacher = tiny_teacher()
    kw = dict(num_samples=10, sample_shape=SHAPE, guidance=(1.0, 3.0), steps=3, shard_size=4, batch_size=3,
              progress=False, seed=5)
    out = generate_trajectories(teacher, tmp_path / "t", **kw)
    tensors, manifest = load_trajectories(out)
    assert tensors["states"].shape == (10, 4, *SHAPE) and tensors["sigmas"].shape == (4,)
    torch.testing.assert_close(tensors["states"][:, -1], tensors["endpoint"])
    torch.testing.assert_close(tensors["states"][:, 0], tensors["start"])
    assert 1.0 <= float(tensors["guidance_scale"].min()) and float(tensors["guidance_scale"].max()) <= 3.0
    shard1 = load_file(str(out / "shard_00001.safetensors"))
    (out / "shard_00001.safetensors").unlink()
    with pytest.raises(ValueError, match="incomplete"):
        load_trajectories(out)
    generate_trajectories(teacher, out, **kw)  # resumes: only the missing shard
    again = load_file(str(out / "shard_00001.safetensors"))
    for k in shard1:
        assert torch.equal(shard1[k], again[k])
    # the data of a sample do not depend on shard or batch size
    other = generate_trajectories(teacher, tmp_path / "u", **{**kw, "shard_size": 10, "batch_size": 10})
    t2, _ = load_trajectories(other)
    torch.testing.assert_close(t2["endpoint"], tensors["endpoint"], atol=1e-5, rtol=1e-5)
    assert torch.equal(t2["cond"], tensors["cond"])
    with pytest.raises(ValueError, match="another configuration"):
        generate_trajectories(teacher, out, **{**kw, "steps": 4})
    with pytest.raises(ValueError, match="range"):
        generate_trajectories(teacher, tmp_path / "v", **{**kw, "guidance": (3.0, 1.0)})
