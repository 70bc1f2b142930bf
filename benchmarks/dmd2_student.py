"""Train the one-step DMD2 digits student with a recipe of ``callbacks.train_students.dmd2_recipe`` and record its
training curve (resumable; ``python -m fewstep.benchmarks.dmd2_student --work DIR``).

Every ``--eval-every`` batches a ``CollapseMonitor`` scores 360 samples of a fixed noise batch (FD, accuracy,
precision, recall on the embedded benchmark, within-class diversity relative to real digits) and writes the
curve to ``<work>/curve.json``; Lightning checkpoints go to ``<work>/checkpoints`` and a run started again with
the same ``--work`` resumes from ``last.ckpt``. At the end the student is exported to ``<work>/student.safetensors``
(+ JSON) and the curve drawn to ``<work>/curve.png``. Nothing is written outside ``--work``.
"""

from __future__ import annotations

import argparse
import json
import time
from datetime import timedelta
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback


def elapsed_train_seconds(ckpt: Path) -> float:
    """Training seconds already spent by the run that wrote ``ckpt`` (0 without one). Lightning's ``Timer`` restores
    them on resume and counts ``max_time`` from the run's start, so a resumed invocation adds them to its budget."""
    if not Path(ckpt).exists():
        return 0.0
    from ..core.io import load_torch

    state = load_torch(ckpt, "DMD2 checkpoint")
    return float(state.get("callbacks", {}).get("Timer", {}).get("time_elapsed", {}).get("train", 0.0))


