"""Learned cache (DisCa-style) vs rule-based caches on few-step sampling: the 4-step consistency student and the
teacher at 8 steps.

``python -m fewstep.benchmarks.caching_learned`` (``--per-class 36``: the 360-sample protocol, the default;
``--quick`` for a smoke run). Per model:

1. training data: uncached sampling runs on *training* noise (another seed than the scored noise; ``--train-per-class``
   samples per digit; the teacher's CFG batch gives cond and uncond rows), the block range ``[1, 5)`` recorded by
   ``core.cache.learned.collect_pairs`` (pairs up to 3 calls apart);
2. the predictor trained by Lightning (``callbacks.learned_cache.fit_learned_cache``; closed-form start of its linear
   map, then AdamW), saved as safetensors keyed to the model's fingerprint under ``--out``; then, per schedule of
   ``e2e``, fine-tuned end to end on the same training noise (``core.cache.learned.finetune``: the cached sample's
   distance to the uncached one, gradients through the sampling loop; ``--e2e-iters`` steps) and saved beside it;
3. scored runs from the same noise (``benchmarks/caching_protocol.py``): uncached (timed at the start and at the
   end), ``LearnedCache`` on fixed skip schedules, the *same schedules with plain reuse* (the untrained, zero-initial
   predictor: First-Block-Cache's reuse on a fixed interval), ``FirstBlockCache`` (First-Block-Cache indicator over a
   threshold sweep), ``FirstBlockCache`` with TaylorSeer forecasting, and ``StepCache`` (EasyCache and input
   indicators, TaylorSeer on a fixed interval). PSNR / RMS to the uncached output, FD and accuracy, block
   evaluations, wall time (``--repeats`` timings per setting, fastest kept, against the mean of the uncached timings at
   the start and end).

The target of issue 15: with the learned cache >= 1.5x fewer block evaluations and >= 1.4x wall speed-up at PSNR >= 30
dB and FD within 5% of uncached, where the best rule-based cache at that fidelity gives <= 1.1x. Writes
``benchmarks/results/caching_learned.json`` and ``caching_learned.png``.
"""

from __future__ import annotations

import argparse
import contextlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from fewstep.core.cache import FirstBlockCache, StepCache, apply_cache
from fewstep.core.cache.learned import (
    LearnedCache,
    LearnedPlanCache,
    ResidualPredictor,
    collect_pairs,
    dit_sigma_of_call,
    load_plan,
    model_identity,
    plan_pairs,
    save_plan,
)
from fewstep.core.evaluate import balanced_labels
from fewstep.core.guidance import CFGDenoiser
from fewstep.core.models.digits import NULL_CLASS
from fewstep.core.models.embedded import WEIGHTS_DIR, load_teacher
from fewstep.core.models.students import load_student
from fewstep.core.sampling import get_sampler, get_sigmas

from .caching_protocol import BlockCounter, baseline_wall, fidelity
from .common import RESULTS, machine, write_json

HEAD, TAIL = 1, 0


def _setup(which: str, cfg: float) -> dict[str, Any]:
    if which == "student":
        den, meta = load_student(WEIGHTS_DIR / "digits_consistency_4step.safetensors")
        return {"name": "digits_consistency_4step", "den": den, "model": den, "sampler": get_sampler(meta["sampler"]),
                "sigmas": torch.tensor(meta["sigmas"]), "desc": f"4-step consistency student, {meta['sampler']}, "
                f"CFG {meta.get('guidance_scale')} distilled in (one batch)",
                "schedules": [(1, 3), (1, 2), (2, 3), (1, 2, 3), (2,)], "e2e": [(1, 2), (1, 3)], "max_gap": 3,
                "train_per_class": 20, "plans": [{1: 5, 2: 2}, {1: 5, 2: 3}], "plan_train_per_class": 40}
    den = load_teacher()
    return {"name": "digits-dit-teacher@8", "den": den, "model": CFGDenoiser(den, cfg, null=NULL_CLASS),
            "sampler": get_sampler("dpmpp_2m"), "sigmas": get_sigmas("karras", den.model_sampling, 8),
            "desc": f"teacher, 8-step dpmpp_2m (karras), CFG {cfg:g} (cond + uncond in one batch)",
            "schedules": [(1, 3, 5, 7), (2, 4, 6, 7), (1, 3, 5)], "e2e": [(2, 4, 6, 7)], "max_gap": 2,
            "train_per_class": 8, "plans": [{1: 5, 2: 5, 3: 5, 7: 5}, {1: 5, 2: 5, 3: 5, 4: 2, 7: 5},
                                             {1: 5, 2: 5, 3: 5, 4: 3, 7: 5}, {1: 5, 2: 5, 3: 5, 4: 5, 7: 5}],
            "plan_train_per_class": 20}


