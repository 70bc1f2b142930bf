"""Feature caching: quality vs speed on the embedded teacher, speed on large random-weight block stacks.

``python -m fewstep.benchmarks.caching`` (``--quick`` for a short sweep, ``--full`` for a longer one).

1. Embedded teacher, 50-step ``dpmpp_2m`` (karras), CFG 2 through ``CFGDenoiser`` (cond and uncond in one batch):
   the uncached baseline and every cache type over a sweep of thresholds, all from the same noise. Per setting:
   Frechet distance and class accuracy on the embedded benchmark (the FD of the baseline from another noise seed
   is reported too: the noise level of FD at this sample count), RMS distance of the samples to the baseline's
   (paired, same noise), the fraction of network (or block) calls actually run; then wall-time and
   process-CPU-time speed-ups against the baseline in the same process, on a smaller batch: every setting is timed
   next to its own uncached run (ABBA order over the repeats; geometric mean of the ratios), which cancels the
   slow load swings of a shared CPU. The goal of the issue: >= 2.0x at <= 5% FD increase.
2. Random-weight transformer stacks at full width and reduced depth (DiT-XL: width 1152, 16 heads; Flux: width
   3072, 24 heads, one double- and two single-stream blocks) with a fixed skip pattern (every other step), so the
   measured ratio can be compared with the ideal one and the overhead of the cache read off (timed as in 1.).

Timings are ratios from one process on this machine (single-threaded by default: on a shared CPU one thread gives
far steadier ratios than several); the JSON names the machine. Writes ``benchmarks/results/caching.json`` and
``caching_pareto.png``.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import time
from collections.abc import Callable
from typing import Any

import torch

from fewstep.core.cache import (
    CalibrationError,
    DeltaDiTCache,
    FirstBlockCache,
    ResidualCache,
    StepCache,
    apply_cache,
    calibrate,
    load_calibration,
    model_fingerprint,
    save_calibration,
)
from fewstep.core.cache.calibration import PACKAGE_DIR
from fewstep.core.evaluate import balanced_labels
from fewstep.core.guidance import CFGDenoiser
from fewstep.core.models.digits import NULL_CLASS, NUM_CLASSES
from fewstep.core.models.embedded import load_teacher
from fewstep.core.sampling import get_sigmas, sample_dpmpp_2m

from ..core import io
from ..core.checks import finite_float, positive_int
from .common import RESULTS, machine, write_json

Factory = Callable[[], ResidualCache]


def sweep(kind: str = "default") -> list[tuple[str, str, Factory]]:
    """``(family, label, factory)`` of every cached setting."""
    s: list[tuple[str, str, Factory]] = []

    def add(family: str, label: str, make: Factory) -> None:
        s.append((family, label, make))

    if kind == "quick":
        add("StepCache teacache", "teacache 0.2", lambda: StepCache(0.2, indicator="teacache"))
        add("StepCache easycache", "easycache 0.2", lambda: StepCache(0.2, indicator="easycache"))
        add("FirstBlockCache", "first_block 0.1", lambda: FirstBlockCache(0.1))
        add("Delta-DiT", "delta_dit interval 2", lambda: DeltaDiTCache(interval=2))
        return s
    full = kind == "full"
    for t in (0.03, 0.06, 0.1) if full else (0.06, 0.1):
        add("StepCache input", f"input {t}", lambda t=t: StepCache(t))
    for t in (0.1, 0.2, 0.3):
        add("StepCache teacache", f"teacache {t}", lambda t=t: StepCache(t, indicator="teacache"))
    for t in (0.1, 0.2, 0.3) if full else (0.1, 0.2):
        add("StepCache easycache", f"easycache {t}", lambda t=t: StepCache(t, indicator="easycache"))
    for t in (0.005, 0.01, 0.02) if full else (0.01,):
        add("StepCache magcache", f"magcache {t}", lambda t=t: StepCache(t, indicator="magcache"))
    add("StepCache fixed interval", "every 3rd step (reuse)",
        lambda: StepCache(1.0, indicator="interval", max_consecutive_skips=2))
    add("StepCache + TaylorSeer", "every 3rd step + taylor2",
        lambda: StepCache(1.0, indicator="interval", max_consecutive_skips=2, forecast="taylor2"))
    add("StepCache + TaylorSeer", "teacache 0.3 + taylor1",
        lambda: StepCache(0.3, indicator="teacache", forecast="taylor1"))
    if full:
        add("StepCache + TaylorSeer", "input 0.1 + taylor1", lambda: StepCache(0.1, forecast="taylor1"))
    for t in (0.05, 0.1, 0.15) if full else (0.1, 0.15):
        add("FirstBlockCache", f"first_block {t}", lambda t=t: FirstBlockCache(t))
    if full:
        add("FirstBlockCache", "first_block 0.1 + taylor1", lambda: FirstBlockCache(0.1, forecast="taylor1"))
    for t in (0.1, 0.2) if full else (0.2,):
        add("FirstBlockCache teacache", f"blocks teacache {t}", lambda t=t: FirstBlockCache(t, indicator="teacache"))
    for n in (2, 3) if full else (2,):
        add("Delta-DiT", f"delta_dit interval {n}", lambda n=n: DeltaDiTCache(interval=n))
    return s


# ------------------------------------------------------------------------------------------------ teacher
TEACHER_CALIBRATION = {"per_class": 2, "seed": 123, "cfg": 2.0, "steps": 50, "sampler": "dpmpp_2m"}


def teacher_calibration(teacher: torch.nn.Module, recalibrate: bool = False) -> tuple[Any, float]:
    """The shipped calibration of the embedded teacher (made and saved into the package if missing)."""
    name, h = model_fingerprint(teacher)
    if not recalibrate:
        try:
            return load_calibration(name, h, [PACKAGE_DIR]), 0.0
        except CalibrationError:
            pass
    r = TEACHER_CALIBRATION
    t0 = time.perf_counter()
    noise = torch.randn(NUM_CLASSES * r["per_class"], 1, 16, 16, generator=torch.Generator().manual_seed(r["seed"]))
    cal = calibrate(teacher, noise, {"class_labels": torch.arange(NUM_CLASSES).repeat(r["per_class"])},
                    sampler=r["sampler"], steps=r["steps"],
                    guidance=lambda d: CFGDenoiser(d, r["cfg"], null=NULL_CLASS))
    secs = time.perf_counter() - t0
    cal.recipe["seconds"] = round(secs, 1)
    save_calibration(cal, PACKAGE_DIR)
    return cal, secs


@torch.no_grad()
def _generate(teacher, cache: ResidualCache | None, labels, noise, sigmas, cfg) -> tuple[torch.Tensor, float, float]:
    model = CFGDenoiser(teacher, cfg, null=NULL_CLASS)
    x = teacher.model_sampling.noise_scaling(sigmas[0], noise, torch.zeros_like(noise), max_denoise=True)
    ctx = apply_cache(model, cache, calibration_dirs=[PACKAGE_DIR]) if cache is not None else contextlib.nullcontext()
    with ctx:
        t0, c0 = time.perf_counter(), time.process_time()
        out = sample_dpmpp_2m(model, x, sigmas, extra_args={"class_labels": labels}, disable=True)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return out.clamp(-1, 1), wall, cpu


def teacher_benchmark(per_class: int = 6, steps: int = 50, cfg: float = 2.0, kind: str = "default",
                      seed: int = 0, timing_per_class: int = 1, repeats: int = 2, recalibrate: bool = False,
                      log: Callable[[str], None] = print) -> dict:
    """Quality pass (``per_class`` samples per digit, one run per setting) then timing pass (``timing_per_class``
    per digit; each setting timed ``repeats`` times next to its own uncached run, in ABBA order)."""
    from fewstep.core.metrics.quality import evaluate_samples

    teacher = load_teacher()
    cal, cal_secs = teacher_calibration(teacher, recalibrate)
    sigmas = get_sigmas("karras", teacher.model_sampling, steps)
    settings = sweep(kind)

    def batch(n_per_class: int, s: int) -> tuple[torch.Tensor, torch.Tensor]:
        labels = balanced_labels(n_per_class)
        return labels, torch.randn(len(labels), 1, 16, 16, generator=torch.Generator().manual_seed(s))

    labels, noise = batch(per_class, seed)
    base_imgs, _, _ = _generate(teacher, None, labels, noise, sigmas, cfg)
    base_metrics = {k: float(v) for k, v in evaluate_samples(base_imgs, labels).items()}
    other_imgs, _, _ = _generate(teacher, None, labels, batch(per_class, seed + 1)[1], sigmas, cfg)
    fd_other_seed = float(evaluate_samples(other_imgs, labels)["fd"])
    log(f"no cache: FD {base_metrics['fd']:.3f} (other noise seed: {fd_other_seed:.3f}), "
        f"accuracy {base_metrics['accuracy']:.3f}")
    rows = []
    for family, label, make in settings:
        cache = make()
        imgs, _, _ = _generate(teacher, cache, labels, noise, sigmas, cfg)
        m = {k: float(v) for k, v in evaluate_samples(imgs, labels).items()}
        st = dict(cache.stats)
        row = {"family": family, "setting": label, "cache": cache.config(), "calls_computed": st["computed"],
               "calls_skipped": st["skipped"], "rmse_vs_baseline": float(((imgs - base_imgs) ** 2).mean().sqrt()),
               **m, "fd_increase": round(m["fd"] / base_metrics["fd"] - 1.0, 4)}
        if "blocks_run" in st:
            row["block_fraction_run"] = round(st["blocks_run"] / max(st["blocks_run"] + st["blocks_skipped"], 1), 3)
        rows.append(row)
        log(f"{label:28s} skipped {st['skipped']:2d}/{st['calls']}  FD {m['fd']:.3f}  acc {m['accuracy']:.3f}  "
            f"rmse {row['rmse_vs_baseline']:.4f}")
    t_labels, t_noise = batch(timing_per_class, seed + 2)

    def run(cache: ResidualCache | None) -> tuple[float, float]:
        return _generate(teacher, cache, t_labels, t_noise, sigmas, cfg)[1:]

    timing = paired_timing(run, [(lb, mk) for _, lb, mk in settings], repeats)
    for r in rows:
        t = timing[r["setting"]]
        r["wall_s"], r["cpu_s"] = round(t["wall_s"], 3), round(t["cpu_s"], 3)
        r["speedup_wall"], r["speedup_cpu"] = round(t["speedup_wall"], 3), round(t["speedup_cpu"], 3)
        r["timing_calls_skipped"] = t["stats"]["skipped"]  # the timing batch decides for itself
        r["meets_goal"] = bool(r["speedup_wall"] >= 2.0 and r["fd_increase"] <= 0.05)
        log(f"{r['setting']:28s} {r['speedup_wall']:.2f}x wall  {r['speedup_cpu']:.2f}x cpu  "
            f"(timing batch skipped {r['timing_calls_skipped']}/{steps})")
    base_w = [t["base_wall_s"] for t in timing.values()]
    base_c = [t["base_cpu_s"] for t in timing.values()]
    return {
        "model": "digits-dit-teacher", "sampler": "dpmpp_2m", "schedule": "karras", "steps": steps, "cfg": cfg,
        "samples": len(labels), "seed": seed,
        "baseline": {**base_metrics, "fd_other_noise_seed": fd_other_seed,
                     "timing_wall_s": [min(base_w), max(base_w)], "timing_cpu_s": [min(base_c), max(base_c)]},
        "timing": {"samples": len(t_labels), "repeats": repeats, "threads": torch.get_num_threads(),
                   "method": "each setting next to its own uncached run (ABBA order), geometric mean of the ratios"},
        "calibration": {"model": cal.model, "config_hash": cal.config_hash, "recipe": cal.recipe,
                        "made_now_seconds": round(cal_secs, 1)},
        "rows": rows,
        "pareto": pareto(rows),
        "pareto_paired_rmse": pareto(rows, "rmse_vs_baseline"),  # FD at this sample count is noisier
        "best_meeting_goal": max((r for r in rows if r["meets_goal"]), key=lambda r: r["speedup_wall"],
                                 default=None),
    }


def paired_timing(run: Callable[[ResidualCache | None], tuple[float, float]], settings: list[tuple[str, Factory]],
                  repeats: int) -> dict[str, dict[str, Any]]:
    """Time every setting next to its own uncached run (ABBA order over the repeats). ``run(cache)`` returns
    ``(wall, cpu)`` seconds. Returns per setting the geometric-mean wall and CPU speed-ups, the fastest times and
    the cache's stats."""
    pairs: dict[str, list[tuple[float, float, float, float]]] = {}
    stats: dict[str, dict] = {}
    for rep in range(repeats):
        for label, make in settings:
            times = {}
            for which in ("base", "cache") if rep % 2 == 0 else ("cache", "base"):
                cache = make() if which == "cache" else None
                times[which] = run(cache)
                if cache is not None:
                    stats[label] = dict(cache.stats)
            pairs.setdefault(label, []).append((*times["base"], *times["cache"]))
    return {label: {"speedup_wall": _geomean([q[0] / q[2] for q in p]),
                    "speedup_cpu": _geomean([q[1] / q[3] for q in p]),
                    "wall_s": min(q[2] for q in p), "cpu_s": min(q[3] for q in p),
                    "base_wall_s": min(q[0] for q in p), "base_cpu_s": min(q[1] for q in p), "stats": stats[label]}
            for label, p in pairs.items()}


