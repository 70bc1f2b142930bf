"""Distillation on tiny but real diffusers architectures with text conditioning (issue 17, item 3).

SDXL-shaped UNet2DConditionModel (eps, discrete VP; pooled text + size ids through ``added_cond_kwargs``),
FluxTransformer2DModel, SD3Transformer2DModel and WanTransformer3DModel (flow matching), random-initialised
(``tests/real_archs.py``). Conditions are precomputed embeddings (a mapping of tensors, ``core.conditioning``):
drawn from a pool by the modules, stored per sample in trajectory shards; no class labels anywhere.
"""

from __future__ import annotations

import pytest
import real_archs as ra
import torch

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module", params=ra.ARCHS)
def arch(request):
    return request.param, ra.build(request.param)


def _sigmas(teacher):
    ms = teacher.model_sampling
    return torch.tensor([float(ms.sigma_max) * 0.5, float(ms.sigma_min) * 4 + 0.05])


def test_conditioning_reaches_the_network(arch):
    """Every embedding keyword changes the output (SDXL's pooled text and size ids included)."""
    from fewstep.core.conditioning import cond_index

    name, a = arch
    x = torch.randn(2, *a.shape, generator=torch.Generator().manual_seed(0))
    sig = _sigmas(a.teacher)
    c = cond_index(a.pool, torch.tensor([0, 1]))
    with torch.no_grad():
        base = a.teacher(x, sig, **c)
        assert torch.isfinite(base).all()
        for k in c:
            changed = {**c, k: c[k] + 1.0}
            diff = (a.teacher(x, sig, **changed) - base).abs().max()
            assert diff > 1e-6, f"{name}: changing {k} does not change the output"


def test_guided_denoise_with_null_embeddings(arch):
    """CFG with a mapping null equals ``uncond + w (cond - uncond)`` from two separate calls."""
    from fewstep.core.conditioning import cond_index, expand_null
    from fewstep.core.guidance.scaled import guided_denoise

    name, a = arch
    x = torch.randn(2, *a.shape, generator=torch.Generator().manual_seed(1))
    sig = _sigmas(a.teacher)
    c = cond_index(a.pool, torch.tensor([2, 3]))
    w = torch.tensor([1.5, 3.0])
    with torch.no_grad():
        guided = guided_denoise(a.teacher, x, sig, w, null=a.null, **c)
        cond = a.teacher(x, sig, **c)
        unc_kw = {**c, **expand_null(a.null, 2)}
        uncond = a.teacher(x, sig, **unc_kw)
    want = uncond + w.reshape(-1, *[1] * (x.ndim - 1)) * (cond - uncond)
    torch.testing.assert_close(guided, want, atol=1e-4, rtol=1e-4)  # batch 4 vs 2: float32 round-off
    assert (cond - uncond).abs().max() > 1e-6, f"{name}: the null embeddings give the conditional output"


def test_trajectories_store_the_embeddings(tmp_path):
    """Trajectory shards hold each sample's text embeddings (and its pool index); a resumed folder loads the same."""
    from fewstep.core.trajectories import generate_trajectories, load_trajectories

    a = ra.build("sdxl")
    out = generate_trajectories(a.teacher, tmp_path / "t", num_samples=6, sample_shape=a.shape, guidance=2.0,
                                steps=2, num_classes=None, cond_pool=a.pool, null=a.null, shard_size=4,
                                batch_size=4, progress=False)
    tensors, manifest = load_trajectories(out)
    cond, idx = tensors["cond"], tensors["cond_index"]
    assert set(cond) == set(a.pool) and len(idx) == 6
    for k, v in cond.items():
        torch.testing.assert_close(v, a.pool[k][idx])
    assert torch.isfinite(tensors["endpoint"]).all() and tensors["endpoint"].shape == (6, *a.shape)
    assert manifest["num_classes"] is None


def _params(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.named_parameters()}


def _moved(before: dict, module) -> float:
    return max(float((p.detach() - before[k]).abs().max()) for k, p in module.named_parameters() if k in before)


def _fit(module, batches: int):
    import distill_tiny

    t = distill_tiny.trainer(module, batches)
    t.fit(module)
    return {k: float(v) for k, v in t.logged_metrics.items()}


