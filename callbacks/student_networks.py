"""Student networks: a full trainable copy of the teacher, or the teacher plus LoRA layers through peft.

A LoRA student (Hu et al. 2022; LCM-LoRA, Luo et al. 2023) shares the frozen teacher network: peft injects LoRA
layers into it in place, the student calls the network with the LoRA layers on, the teacher view calls it with
them off. Only the LoRA matrices train, and exports merge them (full weights) or write them in ComfyUI's LoRA
key format.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from ..core.guidance.adapters import DEFAULT_TARGETS, check_rank, find_targets
from ..core.models.denoiser import Denoiser

STUDENT_ADAPTER = "student"


def _lora_layers(module: nn.Module) -> list[tuple[str, nn.Module]]:
    from peft.tuners.lora import LoraLayer

    return [(n, m) for n, m in module.named_modules() if isinstance(m, LoraLayer)]


def has_lora(module: nn.Module) -> bool:
    try:
        return bool(_lora_layers(module))
    except ImportError:
        return False


@contextmanager
def lora_disabled(module: nn.Module) -> Iterator[None]:
    """Run ``module`` with its peft LoRA layers bypassed (without touching ``requires_grad``)."""
    layers = [m for _, m in _lora_layers(module)]
    prev = [m._disable_adapters for m in layers]
    for m in layers:
        m._disable_adapters = True
    try:
        yield
    finally:
        for m, p in zip(layers, prev):
            m._disable_adapters = p


class _LoraOffCall:
    """A ``Denoiser`` call adapter that runs the wrapped call with the LoRA layers off (the teacher view)."""

    def __init__(self, call):
        self.call = call

    def __call__(self, module: nn.Module, x_in: Tensor, t: Tensor, **cond: Any) -> Tensor:
        with lora_disabled(module):
            return self.call(module, x_in, t, **cond)


def copy_student(teacher: Denoiser) -> nn.Module:
    """A trainable deep copy of the teacher denoiser."""
    student = copy.deepcopy(teacher)
    student.requires_grad_(True)
    if hasattr(student, "name"):
        student.name = f"{teacher.name}-student"
    return student


def lora_student(teacher: Denoiser, rank: int = 8, alpha: float | None = None,
                 targets: Sequence[str] = DEFAULT_TARGETS, seed: int = 0) -> tuple[Denoiser, Denoiser]:
    """Inject LoRA layers (peft) into ``teacher.model`` in place; return ``(student, teacher)``.

    The teacher denoiser is changed in place to call its network with the LoRA layers off, so it stays exactly
    the teacher, and is returned as the second element. Raises ``ValueError`` if ``rank`` exceeds any target
    layer's ``min(in, out)``.
    """
    if not isinstance(teacher, Denoiser):
        raise TypeError("a LoRA student needs the teacher as a fewstep Denoiser (with .model and .call)")
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError as e:  # pragma: no cover
        raise ImportError("LoRA students need peft: pip install 'fewstep[train]'") from e
    net = teacher.model
    if has_lora(net):
        raise ValueError(f"{teacher.name} already has LoRA layers; pass a fresh teacher")
    names = find_targets(net, targets)
    check_rank(net, names, rank, "LoRA")
    config = LoraConfig(r=int(rank), lora_alpha=float(alpha if alpha is not None else rank),
                        target_modules=list(targets), lora_dropout=0.0, bias="none")
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)  # peft initialises lora_A with the global RNG
    try:
        inject_adapter_in_model(config, net, adapter_name=STUDENT_ADAPTER)
    finally:
        torch.random.set_rng_state(state)
    for n, p in net.named_parameters():
        p.requires_grad_("lora_" in n)
    student = Denoiser(net, teacher.model_sampling, call=teacher.call, check_finite=teacher.check_finite,
                       name=f"{teacher.name}-lora-student")
    teacher.call = _LoraOffCall(teacher.call)
    return student, teacher


def lora_factors(module: nn.Module) -> dict[str, tuple[Tensor, Tensor, float]]:
    """``{module path: (down (r x in), up (out x r), alpha)}`` of the student LoRA layers (alpha = scale * r)."""
    out = {}
    for name, m in _lora_layers(module):
        if STUDENT_ADAPTER not in m.lora_A:
            continue
        down = m.lora_A[STUDENT_ADAPTER].weight.detach()
        up = m.lora_B[STUDENT_ADAPTER].weight.detach()
        out[name] = (down, up, float(m.scaling[STUDENT_ADAPTER]) * down.shape[0])
    return out


@torch.no_grad()
def merged_state_dict(module: nn.Module) -> dict[str, Tensor]:
    """The network's state dict with LoRA merged into the base weights, under the original (un-wrapped) keys."""
    factors = lora_factors(module)
    out: dict[str, Tensor] = {}
    for k, v in module.state_dict().items():
        if ".lora_" in k:
            continue
        key = k.replace(".base_layer.", ".")
        out[key] = v.detach().clone()
    for name, (down, up, alpha) in factors.items():
        w = out[f"{name}.weight"]
        out[f"{name}.weight"] = (w.float() + (alpha / down.shape[0]) * (up.float() @ down.float())).to(w.dtype)
    return out
