"""End to end in a real ComfyUI 0.3.75 server (``main.py --cpu``) with fewstep in its custom nodes folder, and the
ComfyUI web frontend it serves, driven by headless Chromium (Debian ``chromium`` + ``pip install playwright``).

One server serves the whole module: ``/object_info`` lists every fewstep node, every API-format workflow on the
embedded model runs (``POST /prompt``, ``/history``, ``/view``) and the shipped digit classifier recognises the
requested digit in its images, bad inputs fail their prompt with a clear message while the server keeps serving,
and the frontend finds the nodes in its node search and loads fewstep's workflows from the template browser.
Screenshots go to ``tests/artifacts/`` (git-ignored).
"""

from __future__ import annotations

import json
import math
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.comfy, pytest.mark.slow]

ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
MIN_ACCURACY = 0.75

SAMPLER_NODES = {
    "FewstepSamplerLCM", "FewstepSamplerTCD", "FewstepSamplerDMD", "FewstepSamplerFlowMap", "FewstepSamplerOneStep",
    "FewstepSamplerHybrid", "FewstepSamplerTeacher", "FewstepTimestepSchedule", "FewstepScheduleSearch",
    "FewstepPresetSchedule",
}
EMBEDDED_NODES = {
    "FewstepDigitsModelLoader", "FewstepDigitsClassCondition", "FewstepDigitsEmptyLatent",
    "FewstepDigitsLatentToImage",
}
CACHE_NODES = {"FewstepStepCache", "FewstepBlockCache", "FewstepLearnedCache", "FewstepCacheCalibrate"}
ATTENTION_NODES: set[str] = {"FewstepSparseAttention"}
GUIDANCE_NODES: set[str] = {"FewstepGuidanceAdapterLoader"}
ONNX_NODES: set[str] = {"FewstepOnnxExport", "FewstepOnnxLoader"}
FEWSTEP_NODES = SAMPLER_NODES | EMBEDDED_NODES | CACHE_NODES | ATTENTION_NODES | GUIDANCE_NODES | ONNX_NODES




import comfy_versions  # noqa: E402
import workflow_tools as wt  # noqa: E402
from comfy_client import error_message as _error_message  # noqa: E402
from comfy_client import get as _get  # noqa: E402
from comfy_client import images as _images  # noqa: E402
from comfy_client import post_prompt as _post_prompt  # noqa: E402
from comfy_client import run as _run  # noqa: E402
from comfy_client import wait as _wait  # noqa: E402

EMBEDDED = sorted(name for name, graph in wt.embedded_workflows().items())


# ----------------------------------------------------------------------------------------------- helpers














def _digits_from_images(images: list, scale: int) -> torch.Tensor:
    """Saved 8-bit PNGs (nearest-upscaled by ``scale``) back to the (N, 1, 16, 16) [-1, 1] classifier input."""
    import numpy as np

    arr = np.stack([np.asarray(im, dtype=np.float32)[::scale, ::scale] for im in images]) / 255.0
    return torch.from_numpy(arr).unsqueeze(1) * 2 - 1


def _graph(name: str) -> dict:
    return wt.load_api(name)  # the shipped teacher: a missing file fails the run


# ----------------------------------------------------------------------------------------------- server


@pytest.fixture(scope="module")
def server(comfy_server):
    return comfy_server


def test_object_info_lists_every_fewstep_node(server):
    url, workdir = server
    info = json.loads(_get(f"{url}/object_info"))
    ours = {k: v for k, v in info.items() if k.startswith("Fewstep")}
    assert set(ours) == FEWSTEP_NODES
    for node_id, node in ours.items():
        assert node["category"].startswith("fewstep/"), node_id
        assert node["python_module"] == "custom_nodes.fewstep"
        for group in ("required", "optional"):
            for name, spec in node["input"].get(group, {}).items():
                assert spec[1].get("tooltip"), f"{node_id}.{name} has no tooltip"
    log = (workdir / "server.log").read_text(errors="replace")
    fewstep_lines = [line for line in log.splitlines() if "custom_nodes/fewstep" in line]
    assert fewstep_lines and not any("IMPORT FAILED" in line or "Cannot import" in line for line in fewstep_lines)
    assert "node family" not in log  # no fewstep family was skipped


def test_template_browser_lists_fewstep_workflows(server):
    url, _ = server
    listed = json.loads(_get(f"{url}/workflow_templates"))
    shipped = sorted(p.stem for p in wt.WORKFLOWS.glob("*.json"))
    assert shipped and sorted(listed["fewstep"]) == shipped  # API twins in workflows/api are not templates
    for name in shipped:
        ui = json.loads(_get(f"{url}/api/workflow_templates/fewstep/{name}.json"))
        assert ui["nodes"] and ui["links"] and "version" in ui, name
    for name in EMBEDDED:  # thumbnails: the workflow's own output
        assert _get(f"{url}/api/workflow_templates/fewstep/{name}.jpg")[:3] == b"\xff\xd8\xff"