def _geomean(xs: list[float]) -> float:
    return math.exp(sum(math.log(x) for x in xs) / len(xs))


def pareto(rows: list[dict], quality: str = "fd") -> list[str]:
    """Settings not dominated in (wall speed-up up, ``quality`` down)."""
    front = []
    for r in rows:
        if not any(o["speedup_wall"] >= r["speedup_wall"] and o[quality] <= r[quality] and
                   (o["speedup_wall"] > r["speedup_wall"] or o[quality] < r[quality]) for o in rows):
            front.append(r["setting"])
    return front


# ------------------------------------------------------------------------------------------------ large stacks
def _dit_xl(depth: int):
    from diffusers import DiTTransformer2DModel

    from fewstep.core.models.diffusers_adapters import diffusers_denoiser

    torch.manual_seed(0)
    m = DiTTransformer2DModel(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8,
                              num_layers=depth, sample_size=16, patch_size=2, num_embeds_ada_norm=1000)
    den = diffusers_denoiser(m.eval().requires_grad_(False))
    return CFGDenoiser(den, 4.0, null=1000), den, (1, 4, 16, 16), {"class_labels": torch.tensor([207])}


def _flux(single: int):
    from diffusers import FluxTransformer2DModel

    from fewstep.core.models.diffusers_adapters import diffusers_denoiser

    torch.manual_seed(0)
    m = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=1, num_single_layers=single,
                               attention_head_dim=128, num_attention_heads=24, joint_attention_dim=256,
                               pooled_projection_dim=256, guidance_embeds=True, axes_dims_rope=(16, 56, 56))
    den = diffusers_denoiser(m.eval().requires_grad_(False))
    g = torch.Generator().manual_seed(1)
    cond = {"encoder_hidden_states": torch.randn(1, 8, 256, generator=g),
            "pooled_projections": torch.randn(1, 256, generator=g), "guidance": 3.5}
    return den, den, (1, 16, 8, 8), cond