@torch.no_grad()
def _sample(s: dict, labels, noise) -> torch.Tensor:
    return _sample_grad(s, labels, noise, s["sampler"])


def _sample_grad(s: dict, labels, noise, sampler: Callable[..., torch.Tensor]) -> torch.Tensor:
    den = s["den"]
    x = den.model_sampling.noise_scaling(s["sigmas"][0], noise, torch.zeros_like(noise), max_denoise=True)
    return sampler(s["model"], x, s["sigmas"], extra_args={"class_labels": labels}, disable=True).clamp(-1, 1)


def _finetune(s: dict, pred: ResidualPredictor, identity: dict, sch: tuple, tl, tn, iters: int, out_dir: Path,
              log: Callable[[str], None]) -> tuple[LearnedCache, dict]:
    """End-to-end fine-tuning (``core.cache.learned.finetune``) of the regression predictor for schedule ``sch`` on
    the training noise; saved next to the regression predictor."""
    from fewstep.core.cache.learned.finetune import differentiable, finetune_end_to_end
    from fewstep.core.cache.learned.store import save_predictor

    fn = differentiable(s["sampler"])
    start = LearnedCache(pred, sch, head_blocks=HEAD, tail_blocks=TAIL, identity=identity)
    cache, rec = finetune_end_to_end(start, lambda c: apply_cache(s["model"], c),
                                     lambda z, c: _sample_grad(s, c["class_labels"], z, fn), tn, {"class_labels": tl},
                                     iters=iters, batch=24, lr=1e-3, seed=len(sch),
                                     log=lambda m: log(f"[{s['name']}] skip {list(sch)} {m}"))
    path = out_dir / f"learned_cache_{s['name'].replace('@', '_')}_e2e_{'-'.join(map(str, sch))}.safetensors"
    save_predictor(path, cache.predictor, identity, {"head_blocks": HEAD, "tail_blocks": TAIL,
                                                     "skip_steps": list(sch), **rec})
    rec["saved"] = str(path)
    return cache, rec


#: epochs of each plan predictor's regression (on ``plan_train_per_class x 10`` pairs)
PLAN_EPOCHS = 30


def plan_label(plan: dict[int, int]) -> str:
    """``{1: 5, 2: 2}`` -> ``"1:5,2:2"`` (call: blocks skipped from the first)."""
    return ",".join(f"{k}:{n}" for k, n in sorted(plan.items()))


def parse_plans(text: str) -> list[dict[int, int]]:
    """``"1:5,2:3;1:5,2:2"`` -> ``[{1: 5, 2: 3}, {1: 5, 2: 2}]`` (``plan_label``'s form, plans split by ``;``)."""
    out = []
    for part in filter(None, (p.strip() for p in text.split(";"))):
        try:
            out.append({int(k): int(n) for k, n in (e.split(":") for e in part.split(","))})
        except ValueError:
            raise SystemExit(f"--plans {text!r}: write each plan as call:blocks pairs, e.g. "
                             "'1:5,2:3;1:5,2:2'") from None
    return out


