"""The sparse-attention node in a real ComfyUI 0.3.75 server: out-of-range settings fail their prompt with a clear
message and the server serves the next prompt (the sparse workflows themselves run in test_nodes_server.py)."""

from __future__ import annotations

import json

import pytest
import workflow_tools as wt
from comfy_client import error_message as _error_message
from comfy_client import post_prompt as _post_prompt
from comfy_client import run as _run

pytestmark = [pytest.mark.comfy, pytest.mark.slow]

WORKFLOW = "fewstep_digits_sparse_attention_top_k"








def _with(**inputs) -> dict:
    graph = wt.load_api(WORKFLOW)
    next(n for n in graph.values() if n["class_type"] == "FewstepSparseAttention")["inputs"].update(inputs)
    return graph


def test_density_out_of_range_fails_clearly_and_the_server_keeps_serving(comfy_server):
    url, _ = comfy_server
    # above the declared maximum: ComfyUI's validation rejects the prompt, naming the limit
    code, body = _post_prompt(url, _with(density=1.5))
    assert code == 400 and "Value 1.5 bigger than max of 1.0" in json.dumps(body["node_errors"])
    # inside the widget's range but not a density: the node fails the prompt with fewstep's message
    entry = _run(url, _with(density=0.0))
    assert entry["status"]["status_str"] == "error"
    message = _error_message(entry)
    assert message.startswith("FewstepSparseAttention") and "density must be in (0, 1]" in message
    # ... and the next prompt runs
    entry = _run(url, _with(density=0.75))
    assert entry["status"]["status_str"] == "success", _error_message(entry)
