"""Train the shipped students of the embedded digits teacher on CPU, within a time budget (resumable).

    python -m fewstep.callbacks.train_students <dmd2|consistency|reflow|agd> [--budget SECONDS] [--smoke]

- ``dmd2`` -> ``digits_dmd2_1step.safetensors``: DMD2 (``dmd2_recipe``), one step at sigma_max starting from the
  shipped reflow student, real score with the teacher's CFG, critic 5:1, spatial GAN head on the real digits: the
  critic first fitted alone for 150 batches (``DMD2_CRITIC_WARMUP``), then 50 generator updates (400 batches in all;
  ``--max-batches`` replaces it) with an EMA of decay 0.99, which is exported -- the shipped student's stage in one run.
  It does not reproduce the shipped student: one such run gave FD 0.52 / 0.48 / 0.54 / 0.57 on seeds 0-3 against the
  shipped 0.38 / 0.42 / 0.39 / 0.39 (``benchmarks/results/dmd2_train_student_seeds.json``): DMD2 oscillates here.
- ``consistency`` -> ``digits_consistency_4step`` and ``_2step``: multistep consistency with 4 segments, then 2
  segments starting from it (Hyper-SD's progressive segments), at the teacher's CFG 1.25; each is followed by its
  last-segment stage (``ConsistencyLastSegment``, issue 13): pairs made once from the student's own sampling chain
  (``LAST_SEGMENT``: 3072 / 2048 teacher DPM-Solver++(2M) solutions of 12 steps from the last boundary, generated
  outside the budget), then the last step trained on them with a keep term on the earlier steps (800 / 300 batches at
  lr 2e-5, no EMA), as ``benchmarks/consistency_student.py`` made the shipped students.
- ``reflow`` -> ``digits_reflow_1step.safetensors``: 4096 teacher ODE pairs at the teacher's CFG 1.25 (DPM-Solver++(2M),
  8 steps: the same FD as 16, generated once, outside the budget), reflow with U-shaped time (a third of the budget),
  then InstaFlow's one-step stage with the pseudo-Huber velocity loss (Lee et al. 2024).
- ``agd`` -> ``digits_agd_adapter.safetensors``: the shipped adapter's recipe: 2048 8-step CFG trajectories with w in
  [1, 4] (generated once, outside the budget; ``--trajectories``), a rank-8 guidance adapter on the attention/MLP
  projections and the adaLN modulation (10.6% of the teacher), the loss of each state weighted by
  ``1 / (max(w - 1, 0.1)^2 mean((cond - uncond)^2))`` (the squared relative error of the guidance term), lr 1e-3,
  batches of 32, 900 batches (``--max-batches``; give ``--budget 2400`` or more on one CPU thread so that the time
  budget does not stop it first).

Each stage runs a stock ``lightning.Trainer`` with ``max_time`` = its share of the budget, checkpoints every
``--checkpoint-every`` batches into ``--out`` and resumes from its last checkpoint when run again; the EMA student is
exported to ``--export-dir`` (default: ``<out>/<method>/export``; the package's shipped weights are never written,
and existing files in an explicit ``--export-dir`` are replaced only with ``--overwrite``). Checkpoints are written
atomically and the previous one is kept (``callbacks.checkpoint_io``); a second run into the same ``--out`` folder
is refused while the first holds its lock. Teacher trajectories are
generated once into ``--out`` (resumable too; their time counts against the budget the first time).
``train_student`` is the function behind ``fewstep train-student``.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from ..core.checks import nonneg_int, positive_float, positive_int
from ..core.guidance.adapters import DEFAULT_TARGETS
from ..core.models.embedded import TEACHER_CFG
from .distributed import is_sharded_run

METHODS = ("dmd2", "consistency", "reflow", "agd")
SHAPE = (1, 16, 16)
CFG = TEACHER_CFG  # the teacher's best-FD guidance scale; students distil the teacher at this scale
AGD_RANGE = (1.0, 4.0)
REFLOW_STEPS = 8  # teacher solver steps of the reflow pairs
AGD_STEPS = 8  # the adapter is trained at the step count it is sampled with (the demo's 8)
# issue 13: besides the attention and MLP projections, the adapter also updates the DiT's adaLN modulation (each
# block's ``norm1.linear`` and the final ``proj_out_1``), whose input is the timestep + class embedding: the guidance
# update can then depend on the noise level and the class (the rank-4 adapter on the projections alone gave too
# little guidance at low sigma; same batches: about 25% lower loss)
AGD_TARGETS = (*DEFAULT_TARGETS, "norm1.linear", "proj_out_1")
# issue 13: the consistency students' last-segment stage (``callbacks.consistency_last_segment``) as the shipped
# students had it (benchmarks/consistency_student.py): teacher pairs, grid levels per teacher step, batches, keep term
LAST_SEGMENT = {4: {"pairs": 3072, "skip": 1, "batches": 800, "keep_weight": 1.0, "keep_batch": 8, "lr": 2e-5},
                2: {"pairs": 2048, "skip": 2, "batches": 300, "keep_weight": 1.0, "keep_batch": 8, "lr": 2e-5}}
AGD_RANK = 8  # issue 13: rank 8 beat rank 4 on the same batches (loss and FD); 10.6% of the teacher
# the shipped adapter's budget: 900 batches of 32 on the first 2048 trajectories (every sample's noise, class and scale
# come from its global index, so these are the first 2048 of any larger set with the same seed)
AGD_TRAJECTORIES = 2048
AGD_BATCHES = 900
# issue 13: each state's loss divided by the size of its guidance direction, mean((cond - uncond)^2) (the native
# outputs differ least at sigma 0.7-0.1, where the 1/(w-1)^2-only adapter guided least: w_eff 1.19 for w = 1.25)
AGD_DELTA_WEIGHTING = "inverse_delta"
# issue 13: the shipped one-step DMD2 student's stage: the critic fitted to the frozen reflow student first, then 50
# generator updates averaged by an EMA of decay 0.99 (past them the live generator diverged: an early stop)
DMD2_CRITIC_WARMUP = 150
DMD2_GENERATOR_UPDATES = 50
DMD2_EMA = 0.99
TRAJECTORIES = {"reflow": 4096, "agd": AGD_TRAJECTORIES}  # the default of ``--trajectories`` per method
SHIPPED = {
    "dmd2": ["digits_dmd2_1step.safetensors"],
    "consistency": ["digits_consistency_4step.safetensors", "digits_consistency_2step.safetensors"],
    "reflow": ["digits_reflow_1step.safetensors"],
    "agd": ["digits_agd_adapter.safetensors"],
}


class StepTimer(Callback):
    """Records the wall time between consecutive training batches (everything a step costs)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._last: float | None = None

    @override
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        """Record the wall time since the previous batch ended.

        Args:
            trainer, pl_module, outputs, batch, batch_idx: unused: only the time of the call counts.
        """
        now = time.perf_counter()
        if self._last is not None:
            self.times.append(now - self._last)
        self._last = now

    def median(self) -> float:
        return statistics.median(self.times) if self.times else float("nan")


