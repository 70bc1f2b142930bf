"""The Triton block-sparse flash-attention kernel (forward and backward) against the dense masked reference.

On CPU the kernel runs in Triton's interpreter. Triton fixes interpreter mode when it is imported, so those cases
run in one subprocess started with ``TRITON_INTERPRET=1`` (this file run as a script) and the tests read its JSON.
On a CUDA machine the same cases also run compiled (marked ``gpu``). Everything skips when triton is not installed.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HAS_TRITON = importlib.util.find_spec("triton") is not None

# name -> (B, H, Hkv, S, D, block, block_kv, dtype, backward)
CASES = {
    "d64_pad_fp32": (1, 2, 2, 40, 64, 16, 16, "float32", False),
    "d128_pad_fp32": (1, 1, 1, 40, 128, 16, 16, "float32", False),
    "gqa_fp32": (1, 4, 2, 33, 32, 16, 16, "float32", False),
    "mqa_fp32": (2, 2, 1, 33, 24, 16, 16, "float32", False),
    "subtiles_fp32": (1, 1, 1, 80, 32, 32, 64, "float32", False),
    "fp16": (1, 2, 2, 40, 64, 16, 16, "float16", False),
    "bf16": (1, 2, 2, 40, 64, 16, 16, "bfloat16", False),
    "full_mask_fp32": (1, 2, 2, 40, 32, 16, 16, "float32", False),
    "bwd_fp32": (1, 2, 2, 40, 64, 16, 16, "float32", True),
    "bwd_gqa_fp32": (1, 4, 2, 33, 32, 16, 16, "float32", True),
    "bwd_fp16": (1, 2, 1, 40, 64, 16, 32, "float16", True),
    "bwd_bf16": (1, 2, 2, 40, 64, 16, 16, "bfloat16", True),
}


def run_case(name: str, device: str = "cpu") -> dict[str, float]:
    """Max |triton - reference| over the output (and dq, dk, dv for backward cases)."""
    from fewstep.kernels import BlockSparseMask, dense_attention, dense_masked_attention
    from fewstep.kernels.triton_block_sparse import triton_block_sparse_attention

    b, h, hk, s, d, block, block_kv, dtype, backward = CASES[name]
    dtype = getattr(torch, dtype)
    g = torch.Generator().manual_seed(len(name))
    qb, kb = math.ceil(s / block), math.ceil(s / block_kv)
    blocks = torch.rand(1, h, qb, kb, generator=g) < 0.5
    blocks[..., 0, 0] = True
    if qb > 1:
        blocks[0, 0, 1] = False  # an empty query block: zeros
    if name.startswith("full"):
        blocks[:] = True
    mask = BlockSparseMask.from_block_dense(blocks, s, s, block, block_kv).to(device)
    q = torch.randn(b, h, s, d, generator=g)
    k = torch.randn(b, hk, s, d, generator=g)
    v = torch.randn(b, hk, s, d, generator=g)
    ref_in = [t.to(device).requires_grad_(backward) for t in (q, k, v)]
    tri_in = [t.to(device, dtype).requires_grad_(backward) for t in (q, k, v)]
    out = triton_block_sparse_attention(*tri_in, mask)
    ref = dense_masked_attention(*ref_in, mask)
    res = {"out": float((out.float() - ref).detach().abs().max())}
    if qb > 1 and not name.startswith("full"):
        res["empty_rows"] = float(out[0, 0, block: 2 * block].detach().abs().max())
    if name.startswith("full"):
        res["vs_dense"] = float((out.float() - dense_attention(*ref_in)).detach().abs().max())
    if backward:
        go = torch.randn(b, h, s, d, generator=g).to(device)
        gt = torch.autograd.grad(out, tri_in, go.to(dtype))
        gr = torch.autograd.grad(ref, ref_in, go)
        for n, a, r in zip(("dq", "dk", "dv"), gt, gr):
            res[n] = float((a.float() - r).abs().max())
    return res


@pytest.fixture(scope="module")
def interpreter_results() -> dict[str, dict[str, float]]:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve())], env=env, capture_output=True, text=True,
                          timeout=900)
    if proc.returncode != 0:
        pytest.fail(f"interpreter subprocess failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _tol(name: str) -> float:
    return 2e-2 if ("fp16" in name or "bf16" in name) else 1e-5


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.parametrize("name", list(CASES))
def test_triton_interpreter_matches_reference(interpreter_results, name):
    res = interpreter_results[name]
    assert "error" not in res, res.get("error")
    for key, err in res.items():
        assert err <= _tol(name), f"{name}: {key} differs by {err}"


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_dispatch_uses_triton_under_interpreter(interpreter_results):
    assert interpreter_results["_dispatch"]["backend"] == "triton"


@pytest.mark.slow
@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_triton_kernels_compile_for_h100():
    """The GPU code path without a GPU: forward and backward kernels compile to sm_90 cubins (bf16, head dim 64)."""
    from fewstep.kernels.triton_block_sparse import compile_for_target

    try:
        shared = compile_for_target(90, "bf16", 64, 64)
    except (ImportError, ModuleNotFoundError) as e:  # a triton build without the nvidia backend
        pytest.skip(f"triton cannot target CUDA here: {e}")
    assert set(shared) == {"fwd_kernel", "bwd_dkdv_kernel", "bwd_dq_kernel"}
    assert max(shared.values()) < 228 * 1024  # fits the H100's shared memory per block


@pytest.mark.gpu
@pytest.mark.skipif(not (HAS_TRITON and torch.cuda.is_available()), reason="needs triton and a CUDA device")
@pytest.mark.parametrize("name", list(CASES))
def test_triton_cuda_matches_reference(name):
    res = run_case(name, "cuda")
    for key, err in res.items():
        assert err <= _tol(name), f"{name}: {key} differs by {err}"


@pytest.mark.gpu
@pytest.mark.skipif(not (HAS_TRITON and torch.cuda.is_available()), reason="needs triton and a CUDA device")
def test_dispatch_picks_triton_on_cuda():
    from fewstep.kernels import BlockSparseMask, select_backend

    q = torch.randn(1, 2, 256, 64, device="cuda", dtype=torch.bfloat16)
    assert select_backend(q, q, q, BlockSparseMask.full(256, 256, 64))[0] == "triton"


def _main() -> None:  # run by interpreter_results with TRITON_INTERPRET=1
    import triton  # noqa: F401  (imported first, in interpreter mode)

    from fewstep.kernels import BlockSparseMask, select_backend

    torch.manual_seed(0)
    results: dict[str, dict] = {}
    for name in CASES:
        try:
            results[name] = run_case(name)
        except Exception as e:  # report per case, keep going
            results[name] = {"error": f"{type(e).__name__}: {e}"}
    q = torch.randn(1, 1, 32, 16)
    results["_dispatch"] = {"backend": select_backend(q, q, q, BlockSparseMask.full(32, 32, 16), "triton")[0]}
    print(json.dumps(results))


if __name__ == "__main__":
    _main()
