"""SinkLoRA training: next-token cross-entropy at the target length through the training attention (SF-Attn by
default), only LoRA, embeddings and norms receiving gradients.

    .venv/bin/python -m pytest tests/distill/sinklora/test_sinklora.py -q
"""

from __future__ import annotations

import lightning as L
import torch
from torch import nn

from athanor.distill.optim import adamw_with_schedule
from athanor.distill.spec import TrainSpec


def stack_chunks(chunks: list[torch.Tensor]) -> torch.Tensor:
    """Equal-length token chunks -> [batch, target_length] (no padding is ever needed)."""
    return torch.stack(chunks)


class SinkLoRAModule(L.LightningModule):
    """Owns the causal-LM loss and the optimiser (AdamW over the trainable parameters, linear schedule)."""

    def __init__(self, model: nn.Module, train: TrainSpec, gradient_checkpointing: bool = False) -> None:
        super().__init__()
        self.model = model
        self.train_spec = train
        if gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        loss = self.model(input_ids=batch, labels=batch, use_cache=False).loss
        self.log("train/loss", loss, prog_bar=True, on_step=True, batch_size=batch.shape[0])
        return loss

    def configure_optimizers(self) -> dict:
        return adamw_with_schedule(self.model.parameters(), self.train_spec)
