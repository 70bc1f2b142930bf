"""Every difference between the ComfyUI versions fewstep is tested on, in one place.

The test matrix runs the ComfyUI tests once per version in ``SUPPORTED`` (one pytest process each: ComfyUI is
process-global). The version is chosen by ONE setting, the environment variable ``FEWSTEP_COMFYUI_VERSION``
(default ``0.3.75``, the oldest supported release; ``0.33.0`` is the newest this project can obtain)::

    FEWSTEP_COMFYUI_VERSION=0.33.0 python -m pytest -q -m comfy

With ``FEWSTEP_COMFYUI_ROOT`` (a ComfyUI tree used as is) the conventions follow that tree's
``comfyui_version.py`` instead. Tests never compare version strings themselves: they ask :func:`conventions`
for the fact they depend on (how ancestral noise is seeded, whether combo values are validated at
``POST /prompt``, which model-config keys a tiny model needs, ...).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ENV_VERSION = "FEWSTEP_COMFYUI_VERSION"
#: oldest supported first, newest last
SUPPORTED = ("0.3.75", "0.33.0")
DEFAULT = SUPPORTED[0]


def parse(version: str) -> tuple[int, ...]:
    """``"0.3.75"`` -> ``(0, 3, 75)``; raises ValueError naming the value for anything else."""
    if not re.fullmatch(r"\d+(\.\d+){1,3}", version.strip()):
        raise ValueError(f"not a ComfyUI version: {version!r} (expected e.g. 0.3.75 or 0.33.0)")
    return tuple(int(p) for p in version.strip().split("."))


def selected() -> str:
    """The ComfyUI version the tests of this process run against (``$FEWSTEP_COMFYUI_VERSION``)."""
    version = os.environ.get(ENV_VERSION, "").strip() or DEFAULT
    if version not in SUPPORTED:
        raise ValueError(f"{ENV_VERSION}={version!r} is not a supported ComfyUI version; use one of "
                         f"{', '.join(SUPPORTED)} (unset means {DEFAULT})")
    return version


def tree_version(root: Path) -> str:
    """The version written in a ComfyUI tree's ``comfyui_version.py``."""
    text = (Path(root) / "comfyui_version.py").read_text()
    m = re.search(r'__version__\s*=\s*"([^"]+)"', text)
    if not m:
        raise ValueError(f"{root}/comfyui_version.py names no __version__")
    return m.group(1)


@dataclass(frozen=True)
class Conventions:
    """What fewstep's tests must know about one ComfyUI version (each field says since when it holds)."""

    version: str
    #: ``default_noise_sampler(x, seed)`` seeds its CPU generator with ``seed + this`` (1 since 0.6.0, else 0)
    cpu_noise_seed_offset: int
    #: ``POST /prompt`` rejects a COMBO value not in its options with HTTP 400 ``value_not_in_list`` before any
    #: node code runs, for V3 (``comfy_api.latest``) nodes too (since 0.7.0); before, the node's own check fails
    #: at execution
    validates_v3_combos_at_prompt: bool
    #: ``sample_lcm`` / ``sample_euler_ancestral_RF`` read ``model.inner_model.model_patcher`` (since 0.21.0)
    samplers_read_model_patcher: bool
    #: ``ModelPatcher.clone`` deep-copies only dicts and lists in ``model_options`` (since 0.13.0)
    clone_shares_option_objects: bool
    #: extra keys tiny model configs need, per ``comfy_tiny_models.ARCHS`` key (e.g. Flux ``txt_ids_dims``)
    unet_config_extra: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: comfy_extras files that cannot import without the requirements the fixture skips on purpose
    #: (torchvision/torchaudio are stubs, spandrel absent)
    expected_import_failures: tuple[str, ...] = ()
    #: model families (``comfy_tiny_models.ARCHS`` keys) whose classes this version's ``supported_models`` has
    has_2026_families: bool = False

    def ancestral_seed(self, seed: int) -> int:
        """The torch seed the host's ancestral noise sampler uses for ``seed`` on the CPU."""
        return seed + self.cpu_noise_seed_offset


def for_version(version: str) -> Conventions:
    """Conventions of ComfyUI ``version`` (any release from 0.3.75 on; thresholds are the releases that changed)."""
    v = parse(version)
    if v < (0, 3, 75):
        raise ValueError(f"ComfyUI {version} is older than the oldest supported release {SUPPORTED[0]}")
    new = v >= (0, 3, 76)
    failures = ("nodes_upscale_model.py", "nodes_audio.py", "nodes_audio_encoder.py")
    if v >= (0, 33, 0):
        failures = ("nodes_upscale_model.py",)
    return Conventions(
        version=version,
        cpu_noise_seed_offset=1 if v >= (0, 6, 0) else 0,
        validates_v3_combos_at_prompt=v >= (0, 7, 0),
        samplers_read_model_patcher=v >= (0, 21, 0),
        clone_shares_option_objects=v >= (0, 13, 0),
        unet_config_extra={"flux": {"txt_ids_dims": []}} if new else {},
        expected_import_failures=failures,
        has_2026_families=v >= (0, 33, 0),
    )


def conventions(root: Path | None = None) -> Conventions:
    """Conventions of the ComfyUI tree ``root`` (its own version file) or else of :func:`selected`."""
    if root is not None and (Path(root) / "comfyui_version.py").is_file():
        return for_version(tree_version(root))
    return for_version(selected())


def host() -> Conventions:
    """Conventions of the ComfyUI imported in this process (its ``comfyui_version`` module)."""
    import comfyui_version

    return for_version(comfyui_version.__version__)


def assert_bad_combo_rejected(url: str, graph: dict, value: str, own_message: str) -> str:
    """A prompt whose COMBO input holds ``value`` (not among its options) is rejected and the error names ``value``.

    Where the host validates V3 combo values at ``POST /prompt`` (ComfyUI >= 0.7.0) that is an HTTP 400 with
    ``value_not_in_list`` naming the value, before any fewstep code runs; on older hosts the prompt is queued and
    fails at execution with fewstep's own message ``own_message`` (which must name the value too). Returns the
    error text.
    """
    import json

    import comfy_client

    assert value in own_message, "fewstep's own message must name the bad value"
    code, body = comfy_client.post_prompt(url, graph)
    if host().validates_v3_combos_at_prompt:
        errors = json.dumps(body.get("node_errors", {}))
        assert code == 400, f"expected HTTP 400 for {value!r}, got {code}: {body}"
        assert "value_not_in_list" in errors and value in errors, errors
        return errors
    assert code == 200, body
    entry = comfy_client.wait(url, body["prompt_id"])
    message = comfy_client.error_message(entry)
    assert entry["status"]["status_str"] == "error" and own_message in message, message
    return message


def collected() -> Conventions:
    """Conventions for test collection (before ComfyUI is imported): ``$FEWSTEP_COMFYUI_ROOT``'s version if set,
    else :func:`selected`."""
    root = os.environ.get("FEWSTEP_COMFYUI_ROOT")
    return conventions(Path(root) if root else None)
