"""The diffusers patch: apply_sparse_attention on the embedded teacher and tiny DiT / Flux / CogVideoX / Wan models."""

from __future__ import annotations

import warnings

import pytest
import torch

pytest.importorskip("diffusers")

from fewstep.core.attention import (  # noqa: E402
    SlidingTilePattern,
    SparseAttnProcessor,
    SparsitySchedule,
    TokenLayout,
    TopKPattern,
    apply_sparse_attention,
)
from fewstep.core.models.diffusers_adapters import call_flux  # noqa: E402
from fewstep.core.models.embedded import build_dit, dit_denoiser, load_teacher  # noqa: E402

FULL_PATTERNS = [SlidingTilePattern(radius=1000, block_size=4, tile=(2, 2)),
                 TopKPattern(keep_ratio=1.0, block_size=4, tile=(2, 2))]


@pytest.fixture(scope="module")
def teacher():
    return load_teacher()  # shipped in core/models/weights: a missing file fails


@pytest.fixture(scope="module")
def teacher_inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(4, 1, 16, 16, generator=g), torch.tensor([0, 3, 7, 10])


def _call(den, x, y, sigma=3.0):
    with torch.no_grad():
        return den(x, sigma, class_labels=y)


@pytest.mark.parametrize("pattern", FULL_PATTERNS, ids=["sliding", "topk"])
@pytest.mark.parametrize("backend", ["reference", "flex"])
def test_teacher_full_pattern_equals_dense(teacher, teacher_inputs, pattern, backend):
    x, y = teacher_inputs
    ref = _call(teacher, x, y)
    with apply_sparse_attention(teacher, pattern, backend=backend, compile=False) as h:
        out = _call(teacher, x, y)
        assert len(h.layers) == 5 and all(st["sparse_calls"] == 1 for st in h.stats.values())
        assert h.layout_for(64) == TokenLayout((8, 8))
    assert (out - ref).abs().max() <= 1e-5


def test_teacher_sparse_changes_output_and_remove_restores(teacher, teacher_inputs):
    x, y = teacher_inputs
    module = teacher.model
    ptrs = {n: p.data_ptr() for n, p in module.named_parameters()}
    originals = [m.processor for m in module.modules() if hasattr(m, "set_processor")]
    ref = _call(teacher, x, y)
    h = apply_sparse_attention(teacher, TopKPattern(keep_ratio=0.25, block_size=4, tile=(2, 2)), backend="reference")
    assert all(isinstance(m.processor, SparseAttnProcessor) for m in module.modules() if hasattr(m, "set_processor"))
    out = _call(teacher, x, y)
    assert (out - ref).abs().max() > 1e-3
    assert all(abs(d - 0.25) < 1e-6 for d in h.densities().values())
    with h.disabled():
        assert torch.equal(_call(teacher, x, y), ref)
    h.remove()
    assert [m.processor for m in module.modules() if hasattr(m, "set_processor")] == originals
    assert {n: p.data_ptr() for n, p in module.named_parameters()} == ptrs  # nothing copied
    assert torch.equal(_call(teacher, x, y), ref)
    assert not module._forward_pre_hooks


def test_teacher_schedule_dense_first_steps_and_layers(teacher, teacher_inputs):
    x, y = teacher_inputs
    pat = SlidingTilePattern(radius=1, block_size=4, tile=(2, 2))
    dense = {s: _call(teacher, x, y, s) for s in (5.0, 2.0)}
    with apply_sparse_attention(teacher, pat, SparsitySchedule(dense_steps=1), backend="reference") as h:
        assert torch.allclose(_call(teacher, x, y, 5.0), dense[5.0], atol=1e-6) and h.step == 0  # step 0: dense
        assert not torch.allclose(_call(teacher, x, y, 2.0), dense[2.0], atol=1e-3) and h.step == 1
        assert torch.allclose(_call(teacher, x, y, 5.0), dense[5.0], atol=1e-6) and h.step == 0  # a new run
    with apply_sparse_attention(teacher, pat, SparsitySchedule(dense_layers=range(5)), backend="reference") as h:
        assert torch.allclose(_call(teacher, x, y, 2.0), dense[2.0], atol=1e-6)
        assert all(st["sparse_calls"] == 0 for st in h.stats.values())


def test_manual_steps_and_reset(teacher, teacher_inputs):
    x, y = teacher_inputs
    dense = _call(teacher, x, y, 2.0)
    pat = SlidingTilePattern(radius=1, block_size=4, tile=(2, 2))
    with apply_sparse_attention(teacher, pat, SparsitySchedule(dense_steps=3), backend="reference") as h:
        h.set_step(2)
        assert torch.allclose(_call(teacher, x, y, 2.0), dense, atol=1e-6) and h.step == 2
        h.set_step(3)
        assert not torch.allclose(_call(teacher, x, y, 2.0), dense, atol=1e-3)
        h.reset()
        assert h.step is None and not h.stats


