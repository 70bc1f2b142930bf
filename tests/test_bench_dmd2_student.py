"""The DMD2 student driver's resume budget: a resumed invocation gets ``--budget`` seconds of its own."""

from __future__ import annotations

from datetime import timedelta

import pytest
import torch

L = pytest.importorskip("lightning.pytorch")


class _Tiny(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(2))

    def training_step(self, batch, batch_idx):
        return ((self.w - batch) ** 2).sum()

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.zeros(6, 2), batch_size=1)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_elapsed_train_seconds_reads_the_timer_lightning_restores(tmp_path):
    from fewstep.benchmarks.dmd2_student import elapsed_train_seconds

    assert elapsed_train_seconds(tmp_path / "missing.ckpt") == 0.0
    trainer = L.Trainer(accelerator="cpu", max_steps=3, max_time=timedelta(seconds=600), logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(_Tiny())
    ckpt = tmp_path / "last.ckpt"
    trainer.save_checkpoint(ckpt)
    timer = next(c for c in trainer.callbacks if type(c).__name__ == "Timer")
    spent = elapsed_train_seconds(ckpt)
    assert spent > 0.0
    assert spent == pytest.approx(timer.time_elapsed("train"), abs=0.05)
