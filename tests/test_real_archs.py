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
