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


def test_adapter_on_the_adaln_modulation_layers_matches_its_formula(tmp_path):
    """Issue 13: the shipped AGD recipe also adapts the DiT's adaLN modulation (``norm1.linear`` in every block and
    the final ``proj_out_1``), whose input is the (timestep + class) embedding, a ``(B, C)`` tensor: the update must
    be ``W x + b + (w - 1) U (g_l(w) * (D x))`` there too, vanish at ``w = 1`` and survive save/load."""
    from fewstep.core.guidance.adapters import DEFAULT_TARGETS, GuidanceAdapter, guidance_scale_embedding

    teacher = tiny.tiny_teacher()
    net = teacher.model
    targets = tuple(DEFAULT_TARGETS) + ("norm1.linear", "proj_out_1")
    adapter = GuidanceAdapter(net, rank=2, targets=targets, embed_dim=16, hidden=16, scale_range=(1.0, 4.0))
    assert "proj_out_1" in adapter.target_names
    assert sum(n.endswith("norm1.linear") for n in adapter.target_names) == len(net.transformer_blocks)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in adapter.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    mods = dict(net.named_modules())
    seen = {}
    names = [n for n in adapter.target_names if n.endswith("norm1.linear")][:1] + ["proj_out_1"]
    hooks = [mods[n].register_forward_hook(lambda m, i, o, n=n: seen.__setitem__(n, (i[0], o))) for n in names]
    x = torch.randn(3, *tiny.SHAPE, generator=g)
    sigma = torch.tensor([0.5, 2.0, 8.0])
    labels = torch.tensor([1, 4, 7])
    w = torch.tensor([1.0, 1.5, 3.0])
    with torch.no_grad():
        base_out = teacher(x, sigma, class_labels=labels)
        with adapter.scale(w):
            out = teacher(x, sigma, class_labels=labels)
        gates = 1.0 + adapter.gate(guidance_scale_embedding(w, 16)).reshape(3, len(adapter.target_names), 2)
        for n in names:
            i = adapter.target_names.index(n)
            inp, got = seen[n]
            assert inp.ndim == 2  # the embedding, not tokens
            lin, low = mods[n], adapter.layers[i]
            want = inp @ lin.weight.T + lin.bias + (w - 1)[:, None] * (((inp @ low.down.T) * gates[:, i]) @ low.up.T)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for h in hooks:
        h.remove()
    torch.testing.assert_close(out[0], base_out[0], rtol=1e-5, atol=1e-6)  # w = 1: exactly the base model
    assert (out[1:] - base_out[1:]).abs().amax() > 1e-3  # w > 1: the modulation update changes the output
    path = adapter.save(tmp_path / "a.safetensors")
    adapter.detach()
    loaded = GuidanceAdapter.load(path, net)
    assert loaded.target_names == adapter.target_names
    with torch.no_grad(), loaded.scale(w):
        torch.testing.assert_close(teacher(x, sigma, class_labels=labels), out)


def test_guidance_delta_weights_match_the_formula():
    """Issue 13: ``1 / max(mean((cond - uncond)^2), floor)`` per sample, so each state's loss is relative to the size
    of its guidance direction (low-noise steps, where the two passes differ little, count as much)."""
    from fewstep.core.losses.guidance import guidance_delta_weights

    cond = torch.tensor([[1.0, 1.0, 1.0, 1.0], [0.5, -0.5, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    uncond = torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.001]])
    # mean squared deltas by hand: 1, (0.25 + 0.25) / 4 = 0.125, 1e-6 / 4 -> floored at 1e-4
    torch.testing.assert_close(guidance_delta_weights(cond, uncond, "inverse_delta", 1e-4),
                               torch.tensor([1.0, 8.0, 1e4]))
    assert torch.equal(guidance_delta_weights(cond, uncond, "none"), torch.ones(3))
    # with the 1 / (w - 1)^2 scale weights the loss is the squared relative error of the guidance term
    from fewstep.core.losses.guidance import guidance_distillation_loss, guidance_scale_weights

    w = torch.tensor([2.0, 3.0])
    c, u = cond[:2], uncond[:2]
    pred = u + w[:, None] * (c - u) * 1.1  # 10% too much guidance on both samples
    wts = guidance_scale_weights(w, "inverse_square", 0.1) * guidance_delta_weights(c, u)
    # each: ||0.1 w (c - u)||^2 / (||(w - 1)(c - u)||^2) = (0.1 w / (w - 1))^2 -> 0.04 and 0.0225
    torch.testing.assert_close(guidance_distillation_loss(pred, c, u, w, wts), torch.tensor((0.04 + 0.0225) / 2))
    with pytest.raises(ValueError, match="delta weighting must be one of"):
        guidance_delta_weights(cond, uncond, "inverse")
    with pytest.raises(ValueError, match="floor must be > 0"):
        guidance_delta_weights(cond, uncond, "inverse_delta", 0.0)


