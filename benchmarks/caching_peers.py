"""Caching peers at matched cost: fewstep's caches next to diffusers' cache hooks and cache-dit, one model, one run.

``python -m fewstep.benchmarks.caching_peers`` (``--per-class 36`` for the 360-sample protocol; ``--quick`` for a
smoke run). Model: the embedded DiT teacher (diffusers ``DiTTransformer2DModel``, 5 blocks), 50-step
``dpmpp_2m`` (karras), CFG 2 with cond and uncond in one batch (as ``benchmarks/caching.py``), the same noise for
every setting. Protocol in ``benchmarks/caching_protocol.py``: PSNR / RMS to the uncached samples (paired), FD and
accuracy, cost as network evaluations in block-stack equivalents counted on the blocks' submodules, wall time of
the scored generation against the uncached baseline timed at the start and at the end of the run.

Matched cost: every family has one knob (a threshold, or a (interval, warm-up) schedule); it is set per target NFE
(25, 20, 15, 10 of 50) on a small search batch (``--search-per-class``) -- bisection of the threshold, or the
schedule whose count is nearest -- then the scored run reports the NFE it really used.

Peers (each runs through its own library's entry point on the same ``nn.Module``):

- fewstep: ``StepCache`` (TeaCache indicator + TaylorSeer order 1; fixed interval after a warm-up + TaylorSeer
  order 2), ``FirstBlockCache`` (First-Block-Cache indicator, with and without block-level TaylorSeer forecasting of
  the block range's residual). ``benchmarks/caching.py`` sweeps the other fewstep settings.
- diffusers (>= 0.36): ``FirstBlockCacheConfig``, ``MagCacheConfig`` (ratios calibrated on this model with its
  ``calibrate=True`` mode), ``TaylorSeerCacheConfig`` (blocks ``transformer_blocks.\\d+`` as skip-predict,
  ``proj_out_2``
  Taylor-forecast: the DiT's "lite" layout), ``FasterCacheConfig`` (attention reuse + unconditional-branch
  approximation; needs [uncond, cond] order and keyword inputs, so its run uses an uncond-first CFG wrapper),
  ``PyramidAttentionBroadcastConfig`` and ``SeaCacheConfig``, through ``CacheMixin.enable_cache`` (mixed into the DiT
  class for the run) and ``cache_context``.
- cache-dit (optional, ``pip install cache-dit``; not a fewstep dependency): DBCache (Fn=1, Bn=0) with and without
  TaylorSeer, on the transformer alone (``BlockAdapter`` with ``forward_pattern=Pattern_3``: the DiT's blocks
  return the hidden state only). Its default warm-up (``max_warmup_steps=8``) is kept; at 50 steps it costs 8
  full computes, on a 4- to 8-step model it would disable the cache entirely.

Writes ``benchmarks/results/caching_peers.json`` and ``caching_peers_pareto.png``.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import re
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from fewstep.core.cache import FirstBlockCache, StepCache, apply_cache
from fewstep.core.cache.calibration import PACKAGE_DIR
from fewstep.core.evaluate import balanced_labels
from fewstep.core.guidance import CFGDenoiser
from fewstep.core.models.denoiser import Denoiser, unwrap_output
from fewstep.core.models.digits import NULL_CLASS
from fewstep.core.models.embedded import load_teacher
from fewstep.core.sampling import get_sigmas, sample_dpmpp_2m

from .caching_protocol import BlockCounter, baseline_wall, fidelity, pareto_front
from .common import RESULTS, machine, write_json

TARGETS = (25, 20, 15, 10)


# ------------------------------------------------------------------------------------------------ peers
@dataclass
class Family:
    """One cache method with one knob. ``attach(den, knob)`` is a context manager that applies the cache to the
    teacher (fresh state) and removes it; ``knobs``: ``("threshold", lo, hi)`` or ``("choices", [...])``."""

    name: str
    source: str
    attach: Callable[[Denoiser, Any], contextlib.AbstractContextManager]
    knobs: tuple
    uncond_first: bool = False
    note: str = ""
    estimate: Callable[[Any, int], float] | None = None
    extra: dict = field(default_factory=dict)


def _fewstep(make: Callable[[Any], Any]) -> Callable[[Denoiser, Any], contextlib.AbstractContextManager]:
    @contextlib.contextmanager
    def attach(den: Denoiser, knob: Any) -> Iterator[dict]:
        cache = make(knob)
        with apply_cache(den, cache, calibration_dirs=[PACKAGE_DIR]):
            yield {"config": cache.config()}
    return attach


def _interval_schedules(max_interval: int = 8) -> list[tuple[int, float]]:
    """(interval, start_percent) pairs: compute at the first ``start_percent`` of the steps, then every k-th."""
    return [(k, p / 50) for k in range(2, max_interval + 1) for p in range(0, 26)]


@contextlib.contextmanager
def _mixin(net: nn.Module) -> Iterator[nn.Module]:
    """Mix diffusers' ``CacheMixin`` into the network's class for the duration (the DiT lacks it)."""
    from diffusers.models.cache_utils import CacheMixin

    cls = net.__class__
    if not issubclass(cls, CacheMixin):
        net.__class__ = type(f"{cls.__name__}WithCache", (cls, CacheMixin), {})
    try:
        yield net
    finally:
        net.__class__ = cls


class _Timestep:
    """Remembers the timestep of the network's current call (FasterCache / PAB ask for it through a callback)."""

    def __init__(self, net: nn.Module) -> None:
        self.t = 999.0
        self.h = net.register_forward_pre_hook(self._grab, with_kwargs=True)

    def _grab(self, _m: nn.Module, args: tuple, kwargs: dict) -> None:
        t = kwargs.get("timestep", args[1] if len(args) > 1 else None)
        if t is not None:
            self.t = float(torch.as_tensor(t).reshape(-1)[0])

    def __call__(self) -> float:
        return self.t


