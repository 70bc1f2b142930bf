"""The caching benchmarks' measurement protocol (fidelity to the uncached output, block-evaluation counting, Pareto
fronts) and the peers' adapters on a tiny DiT (diffusers' hooks through CacheMixin mixed in; fewstep's caches)."""

from __future__ import annotations

import math

import pytest
import torch

from fewstep.benchmarks.caching_protocol import PSNR_CAP, BlockCounter, fidelity, pareto_front

pytestmark = pytest.mark.usefixtures("one_thread")


def test_fidelity_values():
    ref = torch.zeros(3, 1, 4, 4)
    assert fidelity(ref, ref) == {"psnr_db": PSNR_CAP, "psnr_db_min": PSNR_CAP, "rms": 0.0}
    imgs = ref.clone()
    imgs[0] += 0.2  # [-1, 1] offset 0.2 -> 0.1 on [0, 1] -> MSE 0.01 -> 20 dB
    f = fidelity(imgs, ref)
    assert f["psnr_db_min"] == pytest.approx(20.0)
    assert f["psnr_db"] == pytest.approx((20.0 + 2 * PSNR_CAP) / 3)
    assert f["rms"] == pytest.approx(0.2 / 3)
    with pytest.raises(ValueError, match="differ in shape"):
        fidelity(imgs, ref[:2])


def test_pareto_front():
    rows = [{"label": "a", "nfe": 10, "psnr_db": 30}, {"label": "b", "nfe": 20, "psnr_db": 40},
            {"label": "c", "nfe": 20, "psnr_db": 35}, {"label": "d", "nfe": 10, "psnr_db": 25}]
    assert pareto_front(rows, "nfe", "psnr_db", True) == ["a", "b"]
    rows = [{"label": "a", "nfe": 10, "fd": 3.0}, {"label": "b", "nfe": 20, "fd": 2.0}, {"label": "c", "nfe": 20,
                                                                                         "fd": 2.5}]
    assert pareto_front(rows, "nfe", "fd", False) == ["a", "b"]


def _dit():
    import diffusers

    from fewstep.core.models.diffusers_adapters import diffusers_denoiser

    torch.manual_seed(0)
    m = diffusers.DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                        num_layers=3, sample_size=8, patch_size=2, num_embeds_ada_norm=10)
    return diffusers_denoiser(m.eval().requires_grad_(False))


def test_block_counter_counts_real_block_work():
    from fewstep.core.cache import FirstBlockCache, apply_cache
    from fewstep.core.sampling import get_sigmas, sample_euler

    den = _dit()
    sig = get_sigmas("karras", den.model_sampling, 6)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * sig[0]
    cond = {"class_labels": torch.tensor([1, 2])}
    counter = BlockCounter(den.model)
    counter.reset(rows_per_call=2)
    sample_euler(den, x, sig, extra_args=cond, disable=True)
    assert counter.counts["calls"] == 6 and counter.nfe == pytest.approx(6.0)
    counter.reset(rows_per_call=2)
    cache = FirstBlockCache(1.0, indicator="interval", max_consecutive_skips=1)
    with apply_cache(den, cache):
        sample_euler(den, x, sig, extra_args=cond, disable=True)
    skipped = cache.stats["skipped"]
    assert skipped >= 2
    # a skipped call runs 1 of 3 blocks
    assert counter.block_evals == pytest.approx(6 * 3 - skipped * 2)
    counter.remove()
    counter.reset()
    sample_euler(den, x, sig, extra_args=cond, disable=True)
    assert counter.counts["calls"] == 0


def test_diffusers_first_block_cache_through_cache_mixin_restores_the_class():
    pytest.importorskip("diffusers.hooks.first_block_cache")
    from fewstep.benchmarks.caching_peers import Family, _diffusers, run_setting
    from fewstep.core.sampling import get_sigmas

    diffusers_hooks = pytest.importorskip("diffusers.hooks")
    den = _dit()
    cls = type(den.model)
    fam = Family("diffusers FirstBlockCache", "diffusers",
                 _diffusers(lambda t, ts: diffusers_hooks.FirstBlockCacheConfig(threshold=float(t))),
                 ("threshold", 0.01, 3.0))
    sig = get_sigmas("karras", den.model_sampling, 8)
    labels = torch.tensor([1, 2])
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    counter = BlockCounter(den.model)

    def gen(f, knob):
        return run_setting(den, counter, f, knob, labels, noise, sig, 1.5)

    base = gen(None, None)
    tight = gen(fam, 1e-9)  # nothing is similar enough: every block runs, same output
    assert type(den.model) is cls
    assert tight["nfe"] == pytest.approx(base["nfe"]) and torch.allclose(tight["images"], base["images"], atol=1e-6)
    loose = gen(fam, 10.0)
    assert loose["nfe"] < base["nfe"] and math.isfinite(float(loose["images"].abs().max()))
    assert type(den.model) is cls
    again = gen(None, None)  # hooks removed: uncached again, bit-identical
    assert torch.equal(again["images"], base["images"]) and again["nfe"] == base["nfe"]