def test_teacher_gradients_flow_through_sparse_attention(teacher, teacher_inputs):
    """What sparsity-aware training needs: a differentiable patched model."""
    x, y = teacher_inputs
    torch.manual_seed(0)
    module = build_dit().train()
    den = dit_denoiser(module)

    def grads(keep_ratio: float | None) -> list[torch.Tensor]:
        module.zero_grad(set_to_none=True)
        torch.manual_seed(1)  # train mode draws random numbers (dropout): the same draws for each run
        if keep_ratio is None:
            den(x, 2.0, class_labels=y).square().mean().backward()
        else:
            pat = TopKPattern(keep_ratio=keep_ratio, block_size=4, tile=(2, 2))
            with apply_sparse_attention(den, pat, backend="reference"):
                den(x, 2.0, class_labels=y).square().mean().backward()
        return [p.grad for p in module.parameters() if p.requires_grad]

    dense, full, sparse = grads(None), grads(1.0), grads(0.5)
    assert all(g is not None and torch.isfinite(g).all() for g in full + sparse)
    # every key block kept: the patched backward is the dense backward (attention is permutation-equivariant)
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-6) for a, b in zip(full, dense))
    # half the key blocks dropped: the gradient flows through the sparse attention and is a different gradient
    assert sum(float(g.abs().sum()) for g in sparse) > 0
    assert not all(torch.allclose(a, b, rtol=1e-4, atol=1e-6) for a, b in zip(sparse, dense))


def test_random_dit_config_and_double_apply(teacher_inputs):
    torch.manual_seed(1)
    module = build_dit({"num_attention_heads": 2, "attention_head_dim": 16, "in_channels": 1, "out_channels": 1,
                        "num_layers": 2, "sample_size": 16, "patch_size": 4, "norm_type": "ada_norm_zero",
                        "num_embeds_ada_norm": 10}).eval()
    den = dit_denoiser(module)
    x, y = teacher_inputs
    ref = _call(den, x, y)
    with apply_sparse_attention(den, SlidingTilePattern(radius=100, block_size=4, tile=(2, 2))) as h:
        assert (_call(den, x, y) - ref).abs().max() <= 1e-5
        assert h.layout_for(16).grid == (4, 4)
        with pytest.raises(RuntimeError, match="already applied"):
            h.apply()


# ------------------------------------------------------------------------------------------ tiny diffusers models
def _flux():
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    model = FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                                   attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                   pooled_projection_dim=32, axes_dims_rope=[4, 4, 8]).eval()
    g = torch.Generator().manual_seed(1)
    args = (torch.randn(1, 1, 8, 8, generator=g), torch.tensor([0.5]))
    kwargs = {"encoder_hidden_states": torch.randn(1, 6, 32, generator=g),
              "pooled_projections": torch.randn(1, 32, generator=g)}
    return model, lambda: call_flux(model, *args, **kwargs), 6 + 16, TokenLayout((4, 4), 6, True)


def _cogvideox():
    from diffusers import CogVideoXTransformer3DModel

    torch.manual_seed(0)
    model = CogVideoXTransformer3DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
                                        time_embed_dim=4, text_embed_dim=16, num_layers=1, sample_width=8,
                                        sample_height=8, sample_frames=8, patch_size=2, temporal_compression_ratio=4,
                                        max_text_seq_length=8).eval()
    g = torch.Generator().manual_seed(1)
    x, txt = torch.randn(1, 2, 4, 8, 8, generator=g), torch.randn(1, 8, 16, generator=g)
    return model, lambda: model(x, txt, timestep=torch.tensor([500])).sample, 8 + 32, TokenLayout((2, 4, 4), 8, True)


def _wan():
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    model = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4,
                                  out_channels=4, text_dim=16, freq_dim=256, ffn_dim=32, num_layers=2,
                                  cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=32).eval()
    g = torch.Generator().manual_seed(1)
    x, txt = torch.randn(1, 4, 2, 8, 8, generator=g), torch.randn(1, 5, 16, generator=g)
    return (model, lambda: model(x, timestep=torch.tensor([500]), encoder_hidden_states=txt).sample, 32,
            TokenLayout((2, 4, 4)))


@pytest.mark.parametrize("make", [_flux, _cogvideox, _wan], ids=["flux", "cogvideox", "wan"])
def test_tiny_diffusers_models(make):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, run, seq_len, layout = make()
    with torch.no_grad():
        ref = run()
        with apply_sparse_attention(model, SlidingTilePattern(radius=1000, block_size=4)) as h:
            full = run()
            assert h.layout_for(seq_len) == layout
            assert all(st["sparse_calls"] == 1 for st in h.stats.values()) and h.stats
            names = h.layers
        assert (full - ref).abs().max() <= 1e-5
        assert not any("attn2" in n for n in names)  # cross-attention is left alone
        with apply_sparse_attention(model, TopKPattern(keep_ratio=0.3, block_size=4), backend="reference") as h:
            sparse = run()
            assert all(d < 1.0 for d in h.densities().values())
        assert (sparse - ref).abs().max() > 1e-4
        assert torch.equal(run(), ref)
