"""Quality of the embedded teacher across NFE and CFG (``fewstep bench quality``).

For NFE in {1, 2, 4, 8, 16, 32, 50} and CFG in {1, 2, 4}: DPM-Solver++(2M) on a karras schedule, samples of
every class, FD / class accuracy / precision / recall against the train digits, and the wall-time speed-up
relative to the 50-step setting of the same CFG, measured in the same run. JSON + PNG in benchmarks/results/.
"""

from __future__ import annotations

import argparse
import time

from fewstep.core.evaluate import Setting, markdown_table, plot_quality, run_settings
from fewstep.core.metrics.quality import reference_floors
from fewstep.core.models.embedded import load_teacher

from ..core.checks import finite_float, nonneg_int, positive_int
from .common import RESULTS, machine, write_json

NFES = [50, 32, 16, 8, 4, 2, 1]
CFGS = [1.0, 2.0, 4.0]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--per-class", type=positive_int, default=36,
                   help="samples per class (default 36 -> 360, the size of the held-out floor)")
    p.add_argument("--sampler", default="dpmpp_2m")
    p.add_argument("--cfg", type=finite_float, nargs="*", default=CFGS)
    p.add_argument("--nfe", type=positive_int, nargs="*", default=NFES)
    p.add_argument("--seed", type=nonneg_int, default=0)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    teacher = load_teacher()
    t0 = time.time()
    rows = []
    for cfg in args.cfg:
        settings = [Setting(f"{args.sampler} {n} steps cfg {cfg:g}", args.sampler, n, cfg=cfg)
                    for n in sorted(args.nfe, reverse=True)]
        r, _ = run_settings(teacher, settings, per_class=args.per_class, seed=args.seed)
        rows += r
    floors = reference_floors()
    result = {"benchmark": "teacher_quality", "sampler": args.sampler, "schedule": "karras",
              "per_class": args.per_class, "floors": floors, "rows": rows, "seconds": round(time.time() - t0, 1),
              "speedup_reference": "the largest-NFE setting of the same CFG", "machine": machine()}
    path = write_json(result, "quality_teacher.json", args.out)
    plot_quality(rows, path.with_suffix(".png"), floors=floors)
    print(markdown_table(rows))
    print(f"FD floor {floors['fd_floor']:.3f}  ceiling {floors['fd_ceiling']:.2f}; wrote {path} ({RESULTS})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
