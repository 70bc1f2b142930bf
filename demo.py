"""``fewstep demo``: the whole loop on the embedded digits teacher, on a CPU, with no download.

Samples every class with several samplers and step counts (and with shipped searched schedules), measures
wall-time speed-ups against the 50-step baseline in the same run, scores each setting (FD, class accuracy,
precision, recall) and writes a report folder: PNG grids, a quality chart, Markdown and JSON.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from .core.evaluate import Setting, markdown_table, run_settings, write_report
from .core.models.embedded import TEACHER_CFG, WEIGHTS_DIR, load_teacher

SCHEDULES_FILE = WEIGHTS_DIR / "digits_dit_teacher_schedules.json"


def demo_settings(quick: bool = False, cfg: float = TEACHER_CFG) -> list[Setting]:
    """The settings the demo compares; the first is the baseline the speed-ups refer to."""
    s = [Setting("teacher dpmpp_2m 50 steps", "dpmpp_2m", 50, cfg=cfg)]
    steps = (8, 4) if quick else (16, 8, 4)
    s += [Setting(f"teacher dpmpp_2m {n} steps", "dpmpp_2m", n, cfg=cfg) for n in steps]
    if not quick:
        s += [Setting("teacher uni_pc 8 steps", "uni_pc", 8, cfg=cfg),
              Setting("teacher euler 8 steps", "euler", 8, cfg=cfg)]
    if SCHEDULES_FILE.exists():
        shipped = json.loads(SCHEDULES_FILE.read_text())
        for entry in shipped.get("schedules", []):
            if quick and entry["nfe"] != 4:
                continue
            s.append(Setting(f"teacher {entry['sampler']} {entry['nfe']} steps, searched schedule",
                             entry["sampler"], sigmas=torch.tensor(entry["sigmas"]), cfg=entry.get("cfg", cfg)))
    return s


def run_demo(out_dir: str | Path = "fewstep-report", per_class: int = 36, seed: int = 0, quick: bool = False) -> Path:
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
    print(f"FD floor (train vs held-out real digits): {floors['fd_floor']:.2f}   "
          f"FD ceiling (noise): {floors['fd_ceiling']:.2f}")
    print(f"report: {out.resolve()}/report.md  ({time.time() - t0:.0f} s)")
    return out
