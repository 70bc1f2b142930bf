"""A candidate student against the shipped one and the teacher on several noise seeds, 360 samples each
(``python -m fewstep.benchmarks.students_seeds --candidate PATH``).

For every seed, in one process: the teacher (DPM-Solver++(2M), 50 steps, CFG 1.25), the shipped student of the same
method and the candidate, each scored on the embedded benchmark (FD, accuracy, precision, recall) plus the
within-class diversity of its samples relative to real digits (``core.metrics.diversity``). JSON to
``benchmarks/results/<name>.json`` (or ``--out``), with the sample grid of the candidate per seed.

Guidance adapters (AGD, ``digits_agd_adapter.safetensors``) are compared too: each runs on its own copy of the
teacher at CFG 1 (one pass per step) with its ``eval_guidance``, over ``--adapter-steps`` DPM-Solver++(2M) steps
(the demo's 8 by default); ``--cfg-steps N`` adds the teacher with two-pass CFG at N steps on every seed (the
reference an adapter must match at the same step count).
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


def is_adapter(path: str | Path) -> bool:
    """Whether ``path`` is a fewstep guidance adapter (else a student network)."""
    from fewstep.core.models.students import read_metadata

    return read_metadata(path).get("format") == "fewstep-guidance-adapter"


def adapter_setting(name: str, path: str | Path, steps: int = 8) -> Setting:
    """A guidance adapter on its own teacher copy, one pass per step at its ``eval_guidance``: ``steps``
    DPM-Solver++(2M) steps of the Karras schedule (what the demo runs)."""
    from fewstep.core.guidance.adapters import AdaptedDenoiser, GuidanceAdapter, adapter_metadata

    meta = adapter_metadata(path)
    scale = float((meta.get("distillation") or {}).get("eval_guidance", TEACHER_CFG))
    base = load_teacher()  # a separate copy: the adapter attaches to its network
    adapter = GuidanceAdapter.load(path, base.model)
    return Setting(name, "dpmpp_2m", steps, denoiser=AdaptedDenoiser(base, adapter, default_scale=scale))


def student_setting(name: str, path: str | Path, adapter_steps: int = 8) -> Setting:
    if is_adapter(path):
        return adapter_setting(name, path, adapter_steps)
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
    p.add_argument("--adapter-steps", type=int, default=8, help="sampling steps of guidance adapters (one pass each)")
    p.add_argument("--cfg-steps", type=int, default=None,
                   help="also run the teacher with two-pass CFG at this many steps on every seed")
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
        if args.cfg_steps:
            settings.append(Setting(f"teacher dpmpp_2m {args.cfg_steps} steps", "dpmpp_2m", args.cfg_steps,
                                    cfg=TEACHER_CFG))
        settings.append(student_setting("shipped student", args.shipped, args.adapter_steps))
        names = ["candidate"] if len(args.candidate) == 1 else [f"candidate {Path(c).stem}" for c in args.candidate]
        settings += [student_setting(n, c, args.adapter_steps) for n, c in zip(names, args.candidate)]
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
