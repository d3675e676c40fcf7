"""AdamW with linear warm-up and linear decay, shared by every method's LightningModule."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from athanor.distill.spec import TrainSpec


def adamw_with_schedule(params: Iterable[torch.nn.Parameter], train: TrainSpec) -> dict:
    """Return a Lightning `configure_optimizers` dict stepping the schedule every optimizer step."""
    optimizer = torch.optim.AdamW(
        [p for p in params if p.requires_grad], lr=train.lr, weight_decay=train.weight_decay
    )
    warmup, total = train.warmup_steps, max(train.max_steps, 1)

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(total - warmup, 1))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
