"""A tiny HTTP client for the ComfyUI server tests: queue a prompt, wait for it, read its errors and images.

Used with the session-scoped ``comfy_server`` fixture (tests/conftest.py), which yields ``(url, workdir)``.
"""

from __future__ import annotations

import io
import json
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any


def get(url: str, timeout: float = 30) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read()


def post_prompt(url: str, graph: dict) -> tuple[int, dict]:
    """``POST /prompt``: ``(HTTP status, body)``; a 400 carries ComfyUI's validation errors in ``node_errors``."""
    req = urllib.request.Request(f"{url}/prompt", data=json.dumps({"prompt": graph}).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def wait(url: str, prompt_id: str, timeout: float = 300) -> dict:
    """The ``/history`` entry of a finished prompt."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        hist = json.loads(get(f"{url}/history/{prompt_id}"))
        if prompt_id in hist and hist[prompt_id]["status"].get("completed") is not None:
            return hist[prompt_id]
        time.sleep(0.3)
    raise TimeoutError(f"prompt {prompt_id} did not finish in {timeout}s")


def run(url: str, graph: dict, timeout: float = 300) -> dict:
    """Queue ``graph`` (it must pass validation) and return its history entry once it finished."""
    code, body = post_prompt(url, graph)
    assert code == 200, body
    return wait(url, body["prompt_id"], timeout)


def error_message(entry: dict) -> str:
    """``"<node type>: <exception message>"`` of a failed prompt, ``""`` if it did not fail."""
    for kind, data in entry["status"]["messages"]:
        if kind == "execution_error":
            return f"{data['node_type']}: {data['exception_message']}"
    return ""


def image_bytes(url: str, entry: dict) -> list[bytes]:
    """The saved images of a prompt, as the PNG bytes ``/view`` serves."""
    out = []
    for node_out in entry["outputs"].values():
        for img in node_out.get("images", []):
            query = urllib.parse.urlencode({k: img[k] for k in ("filename", "subfolder", "type")})
            out.append(get(f"{url}/view?{query}"))
    return out


def images(url: str, entry: dict) -> list[Any]:
    """The saved images of a prompt as greyscale PIL images."""
    from PIL import Image

    return [Image.open(io.BytesIO(png)).convert("L") for png in image_bytes(url, entry)]


def with_inputs(graph: dict, class_type: str, **inputs: Any) -> dict:
    """A copy of ``graph`` with ``inputs`` set on its (first) node of ``class_type``."""
    graph = json.loads(json.dumps(graph))
    next(n for n in graph.values() if n["class_type"] == class_type)["inputs"].update(inputs)
    return graph
