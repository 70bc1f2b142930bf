"""Careless and hostile inputs (issue 12): every one gets a clear error naming the problem, and no command destroys
a shipped or existing file. One test per defect; the data-loss cases simulate a full disk with a writer that
raises half-way and assert that the old file is intact."""

from __future__ import annotations

import errno
import hashlib
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from fewstep import cli
from fewstep.core import io
from fewstep.core.models.embedded import TEACHER_FILE, WEIGHTS_DIR, load_teacher


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def _disk_full(written: bytes = b"PARTIAL"):
    """A writer that starts writing, then fails as a full disk does."""

    def write(*args, **kwargs):
        cands = list(args) + list(kwargs.values())
        target = next(a for a in cands if isinstance(a, (str, Path)) or hasattr(a, "write"))
        if hasattr(target, "write"):
            target.write(written)
        else:
            Path(target).write_bytes(written)
        raise OSError(errno.ENOSPC, "No space left on device")

    return write


def _cli_error(capsys, argv: list[str]) -> str:
    """Run ``fewstep argv``; it must fail as a user error (argparse exit 2 or return code 2). Returns stderr."""
    try:
        rc = cli.main(argv)
    except SystemExit as e:
        rc = e.code
    assert rc == 2, f"fewstep {' '.join(argv)} returned {rc}"
    return capsys.readouterr().err


# ------------------------------------------------------------------------------------------- shipped files
def test_train_student_never_writes_into_the_package(tmp_path, capsys):
    before = _digest(WEIGHTS_DIR)
    from fewstep.callbacks.train_students import _export_dir

    # the default export folder is the run's own folder under --out, not the package
    assert _export_dir("consistency", tmp_path / "consistency", None, False, False) == \
        (tmp_path / "consistency" / "export").resolve()
    err = _cli_error(capsys, ["train-student", "consistency", "--budget", "60", "--out", str(tmp_path / "ts"),
                              "--export-dir", str(WEIGHTS_DIR)])
    assert "shipped weights folder" in err and str(WEIGHTS_DIR) in err and "--out" in err
    assert _digest(WEIGHTS_DIR) == before


def test_train_teacher_steps_zero_and_the_shipped_teacher(tmp_path, capsys, monkeypatch):
    before = _digest(WEIGHTS_DIR)
    err = _cli_error(capsys, ["train-teacher", "--steps", "0"])
    assert "--steps" in err and "0 is not allowed" in err and ">= 1" in err
    # the default output is a fresh folder in the working directory, never the package
    args = cli.build_parser().parse_args(["train-teacher"])
    assert not Path(args.out).is_absolute() and "fewstep-teacher" in args.out
    err = _cli_error(capsys, ["train-teacher", "--out", str(WEIGHTS_DIR / TEACHER_FILE), "--overwrite"])
    assert "refusing to write" in err and "shipped weights folder" in err
    from fewstep.core.models.train_teacher import train_teacher

    with pytest.raises(ValueError, match="steps must be an integer >= 1, got 0"):
        train_teacher(tmp_path / "t.safetensors", steps=0)
    assert _digest(WEIGHTS_DIR) == before


def test_existing_file_needs_overwrite(tmp_path, capsys):
    out = tmp_path / "t.safetensors"
    out.write_bytes(b"mine")
    err = _cli_error(capsys, ["train-teacher", "--out", str(out), "--steps", "1"])
    assert str(out) in err and "--overwrite" in err
    assert out.read_bytes() == b"mine"
    onnx = tmp_path / "m.onnx"
    onnx.write_bytes(b"old model")
    err = _cli_error(capsys, ["export", "tiny-unet", str(onnx)])
    assert str(onnx) in err and "--overwrite" in err and onnx.read_bytes() == b"old model"
    (tmp_path / "rep").mkdir()
    (tmp_path / "rep" / "report.json").write_text("{}")
    err = _cli_error(capsys, ["demo", "--quick", "--out", str(tmp_path / "rep")])
    assert "already holds a report" in err and "--overwrite" in err