def plot_curve(curve: dict, path: Path, title: str = "DMD2 1-step student") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = curve["history"]
    x = [r.get("generator_updates", r["batches"]) for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    axes[0].plot(x, [r["fd"] for r in rows], "o-")
    axes[0].set(xlabel="generator updates", ylabel="FD (360 samples)", yscale="log", title=title)
    for k in ("recall", "precision", "accuracy"):
        axes[1].plot(x, [r[k] for r in rows], "o-", label=k)
    axes[1].set(xlabel="generator updates", ylim=(0, 1.02), title="recall / precision / accuracy")
    axes[1].legend(fontsize=8)
    axes[2].plot(x, [r["diversity"] for r in rows], "o-")
    axes[2].set(xlabel="generator updates", ylabel="within-class diversity / real digits'", title="diversity")
    for ref in curve.get("references", []):
        axes[0].axhline(ref["fd"], ls=":", color="k", label=ref["name"])
        axes[1].axhline(ref["recall"], ls=":", color="k")
    if curve.get("references"):
        axes[0].legend(fontsize=7)
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    tmp.replace(path)


INITS = ("reflow", "teacher", "dmd2", "consistency4")
SHIPPED_INIT = {"reflow": "digits_reflow_1step", "dmd2": "digits_dmd2_1step",
                "consistency4": "digits_consistency_4step"}


def initial_student(init: str):
    """The generator a run starts from: ``"copy"`` (the teacher) or a trainable copy of a shipped student."""
    if init == "teacher":
        return "copy"
    from fewstep.core.models.embedded import WEIGHTS_DIR
    from fewstep.core.models.students import load_student

    student, _ = load_student(WEIGHTS_DIR / f"{SHIPPED_INIT[init]}.safetensors")
    return student.requires_grad_(True)


def warm_start(module, path: str | Path) -> None:
    """Load the student, critic and head tensors of a checkpoint that still fit ``module`` (not its optimizers)."""
    state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    own = module.state_dict()
    fit = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    skipped = sorted(set(state) - set(fit))
    module.load_state_dict(fit, strict=False)
    missing = sorted(k for k in own if k not in fit and not k.startswith("teacher"))
    print(f"warm start from {path}: {len(fit)} tensors; skipped {skipped}; kept fresh {missing}")


class Snapshots(Callback):
    """The generator (EMA and live) exported at every curve point, so no evaluated point is lost."""

    def __init__(self, folder: Path, every: int):
        self.folder, self.every = Path(folder), int(every)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        from fewstep.callbacks.ema import ema_weights, find_ema

        if int(pl_module.batches_seen) % self.every:
            return
        g = pl_module.generator_updates
        pl_module.export(self.folder / f"g{g:05d}_raw.safetensors")
        if find_ema(trainer) is not None:
            with ema_weights(trainer, pl_module):
                pl_module.export(self.folder / f"g{g:05d}_ema.safetensors")


def publish_curve(work: Path, out_dir: Path, upto: int, name: str = "dmd2_training_curve") -> Path:
    """Copy the run's curve up to ``upto`` generator updates, with its configuration, to
    ``out_dir/<name>.json`` and draw it next to it."""
    curve = json.loads((work / "curve.json").read_text())
    curve["history"] = [r for r in curve["history"] if r.get("generator_updates", 0) <= upto]
    curve["config"] = json.loads((work / "config.json").read_text())
    curve["exported_at_generator_updates"] = upto
    curve["note"] = ("fixed noise batch of 360 samples (CollapseMonitor, seed 0); diversity = mean within-class "
                     "feature distance / that of as many real digits")
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(curve, indent=1))
    tmp.replace(path)
    plot_curve(curve, path.with_suffix(".png"))
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", required=True, help="run folder (checkpoints, logs, curve, exported student)")
    p.add_argument("--init", choices=INITS, default="reflow",
                   help="generator to start from: a shipped student (reflow 1-step, DMD2 1-step, consistency 4-step) "
                   "or the teacher")
    p.add_argument("--timestep", type=int, default=None,
                   help="timestep label of the noise input (default: 999 from reflow, 399 from the teacher)")
    p.add_argument("--timesteps", type=int, nargs="+", default=None,
                   help="multi-step generator timesteps, e.g. 999 749 499 249 (backward simulation; overrides "
                   "--timestep)")
    p.add_argument("--from-ckpt", default=None, metavar="CKPT",
                   help="start from the generator, critic and GAN head of another run's checkpoint (fresh optimizers "
                   "and counters; head tensors that no longer fit, e.g. biases dropped before GroupNorm, are skipped)")
    p.add_argument("--ema", type=float, default=0.0,
                   help="EMA decay of the generator (0 = none); the curve then scores the EMA generator and "
                   "curve_raw.json the live one, and exports write the EMA weights")
    p.add_argument("--no-gan", action="store_true")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=JSON",
                   help="override recipe keys, e.g. lr=1e-5 gan_weight=0.1 gan_t_range=[0,0.5]")
    p.add_argument("--budget", type=float, default=3600.0,
                   help="training seconds of this invocation (a resumed run gets them on top of the time spent)")
    p.add_argument("--max-generator-updates", type=int, default=None)
    p.add_argument("--eval-every", type=int, default=250, help="batches between curve points (5 batches = 1 "
                   "generator update at critic ratio 5)")
    p.add_argument("--checkpoint-every", type=int, default=250, help="batches between checkpoints")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--export-only", metavar="PATH", default=None,
                   help="write the generator of <work>/checkpoints/last.ckpt to PATH (safetensors + JSON) and exit; "
                   "safe while the run goes on")
    p.add_argument("--ckpt", default=None, help="with --export-only: the checkpoint (default <work>/checkpoints/"
                   "last.ckpt)")
    p.add_argument("--curve-to", metavar="DIR", default=None,
                   help="with --export-only: also write the curve so far as DIR/<curve-name>.json + .png")
    p.add_argument("--curve-name", default="dmd2_training_curve", help="file stem of --curve-to's curve")
    p.add_argument("--raw", action="store_true", help="with --export-only: the live generator, not its EMA")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger

    from fewstep.callbacks import CollapseMonitor, DivergenceGuard, DMD2Distillation, SampleGrid, StudentEMA
    from fewstep.callbacks.ema import ema_weights
    from fewstep.callbacks.train_students import SHAPE, _quiet, dmd2_recipe
    from fewstep.core.models.digits import load_digits_tensors
    from fewstep.core.models.embedded import load_teacher

    _quiet()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    recipe = dmd2_recipe("teacher" if args.init == "teacher" else "reflow", args.timestep, gan=not args.no_gan)
    if args.timesteps:
        recipe["generator_timesteps"] = list(args.timesteps)
    for item in args.set:
        key, _, val = item.partition("=")
        if key not in recipe and key not in ("gan_t_range", "head", "head_lr", "regression_weight", "regression_pairs",
                                             "phased", "critic_warmup"):
            raise SystemExit(f"--set {key}: not a recipe key ({', '.join(recipe)})")
        v = json.loads(val)
        recipe[key] = tuple(v) if isinstance(v, list) else v
    config = {"init": args.init, "timestep": args.timestep, "batch_size": args.batch_size, "seed": args.seed,
              "ema": args.ema, "from_ckpt": args.from_ckpt,
              "recipe": {k: list(v) if isinstance(v, tuple) else v for k, v in recipe.items()}}
    cfg_path = work / "config.json"
    if cfg_path.exists():  # resume / export: the run's own configuration wins over the arguments
        stored = json.loads(cfg_path.read_text())
        if stored != config:
            print(f"{work}: using the stored configuration of this run ({cfg_path}), not the arguments")
        config = stored
        recipe = {k: tuple(v) if isinstance(v, list) and k != "generator_timesteps" else v
                  for k, v in config["recipe"].items()}
    elif args.export_only:
        raise SystemExit(f"{work} holds no run (no config.json)")
    else:
        tmp = cfg_path.with_name("config.json.tmp")
        tmp.write_text(json.dumps(config, indent=1))
        tmp.replace(cfg_path)

    teacher = load_teacher()
    x, y = load_digits_tensors("train")
    module = DMD2Distillation(teacher, SHAPE, student=initial_student(config["init"]), real_data=x,
                              real_labels=y, batch_size=config["batch_size"], seed=config["seed"],
                              max_generator_steps=args.max_generator_updates, **recipe)
    if args.export_only:
        ckpt = torch.load(args.ckpt or work / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
        module.load_state_dict(ckpt["state_dict"])
        module.load_counters(ckpt.get("fewstep", {}).get("counters", {}))
        ema_state = next((v for k, v in ckpt.get("callbacks", {}).items() if k.startswith("StudentEMA")), None)
        if ema_state is not None and ema_state.get("ema") is not None and not args.raw:
            params = module.ema_parameters()
            with torch.no_grad():
                for k, v in ema_state["ema"].items():
                    params[k].copy_(v)
            print(f"exporting the EMA generator (decay {ema_state.get('decay')}; --raw for the live one)")
        files = module.export(args.export_only)
        print(f"exported the generator after {module.generator_updates} generator updates: "
              f"{', '.join(map(str, files))}")
        if args.curve_to:
            publish_curve(work, Path(args.curve_to), module.generator_updates, args.curve_name)
        return 0
    ema = config.get("ema", 0.0)
    last = work / "checkpoints" / "last.ckpt"
    if config.get("from_ckpt") and not last.exists():
        warm_start(module, config["from_ckpt"])
    monitor = CollapseMonitor(every_n_steps=args.eval_every, per_class=36, path=work / "curve.json",
                              min_recall=0.3, use_ema=bool(ema))
    extra = [StudentEMA(ema)] if ema else []
    if ema:  # the live generator too, to see what the average buys
        extra.append(CollapseMonitor(every_n_steps=args.eval_every, per_class=36, path=work / "curve_raw.json",
                                     min_recall=0.3, use_ema=False, name="live"))
    snaps = Snapshots(work / "snapshots", args.eval_every)
    ckpt = ModelCheckpoint(dirpath=work / "checkpoints", every_n_train_steps=args.checkpoint_every, save_last=True,
                           save_top_k=0)
    grid = SampleGrid(work / "grids", every_n_steps=args.eval_every, per_class=10)
    spent = elapsed_train_seconds(last)  # --budget is this invocation's: Lightning's timer resumes at ``spent``
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=-1,
                        max_time=timedelta(seconds=spent + args.budget),
                        callbacks=[*extra[:1], DivergenceGuard(), monitor, *extra[1:], grid, snaps, ckpt],
                        logger=CSVLogger(work, name="logs"),
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        log_every_n_steps=5)
    t0 = time.perf_counter()
    trainer.fit(module, ckpt_path=str(last) if last.exists() else None)
    with ema_weights(trainer, module):
        module.export(work / "student.safetensors")
    curve = json.loads((work / "curve.json").read_text())
    plot_curve(curve, work / "curve.png")
    r = curve["history"][-1]
    print(f"{module.generator_updates} generator updates ({time.perf_counter() - t0:.0f} s this run): FD {r['fd']:.3f} "
          f"recall {r['recall']:.3f} accuracy {r['accuracy']:.3f} diversity {r['diversity']:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