def _quiet() -> None:
    import logging

    for pat in (".*does not have many workers.*", ".*IterableDataset.*", ".*LitLogger.*", ".*treespec.*",
                ".*in eval mode.*", ".*reproducible.*"):
        warnings.filterwarnings("ignore", pat)
    logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)


def _fit(module, stage_dir: Path, budget_s: float, max_batches: int | None, export_path: Path | None,
         checkpoint_every: int, eval_every: int | None, progress: bool, smoke: bool,
         onnx: bool = False, distributed: dict[str, Any] | None = None,
         ema: float | None = 0.999) -> dict[str, Any]:
    """Fit one stage with an EMA of decay ``ema`` (``None``: none; smoke runs 0.99), guard, grids, quality eval,
    checkpoints and export (``onnx``: also the exported (EMA, else live) student as ``<export stem>.onnx``, after the
    checkpoints; an export failure is logged, training results are kept).
    Returns a summary."""
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger

    from . import (
        DivergenceGuard,
        QualityEval,
        SafeCheckpointIO,
        SampleGrid,
        StudentEMA,
        StudentExport,
        dmd2_optimizer_steps,
    )

    stage_dir.mkdir(parents=True, exist_ok=True)
    timer = StepTimer()
    callbacks = [StudentEMA(0.99 if smoke else ema)] if ema is not None else []
    callbacks += [DivergenceGuard(), timer]
    sharded = distributed is not None and is_sharded_run(distributed)
    if not smoke and not sharded:  # (grids and quality run on rank 0 alone: not with sharded networks)
        callbacks += [SampleGrid(stage_dir / "grids", every_n_steps=eval_every or 250, per_class=8),
                      QualityEval(every_n_steps=eval_every, per_class=20)]
    export = StudentExport(export_path) if export_path is not None else None
    if export is not None:
        callbacks.append(export)
    onnx_export = None
    if onnx and export_path is not None and not sharded:
        from .onnx_export import OnnxExport

        onnx_export = OnnxExport(export_path.with_suffix(".onnx"), weights="ema" if ema is not None else "last",
                                 on_error="warn")
        callbacks.append(onnx_export)
    ckpt = ModelCheckpoint(dirpath=stage_dir / "checkpoints", every_n_train_steps=checkpoint_every, save_last=True,
                           save_top_k=0) if not smoke else None
    if ckpt is not None:
        callbacks.append(ckpt)
    max_steps = -1
    if max_batches is not None:
        max_steps = max_batches if module.method != "dmd2" \
            else dmd2_optimizer_steps(max_batches, module.critic_ratio, module.critic_warmup)
    dist = distributed or {"accelerator": "cpu", "devices": 1}
    trainer = L.Trainer(**dist, max_steps=max_steps, max_time=timedelta(seconds=budget_s),
                        callbacks=callbacks, logger=CSVLogger(stage_dir, name="logs") if not smoke else False,
                        enable_checkpointing=ckpt is not None, enable_progress_bar=progress,
                        enable_model_summary=False, num_sanity_val_steps=0, plugins=[SafeCheckpointIO()])
    last = stage_dir / "checkpoints" / "last.ckpt"
    t0 = time.perf_counter()
    trainer.fit(module, ckpt_path=str(last) if (ckpt is not None and last.exists()) else None)
    quality = next((cb.history[-1] for cb in callbacks if isinstance(cb, QualityEval) and cb.history), None)
    return {"method": module.method, "batches": module.batches_seen, "counters": module.counters(),
            "fit_seconds": round(time.perf_counter() - t0, 2), "step_seconds_median": round(timer.median(), 4),
            "files": [str(p) for p in (export.written if export else [])]
            + ([str(onnx_export.path)] if onnx_export is not None and onnx_export.path.exists() else []),
            "quality": quality}


