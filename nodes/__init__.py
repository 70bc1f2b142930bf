"""fewstep's ComfyUI node pack (V3 schema, ``comfy_api.latest``).

Nodes are thin adapters: ComfyUI types in, one ``core`` call, ComfyUI types out. They are grouped in *families*,
one module each, every module exporting ``NODES: list[type[io.ComfyNode]]``:

========================  ==========================================================================
family module             nodes
========================  ==========================================================================
``samplers``              SAMPLER outputs wrapping ``core.sampling`` samplers (LCM, TCD, DMD, ...)
``schedules``             SIGMAS outputs: distilled timestep lists, per-model step-schedule search
``caches``                step / block / forecast caches from ``core.cache`` as model patches, calibration
``attention``             block-sparse attention from ``core.attention`` through ``optimized_attention_override``
``guidance``              guidance adapters (one pass instead of CFG's two) loaded onto a MODEL
``onnx``                  ONNX export of a MODEL and an ONNX file loaded as a MODEL (``core.export``)
``embedded``              the shipped digits DiT as a MODEL, its class conditioning, latent <-> image
========================  ==========================================================================

To add a family, write ``nodes/<family>.py`` with a ``NODES``
list and append its name to ``FAMILIES``. A family whose import fails (e.g. an optional dependency is missing) is
logged and skipped, so the other families still load.

Nothing here is imported by ``import fewstep``: the package's ``__getattr__`` resolves ``comfy_entrypoint`` lazily,
so ComfyUI is only imported when ComfyUI loads the pack.
"""

from __future__ import annotations

import importlib
import logging
from typing import Any

__all__ = ["FAMILIES", "comfy_entrypoint", "load_nodes"]

#: node families, in the order they appear in the node library
FAMILIES: tuple[str, ...] = ("samplers", "schedules", "caches", "attention", "guidance", "onnx", "embedded")

#: every fewstep node id starts with this (ComfyUI node ids are global)
NODE_PREFIX = "Fewstep"

log = logging.getLogger("fewstep")


def load_nodes(families: tuple[str, ...] = FAMILIES, strict: bool = False) -> list[Any]:
    """Import every family module and return its nodes (``strict``: re-raise import errors)."""
    nodes: list[Any] = []
    for family in families:
        try:
            module = importlib.import_module(f".{family}", __name__)
        except Exception as e:  # noqa: BLE001 - one broken family must not hide the others
            if strict:
                raise
            log.warning("fewstep: node family %r not loaded: %s", family, e)
            continue
        nodes.extend(module.NODES)
    return nodes


def _extension_class():
    from comfy_api.latest import ComfyExtension

    class FewstepExtension(ComfyExtension):
        """fewstep's node pack: every node of every family in ``FAMILIES``."""

        async def get_node_list(self) -> list:
            return load_nodes()

    return FewstepExtension


async def comfy_entrypoint() -> Any:
    """ComfyUI V3 entry point (found through ``fewstep.comfy_entrypoint``)."""
    return _extension_class()()
