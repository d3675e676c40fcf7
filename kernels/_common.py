"""Shared helpers for the kernel dispatchers: backend checks, dtype rules, power-of-two padding.

Nothing here imports triton or fla, so the PyTorch reference path works where triton is absent.
Tested through `tests/kernels` (`.venv/bin/python -m pytest tests/kernels -q`).
"""

from __future__ import annotations

import importlib.util
import os

import torch
import torch.nn.functional as F

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def fla_available() -> bool:
    """flash-linear-attention (PyPI `fla-core`, import `fla`): Triton kernels, CUDA only."""
    return importlib.util.find_spec("fla") is not None


def triton_interpreting() -> bool:
    """True when TRITON_INTERPRET=1: Triton kernels then run on CPU tensors (tests only)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def check_backend(backend: str, allowed: tuple[str, ...]) -> None:
    if backend not in allowed:
        raise ValueError(f"backend={backend!r}: use one of {allowed}")


def check_triton(device: torch.device) -> None:
    """Raise unless backend='triton' can run on `device`: CUDA, or CPU under the interpreter."""
    if not triton_available():
        raise ValueError("backend='triton' but triton is not installed: use backend='torch'")
    if device.type != "cuda" and not triton_interpreting():
        raise ValueError(
            "backend='triton' needs CUDA tensors, or TRITON_INTERPRET=1 set before triton is "
            "imported (CPU interpreter, for tests)"
        )


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
