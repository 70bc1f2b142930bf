"""fewstep inside a real ComfyUI, on the embedded MODEL, in one process and one run (``fewstep bench comfyui``).

Everything is sampled the way a ComfyUI graph samples: the embedded loader / class-condition / empty-latent nodes,
``CFGGuider`` and ``SamplerCustomAdvanced`` from ``comfy_extras.nodes_custom_sampler``, sampler nodes
(``KSamplerSelect`` for ComfyUI's own samplers, fewstep's sampler nodes), sigma nodes (``BasicScheduler``,
``FewstepTimestepSchedule``) and model-patch nodes (ComfyUI's ``EasyCache``, fewstep's cache nodes).

1. ``samplers``: ComfyUI's own samplers on the teacher (CFG 1.25, the teacher's best FD; each step evaluates cond and
   uncond, 2 NFE) against fewstep's distilled samplers on the shipped students (guidance distilled in: cfg 1, one
   pass per step) and ComfyUI's ``lcm`` on the consistency student, at equal NFE (network evaluations per sample,
   counted by an ``APPLY_MODEL`` wrapper), plus the 50-step baseline.
2. ``caches``: on the teacher's 50-step DPM-Solver++(2M) run, ComfyUI's ``EasyCache`` node (its default window
   15%-95% of the run, and the full run 0%-100%) against fewstep's step cache and block cache nodes (TeaCache with
   and without TaylorSeer, EasyCache indicator, First-Block) over threshold sweeps. Fidelity as in the caching
   benchmarks (``caching_protocol.fidelity``): per-sample PSNR to the *uncached* 50-step sample from the same noise
   (the baseline run of this process). ``matched_nfe``: per target NFE, each family's setting of the highest PSNR
   among those that cost at most the target ("matched cost"); ``matched``: every EasyCache point next to the
   fewstep point of the nearest wall-time speed-up.

Per setting: FD / class accuracy / precision / recall of ``per_class x 10`` samples against the train digits (FD
floor train-vs-held-out 0.151), and the wall-time speed-up against the 50-step baseline measured in the same run
(the baseline is timed before and after the settings; the mean is used and both are in the JSON). Single-threaded
by default: on a shared CPU one thread gives far steadier ratios.

Needs a ComfyUI tree: ``$FEWSTEP_COMFYUI_ROOT``, else the test fixture of the version ``--comfyui-version`` (or
``$FEWSTEP_COMFYUI_VERSION``; 0.3.75 from PyPI or 0.33.0 from the project's archive, installed into ``.comfyui/``
by ``tests/comfyui_env.py``). Writes ``benchmarks/results/comfyui.json`` and ``comfyui.png`` (with
``--comfyui-version V``: ``comfyui-V.json`` / ``comfyui-V.png``); the JSON records the ComfyUI version it ran on.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fewstep.core.metrics.quality import evaluate_samples
from fewstep.core.models.digits import NUM_CLASSES
from fewstep.core.models.embedded import TEACHER_CFG

from ..core import io
from ..core.checks import nonneg_int, positive_int
from .caching_protocol import fidelity
from .common import RESULTS, machine, write_json

REPO = Path(__file__).resolve().parent.parent
BASELINE = "comfyui dpmpp_2m karras 50 steps (teacher)"


def comfy_modules() -> Any:
    """Import ComfyUI (``$FEWSTEP_COMFYUI_ROOT`` or the test fixture tree) and fewstep's nodes; a namespace."""
    spec = importlib.util.spec_from_file_location("comfyui_env", REPO / "tests" / "comfyui_env.py")
    env = sys.modules.get("comfyui_env")
    if env is None:
        env = importlib.util.module_from_spec(spec)
        sys.modules["comfyui_env"] = env
        spec.loader.exec_module(env)
    env.import_comfy(env.ensure_comfyui())
    import comfy.patcher_extension as px
    import comfy_extras.nodes_custom_sampler as cs
    import comfy_extras.nodes_easycache as easycache

    from fewstep.nodes import embedded, samplers, schedules

    try:
        from fewstep.nodes import caches
    except ImportError:  # the cache node family is optional for part 1
        caches = None
    return type("Comfy", (), dict(cs=cs, px=px, easycache=easycache, E=embedded, S=samplers, Sch=schedules,
                                  C=caches))