def test_agd_step_weights_each_sample_by_its_guidance_delta(tmp_path):
    plain = tiny.build("agd", tmp_path)
    weighted = tiny.build("agd", tmp_path, delta_weighting="inverse_delta", delta_weight_floor=1e-8)
    from fewstep.core.conditioning import cond_index
    from fewstep.core.distill import randint_per_sample
    from fewstep.core.guidance.scaled import guided_denoise

    ms = plain.model_sampling
    for k in range(3):
        ids = torch.tensor([k])
        idx = randint_per_sample(ids, len(plain.states), "agd/index", plain.seed)
        j = randint_per_sample(ids, plain.states.shape[1] - 1, "agd/state", plain.seed)
        x, sigma = plain.states[idx, j], plain.traj_sigmas[j]
        with torch.no_grad():
            _, c, u = guided_denoise(plain.teacher, x, sigma, plain.traj_scale[idx], plain.cond_key, plain.null,
                                     return_parts=True, **plain.cond(cond_index(plain.traj_cond, idx)))
        d2 = float(((ms.output_from_denoised(sigma, c, x) - ms.output_from_denoised(sigma, u, x)) ** 2).mean())
        lp, _ = plain.agd_step(ids)
        lw, _ = weighted.agd_step(ids)
        assert float(lp) > 0 and d2 > 0
        torch.testing.assert_close(lw, lp / d2, rtol=1e-4, atol=0)
    loss, _ = weighted.agd_step(torch.arange(8))
    loss.backward()
    assert all(p.grad is None for p in weighted.teacher.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in weighted.adapter.parameters())
    with pytest.raises(ValueError, match="delta_weighting must be one of"):
        tiny.build("agd", tmp_path, delta_weighting="nope")


def test_train_student_agd_uses_the_shipped_recipe(tmp_path):
    """``fewstep train-student agd`` (smoke): the exported adapter carries the shipped recipe's loss weightings, and
    the per-method defaults are the shipped adapter's data and batches (issue 13: a user reproduces it)."""
    import json

    from fewstep.callbacks import train_students as ts

    assert ts.TRAJECTORIES["agd"] == 2048 and ts.AGD_BATCHES == 900 and ts.AGD_DELTA_WEIGHTING == "inverse_delta"
    args = ts.add_arguments(__import__("argparse").ArgumentParser()).parse_args(["agd"])
    assert args.trajectories is None and args.max_batches is None  # resolved per method in train_student
    s = ts.train_student("agd", out=tmp_path, smoke=True, max_batches=2, threads=1, progress=False)
    (path,) = s["stages"][0]["files"]
    meta = json.loads((tmp_path / "agd" / "export" / "digits_agd_adapter.json").read_text())
    assert path.endswith("digits_agd_adapter.safetensors") and s["stages"][0]["batches"] == 2
    dist = meta["distillation"]
    assert (dist["scale_weighting"], dist["delta_weighting"]) == ("inverse_square", "inverse_delta")
    assert meta["rank"] == ts.AGD_RANK
