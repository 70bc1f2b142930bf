"""GuidanceAdapterDistillation's scale weighting (issue 13: large guidance scales must not dominate the loss)."""

import pytest
import torch

pytest.importorskip("lightning")

import distill_tiny as tiny  # noqa: E402

torch.set_num_threads(1)


def test_guidance_scale_weights_match_the_formula():
    from fewstep.core.losses.guidance import guidance_scale_weights

    w = torch.tensor([1.0, 1.05, 1.5, 3.0, 5.0])
    # 1 / max(w - 1, 0.1)^2 by hand: 1/0.01, 1/0.01, 1/0.25, 1/4, 1/16
    torch.testing.assert_close(guidance_scale_weights(w, "inverse_square", 0.1),
                               torch.tensor([100.0, 100.0, 4.0, 0.25, 0.0625]))
    torch.testing.assert_close(guidance_scale_weights(w, "inverse_square", 1.0),
                               torch.tensor([1.0, 1.0, 1.0, 0.25, 0.0625]))
    assert torch.equal(guidance_scale_weights(w, "none"), torch.ones(5))
    with pytest.raises(ValueError, match="scale weighting must be one of"):
        guidance_scale_weights(w, "inverse")
    with pytest.raises(ValueError, match="floor must be > 0"):
        guidance_scale_weights(w, "inverse_square", 0.0)


def test_weighted_guidance_loss_is_the_weighted_mean():
    from fewstep.core.losses.guidance import guidance_distillation_loss

    pred, cond, uncond = torch.zeros(2, 3), torch.ones(2, 3), torch.zeros(2, 3)
    w = torch.tensor([2.0, 3.0])
    # targets 2 and 3 everywhere: per-sample MSE 4 and 9; weights 1/1 and 1/4 -> (4 + 9/4) / 2
    got = guidance_distillation_loss(pred, cond, uncond, w, torch.tensor([1.0, 0.25]))
    torch.testing.assert_close(got, torch.tensor(3.125))


def test_agd_step_weights_each_sample_by_its_scale_and_trains_only_the_adapter(tmp_path):
    plain = tiny.build("agd", tmp_path)
    weighted = tiny.build("agd", tmp_path, scale_weighting="inverse_square", scale_weight_floor=0.1)
    from fewstep.core.distill import randint_per_sample

    for k in range(4):
        ids = torch.tensor([k])
        idx = randint_per_sample(ids, len(plain.states), "agd/index", plain.seed)
        w = float(plain.traj_scale[idx])
        lp, _ = plain.agd_step(ids)
        lw, _ = weighted.agd_step(ids)
        assert float(lp) > 0
        torch.testing.assert_close(lw, lp / max(w - 1.0, 0.1) ** 2, rtol=1e-5, atol=0)
    loss, _ = weighted.agd_step(torch.arange(8))
    loss.backward()
    assert all(p.grad is None for p in weighted.teacher.parameters())  # the teacher stays frozen
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in weighted.adapter.parameters())
    with pytest.raises(ValueError, match="scale_weighting must be one of"):
        tiny.build("agd", tmp_path, scale_weighting="nope")
