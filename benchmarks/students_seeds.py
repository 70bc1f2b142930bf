"""A candidate student against the shipped one and the teacher on several noise seeds, 360 samples each
(``python -m fewstep.benchmarks.students_seeds --candidate PATH``).

For every seed, in one process: the teacher (DPM-Solver++(2M), 50 steps, CFG 1.25), the shipped student of the same
method and the candidate, each scored on the embedded benchmark (FD, accuracy, precision, recall) plus the
within-class diversity of its samples relative to real digits (``core.metrics.diversity``). JSON to
``benchmarks/results/<name>.json`` (or ``--out``), with the sample grid of the candidate per seed.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from fewstep.core.evaluate import Setting, balanced_labels, run_settings
from fewstep.core.models.embedded import TEACHER_CFG, WEIGHTS_DIR, load_teacher
from fewstep.core.models.students import load_student

from .common import RESULTS, machine, write_json


def student_setting(name: str, path: str | Path) -> Setting:
    student, meta = load_student(path)
    return Setting(name, meta["sampler"], sigmas=meta["sigmas"], denoiser=student,
                   options=dict(meta.get("sampler_extra") or {}))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--candidate", required=True, nargs="+", help="student safetensors to compare (one or more)")
    p.add_argument("--shipped", default=str(WEIGHTS_DIR / "digits_dmd2_1step.safetensors"))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--teacher-seeds", type=int, nargs="*", default=None,
                   help="seeds on which the teacher is also run (default: every seed; the students cost 1-4 NFE, "
                   "the teacher 100)")
    p.add_argument("--per-class", type=int, default=36)
    p.add_argument("--teacher-steps", type=int, default=50)
    p.add_argument("--name", default="dmd2_student_seeds")
    p.add_argument("--out", default=None, help=f"results folder (default {RESULTS})")
    args = p.parse_args(argv)
    from fewstep.core.metrics.diversity import mean_class_diversity, reference_diversity
    from fewstep.core.metrics.quality import extract_features
    from fewstep.core.models.grid import to_uint8_grid

    teacher = load_teacher()
    labels = balanced_labels(args.per_class)
    real_div = reference_diversity("train", per_class=args.per_class)
    t0 = time.time()
    rows = []
    out_dir = Path(args.out) if args.out else RESULTS
    for seed in args.seeds:
        settings = [Setting(f"teacher dpmpp_2m {args.teacher_steps} steps", "dpmpp_2m", args.teacher_steps,
                            cfg=TEACHER_CFG)] if args.teacher_seeds is None or seed in args.teacher_seeds else []
        settings.append(student_setting("shipped student", args.shipped))
        names = ["candidate"] if len(args.candidate) == 1 else [f"candidate {Path(c).stem}" for c in args.candidate]
        settings += [student_setting(n, c) for n, c in zip(names, args.candidate)]
        r, images = run_settings(teacher, settings, per_class=args.per_class, seed=seed, progress=False)
        for row in r:
            imgs = images[row["setting"]]
            row["seed"] = seed
            row["diversity"] = mean_class_diversity(extract_features(imgs), labels) / real_div
            print(f"seed {seed} {row['setting']:28s} FD {row['fd']:.3f} acc {row['accuracy']:.3f} "
                  f"prec {row['precision']:.3f} recall {row['recall']:.3f} div {row['diversity']:.2f}", flush=True)
        rows += r
        out_dir.mkdir(parents=True, exist_ok=True)
        for n in names:
            pick = images[n].reshape(10, args.per_class, *images[n].shape[1:])[:, :10]
            tag = "" if len(names) == 1 else "_" + Path(args.candidate[names.index(n)]).stem
            grid = out_dir / f"{args.name}{tag}_grid_seed{seed}.png"
            tmp = grid.with_name(grid.stem + ".tmp.png")
            to_uint8_grid(pick.reshape(-1, *pick.shape[2:]), nrow=10).save(tmp)
            os.replace(tmp, grid)
    result = {"benchmark": "student_seeds", "candidate": [str(c) for c in args.candidate], "shipped": str(args.shipped),
              "per_class": args.per_class, "seeds": args.seeds, "rows": rows, "seconds": round(time.time() - t0, 1),
              "machine": machine()}
    path = write_json(result, f"{args.name}.json", args.out)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
