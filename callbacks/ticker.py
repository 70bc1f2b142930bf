"""The train dataloader of every distillation module: an endless ticker (the modules make their own inputs).

A batch is not read from data: each ``training_step`` draws its samples from their global indices
(``DistillationModule.sample_ids``), so the dataloader only has to tick once per step.
"""

from __future__ import annotations

from collections.abc import Iterator

from torch.utils.data import DataLoader, IterableDataset

__all__ = ["ticker_dataloader"]


class _Ticker(IterableDataset):
    """An endless stream of step numbers: distillation modules make their own inputs."""

    def __iter__(self) -> Iterator[int]:
        i = 0
        while True:
            yield i
            i += 1


def ticker_dataloader() -> DataLoader:
    """The train dataloader of every distillation module (batches are made inside the module)."""
    return DataLoader(_Ticker(), batch_size=None, num_workers=0)