def dmd2_recipe(init: str = "reflow", generator_timestep: int | None = None, gan: bool = True) -> dict[str, Any]:
    """Keyword arguments of ``DMD2Distillation`` for the one-step digits student (besides teacher, shape, data).

    Measured causes of the collapsed first recipe (issue 13) and what replaces them:

    - input pure noise labelled ``t = 999`` with the teacher as the initial generator: the teacher returns nearly
      the class mean there, for every noise -> start from the reflow student (``init="reflow"``, a one-step map at
      ``t = 999`` that already spreads noise over each class: FD 0.98, recall 0.76 before any DMD update), or
      from the teacher with the input labelled ``t = 399`` (DMD2's one-step SDXL; the default for
      ``init="teacher"``). The reflow student relabelled to ``t = 399`` starts off its training input (FD 3.7)
      and was behind after 20 generator updates (FD 1.98 vs 0.65 at ``t = 999``);
    - optimiser: betas (0, 0.99), critic lr 5x, no weight decay, clip 1 -> DMD2's AdamW (0.9, 0.999), weight
      decay 0.01, equal learning rates, linear warm-up, clip 10;
    - fake score only on t in [0.02, 0.98] -> the full range;
    - GAN head at chance: mean-pooled middle-block tokens at every noise level, weight 3e-3 on a DMD loss averaged
      over 256 pixels (DMD2's 3e-3 is relative to 12,288) -> a spatial head at low noise levels with weights
      scaled to the pixel count. The first spatial head (noise t in [0, 0.3], head at the critic's rate 2e-5,
      discriminator weight 0.1) still sat near chance (loss 1.39 -> 1.35 over 800 batches): the discriminator
      now sees t in [0, 0.1], its head learns at 2e-4 and its loss has weight 1 in the critic's objective
      (with the shipped generator frozen: loss 1.24 / accuracy 0.68 after 75 critic steps against 1.34 / 0.61
      before; in training it reaches about 0.6 / 0.85 within 50 generator updates). The generator's GAN weight is
      DMD2's 3e-3 x 12,288 / 256 = 0.15.

    The previous shipped one-step student had two stages: 160 generator updates (800 batches of 32) of the earlier GAN
    settings (``gan_weight=0.05, gan_critic_weight=0.1, gan_t_range=(0, 0.3)``, head at 2e-5), then 40 updates of
    this recipe from that checkpoint (generator, critic and head; fresh optimizers) with an EMA of the generator
    (decay 0.99), which shipped. Past about 40 updates of the learning discriminator (accuracy > 0.9) the
    generator degrades, with generator GAN weight 0.15 and 0.05 alike (EMA curve FD 0.87 / 1.09 after 60 updates
    against 0.46 / 0.51 after 40): stop there, or suspect the discriminator's weight 1 on the critic's trunk next
    (DMD2 weighs it 1e-2 against the fake-score loss; now the default, below). What else was measured from the
    160-update point (issue 13, 360 samples; ``benchmarks/dmd2_student.py``): learning rate 1e-4 (5x)
    with an EMA of the generator over-spreads each class (diversity 1.05-1.09 of the real digits', precision
    0.69-0.76, recall 0.80-0.83) and its FD is worse (0.62-0.79 on seeds 0-3 after 20 more updates vs
    0.63-0.66); averaging the generator with its 120-update self (a crude EMA) is worse too (0.69-0.75). The EMA
    does help at the higher rate (curve FD 0.60 vs 0.66 live after 20 updates).

    The shipped one-step student (issue 13, since the reflow student was retrained) starts from the reflow student
    (as the generator at ``t = 999``: curve FD 0.381, recall 0.884 on the curve's noise batch; seeds 0-3 of
    ``benchmarks/students_seeds.py``: FD 0.390 / 0.454 / 0.413 / 0.395): about 150 critic steps on the frozen
    generator first (there ``--set critic_ratio=100000``, then ``--from-ckpt``; here ``critic_warmup``,
    ``DMD2_CRITIC_WARMUP``), then 50 generator updates of this recipe with discriminator
    weight 1e-2 on the critic trunk (DMD2's guidance_cls_loss_weight; the head stays near chance, accuracy 0.5-0.8),
    EMA 0.99: FD 0.381 / 0.419 / 0.391 / 0.386, recall 0.86 / 0.86 / 0.81 / 0.83, accuracy >= 0.989 (the teacher's
    50-step FD is 0.373 at seed 0), better than its init on all four seeds by 0.01-0.035, precision up (0.77-0.80
    vs 0.69-0.77), recall down (0.81-0.86 vs 0.87-0.91). Training is not stable (all curves at seed 0, EMA):
    every variant first gets worse, to a peak at 30-35 updates (FD 0.61-0.74), and recovers by 45-50 (0.34-0.39);
    the live generator of the shipped run then diverges again (FD 0.40 / 0.63 / 0.94 / 1.03 at 50 / 55 / 60 / 64,
    EMA 0.337 / 0.372 / 0.468 / 0.567), so the 50-update EMA snapshot is an early stop. Without the critic pre-fit
    (weight 1e-2 alone) the EMA curve reached 0.388 at 50 updates; DMD's regression loss on teacher ODE pairs
    (``regression_weight``, 4,096 8-step DPM-Solver++(2M) CFG 1.25 pairs) at weight 1 changed nothing, at weight 10
    it damps the swing (EMA 0.376-0.418 over 20-45 updates; the 40-update snapshot FD 0.389 / 0.467 / 0.406 / 0.386
    on seeds 0-3, no better than its init). All curves: ``benchmarks/results/dmd2_reflow_init_trials.json``.
    """
    if init not in ("reflow", "teacher"):
        raise ValueError(f"init must be 'reflow' or 'teacher', got {init!r}")
    if generator_timestep is None:
        generator_timestep = 999 if init == "reflow" else 399
    if not 0 < int(generator_timestep) <= 999:
        raise ValueError(f"generator_timestep must be in 1..999, got {generator_timestep}")
    kw: dict[str, Any] = {
        "guidance_scale": CFG, "generator_timesteps": [int(generator_timestep)], "critic_ratio": 5,
        "lr": 2e-5, "critic_lr": 2e-5, "betas": (0.9, 0.999), "weight_decay": 0.01, "grad_clip": 10.0,
        "warmup_steps": 50, "t_range": (0.02, 0.98), "critic_t_range": (0.0, 1.0),
        "gan_weight": 0.0, "gan_critic_weight": 0.0,
    }
    if gan:
        kw.update(gan_weight=0.15, gan_critic_weight=0.01, gan_t_range=(0.0, 0.1), head="spatial", head_lr=2e-4)
    if init == "reflow":  # the critic pre-fit of the shipped student (measured from the reflow student only)
        kw["critic_warmup"] = DMD2_CRITIC_WARMUP
    return kw