@pytest.mark.parametrize("name", EMBEDDED)
def test_embedded_workflow_runs_and_draws_the_requested_digit(server, name):
    url, _ = server
    graph = _graph(name)
    digit, batch = wt.requested(graph)
    entry = _run(url, graph)
    assert entry["status"]["status_str"] == "success", _error_message(entry)
    images = _images(url, entry)
    scale = next(n["inputs"]["scale"] for n in graph.values() if n["class_type"] == "FewstepDigitsLatentToImage")
    assert len(images) == batch and images[0].size == (16 * scale, 16 * scale)
    if "schedule_search" in name:
        report = json.loads(next(o["text"][0] for o in entry["outputs"].values() if "text" in o))
        assert report["steps"] == 4 and report["sigmas"][-1] == 0
    from fewstep.core.metrics import class_accuracy

    acc = class_accuracy(_digits_from_images(images, scale), torch.full((batch,), digit))
    assert acc >= MIN_ACCURACY, f"{name}: classifier recognised digit {digit} in {acc:.0%} of the images"


def test_bad_inputs_fail_their_prompt_clearly_and_the_server_keeps_serving(server):
    url, _ = server
    base = _graph("fewstep_digits_lcm")

    def with_input(class_type: str, **inputs) -> dict:
        graph = json.loads(json.dumps(base))
        node = next(n for n in graph.values() if n["class_type"] == class_type)
        node["inputs"].update(inputs)
        return graph

    # unknown model file: ComfyUI >= 0.7.0 rejects it at POST /prompt (value_not_in_list, naming it); 0.3.75 does not
    # check V3 combo values itself, so the loader names it and the choices (comfy_versions.assert_bad_combo_rejected)
    comfy_versions.assert_bad_combo_rejected(
        url, with_input("FewstepDigitsModelLoader", model_name="no_such_model"), "no_such_model",
        "unknown digits model 'no_such_model'; choose one of ['digits_dit_teacher'")

    # out-of-range value: rejected by validation with the limit
    tcd = _graph("fewstep_digits_tcd")
    next(n for n in tcd.values() if n["class_type"] == "FewstepSamplerTCD")["inputs"]["gamma"] = 1.5
    code, body = _post_prompt(url, tcd)
    assert code == 400 and "Value 1.5 bigger than max of 1.0" in json.dumps(body["node_errors"])

    # bad values only the node can judge: the prompt fails at run time with fewstep's message
    for inputs, message in ((dict(timesteps="999,abc"), "timesteps: 'abc' is not a number"),
                            (dict(timesteps="1500,999"), "outside this model's range [0, 999]"),
                            (dict(timesteps="249,999"), "strictly decreasing")):
        entry = _run(url, with_input("FewstepTimestepSchedule", **inputs))
        assert entry["status"]["status_str"] == "error"
        assert message in _error_message(entry) and "FewstepTimestepSchedule" in _error_message(entry)

    # ... and the server still serves the next prompt
    entry = _run(url, with_input("FewstepDigitsEmptyLatent", batch_size=2))
    assert entry["status"]["status_str"] == "success", _error_message(entry)
    assert len(_images(url, entry)) == 2


# --------------------------------------------------------------------------------------------- frontend


@pytest.fixture(scope="module")
def page(server):
    playwright_api = pytest.importorskip("playwright.sync_api", reason="frontend test needs `pip install playwright`")
    chromium = wt.chromium_path()
    if chromium is None:
        pytest.skip("frontend test needs Debian's chromium (`apt-get install -y chromium`)")
    url, _ = server
    ARTIFACTS.mkdir(exist_ok=True)
    # a returning user: no first-run template dialog over the canvas
    req = urllib.request.Request(f"{url}/settings/Comfy.TutorialCompleted", data=b"true", method="POST")
    urllib.request.urlopen(req, timeout=30).close()
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        pg = browser.new_page(viewport={"width": 1600, "height": 1000})
        errors: list[str] = []
        pg.on("pageerror", lambda e: errors.append(str(e)))
        wt.open_app(pg, url)
        pg.errors = errors
        yield pg
        browser.close()


VISIBLE_ITEMS_JS = "() => Array.from(document.querySelectorAll('li')).filter(e => e.offsetParent !== null)" \
                   ".map(e => e.innerText.replace(/\\s+/g, ' '))"