def _diffusers(make_config: Callable[[Any, Any], Any]) -> Callable[[Denoiser, Any], contextlib.AbstractContextManager]:
    @contextlib.contextmanager
    def attach(den: Denoiser, knob: Any) -> Iterator[dict]:
        net = den.model
        ts = _Timestep(net)
        try:
            with _mixin(net):
                cfg = make_config(knob, ts)
                net.enable_cache(cfg)
                try:
                    with net.cache_context("cond_uncond"):
                        yield {"config": repr(cfg).replace("\n", " ")[:400]}
                finally:
                    net.disable_cache()
        finally:
            ts.h.remove()
    return attach


def _magcache_ratios(teacher: Denoiser, labels, noise, sigmas, cfg) -> list[float]:
    """diffusers' MagCache calibration mode run once on this model and sampler; it prints the ratios at the end of
    the run (its documented way to hand them over), which are read back here."""
    import ast
    import io

    from diffusers.hooks import MagCacheConfig

    net = teacher.model
    buf = io.StringIO()
    with _mixin(net):
        net.enable_cache(MagCacheConfig(calibrate=True, num_inference_steps=len(sigmas) - 1))
        try:
            with net.cache_context("cond_uncond"), contextlib.redirect_stdout(buf):
                _sample(teacher, labels, noise, sigmas, cfg, False)
        finally:
            net.disable_cache()
    lists = re.findall(r"^\[[^\]]*\]$", buf.getvalue(), flags=re.M)
    if not lists:
        raise RuntimeError(f"MagCache calibration printed no ratios for {len(sigmas) - 1} steps: "
                           f"{buf.getvalue()[:200]!r}")
    return [float(v) for v in ast.literal_eval(lists[-1])]


def _cache_dit(taylor: bool) -> Callable[[Denoiser, Any], contextlib.AbstractContextManager]:
    @contextlib.contextmanager
    def attach(den: Denoiser, knob: Any) -> Iterator[dict]:
        import cache_dit
        from cache_dit import BlockAdapter, DBCacheConfig, ForwardPattern, TaylorSeerCalibratorConfig

        net = den.model
        kw: dict[str, Any] = {"cache_config": DBCacheConfig(Fn_compute_blocks=1, Bn_compute_blocks=0,
                                                             residual_diff_threshold=float(knob),
                                                             max_warmup_steps=8, num_inference_steps=50)}
        if taylor:
            kw["calibrator_config"] = TaylorSeerCalibratorConfig(taylorseer_order=1)
        first = net.transformer_blocks[0]
        adapter = BlockAdapter(transformer=net, blocks=net.transformer_blocks, forward_pattern=ForwardPattern.Pattern_3)
        cache_dit.enable_cache(adapter, **kw)

        # the DiT's forward reads ``transformer_blocks[0].norm1.emb`` after its block loop (the final adaLN); during
        # the forward cache-dit swaps ``transformer_blocks`` for its own wrapper, which hides the first block, so its
        # norm1 is re-exposed on the wrapper when the first block runs (Fn=1: it always runs)
        def expose(_m: nn.Module, _a: tuple) -> None:
            wrapper = net.transformer_blocks[0]
            if wrapper is not first and "norm1" not in vars(wrapper):
                object.__setattr__(wrapper, "norm1", first.norm1)

        hook = first.register_forward_pre_hook(expose)
        try:
            desc = f"DBCache F1B0 threshold {float(knob):.4g} warmup 8" + (" + TaylorSeer1" if taylor else "")
            yield {"config": desc}
        finally:
            hook.remove()
            cache_dit.disable_cache(net)
    return attach