def dmd2_initial_student(init: str = "reflow", weights_dir: str | Path | None = None):
    """The generator DMD2 starts from: ``"teacher"`` (a copy, the module's default) or the shipped reflow
    student (trainable)."""
    if init == "teacher":
        return "copy"
    from ..core.models.embedded import WEIGHTS_DIR
    from ..core.models.students import load_student

    student, _ = load_student(Path(weights_dir or WEIGHTS_DIR) / SHIPPED["reflow"][0])
    return student.requires_grad_(True)


def _trajectories(teacher, out: Path, name: str, num: int, guidance, steps: int, progress: bool) -> Path:
    from ..core.trajectories import generate_trajectories

    return generate_trajectories(teacher, out / name, num_samples=num, sample_shape=SHAPE, guidance=guidance,
                                 sampler="dpmpp_2m", steps=steps, schedule="karras", shard_size=512, batch_size=256,
                                 seed=1234, progress=progress)


def _cap(max_batches: int | None, recipe: int) -> int:
    """A stage's batches when ``--max-batches`` also caps the other stages of the method: at most the recipe's."""
    return recipe if max_batches is None else min(int(max_batches), recipe)


def _or_default(max_batches: int | None, recipe: int) -> int:
    """A one-stage method's batches: ``--max-batches`` when given (smoke runs set it), else the recipe's."""
    return recipe if max_batches is None else int(max_batches)


