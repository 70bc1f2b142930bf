"""Teacher trajectories as a reusable, resumable data step (used by reflow and guidance-adapter distillation).

``generate_trajectories`` samples the teacher with classifier-free guidance (a guidance scale per sample, drawn
from a range) from seeded noise and writes sharded safetensors: for every sample the noise, the condition, the
guidance scale, the starting state ``x_T``, optionally every state along the trajectory, and the endpoint; plus
the sigmas. Every sample's noise, class and scale come from its global index (``core.distill``), so shards are
independent: an interrupted run resumes by skipping the complete shards, and the data never depend on the shard
or batch size. A ``manifest.json`` records the configuration; resuming with another configuration is an error.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .conditioning import cond_index, cond_kwargs, cond_len, cond_to, is_embedding_cond
from .distill import (
    check_guidance_range,
    check_null_condition,
    rand_per_sample,
    randint_per_sample,
    randn_per_sample,
    sample_scales,
)
from .guidance.scaled import ScaledCFGDenoiser
from .io import read_json, write_json
from .sampling.samplers import get_sampler
from .sampling.schedules import check_sigmas, get_sigmas

FORMAT = "fewstep-trajectories"
#: samplers whose callback reports the state at ``sigmas[i]`` before step ``i`` (the trajectory states)
TRAJECTORY_SAMPLERS = ("euler", "heun", "dpmpp_2m")
_STREAM_NOISE, _STREAM_COND, _STREAM_SCALE = "traj/noise", "traj/cond", "traj/scale"


def _json_hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _shard_ok(path: Path, config_hash: str) -> bool:
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            return (f.metadata() or {}).get("config_hash") == config_hash
    except Exception:  # noqa: BLE001 - a torn or foreign file is simply regenerated
        return False


def _atomic_save(tensors: dict[str, Tensor], path: Path, metadata: dict[str, str]) -> None:
    from .io import save_safetensors

    save_safetensors(tensors, path, sidecar=False, header=metadata)


def generate_trajectories(
    teacher: nn.Module,
    out_dir: str | Path,
    num_samples: int,
    sample_shape: Sequence[int],
    guidance: float | Sequence[float] = 2.0,
    sampler: str = "dpmpp_2m",
    steps: int = 16,
    schedule: str = "karras",
    sigmas: Tensor | None = None,
    num_classes: int | None = 10,
    cond_pool: Tensor | Mapping[str, Tensor] | None = None,
    cond_key: str = "class_labels",
    null: Any = 10,
    shard_size: int = 512,
    batch_size: int = 256,
    seed: int = 0,
    save_states: bool = True,
    progress: bool = True,
) -> Path:
    """Generate (or resume) teacher CFG trajectories into ``out_dir``. Returns ``out_dir``.

    Args:
        teacher: a denoiser ``D(x, sigma, **{cond_key: c})``.
        num_samples: number of trajectories.
        sample_shape: shape of one sample, e.g. ``(1, 16, 16)``.
        guidance: one CFG scale or a ``(min, max)`` range (uniform per sample); fewstep's convention.
        sampler, steps, schedule, sigmas: how the teacher ODE is solved (``euler``, ``heun`` or ``dpmpp_2m``).
        num_classes / cond_pool: conditions are uniform class ids, or rows of ``cond_pool``: a tensor, or a mapping
            of precomputed text embeddings ``{keyword: (N, ...)}`` (``core.conditioning``). Each sample's row is
            stored in the shards (``cond``, or ``cond.<keyword>`` per embedding) with its pool index
            (``cond_index``).
        cond_key, null: the teacher's condition argument and its null value (needed when a scale != 1; a mapping of
            null embeddings for a text-conditioned teacher).
        shard_size, batch_size: samples per file and per teacher call.
        seed: seeds every sample's noise, condition and scale (with its global index).
        save_states: also store every state (``(N, steps + 1, *sample_shape)``, the last is the endpoint).
    """
    if sampler not in TRAJECTORY_SAMPLERS:
        raise ValueError(f"trajectory sampler must be one of {TRAJECTORY_SAMPLERS}, got {sampler!r}")
    if num_samples < 1 or shard_size < 1 or batch_size < 1:
        raise ValueError("num_samples, shard_size and batch_size must be >= 1")
    if num_classes is None and cond_pool is None:
        raise ValueError("give num_classes (class-conditional teacher) or cond_pool (rows of conditions)")
    w_range = check_guidance_range(guidance)
    if w_range != (1.0, 1.0):
        check_null_condition(teacher, null, sample_shape, cond_key)
    ms = teacher.model_sampling
    sig = check_sigmas(sigmas if sigmas is not None else get_sigmas(schedule, ms, steps)).float().cpu()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    net = getattr(teacher, "model", teacher)
    from .guidance.adapters import base_config_hash

    manifest = {
        "format": FORMAT, "version": 1, "teacher": getattr(teacher, "name", type(teacher).__name__),
        "teacher_config_hash": base_config_hash(net), "model_sampling": ms.config() if hasattr(ms, "config") else None,
        "sampler": sampler, "sigmas": [float(s) for s in sig], "guidance_range": list(w_range),
        "num_samples": int(num_samples), "shard_size": int(shard_size), "seed": int(seed),
        "sample_shape": list(sample_shape), "num_classes": num_classes,
        "cond_pool": None if cond_pool is None else _pool_signature(cond_pool),
        "cond_key": cond_key, "null": _null_signature(null), "save_states": save_states,
    }
    config_hash = _json_hash(manifest)
    man_path = out / "manifest.json"
    if man_path.exists():
        old = read_json(man_path)
        if old.get("config_hash") != config_hash:
            diff = sorted(k for k in manifest if old.get(k) != manifest[k])
            raise ValueError(f"{out} holds trajectories of another configuration (differs in {diff}); "
                             "delete the folder or choose another out_dir")
    else:
        write_json(man_path, {**manifest, "config_hash": config_hash})

    model = ScaledCFGDenoiser(teacher, cond_key=cond_key, null=null)
    sample = get_sampler(sampler)
    device = next((p.device for p in net.parameters()), torch.device("cpu"))
    num_shards = math.ceil(num_samples / shard_size)
    todo = [i for i in range(num_shards) if not _shard_ok(out / f"shard_{i:05d}.safetensors", config_hash)]
    bar = tqdm(total=num_samples, initial=num_samples - sum(
        min(shard_size, num_samples - i * shard_size) for i in todo), desc="teacher trajectories",
        disable=not progress, unit="traj")
    for i in todo:
        lo, hi = i * shard_size, min(num_samples, (i + 1) * shard_size)
        parts: dict[str, list[Tensor]] = {}
        for b in range(lo, hi, batch_size):
            ids = torch.arange(b, min(hi, b + batch_size))
            noise = randn_per_sample(ids, sample_shape, _STREAM_NOISE, seed)
            extra_rows: dict[str, Tensor] = {}
            if cond_pool is not None:
                cidx = randint_per_sample(ids, cond_len(cond_pool), _STREAM_COND, seed)
                cond = cond_index(cond_pool, cidx)
                extra_rows["cond_index"] = cidx
                if is_embedding_cond(cond):
                    extra_rows.update({f"cond.{k}": v for k, v in cond.items()})
                    stored = None
                else:
                    stored = cond
            else:
                cond = stored = randint_per_sample(ids, int(num_classes), _STREAM_COND, seed)
            w = sample_scales(rand_per_sample(ids, 1, _STREAM_SCALE, seed)[:, 0], w_range)
            x = ms.noise_scaling(sig[0], noise, torch.zeros_like(noise), max_denoise=True)
            states: list[Tensor] = []

            def grab(d: dict, states=states) -> None:
                states.append(d["x"].detach().cpu())

            with torch.no_grad():
                end = sample(model, x.to(device), sig.to(device), disable=True, callback=grab if save_states else None,
                             extra_args={**cond_kwargs(cond_to(cond, device), cond_key),
                                         "guidance_scale": w.to(device)}).cpu()
            batch = {"noise": noise, "guidance_scale": w, "start": x, "endpoint": end, **extra_rows}
            if stored is not None:
                batch["cond"] = stored
            if save_states:
                if len(states) != len(sig) - 1:
                    raise RuntimeError(f"sampler {sampler} reported {len(states)} states for {len(sig) - 1} steps")
                batch["states"] = torch.stack(states + [end], dim=1)
            for k, v in batch.items():
                parts.setdefault(k, []).append(v)
            bar.update(len(ids))
        tensors = {k: torch.cat(v) for k, v in parts.items()}
        tensors["sigmas"] = sig
        _atomic_save(tensors, out / f"shard_{i:05d}.safetensors",
                     {"format": FORMAT, "config_hash": config_hash, "first_index": str(lo)})
    bar.close()
    return out


def load_trajectories(out_dir: str | Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Load every shard of a complete trajectory folder: ``(tensors, manifest)`` with tensors ``noise``, ``cond``,
    ``guidance_scale``, ``start``, ``endpoint``, optionally ``states``, concatenated in sample order, and
    ``sigmas``; for text embeddings ``cond`` is the mapping ``{keyword: (N, ...)}`` (``core.conditioning``).
    Raises ``FileNotFoundError`` / ``ValueError`` for a missing or incomplete folder."""
    from .io import read_safetensors

    out = Path(out_dir)
    man_path = out / "manifest.json"
    if not man_path.exists():
        raise FileNotFoundError(f"no trajectories at {out} (manifest.json missing); run generate_trajectories")
    manifest = read_json(man_path)
    n, size = manifest["num_samples"], manifest["shard_size"]
    shards = []
    for i in range(math.ceil(n / size)):
        p = out / f"shard_{i:05d}.safetensors"
        if not _shard_ok(p, manifest["config_hash"]):
            raise ValueError(f"trajectory folder {out} is incomplete (shard {i} missing or from another run); "
                             "run generate_trajectories again with the same arguments to resume")
        shards.append(read_safetensors(p)[0])
    tensors: dict[str, Any] = {k: torch.cat([s[k] for s in shards]) for k in shards[0] if k != "sigmas"}
    tensors["sigmas"] = shards[0]["sigmas"]
    embeds = {k[len("cond."):]: tensors.pop(k) for k in list(tensors) if k.startswith("cond.")}
    if embeds:
        tensors["cond"] = embeds
    return tensors, manifest


def _pool_signature(pool: Tensor | Mapping[str, Tensor]) -> list[Any]:
    """Size and content hash of a condition pool (a resumed run must use the same pool)."""
    parts = pool.items() if is_embedding_cond(pool) else [("", pool)]
    return [cond_len(pool), _json_hash({k: [list(v.shape), float(v.double().sum()), float(v.double().abs().sum())]
                                        for k, v in parts})]


def _null_signature(null: Any) -> Any:
    if is_embedding_cond(null):
        return {k: [list(v.shape), float(torch.as_tensor(v).double().sum())] for k, v in null.items()}
    return null if not isinstance(null, Tensor) else "tensor"