def _train_plans(s: dict, den: Any, net: Any, blocks: list, identity: dict, rank: int, seed: int, out_dir: Path,
                 train_per_class: int, epochs: int, log: Callable[[str], None]
                 ) -> tuple[list[tuple[dict, Path]], dict]:
    """Per plan of ``s["plans"]``: one predictor per skipped call (``LearnedPlanCache``), each trained by Lightning
    (``fit_learned_cache``) on pairs recorded with the plan acting on the calls before it (``plan_pairs``), on other
    noise than the scored runs; plans that share a prefix share its predictors. Saved with ``save_plan``."""
    from fewstep.callbacks.learned_cache import fit_learned_cache

    pl = balanced_labels(train_per_class)
    pn = torch.randn(len(pl), 1, 16, 16, generator=torch.Generator().manual_seed(seed + 2000))

    def sample_with(cache: LearnedPlanCache | None) -> None:
        with apply_cache(s["model"], cache) if cache is not None else contextlib.nullcontext():
            _sample(s, pl, pn)

    trained: dict[tuple, Any] = {}
    out, recs = [], {}
    for plan in s["plans"]:
        t0 = time.perf_counter()
        preds, per_call = {}, {}
        for k in sorted(plan):
            prefix = tuple((j, plan[j]) for j in sorted(plan) if j <= k)
            if prefix not in trained:
                pairs = plan_pairs(sample_with, net, blocks, plan, k, preds, dit_sigma_of_call(den.model_sampling))
                module, rec = fit_learned_cache(pairs, rank=rank, epochs=epochs, batch_size=64, lr=2e-3,
                                                seed=seed, accelerator="cpu", default_root_dir=str(out_dir))
                trained[prefix] = module.predictor
                per_call[k] = rec
                log(f"[{s['name']}] plan {plan_label(plan)} call {k}: {rec['pairs']} pairs, rel err linear "
                    f"{rec['linear_fit_rel_err']:.4f} -> {rec['final_rel_err']:.4f} ({rec['seconds']}s)")
            else:
                per_call[k] = "shared with a plan above (same calls before it)"
            preds[k] = trained[prefix]
        cache = LearnedPlanCache(plan, preds, head_blocks=0, identity=identity)
        name = plan_label(plan)
        fname = f"learned_cache_plan_{s['name'].replace('@', '_')}_{name.replace(':', 'x').replace(',', '_')}"
        path = save_plan(out_dir / f"{fname}.safetensors", cache, identity,
                         {"train_samples": len(pl), "train_seed": seed + 2000, "epochs": epochs})
        recs[name] = {"plan": {str(k): n for k, n in plan.items()}, "seconds": round(time.perf_counter() - t0, 1),
                      "per_call": per_call, "saved": str(path)}
        out.append((plan, path))
    return out, recs


def _rule_settings(steps: int) -> list[tuple[str, str, Callable[[], Any]]]:
    out: list[tuple[str, str, Callable[[], Any]]] = []
    for t in (0.05, 0.2, 0.8):
        out.append(("FirstBlockCache", f"first_block {t}", lambda t=t: FirstBlockCache(t)))
    out.append(("FirstBlockCache + taylor1", "first_block 0.2 + taylor1",
                lambda: FirstBlockCache(0.2, forecast="taylor1")))
    out.append(("FirstBlockCache interval + taylor1", "blocks every 2nd call + taylor1",
                lambda: FirstBlockCache(1.0, indicator="interval", max_consecutive_skips=1, forecast="taylor1")))
    for t in (0.2, 0.8):
        out.append(("StepCache easycache", f"easycache {t}", lambda t=t: StepCache(t, indicator="easycache")))
    for t in (0.2, 0.8):
        out.append(("StepCache input", f"input {t}", lambda t=t: StepCache(t)))
    out.append(("StepCache interval + taylor1", "every 2nd call + taylor1",
                lambda: StepCache(1.0, indicator="interval", max_consecutive_skips=1, forecast="taylor1")))
    return out


#: kinds of rows that are learned caches (the rest: rule-based, including plain reuse on the same plan)
LEARNED_KINDS = ("learned", "learned plan")


