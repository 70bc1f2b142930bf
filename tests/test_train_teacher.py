"""The teacher trainer is seeded and resumable: an interrupted run equals an uninterrupted one exactly."""

from safetensors.torch import load_file

from fewstep.core.models.train_teacher import lr_at, train_teacher


def test_resume_reproduces_uninterrupted_run(tmp_path):
    a = train_teacher(tmp_path / "a" / "t.safetensors", steps=4, batch_size=4, checkpoint_every=2, progress=False)
    b_path = tmp_path / "b" / "t.safetensors"
    train_teacher(b_path, steps=4, batch_size=4, checkpoint_every=3, progress=False, stop_at=2)  # interrupted
    b = train_teacher(b_path, steps=4, batch_size=4, checkpoint_every=2, progress=False)  # resumes from step 2
    sa, sb = load_file(str(a)), load_file(str(b))
    assert sa.keys() == sb.keys()
    for k in sa:
        assert (sa[k] == sb[k]).all(), k


def test_lr_schedule():
    assert lr_at(0, 100, 1.0, 10) == 0.1
    assert abs(lr_at(10, 100, 1.0, 10) - 1.0) < 1e-9
    assert abs(lr_at(100, 100, 1.0, 10) - 0.1) < 1e-9
