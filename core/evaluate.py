"""Run sampling settings on a class-conditional denoiser and measure them in one run.

Shared by ``fewstep demo``, ``benchmarks/quality.py`` and the Lightning evaluation callback: generate every
class with each setting (sampler, steps or explicit sigmas, CFG scale, optionally another denoiser such as a
student), time it, and score the samples on the embedded benchmark (FD, class accuracy, precision, recall).
Speed-ups are wall-time ratios against the first (baseline) setting measured in the same process, robust to a busy
machine: every setting is timed ``timing_repeats`` times on the same batch, interleaved round by round (baseline,
setting 1, ..., baseline, setting 1, ...), and the ratio of medians is reported next to the NFE ratio; when the
baseline's own repeats spread by more than ``NOISY_SPREAD`` the rows say the timing was noisy.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .guidance.cfg import CFGDenoiser
from .io import atomic_path, write_text
from .models.digits import NULL_CLASS, NUM_CLASSES
from .sampling.samplers import get_sampler
from .sampling.schedules import get_sigmas


@dataclass
class Setting:
    """One way to sample: ``sampler`` over ``steps`` of ``schedule`` (or explicit ``sigmas``) at CFG ``cfg``.

    ``denoiser`` overrides the default model (e.g. a distilled student); ``options`` go to the sampler.
    """

    name: str
    sampler: str
    steps: int = 0
    schedule: str = "karras"
    cfg: float = 1.0
    sigmas: Tensor | None = None
    denoiser: nn.Module | None = None
    options: dict[str, Any] = field(default_factory=dict)
    group: str | None = None

    @property
    def label(self) -> str:
        """The chart label: ``group`` (a line over step counts), else the setting's own name."""
        return self.group or self.name

    def resolve_sigmas(self, model_sampling) -> Tensor:
        if self.sigmas is not None:
            return torch.as_tensor(self.sigmas, dtype=torch.float32)
        return get_sigmas(self.schedule, model_sampling, self.steps)


class CountingDenoiser(nn.Module):
    """Counts network evaluations per sample (a CFG pass of 2B samples counts as two)."""

    def __init__(self, denoiser: nn.Module):
        super().__init__()
        self.denoiser = denoiser
        self.model_sampling = denoiser.model_sampling
        self.sample_evals = 0

    def forward(self, x: Tensor, sigma: Tensor, **cond: Any) -> Tensor:
        self.sample_evals += x.shape[0]
        return self.denoiser(x, sigma, **cond)


def balanced_labels(per_class: int, num_classes: int = NUM_CLASSES) -> Tensor:
    return torch.arange(num_classes).repeat_interleave(per_class)


@torch.no_grad()
def generate(denoiser: nn.Module, setting: Setting, labels: Tensor, seed: int = 0, batch_size: int = 250,
             counter: CountingDenoiser | None = None, device: str | torch.device | None = None) -> Tensor:
    """Samples in [-1, 1] for ``labels`` with ``setting`` (seeded: the same seed gives the same noise, drawn on the
    CPU and moved to ``device``, where the denoisers must already be)."""
    den = setting.denoiser or denoiser
    ms = den.model_sampling
    counted = counter or CountingDenoiser(den)
    model = CFGDenoiser(counted, setting.cfg, cond_key="class_labels", null=NULL_CLASS) if setting.cfg != 1.0 \
        else counted
    sigmas = setting.resolve_sigmas(ms)
    sampler = get_sampler(setting.sampler)
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn((len(labels), 1, 16, 16), generator=g)
    if device is not None:
        noise, labels = noise.to(device), labels.to(device)
    out = []
    for i in range(0, len(labels), batch_size):
        n = noise[i: i + batch_size]
        x = ms.noise_scaling(sigmas[0], n, torch.zeros_like(n), max_denoise=True)
        y = labels[i: i + batch_size]
        extra = {"class_labels": y, "seed": seed + i}
        out.append(sampler(model, x, sigmas, extra_args=extra, disable=True, **setting.options))
    return torch.cat(out).clamp(-1, 1)


#: relative spread ``(max - min) / median`` of the baseline's repeated timings above which the timing is called noisy
NOISY_SPREAD = 0.15


def spread(times: list[float]) -> float:
    """``(max - min) / median`` of repeated timings."""
    med = statistics.median(times)
    return (max(times) - min(times)) / med if med > 0 else 0.0


