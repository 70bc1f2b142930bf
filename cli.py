"""The ``fewstep`` command line: ``demo``, ``train-teacher``, ``train-classifier``, ``bench``."""

from __future__ import annotations

import argparse
import sys


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(out_dir=args.out, per_class=args.per_class, seed=args.seed, quick=args.quick)
    return 0


def _train_teacher(args: argparse.Namespace) -> int:
    from .core.models.train_teacher import train_teacher

    path = train_teacher(out=args.out, steps=args.steps, batch_size=args.batch_size, seed=args.seed)
    print(f"teacher written to {path}")
    return 0


def _train_classifier(args: argparse.Namespace) -> int:
    from .core.metrics.train_classifier import train_classifier

    train_classifier(args.out, seed=args.seed) if args.out else train_classifier(seed=args.seed)
    return 0


def _search_schedule(args: argparse.Namespace) -> int:
    import json
    import os

    from .core.evaluate import search_embedded_schedules
    from .core.models.embedded import WEIGHTS_DIR, load_teacher

    rows = search_embedded_schedules(load_teacher(), args.nfe, sampler=args.sampler, cfg=args.cfg)
    out = args.out or str(WEIGHTS_DIR / "digits_dit_teacher_schedules.json")
    tmp = out + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"model": "digits-dit-teacher", "schedules": rows}, f, indent=2)
    os.replace(tmp, out)
    for r in rows:
        print(f"{r['sampler']} NFE {r['nfe']}: sigmas {[round(s, 3) for s in r['sigmas']]}")
    print(f"wrote {out}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    if args.what == "quality":
        from .benchmarks.quality import main as quality_main
    else:
        from .benchmarks.samplers import main as quality_main
    return quality_main([] if args.rest is None else args.rest)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fewstep", description="fewstep: make diffusion and flow models fast.")
    sub = p.add_subparsers(dest="cmd", required=True)

    d = sub.add_parser("demo", help="sample the embedded teacher with several samplers and write a report")
    d.add_argument("--out", default="fewstep-report", help="report folder (default: ./fewstep-report)")
    d.add_argument("--per-class", type=int, default=20, help="samples per digit class for the metrics")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--quick", action="store_true", help="fewer settings and samples (a smoke run)")
    d.set_defaults(fn=_demo)

    t = sub.add_parser("train-teacher", help="train the embedded digits DiT teacher (resumable)")
    t.add_argument("--out", default=None, help="weights path (default: the package's shipped location)")
    t.add_argument("--steps", type=int, default=4000)
    t.add_argument("--batch-size", type=int, default=64)
    t.add_argument("--seed", type=int, default=0)
    t.set_defaults(fn=_train_teacher)

    c = sub.add_parser("train-classifier", help="train the digits feature network used by the metrics")
    c.add_argument("--out", default=None)
    c.add_argument("--seed", type=int, default=0)
    c.set_defaults(fn=_train_classifier)

    s = sub.add_parser("search-schedule", help="search step schedules for the embedded teacher and ship them")
    s.add_argument("--nfe", type=int, nargs="+", default=[4, 6, 8])
    s.add_argument("--sampler", default="dpmpp_2m")
    s.add_argument("--cfg", type=float, default=2.0)
    s.add_argument("--out", default=None)
    s.set_defaults(fn=_search_schedule)

    b = sub.add_parser("bench", help="run a benchmark (JSON in benchmarks/results/)")
    b.add_argument("what", choices=["quality", "samplers"])
    b.add_argument("rest", nargs=argparse.REMAINDER)
    b.set_defaults(fn=_bench)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.fn(args) or 0)
    except (FileNotFoundError, ValueError, ImportError) as e:
        print(f"fewstep {args.cmd}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