@dataclass
class Run:
    """One benchmark setting: a MODEL (after patches), a SAMPLER, SIGMAS and the CFG of its guider."""

    name: str
    group: str
    model: Any
    sampler: Any
    sigmas: Tensor
    cfg: float
    info: dict[str, Any] = field(default_factory=dict)



def counted(cm: Any, model: Any, calls: list[int]) -> Any:
    """A clone of ``model`` whose ``APPLY_MODEL`` wrapper appends every call's batch size to ``calls``."""

    def wrapper(executor: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        calls.append(int(args[0].shape[0]))
        return executor(*args, **kwargs)

    m = model.clone()
    m.add_wrapper_with_key(cm.px.WrappersMP.APPLY_MODEL, "fewstep-bench-count", wrapper)
    return m


def generate(cm: Any, run: Run, per_class: int, seed: int) -> tuple[Tensor, Tensor, float, float, float]:
    """``(images, labels, seconds, model calls per sample, NFE per sample)``: ``per_class`` samples of every digit,
    one prompt per digit. NFE counts the transformer blocks that actually ran (forward hooks on the DiT's blocks),
    in units of whole networks: a cache that skips a call or some blocks lowers it, the model-call count does not."""
    calls: list[int] = []
    model = counted(cm, run.model, calls)
    blocks = list(run.model.model.diffusion_model.dit.transformer_blocks)
    ran: list[int] = []
    hooks = [b.register_forward_pre_hook(lambda _m, args: ran.append(int(args[0].shape[0]))) for b in blocks]
    images, labels = [], []
    t0 = time.perf_counter()
    for digit in range(NUM_CLASSES):
        pos, neg = cm.E.FewstepDigitsClassCondition.execute(digit)
        latent = cm.E.FewstepDigitsEmptyLatent.execute(per_class)[0]
        guider = cm.cs.CFGGuider.execute(model, pos, neg, run.cfg)[0]
        noise = cm.cs.RandomNoise.execute(seed + digit)[0]
        out = cm.cs.SamplerCustomAdvanced.execute(noise, guider, run.sampler, run.sigmas, latent)[0]["samples"]
        images.append(out.float().clamp(-1, 1))
        labels.append(torch.full((per_class,), digit))
    seconds = time.perf_counter() - t0
    for h in hooks:
        h.remove()
    n = per_class * NUM_CLASSES
    return torch.cat(images), torch.cat(labels), seconds, sum(calls) / n, sum(ran) / (len(blocks) * n)


def comfy_sampler(cm: Any, name: str) -> Any:
    return cm.cs.KSamplerSelect.execute(name)[0]


def karras(cm: Any, model: Any, steps: int) -> Tensor:
    return cm.cs.BasicScheduler.execute(model, "karras", steps, 1.0)[0]


def timesteps(cm: Any, model: Any, values: str) -> Tensor:
    return cm.Sch.FewstepTimestepSchedule.execute(model, values, "timestep")[0]


def load(cm: Any, name: str) -> Any:
    return cm.E.FewstepDigitsModelLoader.execute(name)[0]


def baseline_run(cm: Any, teacher: Any) -> Run:
    return Run(BASELINE, "baseline", teacher, comfy_sampler(cm, "dpmpp_2m"), karras(cm, teacher, 50), TEACHER_CFG)


def sampler_runs(cm: Any, teacher: Any) -> list[Run]:
    """ComfyUI's samplers on the teacher vs fewstep's distilled samplers on the shipped students, by NFE."""
    runs = []
    for steps in (4, 2, 1):  # CFG: 2 NFE per step
        for s in ("euler", "dpmpp_2m", "uni_pc"):
            if steps == 1 and s != "euler":
                continue  # one step: every one of them is Euler
            runs.append(Run(f"comfyui {s} karras {steps} steps cfg {TEACHER_CFG:g} (teacher)", f"NFE {2 * steps}",
                            teacher, comfy_sampler(cm, s), karras(cm, teacher, steps), TEACHER_CFG))
    runs.append(Run("comfyui euler 1 step cfg 1 (teacher)", "NFE 1", teacher, comfy_sampler(cm, "euler"),
                    karras(cm, teacher, 1), 1.0))
    cons4, cons2 = load(cm, "digits_consistency_4step"), load(cm, "digits_consistency_2step")
    dmd, reflow = load(cm, "digits_dmd2_1step"), load(cm, "digits_reflow_1step")
    flow_map, onestep = cm.S.FewstepSamplerFlowMap.execute()[0], cm.S.FewstepSamplerOneStep.execute()[0]
    four, two = "999,749.25,499.5,249.75", "999,499.5"
    runs += [
        Run("fewstep flow_map, consistency student 4 steps", "NFE 4", cons4, flow_map, timesteps(cm, cons4, four), 1.0),
        Run("comfyui lcm, consistency student 4 steps", "NFE 4", cons4, comfy_sampler(cm, "lcm"),
            timesteps(cm, cons4, four), 1.0),
        Run("fewstep lcm, consistency student 4 steps", "NFE 4", cons4, cm.S.FewstepSamplerLCM.execute()[0],
            timesteps(cm, cons4, four), 1.0),
        Run("fewstep flow_map, consistency student 2 steps", "NFE 2", cons2, flow_map, timesteps(cm, cons2, two), 1.0),
        Run("fewstep onestep, dmd2 student", "NFE 1", dmd, onestep, timesteps(cm, dmd, "999"), 1.0),
        Run("fewstep onestep, reflow student", "NFE 1", reflow, onestep, timesteps(cm, reflow, "999"), 1.0),
    ]
    return runs


#: thresholds swept per cache (ComfyUI's EasyCache default is 0.2; its node allows up to 3)
EASYCACHE_THRESHOLDS = (0.1, 0.2, 0.4, 1.5)
#: ComfyUI's EasyCache over the whole run (its default window 15%-95% keeps it above ~54 of 100 NFE)
EASYCACHE_FULL = "comfyui EasyCache, window 0-100%"
EASYCACHE_FULL_THRESHOLDS = (0.2, 0.4, 0.8, 1.5)
#: matched-cost targets, NFE per sample of the 100-NFE run (50 steps x cond + uncond)
NFE_TARGETS = (75, 60, 50, 40, 30, 20)


def comfyui_cache_patches(cm: Any) -> dict[str, Callable[[Any, float], Any]]:
    """ComfyUI's own ``EasyCache`` node as ``(model, threshold) -> patched model``: default window and whole run."""
    node = cm.easycache.EasyCacheNode.execute
    return {"comfyui EasyCache": lambda m, th: node(m, th, 0.15, 0.95, False)[0],
            EASYCACHE_FULL: lambda m, th: node(m, th, 0.0, 1.0, False)[0]}


def cache_runs(cm: Any, teacher: Any, patches: dict[str, Callable[[Any, float], Any]] | None = None,
               thresholds: dict[str, tuple[float, ...]] | None = None, calibration_dir: Path | None = None,
               only: list[str] | None = None) -> list[Run]:
    """The 50-step teacher run with ComfyUI's EasyCache and with every fewstep cache in ``patches``; ``only``: keep
    the families whose name contains one of these strings."""
    sampler, sigmas = comfy_sampler(cm, "dpmpp_2m"), karras(cm, teacher, 50)
    patches = {**comfyui_cache_patches(cm),
               **(fewstep_cache_patches(cm, calibration_dir) if patches is None else patches)}
    if only:
        patches = {k: v for k, v in patches.items() if any(o in k for o in only)}
        if not patches:
            raise ValueError(f"--caches {only}: no cache family matches; families: "
                             f"{list(comfyui_cache_patches(cm)) + list(FEWSTEP_THRESHOLDS)}")
    sweeps = {"comfyui EasyCache": EASYCACHE_THRESHOLDS, EASYCACHE_FULL: EASYCACHE_FULL_THRESHOLDS,
              **FEWSTEP_THRESHOLDS, **(thresholds or {})}
    return [Run(f"{family} {th:g}", family, patch(teacher, th), sampler, sigmas, TEACHER_CFG, {"threshold": th})
            for family, patch in patches.items() for th in sweeps[family]]


#: fewstep cache families and their threshold sweeps (EasyCache is the same indicator as ComfyUI's node)
FEWSTEP_THRESHOLDS: dict[str, tuple[float, ...]] = {
    "fewstep step cache easycache": (0.1, 0.2),
    "fewstep step cache teacache": (0.1, 0.2, 0.3),
    "fewstep step cache teacache + taylor1": (0.05, 0.1, 0.2, 0.3),
    "fewstep block cache first_block": (0.1, 0.2),
}


def fewstep_cache_patches(cm: Any, calibration_dir: Path | None = None) -> dict[str, Callable[[Any, float], Any]]:
    """fewstep's cache nodes as ``(model, threshold) -> patched model`` (node defaults otherwise). TeaCache needs a
    calibration: ``FewstepCacheCalibrate``'s code runs first on the teacher (2 runs of 50 dpmpp_2m steps on one
    digit) into ``calibration_dir`` (registered as the first calibration folder) and its file name is passed
    explicitly. Empty without the cache node family."""
    if cm.C is None:
        return {}
    step, block = cm.C.FewstepStepCache.execute, cm.C.FewstepBlockCache.execute

    def calibration(model: Any) -> str:
        pos, neg = cm.E.FewstepDigitsClassCondition.execute(3)
        latent = cm.E.FewstepDigitsEmptyLatent.execute(8)[0]
        if calibration_dir is not None:  # the nodes read calibrations only from their folders: register it, first
            import folder_paths

            folder_paths.add_model_folder_path(cm.C.CALIBRATION_FOLDER, str(calibration_dir), is_default=True)
        path, _ = cm.C.calibrate_model(model, pos, neg, latent, sampler_name="dpmpp_2m", scheduler="karras",
                                       steps=50, cfg=TEACHER_CFG, seed=0, runs=2, directory=calibration_dir)
        return path.name

    cal: dict[str, str] = {}

    def teacache(forecast: str) -> Callable[[Any, float], Any]:
        def patch(model: Any, th: float) -> Any:
            if "path" not in cal:
                cal["path"] = calibration(model)
            return step(model, "teacache", th, forecast, 0.0, 1.0, 0, cal["path"])[0]
        return patch

    return {
        "fewstep step cache easycache": lambda m, th: step(m, "easycache", th, "none", 0.0, 1.0, 0, "auto")[0],
        "fewstep step cache teacache": teacache("none"),
        "fewstep step cache teacache + taylor1": teacache("taylor1"),
        "fewstep block cache first_block": lambda m, th: block(m, "first_block", th, 1, 2, 0, 0.5, "none", 0.0, 1.0,
                                                               0, "auto")[0],
    }


def evaluate(cm: Any, runs: list[Run], per_class: int, seed: int, log: Callable[[str], None] = print
             ) -> tuple[list[dict[str, Any]], dict[str, Tensor]]:
    """Sample every run, then the baseline again; rows with quality metrics and speed-ups against the baseline."""
    rows, images = [], {}
    base_seconds = []
    for run in runs:
        imgs, labels, seconds, model_calls, nfe = generate(cm, run, per_class, seed)
        if run.group == "baseline":
            base_seconds.append(seconds)
        metrics = evaluate_samples(imgs, labels)
        row = {"setting": run.name, "group": run.group, "nfe": nfe, "model_calls": model_calls, "seconds": seconds,
               "cfg": run.cfg, **run.info,
               **{k: metrics[k] for k in ("fd", "accuracy", "precision", "recall")}}
        rows.append(row)
        images[run.name] = imgs
        log(f"{run.name}: NFE {nfe:.2f}, {seconds:.1f} s, FD {metrics['fd']:.3f}, acc {metrics['accuracy']:.3f}")
    base = sum(base_seconds) / len(base_seconds)
    for row in rows:
        row["speedup"] = base / row["seconds"]
    add_fidelity(rows, images)
    return rows, images


def add_fidelity(rows: list[dict[str, Any]], images: dict[str, Tensor]) -> None:
    """PSNR / RMS to the uncached 50-step sample from the same noise (the first baseline row) on every row that
    samples the teacher's 50-step run: the cache rows (they carry a threshold) and the repeated baseline (PSNR
    ``caching_protocol.PSNR_CAP`` when it reproduces the first). FD change against that baseline too."""
    ref_row = next((r for r in rows if r["group"] == "baseline"), None)
    if ref_row is None:
        return
    ref = images[ref_row["setting"]]
    for row in rows:
        if row is ref_row or not ("threshold" in row or row["group"] == "baseline"):
            continue
        row.update(fidelity(images[row["setting"]], ref))
        row["fd_change"] = row["fd"] / ref_row["fd"] - 1.0


def cache_families(rows: list[dict[str, Any]]) -> list[str]:
    """The cache families of ``rows`` in order of appearance (rows that carry a threshold)."""
    return list(dict.fromkeys(r["group"] for r in rows if "threshold" in r))


def matched_nfe(rows: list[dict[str, Any]], targets: tuple[int, ...] = NFE_TARGETS, slack: float = 0.02
                ) -> list[dict[str, Any]]:
    """Per target NFE: every cache family's setting of the highest PSNR to the uncached output among those that cost
    at most ``target * (1 + slack)`` (matched cost), or, where none is that cheap, the family's lowest NFE; and the
    best family (``best``) with whether it is a fewstep cache (``fewstep_best``)."""
    out = []
    for target in targets:
        entry: dict[str, Any] = {"target_nfe": target, "families": {}}
        for fam in cache_families(rows):
            cands = [r for r in rows if r["group"] == fam]
            ok = [r for r in cands if r["nfe"] <= target * (1 + slack)]
            if ok:
                r = max(ok, key=lambda r: r["psnr_db"])
                entry["families"][fam] = {k: r.get(k) for k in ("setting", "threshold", "nfe", "psnr_db", "rms", "fd",
                                                                "fd_change", "speedup")}
            else:
                entry["families"][fam] = {"setting": None, "min_nfe": min(r["nfe"] for r in cands)}
        reached = {f: v for f, v in entry["families"].items() if v["setting"] is not None}
        if reached:
            best = max(reached, key=lambda f: reached[f]["psnr_db"])
            entry["best"] = best
            entry["fewstep_best"] = best.startswith("fewstep")
        out.append(entry)
    return out


def matched(rows: list[dict[str, Any]], reference: str = "comfyui EasyCache") -> list[dict[str, Any]]:
    """Every ``reference`` cache point next to each other cache family's point of the nearest speed-up."""
    families = sorted({r["group"] for r in rows if r["group"] not in (reference, "baseline")})
    out = []
    for ref in (r for r in rows if r["group"] == reference):
        pair = {"speedup": ref["speedup"], reference: ref}
        for fam in families:
            cands = [r for r in rows if r["group"] == fam]
            if cands:
                pair[fam] = min(cands, key=lambda r: abs(math.log(r["speedup"] / ref["speedup"])))
        out.append(pair)
    return out


def table(rows: list[dict[str, Any]]) -> str:
    head = ("| setting | NFE | speed-up | PSNR to uncached (dB) | FD | accuracy | precision | recall |\n"
            "|---|---|---|---|---|---|---|---|\n")
    return head + "".join(
        f"| {r['setting']} | {r['nfe']:.2f} | {r['speedup']:.2f}x | "
        f"{format(r['psnr_db'], '.1f') if 'psnr_db' in r else ''} | {r['fd']:.2f} | {r['accuracy']:.3f} | "
        f"{r['precision']:.3f} | {r['recall']:.3f} |\n" for r in rows)


def matched_table(matches: list[dict[str, Any]]) -> str:
    """Markdown: per target NFE, each cache family's best PSNR (dB) at that cost, its NFE and FD change."""
    if not matches or not matches[0]["families"]:
        return ""
    fams = list(matches[0]["families"])
    head = "| NFE <= | " + " | ".join(fams) + " |\n|---|" + "---|" * len(fams) + "\n"
    lines = []
    for m in matches:
        cells = []
        for f in fams:
            v = m["families"][f]
            if v["setting"] is None:
                cells.append(f"(min NFE {v['min_nfe']:.0f})")
            else:
                cell = f"{v['psnr_db']:.1f} dB, NFE {v['nfe']:.0f}, FD {100 * v['fd_change']:+.1f}%"
                cells.append(f"**{cell}**" if m.get("best") == f else cell)
        lines.append(f"| {m['target_nfe']} | " + " | ".join(cells) + " |\n")
    return head + "".join(lines)


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(19, 4.5))
    sampler_rows = [r for r in rows if r["group"].startswith("NFE") or r["group"] == "baseline"]
    for r in sampler_rows:
        own = r["setting"].startswith("fewstep")
        axes[0].plot(r["nfe"], r["fd"], "o" if own else "s", color="C0" if own else "C1")
        axes[0].annotate(r["setting"].replace(" (teacher)", ""), (r["nfe"], r["fd"]), fontsize=6)
    axes[0].set(xscale="log", yscale="log", xlabel="NFE per sample", ylabel="FD (lower is better)",
                title="samplers in ComfyUI (circles: fewstep, squares: ComfyUI)")
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        if not (r["group"].startswith("NFE") or r["group"] == "baseline"):
            groups.setdefault(r["group"], []).append(r)
    for fam, rs in groups.items():
        rs = sorted(rs, key=lambda r: r["speedup"])
        axes[1].plot([r["speedup"] for r in rs], [r["fd"] for r in rs], "o-", label=fam)
    base = [r for r in rows if r["group"] == "baseline"]
    if base:
        axes[1].axhline(base[0]["fd"], color="k", ls=":", label="no cache (50 steps)")
    axes[1].set(xlabel="wall-time speed-up vs the uncached run", ylabel="FD", title="caches in ComfyUI")
    axes[1].legend(fontsize=7)
    for fam, rs in groups.items():
        rs = sorted((r for r in rs if "psnr_db" in r), key=lambda r: r["nfe"])
        if rs:
            axes[2].plot([r["nfe"] for r in rs], [r["psnr_db"] for r in rs], "o-", label=fam)
    axes[2].set(xlabel="NFE per sample (uncached: 100)", ylabel="PSNR to the uncached sample (dB)",
                title="caches in ComfyUI: fidelity at matched cost")
    axes[2].legend(fontsize=7)
    fig.tight_layout()
    with io.atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=90)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=("samplers", "caches", "all"), default="all")
    p.add_argument("--per-class", type=positive_int, default=36,
                   help="samples per digit (36 -> 360, the held-out size)")
    p.add_argument("--seed", type=nonneg_int, default=0)
    p.add_argument("--threads", type=positive_int, default=1)
    p.add_argument("--caches", nargs="+", default=None,
                   help="caches part: only the cache families whose name contains one of these strings")
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    p.add_argument("--comfyui-version", default=None,
                   help="ComfyUI test fixture to run on: 0.3.75 or 0.33.0 (default: $FEWSTEP_COMFYUI_VERSION, else "
                        "0.3.75); results go to comfyui-<version>.json")
    args = p.parse_args(argv)
    if args.comfyui_version:
        if "comfyui_env" in sys.modules and sys.modules["comfyui_env"].COMFYUI_VERSION != args.comfyui_version:
            raise SystemExit(f"--comfyui-version {args.comfyui_version}: ComfyUI "
                             f"{sys.modules['comfyui_env'].COMFYUI_VERSION} is already loaded in this process")
        os.environ["FEWSTEP_COMFYUI_VERSION"] = args.comfyui_version
    torch.set_num_threads(args.threads)
    cm = comfy_modules()
    import comfyui_version
    teacher = load(cm, "digits_dit_teacher")
    base = baseline_run(cm, teacher)
    runs = [base]
    if args.part in ("samplers", "all"):
        runs += sampler_runs(cm, teacher)
    if args.part in ("caches", "all"):
        import tempfile

        runs += cache_runs(cm, teacher, calibration_dir=Path(tempfile.mkdtemp(prefix="fewstep-bench-cal-")),
                           only=args.caches)
    runs.append(Run(base.name + " (timed again)", "baseline", base.model, base.sampler, base.sigmas, base.cfg))
    t0 = time.time()
    rows, images = evaluate(cm, runs, args.per_class, args.seed)
    rows = [r for r in rows if not r["setting"].endswith("(timed again)")] + [
        {**r, "group": "baseline-repeat"} for r in rows if r["setting"].endswith("(timed again)")]
    out = Path(args.out) if args.out else RESULTS
    result = {"machine": machine(), "comfyui_version": comfyui_version.__version__, "per_class": args.per_class,
              "seed": args.seed, "teacher_cfg": TEACHER_CFG,
              "command": "fewstep bench comfyui " + " ".join(sys.argv[1:] if argv is None else argv),
              "wall_seconds": time.time() - t0, "rows": rows, "matched_caches": matched(rows),
              "matched_nfe": matched_nfe(rows)}
    stem = f"comfyui-{args.comfyui_version}" if args.comfyui_version else "comfyui"
    path = write_json(result, f"{stem}.json", out)
    plot([r for r in rows if r["group"] != "baseline-repeat"], out / f"{stem}.png")
    print(table(rows))
    print(matched_table(result["matched_nfe"]))
    print(f"wrote {path} and {out / f'{stem}.png'} (ComfyUI {comfyui_version.__version__})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