def _est_interval(kp: tuple[int, float], steps: int) -> float:
    k, p = kp
    warm = math.ceil(p * steps)
    return warm + math.ceil((steps - warm) / k)


def _est_taylorseer(kw: tuple[int, int], steps: int) -> float:
    k, w = kw
    return w + math.ceil((steps - w) / k)


def families(mag_ratios: list[float] | None) -> list[Family]:
    from diffusers.hooks import (
        FasterCacheConfig,
        FirstBlockCacheConfig,
        MagCacheConfig,
        PyramidAttentionBroadcastConfig,
        TaylorSeerCacheConfig,
    )

    fs = [
        Family("fewstep StepCache teacache + taylor1", "fewstep",
               _fewstep(lambda t: StepCache(t, indicator="teacache", forecast="taylor1")), ("threshold", 0.01, 5.0)),
        Family("fewstep StepCache interval + taylor2", "fewstep",
               _fewstep(lambda kp: StepCache(1.0, indicator="interval", max_consecutive_skips=kp[0] - 1,
                                             forecast="taylor2", start_percent=kp[1])),
               ("choices", _interval_schedules()), estimate=_est_interval),
        Family("fewstep FirstBlockCache", "fewstep", _fewstep(lambda t: FirstBlockCache(t)), ("threshold", 0.005, 3.0)),
        Family("fewstep FirstBlockCache + taylor1 (block-level forecast)", "fewstep",
               _fewstep(lambda t: FirstBlockCache(t, forecast="taylor1")), ("threshold", 0.005, 3.0)),
        Family("diffusers FirstBlockCache", "diffusers",
               _diffusers(lambda t, ts: FirstBlockCacheConfig(threshold=float(t))), ("threshold", 0.005, 3.0)),
        Family("diffusers TaylorSeer (blocks skip, proj_out_2 forecast, order 1)", "diffusers",
               _diffusers(lambda kp, ts: TaylorSeerCacheConfig(
                   cache_interval=kp[0], disable_cache_before_step=kp[1], max_order=1,
                   taylor_factors_dtype=torch.float32, skip_predict_identifiers=[r"transformer_blocks\.\d+"],
                   cache_identifiers=["proj_out_2"])),
               ("choices", [(k, w) for k in range(2, 9) for w in range(1, 26)]), estimate=_est_taylorseer,
               note="cache_interval, disable_cache_before_step chosen per target; factors in float32 (default bf16)"),
        Family("diffusers TaylorSeer (order 2)", "diffusers",
               _diffusers(lambda kp, ts: TaylorSeerCacheConfig(
                   cache_interval=kp[0], disable_cache_before_step=kp[1], max_order=2,
                   taylor_factors_dtype=torch.float32, skip_predict_identifiers=[r"transformer_blocks\.\d+"],
                   cache_identifiers=["proj_out_2"])),
               ("choices", [(k, w) for k in range(2, 9) for w in range(1, 26)]), estimate=_est_taylorseer),
        Family("diffusers PyramidAttentionBroadcast", "diffusers",
               _diffusers(lambda k, ts: PyramidAttentionBroadcastConfig(
                   spatial_attention_block_skip_range=int(k), spatial_attention_timestep_skip_range=(-1, 1001),
                   current_timestep_callback=ts)),
               ("choices", [2, 3, 4, 6, 8, 12]),
               note="skips attention only (feed-forward always runs): its cost cannot go below half the blocks"),
        Family("diffusers FasterCache", "diffusers",
               _diffusers(lambda k, ts: FasterCacheConfig(
                   spatial_attention_block_skip_range=int(k), spatial_attention_timestep_skip_range=(-1, 1001),
                   unconditional_batch_skip_range=int(k), unconditional_batch_timestep_skip_range=(-1, 1001),
                   tensor_format="BCHW", current_timestep_callback=ts,
                   _unconditional_conditional_input_kwargs_identifiers=["hidden_states", "timestep",
                                                                       "class_labels"])),
               ("choices", [2, 3, 4, 6, 8]), uncond_first=True,
               note="attention reuse + unconditional branch from the conditional one (FFT low/high split)"),
    ]
    if mag_ratios is not None:
        fs.append(Family("diffusers MagCache", "diffusers",
                         _diffusers(lambda t, ts: MagCacheConfig(threshold=float(t), max_skip_steps=8,
                                                                 retention_ratio=0.1, num_inference_steps=50,
                                                                 mag_ratios=list(mag_ratios))),
                         ("threshold", 0.001, 5.0), note="ratios from its calibrate=True mode on this model; "
                         "max_skip_steps 8, retention_ratio 0.1 so that NFE 10 is reachable"))
    try:
        import cache_dit  # noqa: F401

        fs.append(Family("cache-dit DBCache F1B0", "cache-dit", _cache_dit(False), ("threshold", 0.005, 3.0),
                         note="transformer-only BlockAdapter, Pattern_3; default max_warmup_steps=8"))
        fs.append(Family("cache-dit DBCache F1B0 + TaylorSeer1", "cache-dit", _cache_dit(True),
                         ("threshold", 0.005, 3.0), note="as above + TaylorSeer calibrator order 1"))
    except ImportError as e:
        fs.append(Family("cache-dit DBCache", "cache-dit", None, (),
                         note=f"not installed ({e}); pip install cache-dit"))
    return fs


