"""The seeded training-loader factory every method hands the spine as `MethodData.train_dataloader`.

A class (not a lambda) so DataLoader worker processes and launched ranks can pickle it; seeded so two
runs of one recipe see the same batches in the same order."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader


class SeededLoader:
    """`loader()` or `loader(batch_size)`: a shuffled DataLoader over `items` with a seeded generator.

    The last partial batch is dropped when there is at least one full batch (equal batch shapes
    across ranks and steps)."""

    def __init__(self, items: Sequence[Any], *, batch_size: int, seed: int, num_workers: int = 0,
                 collate_fn: Callable[[list], Any] | None = None) -> None:
        self.items, self.batch_size, self.seed = items, batch_size, seed
        self.num_workers, self.collate_fn = num_workers, collate_fn

    def __len__(self) -> int:
        return len(self.items)

    def __call__(self, batch_size: int | None = None) -> DataLoader:
        size = batch_size or self.batch_size
        return DataLoader(
            self.items, batch_size=size, shuffle=True, collate_fn=self.collate_fn, num_workers=self.num_workers,
            generator=torch.Generator().manual_seed(self.seed), drop_last=len(self.items) >= size,
        )