# ------------------------------------------------------------------------------------------- atomic writes
def test_export_on_a_full_disk_keeps_the_old_onnx(tmp_path, capsys, monkeypatch):
    import onnx

    target = tmp_path / "existing.onnx"
    target.write_bytes(b"a good model")
    monkeypatch.setattr(onnx, "save_model", _disk_full())
    err = _cli_error(capsys, ["export", "tiny-unet", str(target), "--overwrite"])
    assert "No space left on device" in err
    assert target.read_bytes() == b"a good model"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing.onnx"]  # no temp file or folder left


@pytest.mark.parametrize("kind", ["bytes", "safetensors", "torch"])
def test_atomic_writers_keep_the_old_file_on_a_full_disk(tmp_path, monkeypatch, kind):
    target = tmp_path / f"f.{kind}"
    target.write_bytes(b"old")
    if kind == "bytes":
        with pytest.raises(OSError, match="No space"), io.atomic_path(target) as tmp:
            tmp.write_bytes(b"new-partial")
            raise OSError(errno.ENOSPC, "No space left on device")
    elif kind == "safetensors":
        import safetensors.torch

        monkeypatch.setattr(safetensors.torch, "save_file", _disk_full())
        with pytest.raises(OSError, match="No space"):
            io.save_safetensors({"w": torch.ones(2)}, target, {"a": 1})
        assert not target.with_suffix(".json").exists()
    else:
        from fewstep.callbacks.checkpoint_io import SafeCheckpointIO

        monkeypatch.setattr(torch, "save", _disk_full())
        with pytest.raises(OSError, match="No space"):
            SafeCheckpointIO().save_checkpoint({"state_dict": {}}, target)
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == [target.name]


def test_truncated_safetensors_names_the_file(tmp_path):
    bad = tmp_path / "teacher.safetensors"
    data = (WEIGHTS_DIR / TEACHER_FILE).read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(io.CorruptFileError, match="truncated or corrupt") as e:
        load_teacher(bad)
    assert str(bad) in str(e.value)
    side = tmp_path / "x.json"
    side.write_text('{"secret": "do-not-echo", ')
    with pytest.raises(io.CorruptFileError, match="not valid JSON") as e:
        io.read_json(side)
    assert str(side) in str(e.value) and "do-not-echo" not in str(e.value)


# ------------------------------------------------------------------------------------------- checkpoints
def test_corrupt_last_checkpoint_resumes_from_the_previous_one(tmp_path):
    sys.path.insert(0, str(Path(__file__).parent))
    import distill_tiny as dt
    from lightning.pytorch.callbacks import ModelCheckpoint

    from fewstep.callbacks import SafeCheckpointIO

    def run(batches: int, resume: bool):
        module = dt.build("reflow", tmp_path / "work")
        ck = ModelCheckpoint(dirpath=tmp_path / "ck", every_n_train_steps=1, save_last=True, save_top_k=0)
        t = dt.trainer(module, batches, callbacks=[ck], enable_checkpointing=True, plugins=[SafeCheckpointIO()])
        t.fit(module, ckpt_path=str(tmp_path / "ck" / "last.ckpt") if resume else None)
        return t

    run(3, resume=False)
    last = tmp_path / "ck" / "last.ckpt"
    prev = io.previous_path(last)
    assert torch.load(prev, weights_only=True)["global_step"] == 2  # the previous good one is kept
    data = last.read_bytes()
    last.write_bytes(data[: len(data) // 3])  # a full disk tore it
    with pytest.warns(UserWarning, match="previous good checkpoint") as rec:
        t = run(4, resume=True)
    msg = " ".join(str(w.message) for w in rec)
    assert str(last) in msg and "truncated or corrupt" in msg
    assert t.global_step == 4 and last.with_name("last.ckpt.corrupt").exists()
    assert torch.load(last, weights_only=True)["global_step"] == 4


def test_corrupt_checkpoint_without_a_previous_one(tmp_path):
    from fewstep.callbacks import SafeCheckpointIO

    bad = tmp_path / "last.ckpt"
    bad.write_bytes(b"PK\x03\x04 torn")
    with pytest.raises(io.CorruptFileError) as e:
        SafeCheckpointIO().load_checkpoint(bad)
    assert str(bad) in str(e.value) and "delete" in str(e.value)


def test_best_checkpoint_is_loaded_without_pickle(tmp_path):
    from fewstep.callbacks.onnx_export import _load_state_dict

    good = tmp_path / "best.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2)}, "global_step": 3}, good)
    assert torch.equal(_load_state_dict(good)["w"], torch.ones(2))
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "obj": _Pickled()}, evil)
    with pytest.raises(io.CorruptFileError, match="evil.ckpt"):
        _load_state_dict(evil)


