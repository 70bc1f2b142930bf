"""The embedded benchmark end to end: teacher loads offline, samples are scored, the demo writes its report."""

import json
import subprocess
import sys

import pytest
import torch

from fewstep.core.evaluate import (
    NOISY_SPREAD,
    CountingDenoiser,
    Setting,
    balanced_labels,
    generate,
    markdown_table,
    run_settings,
    timing_note,
)
from fewstep.core.models.embedded import class_labels, load_teacher


def test_teacher_loads_offline_and_is_deterministic():
    t = load_teacher()
    assert t.model_sampling.prediction == "v"
    assert sum(p.numel() for p in t.parameters()) > 100_000
    labels = balanced_labels(1)
    a = generate(t, Setting("x", "dpmpp_2m", 4, cfg=2.0), labels, seed=3)
    b = generate(t, Setting("x", "dpmpp_2m", 4, cfg=2.0), labels, seed=3)
    assert a.shape == (10, 1, 16, 16) and torch.equal(a, b)
    assert a.min() >= -1 and a.max() <= 1


def test_nfe_is_counted_per_sample_with_cfg():
    t = load_teacher()
    counter = CountingDenoiser(t)
    labels = balanced_labels(1)
    generate(t, Setting("x", "euler", 3, cfg=2.0), labels, counter=counter)
    assert counter.sample_evals == 3 * 2 * len(labels)  # CFG: cond + uncond per step
    counter.sample_evals = 0
    generate(t, Setting("x", "euler", 3, cfg=1.0), labels, counter=counter)
    assert counter.sample_evals == 3 * len(labels)


@pytest.mark.slow
def test_teacher_beats_noise_and_few_steps_lose_quality():
    t = load_teacher()
    rows, _ = run_settings(t, [Setting("32", "dpmpp_2m", 32, cfg=2.0), Setting("1", "dpmpp_2m", 1, cfg=2.0)],
                           per_class=10, progress=False)
    good, one = rows
    assert good["accuracy"] >= 0.8
    assert good["fd"] < one["fd"]


def test_speedups_are_medians_of_interleaved_repeats_with_nfe_ratio():
    t = load_teacher()
    settings = [Setting("base", "euler", 6, group="teacher euler"), Setting("fast", "euler", 2, group="teacher euler")]
    rows, images = run_settings(t, settings, per_class=1, progress=False, timing_repeats=3, timing_per_class=1)
    base, fast = rows
    assert set(images) == {"base", "fast"}
    for r in rows:
        assert len(r["seconds_repeats"]) == 3 and all(s > 0 for s in r["seconds_repeats"])
        assert r["seconds"] == pytest.approx(sorted(r["seconds_repeats"])[1], abs=1e-4)  # the median
        assert r["group"] == "teacher euler"
    assert base["speedup"] == 1.0 and base["nfe_ratio"] == 1.0
    assert fast["nfe_ratio"] == pytest.approx(3.0)
    assert fast["speedup"] == pytest.approx(base["seconds"] / fast["seconds"], rel=1e-2)
    assert base["timing_noisy"] == (base["spread"] > NOISY_SPREAD)
    with pytest.raises(ValueError, match="timing_repeats must be >= 1"):
        run_settings(t, settings, per_class=1, progress=False, timing_repeats=0)


def test_timing_note_says_when_noisy_and_table_shows_nfe_ratio():
    row = {"setting": "teacher 50 steps", "nfe": 100, "speedup": 1.0, "nfe_ratio": 1.0, "fd": 1.0, "accuracy": 0.9,
           "precision": 0.5, "recall": 0.5, "seconds_repeats": [1.0, 1.3, 1.1], "spread": 0.27, "timing_noisy": True}
    note = timing_note([row])
    assert "3 interleaved runs" in note and "noisy" in note and "27%" in note
    assert "noisy" not in timing_note([{**row, "timing_noisy": False, "spread": 0.02}])
    table = markdown_table([row, {**row, "setting": "student", "nfe": 4, "speedup": 7.5, "nfe_ratio": 25.0}])
    assert "| setting | NFE | speed-up | NFE ratio |" in table and "| 7.50x | 25.00x |" in table


def test_demo_chart_labels_name_each_student_and_setting():
    from fewstep.demo import demo_settings

    settings = demo_settings(quick=False)
    students = [s for s in settings if s.denoiser is not None and s.name.startswith("student")]
    assert students, "the shipped students are part of the demo"
    for s in students:
        assert s.label.startswith("student ") and s.sampler in s.label and "cfg" in s.label, s.label
    single = [s.label for s in settings if s.group is None]
    assert len(single) == len(set(single)), single  # every point that is not on a line has its own label
    assert all("cfg" in s.label for s in settings)


def test_class_label_validation():
    with pytest.raises(ValueError, match=r"class labels must be in 0\.\.9"):
        class_labels([3, 11])
    assert class_labels(4, batch=3).tolist() == [4, 4, 4]


def test_demo_missing_weights_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="fewstep train-teacher"):
        load_teacher(tmp_path / "nope.safetensors")


@pytest.mark.slow
def test_demo_cli_writes_report(tmp_path):
    out = tmp_path / "report"
    r = subprocess.run([sys.executable, "-m", "fewstep.cli", "demo", "--quick", "--out", str(out)],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "| setting | NFE | speed-up |" in r.stdout
    report = json.loads((out / "report.json").read_text())
    assert report["rows"][0]["speedup"] == 1.0
    assert all(len(r["seconds_repeats"]) == 3 and "nfe_ratio" in r for r in report["rows"])
    assert "interleaved runs" in r.stdout
    assert (out / "quality_vs_nfe.png").stat().st_size > 1000
    assert len(list(out.glob("grid_*.png"))) == len(report["rows"])
    assert (out / "report.md").read_text().startswith("# fewstep demo report")