def model_benchmark(which: str, per_class: int, train_per_class: int, cfg: float, out_dir: Path, repeats: int,
                    epochs: int, rank: int, seed: int = 0, log: Callable[[str], None] = print,
                    e2e_iters: int = 150, plan_train_per_class: int = 0, plan_epochs: int = PLAN_EPOCHS,
                    plans: list[dict[int, int]] | None = None) -> dict[str, Any]:
    from fewstep.callbacks.learned_cache import LearnedCacheExport, fit_learned_cache
    from fewstep.core.metrics.quality import evaluate_samples

    s = _setup(which, cfg)
    if plans is not None:
        s["plans"] = plans
    den, net = s["den"], s["den"].model
    blocks = list(net.transformer_blocks)
    counter = BlockCounter(net)
    rows_per_call = 2 if s["model"] is not den else 1
    identity = model_identity(den)

    # 1. training data (other noise than the scored runs)
    t0 = time.perf_counter()
    tl = balanced_labels(train_per_class or s["train_per_class"])
    tn = torch.randn(len(tl), 1, 16, 16, generator=torch.Generator().manual_seed(seed + 1000))
    pairs = collect_pairs(lambda: _sample(s, tl, tn), net, blocks, HEAD, TAIL, dit_sigma_of_call(den.model_sampling),
                          max_gap=s["max_gap"])
    record_s = time.perf_counter() - t0
    # 2. train (Lightning) and save keyed to the fingerprint
    path = out_dir / f"learned_cache_{s['name'].replace('@', '_')}.safetensors"
    export = LearnedCacheExport(path, identity, {"head_blocks": HEAD, "tail_blocks": TAIL,
                                                 "skip_steps": list(s["schedules"][0]), "max_gap": s["max_gap"],
                                                 "train_samples": len(tl), "train_seed": seed + 1000})
    module, train = fit_learned_cache(pairs, rank=rank, epochs=epochs, batch_size=64, lr=2e-3, seed=seed,
                                      export=export, accelerator="cpu", default_root_dir=str(out_dir))
    train["record_trajectories_s"] = round(record_s, 1)
    train["saved"] = str(path)
    log(f"[{which}] trained on {train['pairs']} pairs in {train['seconds']}s (+{record_s:.1f}s recording), "
        f"rel err linear {train.get('linear_fit_rel_err', float('nan')):.4f} -> final {train['final_rel_err']:.4f}")
    del pairs
    plans, train["plans"] = _train_plans(s, den, net, blocks, identity, rank, seed, out_dir,
                                         plan_train_per_class or s["plan_train_per_class"], plan_epochs, log)

    # 3. scored runs
    labels = balanced_labels(per_class)
    noise = torch.randn(len(labels), 1, 16, 16, generator=torch.Generator().manual_seed(seed))

    def run(make: Callable[[], Any] | None) -> dict[str, Any]:
        counter.reset(rows_per_call * len(labels))
        cache = make() if make is not None else None
        ctx = apply_cache(s["model"], cache) if cache is not None else contextlib.nullcontext()
        with ctx:
            t0, c0 = time.perf_counter(), time.process_time()
            imgs = _sample(s, labels, noise)
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        return {"images": imgs, "wall_s": wall, "cpu_s": cpu, "block_evals": counter.block_evals,
                "stats": dict(cache.stats) if cache is not None else {}}

    settings: list[tuple[str, str, Callable[[], Any]]] = []
    pred = LearnedCache.load(path, den).predictor  # the saved file, fingerprint-checked
    for sch in s["schedules"]:
        settings.append(("learned", f"learned skip {list(sch)}",
                         lambda sch=sch: LearnedCache(pred, sch, head_blocks=HEAD, tail_blocks=TAIL)))
        settings.append(("reuse (same schedule)", f"reuse skip {list(sch)}",
                         lambda sch=sch: LearnedCache(ResidualPredictor(pred.dim, 0, False), sch, head_blocks=HEAD,
                                                      tail_blocks=TAIL)))
    train["e2e"] = {}
    for sch in s["e2e"] if e2e_iters > 0 else ():
        cache_e2e, rec = _finetune(s, pred, identity, sch, tl, tn, e2e_iters, out_dir, log)
        train["e2e"][",".join(map(str, sch))] = rec
        settings.append(("learned", f"learned+e2e skip {list(sch)}",
                         lambda c=cache_e2e, sch=sch: LearnedCache(c.predictor, sch, head_blocks=HEAD,
                                                                   tail_blocks=TAIL)))
    for plan, ppath in plans:
        settings.append(("learned plan", f"learned plan {plan_label(plan)}", lambda p=ppath: load_plan(p, den)))
        settings.append(("reuse (same plan)", f"reuse plan {plan_label(plan)}",
                         lambda plan=plan: LearnedPlanCache(plan)))
    settings += _rule_settings(len(s["sigmas"]) - 1)

    base_runs = [run(None) for _ in range(repeats)]
    ref = base_runs[0]["images"]
    base_m = {k: float(v) for k, v in evaluate_samples(ref, labels).items()}
    log(f"[{which}] uncached: block evals {base_runs[0]['block_evals']:.0f}, FD {base_m['fd']:.3f}, "
        f"acc {base_m['accuracy']:.3f}, wall {min(r['wall_s'] for r in base_runs):.2f}s")
    rows = []
    for kind, label, make in settings:
        runs = [run(make) for _ in range(repeats)]
        r0 = runs[0]
        m = {k: float(v) for k, v in evaluate_samples(r0["images"], labels).items()}
        row = {"kind": kind, "label": label, "rule_based": kind not in LEARNED_KINDS, **fidelity(r0["images"], ref),
               "fd": m["fd"], "accuracy": m["accuracy"], "fd_change": m["fd"] / base_m["fd"] - 1.0,
               "block_evals": r0["block_evals"], "wall_s": min(r["wall_s"] for r in runs),
               "cpu_s": min(r["cpu_s"] for r in runs), "stats": r0["stats"]}
        rows.append(row)
        log(f"[{which}] {label:36s} blocks {row['block_evals']:5.1f}  PSNR {row['psnr_db']:6.2f}  RMS "
            f"{row['rms']:.4f}  FD {row['fd']:.3f} ({100 * row['fd_change']:+.1f}%)  acc {row['accuracy']:.3f}")
    end_runs = [run(None) for _ in range(repeats)]
    bw = baseline_wall(min(r["wall_s"] for r in base_runs), min(r["wall_s"] for r in end_runs))
    bc = baseline_wall(min(r["cpu_s"] for r in base_runs), min(r["cpu_s"] for r in end_runs))
    base_blocks = base_runs[0]["block_evals"]
    for r in rows:
        r["block_ratio"] = base_blocks / max(r["block_evals"], 1e-9)
        r["speedup_wall"] = bw / r["wall_s"]
        r["speedup_cpu"] = bc / r["cpu_s"]
        r["fidelity_ok"] = bool(r["psnr_db"] >= 30.0 and abs(r["fd_change"]) <= 0.05)
        r["meets_target"] = bool(r["fidelity_ok"] and r["block_ratio"] >= 1.5 and r["speedup_wall"] >= 1.4)
    ok_rule = [r for r in rows if r["rule_based"] and r["fidelity_ok"]]
    ok_learned = [r for r in rows if not r["rule_based"] and r["fidelity_ok"]]
    # the learned setting that meets the block target with the highest PSNR (else the fastest at fidelity)
    meets = [r for r in ok_learned if r["block_ratio"] >= 1.5]
    best_rule = max(ok_rule, key=lambda r: r["speedup_wall"], default=None)
    best_learned = (max(meets, key=lambda r: r["psnr_db"]) if meets else
                    max(ok_learned, key=lambda r: r["speedup_wall"], default=None))
    return {
        "model": s["name"], "description": s["desc"], "steps": len(s["sigmas"]) - 1, "samples": len(labels),
        "seed": seed, "identity": identity, "block_range": [HEAD, len(blocks) - TAIL], "training": train,
        "predictor": module.predictor.config(),
        "baseline": {**base_m, "block_evals": base_blocks, "wall_s_start": min(r["wall_s"] for r in base_runs),
                     "wall_s_end": min(r["wall_s"] for r in end_runs),
                     "cpu_s_start": min(r["cpu_s"] for r in base_runs), "cpu_s_end": min(r["cpu_s"] for r in end_runs),
                     "repeat_psnr_db": fidelity(base_runs[-1]["images"], ref)["psnr_db"]},
        "rows": rows,
        "best_rule_based_at_fidelity": best_rule and {k: best_rule[k] for k in (
            "label", "psnr_db", "fd_change", "block_ratio", "speedup_wall")},
        "best_learned_at_fidelity": best_learned and {k: best_learned[k] for k in (
            "label", "psnr_db", "fd_change", "block_ratio", "speedup_wall")},
        "target_met": bool(best_learned is not None and best_learned["meets_target"] and
                           (best_rule is None or best_rule["speedup_wall"] <= 1.1)),
    }


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ms = result["models"]
    fig, axes = plt.subplots(1, len(ms), figsize=(7.5 * len(ms), 5.2), squeeze=False)
    for ax, m in zip(axes[0], ms):
        for kind, mk, c in (("learned", "o", "tab:red"), ("reuse (same schedule)", "s", "tab:grey"),
                            ("learned plan", "*", "tab:purple"), ("reuse (same plan)", "D", "tab:olive")):
            rs = [r for r in m["rows"] if r["kind"] == kind]
            ax.scatter([r["block_ratio"] for r in rs], [r["psnr_db"] for r in rs], marker=mk, c=c, label=kind)
        rs = [r for r in m["rows"] if r["kind"] not in ("learned", "reuse (same schedule)", "learned plan",
                                                        "reuse (same plan)")]
        ax.scatter([r["block_ratio"] for r in rs], [r["psnr_db"] for r in rs], marker="^", c="tab:blue",
                   label="rule-based (FBCache, TaylorSeer, EasyCache, ...)")
        ax.axhline(30, color="k", ls="--", lw=1, label="30 dB")
        ax.axvline(1.5, color="g", ls="--", lw=1, label="1.5x fewer block evaluations")
        ax.set(xlabel="block evaluations saved (uncached / cached)", ylabel="PSNR to uncached (dB)",
               title=f"{m['model']}: {m['samples']} samples")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def markdown(result: dict) -> str:
    lines = ["| model | setting | block evals saved | wall speed-up | CPU speed-up | PSNR dB | RMS | FD change | acc | "
             "fidelity ok |", "|---|---|---|---|---|---|---|---|---|---|"]
    for m in result["models"]:
        for r in sorted(m["rows"], key=lambda r: -r["speedup_wall"]):
            lines.append(f"| {m['model']} | {r['label']} | {r['block_ratio']:.2f}x | {r['speedup_wall']:.2f}x | "
                         f"{r['speedup_cpu']:.2f}x | {r['psnr_db']:.2f} | {r['rms']:.4f} | "
                         f"{100 * r['fd_change']:+.1f}% | {r['accuracy']:.3f} | "
                         f"{'yes' if r['fidelity_ok'] else 'no'} |")
    for m in result["models"]:
        lines.append(f"- {m['model']}: best learned at fidelity {m['best_learned_at_fidelity']}; best rule-based "
                     f"{m['best_rule_based_at_fidelity']}; target met: {m['target_met']}; training "
                     f"{m['training']['seconds']}s")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--per-class", type=int, default=36, help="scored samples per digit (36: the 360 protocol)")
    p.add_argument("--train-per-class", type=int, default=0,
                   help="training-trajectory samples per digit (0: per model, 20 student / 8 teacher)")
    p.add_argument("--models", default="student,teacher")
    p.add_argument("--cfg", type=float, default=2.0, help="teacher CFG (as benchmarks/caching.py)")
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--repeats", type=int, default=1, help="timed runs per setting (fastest kept; the first is scored)")
    p.add_argument("--e2e-iters", type=int, default=150,
                   help="end-to-end fine-tuning steps per e2e schedule (core.cache.learned.finetune; 0: off)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--plan-train-per-class", type=int, default=0,
                   help="training samples per digit for each plan predictor (0: per model, 40 student / 20 teacher)")
    p.add_argument("--plans", default=None,
                   help="learned-cache plans to train and score, e.g. '1:5,2:3;1:5,2:2' (call:blocks skipped from the "
                        "first; default per model; '' for none)")
    p.add_argument("--name", default=None, help="results file stem (default caching_learned[_<models>])")
    p.add_argument("--quick", action="store_true", help="smoke run: 2 samples per digit, 2 epochs")
    p.add_argument("--out", default=None, help=f"output folder (default {RESULTS})")
    p.add_argument("--weights-out", default=None, help="folder for the trained predictors (default: --out)")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    out = Path(a.out) if a.out else RESULTS
    wout = Path(a.weights_out) if a.weights_out else out
    wout.mkdir(parents=True, exist_ok=True)
    if a.quick:
        a.per_class, a.train_per_class, a.epochs, a.repeats, a.e2e_iters = 2, 2, 2, 1, min(a.e2e_iters, 2)
        a.plan_train_per_class = 2
    t0 = time.perf_counter()
    result: dict[str, Any] = {"benchmark": "caching_learned", "machine": machine(), "device": "cpu",
                              "models": [model_benchmark(w, a.per_class, a.train_per_class, a.cfg, wout, a.repeats,
                                                         a.epochs, a.rank, e2e_iters=a.e2e_iters,
                                                         plan_train_per_class=a.plan_train_per_class,
                                                         plan_epochs=2 if a.quick else PLAN_EPOCHS,
                                                         plans=None if a.plans is None else parse_plans(a.plans))
                                         for w in a.models.split(",")]}
    result["command"] = "python -m fewstep.benchmarks.caching_learned " + " ".join(argv if argv is not None else
                                                                                 __import__("sys").argv[1:])
    result["seconds"] = round(time.perf_counter() - t0, 1)
    models = a.models.split(",")
    stem = a.name or ("caching_learned" if set(models) == {"student", "teacher"} else
                      f"caching_learned_{'_'.join(models)}")
    path = write_json(result, f"{stem}.json", out)
    plot(result, path.with_name(f"{stem}.png"))
    print(markdown(result))
    print(f"\nwrote {path} and {path.with_name(stem + '.png')} in {result['seconds']:.0f}s")
    return result


if __name__ == "__main__":
    main()
