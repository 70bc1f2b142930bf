"""fewstep's model folders in ComfyUI (``models/<subdir>``, registered through ``folder_paths``)."""

from __future__ import annotations

__all__ = ["register_model_folder"]


def register_model_folder(name: str, subdir: str, extensions: set[str]) -> None:
    """Register ``models/<subdir>`` as ComfyUI model folder ``name`` listing ``extensions`` (idempotent; more
    folders can be added with ComfyUI's ``extra_model_paths.yaml``)."""
    import os

    import folder_paths

    path = os.path.join(folder_paths.models_dir, subdir)
    if name not in folder_paths.folder_names_and_paths:
        folder_paths.folder_names_and_paths[name] = ([path], set(extensions))
    else:
        paths, exts = folder_paths.folder_names_and_paths[name]
        if path not in paths:
            paths.append(path)
        exts.update(extensions)
