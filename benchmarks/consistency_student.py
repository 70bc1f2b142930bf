"""Fine-tune a shipped multistep consistency student's last segment on the teacher's second-order ODE solution and
record its training curve (resumable; ``python -m fewstep.benchmarks.consistency_student --work DIR --init PATH``).

Why (issue 13): the whole gap of the 4-step consistency student is its last segment (sigma 0.96 -> 0). Finishing the
student's own first three steps with the teacher gives FD 0.374 with 12 DPM-Solver++(2M) steps on the consistency
grid, 0.395 with 12 DDIM steps and 0.470 with 4 DDIM steps (360 samples, seed 0) — so a consistency target made of
a few first-order teacher steps (``ConsistencyDistillation(teacher_steps=4, skip=3)``) is *worse* than the shipped
student there, and bootstrapping through single DDIM steps inherits that error. This stage instead:

1. makes ``--pairs`` inputs exactly where the student is used: the shipped student's own sampling chain from pure
   noise (noise seeds 10000 + shard, disjoint from the benchmark's 0-3) down to the last boundary ``sigma_{S-1}``;
   the target is the teacher's CFG-``--cfg`` ODE solution from there to 0, DPM-Solver++(2M) over the student's
   consistency grid (``--teacher-skip`` grid levels per step). Every earlier step's input and the initial student's
   x0 prediction there are kept as well. Shards of 256 in ``<work>/pairs`` (resumable; made once, reused by every
   epoch);
2. trains with the multistep consistency loss (``core.losses.consistency.consistency_loss``, pseudo-Huber at the
   segment end): on the last segment the target is the teacher's solution at the segment end 0 (the multi-step
   teacher target, no bootstrapping), and on each earlier segment the initial student's own prediction (a "keep"
   term, weight ``--keep-weight``: one network serves every sigma, so the first steps must not drift);
3. every ``--eval-every`` batches samples 360 digits (seed 0) with the student's own ``S`` steps and scores them
   (FD, accuracy, precision, recall, within-class diversity) into ``<work>/curve.json``; snapshots and a checkpoint
   (student, Adam state, batch counter, all atomic) in ``<work>``; a run started again resumes.

The pairs are ``core.consistency_pairs`` and the loss ``core.losses.consistency.last_segment_loss``: the same stage
that ``fewstep train-student consistency`` runs (``callbacks.consistency_last_segment``); this script adds the
training curve, ``--pairs-from`` (reuse another run's pairs; ``--keep-targets init``: keep at this run's initial
student instead) and ``--export-only --average FIRST LAST`` (a snapshot average).

Nothing is written outside ``--work`` except by ``--export-only PATH`` (a named file) and ``--curve-to DIR``.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

from ..core.consistency_pairs import PAIR_SEED, SHARD, grid_index, load_pairs, make_pairs, make_shard  # noqa: F401
from ..core.losses.consistency import last_segment_loss as stage_loss  # noqa: F401


@torch.no_grad()
def init_predictions(student, pairs: dict[str, torch.Tensor], sigmas: torch.Tensor, batch: int = 512) -> torch.Tensor:
    """``student``'s x0 predictions at every stored chain input (the keep targets of a run that reuses another run's
    pairs but holds the earlier steps where its own initial student has them)."""
    out = torch.empty_like(pairs["pred"])
    for k in range(pairs["x"].shape[0]):
        for i in range(0, pairs["x"].shape[1], batch):
            x, y = pairs["x"][k, i:i + batch], pairs["labels"][i:i + batch]
            out[k, i:i + batch] = student(x, sigmas[k].expand(len(x)), class_labels=y)
    return out


@torch.no_grad()
def evaluate(student, sigmas: torch.Tensor, per_class: int = 36, seed: int = 0) -> dict[str, float]:
    """The student's own ``S``-step samples (Euler = DDIM, as shipped), scored on the embedded benchmark."""
    from fewstep.core.evaluate import Setting, balanced_labels, generate
    from fewstep.core.metrics.diversity import mean_class_diversity, reference_diversity
    from fewstep.core.metrics.quality import evaluate_samples, extract_features

    labels = balanced_labels(per_class)
    imgs = generate(student, Setting("student", "euler", sigmas=sigmas, denoiser=student), labels, seed=seed)
    m = {k: float(v) for k, v in evaluate_samples(imgs, labels).items()}
    m["diversity"] = mean_class_diversity(extract_features(imgs), labels) / reference_diversity(
        "train", per_class=per_class, seed=seed)
    return m