# ------------------------------------------------------------------------------------------------ sampling
def _dit_call_kw(module: nn.Module, x_in: torch.Tensor, t: torch.Tensor, **cond: Any) -> torch.Tensor:
    return unwrap_output(module(hidden_states=x_in, timestep=t, **cond))


class UncondFirstCFG(nn.Module):
    """CFG with the batch as [uncond, cond] and keyword inputs (FasterCache's convention); same formula as
    ``CFGDenoiser``: ``uncond + w (cond - uncond)``."""

    def __init__(self, teacher: Denoiser, scale: float) -> None:
        super().__init__()
        self.den = Denoiser(teacher.model, teacher.model_sampling, call=_dit_call_kw, name=teacher.name)
        self.scale = scale
        self.model_sampling = teacher.model_sampling

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, class_labels: torch.Tensor) -> torch.Tensor:
        null = torch.full_like(class_labels, NULL_CLASS)
        out = self.den(torch.cat([x, x]), torch.cat([sigma, sigma]), class_labels=torch.cat([null, class_labels]))
        uncond, cond = out.chunk(2)
        return uncond + self.scale * (cond - uncond)


@torch.no_grad()
def _sample(teacher: Denoiser, labels, noise, sigmas, cfg: float, uncond_first: bool) -> torch.Tensor:
    model = UncondFirstCFG(teacher, cfg) if uncond_first else CFGDenoiser(teacher, cfg, null=NULL_CLASS)
    x = teacher.model_sampling.noise_scaling(sigmas[0], noise, torch.zeros_like(noise), max_denoise=True)
    return sample_dpmpp_2m(model, x, sigmas, extra_args={"class_labels": labels}, disable=True).clamp(-1, 1)


def run_setting(teacher: Denoiser, counter: BlockCounter, fam: Family | None, knob: Any, labels, noise, sigmas,
                cfg: float) -> dict[str, Any]:
    """Generate once (cached or not), return images, wall seconds, cost counts and the cache's description."""
    counter.reset(rows_per_call=2 * len(labels))
    ctx = fam.attach(teacher, knob) if fam is not None else contextlib.nullcontext({"config": "none"})
    with ctx as info:
        t0, c0 = time.perf_counter(), time.process_time()
        imgs = _sample(teacher, labels, noise, sigmas, cfg, fam is not None and fam.uncond_first)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"images": imgs, "wall_s": wall, "cpu_s": cpu, "nfe": counter.nfe, "net_calls": counter.counts["calls"],
            "block_evals": counter.block_evals, "config": (info or {}).get("config")}


