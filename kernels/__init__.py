"""fewstep.kernels: block-sparse attention kernels behind one dispatch.

- ``BlockSparseMask``: the one mask format (padded CSR of key blocks per query block; converts to a FlexAttention
  ``BlockMask`` and to a dense boolean mask).
- ``block_sparse_attention(q, k, v, block_mask, ...)``: picks Triton (CUDA), FlexAttention or the dense masked
  reference, falling back with a logged reason.
- ``triton_block_sparse_attention``, ``flex_block_sparse_attention``, ``dense_masked_attention``: the paths.

Pure torch at import time: triton and FlexAttention are imported when first used.
"""

from .block_mask import BlockSparseMask
from .dispatch import BACKENDS, block_sparse_attention, reset_fallback_state, select_backend, validate_inputs
from .flex import flex_available, flex_block_sparse_attention
from .reference import dense_attention, dense_masked_attention
from .triton_block_sparse import triton_available, triton_block_sparse_attention, triton_unsupported_reason

__all__ = [
    "BACKENDS",
    "BlockSparseMask",
    "block_sparse_attention",
    "dense_attention",
    "dense_masked_attention",
    "flex_available",
    "flex_block_sparse_attention",
    "reset_fallback_state",
    "select_backend",
    "triton_available",
    "triton_block_sparse_attention",
    "triton_unsupported_reason",
    "validate_inputs",
]
