"""Shared pytest fixtures.

Test helper modules (``comfyui_env``, ``comfy_client``, ``workflow_tools``, ``comfy_tiny_models``,
``distill_tiny``) are plain modules next to the tests: this folder is put on ``sys.path`` so tests ``import`` them
by name in any import mode.

``one_thread``: torch on one thread for the module (tiny models are faster and far steadier that way on a shared
CPU); use it with ``pytestmark = pytest.mark.usefixtures("one_thread")``.

ComfyUI fixtures (see tests/comfyui_env.py): ``comfy_root`` installs (once, cached in
``<repo>/.comfyui``) or reuses (``$FEWSTEP_COMFYUI_ROOT``) a real ComfyUI tree of the version selected by
``FEWSTEP_COMFYUI_VERSION`` (``0.3.75``, the default, or ``0.33.0``) and imports its sampling stack;
``comfy_conventions`` is that version's entry of ``tests/comfy_versions.py`` (the one place that knows how the
versions differ); ``comfy_ksampling`` is ComfyUI's ``comfy.k_diffusion.sampling`` module; ``comfy_server`` is one
real ComfyUI server (``main.py --cpu``) with fewstep in its custom nodes, shared by every server test file and
yielding ``(url, workdir)``. Any test that
uses them is marked ``comfy`` automatically, so ``-m "not comfy"`` deselects them.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

TESTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = TESTS_DIR.parent
if str(TESTS_DIR) not in sys.path:
    sys.path.insert(0, str(TESTS_DIR))

import comfyui_env  # noqa: E402

COMFY_FIXTURES = {"comfy_root", "comfy_ksampling", "comfy_server", "comfy_conventions"}


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
def comfy_conventions(comfy_root):
    """``comfy_versions.Conventions`` of the ComfyUI under test (what differs between supported versions)."""
    import comfy_versions

    return comfy_versions.host()


@pytest.fixture(scope="session")
def comfy_ksampling(comfy_root):
    """ComfyUI's ``comfy.k_diffusion.sampling`` module (from the ``comfy_root`` tree)."""
    return sys.modules["comfy.k_diffusion.sampling"]


@pytest.fixture(scope="session")
def comfy_server(comfy_root, tmp_path_factory):
    """One real ComfyUI server with fewstep in ``custom_nodes``: yields ``(url, workdir)``."""
    workdir = tmp_path_factory.mktemp("comfyui-server")
    with comfyui_env.comfyui_server(comfy_root, custom_nodes={"fewstep": REPO_ROOT}, workdir=workdir) as url:
        yield url, workdir


@pytest.fixture(scope="module")
def one_thread():
    """torch on one thread for the module, restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
