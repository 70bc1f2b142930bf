"""Guidance adapters: small low-rank adapters, conditioned on the guidance scale, that reproduce CFG in one pass.

Adapter Guidance Distillation (AGD; Jensen et al. 2025, "Efficient Distillation of Classifier-Free Guidance using
Adapters", sec. 3): the base model stays frozen; lightweight adapters (about 2% of its parameters) that take the
guidance scale ``w`` as an input are trained so that ``base + adapter(w)`` predicts the CFG output
``uncond + w (cond - uncond)`` with one forward pass instead of two.

Here each adapted linear layer ``y = W x + b`` gets a guidance-gated low-rank update (LoRA, Hu et al. 2022, eq. 3,
with its rank components gated by the scale):

    y = W x + b + f(w) * U (g_l(w) ⊙ (D x))

with ``D`` (rank x in), ``U`` (out x rank, zero-initialised), ``g(w) = 1 + MLP(emb(w))`` a per-layer gate from a
sinusoidal embedding of the scale (the guidance embedding of LCM, Luo et al. 2023 sec. 4.2, fed LCM's
``omega = w - 1``), and ``f(w) = w - 1`` when ``zero_at_unit_scale`` (CFG is exactly linear in ``w - 1`` and equals
the conditional model at ``w = 1``, so the adapted model is exactly the base model there) or 1 otherwise.

The adapter is applied with forward hooks and removed by removing them: the base model's weights are never copied
or modified, and the hooks are inactive outside ``with adapter.scale(w):`` so the same network still serves as
the plain (teacher) model. ``state_dict()`` holds only adapter tensors; ``save``/``load`` write safetensors with
metadata naming the base model and a hash of its configuration, and loading onto another base model is an error.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .cfg import to_lcm_omega

#: linear layers adapted by default: attention and MLP projections of diffusers transformer blocks
DEFAULT_TARGETS: tuple[str, ...] = (
    "attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "ff.net.0.proj", "ff.net.2",
)
FORMAT = "fewstep-guidance-adapter"


def guidance_scale_embedding(w: Tensor, dim: int = 64, omega: bool = True) -> Tensor:
    """Sinusoidal embedding of the guidance scale (LCM, Luo et al. 2023, sec. 4.2; the ``w_embedding`` of
    diffusers' ``LatentConsistencyModelPipeline.get_guidance_scale_embedding``), ``(B,) -> (B, dim)``.

    ``w`` is in fewstep's convention; with ``omega=True`` it is converted to LCM's ``omega = w - 1`` first (what LCM
    checkpoints are fed), and multiplied by 1000 as in LCM.
    """
    w = torch.as_tensor(w, dtype=torch.float32).reshape(-1)
    if omega:
        w = to_lcm_omega(w)
    w = w * 1000.0
    half = dim // 2
    freq = torch.exp(torch.arange(half, dtype=torch.float32, device=w.device) * -(math.log(10000.0) / (half - 1)))
    emb = w[:, None] * freq[None, :]
    emb = torch.cat([emb.sin(), emb.cos()], dim=1)
    if dim % 2 == 1:
        emb = F.pad(emb, (0, 1))
    return emb


def module_features(module: nn.Module) -> tuple[int, int]:
    """``(in_features, out_features)`` of a linear layer, also through wrappers (peft ``base_layer``)."""
    probe = module
    for _ in range(3):
        if hasattr(probe, "in_features") and hasattr(probe, "out_features"):
            return int(probe.in_features), int(probe.out_features)
        probe = getattr(probe, "base_layer", None)
        if probe is None:
            break
    raise TypeError(f"{type(module).__name__} is not a linear layer (no in_features/out_features)")


def find_targets(base: nn.Module, targets: Sequence[str]) -> list[str]:
    """Names of the modules of ``base`` whose name equals or ends with ``"." + t`` for a target ``t``
    (peft's matching rule), skipping modules nested inside an already matched one."""
    names: list[str] = []
    for name, m in base.named_modules():
        if not any(name == t or name.endswith("." + t) for t in targets):
            continue
        if any(name.startswith(n + ".") for n in names):
            continue
        try:
            module_features(m)
        except TypeError:
            continue
        names.append(name)
    if not names:
        linears = [n for n, m in base.named_modules() if isinstance(m, nn.Linear)][:8]
        raise ValueError(f"no layer of {type(base).__name__} matches the adapter targets {list(targets)}; "
                         f"linear layers are named like {linears}")
    return names


def check_rank(base: nn.Module, names: Sequence[str], rank: int, what: str = "adapter") -> None:
    """Raise ``ValueError`` if ``rank`` exceeds ``min(in, out)`` of any target layer (or is < 1)."""
    if int(rank) < 1:
        raise ValueError(f"{what} rank must be >= 1, got {rank}")
    mods = dict(base.named_modules())
    for n in names:
        fin, fout = module_features(mods[n])
        if rank > min(fin, fout):
            raise ValueError(f"{what} rank {rank} is larger than layer {n} ({fin} -> {fout}); a low-rank update "
                             f"of that layer has rank at most {min(fin, fout)}")


def base_config_hash(base: nn.Module) -> str:
    """SHA-256 (16 hex digits) of a model's configuration: class name, diffusers ``config`` if present, and the
    name and shape of every parameter and buffer (peft LoRA layers ignored). Same architecture and config -> same
    hash."""
    cfg = getattr(base, "config", None)
    cfg = {k: v for k, v in dict(cfg).items() if not k.startswith("_")} if cfg is not None else None
    desc = {
        "class": type(base).__name__,
        "config": cfg,
        "tensors": [[k.replace(".base_layer.", "."), list(v.shape)] for k, v in base.state_dict().items()
                    if "lora_" not in k],
    }
    return hashlib.sha256(json.dumps(desc, sort_keys=True, default=str).encode()).hexdigest()[:16]


@torch.no_grad()
def base_weights_hash(base: nn.Module) -> str:
    """A cheap fingerprint of the weights (sums per tensor), to tell two checkpoints of one architecture apart."""
    h = hashlib.sha256()
    for k, v in base.state_dict().items():
        if v.is_floating_point() and "lora_" not in k:
            v = v.detach().double()
            k = k.replace(".base_layer.", ".")
            h.update(f"{k}:{float(v.sum()):.6e}:{float(v.abs().sum()):.6e}".encode())
    return h.hexdigest()[:16]


class _LowRank(nn.Module):
    def __init__(self, fin: int, fout: int, rank: int, generator: torch.Generator | None = None):
        super().__init__()
        self.down = nn.Parameter(torch.empty(rank, fin))
        self.up = nn.Parameter(torch.zeros(fout, rank))
        bound = 1.0 / math.sqrt(fin)  # kaiming-uniform(a=sqrt(5)) bound of nn.Linear / LoRA's A
        with torch.no_grad():
            self.down.uniform_(-bound, bound, generator=generator)


class GuidanceAdapter(nn.Module):
    """Guidance-scale-conditioned low-rank adapters on the linear layers of a frozen base network.

    Args:
        base: the network to adapt (e.g. ``teacher.model``); not copied, not registered as a submodule.
        rank: rank of every low-rank update (must not exceed any target layer's ``min(in, out)``).
        targets: module-name suffixes to adapt (default: attention and MLP projections, ``DEFAULT_TARGETS``).
        embed_dim, hidden: size of the guidance-scale embedding and of the gate MLP.
        zero_at_unit_scale: multiply the update by ``w - 1`` (the adapted model equals the base at ``w = 1``).
        scale_range: the ``(min, max)`` guidance scales the adapter is trained for (metadata).
        base_name: a name for the base model, stored in the metadata.
        seed: initialisation seed of the down projections (the up projections start at zero).
        attach: register the hooks right away.
    """

    def __init__(self, base: nn.Module, rank: int = 4, targets: Sequence[str] = DEFAULT_TARGETS,
                 embed_dim: int = 64, hidden: int = 64, zero_at_unit_scale: bool = True,
                 scale_range: tuple[float, float] = (1.0, 8.0), base_name: str | None = None, seed: int = 0,
                 attach: bool = True):
        super().__init__()
        self.target_names = find_targets(base, targets)
        check_rank(base, self.target_names, rank, "guidance adapter")
        self.rank, self.targets = int(rank), tuple(targets)
        self.embed_dim, self.hidden = int(embed_dim), int(hidden)
        self.zero_at_unit_scale = bool(zero_at_unit_scale)
        self.scale_range = (float(scale_range[0]), float(scale_range[1]))
        self.base_name = base_name or type(base).__name__
        self.base_hash = base_config_hash(base)
        self.base_weights = base_weights_hash(base)
        g = torch.Generator().manual_seed(seed)
        mods = dict(base.named_modules())
        self.layers = nn.ModuleList(_LowRank(*module_features(mods[n]), self.rank, g) for n in self.target_names)
        self.gate = nn.Sequential(nn.Linear(self.embed_dim, self.hidden), nn.SiLU(),
                                  nn.Linear(self.hidden, len(self.target_names) * self.rank))
        nn.init.zeros_(self.gate[2].weight)
        nn.init.zeros_(self.gate[2].bias)
        object.__setattr__(self, "_base", base)  # not a submodule: never copied or saved with the adapter
        self._handles: list[Any] = []
        self._gates: Tensor | None = None
        self._factor: Tensor | None = None
        if attach:
            self.attach()

    # -- hooks --------------------------------------------------------------------------------------------
    @property
    def base(self) -> nn.Module:
        return self._base

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def attach(self) -> GuidanceAdapter:
        """Register the forward hooks on the base model's target layers (idempotent)."""
        if self._handles:
            return self
        mods = dict(self._base.named_modules())
        for i, n in enumerate(self.target_names):
            self._handles.append(mods[n].register_forward_hook(self._make_hook(i)))
        return self

    def detach(self) -> GuidanceAdapter:
        """Remove the hooks: the base model is exactly as before."""
        for h in self._handles:
            h.remove()
        self._handles = []
        return self

    def _make_hook(self, i: int):
        def hook(module: nn.Module, inputs: tuple, output: Tensor) -> Tensor | None:
            gates = self._gates
            if gates is None:
                return None
            x = inputs[0]
            if x.shape[0] != gates.shape[0]:
                raise ValueError(
                    f"guidance adapter: batch {x.shape[0]} at layer {self.target_names[i]} but {gates.shape[0]} "
                    "guidance scales. The adapter replaces CFG: call the adapted denoiser directly, not through "
                    "a CFG wrapper that doubles the batch")
            layer = self.layers[i]
            shape = (x.shape[0],) + (1,) * (x.ndim - 2) + (self.rank,)
            h = F.linear(x, layer.down.to(x.dtype)) * gates[:, i].to(x.dtype).reshape(shape)
            delta = F.linear(h, layer.up.to(x.dtype))
            if self._factor is not None:
                delta = delta * self._factor.to(x.dtype).reshape((x.shape[0],) + (1,) * (x.ndim - 1))
            return output + delta

        return hook

    @contextmanager
    def scale(self, w: Tensor | float, batch: int | None = None) -> Iterator[None]:
        """Activate the adapter for guidance scale(s) ``w`` (scalar, or ``(B,)``) inside the block."""
        if not self._handles:
            raise RuntimeError("guidance adapter is detached from its base model; call attach() first")
        device = self.gate[0].weight.device
        w = torch.as_tensor(w, dtype=torch.float32, device=device).reshape(-1)
        if batch is not None and w.numel() == 1:
            w = w.expand(batch)
        emb = guidance_scale_embedding(w, self.embed_dim)
        gates = 1.0 + self.gate(emb).reshape(w.shape[0], len(self.target_names), self.rank)
        prev = (self._gates, self._factor)
        self._gates = gates
        self._factor = (w - 1.0) if self.zero_at_unit_scale else None
        try:
            yield
        finally:
            self._gates, self._factor = prev

    # -- bookkeeping --------------------------------------------------------------------------------------
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def parameter_fraction(self) -> float:
        """Adapter parameters / base-model parameters."""
        return self.num_parameters() / max(1, sum(p.numel() for p in self._base.parameters()))

    def metadata(self) -> dict[str, Any]:
        return {
            "format": FORMAT, "version": 1, "base_name": self.base_name, "base_config_hash": self.base_hash,
            "base_weights_hash": self.base_weights, "rank": self.rank, "targets": list(self.targets),
            "target_names": self.target_names, "embed_dim": self.embed_dim, "hidden": self.hidden,
            "zero_at_unit_scale": self.zero_at_unit_scale, "scale_range": list(self.scale_range),
            "num_parameters": self.num_parameters(), "parameter_fraction": round(self.parameter_fraction(), 5),
        }

    def save(self, path: str | Path, extra: dict[str, Any] | None = None) -> Path:
        """Write the adapter (safetensors, metadata in the header and a JSON sidecar), atomically."""
        from ..io import save_safetensors

        return save_safetensors(self.state_dict(), Path(path), {**self.metadata(), **(extra or {})})

    @classmethod
    def load(cls, path: str | Path, base: nn.Module, attach: bool = True, match: str = "config",
             base_label: str | None = None) -> GuidanceAdapter:
        """Load an adapter saved with ``save`` onto ``base``; ``ValueError`` if it was trained for another model.

        ``match`` says how ``base`` is recognised as the adapter's base model:

        - ``"config"``: same class, configuration and parameter shapes (``base_config_hash``); other weights of
          that architecture only warn;
        - ``"weights"``: the same weights (``base_weights_hash``: parameter names and per-tensor sums), whatever
          class holds them, e.g. a ComfyUI port of the diffusers network with the same parameter names. Other
          weights (another checkpoint, a random init) or another architecture are refused.

        ``base_label`` names ``base`` in error messages (default: its class name).
        """
        from ..io import read_safetensors

        path = Path(path)
        meta = adapter_metadata(path)
        label = base_label or type(base).__name__
        if match == "config":
            have = base_config_hash(base)
            if meta["base_config_hash"] != have:
                raise ValueError(
                    f"guidance adapter {path.name} was trained for base model {meta['base_name']!r} (config hash "
                    f"{meta['base_config_hash']}), but this model ({label}) has config hash {have}: "
                    "load it onto the model it was trained for")
        elif match == "weights":
            have = base_weights_hash(base)
            if meta.get("base_weights_hash") != have:
                raise ValueError(
                    f"guidance adapter {path.name} was trained for base model {meta['base_name']!r} (weights "
                    f"fingerprint {meta.get('base_weights_hash')}), but this model ({label}) has weights fingerprint "
                    f"{have}: an adapter only works on the weights it was distilled from; load "
                    f"{meta['base_name']!r} or train an adapter for this model")
        else:
            raise ValueError(f"match must be 'config' or 'weights', got {match!r}")
        adapter = cls(base, rank=meta["rank"], targets=meta["targets"], embed_dim=meta["embed_dim"],
                      hidden=meta["hidden"], zero_at_unit_scale=meta["zero_at_unit_scale"],
                      scale_range=tuple(meta["scale_range"]), base_name=meta["base_name"], attach=False)
        if adapter.target_names != meta["target_names"]:
            raise ValueError(f"guidance adapter {path.name}: layer names differ from the base model's")
        adapter.load_state_dict(read_safetensors(path)[0])
        if match == "config" and base_weights_hash(base) != meta.get("base_weights_hash"):
            import warnings

            warnings.warn(f"guidance adapter {path.name} was trained on other weights of the same architecture "
                          f"({meta['base_name']!r}); results may differ", stacklevel=2)
        return adapter.attach() if attach else adapter


def adapter_metadata(path: str | Path) -> dict[str, Any]:
    """The metadata ``GuidanceAdapter.save`` wrote into a safetensors file (``ValueError`` if it is not a fewstep
    guidance adapter, ``FileNotFoundError`` if there is no file)."""
    from safetensors import safe_open

    from ..io import CorruptFileError

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"guidance adapter not found at {path}")
    try:
        with safe_open(str(path), "pt") as f:
            meta = json.loads((f.metadata() or {}).get("fewstep", "{}"))
    except Exception as e:  # noqa: BLE001 - not a safetensors file at all
        raise CorruptFileError(f"{path} is not a fewstep guidance adapter (cannot read it as safetensors, truncated or "
                               f"corrupt: {e})") from None
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path.name} is not a fewstep guidance adapter (format {meta.get('format')!r})")
    return meta


class AdaptedDenoiser(nn.Module):
    """A denoiser whose calls take ``guidance_scale=`` and run the base denoiser with the adapter active: one
    pass per step instead of CFG's two. ``default_scale`` is used when the call gives none."""

    def __init__(self, denoiser: nn.Module, adapter: GuidanceAdapter, default_scale: float | None = None):
        super().__init__()
        self.denoiser = denoiser
        self.adapter = adapter
        self.model_sampling = denoiser.model_sampling
        self.default_scale = default_scale

    def forward(self, x: Tensor, sigma: Tensor | float, guidance_scale: Tensor | float | None = None,
                **cond: Any) -> Tensor:
        w = self.default_scale if guidance_scale is None else guidance_scale
        if w is None:
            raise ValueError("AdaptedDenoiser needs guidance_scale=... (or a default_scale)")
        from ..checks import check_scale

        check_scale(w, self.adapter.scale_range, "guidance scale",
                    f"the range this guidance adapter (for {self.adapter.base_name!r}) was trained for")
        with self.adapter.scale(w, batch=x.shape[0]):
            return self.denoiser(x, sigma, **cond)