def match_knob(teacher, counter, fam: Family, target: float, labels, noise, sigmas, cfg,
               iters: int = 6) -> tuple[Any, float]:
    """The knob whose NFE on the search batch is nearest ``target`` (bisection on a threshold, log scale)."""
    kind = fam.knobs[0]
    if kind == "choices":
        best = None
        cands = list(fam.knobs[1])
        if fam.estimate is not None:  # try the schedules whose expected count is nearest first
            cands.sort(key=lambda k: abs(fam.estimate(k, len(sigmas) - 1) - target))
        for k in cands[:12]:
            # fixed schedules: the count does not depend on the data, one sample is enough
            nfe = run_setting(teacher, counter, fam, k, labels[:1], noise[:1], sigmas, cfg)["nfe"]
            if best is None or abs(nfe - target) < abs(best[1] - target):
                best = (k, nfe)
            if abs(nfe - target) < 0.5:
                break
        return best
    seen = fam.extra.setdefault("seen", {})  # threshold -> NFE on the search batch, shared across targets
    lo, hi = float(fam.knobs[1]), float(fam.knobs[2])
    lo = max([t for t, n in seen.items() if n > target], default=lo)
    hi = min([t for t, n in seen.items() if n < target], default=hi)
    best = min(seen.items(), key=lambda tn: abs(tn[1] - target), default=None)
    for _ in range(iters):
        if best is not None and abs(best[1] - target) < 0.75:
            break
        mid = (lo * hi) ** 0.5
        nfe = run_setting(teacher, counter, fam, mid, labels, noise, sigmas, cfg)["nfe"]
        seen[mid] = nfe
        if best is None or abs(nfe - target) < abs(best[1] - target):
            best = (mid, nfe)
        if nfe > target:
            lo = mid  # too many evaluations: raise the threshold
        else:
            hi = mid
    return best