def _last_segment_module(teacher, student_path: Path, stage_dir: Path, num_pairs: int | None, smoke: bool,
                         common: dict[str, Any]):
    """The last-segment stage of the consistency student at ``student_path``: its pairs (``LAST_SEGMENT``, or
    ``num_pairs``) made once into ``<stage_dir>/pairs`` from a copy of the student kept as ``<stage_dir>/init``
    (a resumed run fine-tunes and pairs the same student even if the stage before it trained on), and the module."""
    import shutil

    from ..core.consistency_pairs import load_pairs, make_pairs
    from ..core.losses.consistency import consistency_grid
    from ..core.models.students import load_student
    from .consistency_last_segment import ConsistencyLastSegment

    stage_dir.mkdir(parents=True, exist_ok=True)
    init = stage_dir / "init.safetensors"
    if not init.exists():
        from ..core.io import atomic_path

        for src, dst in ((student_path, init), (student_path.with_suffix(".json"), init.with_suffix(".json"))):
            with atomic_path(dst) as tmp:
                shutil.copyfile(src, tmp)
    student, meta = load_student(init)
    sigmas = torch.as_tensor(meta["sigmas"], dtype=torch.float32)
    recipe = LAST_SEGMENT[len(sigmas) - 1]
    n = num_pairs or recipe["pairs"]
    n = min(n, 16) if smoke else n
    size = min(n, 256)
    cfg = float(meta.get("guidance_scale") or CFG)
    files = make_pairs(stage_dir / "pairs", student.eval(), teacher, sigmas, consistency_grid(student.model_sampling),
                       n, cfg, recipe["skip"], size=size, log=None)
    pairs = load_pairs(stage_dir / "pairs", len(files))
    stage = {"teacher_steps": "dpmpp_2m", "teacher_skip": recipe["skip"], "teacher_cfg": cfg,
             "init_counters": meta.get("counters")}
    return ConsistencyLastSegment(teacher, SHAPE, student, pairs, sigmas, keep_weight=recipe["keep_weight"],
                                  keep_batch=recipe["keep_batch"], guidance_scale=cfg, stage=stage, lr=recipe["lr"],
                                  **common)


def train_student(method: str, out: str | Path = "fewstep-students", export_dir: str | Path | None = None,
                  budget: float = 900.0, max_batches: int | None = None, batch_size: int = 32,
                  threads: int | None = None, seed: int = 0, checkpoint_every: int = 100,
                  eval_every: int | None = 500, trajectories: int | None = None, smoke: bool = False,
                  progress: bool = True, teacher_path: str | Path | None = None, onnx: bool = False,
                  overwrite: bool = False, distributed: dict[str, Any] | None = None,
                  pairs: int | None = None) -> dict[str, Any]:
    """Train (or resume) one shipped student of the embedded teacher; returns a summary dict (also written to
    ``<out>/<method>/summary.json``).

    Args:
        method: ``dmd2``, ``consistency``, ``reflow`` or ``agd``.
        out: working folder (checkpoints, logs, grids, trajectories).
        export_dir: where the students are exported (default: ``<out>/<method>/export``; never the package).
        budget: CPU seconds for the whole method (trajectory generation + all stages).
        max_batches: cap on batches per stage; the time budget still applies (default: none, except ``agd``:
            ``AGD_BATCHES``, the shipped adapter's 900, and ``dmd2``: 400, the shipped student's 150 critic-only
            batches + 50 generator updates; the consistency last-segment stages keep their ``LAST_SEGMENT`` cap).
        batch_size, threads, seed: training batch, torch threads, seed.
        trajectories: number of teacher trajectories for reflow / AGD (default: ``TRAJECTORIES``, 4096 for reflow,
            2048 for AGD: the shipped students' data).
        smoke: a few batches, small trajectories, no checkpoints / evaluation, exports into ``out``.
        onnx: also export every student to ONNX (EMA weights, next to its safetensors; ``fewstep run-onnx``).
        overwrite: replace existing students in an explicit ``export_dir`` (else ``FileExistsError`` up front).
        distributed: ``lightning.Trainer`` options from ``callbacks.distributed.trainer_options`` (strategy,
            devices, nodes, precision, accelerator); default one CPU process. Under FSDP2 the sample grids, quality
            evaluation and ONNX export are skipped (they run on rank 0 alone); checkpoints are sharded folders.
        pairs: teacher pairs of each consistency last-segment stage (default ``LAST_SEGMENT``: 3072 / 2048).
    """
    if trajectories is None:
        trajectories = TRAJECTORIES.get(method, 4096)
    _check_arguments(method, budget, max_batches, batch_size, checkpoint_every, eval_every, trajectories)
    if pairs is not None:
        from ..core.checks import check_positive_int

        check_positive_int("pairs", pairs)
    out = Path(out) / method
    export_dir = _export_dir(method, out, export_dir, overwrite, onnx)
    from ..core.io import output_lock

    with output_lock(out, "train-student"):
        return _train_student(method, out, export_dir, budget, max_batches, batch_size, threads, seed,
                              checkpoint_every, eval_every, trajectories, smoke, progress, teacher_path, onnx,
                              distributed, pairs)


