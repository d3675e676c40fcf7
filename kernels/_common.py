"""Shared helpers for the kernel dispatchers: backend choice, dtype rules, power-of-two padding.

Nothing here imports triton, so the PyTorch reference path works where triton is absent.
Tested through `tests/kernels` (`.venv/bin/python -m pytest tests/kernels -q`).
"""

from __future__ import annotations

import importlib.util
import os
from typing import Literal

import torch
import torch.nn.functional as F

Backend = Literal["auto", "triton", "torch"]
BACKENDS = ("auto", "triton", "torch")
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_interpreting() -> bool:
    """True when TRITON_INTERPRET=1: Triton kernels then run on CPU tensors (tests only)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(backend: str, *tensors: torch.Tensor) -> bool:
    """Resolve `backend` to a path: 'auto' picks Triton for CUDA tensors, the reference otherwise."""
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}: use one of {BACKENDS}")
    if backend == "torch":
        return False
    on_cuda = all(t.is_cuda for t in tensors)
    if backend == "auto":
        return on_cuda and triton_available()
    if not triton_available():
        raise ValueError("backend='triton' but triton is not installed: use backend='torch'")
    if not on_cuda and not triton_interpreting():
        raise ValueError(
            "backend='triton' needs CUDA tensors, or TRITON_INTERPRET=1 set before triton is "
            "imported (CPU interpreter, for tests)"
        )
    return True


def check_float(name: str, t: torch.Tensor) -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} has dtype {t.dtype}: use float32, float16 or bfloat16")


def pow2_at_least_16(n: int) -> int:
    """tl.arange needs a power of two and tl.dot needs >= 16 along each dimension."""
    return max(16, 1 << (max(n, 1) - 1).bit_length())


def pad_last(t: torch.Tensor, size: int) -> torch.Tensor:
    """Zero-pad the last dimension to `size` (zeros add nothing to dot products) and make it contiguous."""
    if t.shape[-1] == size:
        return t.contiguous()
    return F.pad(t, (0, size - t.shape[-1])).contiguous()
