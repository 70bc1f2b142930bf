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
