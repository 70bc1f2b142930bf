"""The embedded benchmark end to end: teacher loads offline, samples are scored, the demo writes its report."""

import json
import subprocess
import sys

import pytest
import torch

from fewstep.core.evaluate import CountingDenoiser, Setting, balanced_labels, generate, run_settings
from fewstep.core.models.embedded import TEACHER_FILE, WEIGHTS_DIR, class_labels, load_teacher

HAVE_TEACHER = (WEIGHTS_DIR / TEACHER_FILE).exists()
needs_teacher = pytest.mark.skipif(not HAVE_TEACHER, reason="teacher weights not trained yet")


@needs_teacher
def test_teacher_loads_offline_and_is_deterministic():
    t = load_teacher()
    assert t.model_sampling.prediction == "v"
    assert sum(p.numel() for p in t.parameters()) > 100_000
    labels = balanced_labels(1)
    a = generate(t, Setting("x", "dpmpp_2m", 4, cfg=2.0), labels, seed=3)
    b = generate(t, Setting("x", "dpmpp_2m", 4, cfg=2.0), labels, seed=3)
    assert a.shape == (10, 1, 16, 16) and torch.equal(a, b)
    assert a.min() >= -1 and a.max() <= 1


@needs_teacher
def test_nfe_is_counted_per_sample_with_cfg():
    t = load_teacher()
    counter = CountingDenoiser(t)
    labels = balanced_labels(1)
    generate(t, Setting("x", "euler", 3, cfg=2.0), labels, counter=counter)
    assert counter.sample_evals == 3 * 2 * len(labels)  # CFG: cond + uncond per step
    counter.sample_evals = 0
    generate(t, Setting("x", "euler", 3, cfg=1.0), labels, counter=counter)
    assert counter.sample_evals == 3 * len(labels)


@needs_teacher
@pytest.mark.slow
def test_teacher_beats_noise_and_few_steps_lose_quality():
    t = load_teacher()
    rows, _ = run_settings(t, [Setting("32", "dpmpp_2m", 32, cfg=2.0), Setting("1", "dpmpp_2m", 1, cfg=2.0)],
                           per_class=10, progress=False)
    good, one = rows
    assert good["accuracy"] >= 0.8
    assert good["fd"] < one["fd"]


def test_class_label_validation():
    with pytest.raises(ValueError, match=r"class labels must be in 0\.\.9"):
        class_labels([3, 11])
    assert class_labels(4, batch=3).tolist() == [4, 4, 4]


def test_demo_missing_weights_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="fewstep train-teacher"):
        load_teacher(tmp_path / "nope.safetensors")


@needs_teacher
@pytest.mark.slow
def test_demo_cli_writes_report(tmp_path):
    out = tmp_path / "report"
    r = subprocess.run([sys.executable, "-m", "fewstep.cli", "demo", "--quick", "--out", str(out)],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "| setting | NFE | speed-up |" in r.stdout
    report = json.loads((out / "report.json").read_text())
    assert report["rows"][0]["speedup"] == 1.0
    assert (out / "quality_vs_nfe.png").stat().st_size > 1000
    assert len(list(out.glob("grid_*.png"))) == len(report["rows"])
    assert (out / "report.md").read_text().startswith("# fewstep demo report")
