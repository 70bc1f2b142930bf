"""fewstep.core.attention: token layouts, sliding-tile and top-k patterns, schedules, sparse_attention."""

from __future__ import annotations

import math

import pytest
import torch

from fewstep.core.attention import (
    SlidingTilePattern,
    SparsitySchedule,
    TokenLayout,
    TopKPattern,
    block_boxes,
    default_tile,
    pattern_mask,
    radius_for_density,
    sliding_tile_block_mask,
    sparse_attention,
    sparse_attention_packed,
    tile_permutation,
    topk_block_mask,
)
from fewstep.kernels import BlockSparseMask, dense_attention, dense_masked_attention


# ---------------------------------------------------------------------------------------------------- layout
@pytest.mark.parametrize("grid,tile", [((8, 8), (4, 4)), ((6, 10), (4, 4)), ((4, 6, 6), (2, 4, 4)), ((37,), (8,))])
@pytest.mark.parametrize("num_global,first", [(0, True), (5, True), (3, False)])
def test_tile_permutation_is_a_bijection_with_contiguous_tiles(grid, tile, num_global, first):
    layout = TokenLayout(grid, num_global, first)
    perm = tile_permutation(layout, tile)
    assert sorted(perm.tolist()) == list(range(layout.seq_len))
    g0 = num_global if first else 0
    spatial = perm[: layout.num_spatial] - g0
    assert spatial.min() >= 0 and spatial.max() < layout.num_spatial  # grid tokens first, globals last
    coords = torch.stack(torch.unravel_index(spatial, grid), -1)
    tile_id = coords // torch.tensor(tile)
    # tile ids are non-decreasing runs: each tile's tokens are contiguous
    keys = [tuple(t) for t in tile_id.tolist()]
    seen, prev = set(), None
    for key in keys:
        if key != prev:
            assert key not in seen
            seen.add(key)
            prev = key


def test_layout_for_sequence_and_validation():
    assert TokenLayout.for_sequence(70, (8, 8)) == TokenLayout((8, 8), 6, True)
    assert TokenLayout.for_sequence(50, (8, 8)).grid == (50,)
    with pytest.raises(ValueError):
        TokenLayout((0, 4))
    assert default_tile(2, 64) == (8, 8) and default_tile(3, 64) == (4, 4, 4) and default_tile(1, 64) == (64,)


# ----------------------------------------------------------------------------------------------- sliding tile
def test_sliding_tile_radius_zero_is_block_diagonal_when_blocks_are_tiles():
    layout = TokenLayout((8, 8))
    m = sliding_tile_block_mask(layout, 0, 16, tile=(4, 4))
    assert torch.equal(m.to_block_dense()[0, 0], torch.eye(4, dtype=torch.bool))


def test_sliding_tile_matches_tile_neighbourhood_2d():
    layout = TokenLayout((16, 16))
    m = sliding_tile_block_mask(layout, 1, 16, tile=(4, 4))  # radius 1 token: the 3x3 neighbouring tiles
    blocks = m.to_block_dense()[0, 0]
    ty, tx = torch.meshgrid(torch.arange(4), torch.arange(4), indexing="ij")
    ty, tx = ty.flatten(), tx.flatten()
    want = ((ty[:, None] - ty[None, :]).abs() <= 1) & ((tx[:, None] - tx[None, :]).abs() <= 1)
    assert torch.equal(blocks, want)


def test_sliding_tile_3d_with_globals():
    layout = TokenLayout((4, 16, 16), num_global=10, global_first=True)
    pat = SlidingTilePattern(radius=(0, 2, 2), block_size=64, tile=(4, 4, 4))
    m = pat.static_mask(layout)
    assert m.q_len == m.kv_len == 1034
    blocks = m.to_block_dense()[0, 0]
    assert blocks[-1].all() and blocks[:, -1].all()  # the global block attends and is attended by everything
    # 4x4 spatial tiles (each spanning the 4 frames): a tile sees its 3x3 tile neighbourhood
    ty, tx = torch.meshgrid(torch.arange(4), torch.arange(4), indexing="ij")
    ty, tx = ty.flatten(), tx.flatten()
    want = ((ty[:, None] - ty[None, :]).abs() <= 1) & ((tx[:, None] - tx[None, :]).abs() <= 1)
    assert torch.equal(blocks[:16, :16], want)
    assert 0 < m.density() < 1


def test_density_grows_with_radius_and_radius_for_density():
    layout = TokenLayout((16, 16))
    dens = [sliding_tile_block_mask(layout, r, 16, tile=(4, 4)).density() for r in range(0, 14, 2)]
    assert all(a <= b for a, b in zip(dens, dens[1:])) and dens[-1] == 1.0
    r, d = radius_for_density(layout, 0.5, 16, (4, 4))
    assert abs(d - 0.5) < 0.2


def test_block_boxes_mark_globals_and_partial_blocks():
    layout = TokenLayout((4, 4), num_global=3)
    lo, hi, glob = block_boxes(layout, tile_permutation(layout, (2, 2)), 4)
    assert glob.tolist() == [False, False, False, False, True]
    assert lo[0].tolist() == [0, 0] and hi[0].tolist() == [1, 1]


# ---------------------------------------------------------------------------------------------------- top-k
def test_topk_keep_ratio_keeps_exact_count_and_best_blocks():
    torch.manual_seed(0)
    q = torch.randn(2, 3, 64, 16)
    k = torch.randn(2, 3, 64, 16)
    m = topk_block_mask(q, k, 8, keep_ratio=0.25)
    assert (m.kv_num_blocks == 2).all()
    # the kept blocks are the two highest pooled scores
    pq, pk = q.view(2, 3, 8, 8, 16).mean(3), k.view(2, 3, 8, 8, 16).mean(3)
    s = pq @ pk.transpose(-1, -2)
    top = s.topk(2, dim=-1).indices.sort(-1).values
    assert torch.equal(m.kv_indices[..., :2].long(), top)


