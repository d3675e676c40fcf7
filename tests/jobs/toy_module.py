"""The toy method's LightningModule (tests/jobs/toy_method.py), in its own module so that validating a toy
recipe does not import Lightning."""

from __future__ import annotations

import lightning as L
import torch

from athanor.distill.optim import adamw_with_schedule
from athanor.distill.spec import TrainSpec


class ToyModule(L.LightningModule):
    def __init__(self, teacher, student, train: TrainSpec, sleep_s: float, nan_at: int | None = None) -> None:
        super().__init__()
        self.teacher, self.student, self.train_spec, self.sleep_s = teacher, student, train, sleep_s
        self.nan_at = nan_at
        self.teacher.requires_grad_(False)

    def training_step(self, batch, batch_idx):
        import time

        if self.sleep_s:
            time.sleep(self.sleep_s)
        (x,) = batch
        loss = torch.nn.functional.mse_loss(self.student(x), self.teacher(x))
        if self.nan_at is not None and self.global_step >= self.nan_at:
            loss = loss * float("nan")
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self):
        return adamw_with_schedule(self.student.parameters(), self.train_spec)
