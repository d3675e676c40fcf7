"""Small helpers on `nn.Module`s shared by surgery, training, evaluation and the spine."""

from __future__ import annotations

from torch import nn


def count_params(model: nn.Module) -> int:
    """Parameters of `model` (each shared tensor once), including frozen ones; works on the meta device."""
    return sum(p.numel() for p in model.parameters())


def unwrap(model: nn.Module) -> nn.Module:
    """The bare model inside DDP / DeepSpeed / Lightning wrappers (they all expose `.module`)."""
    while isinstance(getattr(model, "module", None), nn.Module):
        model = model.module
    return model