def time_settings(denoiser: nn.Module, settings: list[Setting], labels: Tensor, repeats: int = 3, seed: int = 0,
                  batch_size: int = 250, device: str | torch.device | None = None) -> list[list[float]]:
    """Wall seconds of every setting on ``labels``, ``repeats`` times, interleaved: each round times every setting
    once (alternating the order between rounds), so a load change on the machine hits all settings alike. On CUDA
    each timing ends with a synchronize."""
    cuda = device is not None and torch.device(device).type == "cuda"
    times: list[list[float]] = [[] for _ in settings]
    for r in range(repeats):
        order = list(range(len(settings)))
        if r % 2:
            order.reverse()
        for k in order:
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            generate(denoiser, settings[k], labels, seed=seed, batch_size=batch_size, device=device)
            if cuda:
                torch.cuda.synchronize()
            times[k].append(time.perf_counter() - t0)
    return times


def run_settings(denoiser: nn.Module, settings: list[Setting], per_class: int = 20, seed: int = 0,
                 batch_size: int = 250, progress: bool = True, timing_repeats: int = 3,
                 timing_per_class: int = 5) -> tuple[list[dict[str, Any]], dict[str, Tensor]]:
    """Generate and score every setting; time them (``time_settings``: ``timing_repeats`` interleaved rounds on
    ``timing_per_class`` samples of every class). Returns table rows and the generated images by setting name.

    Each row has ``speedup`` (median baseline seconds / median seconds, the first setting is the baseline),
    ``nfe_ratio`` (baseline NFE / NFE: the speed-up a machine with no overhead would show), the repeats'
    ``seconds_repeats`` and ``spread``, and ``timing_noisy`` (the baseline's repeats spread by more than
    ``NOISY_SPREAD``: treat the speed-ups as rough)."""
    if timing_repeats < 1:
        raise ValueError(f"timing_repeats must be >= 1 (the baseline is timed that many times), got {timing_repeats}")
    from .metrics.quality import evaluate_samples

    labels = balanced_labels(per_class)
    rows: list[dict[str, Any]] = []
    images: dict[str, Tensor] = {}
    bar = tqdm(settings, desc="settings", disable=not progress)
    for st in bar:
        bar.set_postfix_str(st.name)
        counter = CountingDenoiser(st.denoiser or denoiser)
        imgs = generate(denoiser, st, labels, seed=seed, batch_size=batch_size, counter=counter)
        metrics = evaluate_samples(imgs, labels)
        sigmas = st.resolve_sigmas((st.denoiser or denoiser).model_sampling)
        rows.append({
            "setting": st.name, "group": st.label, "sampler": st.sampler, "steps": len(sigmas) - 1, "cfg": st.cfg,
            "nfe": round(counter.sample_evals / len(labels), 2), **{k: float(v) for k, v in metrics.items()},
        })
        images[st.name] = imgs
    times = time_settings(denoiser, settings, balanced_labels(min(timing_per_class, per_class)),
                          repeats=timing_repeats, seed=seed, batch_size=batch_size)
    base, base_nfe = statistics.median(times[0]), rows[0]["nfe"]
    noisy = timing_repeats > 1 and spread(times[0]) > NOISY_SPREAD
    for row, ts in zip(rows, times):
        med = statistics.median(ts)
        row.update(seconds=round(med, 4), seconds_repeats=[round(t, 4) for t in ts], spread=round(spread(ts), 3),
                   speedup=round(base / med, 3), nfe_ratio=round(base_nfe / row["nfe"], 3), timing_noisy=noisy)
    return rows, images


def timing_note(rows: list[dict[str, Any]]) -> str:
    """One line on how the speed-ups were measured, and a warning when the timing was noisy."""
    if not rows:
        return ""
    r0 = rows[0]
    n = len(r0.get("seconds_repeats", []))
    note = (f"Speed-up: median wall time of {n} interleaved runs of the baseline ({r0['setting']}) over the "
            f"setting's; NFE ratio: the baseline's network evaluations over the setting's.")
    if r0.get("timing_noisy"):
        note += (f" Timing was noisy: the baseline's runs spread by {r0['spread']:.0%} (> {NOISY_SPREAD:.0%}); the "
                 "machine was busy, trust the NFE ratio more than the wall ratio.")
    return note


def markdown_table(rows: list[dict[str, Any]]) -> str:
    head = ("| setting | NFE | speed-up | NFE ratio | FD | accuracy | precision | recall |\n"
            "|---|---|---|---|---|---|---|---|\n")
    body = "".join(
        f"| {r['setting']} | {r['nfe']:g} | {r['speedup']:.2f}x | {r.get('nfe_ratio', float('nan')):.2f}x | "
        f"{r['fd']:.2f} | {r['accuracy']:.3f} | {r['precision']:.3f} | {r['recall']:.3f} |\n" for r in rows)
    return head + body


