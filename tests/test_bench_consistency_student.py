"""benchmarks/consistency_student.py: the last-segment stage of the consistency students (issue 13).

Parity: the stored chains are the shipped student's own Euler (DDIM) sampling, the targets the teacher's
DPM-Solver++(2M) CFG solution from the last boundary; the loss equals its formula (pseudo-Huber at the segment end).
"""

import torch

torch.set_num_threads(1)


def _setup():
    from fewstep.benchmarks import consistency_student as cs
    from fewstep.core.losses.consistency import consistency_grid
    from fewstep.core.models.embedded import WEIGHTS_DIR, load_teacher
    from fewstep.core.models.students import load_student

    student, meta = load_student(WEIGHTS_DIR / "digits_consistency_4step.safetensors")
    sigmas = torch.as_tensor(meta["sigmas"], dtype=torch.float32)
    return cs, load_teacher(), student, sigmas, consistency_grid(student.model_sampling)


def test_student_sigmas_are_grid_levels_and_others_are_refused():
    cs, _, _, sigmas, grid = _setup()
    assert [cs.grid_index(grid, float(s)) for s in sigmas[:-1]] == [48, 36, 24, 12]
    try:
        cs.grid_index(grid, 2.0)
    except ValueError as e:
        assert "2.0" in str(e)
    else:
        raise AssertionError("a sigma off the grid was accepted")


def test_shard_is_the_students_own_chain_and_the_teachers_ode():
    from fewstep.core.guidance.cfg import CFGDenoiser
    from fewstep.core.sampling.samplers import get_sampler

    cs, teacher, student, sigmas, grid = _setup()
    shard = cs.make_shard(student, teacher, sigmas, grid, 3, 1.25, 3, size=4)
    assert shard["x"].shape == (4, 4, 1, 16, 16) and shard["target"].shape == (4, 1, 16, 16)
    g = torch.Generator().manual_seed(cs.PAIR_SEED + 3)
    labels = torch.randint(0, 10, (4,), generator=g)
    assert torch.equal(shard["labels"], labels)
    # the chain's last input, finished with the student's own last step, is the shipped student's sampling
    with torch.no_grad():
        x0_last = student(shard["x"][3], sigmas[3].expand(4), class_labels=labels)
        euler = get_sampler("euler")(student, shard["x"][0].clone(), sigmas, extra_args={"class_labels": labels},
                                     disable=True)
    assert torch.allclose(x0_last, euler, atol=1e-4)
    assert torch.allclose(shard["pred"][3], x0_last, atol=1e-5)
    # the target is the teacher's DPM-Solver++(2M) with CFG 1.25 over grid levels 12, 9, 6, 3, 0
    with torch.no_grad():
        ref = get_sampler("dpmpp_2m")(CFGDenoiser(teacher, 1.25, cond_key="class_labels", null=10),
                                      shard["x"][3].clone(), grid[[12, 9, 6, 3, 0]],
                                      extra_args={"class_labels": labels}, disable=True)
    assert torch.allclose(shard["target"], ref, atol=1e-5)
    assert not torch.allclose(shard["target"], x0_last, atol=1e-2)  # the teacher's solution differs from the student's


def test_stage_loss_is_pseudo_huber_at_the_segment_end():
    from fewstep.core.losses.consistency import pseudo_huber

    cs, teacher, student, sigmas, grid = _setup()
    pairs = cs.make_shard(student, teacher, sigmas, grid, 0, 1.25, 6, size=4)
    idx, keep = torch.tensor([0, 1, 2, 3]), torch.tensor([1, 2])
    with torch.no_grad():
        loss, logs = cs.stage_loss(student, pairs, sigmas, idx, keep, keep_weight=0.0)
        x0 = student(pairs["x"][3], sigmas[3].expand(4), class_labels=pairs["labels"])
    # last segment: sigma_end = 0, so the student's F is its x0 prediction and the target the teacher's solution
    assert torch.allclose(loss, pseudo_huber(x0, pairs["target"]).mean(), atol=1e-6)
    assert set(logs) == {"last"}
    # keep terms: zero for the initial student itself, positive once it moved; weighted by keep_weight
    with torch.no_grad():
        l1, logs1 = cs.stage_loss(student, pairs, sigmas, idx, keep, keep_weight=1.0)
    assert set(logs1) == {"last", "keep0", "keep1", "keep2"}
    assert max(logs1[f"keep{k}"] for k in range(3)) < 1e-5
    with torch.no_grad():
        for p in student.model.parameters():
            p.add_(1e-3 * torch.randn_like(p))
        l2, logs2 = cs.stage_loss(student, pairs, sigmas, idx, keep, keep_weight=2.0)
        l0, _ = cs.stage_loss(student, pairs, sigmas, idx, keep, keep_weight=0.0)
    keeps = sum(logs2[f"keep{k}"] for k in range(3))
    assert keeps > 1e-4
    assert abs(float(l2) - (float(l0) + 2.0 * keeps)) < 1e-5
