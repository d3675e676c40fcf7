"""Peak memory of one inference call on CPU or CUDA, counted the same way for every method (KOALA's
U-Net step, LoRA-Composer's composed sampling step): the model's weights plus the most memory the call
holds at once.

    .venv/bin/python -m pytest tests/distill/koala/test_evaluation.py -q
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LiveBytes(TorchDispatchMode):
    """Peak bytes of tensor storages alive at once while the mode is active (op granularity).

    CPU has no allocator statistics like `torch.cuda.max_memory_allocated`; this counts every
    storage an op creates until its last reference dies."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.current = self.peak = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for key, (ref, size) in list(self.live.items()):  # first forget freed storages (addresses get reused)
            if ref.expired():
                del self.live[key]
                self.current -= size
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and not t.is_meta:
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if key and key not in self.live:
                    self.live[key] = (StorageWeakRef(storage), storage.nbytes())
                    self.current += storage.nbytes()
        self.peak = max(self.peak, self.current)
        return out


def model_bytes(model: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


@torch.no_grad()
def peak_memory_mb(model: torch.nn.Module, run: Callable[[], Any]) -> float:
    """Peak memory of one inference call of `model` alone: its weights plus the most memory the call
    holds at once beyond what was allocated before it.

    Why a delta on CUDA: `max_memory_allocated` counts everything on the device, and during a job the
    teacher, VAE, text encoders and an EMA copy sit there too; the model's own figure must not depend
    on what else happens to be resident. On CPU, `LiveBytes` counts only storages the call creates."""
    device = next(model.parameters()).device
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        baseline = torch.cuda.memory_allocated(device)
        run()
        torch.cuda.synchronize(device)
        return (model_bytes(model) + torch.cuda.max_memory_allocated(device) - baseline) / 2**20
    with LiveBytes() as counter:
        run()
    return (model_bytes(model) + counter.peak) / 2**20
