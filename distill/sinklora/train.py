"""SinkLoRA training: next-token cross-entropy at the target length through the training attention (SF-Attn by
default), only LoRA, embeddings and norms receiving gradients.

The optimiser follows LongLoRA's fine-tuning (and SinkLoRA's, which reuses it): AdamW with weight decay 0 and a
constant learning rate after a linear warm-up (`constant_with_warmup`). The other methods share
`distill.optim.adamw_with_schedule` (linear decay to 0, `train.weight_decay`, default 0.01); here weight decay is 0
unless the recipe sets `train.weight_decay` itself, and `sinklora.lr_schedule: linear` restores the decay.

    .venv/bin/python -m pytest tests/distill/sinklora/test_sinklora.py -q
"""

from __future__ import annotations

from typing import Literal

import lightning as L
import torch
from torch import nn

from athanor.distill.spec import TrainSpec

LONGLORA_WEIGHT_DECAY = 0.0
"""LongLoRA's fine-tuning weight decay (its `--weight_decay 0.0`), used unless the recipe sets train.weight_decay."""


def stack_chunks(chunks: list[torch.Tensor]) -> torch.Tensor:
    """Equal-length token chunks -> [batch, target_length] (no padding is ever needed)."""
    return torch.stack(chunks)


def weight_decay(train: TrainSpec) -> float:
    """`train.weight_decay` when the recipe sets it, else LongLoRA's 0 (TrainSpec's generic default, 0.01, would
    pull the LoRA weights and the trained norms toward 0, which LongLoRA does not do)."""
    return train.weight_decay if "weight_decay" in train.model_fields_set else LONGLORA_WEIGHT_DECAY


def lr_factor(step: int, warmup: int, total: int, schedule: Literal["constant", "linear"]) -> float:
    """Learning-rate multiplier at optimizer step `step`: linear warm-up over `warmup` steps, then 1 ('constant',
    LongLoRA's constant_with_warmup) or a linear decay reaching 0 at `total` ('linear')."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    return max(0.0, (total - step) / max(total - warmup, 1))


def longlora_optimizer(params: list[nn.Parameter], train: TrainSpec,
                       schedule: Literal["constant", "linear"] = "constant") -> dict:
    """A Lightning `configure_optimizers` dict: AdamW over the trainable `params` (weight decay: `weight_decay`),
    the schedule of `lr_factor` stepped every optimizer step."""
    optimizer = torch.optim.AdamW([p for p in params if p.requires_grad], lr=train.lr, weight_decay=weight_decay(train))
    warmup, total = train.warmup_steps, max(train.max_steps, 1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, warmup, total, schedule))
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class SinkLoRAModule(L.LightningModule):
    """Owns the causal-LM loss and the optimiser (`longlora_optimizer`: AdamW over the trainable parameters, weight
    decay 0 and a constant learning rate after warm-up unless the recipe says otherwise)."""

    def __init__(self, model: nn.Module, train: TrainSpec, gradient_checkpointing: bool = False,
                 lr_schedule: Literal["constant", "linear"] = "constant") -> None:
        super().__init__()
        self.model = model
        self.train_spec = train
        self.lr_schedule = lr_schedule
        if gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        loss = self.model(input_ids=batch, labels=batch, use_cache=False).loss
        self.log("train/loss", loss, prog_bar=True, on_step=True, batch_size=batch.shape[0])
        return loss

    def configure_optimizers(self) -> dict:
        return longlora_optimizer(list(self.model.parameters()), self.train_spec, self.lr_schedule)
