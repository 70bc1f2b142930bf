"""The guidance-adapter node in a real ComfyUI 0.3.75 server: an adapter loaded onto a model it was not distilled
from fails its prompt with a message naming both models and the fix, and the server serves the next prompt (the
adapter workflow itself runs in test_nodes_server.py)."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request

import pytest
import workflow_tools as wt

pytestmark = [pytest.mark.comfy, pytest.mark.slow]

WORKFLOW = "fewstep_digits_guidance_adapter"


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



def test_adapter_for_another_base_model_fails_clearly_and_the_server_keeps_serving(comfy_server):
    url, _ = comfy_server
    graph = wt.load_api(WORKFLOW)
    wrong = json.loads(json.dumps(graph))
    next(n for n in wrong.values() if n["class_type"] == "FewstepDigitsModelLoader")["inputs"]["model_name"] = \
        "digits_dit_random_init"
    entry = _run(url, wrong)
    assert entry["status"]["status_str"] == "error"
    message = _error_message(entry)
    assert message.startswith("FewstepGuidanceAdapterLoader")
    assert "digits_agd_adapter.safetensors was trained for base model 'digits-dit-teacher'" in message
    assert "the connected MODEL, DigitsDiTConfig / DigitsDiTNet" in message
    assert "model_name 'digits_dit_teacher'" in message
    entry = _run(url, graph)  # the same graph on the teacher runs
    assert entry["status"]["status_str"] == "success", _error_message(entry)
