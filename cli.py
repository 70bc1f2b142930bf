"""The ``fewstep`` command line: ``demo``, ``train-teacher``, ``train-classifier``, ``bench``, ``export``,
``run-onnx``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .core.checks import finite_float, nonneg_int, positive_int


def _opset(text: str) -> int:
    """argparse type for ``--opset``: an opset the exporter writes (``core.checks.check_opset``)."""
    from .core.checks import check_opset

    v = nonneg_int(text)
    try:
        return int(check_opset(v))
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _check_report_folder(out: str, overwrite: bool) -> None:
    """Refuse a folder that already holds a report unless ``--overwrite`` (before any sampling)."""
    from .core.io import check_writable_dir

    d = check_writable_dir(out)
    if (d / "report.json").exists() and not overwrite:
        raise FileExistsError(f"{d} already holds a report (report.json); pass --overwrite to replace it "
                              "(or choose another --out)")


def _demo(args: argparse.Namespace) -> int:
    from .core.io import output_lock
    from .demo import run_demo

    _check_report_folder(args.out, args.overwrite)
    with output_lock(args.out, "demo"):
        run_demo(out_dir=args.out, per_class=args.per_class, seed=args.seed, quick=args.quick)
    return 0


def _train_teacher(args: argparse.Namespace) -> int:
    from .core.io import check_new_file, check_writable_dir, output_lock
    from .core.models.train_teacher import train_teacher

    out = check_new_file(args.out, args.overwrite)
    check_writable_dir(out.parent)
    with output_lock(out.parent, "train-teacher"):
        path = train_teacher(out=out, steps=args.steps, batch_size=args.batch_size, seed=args.seed)
    print(f"teacher written to {path}")
    return 0


def _train_classifier(args: argparse.Namespace) -> int:
    from .core.io import check_new_file, check_writable_dir
    from .core.metrics.train_classifier import train_classifier

    out = check_new_file(args.out, args.overwrite)
    check_writable_dir(out.parent)
    train_classifier(out, seed=args.seed)
    print(f"classifier written to {out}")
    return 0


def _search_schedule(args: argparse.Namespace) -> int:
    from .core.evaluate import search_embedded_schedules
    from .core.io import check_new_file, check_writable_dir, write_json
    from .core.models.embedded import load_teacher

    out = check_new_file(args.out, args.overwrite)
    check_writable_dir(out.parent)
    rows = search_embedded_schedules(load_teacher(), args.nfe, sampler=args.sampler, cfg=args.cfg)
    write_json(out, {"model": "digits-dit-teacher", "schedules": rows})
    for r in rows:
        print(f"{r['sampler']} NFE {r['nfe']}: sigmas {[round(s, 3) for s in r['sigmas']]}")
    print(f"wrote {out}")
    return 0


def _train_student(args: argparse.Namespace) -> int:
    try:
        from .callbacks.train_students import main as train_main
    except ImportError as e:
        raise ImportError(f"training needs the train extra: pip install 'fewstep[train]' ({e})") from e
    return int(train_main(args.rest) or 0)


#: ``fewstep bench <what>`` -> the benchmark module that runs it
BENCHMARKS = {"quality": "quality", "samplers": "samplers", "onnx": "onnx_speed", "caching": "caching",
              "sparse-attention": "sparse_attention", "training-overhead": "training_overhead", "comfyui": "comfyui",
              "gpu": "gpu"}


def _bench(args: argparse.Namespace) -> int:
    from importlib import import_module

    bench_main = import_module(f".benchmarks.{BENCHMARKS[args.what]}", __package__).main
    rc = bench_main([] if args.rest is None else args.rest)
    return rc if isinstance(rc, int) else 0  # some benchmarks return their results


def _export_model(spec: str, random_weights: bool):
    """``(denoiser, default recipe)`` for ``fewstep export``: the embedded teacher, a tiny test model, a fewstep
    .safetensors file (a distilled student keeps the sampler and sigmas it was trained for) or a diffusers folder."""
    from pathlib import Path

    from .core.export.tiny import TINY
    from .core.models.embedded import build_dit, dit_denoiser, load_teacher

    if spec == "teacher":
        try:
            return load_teacher(), {}
        except FileNotFoundError as e:
            if not random_weights:
                raise FileNotFoundError(f"{e} Or pass --random-weights to export the untrained architecture.") from None
            return dit_denoiser(build_dit().eval(), name="digits-dit-untrained"), {}
    if spec in TINY:
        return TINY[spec](), {}
    path = Path(spec)
    if path.suffix == ".safetensors":
        from .core.models.students import load_student, read_metadata

        if not path.is_file():
            raise FileNotFoundError(f"model file not found: {path}")
        if "method" not in read_metadata(path):
            return load_teacher(path), {}
        den, meta = load_student(path)
        if meta.get("sampler_extra"):
            raise ValueError(f"{path.name} samples with extra inputs {sorted(meta['sampler_extra'])}; export it with "
                             "fewstep.core.export.export_onnx(..., guidance=...) from Python")
        return den, {"sampler": meta["sampler"], "sigmas": meta["sigmas"]}
    if path.is_dir() and (path / "config.json").is_file():
        import json

        import diffusers

        from .core.models.diffusers_adapters import diffusers_denoiser

        cls_name = json.loads((path / "config.json").read_text()).get("_class_name", "")
        cls = getattr(diffusers, cls_name, None)
        if cls is None:
            raise ValueError(f"{path}/config.json names no diffusers model class ({cls_name!r})")
        return diffusers_denoiser(cls.from_pretrained(path).eval()), {}
    raise ValueError(f"unknown model {spec!r}: use 'teacher', one of {', '.join(TINY)}, a fewstep .safetensors file "
                     "or a diffusers model folder")


def _export(args: argparse.Namespace) -> int:
    from .core.export.exporter import export_onnx
    from .core.io import check_new_file, check_writable_dir

    out = check_new_file(args.out, args.overwrite)
    check_writable_dir(out.parent)
    den, recipe = _export_model(args.model, args.random_weights)
    if args.cfg is not None:
        from .core.guidance.cfg import CFGDenoiser

        cfg = getattr(den.model, "config", None)
        null = args.null if args.null is not None else getattr(cfg, "num_embeds_ada_norm", None)
        if null is None:
            raise ValueError("--cfg folds class-label guidance and needs the null class: pass --null ID")
        den = CFGDenoiser(den, args.cfg, cond_key="class_labels", null=int(null))
    timesteps = [float(t) for t in args.timesteps.split(",")] if args.timesteps else None
    sigmas = recipe.get("sigmas") if not (args.schedule or args.steps or timesteps) else None
    res = export_onnx(den, args.out, fp16=args.fp16, sampler=args.sampler or recipe.get("sampler"),
                      schedule=args.schedule, steps=args.steps, timesteps=timesteps, sigmas=sigmas,
                      dynamic_resolution=False if args.static_resolution else None,
                      external_data=True if args.external_data else None, opset=args.opset,
                      overwrite=args.overwrite)
    m = res.metadata
    err = "not verified" if res.max_rel_error is None else f"max relative error vs torch {res.max_rel_error:.1e}"
    print(f"wrote {res.path} ({m['precision']}, {m['sampler']['name']} {m['sampler']['steps']} steps "
          f"{m['sampler']['schedule']}; {err})")
    for note in res.notes:
        print(f"  note: {note}")
    return 0


def _run_onnx(args: argparse.Namespace) -> int:
    import time

    from .core.export.runtime import OnnxDenoiser, generate, grid_uint8
    from .core.io import atomic_path, check_new_file, check_writable_dir

    out = check_new_file(args.output, args.overwrite)
    check_writable_dir(out.parent, "-o/--output")  # before sampling: an unwritable output is found now
    model = OnnxDenoiser(args.model, providers=["CPUExecutionProvider"] if args.cpu else None, threads=args.threads)
    labels = None
    if args.class_label is not None:
        labels = [args.class_label] * args.n
    t0 = time.perf_counter()
    x = generate(model, None if labels else args.n, class_labels=labels, steps=args.steps, sampler=args.sampler,
                 schedule=args.schedule, guidance_scale=args.cfg, seed=args.seed)
    secs = time.perf_counter() - t0
    if x.shape[1] not in (1, 3):
        raise ValueError(f"run-onnx writes image grids for 1- or 3-channel models; {model.name} has {x.shape[1]} "
                         "channels (latents): use fewstep.core.export.runtime.generate and your decoder")
    from PIL import Image

    with atomic_path(out, args.overwrite) as tmp:
        Image.fromarray(grid_uint8(x, nrow=args.nrow)).save(tmp)
    sm = model.meta["sampler"]
    print(f"wrote {args.output}: {len(x)} samples, {args.sampler or sm['name']} "
          f"{args.steps or sm['steps']} steps on {model.providers[0]} in {secs:.2f} s")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fewstep", description="fewstep: make diffusion and flow models fast.")
    sub = p.add_subparsers(dest="cmd", required=True)

    d = sub.add_parser("demo", help="sample the embedded teacher with several samplers and write a report")
    d.add_argument("--out", default="fewstep-report", help="report folder (default: ./fewstep-report)")
    d.add_argument("--per-class", type=positive_int, default=36,
                   help="samples per digit class (36 -> 360, the size of the real-vs-real FD floor)")
    d.add_argument("--seed", type=nonneg_int, default=0)
    d.add_argument("--quick", action="store_true", help="fewer settings and samples (a smoke run)")
    d.add_argument("--overwrite", action="store_true", help="replace a report already in --out")
    d.set_defaults(fn=_demo)

    t = sub.add_parser("train-teacher", help="train the embedded digits DiT teacher (resumable)")
    t.add_argument("--out", default=str(Path("fewstep-teacher") / "digits_dit_teacher.safetensors"),
                   help="weights path (default: ./fewstep-teacher/digits_dit_teacher.safetensors; never the "
                        "package's shipped weights)")
    t.add_argument("--steps", type=positive_int, default=4000)
    t.add_argument("--batch-size", type=positive_int, default=64)
    t.add_argument("--seed", type=nonneg_int, default=0)
    t.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    t.set_defaults(fn=_train_teacher)

    c = sub.add_parser("train-classifier", help="train the digits feature network used by the metrics")
    c.add_argument("--out", default=str(Path("fewstep-classifier") / "digits_classifier.safetensors"),
                   help="weights path (default: ./fewstep-classifier/digits_classifier.safetensors)")
    c.add_argument("--seed", type=nonneg_int, default=0)
    c.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    c.set_defaults(fn=_train_classifier)

    s = sub.add_parser("search-schedule", help="search step schedules for the embedded teacher and ship them")
    s.add_argument("--nfe", type=positive_int, nargs="+", default=[4, 6, 8])
    s.add_argument("--sampler", default="dpmpp_2m")
    s.add_argument("--cfg", type=finite_float, default=1.25)
    s.add_argument("--out", default="digits_dit_teacher_schedules.json",
                   help="output JSON (default: ./digits_dit_teacher_schedules.json)")
    s.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    s.set_defaults(fn=_search_schedule)

    ts = sub.add_parser("train-student", add_help=False,
                        help="distil a shipped student of the embedded teacher (Lightning; --help for options)")
    ts.add_argument("rest", nargs=argparse.REMAINDER)  # parsed by callbacks.train_students: no lightning import here
    ts.set_defaults(fn=_train_student)

    b = sub.add_parser("bench", help="run a benchmark (JSON in benchmarks/results/)")
    b.add_argument("what", choices=list(BENCHMARKS))
    b.add_argument("rest", nargs=argparse.REMAINDER)
    b.set_defaults(fn=_bench)

    e = sub.add_parser("export", help="export a model to ONNX with fewstep metadata (sample it with run-onnx)")
    e.add_argument("model", help="'teacher', tiny-unet / tiny-dit / tiny-flux, a fewstep .safetensors file or a "
                                 "diffusers model folder")
    e.add_argument("out", help="output .onnx file")
    e.add_argument("--fp16", action="store_true", help="fp16 graph (softmax/normalisation kept in fp32)")
    e.add_argument("--cfg", type=finite_float, default=None,
                   help="fold classifier-free guidance (default scale W) into the graph: one pass per step, scale is "
                        "an input")
    e.add_argument("--null", type=nonneg_int, default=None,
                   help="null class id for --cfg (default: the DiT's extra row)")
    e.add_argument("--sampler", default=None, help="default sampler stored in the file (euler, dpmpp_2m, lcm, dmd, "
                                                   "flow_map, onestep)")
    e.add_argument("--schedule", default=None, help="default schedule (karras, simple, uniform, ...)")
    e.add_argument("--steps", type=positive_int, default=None, help="default number of steps (8)")
    e.add_argument("--timesteps", default=None, help="fixed student timesteps, e.g. 999,749,499,249")
    e.add_argument("--static-resolution", action="store_true", help="do not make height/width dynamic")
    e.add_argument("--external-data", action="store_true", help="weights in <out>.data (automatic above 2 GB)")
    e.add_argument("--opset", type=_opset, default=None, help="ONNX opset (18 or newer; default: the exporter's)")
    e.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    e.add_argument("--random-weights", action="store_true", help="export the teacher architecture untrained when "
                                                                  "its weights are missing")
    e.set_defaults(fn=_export)

    r = sub.add_parser("run-onnx", help="sample an exported model with onnxruntime only (no torch) to a PNG grid")
    r.add_argument("model", help="a .onnx file written by `fewstep export`")
    r.add_argument("--class", dest="class_label", type=nonneg_int, default=None,
                   help="class id (default: one per class)")
    r.add_argument("--n", type=positive_int, default=8, help="samples when --class is given (default 8)")
    r.add_argument("--steps", type=positive_int, default=None, help="steps (default: the exported recipe)")
    r.add_argument("--sampler", default=None)
    r.add_argument("--schedule", default=None)
    r.add_argument("--cfg", type=finite_float, default=None, help="guidance scale (graphs with a guidance input)")
    r.add_argument("--seed", type=nonneg_int, default=0)
    r.add_argument("--nrow", type=positive_int, default=8)
    r.add_argument("--cpu", action="store_true", help="CPU execution provider even when CUDA is available")
    r.add_argument("--threads", type=positive_int, default=None)
    r.add_argument("-o", "--output", default="grid.png")
    r.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    r.set_defaults(fn=_run_onnx)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["train-student"]:  # its parser lives with the Lightning code (imported only when used)
        ns = argparse.Namespace(cmd="train-student", rest=argv[1:], fn=_train_student)
        return _run(ns)
    return _run(build_parser().parse_args(argv))


def _run(args: argparse.Namespace) -> int:
    try:
        return int(args.fn(args) or 0)
    except (OSError, ValueError, ImportError, RuntimeError) as e:
        if type(e) is RuntimeError:  # a bug, not a user error: keep the traceback
            raise
        print(f"fewstep {args.cmd}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
