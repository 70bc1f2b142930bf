"""The learned cache (DisCa-style): predictor, training pairs, Lightning training and resume, fingerprint refusal,
and its use through the block-range runner and the diffusers hooks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fewstep.core.cache import BlockRangeRunner, apply_cache
from fewstep.core.cache.learned import (
    LearnedCache,
    LearnedCacheMismatchError,
    ResidualPredictor,
    collect_pairs,
    dit_sigma_of_call,
    load_predictor,
    model_identity,
    predictor_loss,
    save_predictor,
)

pytestmark = pytest.mark.usefixtures("one_thread")

D, T = 8, 4  # width, tokens (a 2x2 grid)


class Pass(nn.Module):
    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return hidden_states


class Linear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(D, D)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.lin(hidden_states)


class Head(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(D + 1, D)

    def forward(self, hidden_states: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        tt = t.reshape(-1, 1, 1).expand(-1, hidden_states.shape[1], 1)
        return torch.tanh(self.lin(torch.cat([hidden_states, tt], -1)))


class LinearTail(nn.Module):
    """A block stack whose first block is nonlinear (timestep-conditioned) and whose other blocks are linear."""

    def __init__(self, n: int = 4, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.head = Head()
        self.transformer_blocks = nn.ModuleList([Pass()] + [Linear() for _ in range(n - 1)])
        for b in self.transformer_blocks[1:]:
            nn.init.normal_(b.lin.weight, std=0.3)

    def forward(self, x: torch.Tensor, timestep: torch.Tensor, runner: BlockRangeRunner | None = None):
        h = self.head(x, timestep)
        if runner is not None:
            runner.begin(timestep.reshape(-1)[0], key=None)
        for i, blk in enumerate(self.transformer_blocks):
            if runner is not None:
                skipped = runner.before(i, (h,), h)
                if skipped is not None:
                    h = skipped[0]
                    continue
            h = blk(hidden_states=h)
            if runner is not None:
                runner.ran(i, (h,) if runner.wants_output(i) else None)
        if runner is not None:
            runner.end()
        return h


def _trajectory(net: LinearTail, x0: torch.Tensor, sigmas: list[float], runner=None) -> list[torch.Tensor]:
    outs, x = [], x0
    for s in sigmas:
        out = net(x, torch.full((x.shape[0],), s), runner)
        outs.append(out)
        x = 0.7 * x + 0.3 * out
    return outs


def _pairs(net: LinearTail, n: int = 16, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(n, T, D, generator=g)
    return collect_pairs(lambda: _trajectory(net, x0, [3.0, 2.0, 1.0, 0.5]), net, list(net.transformer_blocks), 1, 0,
                         lambda a, k: k.get("timestep", a[1] if len(a) > 1 else None), max_gap=2)


def test_pairs_shapes_and_gaps():
    net = LinearTail()
    p = _pairs(net, n=3)
    # 4 calls, gaps 1..2: pairs (1,0) (2,1) (2,0) (3,2) (3,1) -> 5 per row batch
    assert p["h"].shape == (5 * 3, T, D) and p["r_t"].shape == p["r_c"].shape == p["h_c"].shape == p["h"].shape
    assert sorted(set(p["gap"].tolist())) == [1, 2]
    assert torch.all(p["sigma_t"] < p["sigma_c"])


def test_predictor_starts_as_reuse():
    pred = ResidualPredictor(D, rank=4)
    h, r, hc = torch.randn(2, T, D), torch.randn(2, T, D), torch.randn(2, T, D)
    assert torch.equal(pred(h, r, hc, torch.ones(2), torch.ones(2) * 2), r)


def test_learns_linear_skipped_blocks_exactly():
    """Blocks 1..3 are linear: their residual is a linear function of the range input, so the predictor must fit it
    to float precision, and the cached model (every other step predicted) must match the uncached one."""
    from fewstep.callbacks.learned_cache import fit_learned_cache

    net = LinearTail()
    pairs = _pairs(net)
    module, rec = fit_learned_cache(pairs, rank=4, epochs=2, batch_size=16, stop_below=1e-10, accelerator="cpu")
    assert rec["linear_fit_rel_err"] < 1e-6
    assert rec["final_rel_err"] < 1e-10
    held_out = _pairs(net, n=4, seed=9)
    with torch.no_grad():
        assert float(predictor_loss(module.predictor, held_out)) < 1e-10
    cache = LearnedCache(module.predictor, skip_steps=[1, 3], head_blocks=1)
    runner = BlockRangeRunner(cache, len(net.transformer_blocks))
    x0 = torch.randn(4, T, D, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = _trajectory(net, x0, [3.0, 2.0, 1.0, 0.5])
        got = _trajectory(net, x0, [3.0, 2.0, 1.0, 0.5], runner)
    assert cache.stats["skipped"] == 2 and cache.stats["computed"] == 2
    assert cache.stats["blocks_skipped"] == 2 * 3
    for a, b in zip(ref, got):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_gradient_training_alone_learns_linear_blocks():
    from fewstep.callbacks.learned_cache import fit_learned_cache

    net = LinearTail()
    pairs = _pairs(net)
    start = float(predictor_loss(ResidualPredictor(D, rank=4), pairs))
    _, rec = fit_learned_cache(pairs, rank=4, epochs=60, batch_size=16, lr=1e-2, init_linear=False,
                               accelerator="cpu")
    assert rec["final_rel_err"] < 0.02 * start


def test_training_resumes_exactly(tmp_path):
    import lightning as L

    from fewstep.callbacks.learned_cache import LearnedCacheModule, fit_learned_cache, pairs_loader

    pairs = _pairs(LinearTail(seed=3))
    straight, _ = fit_learned_cache(pairs, rank=4, epochs=4, batch_size=8, lr=3e-3, init_linear=False,
                                    accelerator="cpu")
    # the same run, stopped after 2 of 4 planned epochs, checkpointed, and resumed
    L.seed_everything(0, workers=True, verbose=False)
    loader = pairs_loader(pairs, 8, 0)
    half = LearnedCacheModule(D, 4, True, lr=3e-3, total_steps=4 * len(loader))
    tr = L.Trainer(max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                   enable_model_summary=False, deterministic=True, accelerator="cpu")
    tr.fit(half, loader)
    ckpt = tmp_path / "half.ckpt"
    tr.save_checkpoint(ckpt)
    mid = {k: v.clone() for k, v in half.predictor.state_dict().items()}
    resumed, rec = fit_learned_cache(pairs, rank=4, epochs=4, batch_size=8, lr=3e-3, init_linear=False,
                                     ckpt_path=str(ckpt), accelerator="cpu")
    assert rec["optimizer_steps"] == 4 * len(loader)
    a, b = straight.predictor.state_dict(), resumed.predictor.state_dict()
    assert any(not torch.equal(mid[k], a[k]) for k in a)  # the second half did train
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _dit(seed: int):
    import diffusers

    from fewstep.core.models.diffusers_adapters import diffusers_denoiser

    torch.manual_seed(seed)
    m = diffusers.DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                        num_layers=3, sample_size=8, patch_size=2, num_embeds_ada_norm=10)
    return diffusers_denoiser(m.eval().requires_grad_(False))


def test_refuses_another_models_predictor_naming_both(tmp_path):
    a, b = _dit(0), _dit(1)
    ia, ib = model_identity(a), model_identity(b)
    assert ia["config_hash"] == ib["config_hash"] and ia["weights_hash"] != ib["weights_hash"]
    path = save_predictor(tmp_path / "a.safetensors", ResidualPredictor(16, rank=4), ia,
                          {"skip_steps": [1], "head_blocks": 1})
    LearnedCache.load(path, a)  # its own model: fine
    with pytest.raises(LearnedCacheMismatchError) as e:
        LearnedCache.load(path, b)
    msg = str(e.value)
    assert ia["weights_hash"] in msg and ib["weights_hash"] in msg
    with pytest.raises(LearnedCacheMismatchError):
        load_predictor(path, identity=ib)
    assert not list(tmp_path.glob(".*tmp*"))  # the atomic write left no temp file


def test_diffusers_hooks_apply_learned_cache():
    """Through ``apply_cache`` on a diffusers DiT: no skip steps = bit-identical to uncached; with skip steps the
    range is predicted (an untrained predictor is plain reuse of the last residual)."""
    from fewstep.core.sampling import get_sigmas, sample_euler

    den = _dit(0)
    sig = get_sigmas("karras", den.model_sampling, 4)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * sig[0]
    cond = {"class_labels": torch.tensor([1, 2])}
    ref = sample_euler(den, x, sig, extra_args=cond, disable=True)
    same = LearnedCache(ResidualPredictor(16, rank=4), skip_steps=[])
    with apply_cache(den, same):
        out = sample_euler(den, x, sig, extra_args=cond, disable=True)
    assert torch.equal(out, ref)
    cache = LearnedCache(ResidualPredictor(16, rank=4), skip_steps=[1, 3])
    with apply_cache(den, cache):
        out = sample_euler(den, x, sig, extra_args=cond, disable=True)
        stats = dict(cache.stats)
    assert stats["skipped"] == 2 and stats["computed"] == 2 and stats["blocks_skipped"] == 2 * 2
    assert not torch.equal(out, ref) and torch.isfinite(out).all()
    # the sigma-keyed state resets on a new run: a second run gives the same result
    with apply_cache(den, cache):
        again = sample_euler(den, x, sig, extra_args=cond, disable=True)
    assert torch.equal(again, out)


def test_recorded_pairs_on_a_dit_match_the_hooks_view():
    den = _dit(0)
    from fewstep.core.sampling import get_sigmas, sample_euler

    sig = get_sigmas("karras", den.model_sampling, 3)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * sig[0]
    net = den.model
    pairs = collect_pairs(lambda: sample_euler(den, x, sig, extra_args={"class_labels": torch.tensor([1, 2])},
                                               disable=True),
                          net, list(net.transformer_blocks), 1, 0, dit_sigma_of_call(den.model_sampling))
    assert pairs["h"].shape == (2 * 2, 16, 16)
    torch.testing.assert_close(pairs["sigma_c"][:2], sig[:1].expand(2).float(), rtol=1e-4, atol=1e-4)


def test_bad_configuration_is_refused():
    from fewstep.core.cache import CacheConfigError

    with pytest.raises(CacheConfigError, match="skip_steps"):
        LearnedCache(ResidualPredictor(8), skip_steps=[0])
    cache = LearnedCache(ResidualPredictor(8), skip_steps=[1], head_blocks=2, tail_blocks=1)
    with pytest.raises(CacheConfigError, match="leave no block"):
        cache.block_range(3, 1.0)
    with pytest.raises(ValueError, match="expects h, r_c and h_c"):
        ResidualPredictor(8)(torch.zeros(1, 4, 6), torch.zeros(1, 4, 6), torch.zeros(1, 4, 6), torch.ones(1),
                             torch.ones(1))


def test_end_to_end_finetuning_brings_the_cached_sample_closer():
    """``finetune_end_to_end`` (Eq. (2) of ``core.cache.learned.finetune``) on a diffusers DiT: the cached sample
    from held-out noise gets closer to the uncached one than with the starting predictor; the start is untouched."""
    from fewstep.core.cache.learned.finetune import differentiable, finetune_end_to_end
    from fewstep.core.sampling import get_sigmas, sample_euler

    den = _dit(0)
    sig = get_sigmas("karras", den.model_sampling, 4)
    fn = differentiable(sample_euler)
    assert fn is not sample_euler

    def sample(z, c):
        return fn(den, z * sig[0], sig, extra_args=dict(c), disable=True)

    g = torch.Generator().manual_seed(0)
    train_z, test_z = torch.randn(16, 4, 8, 8, generator=g), torch.randn(8, 4, 8, 8, generator=g)
    train_c, test_c = {"class_labels": torch.arange(16) % 10}, {"class_labels": torch.arange(8) % 10}
    start = LearnedCache(ResidualPredictor(16, rank=4, mix=True), skip_steps=[1, 2], head_blocks=1)
    before = {k: v.clone() for k, v in start.predictor.state_dict().items()}
    tuned, rec = finetune_end_to_end(start, lambda c: apply_cache(den, c), sample, train_z, train_c, iters=30,
                                     batch=8, lr=3e-3)
    assert all(torch.equal(v, start.predictor.state_dict()[k]) for k, v in before.items())
    assert rec["e2e_last_loss"] < rec["e2e_first_loss"]

    def err(cache):
        with torch.no_grad():
            ref = sample(test_z, test_c)
            with apply_cache(den, cache):
                out = sample(test_z, test_c)
        return float((out - ref).pow(2).sum() / ref.pow(2).sum())

    e0, e1 = err(start), err(tuned)
    assert tuned.stats["skipped"] == 2 and e1 < 0.8 * e0, (e0, e1)