def write_report(rows: list[dict[str, Any]], images: dict[str, Tensor], out_dir: str | Path,
                 extra: dict[str, Any] | None = None, per_row: int = 10) -> Path:
    """Write ``report.md``, ``report.json``, one PNG grid per setting and ``quality_vs_nfe.png``."""
    from .models.grid import to_uint8_grid

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, imgs in images.items():
        per_class = len(imgs) // NUM_CLASSES
        k = min(per_row, per_class)
        pick = torch.cat([imgs[c * per_class: c * per_class + k] for c in range(NUM_CLASSES)])
        with atomic_path(out / f"grid_{_slug(name)}.png") as tmp:
            to_uint8_grid(pick, nrow=k).save(tmp)
    write_text(out / "report.json", json.dumps({"rows": rows, **(extra or {})}, indent=2))
    md = "# fewstep demo report\n\n" + markdown_table(rows) + "\n" + timing_note(rows) + "\n"
    if extra and extra.get("floors"):
        f = extra["floors"]
        md += f"\nFD floor (train vs held-out digits): {f['fd_floor']:.2f}; FD ceiling (noise): {f['fd_ceiling']:.2f}\n"
    md += "\n" + "".join(f"![{r['setting']}](grid_{_slug(r['setting'])}.png)\n" for r in rows)
    write_text(out / "report.md", md)
    plot_quality(rows, out / "quality_vs_nfe.png", floors=(extra or {}).get("floors"))
    return out


def plot_quality(rows: list[dict[str, Any]], path: Path, floors: dict | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(r.get("group") or r["setting"], []).append(r)
    for label, rs in groups.items():
        rs = sorted(rs, key=lambda r: r["nfe"])
        axes[0].plot([r["nfe"] for r in rs], [r["fd"] for r in rs], "o-", label=label)
        axes[1].plot([r["nfe"] for r in rs], [r["accuracy"] for r in rs], "o-", label=label)
        axes[2].plot([r["speedup"] for r in rs], [r["fd"] for r in rs], "o", label=label)
    if floors:
        for ax in (axes[0], axes[2]):
            ax.axhline(floors["fd_floor"], color="k", ls=":", label="FD floor (real vs real)")
    axes[0].set(xscale="log", xlabel="NFE (network evaluations per sample)", ylabel="FD (lower is better)",
                yscale="log", title="quality vs NFE")
    axes[1].set(xscale="log", xlabel="NFE", ylabel="class accuracy", title="class accuracy vs NFE")
    axes[2].set(xscale="log", xlabel="wall-time speed-up vs baseline (same run)", ylabel="FD", yscale="log",
                title="quality vs speed-up")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.tight_layout()
    fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=7, title="setting")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=90, bbox_inches="tight")
    plt.close(fig)


def _slug(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in name)


def search_embedded_schedules(denoiser: nn.Module, nfes: list[int], sampler: str = "dpmpp_2m", cfg: float = 1.25,
                              per_class: int = 4, seed: int = 1234, grid_size: int = 28) -> list[dict[str, Any]]:
    """Search step schedules (``core.sampling.search_schedule``) for a class-conditional digits denoiser under
    CFG, on a batch of every class from a seed disjoint from the evaluation seeds."""
    from .sampling.search import search_schedule

    ms = denoiser.model_sampling
    model = CFGDenoiser(denoiser, cfg, cond_key="class_labels", null=NULL_CLASS) if cfg != 1.0 else denoiser
    labels = balanced_labels(per_class)
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn((len(labels), 1, 16, 16), generator=g)
    x = ms.noise_scaling(torch.tensor(ms.sigma_max), noise, torch.zeros_like(noise), max_denoise=True)
    out = []
    for nfe in nfes:
        t0 = time.perf_counter()
        sig, info = search_schedule(model, x, nfe, sampler=sampler, grid_size=grid_size,
                                    extra_args={"class_labels": labels}, return_info=True, substeps=4)
        out.append({"sampler": sampler, "nfe": nfe, "cfg": cfg, "sigmas": [float(s) for s in sig],
                    "search_error": info["error"], "dp_error": info["dp_error"],
                    "search_seconds": round(time.perf_counter() - t0, 1)})
    return out
