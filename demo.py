"""``fewstep demo``: the whole loop on the embedded digits teacher, on a CPU, with no download.

Samples every class with several samplers and step counts (and with shipped searched schedules), measures
wall-time speed-ups against the 50-step baseline in the same run (interleaved repeats, NFE ratio alongside, a note
when the machine was too busy for the timing to be trusted), scores each setting (FD, class accuracy,
precision, recall) and writes a report folder: PNG grids, a quality chart, Markdown and JSON.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from .core.evaluate import Setting, markdown_table, run_settings, timing_note, write_report
from .core.models.embedded import TEACHER_CFG, WEIGHTS_DIR, load_teacher

SCHEDULES_FILE = WEIGHTS_DIR / "digits_dit_teacher_schedules.json"


def demo_settings(quick: bool = False, cfg: float = TEACHER_CFG) -> list[Setting]:
    """The settings the demo compares; the first is the baseline the speed-ups refer to."""
    line = f"teacher dpmpp_2m karras, cfg {cfg:g}"  # one chart line over step counts
    s = [Setting("teacher dpmpp_2m 50 steps", "dpmpp_2m", 50, cfg=cfg, group=line)]
    steps = (8, 4) if quick else (16, 8, 4)
    s += [Setting(f"teacher dpmpp_2m {n} steps", "dpmpp_2m", n, cfg=cfg, group=line) for n in steps]
    if not quick:
        s += [Setting(f"teacher uni_pc 8 steps, cfg {cfg:g}", "uni_pc", 8, cfg=cfg),
              Setting(f"teacher euler 8 steps, cfg {cfg:g}", "euler", 8, cfg=cfg)]
    if SCHEDULES_FILE.exists():
        shipped = json.loads(SCHEDULES_FILE.read_text())
        for entry in shipped.get("schedules", []):
            if quick and entry["nfe"] != 4:
                continue
            s.append(Setting(f"teacher {entry['sampler']} {entry['nfe']} steps, searched schedule, "
                             f"cfg {entry.get('cfg', cfg):g}",
                             entry["sampler"], sigmas=torch.tensor(entry["sigmas"]), cfg=entry.get("cfg", cfg),
                             group=f"teacher {entry['sampler']} searched schedules, cfg {entry.get('cfg', cfg):g}"))
    return s + student_settings(quick=quick)


def student_settings(quick: bool = False) -> list[Setting]:
    """Shipped students (``fewstep train-student``) at their own sampler and sigmas, and the AGD adapter on the
    teacher at CFG 1 (one pass per step). Missing files are simply not shown."""
    out: list[Setting] = []
    try:
        from .core.models.students import load_student
    except ImportError:  # pragma: no cover
        return out
    for path in sorted(WEIGHTS_DIR.glob("digits_*.safetensors")):
        if path.name.startswith(("digits_dit_teacher", "digits_agd")):
            continue
        student, meta = load_student(path)
        sig = torch.tensor(meta["sigmas"])
        n = len(sig) - 1
        out.append(Setting(f"student {meta['method']}: {meta['sampler']} {n} step{'s' * (n > 1)}, cfg 1",
                           meta["sampler"], sigmas=sig,
                           denoiser=student, options=dict(meta.get("sampler_extra") or {})))
    agd = WEIGHTS_DIR / "digits_agd_adapter.safetensors"
    if agd.exists() and not quick:
        from .core.guidance.adapters import AdaptedDenoiser, GuidanceAdapter

        base = load_teacher()  # a separate copy: the adapter attaches to its network
        adapter = GuidanceAdapter.load(agd, base.model)
        out.append(Setting(f"teacher + AGD adapter (scale {TEACHER_CFG:g}): dpmpp_2m 8 steps, cfg 1 (1 pass/step)",
                           "dpmpp_2m", 8,
                           denoiser=AdaptedDenoiser(base, adapter, default_scale=TEACHER_CFG)))
    return out


def run_demo(out_dir: str | Path = "fewstep-report", per_class: int = 36, seed: int = 0, quick: bool = False) -> Path:
    from .core.checks import check_positive_int
    from .core.io import check_writable_dir

    check_positive_int("per_class", per_class)
    check_writable_dir(out_dir)  # before the sampling: an unwritable folder is found now
    t0 = time.time()
    torch.manual_seed(seed)
    try:
        teacher = load_teacher()
    except FileNotFoundError as e:
        print(f"fewstep demo: {e}", file=sys.stderr)
        raise
    from .core.metrics.quality import reference_floors

    if quick:
        per_class = min(per_class, 5)
    settings = demo_settings(quick=quick)
    print(f"fewstep demo: {len(settings)} settings x {per_class * 10} samples on the embedded digits DiT teacher")
    rows, images = run_settings(teacher, settings, per_class=per_class, seed=seed)
    floors = reference_floors()
    out = write_report(rows, images, out_dir, extra={"floors": floors, "per_class": per_class, "seed": seed})
    print()
    print(markdown_table(rows))
    print(timing_note(rows))
    print(f"FD floor (train vs held-out real digits): {floors['fd_floor']:.2f}   "
          f"FD ceiling (noise): {floors['fd_ceiling']:.2f}")
    print(f"report: {out.resolve()}/report.md  ({time.time() - t0:.0f} s)")
    return out
