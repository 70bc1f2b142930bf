"""Block layouts, declared per architecture: which ``ModuleList`` s hold a transformer's blocks (in execution order),
what the hidden state is, what a block returns. Block caches never guess this from tensor shapes or class names
(diffusers declares the same in ``hooks/_helpers.py``'s ``TransformerBlockRegistry``).

Two hosts read the registry:

- ``"diffusers"`` (``core.cache.hooks``): a block is called with ``hidden_states`` (keyword or first positional) and
  ``encoder_hidden_states`` (keyword or its signature position); ``BlockList.returns`` says what it returns:
  ``None`` a tensor (the hidden state), else a tuple naming each position (``"hidden"``, ``"encoder"``).
- ``"comfy"`` (``nodes/cache_wrappers.py``): blocks run through ``patches_replace["dit"][(kind, i)]`` with a dict of
  streams; ``BlockList.kind`` is the patch kind and ``streams`` the dict keys the block updates (image first).

``register_block_layout(host, class_name, layout)`` adds an architecture; ``block_layout(host, net)`` looks one up by
the network's exact class name (a subclass may change its forward, so it is declared on its own).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from .options import CacheConfigError

HOSTS = ("diffusers", "comfy")


@dataclass(frozen=True)
class BlockList:
    """One ``ModuleList`` of blocks. ``attr`` may be dotted (``"dit.transformer_blocks"``)."""

    attr: str
    returns: tuple[str, ...] | None = None  # diffusers: None = returns the hidden tensor
    kind: str = "double_block"  # comfy: the patches_replace["dit"] kind
    streams: tuple[str, ...] = ("hidden",)  # the state a block carries, hidden state first


@dataclass(frozen=True)
class BlockLayout:
    """The block stack of one architecture. ``modulated``: the first block's adaLN submodule whose output is
    TeaCache's timestep-modulated input (None: the architecture has none)."""

    lists: tuple[BlockList, ...]
    hidden_arg: str = "hidden_states"
    encoder_arg: str | None = "encoder_hidden_states"
    modulated: str | None = "norm1"


_REGISTRY: dict[tuple[str, str], BlockLayout] = {}


def register_block_layout(host: str, class_name: str, layout: BlockLayout) -> None:
    """Declare the block layout of the network class ``class_name`` for ``host`` (``"diffusers"`` or ``"comfy"``)."""
    if host not in HOSTS:
        raise CacheConfigError(f"unknown host {host!r}; choose one of {HOSTS}")
    if not isinstance(layout, BlockLayout) or not layout.lists:
        raise CacheConfigError(f"layout must be a BlockLayout with at least one BlockList, got {layout!r}")
    _REGISTRY[(host, class_name)] = layout


def known_architectures(host: str) -> list[str]:
    return sorted(name for h, name in _REGISTRY if h == host)


def lookup_layout(host: str, net: nn.Module) -> BlockLayout | None:
    """The registered layout of ``net``'s exact class for ``host``, or None."""
    return _REGISTRY.get((host, type(net).__name__))


def resolve_attr(net: nn.Module, attr: str) -> Any:
    obj: Any = net
    for part in attr.split("."):
        obj = getattr(obj, part, None)
    return obj


def layout_blocks(net: nn.Module, layout: BlockLayout) -> list[tuple[BlockList, int, nn.Module]]:
    """``(list, index in list, block)`` of every block of ``net`` in execution order."""
    out = []
    for bl in layout.lists:
        lst = resolve_attr(net, bl.attr)
        if not isinstance(lst, nn.ModuleList):
            raise CacheConfigError(f"{type(net).__name__} has no ModuleList {bl.attr!r} (declared in its block layout)")
        out += [(bl, i, b) for i, b in enumerate(lst)]
    return out


