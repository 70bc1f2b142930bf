"""Shared pytest fixtures.

ComfyUI fixtures (see tests/comfyui_env.py): ``comfy_root`` installs (once, cached in
``<repo>/.comfyui``) or reuses (``$FEWSTEP_COMFYUI_ROOT``) a real ComfyUI 0.3.75 tree and imports its
sampling stack; ``comfy_ksampling`` is ComfyUI's ``comfy.k_diffusion.sampling`` module. Any test that
uses them is marked ``comfy`` automatically, so ``-m "not comfy"`` deselects them.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest


def _load_comfyui_env():
    """tests/comfyui_env.py as module ``comfyui_env``, whatever pytest's import mode."""
    if "comfyui_env" in sys.modules:
        return sys.modules["comfyui_env"]
    path = Path(__file__).with_name("comfyui_env.py")
    spec = importlib.util.spec_from_file_location("comfyui_env", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["comfyui_env"] = module
    spec.loader.exec_module(module)
    return module


comfyui_env = _load_comfyui_env()

COMFY_FIXTURES = {"comfy_root", "comfy_ksampling"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if COMFY_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.comfy)


@pytest.fixture(scope="session")
def comfy_root() -> Path:
    """Root of a real ComfyUI tree, on sys.path, with its sampling modules imported."""
    try:
        root = comfyui_env.ensure_comfyui()
        comfyui_env.import_comfy(root)
    except comfyui_env.ComfyUIEnvError as e:
        pytest.fail(f"ComfyUI fixture unavailable: {e}\n(deselect these tests with -m 'not comfy')", pytrace=False)
    return root


@pytest.fixture(scope="session")
def comfy_ksampling(comfy_root):
    """ComfyUI's ``comfy.k_diffusion.sampling`` module (from the ``comfy_root`` tree)."""
    return sys.modules["comfy.k_diffusion.sampling"]