def _check_arguments(method: str, budget: float, max_batches: int | None, batch_size: int, checkpoint_every: int,
                     eval_every: int | None, trajectories: int) -> None:
    """Every argument of ``train_student`` checked before any work (names the value and the allowed range)."""
    import math

    from ..core.checks import check_positive_int

    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
    if not isinstance(budget, (int, float)) or not math.isfinite(budget) or budget <= 0:
        raise ValueError(f"budget must be a finite number of seconds > 0, got {budget!r}")
    for name, v in (("batch_size", batch_size), ("checkpoint_every", checkpoint_every),
                    ("trajectories", trajectories)):
        check_positive_int(name, v)
    for name, v in (("max_batches", max_batches), ("eval_every", eval_every)):
        if v is not None:
            check_positive_int(name, v)


def _export_dir(method: str, out: Path, export_dir: str | Path | None, overwrite: bool, onnx: bool) -> Path:
    """The export folder: ``<out>/export`` by default (the run's own folder: resuming replaces its files), else the
    user's folder, where existing students are replaced only with ``overwrite``; never the package's weights."""
    from ..core.io import check_new_file, check_not_shipped, check_writable_dir

    if export_dir is None:
        return check_writable_dir(out / "export")
    d = check_writable_dir(check_not_shipped(export_dir))
    for name in SHIPPED[method]:
        check_new_file(d / name, overwrite)
        if onnx:
            check_new_file((d / name).with_suffix(".onnx"), overwrite)
    return d


