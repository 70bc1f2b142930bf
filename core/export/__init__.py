"""ONNX export of fewstep denoisers and a torch-free onnxruntime sampler.

- ``export_onnx(denoiser, path, ...)`` (torch + onnx): the network behind a ``Denoiser`` (or a ``CFGDenoiser`` with
  guidance folded in) to ONNX with fewstep metadata; ``convert_file_to_fp16(src, dst)`` for an existing export;
  ``export_onnx_atomic`` writes through a temporary file and a rename (no half-written file on failure).
- ``OnnxDenoiser``, ``generate`` (numpy + onnxruntime only): sample an export on the device.
- ``export_learned_cache`` / ``OnnxLearnedCacheDenoiser``: the same with a learned cache on (a full and a partial
  graph, switched per call by the exported skip plan); ``export_learned_plan`` / ``OnnxLearnedPlanDenoiser``: the same
  for a learned-cache plan (a block range and predictor per call: one partial graph per planned call).

Names resolve lazily so that importing this package imports neither torch nor onnxruntime; the runtime modules
(``runtime``, ``np_sampling``, ``metadata``) never import torch.
"""

from __future__ import annotations

from ..lazy import lazy_getattr

_LAZY = {
    "export_onnx": "exporter",
    "export_onnx_atomic": "atomic",
    "ExportResult": "exporter",
    "convert_to_fp16": "fp16",
    "convert_file_to_fp16": "fp16",
    "OnnxDenoiser": "runtime",
    "OnnxInputError": "runtime",
    "generate": "runtime",
    "resolve_sigmas": "runtime",
    "grid_uint8": "runtime",
    "OnnxModelError": "metadata",
    "export_learned_cache": "learned_cache",
    "OnnxLearnedCacheDenoiser": "cached_runtime",
    "export_learned_plan": "learned_plan",
    "OnnxLearnedPlanDenoiser": "cached_runtime",
    "METADATA_KEY": "metadata",
}

__all__ = sorted(_LAZY)
__getattr__ = lazy_getattr(__name__, _LAZY)
