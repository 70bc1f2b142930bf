"""The guidance-adapter node in a real ComfyUI 0.3.75 server: an adapter loaded onto a model it was not distilled
from fails its prompt with a message naming both models and the fix, and the server serves the next prompt (the
adapter workflow itself runs in test_nodes_server.py)."""

from __future__ import annotations

import json

import pytest
import workflow_tools as wt
from comfy_client import error_message as _error_message
from comfy_client import run as _run

pytestmark = [pytest.mark.comfy, pytest.mark.slow]

WORKFLOW = "fewstep_digits_guidance_adapter"









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
