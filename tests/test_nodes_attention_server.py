"""The sparse-attention node in a real ComfyUI 0.3.75 server: out-of-range settings fail their prompt with a clear
message and the server serves the next prompt (the sparse workflows themselves run in test_nodes_server.py)."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request

import pytest
import workflow_tools as wt

pytestmark = [pytest.mark.comfy, pytest.mark.slow]

WORKFLOW = "fewstep_digits_sparse_attention_top_k"


def _post_prompt(url: str, graph: dict) -> tuple[int, dict]:
    req = urllib.request.Request(f"{url}/prompt", data=json.dumps({"prompt": graph}).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _run(url: str, graph: dict, timeout: float = 300) -> dict:
    code, body = _post_prompt(url, graph)
    assert code == 200, body
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with urllib.request.urlopen(f"{url}/history/{body['prompt_id']}", timeout=30) as r:
            hist = json.load(r)
        entry = hist.get(body["prompt_id"])
        if entry and entry["status"].get("completed") is not None:
            return entry
        time.sleep(0.3)
    raise TimeoutError(f"prompt {body['prompt_id']} did not finish in {timeout}s")


def _error_message(entry: dict) -> str:
    for kind, data in entry["status"]["messages"]:
        if kind == "execution_error":
            return f"{data['node_type']}: {data['exception_message']}"
    return ""


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