def _close_dialogs(page) -> None:
    """Close whatever the frontend opened by itself (a fresh user gets the template browser on first start)."""
    for _ in range(3):
        if page.locator(".p-dialog-mask").count() == 0:
            return
        page.keyboard.press("Escape")
        page.wait_for_timeout(300)


def test_frontend_node_search_finds_fewstep_nodes(server, page):
    url, _ = server
    info = json.loads(_get(f"{url}/object_info"))
    titles = {info[n]["display_name"] for n in FEWSTEP_NODES}
    _close_dialogs(page)
    page.evaluate("() => window.app.graph.clear()")
    page.locator("#graph-canvas").dblclick(position={"x": 800, "y": 500})  # opens ComfyUI's node search
    # 0.3.75's frontend labels the box "Search Nodes..."; newer frontends focus their own search input
    box = page.locator('input[placeholder="Search Nodes..."], input:focus').first
    box.wait_for(timeout=30_000)
    box.fill("fewstep")
    # results: <li> items in 0.3.75's frontend, a scrolling list of divs in newer ones; the page text covers both
    page.wait_for_function("() => document.body.innerText.includes('TCD sampler')", timeout=30_000)
    page.screenshot(path=str(ARTIFACTS / "frontend_node_search.png"))
    found = " || ".join(page.evaluate(VISIBLE_ITEMS_JS)) + " || " + page.evaluate(
        "() => document.body.innerText.replace(/\\s+/g, ' ')")
    missing = [t for t in titles if t not in found]
    assert not missing, f"not in the node search results: {missing}"
    box.press("Enter")  # adds the highlighted (first) result to the graph
    page.wait_for_function("() => window.app.graph._nodes.some(n => n.type.startsWith('Fewstep'))", timeout=30_000)


def test_frontend_loads_a_fewstep_workflow_from_the_template_browser(page):
    _close_dialogs(page)
    page.evaluate("() => window.app.graph.clear()")
    page.evaluate("() => window.app.extensionManager.command.execute('Comfy.BrowseTemplates')")
    page.get_by_text("fewstep", exact=True).first.click(timeout=30_000)  # the pack's entry under EXTENSIONS
    card = page.get_by_text("fewstep_digits_lcm", exact=True).first
    card.wait_for(timeout=30_000)
    page.wait_for_timeout(500)  # thumbnails
    page.screenshot(path=str(ARTIFACTS / "frontend_templates.png"))
    card.click()
    page.wait_for_function("() => window.app.graph._nodes.some(n => n.type === 'FewstepSamplerLCM')",
                           timeout=30_000)
    types = page.evaluate("() => window.app.graph._nodes.map(n => n.type)")
    assert {"FewstepDigitsModelLoader", "FewstepSamplerLCM", "FewstepTimestepSchedule"} <= set(types)
    page.wait_for_timeout(500)
    page.screenshot(path=str(ARTIFACTS / "frontend_workflow_loaded.png"))
    assert page.get_by_text("Invalid workflow").count() == 0  # the frontend's schema check passed
    assert not page.errors, page.errors


def test_frontend_queues_the_loaded_workflow(server, page):
    """'Run' in the browser: the frontend's own prompt (from the template loaded above) runs on the server."""
    url, _ = server
    before = set(json.loads(_get(f"{url}/history")))
    page.evaluate("() => window.app.queuePrompt(0, 1)")
    deadline = time.monotonic() + 120
    new: set = set()
    while not new and time.monotonic() < deadline:
        time.sleep(0.5)
        new = set(json.loads(_get(f"{url}/history"))) - before
    assert new, "the frontend's prompt never reached the server's history"
    entry = _wait(url, new.pop())
    assert entry["status"]["status_str"] == "success", _error_message(entry)
    assert len(_images(url, entry)) == 8


@pytest.mark.parametrize("name", sorted(wt.all_workflows()))
def test_frontend_ui_workflow_is_its_api_twin(server, page, name):
    """Each UI workflow, loaded by the frontend and converted for queueing, is its API-format twin (inputs the
    server does not declare, i.e. frontend-only widgets such as PreviewAny's text box, left aside)."""
    url, _ = server
    info = json.loads(_get(f"{url}/object_info"))
    ui = json.loads((wt.WORKFLOWS / f"{name}.json").read_text())
    queued = wt.strip_meta(wt.ui_to_api(page, ui))
    for node in queued.values():
        declared = {k for group in info[node["class_type"]]["input"].values() for k in group}
        node["inputs"] = {k: v for k, v in node["inputs"].items() if k in declared}
    assert queued == wt.strip_meta(wt.load_api(name))


# ------------------------------------------------------------------------------------- templates vs /object_info


