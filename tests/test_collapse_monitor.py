"""CollapseMonitor (issue 13): it fires on a deliberately collapsed generator and stays quiet on the teacher."""

import warnings

import pytest
import torch

pytest.importorskip("lightning")

import distill_tiny as tiny  # noqa: E402
import lightning as L  # noqa: E402

torch.set_num_threads(1)
PER_CLASS = 12


@pytest.fixture(scope="module")
def teacher_samples():
    from fewstep.core.evaluate import Setting, balanced_labels, generate
    from fewstep.core.models.embedded import TEACHER_CFG, load_teacher

    labels = balanced_labels(PER_CLASS)
    images = generate(load_teacher(), Setting("teacher", "dpmpp_2m", 8, cfg=TEACHER_CFG), labels, seed=3)
    return images, labels


class Replay(L.LightningModule):
    """A stand-in student whose samples are fixed images (in the monitor's label order)."""

    method = "replay"

    def __init__(self, images):
        super().__init__()
        self.images = images
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.batches_seen = 0

    def generate_samples(self, labels, seed=0):
        assert len(labels) == len(self.images)
        return self.images

    def counters(self):
        return {"batches_seen": self.batches_seen}

    def training_step(self, batch, batch_idx):
        self.batches_seen += 1
        return (self.w**2).sum()

    def train_dataloader(self):
        from fewstep.callbacks import ticker_dataloader

        return ticker_dataloader()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _run(images, tmp_path, **kw):
    from fewstep.callbacks import CollapseMonitor, CollapseWarning

    mon = CollapseMonitor(every_n_steps=2, per_class=PER_CLASS, path=tmp_path / "curve.json", **kw)
    module = Replay(images)
    tr = tiny.trainer(module, 4, callbacks=[mon])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tr.fit(module)
    return mon, module, [w for w in caught if issubclass(w.category, CollapseWarning)]


def test_collapse_reasons_hand_cases():
    from fewstep.callbacks.collapse import collapse_reasons

    ok = {"recall": 0.8, "diversity": 0.9}
    assert collapse_reasons(ok, {}, 0.2, 0.3, 0.5) == []
    assert collapse_reasons(ok, {"recall": 0.85, "diversity": 1.0}, 0.2, 0.3, 0.5) == []
    low = collapse_reasons({"recall": 0.1, "diversity": 0.2}, {}, 0.2, 0.3, 0.5)
    assert len(low) == 2 and "recall 0.100" in low[0]
    drop = collapse_reasons({"recall": 0.35, "diversity": 0.9}, {"recall": 0.8, "diversity": 0.9}, 0.2, 0.3, 0.5)
    assert len(drop) == 1 and "fell from its best 0.800" in drop[0]


def test_monitor_quiet_on_the_teacher(teacher_samples, tmp_path):
    images, _ = teacher_samples
    mon, module, fired = _run(images, tmp_path, stop=True)
    assert fired == [] and mon.fired == []
    assert module.batches_seen == 4  # not stopped
    assert [r["batches"] for r in mon.history] == [0, 2, 4]
    row = mon.history[-1]
    assert row["recall"] > 0.4 and row["diversity"] > 0.6 and row["accuracy"] > 0.9
    assert (tmp_path / "curve.json").exists()


def test_monitor_fires_and_stops_on_a_collapsed_generator(teacher_samples, tmp_path):
    images, labels = teacher_samples
    first = torch.stack([images[labels == c][0] for c in range(10)])
    collapsed = first.repeat_interleave(PER_CLASS, 0)  # one image per class: perfect accuracy, no diversity
    mon, module, fired = _run(collapsed, tmp_path, stop=True)
    assert fired and mon.fired
    assert "recall" in " ".join(mon.fired[0]["reasons"]) and "diversity" in " ".join(mon.fired[0]["reasons"])
    assert module.batches_seen < 4  # stopped
    row = mon.history[0]
    assert row["accuracy"] >= 0.85 and row["recall"] < 0.2 and row["diversity"] < 0.05


def test_monitor_warns_when_diversity_drops_during_training(teacher_samples, tmp_path):
    """Healthy at first, collapsed later: the drop from its best value fires even without stop."""
    from fewstep.callbacks import CollapseMonitor, CollapseWarning

    images, labels = teacher_samples
    first = torch.stack([images[labels == c][0] for c in range(10)]).repeat_interleave(PER_CLASS, 0)
    mon = CollapseMonitor(every_n_steps=1, per_class=PER_CLASS, min_recall=0.0, min_diversity=0.0)
    healthy = mon.measure_samples(images, labels)
    mon.history.append(healthy)
    assert mon.check(healthy) == []
    bad = mon.measure_samples(first, labels)
    mon.history.append(bad)
    with pytest.warns(CollapseWarning, match="fell from its best"):
        assert mon.check(bad)
