"""ConsistencyDistillation's segment_weights (issue 13: emphasise the last segment)."""

import pytest
import torch

pytest.importorskip("lightning")

import distill_tiny as tiny  # noqa: E402

torch.set_num_threads(1)


def _module(**over):
    from fewstep.callbacks import ConsistencyDistillation

    x, y = tiny.real_data()
    return ConsistencyDistillation(tiny.tiny_teacher(), tiny.SHAPE, x, real_labels=y, guidance=1.0, segments=4,
                                   num_grid=8, batch_size=4, **over)


def test_segment_weights_set_the_share_of_each_segment():
    from fewstep.core.distill import randint_per_sample

    ids = torch.arange(4000)
    plain = _module()
    assert torch.equal(plain.draw_levels(ids), 1 + randint_per_sample(ids, 8, "cm/level", 0))  # default unchanged
    m = _module(segment_weights=(4, 1, 1, 1))
    j = m.draw_levels(ids)
    assert int(j.min()) >= 1 and int(j.max()) <= 8
    seg = (j - 1) // 2  # levels 1-2: segment 0 (ends at sigma 0), ... 7-8: segment 3
    share = torch.bincount(seg, minlength=4).float() / len(ids)
    assert torch.allclose(share, torch.tensor([4, 1, 1, 1]) / 7, atol=0.03)
    assert set((j[seg == 0]).tolist()) == {1, 2}  # uniform inside the segment
    only_top = _module(segment_weights=(0, 0, 0, 1)).draw_levels(ids[:200])
    assert set(only_top.tolist()) <= {7, 8}
    for bad in ((1, 1, 1), (1, -1, 1, 1), (0, 0, 0, 0)):
        with pytest.raises(ValueError, match="segment_weights"):
            _module(segment_weights=bad)


def test_consistency_step_trains_only_the_student_with_segment_weights():
    m = _module(segment_weights=(4, 1, 1, 1))
    loss, _ = m.consistency_step(torch.arange(4))
    loss.backward()
    assert all(p.grad is None for p in m.teacher.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.student.parameters())


def test_multi_step_teacher_targets_follow_the_teacher_ode_to_the_segment_end():
    """``teacher_steps``: the target state is the teacher's DDIM chain of that many steps, stopped at the segment
    end; one step is LCM's single step."""
    from fewstep.core.guidance.scaled import guided_denoise
    from fewstep.core.losses.common import ddim_transfer

    m = _module(teacher_steps=2)
    ms, grid = m.model_sampling, m.grid
    j = torch.tensor([2, 1, 8, 7])
    end = torch.tensor([0, 0, 6, 6])
    labels = torch.tensor([1, 2, 3, 4])
    w = torch.ones(4)
    x_t = torch.randn(4, *tiny.SHAPE, generator=torch.Generator().manual_seed(3))
    got, s = m.teacher_solve(x_t, j, end, labels, w)
    assert s.tolist() == [0, 0, 6, 6]

    def step(x, a, b, k):  # one guided DDIM step of sample k from level a to level b, by hand
        x0 = guided_denoise(m.teacher, x, grid[a].reshape(1), w[k: k + 1], "class_labels", 10,
                            class_labels=labels[k: k + 1])
        return ddim_transfer(ms, x, x0, grid[a].reshape(1), grid[b].reshape(1))

    for k, path in enumerate([(2, 1, 0), (1, 0), (8, 7, 6), (7, 6)]):
        x = x_t[k: k + 1]
        for a, b in zip(path, path[1:]):
            x = step(x, a, b, k)
        torch.testing.assert_close(got[k: k + 1], x, rtol=1e-5, atol=1e-5)
    one, s1 = _module().teacher_solve(x_t, j, end, labels, w)
    assert s1.tolist() == [1, 0, 7, 6]
    torch.testing.assert_close(one[:1], step(x_t[:1], 2, 1, 0), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="teacher_steps must be >= 1"):
        _module(teacher_steps=0)


def test_multi_step_targets_and_warmup_train_only_the_student():
    m = _module(teacher_steps=3, warmup_steps=5, segment_weights=(3, 1, 1, 1))
    loss, _ = m.consistency_step(torch.arange(4))
    loss.backward()
    assert all(p.grad is None for p in m.teacher.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.student.parameters())
    cfg = m.configure_optimizers()
    sched = cfg["lr_scheduler"]["scheduler"]
    assert sched.get_last_lr()[0] == pytest.approx(m.lr / 5)  # linear warm-up: step 0 at lr / 5
    with pytest.raises(ValueError, match="warmup_steps must be >= 0"):
        _module(warmup_steps=-1)
