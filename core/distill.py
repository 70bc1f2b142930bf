"""Plumbing shared by every distillation method: per-sample randomness and checks that run before training.

**Per-sample randomness.** A distillation step draws noise, noise levels, classes and data indices. fewstep draws
them from the *global index of the sample* (``ids``) and a named stream, never from a global RNG state. The same
sample therefore gets the same numbers however the global batch is split over processes (DDP gives the weights of
one process at the same global batch) and whenever the run is interrupted (a resumed run reproduces an
uninterrupted one), with nothing to save but the number of samples consumed. Each sample seeds its own
``torch.Generator`` from a SplitMix64 hash (Steele et al. 2014, "Fast splittable pseudorandom number generators")
of ``(seed, stream, id)``; numbers are generated on the CPU, so they do not depend on the device either.

**Checks.** Bad input is reported before the first step: a teacher and student whose outputs differ in shape, a
teacher asked for classifier-free guidance without a null condition, an empty guidance-scale range.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

_MASK64 = (1 << 64) - 1


def _splitmix64(z: int) -> int:
    z = (z + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def stream_id(stream: str | int) -> int:
    """A stable integer for a named random stream (CRC32 of the name)."""
    return int(stream) if isinstance(stream, int) else zlib.crc32(stream.encode())


def sample_seed(seed: int, stream: str | int, index: int) -> int:
    """The 63-bit generator seed of one sample in one stream."""
    z = _splitmix64((int(seed) & _MASK64) ^ _splitmix64(stream_id(stream)))
    return _splitmix64(z ^ (int(index) & _MASK64)) >> 1


def _ids(ids: Tensor | Sequence[int]) -> list[int]:
    return torch.as_tensor(ids).reshape(-1).tolist()


def randn_per_sample(ids: Tensor | Sequence[int], shape: Sequence[int], stream: str | int, seed: int = 0,
                     device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> Tensor:
    """Standard normal ``(len(ids), *shape)``; row ``k`` depends only on ``(seed, stream, ids[k])``."""
    ids_l = _ids(ids)
    out = torch.empty((len(ids_l), *shape), dtype=torch.float32)
    g = torch.Generator()
    for k, i in enumerate(ids_l):
        g.manual_seed(sample_seed(seed, stream, i))
        out[k] = torch.randn(tuple(shape), generator=g)
    return out.to(device=device, dtype=dtype)


def rand_per_sample(ids: Tensor | Sequence[int], n: int, stream: str | int, seed: int = 0,
                    device: torch.device | str | None = None) -> Tensor:
    """Uniform ``[0, 1)`` numbers ``(len(ids), n)``, per sample as ``randn_per_sample``."""
    ids_l = _ids(ids)
    out = torch.empty((len(ids_l), n), dtype=torch.float32)
    g = torch.Generator()
    for k, i in enumerate(ids_l):
        g.manual_seed(sample_seed(seed, stream, i))
        out[k] = torch.rand(n, generator=g)
    return out.to(device)


def randint_per_sample(ids: Tensor | Sequence[int], high: int, stream: str | int, seed: int = 0,
                       device: torch.device | str | None = None) -> Tensor:
    """Integers uniform in ``[0, high)``, one per sample (int64)."""
    if high < 1:
        raise ValueError(f"randint_per_sample needs high >= 1, got {high}")
    u = rand_per_sample(ids, 1, stream, seed)[:, 0].double()
    return (u * high).floor().clamp(max=high - 1).long().to(device)


# ------------------------------------------------------------------------------------------------ checks
def check_guidance_range(scale: float | Sequence[float] | Tensor, what: str = "guidance scale") -> tuple[float, float]:
    """Normalise a guidance scale or ``(min, max)`` range to a ``(min, max)`` pair of finite floats.

    Raises ``ValueError`` for an empty range (``min > max``, an empty sequence) or non-finite values.
    """
    if isinstance(scale, Tensor):
        scale = scale.reshape(-1).tolist()
    if isinstance(scale, (int, float)):
        lo = hi = float(scale)
    else:
        vals = [float(v) for v in scale]
        if len(vals) == 0:
            raise ValueError(f"{what} range is empty; give one scale or a (min, max) pair")
        if len(vals) == 1:
            vals = vals * 2
        if len(vals) != 2:
            raise ValueError(f"{what} range must be one scale or a (min, max) pair, got {vals}")
        lo, hi = vals
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f"{what} range must be finite, got ({lo}, {hi})")
    if lo > hi:
        raise ValueError(f"{what} range ({lo:g}, {hi:g}) is empty: min > max")
    return lo, hi


def sample_scales(u: Tensor, scale_range: tuple[float, float]) -> Tensor:
    """Guidance scales uniform in ``scale_range`` from uniforms ``u`` in ``[0, 1)``."""
    lo, hi = scale_range
    return lo + (hi - lo) * u


def _probe_cond(cond_value: Any, batch: int, device: torch.device) -> Any:
    if isinstance(cond_value, Tensor):
        return cond_value.to(device)
    return torch.full((batch,), int(cond_value), dtype=torch.long, device=device)


def _first_device(module: nn.Module) -> torch.device:
    for p in module.parameters():
        return p.device
    for b in module.buffers():
        return b.device
    return torch.device("cpu")


@torch.no_grad()
def probe_output(denoiser: nn.Module, sample_shape: Sequence[int], cond: dict[str, Any] | None = None,
                 sigma: float | None = None) -> Tensor:
    """Run ``denoiser`` once on one random sample (for shape checks); returns its output."""
    device = _first_device(denoiser)
    x = torch.randn((1, *sample_shape), device=device)
    ms = getattr(denoiser, "model_sampling", None)
    if sigma is None:
        sigma = float(ms.sigma_max) if ms is not None else 1.0
        sigma = min(sigma, 10.0) if math.isfinite(sigma) else 1.0
    return denoiser(x, torch.full((1,), sigma, device=device), **(cond or {}))


def check_same_output_shape(teacher: nn.Module, student: nn.Module, sample_shape: Sequence[int],
                            cond: dict[str, Any] | None = None) -> None:
    """Raise ``ValueError`` unless teacher and student give outputs of the same shape for one probe sample."""
    outs = {}
    for name, den in (("teacher", teacher), ("student", student)):
        try:
            outs[name] = tuple(probe_output(den, sample_shape, cond).shape)
        except (ValueError, RuntimeError) as e:
            raise ValueError(
                f"the {name} cannot denoise a sample of shape {tuple(sample_shape)}: {e}. Teacher and student must "
                "map (B, *sample_shape) to the same shape") from e
    if outs["teacher"] != outs["student"]:
        raise ValueError(f"teacher and student output shapes differ: teacher {outs['teacher']}, student "
                         f"{outs['student']} for input {(1, *tuple(sample_shape))}")


def _label_tables(module: nn.Module) -> list[tuple[str, int]]:
    """(name, rows) of class-label embedding tables: diffusers ``LabelEmbedding`` (``embedding_table``) and
    modules named like ``class_embedding`` / ``class_embedder`` / ``label_emb``."""
    out = []
    for name, m in module.named_modules():
        table = getattr(m, "embedding_table", None)
        if isinstance(table, nn.Embedding):
            out.append((name + ".embedding_table", table.num_embeddings))
        elif isinstance(m, nn.Embedding) and any(k in name.rsplit(".", 1)[-1] for k in ("class_emb", "label_emb")):
            out.append((name, m.num_embeddings))
    return out


def check_null_condition(teacher: nn.Module, null: Any, sample_shape: Sequence[int],
                         cond_key: str = "class_labels") -> None:
    """Raise ``ValueError`` unless ``teacher`` accepts the null condition that classifier-free guidance needs.

    ``null=None`` means the teacher has no null condition; a mapping null (text embeddings, ``core.conditioning``)
    is run through the teacher as it is. For integer class conditions the label tables of the
    network are checked (a table needs a row for the null id, as diffusers adds when trained with label
    dropout), then the teacher is run once on the null condition.
    """
    name = getattr(teacher, "name", type(teacher).__name__)
    if null is None:
        raise ValueError(f"classifier-free guidance (scale != 1) needs the teacher's null condition, but {name} "
                         "has none (null=None). Use guidance scale 1, or a teacher trained with condition dropout")
    if isinstance(null, Mapping):  # precomputed embeddings: the null holds every keyword of the network's condition
        from .conditioning import expand_null

        try:
            probe_output(teacher, sample_shape, expand_null(null, 1, _first_device(teacher)))
        except (IndexError, RuntimeError, ValueError, TypeError) as e:
            raise ValueError(f"classifier-free guidance needs a null condition, but {name} fails on the null "
                             f"embeddings {sorted(null)}: {e}. Give (1, ...) tensors for every condition keyword "
                             "(e.g. the empty prompt's embeddings)") from e
        return
    if not isinstance(null, Tensor):
        net = getattr(teacher, "model", teacher)
        for tname, rows in _label_tables(net):
            if int(null) >= rows:
                raise ValueError(
                    f"classifier-free guidance needs a null class, but {name} has no null class: its label table "
                    f"{tname} has {rows} rows, so the null id {int(null)} does not exist (train the teacher with "
                    "label dropout, or use guidance scale 1)")
    try:
        probe_output(teacher, sample_shape, {cond_key: _probe_cond(null, 1, _first_device(teacher))})
    except (IndexError, RuntimeError, ValueError) as e:
        raise ValueError(f"classifier-free guidance needs a null condition, but {name} fails on "
                         f"{cond_key}={null!r}: {e}") from e