def test_topk_mass_threshold_and_include():
    torch.manual_seed(1)
    q = torch.randn(1, 2, 48, 8) * 3
    k = torch.randn(1, 1, 48, 8) * 3  # MQA: pooled k shared by both heads
    include = BlockSparseMask.from_block_dense(torch.eye(6, dtype=torch.bool), 48, 48, 8)
    lo = topk_block_mask(q, k, 8, mass=0.3, include=include)
    hi = topk_block_mask(q, k, 8, mass=0.99, include=include)
    assert (lo.to_block_dense() <= hi.to_block_dense()).all()
    assert lo.to_block_dense()[..., torch.arange(6), torch.arange(6)].all()  # diagonal always kept
    assert hi.density() > lo.density()
    # kept mass reaches the threshold
    pq, pk = q.view(1, 2, 6, 8, 8).mean(3), k.view(1, 1, 6, 8, 8).mean(3)
    p = torch.softmax(pq @ pk.transpose(-1, -2) / math.sqrt(8) + math.log(8), -1)
    assert ((p * hi.to_block_dense()).sum(-1) >= 0.99 - 1e-6).all()
    with pytest.raises(ValueError):
        topk_block_mask(q, k, 8)


def test_topk_pads_partial_blocks():
    q, k = torch.randn(1, 1, 50, 8), torch.randn(1, 1, 50, 8)
    m = topk_block_mask(q, k, 16, keep_ratio=0.5)
    assert m.num_q_blocks == 4 and (m.kv_num_blocks == 2).all()


# ------------------------------------------------------------------------------------------ sparse_attention
@pytest.mark.parametrize("pattern", [SlidingTilePattern(radius=2, block_size=16, tile=(4, 4)),
                                     TopKPattern(keep_ratio=0.4, block_size=16, tile=(4, 4)),
                                     TopKPattern(mass=0.8, block_size=16, tile=(4, 4))])
def test_sparse_attention_equals_masked_reference_in_original_order(pattern):
    torch.manual_seed(2)
    layout = TokenLayout((8, 8), num_global=5)
    q, k, v = torch.randn(2, 4, 69, 32), torch.randn(2, 2, 69, 32), torch.randn(2, 2, 69, 32)
    out = sparse_attention(q, k, v, pattern, layout, backend="reference")
    perm, mask = pattern_mask(q, k, pattern, layout)
    # the mask over original positions: M[perm[i], perm[j]] = mask[i, j]
    dense = torch.zeros(mask.shape[0], mask.shape[1], 69, 69, dtype=torch.bool)
    dense[:, :, perm[:, None], perm[None, :]] = mask.to_dense()
    assert (out - dense_masked_attention(q, k, v, dense)).abs().max() <= 1e-5
    flex = sparse_attention(q, k, v, pattern, layout, backend="flex", compile=False)
    assert (flex - out).abs().max() <= 1e-5


def test_sparse_attention_full_pattern_equals_dense():
    torch.manual_seed(3)
    layout = TokenLayout((6, 6), num_global=4)
    q, k, v = (torch.randn(1, 2, 40, 16) for _ in range(3))
    for pattern in (SlidingTilePattern(radius=100, block_size=16), TopKPattern(keep_ratio=1.0, block_size=16)):
        out = sparse_attention(q, k, v, pattern, layout, backend="reference")
        assert (out - dense_attention(q, k, v)).abs().max() <= 1e-5


def test_sparse_attention_dense_heads_and_checks():
    torch.manual_seed(4)
    q, k, v = (torch.randn(1, 2, 64, 16) for _ in range(3))
    pat = SlidingTilePattern(radius=0, block_size=16, tile=(4, 4))
    out = sparse_attention(q, k, v, pat, TokenLayout((8, 8)), dense_heads=[1], backend="reference")
    assert (out[:, 1] - dense_attention(q, k, v)[:, 1]).abs().max() <= 1e-5
    assert (out[:, 0] - dense_attention(q, k, v)[:, 0]).abs().max() > 1e-3
    with pytest.raises(ValueError, match="describes"):
        sparse_attention(q, k, v, pat, TokenLayout((4, 4)))


def test_sparse_attention_packed_layout():
    torch.manual_seed(5)
    q, k, v = (torch.randn(2, 3, 36, 8) for _ in range(3))
    pat = TopKPattern(keep_ratio=0.5, block_size=8, tile=(2, 4))
    layout = TokenLayout((6, 6))
    want = sparse_attention(q, k, v, pat, layout, backend="reference")
    packed = [t.transpose(1, 2).reshape(2, 36, 24) for t in (q, k, v)]
    got = sparse_attention_packed(*packed, 3, pat, layout, backend="reference")
    assert got.shape == (2, 36, 24)
    assert (got.view(2, 36, 3, 8).transpose(1, 2) - want).abs().max() <= 1e-6
    assert torch.equal(sparse_attention_packed(q, k, v, 3, pat, layout, skip_reshape=True, skip_output_reshape=True,
                                               backend="reference"), want)


# --------------------------------------------------------------------------------------------------- schedule
def test_schedule():
    s = SparsitySchedule(dense_steps=2, dense_layers=[0], dense_heads=[3, 1])
    assert s.is_dense(0, 5) and s.is_dense(1, 5) and not s.is_dense(2, 5)
    assert s.is_dense(7, 0) and not s.is_dense(None, 4)
    assert s.dense_heads == (1, 3)
    with pytest.raises(ValueError):
        SparsitySchedule(dense_steps=-1)
