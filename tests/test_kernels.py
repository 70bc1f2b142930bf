"""fewstep.kernels: the block-mask format, the dense reference, FlexAttention and the dispatch (CPU, small sizes).

The Triton kernel is tested in test_kernels_triton.py (interpreter subprocess, and CUDA when present)."""

from __future__ import annotations

import logging
import math

import pytest
import torch

from fewstep.kernels import (
    BlockSparseMask,
    block_sparse_attention,
    dense_attention,
    dense_masked_attention,
    flex_block_sparse_attention,
    reset_fallback_state,
    select_backend,
)


def random_mask(b, h, s, block, density=0.5, seed=0, s_kv=None, block_kv=None, empty_row=True):
    s_kv = s if s_kv is None else s_kv
    block_kv = block if block_kv is None else block_kv
    g = torch.Generator().manual_seed(seed)
    qb, kb = math.ceil(s / block), math.ceil(s_kv / block_kv)
    blocks = torch.rand(b, h, qb, kb, generator=g) < density
    blocks[..., 0, 0] = True
    if empty_row and qb > 1:
        blocks[0, 0, 1] = False  # one query block attends nothing
    return BlockSparseMask.from_block_dense(blocks, s, s_kv, block, block_kv)


def qkv(b, h, hk, s, d, dtype=torch.float32, seed=0, s_kv=None):
    g = torch.Generator().manual_seed(seed)
    s_kv = s if s_kv is None else s_kv
    q = torch.randn(b, h, s, d, generator=g).to(dtype)
    k = torch.randn(b, hk, s_kv, d, generator=g).to(dtype)
    v = torch.randn(b, hk, s_kv, d, generator=g).to(dtype)
    return q, k, v


