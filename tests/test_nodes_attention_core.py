"""Core additions behind the sparse-attention node (no ComfyUI needed): ``latent_token_grid`` and
``sparse_attention_packed(..., return_mask=True)`` in ComfyUI's packed ``(B, S, H*D)`` layout."""

from __future__ import annotations

import pytest
import torch

from fewstep.core.attention import (
    SlidingTilePattern,
    TokenLayout,
    TopKPattern,
    latent_token_grid,
    sparse_attention,
    sparse_attention_packed,
)


def test_latent_token_grid():
    assert latent_token_grid((64, 64), 2) == (32, 32)
    assert latent_token_grid((9, 13), 2) == (5, 7)  # padded to the patch
    assert latent_token_grid((21, 60, 104), (1, 2, 2)) == (21, 30, 52)
    assert latent_token_grid((8, 8), None) == (8, 8)
    assert latent_token_grid((8,), (4,)) == (2,)
    with pytest.raises(ValueError, match="1 to 3 positive dims"):
        latent_token_grid((1, 2, 3, 4), 2)
    with pytest.raises(ValueError, match="patch sizes must be positive"):
        latent_token_grid((8, 8), 0)


@pytest.mark.parametrize("pattern", [SlidingTilePattern(radius=1, block_size=8), TopKPattern(keep_ratio=0.5,
                                                                                             block_size=8)])
@pytest.mark.parametrize("skip_reshape", [False, True])
def test_packed_layout_returns_the_mask_and_matches_the_unpacked_call(pattern, skip_reshape):
    g = torch.Generator().manual_seed(0)
    b, h, d = 2, 3, 8
    layout = TokenLayout((12, 12), num_global=5)
    q, k, v = (torch.randn(b, h, layout.seq_len, d, generator=g) for _ in range(3))
    ref, ref_mask = sparse_attention(q, k, v, pattern, layout, backend="reference", return_mask=True)
    packed = [t if skip_reshape else t.transpose(1, 2).reshape(b, layout.seq_len, h * d) for t in (q, k, v)]
    out, mask = sparse_attention_packed(*packed, h, pattern, layout, skip_reshape=skip_reshape, backend="reference",
                                        return_mask=True)
    assert out.shape == (b, layout.seq_len, h * d)
    torch.testing.assert_close(out, ref.transpose(1, 2).reshape(b, layout.seq_len, h * d))
    assert torch.equal(mask.to_block_dense(), ref_mask.to_block_dense()) and mask.density() < 1
    plain = sparse_attention_packed(*packed, h, pattern, layout, skip_reshape=skip_reshape,
                                    skip_output_reshape=True, backend="reference")
    torch.testing.assert_close(plain, ref)