def _stack_caches() -> list[tuple[str, Factory]]:
    return [
        ("StepCache input, every 2nd step", lambda: StepCache(100.0, max_consecutive_skips=1)),
        ("FirstBlockCache, every 2nd step", lambda: FirstBlockCache(100.0, max_consecutive_skips=1)),
        ("Delta-DiT interval 2", lambda: DeltaDiTCache(interval=2)),
    ]


@torch.no_grad()
def stack_benchmark(name: str, build: Callable[[], tuple], steps: int, repeats: int = 2,
                    log: Callable[[str], None] = print) -> dict:
    t0 = time.perf_counter()
    model, den, shape, cond = build()
    build_s = time.perf_counter() - t0
    net = den.model
    n_blocks = len(getattr(net, "transformer_blocks", [])) + len(getattr(net, "single_transformer_blocks", []))
    params = sum(p.numel() for p in net.parameters())
    sig = get_sigmas("karras" if name.startswith("DiT") else "simple", den.model_sampling, steps)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    x = den.model_sampling.noise_scaling(sig[0], noise, torch.zeros_like(noise), max_denoise=True)

    def timed(cache: ResidualCache | None) -> tuple[float, float]:
        ctx = apply_cache(model, cache) if cache is not None else contextlib.nullcontext()
        with ctx:
            w, c = time.perf_counter(), time.process_time()
            sample_dpmpp_2m(model, x, sig, extra_args=dict(cond), disable=True)
            return time.perf_counter() - w, time.process_time() - c

    timed(None)  # warm-up
    timing = paired_timing(timed, _stack_caches(), repeats)
    rows = []
    for label, t in timing.items():
        st = t["stats"]
        ideal = st["calls"] / st["computed"] if "blocks_run" not in st else \
            (st["calls"] * n_blocks) / max(st["blocks_run"], 1)
        r = {"cache": label, "wall_s": round(t["wall_s"], 3), "cpu_s": round(t["cpu_s"], 3),
             "ideal_speedup": round(ideal, 3), "calls_skipped": st["skipped"], "calls": st["calls"],
             "speedup_wall": round(t["speedup_wall"], 3), "speedup_cpu": round(t["speedup_cpu"], 3)}
        rows.append(r)
        log(f"{name:42s} {r['cache']:38s} wall {r['speedup_wall']:.2f}x  cpu {r['speedup_cpu']:.2f}x  "
            f"(ideal {r['ideal_speedup']:.2f}x)")
    return {"model": name, "params_millions": round(params / 1e6, 1), "blocks": n_blocks, "steps": steps,
            "batch_rows": shape[0] * (2 if model is not den else 1), "tokens": (shape[2] // 2) * (shape[3] // 2),
            "build_seconds": round(build_s, 1), "repeats": repeats,
            "baseline_wall_s": round(min(t["base_wall_s"] for t in timing.values()), 3),
            "baseline_cpu_s": round(min(t["base_cpu_s"] for t in timing.values()), 3), "rows": rows}


# ------------------------------------------------------------------------------------------------ report
def plot(result: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = result["teacher"]
    rows = t["rows"]
    base_fd = t["baseline"]["fd"]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    families = sorted({r["family"] for r in rows})
    markers = "osD^v<>ph*"
    for i, fam in enumerate(families):
        rs = sorted((r for r in rows if r["family"] == fam), key=lambda r: r["speedup_wall"])
        kw = {"marker": markers[i % len(markers)], "label": fam}
        axes[0].plot([r["speedup_wall"] for r in rs], [r["fd"] for r in rs], "-", **kw)
        axes[1].plot([r["speedup_wall"] for r in rs], [r["rmse_vs_baseline"] for r in rs], "-", **kw)
        axes[2].plot([r["speedup_wall"] for r in rs], [r["accuracy"] for r in rs], "-", **kw)
    front = sorted((r for r in rows if r["setting"] in t["pareto"]), key=lambda r: r["speedup_wall"])
    axes[0].plot([1.0] + [r["speedup_wall"] for r in front], [base_fd] + [r["fd"] for r in front], "k:", lw=1,
                 label="Pareto front")
    axes[0].plot([1.0], [base_fd], "k*", ms=12, label="no cache")
    axes[0].axhline(base_fd * 1.05, color="r", ls="--", lw=1, label="+5% FD")
    axes[0].axvline(2.0, color="g", ls="--", lw=1, label="2x")
    axes[2].axhline(t["baseline"]["accuracy"], color="k", ls=":", lw=1, label="no cache")
    axes[0].set(xlabel="wall-time speed-up vs no cache (same run)", ylabel="FD (lower is better)",
                title=f"embedded teacher, {t['steps']}-step dpmpp_2m, CFG {t['cfg']:g}, {t['samples']} samples")
    axes[1].set(xlabel="wall-time speed-up", ylabel="RMS distance to uncached samples", yscale="log",
                title="paired error (same noise)")
    axes[2].set(xlabel="wall-time speed-up", ylabel="class accuracy", title="class accuracy")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    with io.atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=90)
    plt.close(fig)


def markdown(result: dict) -> str:
    t = result["teacher"]
    b = t["baseline"]
    lines = ["| setting | skipped calls | block frac. run | wall speed-up | CPU speed-up | FD | FD change | accuracy | "
             "RMS vs uncached |", "|---|---|---|---|---|---|---|---|---|",
             f"| no cache | 0/{t['steps']} | 1 | 1.00x | 1.00x | {b['fd']:.3f} | - | {b['accuracy']:.3f} | 0 |"]
    for r in t["rows"]:
        lines.append(f"| {r['setting']} | {r['calls_skipped']}/{t['steps']} | {r.get('block_fraction_run', '-')} | "
                     f"{r['speedup_wall']:.2f}x | {r['speedup_cpu']:.2f}x | {r['fd']:.3f} | "
                     f"{100 * r['fd_increase']:+.1f}% | {r['accuracy']:.3f} | {r['rmse_vs_baseline']:.4f} |")
    lines += ["", f"FD of the uncached teacher from another noise seed: {b['fd_other_noise_seed']:.3f} "
              f"({100 * (b['fd_other_noise_seed'] / b['fd'] - 1):+.1f}%): FD changes smaller than this are noise."]
    for s in result.get("stacks", []):
        lines += ["", f"**{s['model']}** ({s['params_millions']}M params, {s['blocks']} blocks, {s['steps']} steps)",
                  "", "| cache | wall speed-up | CPU speed-up | ideal |", "|---|---|---|---|"]
        lines += [f"| {r['cache']} | {r['speedup_wall']:.2f}x | {r['speedup_cpu']:.2f}x | {r['ideal_speedup']:.2f}x |"
                  for r in s["rows"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--per-class", type=positive_int, default=6, help="samples per digit class for quality (default 6)")
    p.add_argument("--timing-per-class", type=positive_int, default=1,
                   help="samples per digit class for timing (default 1)")
    p.add_argument("--repeats", type=positive_int, default=2, help="timing repeats (default 2: AB then BA)")
    p.add_argument("--steps", type=positive_int, default=50)
    p.add_argument("--cfg", type=finite_float, default=2.0)
    p.add_argument("--threads", type=positive_int, default=1,
                   help="torch threads (default 1: steadier ratios on shared CPUs)")
    sw = p.add_mutually_exclusive_group()
    sw.add_argument("--quick", action="store_true", help="4 cached settings, no large stacks")
    sw.add_argument("--full", action="store_true", help="a longer sweep")
    p.add_argument("--no-stacks", action="store_true", help="skip the large random-weight block stacks")
    p.add_argument("--recalibrate", action="store_true", help="refit and overwrite the shipped teacher calibration")
    p.add_argument("--out", default=None, help=f"output folder (default {RESULTS})")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    kind = "quick" if a.quick else "full" if a.full else "default"
    result: dict[str, Any] = {"benchmark": "caching", "machine": machine(), "device": "cpu"}
    result["teacher"] = teacher_benchmark(a.per_class, a.steps, a.cfg, kind, timing_per_class=a.timing_per_class,
                                          repeats=a.repeats, recalibrate=a.recalibrate)
    if not (a.quick or a.no_stacks):
        result["stacks"] = [
            stack_benchmark("DiT-XL width (1152), 4 blocks, CFG", lambda: _dit_xl(4), steps=6, repeats=a.repeats),
            stack_benchmark("Flux width (3072), 1 double + 2 single blocks", lambda: _flux(2), steps=6,
                            repeats=a.repeats),
        ]
    result["seconds"] = round(time.perf_counter() - t0, 1)
    path = write_json(result, "caching.json", a.out)
    plot(result, path.with_name("caching_pareto.png"))
    print(markdown(result))
    print(f"\nwrote {path} and {path.with_name('caching_pareto.png')} in {result['seconds']:.0f}s")
    return result


if __name__ == "__main__":
    main()
