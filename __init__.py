"""fewstep: make diffusion and flow models fast.

Importing this package is light: no comfy, lightning or model weights are touched. ComfyUI finds the
node pack through ``comfy_entrypoint`` (V3 API), resolved lazily on first access.
"""

__version__ = "0.1.0"

__all__ = ["__version__", "comfy_entrypoint"]


def __getattr__(name: str):
    if name == "comfy_entrypoint":
        from .nodes import comfy_entrypoint

        return comfy_entrypoint
    raise AttributeError(f"module 'fewstep' has no attribute {name!r}")
