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

Nothing is written outside ``--work`` except by ``--export-only PATH`` (a named file) and ``--curve-to DIR``.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

SHARD = 256
PAIR_SEED = 10_000


def grid_index(grid: torch.Tensor, sigma: float) -> int:
    """The grid level of a student boundary sigma (they are grid levels by construction)."""
    i = int(torch.argmin((grid - float(sigma)).abs()))
    if abs(float(grid[i]) - float(sigma)) > 1e-3 * max(1.0, float(sigma)):
        raise ValueError(f"sigma {sigma} is not a level of the 48-level consistency grid")
    return i


@torch.no_grad()
def make_shard(student, teacher, sigmas: torch.Tensor, grid: torch.Tensor, shard: int, cfg: float, skip: int
               ) -> dict[str, torch.Tensor]:
    """One shard of ``SHARD`` chains: inputs ``x`` (S, B, ...) at the student's sigmas, the student's x0 predictions
    ``pred`` (S, B, ...), and ``target``: the teacher's DPM-Solver++(2M) CFG solution from ``x[S-1]`` to 0."""
    from fewstep.core.guidance.cfg import CFGDenoiser
    from fewstep.core.losses.common import ddim_transfer
    from fewstep.core.sampling.samplers import get_sampler

    ms = student.model_sampling
    g = torch.Generator().manual_seed(PAIR_SEED + shard)
    labels = torch.randint(0, 10, (SHARD,), generator=g)
    noise = torch.randn((SHARD, 1, 16, 16), generator=g)
    x = ms.noise_scaling(sigmas[0], noise, torch.zeros_like(noise), max_denoise=True)
    xs, preds = [], []
    for k in range(len(sigmas) - 1):
        x0 = student(x, sigmas[k].expand(SHARD), class_labels=labels)
        xs.append(x.clone())
        preds.append(x0.clone())
        x = ddim_transfer(ms, x, x0, sigmas[k].expand(SHARD), sigmas[k + 1].expand(SHARD))
    top = grid_index(grid, float(sigmas[-2]))
    levels = list(range(top, 0, -skip)) + [0]
    teacher_cfg = CFGDenoiser(teacher, cfg, cond_key="class_labels", null=10)
    target = get_sampler("dpmpp_2m")(teacher_cfg, xs[-1].clone(), grid[levels],
                                     extra_args={"class_labels": labels, "seed": PAIR_SEED + shard}, disable=True)
    return {"x": torch.stack(xs), "pred": torch.stack(preds), "target": target, "labels": labels}


def load_pairs(folder: Path, shards: int) -> dict[str, torch.Tensor]:
    parts = [torch.load(folder / f"shard_{i:04d}.pt", weights_only=True) for i in range(shards)]
    return {"x": torch.cat([p["x"] for p in parts], 1), "pred": torch.cat([p["pred"] for p in parts], 1),
            "target": torch.cat([p["target"] for p in parts]), "labels": torch.cat([p["labels"] for p in parts])}


def stage_loss(student, pairs: dict[str, torch.Tensor], sigmas: torch.Tensor, idx: torch.Tensor,
               keep_idx: torch.Tensor, keep_weight: float) -> tuple[torch.Tensor, dict[str, float]]:
    """Last segment: consistency loss against the teacher's solution at the segment end 0; earlier segments
    (``keep_weight > 0``): against the initial student's prediction (``consistency_loss`` with ``x_s = x_t``)."""
    from fewstep.core.losses.consistency import consistency_loss

    ms = student.model_sampling
    S = len(sigmas) - 1
    x, y = pairs["x"][S - 1, idx], pairs["labels"][idx]
    sig = sigmas[S - 1].expand(len(idx))
    zero = torch.zeros(len(idx))
    last = consistency_loss(ms, x, sig, student(x, sig, class_labels=y), pairs["target"][idx], zero,
                            pairs["target"][idx], zero)
    logs = {"last": float(last.detach())}
    loss = last
    if keep_weight > 0 and S > 1:
        for k in range(S - 1):
            xk, yk = pairs["x"][k, keep_idx], pairs["labels"][keep_idx]
            sk, se = sigmas[k].expand(len(keep_idx)), sigmas[k + 1].expand(len(keep_idx))
            keep = consistency_loss(ms, xk, sk, student(xk, sk, class_labels=yk), xk, sk, pairs["pred"][k, keep_idx],
                                    se)
            logs[f"keep{k}"] = float(keep.detach())
            loss = loss + keep_weight * keep
    return loss, logs


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


def export_student(student, teacher, meta: dict, path: Path, batches: int, config: dict) -> list[Path]:
    from fewstep.callbacks.student_files import write_student_files

    meta = copy.deepcopy(meta)
    meta["counters"] = {**(meta.get("counters") or {}), "last_segment_batches": int(batches)}
    meta["last_segment_stage"] = config
    return write_student_files(student.model, teacher.model, path, meta)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", required=True, help="run folder (pairs, checkpoint, curve, snapshots)")
    p.add_argument("--init", default=None, help="the student to start from (default: the shipped 4-step student)")
    p.add_argument("--pairs", type=int, default=3072, help="teacher-solved chains (multiple of 256)")
    p.add_argument("--teacher-skip", type=int, default=1, help="grid levels per teacher DPM-Solver++(2M) step")
    p.add_argument("--cfg", type=float, default=None, help="teacher CFG (default: the student's own)")
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
                                                              "keep_weight", "batch_size", "keep_batch", "seed")}
    config["init"] = str(args.init or WEIGHTS_DIR / "digits_consistency_4step.safetensors")
    cfg_path = work / "config.json"
    if cfg_path.exists():
        stored = json.loads(cfg_path.read_text())
        if stored != config:
            print(f"{work}: using the stored configuration of this run ({cfg_path}), not the arguments")
        config = stored
    else:
        write_json(cfg_path, config)
    if config["pairs"] % SHARD:
        raise SystemExit(f"--pairs must be a multiple of {SHARD}, got {config['pairs']}")
    teacher = load_teacher()
    student, meta = load_student(config["init"])
    cfg = float(config["cfg"] if config["cfg"] is not None else meta.get("guidance_scale") or CFG)
    sigmas = torch.as_tensor(meta["sigmas"], dtype=torch.float32)
    grid = consistency_grid(student.model_sampling)
    ckpt_path = work / "checkpoint.pt"
    if args.export_only:
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
    (work / "pairs").mkdir(exist_ok=True)
    init_student = copy.deepcopy(student).eval()
    for i in range(config["pairs"] // SHARD):
        f = work / "pairs" / f"shard_{i:04d}.pt"
        if not f.exists():
            t0 = time.perf_counter()
            save_torch(make_shard(init_student, teacher, sigmas, grid, i, cfg, config["teacher_skip"]), f,
                       keep_previous=False)
            print(f"pairs shard {i}: {time.perf_counter() - t0:.0f} s", flush=True)
    pairs = load_pairs(work / "pairs", config["pairs"] // SHARD)
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
