"""The files a distillation module exports for its student: full weights, a ComfyUI LoRA, a ComfyUI diff.

``<path>``: the full network weights (LoRA merged) + ``<path>.json``; for LoRA students also
``<stem>_lora.safetensors`` (ComfyUI LoRA keys with ``lora_prefix``; DARE, Yu et al. 2024, on the rank components
if ``dare_p > 0``); with ``write_delta`` a ComfyUI "diff" file of ``student - teacher`` (DARE on entries). Every
file is safetensors with a JSON sidecar, written atomically (``core.io.save_safetensors``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..core.models.lora_format import comfy_diff_state_dict, comfy_lora_state_dict, dare, dare_lora, lora_key_prefix
from .student_networks import has_lora, lora_factors, merged_state_dict

__all__ = ["write_student_files"]


@torch.no_grad()
def write_student_files(net: nn.Module, teacher_net: nn.Module, path: str | Path, meta: dict[str, Any],
                        lora_prefix: str | None = None, dare_p: float = 0.0, dare_seed: int = 1,
                        write_delta: bool = False, sharded: bool = False, rank: int = 0) -> list[Path]:
    """Write the student network ``net`` (see the module docstring). Returns the written files.

    Args:
        net: the student's network (with peft LoRA layers for a LoRA student).
        teacher_net: the teacher's network (the base of the delta file).
        path: the ``.safetensors`` file of the full weights.
        meta: the sidecar metadata (``DistillationModule.export_metadata``).
        lora_prefix: key prefix of the ComfyUI LoRA / diff files (default ``lora_key_prefix(net)``: the kohya
            form for a diffusers UNet, ComfyUI's generic form otherwise).
        dare_p, dare_seed: DARE drop probability (0 = off) and seed.
        write_delta: also write ``student - teacher`` as a ComfyUI "diff" file.
        sharded: ``net`` is FSDP2-sharded: every process gathers the full tensors (LoRA factors included), rank 0
            writes them (no delta file for a sharded LoRA student).
        rank: this process's global rank.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lora = has_lora(net)
    lora_prefix = lora_prefix or lora_key_prefix(net)
    if sharded:  # FSDP2: every process gathers the full tensors (a collective), rank 0 writes them
        from .sharding import full_tensor

        if lora and write_delta:
            raise NotImplementedError("the delta file of a sharded LoRA student: save a checkpoint and export it "
                                      "from one process")
        full = {k: full_tensor(v.detach()).clone() for k, v in net.state_dict().items()}
        gathered = {n: (full_tensor(d).clone(), full_tensor(u).clone(), a) for n, (d, u, a) in
                    (lora_factors(net).items() if lora else ())}
        if rank != 0:
            return []
        if not lora:
            return [_save_atomic(full, path, meta)]
        state = _merge_lora(full, gathered)
    else:
        state = merged_state_dict(net) if lora else {k: v.detach().clone() for k, v in net.state_dict().items()}
    written = [_save_atomic(state, path, meta)]
    if lora:
        factors = gathered if sharded else lora_factors(net)
        if dare_p > 0:
            factors = {n: dare_lora(d, u, a, dare_p, dare_seed + i) for i, (n, (d, u, a)) in
                       enumerate(sorted(factors.items()))}
        lpath = path.with_name(path.stem + "_lora.safetensors")
        written.append(_save_atomic(comfy_lora_state_dict(factors, lora_prefix), lpath,
                                    {**meta, "format": "comfyui-lora", "key_prefix": lora_prefix,
                                     "dare_p": dare_p, "dare_seed": dare_seed}))
    if write_delta:
        tstate = merged_state_dict(teacher_net) if lora else teacher_net.state_dict()
        deltas = {}
        for i, (k, v) in enumerate(sorted(state.items())):
            if k in tstate and v.is_floating_point():
                d = v.float() - tstate[k].float()
                deltas[k] = dare(d, dare_p, dare_seed + i) if dare_p > 0 else d
        dpath = path.with_name(path.stem + "_delta.safetensors")
        written.append(_save_atomic(comfy_diff_state_dict(deltas, lora_prefix), dpath,
                                    {**meta, "format": "comfyui-diff", "key_prefix": lora_prefix,
                                     "dare_p": dare_p, "dare_seed": dare_seed}))
    return written


def _save_atomic(state: dict[str, Tensor], path: Path, meta: dict[str, Any]) -> Path:
    from ..core.io import save_safetensors

    return save_safetensors(state, path, meta)


def _merge_lora(state: dict[str, Tensor], factors: dict[str, tuple[Tensor, Tensor, float]]) -> dict[str, Tensor]:
    """``merged_state_dict`` on gathered tensors: peft's wrapped keys back to the network's, LoRA merged in."""
    out = {k.replace(".base_layer.", "."): v for k, v in state.items() if ".lora_" not in k}
    for name, (down, up, alpha) in factors.items():
        w = out[f"{name}.weight"]
        out[f"{name}.weight"] = (w.float() + (alpha / down.shape[0]) * (up.float() @ down.float())).to(w.dtype)
    return out