# ------------------------------------------------------------------------------------------------ benchmark
def peers_benchmark(per_class: int = 6, search_per_class: int = 1, steps: int = 50, cfg: float = 2.0,
                    seed: int = 0, targets: tuple[int, ...] = TARGETS, only: list[str] | None = None,
                    log: Callable[[str], None] = print,
                    checkpoint: Callable[[dict], None] | None = None) -> dict[str, Any]:
    from fewstep.core.metrics.quality import evaluate_samples

    teacher = load_teacher()
    sigmas = get_sigmas("karras", teacher.model_sampling, steps)
    counter = BlockCounter(teacher.model)
    labels = balanced_labels(per_class)
    noise = torch.randn(len(labels), 1, 16, 16, generator=torch.Generator().manual_seed(seed))
    s_labels = balanced_labels(search_per_class)
    s_noise = torch.randn(len(s_labels), 1, 16, 16, generator=torch.Generator().manual_seed(seed + 7))

    t0 = time.perf_counter()
    mag = None
    try:
        mag = _magcache_ratios(teacher, s_labels, s_noise, sigmas, cfg)
    except Exception as e:  # reported, MagCache then listed as not run
        log(f"MagCache calibration failed: {e!r}")
    cal_s = time.perf_counter() - t0

    base0 = run_setting(teacher, counter, None, None, labels, noise, sigmas, cfg)
    ref = base0["images"]
    base_m = {k: float(v) for k, v in evaluate_samples(ref, labels).items()}
    log(f"uncached: {base0['wall_s']:.1f}s  NFE {base0['nfe']:.1f}  FD {base_m['fd']:.3f}  "
        f"acc {base_m['accuracy']:.3f}")
    fams = families(mag)
    if only:
        fams = [f for f in fams if any(o.lower() in f.name.lower() for o in only)]
    rows, skipped = [], []
    for fam in fams:
        if fam.attach is None:
            skipped.append({"family": fam.name, "source": fam.source, "why": fam.note})
            continue
        for target in targets:
            try:
                knob, s_nfe = match_knob(teacher, counter, fam, target, s_labels, s_noise, sigmas, cfg)
                same = next((r for r in rows if r["family"] == fam.name and r["knob"] == knob), None)
                if same is not None and fam.knobs[0] == "choices":  # the same schedule again: not rerun
                    rows.append({**same, "label": f"{fam.name} @ {target}", "target_nfe": target,
                                 "note": (same["note"] + "; " if same["note"] else "") +
                                 f"target {target} not reachable: same setting as @ {same['target_nfe']}"})
                    log(f"{fam.name} @ {target}: same setting as @ {same['target_nfe']} (NFE {same['nfe']:.1f})")
                    continue
                r = run_setting(teacher, counter, fam, knob, labels, noise, sigmas, cfg)
            except Exception as e:
                why = f"{type(e).__name__}: {e}"
                log(f"{fam.name} @ {target}: FAILED {why}")
                skipped.append({"family": fam.name, "source": fam.source, "target_nfe": target, "why": why[:500],
                                "trace": traceback.format_exc()[-1500:]})
                continue
            m = {k: float(v) for k, v in evaluate_samples(r["images"], labels).items()}
            row = {"label": f"{fam.name} @ {target}", "family": fam.name, "source": fam.source, "target_nfe": target,
                   "knob": knob if not isinstance(knob, float) else round(knob, 5), "search_nfe": s_nfe,
                   "nfe": r["nfe"], "net_calls": r["net_calls"], "config": r["config"], "note": fam.note,
                   **fidelity(r["images"], ref), "fd": m["fd"], "accuracy": m["accuracy"],
                   "fd_change": m["fd"] / base_m["fd"] - 1.0, "wall_s": r["wall_s"], "cpu_s": r["cpu_s"]}
            rows.append(row)
            log(f"{row['label']:70s} NFE {row['nfe']:5.1f}  PSNR {row['psnr_db']:6.2f}  RMS {row['rms']:.4f}  "
                f"FD {row['fd']:.3f}  acc {row['accuracy']:.3f}  {row['wall_s']:.1f}s")
            if checkpoint is not None:  # partial results survive an interrupted run
                checkpoint({"partial": True, "baseline_start": {**base_m, "wall_s": base0["wall_s"]}, "rows": rows,
                            "not_run": skipped})
    base1 = run_setting(teacher, counter, None, None, labels, noise, sigmas, cfg)
    end_fid = fidelity(base1["images"], ref)
    bw = baseline_wall(base0["wall_s"], base1["wall_s"])
    bc = baseline_wall(base0["cpu_s"], base1["cpu_s"])
    for r in rows:
        r["speedup_wall"] = bw / r["wall_s"]
        r["speedup_cpu"] = bc / r["cpu_s"]
    other = run_setting(teacher, counter, None, None, labels,
                        torch.randn(noise.shape, generator=torch.Generator().manual_seed(seed + 1)), sigmas, cfg)
    fd_other = float(evaluate_samples(other["images"], labels)["fd"])
    best = {}
    for target in targets:
        cand = [r for r in rows if r["target_nfe"] == target]
        if cand:
            top = max(cand, key=lambda r: r["psnr_db"])
            fw = max((r for r in cand if r["source"] == "fewstep"), key=lambda r: r["psnr_db"], default=None)
            best[str(target)] = {"best": top["label"], "best_psnr_db": top["psnr_db"],
                                 "best_fewstep": fw and fw["label"], "best_fewstep_psnr_db": fw and fw["psnr_db"],
                                 "fewstep_wins": bool(fw is not None and fw["label"] == top["label"])}
    return {
        "model": "digits-dit-teacher (diffusers DiTTransformer2DModel, 5 blocks)", "sampler": "dpmpp_2m",
        "schedule": "karras", "steps": steps, "cfg": cfg, "samples": len(labels), "seed": seed,
        "search_samples": len(s_labels), "targets_nfe": list(targets),
        "baseline": {**base_m, "fd_other_noise_seed": fd_other, "nfe": base0["nfe"],
                     "wall_s_start": base0["wall_s"], "wall_s_end": base1["wall_s"],
                     "cpu_s_start": base0["cpu_s"], "cpu_s_end": base1["cpu_s"],
                     "end_vs_start_psnr_db": end_fid["psnr_db"]},
        "magcache_ratios": mag, "magcache_calibration_s": round(cal_s, 1),
        "rows": rows, "not_run": skipped, "best_per_target": best,
        "pareto_psnr": pareto_front(rows, "nfe", "psnr_db", True),
        "pareto_fd": pareto_front(rows, "nfe", "fd", False),
    }