def diffusers_layout(net: nn.Module, names: Sequence[str] | BlockLayout | None = None,
                     required: bool = True) -> BlockLayout | None:
    """The diffusers block layout of ``net`` (restricted to the lists ``names`` if given, or ``names`` itself when it is
    a ``BlockLayout``). Raises ``CacheConfigError`` naming the fix when none is declared (None if not ``required``)."""
    if isinstance(names, BlockLayout):
        return names
    layout = lookup_layout("diffusers", net)
    if layout is None:
        if not required:
            return None
        raise CacheConfigError(
            f"{type(net).__name__} has no transformer_blocks ModuleList declared in fewstep's block layouts (known: "
            f"{', '.join(known_architectures('diffusers'))}): block caches need a declared transformer; use StepCache "
            "for UNets and other models, or declare its blocks with fewstep.core.cache.register_block_layout("
            f"'diffusers', '{type(net).__name__}', BlockLayout(...))")
    if names is not None:
        by_attr = {bl.attr: bl for bl in layout.lists}
        missing = [n for n in names if n not in by_attr]
        if missing:
            raise CacheConfigError(f"{type(net).__name__} has no ModuleList {missing[0]!r} in its block layout (it has "
                                   f"{list(by_attr)})")
        layout = BlockLayout(tuple(by_attr[n] for n in names), layout.hidden_arg, layout.encoder_arg, layout.modulated)
    return layout


def find_blocks(net: nn.Module, names: Sequence[str] | BlockLayout | None = None,
                required: bool = True) -> list[nn.Module]:
    """The transformer blocks of a diffusers ``net`` in execution order, from its declared layout."""
    layout = diffusers_layout(net, names, required)
    return [] if layout is None else [b for _, _, b in layout_blocks(net, layout)]


# ------------------------------------------------------------------------------------------------ diffusers blocks
class BlockIO:
    """Reads a diffusers block's ``(hidden, encoder_hidden)`` state from its call and writes a state back in the
    block's declared output format."""

    def __init__(self, block: nn.Module, blist: BlockList, layout: BlockLayout) -> None:
        self.block = block
        self.blist = blist
        self.hidden_arg = layout.hidden_arg
        self.encoder_arg = layout.encoder_arg
        self.enc_pos = _param_index(block, layout.encoder_arg) if layout.encoder_arg else None

    def hidden_in(self, args: tuple, kwargs: dict) -> Tensor:
        h = kwargs.get(self.hidden_arg, args[0] if args else None)
        if not isinstance(h, Tensor):
            raise TypeError(f"cannot find {self.hidden_arg} in the call of {type(self.block).__name__}")
        return h

    def state_in(self, args: tuple, kwargs: dict) -> tuple[Tensor, Tensor | None]:
        h = self.hidden_in(args, kwargs)
        enc = kwargs.get(self.encoder_arg) if self.encoder_arg else None
        if enc is None and self.enc_pos is not None and len(args) > self.enc_pos:
            enc = args[self.enc_pos]
        return h, enc if isinstance(enc, Tensor) else None

    def state_out(self, out: Any, state_in: tuple[Tensor, Tensor | None]) -> tuple[Tensor, Tensor | None]:
        ret = self.blist.returns
        if ret is None:
            return out, state_in[1]
        enc = out[ret.index("encoder")] if "encoder" in ret else state_in[1]
        return out[ret.index("hidden")], enc

    def make_output(self, state: tuple[Tensor | None, ...]) -> Any:
        ret = self.blist.returns
        if ret is None:
            return state[0]
        return tuple(state[0] if r == "hidden" else state[1] for r in ret)


def _param_index(block: nn.Module, name: str) -> int | None:
    try:
        params = list(inspect.signature(block.forward).parameters)
    except (TypeError, ValueError):
        return None
    return params.index(name) if name in params else None


# ------------------------------------------------------------------------------------------------ the registry
_TENSOR = BlockList("transformer_blocks")
_DUAL = ("encoder", "hidden")  # Flux / SD3 / Chroma blocks return (encoder_hidden_states, hidden_states)
for _name in ("DiTTransformer2DModel", "PixArtTransformer2DModel"):
    register_block_layout("diffusers", _name, BlockLayout((_TENSOR,), encoder_arg=None))