class _Pickled:
    """Not a tensor: ``torch.load(weights_only=True)`` must refuse it."""


# ------------------------------------------------------------------------------------------- two runs, one folder
def test_second_run_into_one_folder_is_refused(tmp_path, capsys):
    with io.output_lock(tmp_path, "train-student"):
        with pytest.raises(io.OutputLockedError, match=f"pid {os.getpid()}") as e, io.output_lock(tmp_path):
            pass
        assert str(tmp_path) in str(e.value)
    assert not (tmp_path / ".fewstep.lock").exists()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / ".fewstep.lock").write_text(dead.stdout)
    with io.output_lock(tmp_path):
        pass
    assert "stale lock" in capsys.readouterr().out



def test_other_ranks_of_one_launch_share_the_lock(tmp_path, monkeypatch):
    """Lightning / torchrun start the same command once per rank: only rank 0 holds the lock, the others join."""
    for k in ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID"):
        monkeypatch.delenv(k, raising=False)
    with io.output_lock(tmp_path, "train-student"):
        monkeypatch.setenv("LOCAL_RANK", "1")
        with io.output_lock(tmp_path, "train-student"):
            assert (tmp_path / ".fewstep.lock").exists()
        assert (tmp_path / ".fewstep.lock").exists()  # the rank-1 exit leaves rank 0's lock in place
        monkeypatch.setenv("LOCAL_RANK", "0")
        with pytest.raises(io.OutputLockedError):
            with io.output_lock(tmp_path):
                pass

# ------------------------------------------------------------------------------------------- CLI flags
@pytest.mark.parametrize("argv, flag, words", [
    (["export", "teacher", "x.onnx", "--steps", "0"], "--steps", ">= 1"),
    (["export", "teacher", "x.onnx", "--opset", "1"], "--opset", "18"),
    (["export", "teacher", "x.onnx", "--cfg", "nan"], "--cfg", "finite"),
    (["train-student", "consistency", "--budget", "nan"], "--budget", "finite"),
    (["train-student", "consistency", "--budget", "-5"], "--budget", "> 0"),
    (["demo", "--per-class", "-1"], "--per-class", ">= 1"),
    (["run-onnx", "m.onnx", "--nrow", "0"], "--nrow", ">= 1"),
    (["run-onnx", "m.onnx", "--n", "0"], "--n", ">= 1"),
    (["run-onnx", "m.onnx", "--steps", "abc"], "--steps", "not an integer"),
    (["search-schedule", "--nfe", "0"], "--nfe", ">= 1"),
])
def test_bad_flags_are_argparse_errors(capsys, argv, flag, words):
    err = _cli_error(capsys, argv)
    assert f"argument {flag}" in err and words in err