def manual_reference(q, k, v, dense, scale=None):
    """Softmax attention written out (float64), zeros for rows with no key."""
    h, hk = q.shape[1], k.shape[1]
    k = k.double().repeat_interleave(h // hk, 1)
    v = v.double().repeat_interleave(h // hk, 1)
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = (q.double() @ k.transpose(-1, -2)) * scale
    s = s.masked_fill(~dense, float("-inf"))
    p = torch.softmax(s, -1).nan_to_num(0.0)
    return p @ v


# ------------------------------------------------------------------------------------------------- mask format
def test_mask_roundtrip_dense_csr_flex():
    m = random_mask(2, 3, 100, 32, seed=1)
    assert m.num_q_blocks == 4 and m.num_kv_blocks == 4
    dense = m.to_dense()
    assert dense.shape == (2, 3, 100, 100)
    assert torch.equal(BlockSparseMask.from_dense(dense, 32).to_block_dense(), m.to_block_dense())
    crow, col = m.to_csr()
    assert crow[-1] == col.numel() == int(m.to_block_dense().sum())
    fm = m.to_flex_block_mask()
    assert torch.equal(fm.to_dense().bool(), m.to_block_dense())
    # kept indices ascending within each row
    for row_n, row_i in zip(m.kv_num_blocks.reshape(-1), m.kv_indices.reshape(-1, m.kv_indices.shape[-1])):
        idx = row_i[: int(row_n)]
        assert torch.all(idx[1:] > idx[:-1])


def test_mask_transpose_density_and_union():
    m = random_mask(1, 2, 64, 16, seed=2)
    q_num, q_idx = m.transpose()
    blocks = m.to_block_dense()
    for h in range(2):
        for j in range(m.num_kv_blocks):
            kept = set(blocks[0, h, :, j].nonzero().flatten().tolist())
            assert set(q_idx[0, h, j, : q_num[0, h, j]].tolist()) == kept
    assert m.density() == pytest.approx(float(m.to_dense().float().mean()))
    full = BlockSparseMask.full(64, 64, 16)
    assert full.is_full() and full.density() == 1.0
    assert m.union(full).is_full()
    dh = m.with_dense_heads([1], 2)
    assert dh.to_block_dense()[:, 1].all() and torch.equal(dh.to_block_dense()[:, 0], blocks[:, 0])


def test_mask_density_counts_partial_blocks():
    m = BlockSparseMask.from_block_dense(torch.tensor([[True, False], [False, True]]), 40, 40, 32)
    assert m.density() == pytest.approx((32 * 32 + 8 * 8) / 1600)


def test_mask_rejects_bad_shapes():
    with pytest.raises(ValueError, match="query blocks"):
        BlockSparseMask(torch.ones(1, 1, 3, dtype=torch.int32), torch.zeros(1, 1, 3, 1, dtype=torch.int32), 100, 100,
                        32)
    with pytest.raises(TypeError):
        BlockSparseMask.from_block_dense(torch.ones(2, 2), 64, 64, 32)


# ------------------------------------------------------------------------------------------------ reference
def test_reference_matches_softmax_and_zero_rows():
    q, k, v = qkv(1, 2, 2, 50, 16)
    m = random_mask(1, 2, 50, 16, seed=3)
    out = dense_masked_attention(q, k, v, m)
    want = manual_reference(q, k, v, m.to_dense())
    assert (out.double() - want).abs().max() < 1e-5
    assert out[0, 0, 16:32].abs().max() == 0  # the empty query block
    assert torch.isfinite(out).all()


# ---------------------------------------------------------------------------------------------- flex (eager)
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("heads", [(4, 4), (4, 2), (4, 1)], ids=["mha", "gqa", "mqa"])
def test_flex_eager_equals_reference_fp32(d, heads):
    h, hk = heads
    s, block = 100, 32  # 100 is not a multiple of 32: padded last block
    q, k, v = qkv(2, h, hk, s, d, seed=d + hk)
    m = random_mask(2, h, s, block, seed=hk)
    out = flex_block_sparse_attention(q, k, v, m, compile=False)
    ref = dense_masked_attention(q, k, v, m)
    assert (out - ref).abs().max() <= 1e-5
    assert out[0, 0, 32:64].abs().max() == 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_flex_eager_half_precision(dtype):
    q, k, v = qkv(1, 2, 2, 72, 64, seed=5)
    m = random_mask(1, 2, 72, 16, seed=6)
    out = flex_block_sparse_attention(q.to(dtype), k.to(dtype), v.to(dtype), m, compile=False)
    ref = dense_masked_attention(q, k, v, m)
    assert out.dtype == dtype
    assert (out.float() - ref).abs().max() <= 2e-2


def test_flex_rectangular_blocks_and_broadcast_mask():
    q, k, v = qkv(2, 2, 2, 48, 32, s_kv=80, seed=7)
    m = random_mask(1, 1, 48, 16, seed=8, s_kv=80, block_kv=32)  # batch and heads broadcast
    out = flex_block_sparse_attention(q, k, v, m, compile=False)
    assert (out - dense_masked_attention(q, k, v, m)).abs().max() <= 1e-5


def test_full_mask_equals_dense_attention():
    q, k, v = qkv(1, 4, 2, 70, 64, seed=9)
    full = BlockSparseMask.full(70, 70, 32)
    ref = dense_attention(q, k, v)
    for backend in ("reference", "flex"):
        out = block_sparse_attention(q, k, v, full, backend=backend, compile=False)
        assert (out - ref).abs().max() <= 1e-5, backend


def test_gradients_flex_and_reference_agree():
    q, k, v = (t.requires_grad_() for t in qkv(1, 2, 1, 40, 16, seed=10))
    m = random_mask(1, 2, 40, 16, seed=11)
    g = torch.randn(1, 2, 40, 16)
    grads = {}
    for backend in ("reference", "flex"):
        out = block_sparse_attention(q, k, v, m, backend=backend, compile=False)
        grads[backend] = torch.autograd.grad(out, (q, k, v), g)
    for a, b in zip(grads["reference"], grads["flex"]):
        assert (a - b).abs().max() <= 1e-5


@pytest.mark.slow
def test_flex_compiled_cpu_equals_reference():
    """torch.compile'd FlexAttention on CPU (C++ kernel; ~10-40 s to compile)."""
    q, k, v = qkv(1, 2, 2, 100, 64, seed=12)
    m = random_mask(1, 2, 100, 32, seed=13)
    reset_fallback_state()
    out = flex_block_sparse_attention(q, k, v, m, compile=True)
    assert (out - dense_masked_attention(q, k, v, m)).abs().max() <= 1e-5


# ------------------------------------------------------------------------------------------------- dispatch
def test_dispatch_auto_on_cpu_picks_reference_for_short_and_flex_for_long():
    q, k, v = qkv(1, 1, 1, 64, 16)
    m = random_mask(1, 1, 64, 16)
    name, reasons = select_backend(q, k, v, m)
    assert name == "reference" and "CPU_FLEX_MIN_PAIRS" in reasons[0]
    big = torch.empty(1, 1, 2048, 16)
    name, _ = select_backend(big, big, big, BlockSparseMask.full(2048, 2048, 64))
    assert name == "flex"


def test_dispatch_unsupported_dtype_falls_back_and_says_so(caplog):
    reset_fallback_state()
    q, k, v = qkv(1, 2, 2, 40, 16, dtype=torch.float64)
    m = random_mask(1, 2, 40, 16)
    with caplog.at_level(logging.WARNING, logger="fewstep.kernels"):
        out = block_sparse_attention(q, k, v, m, backend="flex", compile=False)
    assert "float64" in caplog.text and "flex" in caplog.text
    assert (out - manual_reference(q, k, v, m.to_dense())).abs().max() < 1e-10
    name, reasons = select_backend(q, k, v, m, backend="triton")
    assert name == "reference" and any(r.startswith("triton:") for r in reasons)
    with pytest.raises(RuntimeError, match="cannot run"):
        block_sparse_attention(q, k, v, m, backend="flex", strict=True)


def test_dispatch_triton_on_cpu_without_interpreter_falls_back(caplog):
    reset_fallback_state()
    q, k, v = qkv(1, 2, 2, 40, 16)
    m = random_mask(1, 2, 40, 16)
    with caplog.at_level(logging.WARNING, logger="fewstep.kernels"):
        out = block_sparse_attention(q, k, v, m, backend="triton", compile=False)
    assert "triton" in caplog.text
    assert (out - dense_masked_attention(q, k, v, m)).abs().max() <= 1e-5


def test_dispatch_runtime_failure_falls_back(monkeypatch, caplog):
    import fewstep.kernels.dispatch as dispatch

    reset_fallback_state()

    def broken(*a, **kw):
        raise RuntimeError("simulated compiler error")

    monkeypatch.setattr(dispatch, "flex_block_sparse_attention", broken)
    q, k, v = qkv(1, 1, 1, 32, 16)
    m = random_mask(1, 1, 32, 16)
    with caplog.at_level(logging.WARNING, logger="fewstep.kernels"):
        out = block_sparse_attention(q, k, v, m, backend="flex")
    assert "simulated compiler error" in caplog.text
    assert (out - dense_masked_attention(q, k, v, m)).abs().max() <= 1e-6
    assert select_backend(q, k, v, m, backend="flex")[0] == "reference"  # remembered as broken
    reset_fallback_state()


@pytest.mark.parametrize("case", ["rank", "batch", "kv_mismatch", "head_dim", "gqa", "mask_len", "mask_heads",
                                  "dtype_mix", "int"])
def test_dispatch_rejects_bad_input(case):
    q, k, v = qkv(2, 4, 2, 32, 16)
    m = random_mask(1, 1, 32, 16)
    if case == "rank":
        q = q[0]
    elif case == "batch":
        k, v = k[:1], v[:1]
    elif case == "kv_mismatch":
        v = v[:, :, :16]
    elif case == "head_dim":
        k = torch.randn(2, 2, 32, 8)
    elif case == "gqa":
        k, v = torch.randn(2, 3, 32, 16), torch.randn(2, 3, 32, 16)
    elif case == "mask_len":
        m = random_mask(1, 1, 48, 16)
    elif case == "mask_heads":
        m = random_mask(1, 3, 32, 16)
    elif case == "dtype_mix":
        v = v.half()
    elif case == "int":
        q, k, v = (t.long() for t in (q, k, v))
    with pytest.raises((ValueError, TypeError)):
        block_sparse_attention(q, k, v, m)