for _name in ("FluxTransformer2DModel", "ChromaTransformer2DModel"):
    register_block_layout("diffusers", _name, BlockLayout((BlockList("transformer_blocks", _DUAL),
                                                           BlockList("single_transformer_blocks", _DUAL))))
register_block_layout("diffusers", "SD3Transformer2DModel", BlockLayout((BlockList("transformer_blocks", _DUAL),)))
register_block_layout("diffusers", "QwenImageTransformer2DModel",
                      BlockLayout((BlockList("transformer_blocks", _DUAL),), modulated=None))
# HunyuanVideo: dual-stream then single-stream blocks, both called (hidden, encoder, temb, ...) and returning
# (hidden, encoder) (diffusers 0.42 models/transformers/transformer_hunyuan_video.py)
register_block_layout("diffusers", "HunyuanVideoTransformer3DModel",
                      BlockLayout((BlockList("transformer_blocks", ("hidden", "encoder")),
                                   BlockList("single_transformer_blocks", ("hidden", "encoder")))))
# CogVideoX: one list returning (hidden, encoder); norm1 (CogVideoXLayerNormZero) gives the modulated input first
register_block_layout("diffusers", "CogVideoXTransformer3DModel",
                      BlockLayout((BlockList("transformer_blocks", ("hidden", "encoder")),)))
# Flux.2: the double blocks return (encoder, hidden); the model then concatenates text and image tokens and the
# single blocks carry the joint tensor (encoder_hidden_states=None), so no cached range may cross from one list to
# the other: the layout declares the single-stream blocks (most of the network: 48 of 56 blocks in Flux.2-dev) and
# the double blocks always run. Their modulation comes from outside the block (temb_mod): no TeaCache signal.
register_block_layout("diffusers", "Flux2Transformer2DModel",
                      BlockLayout((BlockList("single_transformer_blocks"),), encoder_arg=None, modulated=None))
# Wan 2.1 / 2.2: the text is cross-attention context, not a stream the blocks update
register_block_layout("diffusers", "WanTransformer3DModel", BlockLayout((BlockList("blocks"),), encoder_arg=None,
                                                                        modulated=None))

_IMG, _IMG_TXT = ("img",), ("img", "txt")
register_block_layout("comfy", "DigitsDiT", BlockLayout((BlockList("dit.transformer_blocks", streams=_IMG),)))
_DOUBLE_SINGLE = BlockLayout((BlockList("double_blocks", kind="double_block", streams=_IMG_TXT),
                              BlockList("single_blocks", kind="single_block", streams=_IMG)))
# Flux and Flux.2 (one class), Chroma, HunyuanVideo / 1.5: double blocks on (img, txt), then torch.cat((txt, img))
# and single blocks on the joint tokens (ComfyUI 0.33 comfy/ldm/{flux,chroma,hunyuan_video}/model.py)
for _name in ("Flux", "Chroma", "HunyuanVideo"):
    register_block_layout("comfy", _name, _DOUBLE_SINGLE)
# Qwen-Image: dual-stream transformer_blocks as "double_block" on (img, txt) (comfy/ldm/qwen_image/model.py)
register_block_layout("comfy", "QwenImageTransformer2DModel",
                      BlockLayout((BlockList("transformer_blocks", streams=_IMG_TXT),)))
# Lumina 2 / Z-Image (NextDiT) do not route their layers through patches_replace["dit"]: not declared, refused.
# Wan 2.1 / 2.2 (both experts are WanModel; each expert is its own MODEL with its own cache state)
for _name in ("WanModel", "VaceWanModel", "CameraWanModel", "HumoWanModel", "AnimateWanModel"):
    register_block_layout("comfy", _name, BlockLayout((BlockList("blocks", streams=_IMG),)))
for _name in ("MMDiT", "OpenAISignatureMMDITWrapper"):
    register_block_layout("comfy", _name, BlockLayout((BlockList("joint_blocks", streams=_IMG_TXT),)))