def plot(result: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = result["peers"]
    rows = t["rows"]
    fig, axes = plt.subplots(1, 2, figsize=(16, 6))
    fams = sorted({r["family"] for r in rows})
    markers = "osD^v<>ph*XP"
    colors = {"fewstep": "tab:blue", "diffusers": "tab:orange", "cache-dit": "tab:green"}
    for i, fam in enumerate(fams):
        rs = sorted((r for r in rows if r["family"] == fam), key=lambda r: r["nfe"])
        src = rs[0]["source"]
        kw = {"marker": markers[i % len(markers)], "label": fam, "color": colors.get(src), "alpha": 0.85,
              "ls": "-" if src == "fewstep" else "--"}
        axes[0].plot([r["nfe"] for r in rs], [r["psnr_db"] for r in rs], **kw)
        axes[1].plot([r["nfe"] for r in rs], [r["fd"] for r in rs], **kw)
    b = t["baseline"]
    axes[1].axhline(b["fd"], color="k", ls=":", lw=1, label="uncached FD")
    axes[1].axhline(b["fd"] * 1.05, color="r", ls="--", lw=1, label="+5% FD")
    axes[1].axhline(b["fd_other_noise_seed"], color="grey", ls="-.", lw=1, label="uncached, other noise seed")
    for ax in axes:
        for x in t["targets_nfe"]:
            ax.axvline(x, color="grey", lw=0.5)
        ax.set_xlabel("cost: network evaluations (block-stack equivalents; uncached = 50)")
    axes[0].set(ylabel="PSNR to the uncached samples (dB, higher is better)",
                title=f"embedded DiT teacher, {t['steps']}-step dpmpp_2m, CFG {t['cfg']:g}, {t['samples']} samples")
    axes[1].set(ylabel="FD (lower is better)", title="FD vs cost")
    axes[0].legend(fontsize=6.5, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def markdown(result: dict) -> str:
    t = result["peers"]
    b = t["baseline"]
    lines = [f"uncached: FD {b['fd']:.3f} (other noise seed {b['fd_other_noise_seed']:.3f}), acc {b['accuracy']:.3f}, "
             f"wall {b['wall_s_start']:.1f}s start / {b['wall_s_end']:.1f}s end", "",
             "| target NFE | peer | NFE used | PSNR dB | RMS | FD | FD change | acc | wall speed-up |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(t["rows"], key=lambda r: (-r["target_nfe"], -r["psnr_db"])):
        lines.append(f"| {r['target_nfe']} | {r['family']} | {r['nfe']:.1f} | {r['psnr_db']:.2f} | {r['rms']:.4f} | "
                     f"{r['fd']:.3f} | {100 * r['fd_change']:+.1f}% | {r['accuracy']:.3f} | {r['speedup_wall']:.2f}x |")
    for s in t["not_run"]:
        lines.append(f"- not run: {s['family']} {('@ ' + str(s['target_nfe'])) if 'target_nfe' in s else ''}: "
                     f"{s['why'][:200]}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--per-class", type=int, default=6, help="scored samples per digit (36 = the 360 protocol)")
    p.add_argument("--search-per-class", type=int, default=1, help="samples per digit for matching the NFE")
    p.add_argument("--targets", default=",".join(map(str, TARGETS)), help="matched NFE targets (of 50)")
    p.add_argument("--only", default=None, help="comma-separated substrings of family names to run")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="smoke run: 1 sample per class, targets 25 and 10")
    p.add_argument("--out", default=None, help=f"output folder (default {RESULTS})")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    targets = (25, 10) if a.quick else tuple(int(x) for x in a.targets.split(","))
    result: dict[str, Any] = {"benchmark": "caching_peers", "machine": machine(), "device": "cpu"}
    try:
        import diffusers

        result["versions"] = {"diffusers": diffusers.__version__}
        import cache_dit

        result["versions"]["cache_dit"] = getattr(cache_dit, "__version__", "?")
    except ImportError:
        pass
    result["command"] = "python -m fewstep.benchmarks.caching_peers " + " ".join(
        argv if argv is not None else sys.argv[1:])

    def checkpoint(partial: dict) -> None:
        write_json({**result, "peers_partial": partial}, "caching_peers.partial.json", a.out)

    result["peers"] = peers_benchmark(1 if a.quick else a.per_class, a.search_per_class, targets=targets,
                                      only=a.only.split(",") if a.only else None, checkpoint=checkpoint)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    path = write_json(result, "caching_peers.json", a.out)
    plot(result, path.with_name("caching_peers_pareto.png"))
    print(markdown(result))
    partial = path.with_name("caching_peers.partial.json")
    if partial.exists():
        partial.unlink()
    print(f"\nwrote {path} and {path.with_name('caching_peers_pareto.png')} in {result['seconds']:.0f}s")
    return result


if __name__ == "__main__":
    main()