def _train_student(method: str, out: Path, export_dir: Path, budget: float, max_batches: int | None,
                   batch_size: int, threads: int | None, seed: int, checkpoint_every: int, eval_every: int | None,
                   trajectories: int, smoke: bool, progress: bool, teacher_path: str | Path | None,
                   onnx: bool, distributed: dict[str, Any] | None, last_pairs: int | None = None) -> dict[str, Any]:
    _quiet()
    if threads:
        torch.set_num_threads(int(threads))
    from ..core.models.digits import load_digits_tensors
    from ..core.models.embedded import load_teacher
    from ..core.models.students import load_student
    from . import ConsistencyDistillation, DMD2Distillation, GuidanceAdapterDistillation, ReflowDistillation

    if smoke:
        max_batches = max_batches or 6
        trajectories = min(trajectories, 64)
        checkpoint_every, eval_every = 10**9, None
    t_start = time.perf_counter()

    def left() -> float:
        return max(1.0, budget - (time.perf_counter() - t_start))

    teacher = load_teacher(teacher_path) if teacher_path else load_teacher()
    common = {"batch_size": batch_size, "seed": seed}
    stages: list[dict[str, Any]] = []
    fit = {"checkpoint_every": checkpoint_every, "eval_every": eval_every, "progress": progress, "smoke": smoke,
           "max_batches": max_batches, "onnx": onnx, "distributed": distributed}
    x, y = load_digits_tensors("train")
    if method == "dmd2":
        recipe = dmd2_recipe("reflow")
        if smoke:
            recipe["critic_warmup"] = 2
        # the shipped student's stage: critic warm-up, then DMD2_GENERATOR_UPDATES generator updates, EMA 0.99
        cap = recipe["critic_warmup"] + recipe["critic_ratio"] * DMD2_GENERATOR_UPDATES
        module = DMD2Distillation(teacher, SHAPE, student=dmd2_initial_student("reflow"), real_data=x, real_labels=y,
                                  **recipe, **common)
        stages.append(_fit(module, out / "stage1", left(), export_path=export_dir / SHIPPED["dmd2"][0], ema=DMD2_EMA,
                           **{**fit, "max_batches": _or_default(max_batches, cap)}))
    elif method == "consistency":
        m4 = ConsistencyDistillation(teacher, SHAPE, x, real_labels=y, guidance=CFG, segments=4, num_grid=48,
                                     skip=1, lr=5e-5, **common)
        p4 = export_dir / SHIPPED["consistency"][0]
        # (ONNX twins are exported after the last-segment stages, which replace these students)
        stages.append(_fit(m4, out / "stage1_4seg", left() / 2, export_path=p4, **{**fit, "onnx": False}))
        t_pairs = time.perf_counter()
        m4_last = _last_segment_module(teacher, p4, out / "stage1b_4seg_last", last_pairs, smoke, common)
        budget += time.perf_counter() - t_pairs
        stages.append(_fit(m4_last, out / "stage1b_4seg_last", left() / 3, export_path=p4, ema=None,
                           **{**fit, "max_batches": _cap(max_batches, LAST_SEGMENT[4]["batches"])}))
        student4, _ = load_student(p4)
        m2 = ConsistencyDistillation(teacher, SHAPE, x, real_labels=y, guidance=CFG, segments=2, num_grid=48,
                                     skip=1, lr=2e-5, student=student4.requires_grad_(True), **common)
        p2 = export_dir / SHIPPED["consistency"][1]
        stages.append(_fit(m2, out / "stage2_2seg", left() / 2, export_path=p2, **{**fit, "onnx": False}))
        t_pairs = time.perf_counter()
        m2_last = _last_segment_module(teacher, p2, out / "stage2b_2seg_last", last_pairs, smoke, common)
        budget += time.perf_counter() - t_pairs
        stages.append(_fit(m2_last, out / "stage2b_2seg_last", left(), export_path=p2, ema=None,
                           **{**fit, "max_batches": _cap(max_batches, LAST_SEGMENT[2]["batches"])}))
    elif method == "reflow":
        # issue 13: pairs at the benchmark's CFG 1.25 and 8 solver steps (teacher FD 0.342 vs 0.345 at 16 steps,
        # demo_students.json), made once outside the training budget (their time is added back); the one-step stage,
        # where a one-step student's quality is decided, gets two thirds of the budget and the pseudo-Huber loss
        t_traj = time.perf_counter()
        traj = _trajectories(teacher, out, "trajectories_cfg1.25_8steps", trajectories, CFG, REFLOW_STEPS, progress)
        budget += time.perf_counter() - t_traj
        m = ReflowDistillation(teacher, SHAPE, traj, time_sampling="u_shaped", lr=5e-5, **common)
        tmp = out / "stage1_reflow" / "student_reflow.safetensors"
        stages.append(_fit(m, out / "stage1_reflow", left() / 3, export_path=tmp, **fit))
        student, _ = load_student(tmp)
        m1 = ReflowDistillation(teacher, SHAPE, traj, time_sampling="one_step", loss="huber", lr=3e-5,
                                student=student.requires_grad_(True), **common)
        stages.append(_fit(m1, out / "stage2_onestep", left(), export_path=export_dir / SHIPPED["reflow"][0], **fit))
    else:
        # issue 13: trajectories at the 8 steps the adapter is used at, made once outside the training budget (their
        # time is added back), the loss weighted by 1 / (w - 1)^2 so large scales do not dominate and by
        # 1 / mean((cond - uncond)^2) so low-noise steps count as much, the adapter also on the adaLN modulation
        # (AGD_TARGETS); 900 batches unless --max-batches says otherwise
        t_traj = time.perf_counter()
        traj = _trajectories(teacher, out, "trajectories_cfg1-4_8steps", trajectories, AGD_RANGE, AGD_STEPS,
                             progress)
        budget += time.perf_counter() - t_traj
        m = GuidanceAdapterDistillation(teacher, SHAPE, traj, rank=AGD_RANK, targets=AGD_TARGETS, embed_dim=32,
                                        hidden=32, eval_guidance=CFG, lr=1e-3, scale_weighting="inverse_square",
                                        scale_weight_floor=0.1, delta_weighting=AGD_DELTA_WEIGHTING, **common)
        stages.append(_fit(m, out / "stage1_agd", left(), export_path=export_dir / SHIPPED["agd"][0],
                           **{**fit, "max_batches": _or_default(max_batches, AGD_BATCHES)}))
    summary = {"method": method, "budget_seconds": budget, "seconds": round(time.perf_counter() - t_start, 1),
               "threads": torch.get_num_threads(), "smoke": smoke, "stages": stages}
    if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_rank():
        return summary  # several processes: rank 0 writes the summary
    from ..core.io import write_json

    write_json(out / "summary.json", summary, default=str)
    return summary


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The ``train-student`` arguments (shared by this module's CLI and ``fewstep train-student``)."""
    p.add_argument("method", choices=METHODS)
    p.add_argument("--budget", type=positive_float, default=900.0,
                   help="CPU seconds for the whole method (default 900)")
    p.add_argument("--out", default="fewstep-students", help="working folder (checkpoints, logs, trajectories)")
    p.add_argument("--export-dir", default=None,
                   help="where students are written (default: <out>/<method>/export; never the package)")
    p.add_argument("--overwrite", action="store_true", help="replace existing students in --export-dir")
    p.add_argument("--batch-size", type=positive_int, default=32)
    p.add_argument("--max-batches", type=positive_int, default=None,
                   help="cap on batches per stage (default: none; agd 900, dmd2 400, as the shipped students)")
    p.add_argument("--threads", type=positive_int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--seed", type=nonneg_int, default=0)
    p.add_argument("--checkpoint-every", type=positive_int, default=100, help="batches between checkpoints")
    p.add_argument("--eval-every", type=positive_int, default=500, help="batches between quality evaluations")
    p.add_argument("--trajectories", type=positive_int, default=None,
                   help="teacher trajectories (default: reflow 4096, agd 2048, as the shipped students)")
    p.add_argument("--pairs", type=positive_int, default=None,
                   help="teacher pairs of each consistency last-segment stage (default 3072 for 4 steps, 2048 for 2)")
    p.add_argument("--teacher", default=None, help="teacher weights (default: the shipped teacher)")
    p.add_argument("--smoke", action="store_true", help="a few batches only, exports into --out")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--onnx", action="store_true", help="also export each student to ONNX (EMA weights)")
    add_distributed_arguments(p)
    return p


def add_distributed_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """``--strategy --devices --num-nodes --precision --accelerator`` (Lightning's own launchers: see README)."""
    from .distributed import ACCELERATORS, PRECISIONS, STRATEGIES

    g = p.add_argument_group("distribution (Lightning starts or joins the processes; torchrun / SLURM work as is)")
    g.add_argument("--strategy", default="auto", choices=STRATEGIES,
                   help="auto (one process), ddp, or fsdp2 (teacher/student/critic sharded, sharded checkpoints)")
    g.add_argument("--devices", default="1", help="processes per node: an integer or 'auto' (default 1)")
    g.add_argument("--num-nodes", type=int, default=1, help="machines (default 1)")
    g.add_argument("--precision", default="32-true", choices=PRECISIONS,
                   help="32-true (default) or e.g. bf16-mixed (bf16 autocast, fp32 master weights)")
    g.add_argument("--accelerator", default="cpu", choices=ACCELERATORS, help="default cpu")
    return p


def distributed_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """Validated ``lightning.Trainer`` options from the ``add_distributed_arguments`` flags."""
    from .distributed import trainer_options

    return trainer_options(args.strategy, args.devices, args.num_nodes, args.precision, args.accelerator,
                           args.batch_size)


def run_from_args(args: argparse.Namespace) -> int:
    s = train_student(args.method, out=args.out, export_dir=args.export_dir, budget=args.budget,
                      max_batches=args.max_batches, batch_size=args.batch_size, threads=args.threads, seed=args.seed,
                      checkpoint_every=args.checkpoint_every, eval_every=args.eval_every,
                      trajectories=args.trajectories, smoke=args.smoke, progress=not args.no_progress,
                      teacher_path=args.teacher, onnx=args.onnx, overwrite=args.overwrite,
                      distributed=distributed_from_args(args), pairs=args.pairs)
    for st in s["stages"]:
        q = st.get("quality") or {}
        extra = f", FD {q['fd']:.2f}, accuracy {q['accuracy']:.3f}" if q else ""
        print(f"{s['method']}: {st['batches']} batches in {st['fit_seconds']:.0f} s "
              f"({st['step_seconds_median'] * 1000:.0f} ms/batch){extra} -> {', '.join(st['files'])}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = add_arguments(argparse.ArgumentParser(prog="fewstep train-student", description=__doc__.split("\n\n")[0]))
    return run_from_args(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