def _combo_options(spec: list) -> list | None:
    """A COMBO input's options in /object_info (legacy ``[[...], {...}]`` or V3 ``["COMBO", {"options": [...]}]``)."""
    if isinstance(spec[0], list):
        return spec[0]
    if spec[0] == "COMBO":
        return (spec[1] if len(spec) > 1 else {}).get("options", [])
    return None


def _types_match(out_type: str, in_type: str) -> bool:
    outs, ins = set(out_type.split(",")), set(in_type.split(","))
    return "*" in outs or "*" in ins or bool(outs & ins)


def template_errors(graph: dict, info: dict) -> list[str]:
    """Every way ``graph`` (API format) disagrees with a server's /object_info: unknown node types, unknown or missing
    inputs, links whose output type does not fit the input, combo values not offered (model files the templates name,
    ``workflow_tools.MODEL_FILES``, are not on the test server, so a file combo may lack them), numbers out of
    range."""
    files = {f.name for f in wt.MODEL_FILES.values()}
    errors = []
    for nid, node in graph.items():
        ct = node["class_type"]
        if ct not in info:
            errors.append(f"node {nid}: unknown node type {ct!r}")
            continue
        required, optional = info[ct]["input"].get("required", {}), info[ct]["input"].get("optional", {})
        errors += [f"node {nid} ({ct}): required input {k!r} missing" for k in required if k not in node["inputs"]]
        for name, value in node["inputs"].items():
            spec = required.get(name) or optional.get(name)
            if spec is None:
                errors.append(f"node {nid} ({ct}): no input {name!r}")
                continue
            options = _combo_options(spec)
            in_type = "COMBO" if options is not None else spec[0]
            if isinstance(value, list) and len(value) == 2 and isinstance(value[0], str):  # a link
                src = graph.get(value[0])
                if src is None or src["class_type"] not in info:
                    errors.append(f"node {nid} ({ct}).{name}: link from missing node {value[0]}")
                    continue
                outputs = info[src["class_type"]]["output"]
                if value[1] >= len(outputs):
                    errors.append(f"node {nid} ({ct}).{name}: {src['class_type']} has no output {value[1]}")
                elif not _types_match(outputs[value[1]], in_type):
                    errors.append(f"node {nid} ({ct}).{name}: expects {in_type}, linked to "
                                  f"{src['class_type']} output {outputs[value[1]]}")
            elif options is not None:
                if value not in options and value not in files:
                    errors.append(f"node {nid} ({ct}).{name}: {value!r} not among the options")
            elif in_type in ("INT", "FLOAT"):
                lim = spec[1] if len(spec) > 1 else {}
                if not isinstance(value, (int, float)) or value < lim.get("min", -math.inf) or \
                        value > lim.get("max", math.inf):
                    errors.append(f"node {nid} ({ct}).{name}: {value!r} outside [{lim.get('min')}, {lim.get('max')}]")
    return errors


@pytest.mark.parametrize("name", sorted(wt.all_workflows()))
def test_workflow_validates_against_object_info(server, name):
    """Every shipped workflow (embedded ones and the SD1.5 / SDXL / Flux templates) type-checks against this server's
    /object_info: run once per supported ComfyUI version by the test matrix."""
    url, _ = server
    info = json.loads(_get(f"{url}/object_info"))
    graph = wt.load_api(name)
    assert template_errors(graph, info) == []
    if name in wt.template_workflows():  # the model files named are the published ones
        named = {v for node in graph.values() for v in node["inputs"].values() if isinstance(v, str)
                 and v.endswith((".safetensors", ".bin"))}
        assert named and named <= {f.name for f in wt.MODEL_FILES.values()}


def test_template_validation_catches_broken_graphs(server):
    url, _ = server
    info = json.loads(_get(f"{url}/object_info"))
    graph = wt.load_api("fewstep_sdxl_dmd2_4step")
    sampler_id = next(k for k, n in graph.items() if n["class_type"] == "SamplerCustomAdvanced")
    broken = json.loads(json.dumps(graph))
    broken[sampler_id]["inputs"]["sigmas"] = broken[sampler_id]["inputs"]["guider"]  # GUIDER into SIGMAS
    noise_id = next(k for k, n in graph.items() if n["class_type"] == "RandomNoise")
    broken[noise_id]["inputs"]["seed_of_noise"] = 1
    broken["999"] = {"class_type": "NoSuchNode", "inputs": {}}
    errs = template_errors(broken, info)
    assert any("expects SIGMAS" in e for e in errs) and any("no input 'seed_of_noise'" in e for e in errs)
    assert any("unknown node type 'NoSuchNode'" in e for e in errs)