def test_unwritable_output_is_found_before_the_work(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    # the model does not exist either: the output folder is checked first
    err = _cli_error(capsys, ["run-onnx", str(tmp_path / "missing.onnx"), "-o", str(blocker / "sub" / "g.png")])
    assert "cannot write to the output folder" in err and str(blocker / "sub") in err
    err = _cli_error(capsys, ["demo", "--out", str(blocker / "report")])
    assert "cannot write to the output folder" in err


def test_train_student_api_budget_nan():
    from fewstep.callbacks.train_students import train_student

    with pytest.raises(ValueError, match="budget must be a finite number"):
        train_student("dmd2", budget=float("nan"))


# ------------------------------------------------------------------------------------------- torch-path API
@pytest.fixture(scope="module")
def teacher():
    return load_teacher()


def test_class_labels_on_the_torch_path(teacher):
    x, s = torch.randn(4, 1, 16, 16), torch.tensor(5.0)
    with pytest.raises(ValueError, match="got 3 class labels for a batch of 4"):
        teacher(x, s, class_labels=torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match=r"must be in 0..9 \(or 10 = unconditional\), got \[11\]"):
        teacher(x, s, class_labels=torch.tensor([1, 2, 3, 11]))
    with pytest.raises(ValueError, match="integer class ids, got dtype float32"):
        teacher(x, s, class_labels=torch.tensor([1.0, 2.0, 3.0, 4.0]))
    assert teacher(x, s, class_labels=torch.tensor([1, 2, 3, 10])).shape == x.shape


def test_batch_zero_and_fp16_input(teacher):
    with pytest.raises(ValueError, match="B >= 1"):
        teacher(torch.randn(0, 1, 16, 16), 5.0, class_labels=torch.tensor([], dtype=torch.long))
    with pytest.raises(TypeError, match="input x is torch.float16 but the model weights are torch.float32"):
        teacher(torch.randn(2, 1, 16, 16).half(), 5.0, class_labels=torch.tensor([1, 2]))


def test_guidance_scales_against_the_trained_range(teacher):
    from fewstep.core.guidance.adapters import AdaptedDenoiser, GuidanceAdapter, adapter_metadata
    from fewstep.core.guidance.cfg import CFGDenoiser

    with pytest.raises(ValueError, match=r"CFG scale must be a finite number, got \[nan\]"):
        CFGDenoiser(teacher, float("nan"))
    with pytest.warns(UserWarning, match="outside 0..20"):
        CFGDenoiser(teacher, 1e6)
    with pytest.warns(UserWarning, match="outside 0..20"):
        CFGDenoiser(teacher, -3.0)
    path = WEIGHTS_DIR / "digits_agd_adapter.safetensors"
    lo, hi = adapter_metadata(path)["scale_range"]
    base = load_teacher()
    den = AdaptedDenoiser(base, GuidanceAdapter.load(path, base.model))
    x, y = torch.randn(2, 1, 16, 16), torch.tensor([1, 2])
    with pytest.raises(ValueError, match="guidance scale must be a finite number"):
        den(x, 5.0, guidance_scale=float("nan"), class_labels=y)
    with pytest.warns(UserWarning, match=f"outside {lo:g}..{hi:g}, the range this guidance adapter"):
        den(x, 5.0, guidance_scale=1e4, class_labels=y)  # (1e6 overflows fp32 through the adaLN update: NaN guard)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        den(x, 5.0, guidance_scale=(lo + hi) / 2, class_labels=y)


def test_nan_input_is_not_called_fp16_overflow(teacher):
    x = torch.full((2, 1, 16, 16), float("nan"))
    with pytest.raises(FloatingPointError) as e:
        teacher(x, 5.0, class_labels=torch.tensor([1, 2]))
    assert "input x or sigma holds NaN/inf" in str(e.value) and "fp16" not in str(e.value)


def test_onnx_runtime_and_torch_share_one_label_checker():
    from fewstep.core.checks import check_class_labels

    with pytest.raises(ValueError, match="got 2 class labels for a batch of 3"):
        check_class_labels([1, 2], 3, 10, 10)
    with pytest.raises(ValueError, match="integer class ids"):
        check_class_labels([1.5], 1, 10)
    assert check_class_labels(4, 3, 10).tolist() == [4, 4, 4]


# ------------------------------------------------------------------------------------------- ComfyUI paths
@pytest.mark.comfy
def test_comfy_adapter_path_outside_the_model_folders(comfy_root, tmp_path, monkeypatch):
    import folder_paths

    from fewstep.nodes import guidance as g

    inside = tmp_path / "models" / "fewstep_adapters"
    inside.mkdir(parents=True)
    secret = tmp_path / "secret.safetensors"
    secret.write_text("TOP-SECRET")
    monkeypatch.setattr(folder_paths, "get_folder_paths", lambda name: [str(inside)])
    monkeypatch.setattr(folder_paths, "get_full_path", lambda name, f: os.path.join(str(inside), f))
    with pytest.raises(ValueError, match="outside ComfyUI's models/fewstep_adapters") as e:
        g.resolve_adapter("../secret.safetensors")
    assert "TOP-SECRET" not in str(e.value)