@pytest.mark.parametrize("method", ["dmd2", "reflow"])
def test_distil_real_architecture(arch, method, tmp_path):
    """DMD2 and reflow (on trajectory shards holding the embeddings) run a few steps on each architecture without
    class labels: finite losses, the student's parameters move, the teacher's do not."""
    from fewstep.callbacks import DMD2Distillation, ReflowDistillation
    from fewstep.core.trajectories import generate_trajectories

    name, a = arch
    teacher_before = _params(a.teacher)
    common = {"num_classes": None, "null": a.null, "batch_size": 2, "lr": 1e-3, "seed": 0}
    if method == "dmd2":
        module = DMD2Distillation(a.teacher, a.shape, guidance_scale=2.0, critic_ratio=1, cond_pool=a.pool, **common)
        batches, keys = 2, ("train/loss_g", "train/loss_c", "train/dmd")
    else:
        traj = generate_trajectories(a.teacher, tmp_path / name, num_samples=4, sample_shape=a.shape, guidance=2.0,
                                     steps=2, num_classes=None, cond_pool=a.pool, null=a.null, shard_size=4,
                                     batch_size=4, progress=False)
        module = ReflowDistillation(a.teacher, a.shape, traj, **common)
        batches, keys = 3, ("train/reflow",)
    student_before = _params(module.student)
    logs = _fit(module, batches)
    for k in keys:
        assert k in logs and torch.isfinite(torch.tensor(logs[k])), f"{name}/{method}: {k} = {logs.get(k)}"
    assert _moved(student_before, module.student) > 0, f"{name}/{method}: the student did not move"
    for k, p in a.teacher.named_parameters():
        assert torch.equal(p, teacher_before[k]), f"{name}/{method}: teacher parameter {k} changed"
    with torch.no_grad():
        x = module.generate_samples(a.pool if method == "reflow" else {k: v[:2] for k, v in a.pool.items()})
    assert torch.isfinite(x).all() and x.shape[1:] == a.shape


def test_label_free_consistency_and_agd_end_to_end(tmp_path):
    """The two other modules without class labels on the SD3 transformer: consistency distillation on real latents
    whose conditions are embeddings (w-conditioned student), AGD on embedding trajectories; both train, export and
    sample."""
    from fewstep.callbacks import ConsistencyDistillation, GuidanceAdapterDistillation
    from fewstep.core.conditioning import cond_index
    from fewstep.core.trajectories import generate_trajectories

    a = ra.build("sd3")
    common = {"num_classes": None, "null": a.null, "batch_size": 2, "lr": 1e-3, "seed": 0}
    data = torch.randn(4, *a.shape, generator=torch.Generator().manual_seed(3)).clamp(-1, 1)
    data_cond = cond_index(a.pool, torch.arange(4))
    cm = ConsistencyDistillation(a.teacher, a.shape, data, real_labels=data_cond, guidance=(1.0, 3.0), segments=2,
                                 num_grid=8, adapter_rank=2, **common)
    traj = generate_trajectories(a.teacher, tmp_path / "t", num_samples=4, sample_shape=a.shape, guidance=(1.0, 3.0),
                                 steps=2, num_classes=None, cond_pool=a.pool, null=a.null, shard_size=4, batch_size=4,
                                 progress=False)
    agd = GuidanceAdapterDistillation(a.teacher, a.shape, traj, rank=2, embed_dim=8, hidden=8, **common)
    for module, key in ((cm, "train/consistency"), (agd, "train/agd")):
        before = _params(module.student)
        logs = _fit(module, 2)
        assert torch.isfinite(torch.tensor(logs[key])), (module.method, logs)
        assert _moved(before, module.student) > 0, module.method
        files = module.export(tmp_path / f"{module.method}.safetensors")
        assert files and all(f.stat().st_size > 0 for f in files)
        x = module.generate_samples(cond_index(a.pool, torch.tensor([0, 5])))
        assert torch.isfinite(x).all() and x.shape == (2, *a.shape)


@pytest.mark.slow
def test_fsdp2_on_a_real_architecture_matches_one_process(tmp_path):
    """DMD2 on the tiny Flux transformer with text embeddings: 2 FSDP2 CPU processes (gloo) give the weights of one
    process at the same global batch (the tolerance of tests/test_lightning_fsdp.py). Without a GAN head the critic's
    only forward in the generator step is a no-grad one, after which FSDP2 kept its root unit gathered and the next
    training forward skipped that unit's gradient reduce-scatter (each rank stepped on its own gradient: 4e-3
    apart after 3 batches); ``DMD2Distillation`` now reshards the critic after it."""
    import distill_tiny as tiny
    import fsdp_real

    out = tmp_path / "fsdp.pt"
    fsdp = tiny.run_ranks("fsdp_real.py", ["flux", str(out), "2"], out, timeout=600)
    assert fsdp["sharded"]
    _, module = fsdp_real.fit("flux", 1)
    assert fsdp["counters"] == module.counters()
    single = tiny.trained_state(module)
    assert single and set(single) <= set(fsdp["state"])
    bad = {k: float((fsdp["state"][k] - v).abs().max()) for k, v in single.items()  # key biases: see test_lightning_ddp
           if not k.endswith("to_k.bias") and not torch.allclose(fsdp["state"][k], v, atol=2e-5, rtol=1e-4)}
    assert not bad, bad
    fresh = ra.build("flux").teacher.model.state_dict()  # the student starts as a copy of this teacher
    moved = [k for k, v in single.items() if k.startswith("student.model.")
             and not torch.equal(v, fresh[k[len("student.model."):]])]
    assert moved, "the runs did not train the student"


