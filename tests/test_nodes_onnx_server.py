"""ONNX nodes in a real ComfyUI 0.3.75 server (the shared ``comfy_server`` fixture): a prompt that exports the
embedded consistency student and samples the file on onnxruntime, the same file loaded from ``models/onnx`` by name
in a second prompt (same images), and bad files that fail their prompt cleanly while the server keeps serving."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

pytest.importorskip("onnxruntime")

import comfy_versions  # noqa: E402
import workflow_tools as wt  # noqa: E402
from comfy_client import error_message as _error  # noqa: E402
from comfy_client import get as _get  # noqa: E402
from comfy_client import image_bytes as _images  # noqa: E402
from comfy_client import run as _run  # noqa: E402

pytestmark = [pytest.mark.comfy, pytest.mark.slow]











def _pixels(png: bytes):
    import io

    import numpy as np
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(png)).convert("L"))


def _student_graph() -> dict:
    return wt.load_api("fewstep_digits_onnx_student")  # the shipped teacher: a missing file fails the run


def _by_name(graph: dict, onnx_name: str) -> dict:
    """The student graph without the export: the loader reads ``onnx_name`` (sigmas from the schedule node)."""
    g = json.loads(json.dumps(graph))
    export = next(k for k, n in g.items() if n["class_type"] == "FewstepOnnxExport")
    del g[export]
    loader = next(n for n in g.values() if n["class_type"] == "FewstepOnnxLoader")
    loader["inputs"]["onnx_name"] = onnx_name
    del loader["inputs"]["path"]
    return g


def test_export_and_sample_in_one_prompt_then_load_the_file_by_name(comfy_server):
    url, workdir = comfy_server
    graph = _student_graph()
    start = time.monotonic()
    entry = _run(url, graph)
    assert entry["status"]["status_str"] == "success", _error(entry)
    first = _images(url, entry)
    assert len(first) == 8
    text = next(o["text"][0] for o in entry["outputs"].values() if "text" in o)  # the export node's UI text
    written = Path(text.split(" (")[0])
    assert written.is_file() and written.is_relative_to(workdir / "output") and written.suffix == ".onnx"
    print(f"\nexport + 4-step ONNX sampling prompt: {time.monotonic() - start:.1f}s; {text}")

    # the same file put into models/onnx and picked by name: same images (same file, noise and sigmas)
    models = workdir / "models" / "onnx"
    models.mkdir(parents=True, exist_ok=True)
    shutil.copy(written, models / "copied_student.onnx")
    info = json.loads(_get(f"{url}/object_info/FewstepOnnxLoader"))["FewstepOnnxLoader"]
    assert "copied_student.onnx" in info["input"]["required"]["onnx_name"][1]["options"]
    again = _run(url, _by_name(graph, "copied_student.onnx"))
    assert again["status"]["status_str"] == "success", _error(again)
    second = _images(url, again)
    assert len(second) == 8
    assert all((_pixels(a) == _pixels(b)).all() for a, b in zip(first, second))


def test_bad_onnx_files_fail_their_prompt_and_the_server_keeps_serving(comfy_server):
    url, workdir = comfy_server
    models = workdir / "models" / "onnx"
    models.mkdir(parents=True, exist_ok=True)
    (models / "corrupt.onnx").write_bytes(b"\x08\x07not an onnx model" * 8)
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    plain = helper.make_model(helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [x], [y]))
    (models / "plain.onnx").write_bytes(plain.SerializeToString())
    graph = _student_graph()
    # a file that is not there: ComfyUI >= 0.7.0 rejects the combo value at POST /prompt, older ones run the loader
    comfy_versions.assert_bad_combo_rejected(url, _by_name(graph, "missing.onnx"), "missing.onnx",
                                             "ONNX file 'missing.onnx' not found")
    for name, message in (("corrupt.onnx", "not a valid ONNX model"),
                          ("plain.onnx", "has no 'fewstep' metadata")):
        entry = _run(url, _by_name(graph, name))
        assert entry["status"]["status_str"] == "error", name
        err = _error(entry)
        assert err.startswith("FewstepOnnxLoader: ") and message in err, err
    # a path outside the allowed folders is refused, whatever the file
    g = json.loads(json.dumps(graph))
    export = next(k for k, n in g.items() if n["class_type"] == "FewstepOnnxExport")
    g[export]["inputs"]["filename_prefix"] = "../../outside"
    entry = _run(url, g)
    assert entry["status"]["status_str"] == "error" and "outside the output folder" in _error(entry), _error(entry)
    # ... and the server still serves the next prompt
    entry = _run(url, graph)
    assert entry["status"]["status_str"] == "success", _error(entry)
