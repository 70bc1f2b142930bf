"""``fewstep train-student consistency``: the last-segment stage runs after each segment stage (issue 13), writes
its checkpoint outside the package and resumes from it; ``ConsistencyLastSegment`` trains on
``core.losses.consistency.last_segment_loss``."""

import json

import pytest
import torch

torch.set_num_threads(1)


def test_module_step_is_the_last_segment_loss():
    from fewstep.callbacks.consistency_last_segment import ConsistencyLastSegment
    from fewstep.core.consistency_pairs import make_shard
    from fewstep.core.losses.consistency import consistency_grid, last_segment_loss
    from fewstep.core.models.embedded import WEIGHTS_DIR, load_teacher
    from fewstep.core.models.students import load_student

    teacher = load_teacher()
    student, meta = load_student(WEIGHTS_DIR / "digits_consistency_4step.safetensors")
    sigmas = torch.as_tensor(meta["sigmas"], dtype=torch.float32)
    pairs = make_shard(student, teacher, sigmas, consistency_grid(student.model_sampling), 0, 1.25, 6, size=6)
    m = ConsistencyLastSegment(teacher, (1, 16, 16), student, pairs, sigmas, keep_weight=0.5, keep_batch=3,
                               batch_size=4, guidance_scale=1.25)
    idx, keep = m.batch_indices()
    assert idx.shape == (4,) and keep.shape == (3,) and int(idx.max()) < 6 and int(keep.max()) < 6
    m.batches_seen = 1
    idx1, _ = m.batch_indices()
    assert not torch.equal(idx, idx1) or not torch.equal(keep, m.batch_indices()[1])  # a new batch draws anew
    m.batches_seen = 0
    with torch.no_grad():
        ref, logs = last_segment_loss(student, pairs, sigmas, idx, keep, 0.5)
    assert set(logs) == {"last", "keep0", "keep1", "keep2"}
    m.log_dict = lambda *a, **k: None  # no trainer attached
    with torch.no_grad():
        got = m.training_step(None, 0)
    assert torch.allclose(got, ref, atol=1e-6) and m.batches_seen == 1
    meta_out = m.export_metadata()
    assert meta_out["sigmas"] == pytest.approx(sigmas.tolist()) and meta_out["guidance_scale"] == 1.25
    assert meta_out["last_segment_stage"]["keep_weight"] == 0.5 and meta_out["last_segment_stage"]["pairs"] == 6
    with pytest.raises(ValueError, match="keep_weight"):
        ConsistencyLastSegment(teacher, (1, 16, 16), student, pairs, sigmas, keep_weight=-1.0)
    with pytest.raises(ValueError, match="3-step"):
        ConsistencyLastSegment(teacher, (1, 16, 16), student, pairs, sigmas[1:])


@pytest.mark.slow
def test_cli_runs_the_last_segment_stage_and_resumes(tmp_path):
    from fewstep.cli import main
    from fewstep.core.models.students import load_student

    out = tmp_path / "runs"
    args = ["train-student", "consistency", "--out", str(out), "--checkpoint-every", "1", "--pairs", "8",
            "--budget", "900", "--eval-every", "1000", "--no-progress", "--threads", "1", "--batch-size", "4"]
    assert main([*args, "--max-batches", "2"]) == 0
    stage = out / "consistency" / "stage1b_4seg_last"
    last = stage / "checkpoints" / "last.ckpt"
    assert last.exists() and (stage / "pairs" / "shard_0000.pt").exists() and (stage / "init.safetensors").exists()
    pairs = torch.load(stage / "pairs" / "shard_0000.pt", weights_only=True)
    assert pairs["x"].shape == (4, 8, 1, 16, 16) and pairs["target"].shape == (8, 1, 16, 16)
    state = torch.load(last, map_location="cpu", weights_only=True)
    assert state["fewstep"]["counters"]["batches_seen"] == 2
    export4 = out / "consistency" / "export" / "digits_consistency_4step.safetensors"
    meta = json.loads(export4.with_suffix(".json").read_text())
    assert meta["counters"]["batches_seen"] == 2 and meta["last_segment_stage"]["pairs"] == 8
    tuned, _ = load_student(export4)
    init, _ = load_student(stage / "init.safetensors")
    moved = [not torch.equal(a, b) for a, b in zip(tuned.model.state_dict().values(),
                                                   init.model.state_dict().values(), strict=True)]
    assert any(moved)  # the stage trained the exported 4-step student
    assert (out / "consistency" / "stage2b_2seg_last" / "checkpoints" / "last.ckpt").exists()
    meta2 = json.loads((out / "consistency" / "export" / "digits_consistency_2step.json").read_text())
    assert len(meta2["sigmas"]) == 3 and meta2["last_segment_stage"]["teacher_skip"] == 2
    # resume: the stage continues from its checkpoint (2 -> 3 batches), the pairs are reused, not remade
    mtime = (stage / "pairs" / "shard_0000.pt").stat().st_mtime_ns
    assert main([*args, "--max-batches", "3"]) == 0
    state = torch.load(last, map_location="cpu", weights_only=True)
    assert state["fewstep"]["counters"]["batches_seen"] == 3
    assert (stage / "pairs" / "shard_0000.pt").stat().st_mtime_ns == mtime
    assert json.loads(export4.with_suffix(".json").read_text())["counters"]["batches_seen"] == 3