def test_bf16_teacher_on_request():
    """``teacher_dtype="bf16"``: the frozen teacher's weights are bf16, the student and critic stay float32, the run
    is finite and close to the float32-teacher run; a LoRA student (it shares the teacher's weights) is refused."""
    from fewstep.callbacks import DMD2Distillation

    deltas, outs = {}, {}
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    for dtype in (None, "bf16"):
        a = ra.build("sdxl")
        fresh = {k: v.clone() for k, v in a.teacher.model.state_dict().items()}
        module = DMD2Distillation(a.teacher, a.shape, guidance_scale=2.0, critic_ratio=1, num_classes=None,
                                  cond_pool=a.pool, null=a.null, batch_size=2, lr=1e-4, seed=0, teacher_dtype=dtype)
        want = torch.bfloat16 if dtype else torch.float32
        assert all(p.dtype == want for p in module.teacher.parameters())
        trained = list(module.student.parameters()) + list(module.critic.parameters())
        assert all(p.dtype == torch.float32 for p in trained)
        with torch.no_grad():
            outs[dtype] = module.teacher(x, torch.tensor([3.0, 0.5]), **{k: v[:2] for k, v in a.pool.items()})
        assert outs[dtype].dtype == torch.float32
        _fit(module, 2)
        st = module.student.model.state_dict()
        assert all(torch.isfinite(v).all() for v in st.values())
        deltas[dtype] = torch.cat([(v - fresh[k]).flatten() for k, v in st.items()])
    rel = float((outs["bf16"] - outs[None]).abs().max() / outs[None].abs().max())
    cos = float(torch.nn.functional.cosine_similarity(deltas["bf16"], deltas[None], dim=0))
    print(f"\nbf16 teacher: denoised output rel. diff {rel:.3g}; student update cosine vs fp32 teacher {cos:.3f}")
    assert 0 < rel < 5e-2, rel  # measured 3.0e-2: bf16 (8-bit mantissa) through the UNet, eps times sigma 3
    assert deltas["bf16"].abs().sum() > 0 and cos > 0.6, cos  # measured 0.81 (Adam: ~sign steps, 2 updates)
    a = ra.build("sdxl")
    with pytest.raises(ValueError, match="teacher_dtype"):
        DMD2Distillation(a.teacher, a.shape, student="lora", num_classes=None, cond_pool=a.pool, null=a.null,
                         teacher_dtype="bf16")


@pytest.mark.slow
def test_sharded_lora_student_exports_like_one_process(tmp_path):
    """A LoRA student trained under FSDP2 (2 CPU processes) is exported from the shards: the merged weights and the
    ComfyUI LoRA file equal those of one process (the tolerance of tests/test_lightning_fsdp.py)."""
    import distill_tiny as tiny
    import fsdp_real
    from safetensors.torch import load_file

    out = tmp_path / "fsdp.pt"
    assert tiny.run_ranks("fsdp_real.py", ["flux", str(out), "2", "fsdp2", "lora"], out, timeout=600)["sharded"]
    _, module = fsdp_real.fit("flux", 1, lora=True)
    single = module.export(tmp_path / "single" / "student.safetensors")
    names = sorted(p.name for p in single)
    sharded_dir = out.with_suffix(".export")
    assert sorted(p.name for p in sharded_dir.glob("*.safetensors")) == names
    for name in names:
        a, b = load_file(str(sharded_dir / name)), load_file(str(tmp_path / "single" / name))
        assert a.keys() == b.keys() and a, name
        bad = {k: float((a[k] - v).abs().max()) for k, v in b.items()
               if not torch.allclose(a[k], v, atol=2e-5, rtol=1e-4)}
        assert not bad, (name, bad)
    lora = load_file(str(sharded_dir / "student_lora.safetensors"))
    assert any(k.endswith("lora_up.weight") and v.abs().max() > 0 for k, v in lora.items())  # it trained
