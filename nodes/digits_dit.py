"""The digits DiT written against ComfyUI's diffusion-model interface, loading diffusers' weights unchanged.

The embedded teacher is trained as diffusers' ``DiTTransformer2DModel`` (adaLN-Zero, Peebles & Xie 2023). Inside
ComfyUI it runs as this module instead, which has the same parameter names (so the shipped safetensors load with
``strict=True``) and the same math (tested against diffusers' forward), but:

- attention goes through ``comfy.ldm.modules.attention.optimized_attention`` with ``transformer_options``, so
  ComfyUI's attention backends and ``transformer_options["optimized_attention_override"]`` (sparse attention)
  apply, as in ComfyUI's own models;
- ``forward`` runs ``DIFFUSION_MODEL`` wrappers (EasyCache, fewstep's step caches) and each block honours
  ``patches_replace["dit"][("double_block", i)]`` (block caches), setting ``block_index`` / ``total_blocks``;
- ComfyUI needs no diffusers (nor its peft / transformers imports) to run the example workflows.

Only the configuration the digits models use is supported (``norm_type="ada_norm_zero"``, class labels, sincos
positional embedding, no affine norms); others raise a clear error.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

SUPPORTED = {"norm_type": "ada_norm_zero", "norm_elementwise_affine": False}


def timestep_embedding(t: Tensor, dim: int = 256, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal timestep features, cos first, frequency shift 1 (diffusers ``Timesteps(256, True, 1)``)."""
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / (half - 1)
    args = t.reshape(-1, 1).float() * exponent.exp()[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def sincos_2d(embed_dim: int, grid: int, base_size: int) -> Tensor:
    """2-D sin-cos positional embedding ``(grid * grid, embed_dim)`` (MAE / DiT; diffusers' ``get_2d_sincos``)."""
    coords = torch.arange(grid, dtype=torch.float32) / (grid / base_size)
    gw, gh = torch.meshgrid(coords, coords, indexing="xy")

    def one_d(pos: Tensor, d: int) -> Tensor:
        omega = 1.0 / 10000 ** (torch.arange(d // 2, dtype=torch.float64) / (d / 2.0))
        out = torch.outer(pos.reshape(-1).double(), omega)
        return torch.cat([out.sin(), out.cos()], dim=1)

    return torch.cat([one_d(gw, embed_dim // 2), one_d(gh, embed_dim // 2)], dim=1).float()


class _PatchEmbed(nn.Module):
    def __init__(self, in_channels: int, dim: int, patch: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch, stride=patch)


class _MLPEmbed(nn.Module):
    def __init__(self, in_dim: int, dim: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class _LabelEmbed(nn.Module):
    def __init__(self, num_classes: int, dim: int) -> None:
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, dim)  # + the null class for CFG


class _TimestepLabelEmbed(nn.Module):
    def __init__(self, num_classes: int, dim: int) -> None:
        super().__init__()
        self.timestep_embedder = _MLPEmbed(256, dim)
        self.class_embedder = _LabelEmbed(num_classes, dim)

    def forward(self, t: Tensor, labels: Tensor, dtype: torch.dtype) -> Tensor:
        return self.timestep_embedder(timestep_embedding(t).to(dtype)) + self.class_embedder.embedding_table(labels)


class _AdaLNZero(nn.Module):
    def __init__(self, num_classes: int, dim: int) -> None:
        super().__init__()
        self.emb = _TimestepLabelEmbed(num_classes, dim)
        self.linear = nn.Linear(dim, 6 * dim)


class _Attention(nn.Module):
    def __init__(self, dim: int, heads: int, head_dim: int, bias: bool) -> None:
        super().__init__()
        self.heads = heads
        inner = heads * head_dim
        self.to_q = nn.Linear(dim, inner, bias=bias)
        self.to_k = nn.Linear(dim, inner, bias=bias)
        self.to_v = nn.Linear(dim, inner, bias=bias)
        self.to_out = nn.ModuleList([nn.Linear(inner, dim)])

    def forward(self, x: Tensor, transformer_options: dict) -> Tensor:
        from comfy.ldm.modules import attention  # looked up per call: ComfyUI picks the backend at start-up

        out = attention.optimized_attention(self.to_q(x), self.to_k(x), self.to_v(x), self.heads,
                                            transformer_options=transformer_options)
        return self.to_out[0](out)


class _GeluProj(nn.Module):
    def __init__(self, dim: int, inner: int, approximate: str) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, inner)
        self.approximate = approximate

    def forward(self, x: Tensor) -> Tensor:
        return F.gelu(self.proj(x), approximate=self.approximate)


class _FeedForward(nn.Module):
    def __init__(self, dim: int, approximate: str, mult: int = 4) -> None:
        super().__init__()
        self.net = nn.ModuleList([_GeluProj(dim, dim * mult, approximate), nn.Identity(), nn.Linear(dim * mult, dim)])

    def forward(self, x: Tensor) -> Tensor:
        return self.net[2](self.net[0](x))


class DiTBlock(nn.Module):
    """adaLN-Zero transformer block: gated self-attention and MLP modulated by (timestep + class) embedding."""

    def __init__(self, dim: int, heads: int, head_dim: int, num_classes: int, approximate: str, bias: bool,
                 eps: float) -> None:
        super().__init__()
        self.norm1 = _AdaLNZero(num_classes, dim)
        self.attn1 = _Attention(dim, heads, head_dim, bias)
        self.ff = _FeedForward(dim, approximate)
        self.eps = eps

    def forward(self, x: Tensor, t: Tensor, labels: Tensor, transformer_options: dict) -> Tensor:
        emb = self.norm1.linear(F.silu(self.norm1.emb(t, labels, x.dtype)))
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = emb.chunk(6, dim=1)
        h = F.layer_norm(x, x.shape[-1:], eps=1e-6) * (1 + scale_msa[:, None]) + shift_msa[:, None]
        x = x + gate_msa[:, None] * self.attn1(h, transformer_options)
        h = F.layer_norm(x, x.shape[-1:], eps=self.eps) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
        return x + gate_mlp[:, None] * self.ff(h)


class DigitsDiTNet(nn.Module):
    """Class-conditional DiT (diffusers ``DiTTransformer2DModel`` config and parameter names)."""

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__()
        for key, want in SUPPORTED.items():
            if config.get(key, want) != want:
                raise ValueError(f"the ComfyUI digits DiT supports {key}={want!r}, got {config.get(key)!r}")
        if not config.get("num_embeds_ada_norm"):
            raise ValueError("the ComfyUI digits DiT needs a class-conditional config (num_embeds_ada_norm)")
        heads, head_dim = int(config["num_attention_heads"]), int(config["attention_head_dim"])
        dim = heads * head_dim
        self.in_channels = int(config.get("in_channels", 4))
        self.out_channels = int(config.get("out_channels") or self.in_channels)
        self.patch_size = int(config.get("patch_size", 2))
        self.sample_size = int(config["sample_size"])
        approximate = {"gelu-approximate": "tanh", "gelu": "none"}.get(config.get("activation_fn", "gelu"))
        if approximate is None:
            raise ValueError(f"unsupported activation_fn {config.get('activation_fn')!r}")
        self.pos_embed = _PatchEmbed(self.in_channels, dim, self.patch_size)
        grid = self.sample_size // self.patch_size
        self.register_buffer("pos_table", sincos_2d(dim, grid, grid)[None], persistent=False)
        self.transformer_blocks = nn.ModuleList([
            DiTBlock(dim, heads, head_dim, int(config["num_embeds_ada_norm"]), approximate,
                     bool(config.get("attention_bias", True)), float(config.get("norm_eps", 1e-5)))
            for _ in range(int(config.get("num_layers", 28)))
        ])
        self.proj_out_1 = nn.Linear(dim, 2 * dim)
        self.proj_out_2 = nn.Linear(dim, self.patch_size**2 * self.out_channels)

    def embed(self, x: Tensor) -> Tensor:
        if tuple(x.shape[-2:]) != (self.sample_size, self.sample_size):
            raise ValueError(f"the digits DiT samples {self.sample_size}x{self.sample_size} images, got "
                             f"{tuple(x.shape[-2:])}; use 'fewstep empty digits latent'")
        h = self.pos_embed.proj(x).flatten(2).transpose(1, 2)
        return h + self.pos_table.to(h)

    def head(self, h: Tensor, t: Tensor, labels: Tensor, x: Tensor) -> Tensor:
        cond = self.transformer_blocks[0].norm1.emb(t, labels, h.dtype)
        shift, scale = self.proj_out_1(F.silu(cond)).chunk(2, dim=1)
        h = F.layer_norm(h, h.shape[-1:], eps=1e-6) * (1 + scale[:, None]) + shift[:, None]
        h = self.proj_out_2(h)
        p, c = self.patch_size, self.out_channels
        hh, ww = x.shape[-2] // p, x.shape[-1] // p
        h = torch.einsum("nhwpqc->nchpwq", h.reshape(-1, hh, ww, p, p, c))
        out = h.reshape(-1, c, hh * p, ww * p)
        return out[:, : x.shape[1]] if c == 2 * x.shape[1] else out  # learned-sigma DiTs: keep the prediction

    def forward(self, x: Tensor, t: Tensor, labels: Tensor, transformer_options: dict | None = None) -> Tensor:
        """The plain forward (no ComfyUI patches): ``x`` (B, C, H, W), timesteps ``t`` (B,), ``labels`` (B,)."""
        opts = {} if transformer_options is None else transformer_options
        h = self.embed(x)
        for block in self.transformer_blocks:
            h = block(h, t, labels, opts)
        return self.head(h, t, labels, x)