def average_snapshots(folder: Path, first: int, last: int) -> dict:
    """Uniform average of the snapshots ``first..last`` (batch counts, inclusive) of a run: stochastic weight
    averaging (Izmailov et al. 2018, eq. 2: w_swa = mean of the iterates) over the stage's evaluation snapshots."""
    files = sorted(f for f in folder.glob("b*.pt") if first <= int(f.stem[1:]) <= last)
    if not files:
        raise SystemExit(f"no snapshots between batches {first} and {last} in {folder}")
    states = [torch.load(f, map_location="cpu", weights_only=True) for f in files]
    avg = {k: sum(s["student"][k].double() for s in states).div(len(states)).to(v.dtype)
           if v.is_floating_point() else v for k, v in states[-1]["student"].items()}
    return {"student": avg, "batches": states[-1]["batches"], "averaged": [int(s["batches"]) for s in states]}


def export_student(student, teacher, meta: dict, path: Path, batches: int, config: dict) -> list[Path]:
    from fewstep.callbacks.student_files import write_student_files

    meta = copy.deepcopy(meta)
    counters = meta.get("counters") or {}
    if "last_segment_stage" in meta:  # a stage run from a student that had one: keep the earlier stages' record
        earlier = {**meta.pop("last_segment_stage"), "batches": counters.get("last_segment_batches")}
        meta["earlier_last_segment_stages"] = [*meta.get("earlier_last_segment_stages", []), earlier]
    meta["counters"] = {**counters, "last_segment_batches": int(batches)}
    meta["last_segment_stage"] = config
    return write_student_files(student.model, teacher.model, path, meta)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", required=True, help="run folder (pairs, checkpoint, curve, snapshots)")
    p.add_argument("--init", default=None, help="the student to start from (default: the shipped 4-step student)")
    p.add_argument("--pairs", type=int, default=3072, help="teacher-solved chains (multiple of 256)")
    p.add_argument("--pairs-from", metavar="DIR", default=None,
                   help="reuse the pairs folder of an earlier run (its chains and keep targets come from that run's "
                        "--init student; recorded in config.json)")
    p.add_argument("--teacher-skip", type=int, default=1, help="grid levels per teacher DPM-Solver++(2M) step")
    p.add_argument("--cfg", type=float, default=None, help="teacher CFG (default: the student's own)")
    p.add_argument("--keep-targets", choices=("pairs", "init"), default="pairs",
                   help="keep-term targets: the predictions stored with the pairs (those of the student that made "
                        "them) or this run's --init student's predictions at the stored inputs (with --pairs-from)")
    p.add_argument("--lr", type=float, default=2e-5)
    p.add_argument("--keep-weight", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--keep-batch", type=int, default=8, help="samples per earlier segment in the keep term")
    p.add_argument("--max-batches", type=int, default=1000)
    p.add_argument("--budget", type=float, default=3600.0, help="seconds of this invocation (resume continues)")
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--export-only", metavar="PATH", default=None,
                   help="write the student of a snapshot (--snapshot, default the checkpoint) to PATH and exit")
    p.add_argument("--snapshot", type=int, default=None, help="with --export-only: the batch count of a snapshot")
    p.add_argument("--average", type=int, nargs=2, metavar=("FIRST", "LAST"), default=None,
                   help="with --export-only: the uniform weight average of the snapshots FIRST..LAST batches")
    p.add_argument("--curve-to", metavar="DIR", default=None, help="with --export-only: also publish the curve there")
    p.add_argument("--curve-name", default="consistency_training_curve")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    from fewstep.callbacks.train_students import CFG
    from fewstep.core.io import load_torch, save_torch, write_json
    from fewstep.core.losses.consistency import consistency_grid
    from fewstep.core.models.embedded import WEIGHTS_DIR, load_teacher
    from fewstep.core.models.students import load_student

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    config = {k: v for k, v in vars(args).items() if k in ("init", "pairs", "teacher_skip", "cfg", "lr",
                                                              "keep_weight", "batch_size", "keep_batch", "seed",
                                                              "pairs_from", "keep_targets")}
    config["init"] = str(args.init or WEIGHTS_DIR / "digits_consistency_4step.safetensors")
    cfg_path = work / "config.json"
    if cfg_path.exists():
        stored = json.loads(cfg_path.read_text())
        if stored != config:
            print(f"{work}: using the stored configuration of this run ({cfg_path}), not the arguments")
        config = stored
    else:
        write_json(cfg_path, config)
    config.setdefault("pairs_from", None)
    config.setdefault("keep_targets", "pairs")
    if config["pairs"] % SHARD:
        raise SystemExit(f"--pairs must be a multiple of {SHARD}, got {config['pairs']}")
    teacher = load_teacher()
    student, meta = load_student(config["init"])
    cfg = float(config["cfg"] if config["cfg"] is not None else meta.get("guidance_scale") or CFG)
    sigmas = torch.as_tensor(meta["sigmas"], dtype=torch.float32)
    grid = consistency_grid(student.model_sampling)
    ckpt_path = work / "checkpoint.pt"
    if args.export_only:
        if args.average is not None:
            state = average_snapshots(work / "snapshots", *args.average)
            config = {**config, "averaged_snapshots": state["averaged"]}
        else:
            src = work / "snapshots" / f"b{args.snapshot:05d}.pt" if args.snapshot is not None else ckpt_path
            state = torch.load(src, map_location="cpu", weights_only=True)
        student.model.load_state_dict(state["student"])
        files = export_student(student, teacher, meta, Path(args.export_only), state["batches"], config)
        print(f"exported the student after {state['batches']} batches: {', '.join(map(str, files))}")
        if args.curve_to:
            publish_curve(work, Path(args.curve_to), state["batches"], args.curve_name, config, cfg,
                          f"consistency {len(sigmas) - 1}-step, last-segment stage")
        return 0

    t_start = time.perf_counter()
    pairs_dir = Path(config["pairs_from"]) if config["pairs_from"] else work / "pairs"
    pairs_dir.mkdir(exist_ok=True)
    init_student = copy.deepcopy(student).eval()
    if config["pairs_from"]:
        for i in range(config["pairs"] // SHARD):
            if not (pairs_dir / f"shard_{i:04d}.pt").exists():
                raise SystemExit(f"--pairs-from {pairs_dir}: shard_{i:04d}.pt is missing; it holds fewer than "
                                 f"{config['pairs']} pairs")
    make_pairs(pairs_dir, init_student, teacher, sigmas, grid, config["pairs"], cfg, config["teacher_skip"],
               log=lambda m: print(m, flush=True))
    pairs = load_pairs(pairs_dir, config["pairs"] // SHARD)
    if config["keep_targets"] == "init":
        pairs["pred"] = init_predictions(init_student, pairs, sigmas)
    del init_student

    opt = torch.optim.Adam(student.model.parameters(), lr=config["lr"], betas=(0.9, 0.999))
    batches, curve = 0, {"history": []}
    if ckpt_path.exists():
        state = load_torch(ckpt_path)
        student.model.load_state_dict(state["student"])
        opt.load_state_dict(state["optimizer"])
        batches = int(state["batches"])
        print(f"resumed at batch {batches}")
    if (work / "curve.json").exists():
        curve = json.loads((work / "curve.json").read_text())
        curve["history"] = [r for r in curve["history"] if r["batches"] <= batches]
    student.model.train().requires_grad_(True)

    def checkpoint() -> None:
        state = {"student": student.model.state_dict(), "optimizer": opt.state_dict(), "batches": batches}
        save_torch(state, ckpt_path)

    def measure() -> None:
        student.model.eval()
        t0 = time.perf_counter()
        row = {"batches": batches, **evaluate(student, sigmas), "eval_seconds": round(time.perf_counter() - t0, 1)}
        student.model.train()
        curve["history"].append(row)
        write_json(work / "curve.json", curve)
        (work / "snapshots").mkdir(exist_ok=True)
        save_torch({"student": student.model.state_dict(), "batches": batches},
                   work / "snapshots" / f"b{batches:05d}.pt", keep_previous=False)
        print(f"batch {batches}: FD {row['fd']:.3f} acc {row['accuracy']:.3f} prec {row['precision']:.3f} "
              f"recall {row['recall']:.3f} div {row['diversity']:.2f}", flush=True)

    if not curve["history"]:
        measure()
    n = pairs["target"].shape[0]
    g = torch.Generator().manual_seed(config["seed"] * 7919 + batches)
    t0 = time.perf_counter()
    while batches < args.max_batches and time.perf_counter() - t_start < args.budget:
        idx = torch.randint(0, n, (config["batch_size"],), generator=g)
        keep_idx = torch.randint(0, n, (config["keep_batch"],), generator=g)
        loss, logs = stage_loss(student, pairs, sigmas, idx, keep_idx, config["keep_weight"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        batches += 1
        if batches % 20 == 0:
            per = (time.perf_counter() - t0) / 20
            print(f"batch {batches} loss {float(loss.detach()):.4f} {logs} ({per:.2f} s/batch)", flush=True)
            t0 = time.perf_counter()
        if batches % args.eval_every == 0:
            measure()
            checkpoint()
    checkpoint()
    return 0


def publish_curve(work: Path, out_dir: Path, upto: int, name: str, config: dict, cfg: float,
                  title: str = "consistency student, last-segment stage") -> Path:
    """The run's curve up to ``upto`` batches with its configuration as ``out_dir/<name>.json`` + ``.png``."""
    from fewstep.core.io import write_json

    from .dmd2_student import plot_curve

    curve = json.loads((work / "curve.json").read_text())
    curve["history"] = [{**r, "generator_updates": r["batches"]} for r in curve["history"] if r["batches"] <= upto]
    curve["config"] = {**config, "teacher_cfg": cfg}
    curve["exported_at_batches"] = upto
    curve["note"] = ("last-segment stage (benchmarks/consistency_student.py): fixed noise batch of 360 samples, "
                     "seed 0; x axis = batches; diversity = mean within-class feature distance / real digits'")
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    write_json(path, curve)
    plot_curve(curve, path.with_suffix(".png"), title=title)
    return path


if __name__ == "__main__":
    raise SystemExit(main())
