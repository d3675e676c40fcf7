"""Shifted sparse attention: S2-Attn (LongLoRA) and SF-Attn (SinkLoRA), one dispatcher each.

Which keys a query token i sees, for query head h of H (the last H//2 heads are "shifted"):

* group of position p: (p + offset_h) // group_size, with offset_h = group_size//2 for shifted heads
  and 0 otherwise. A shifted head's first group is the half group [0, G/2): LongLoRA instead rolls
  the sequence, which wraps the last half group onto the first and lets early tokens see the end
  of the sequence. Here the wrapped group is segmented into its two contiguous pieces — the
  segment-and-reassemble of SinkLoRA — so every head attends within fixed contiguous windows.
* i sees j when they share a group, or (SF-Attn) when j < num_sink (global "sink" tokens);
  with causal=True only j <= i; with attention_mask [batch, tokens] (1 = real) only real keys j.
  A query that sees no key outputs zeros.

`longlora_s2_attention` (= `s2_attention(..., wrap=True)`) is LongLoRA's S2-Attn as published: the
shifted heads' q/k/v are rolled by −G/2 along the tokens, cut into groups, attended group-causally,
and the output rolled back; so their last group joins the sequence's last and first G/2 tokens, with
causality by rolled position (an early token then sees the end of the sequence: the leak SinkLoRA
removes). `s2_attention` without `wrap` is the segmented variant (SinkLoRA's no-sink ablation):
compare that with `sf_attention` to measure the sinks alone, with `longlora_s2_attention` to
reproduce the papers' S2-Attn arm.

K/V may have fewer heads (grouped-query: head h reads K/V head h // (H / kv_heads)). Cost is
O(N·G) on every path. Paths (`backend`):

* 'torch': the PyTorch reference, SDPA per group on reshaped blocks (sinks as a key prefix); the
  truth every other path is tested against, and 'auto' on CPU.
* 'flex': FlexAttention with a cached block mask (`kernels._sparse_flex`), compiled; 'auto' on
  CUDA. On CPU it runs forward only (PyTorch has no CPU backward for FlexAttention).
* 'triton': the hand-written block-sparse kernel (`kernels._sparse_triton`; CUDA, or CPU under
  TRITON_INTERPRET=1), kept to be compared against FlexAttention on a GPU; no wrap-around variant.
Tests: `.venv/bin/python -m pytest tests/kernels/test_sparse_attention.py -q`.
"""

from __future__ import annotations

from typing import Literal

import torch

from athanor.kernels._common import check_backend, check_float, check_triton
from athanor.kernels._sparse_reference import sparse_attention_reference

__all__ = ["longlora_s2_attention", "s2_attention", "sf_attention", "shifted_head_count", "sparse_path"]
SparseBackend = Literal["auto", "flex", "triton", "torch"]
SPARSE_BACKENDS = ("auto", "flex", "triton", "torch")


def shifted_head_count(num_heads: int) -> int:
    """The last `num_heads // 2` query heads use shifted groups (as LongLoRA shifts heads[H//2:])."""
    return num_heads // 2


def s2_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    group_size: int,
    causal: bool = True,
    attention_mask: torch.Tensor | None = None,
    scale: float | None = None,
    wrap: bool = False,
    backend: SparseBackend = "auto",
) -> torch.Tensor:
    """S2-Attn on `[batch, heads, tokens, dim]`: grouped attention, half the heads shifted by G/2,
    without LongLoRA's wrap-around, or with it (`wrap=True`, see the module docstring)."""
    return _shifted_attention(q, k, v, group_size, 0, causal, attention_mask, scale, backend, wrap)


def longlora_s2_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    group_size: int,
    causal: bool = True,
    attention_mask: torch.Tensor | None = None,
    scale: float | None = None,
    backend: SparseBackend = "auto",
) -> torch.Tensor:
    """LongLoRA's S2-Attn on `[batch, heads, tokens, dim]` exactly as published: the last H//2 heads
    rolled by −G/2 with wrap-around, group-causal attention within groups of G, rolled back by +G/2.
    The arm named `s2` in a SinkLoRA recipe, so its figure is comparable with the papers' S2 row."""
    return _shifted_attention(q, k, v, group_size, 0, causal, attention_mask, scale, backend, True)


def sf_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    group_size: int,
    num_sink: int = 4,
    causal: bool = True,
    attention_mask: torch.Tensor | None = None,
    scale: float | None = None,
    backend: SparseBackend = "auto",
) -> torch.Tensor:
    """SF-Attn on `[batch, heads, tokens, dim]`: S2-Attn's segmented shifted groups plus global
    attention to the first `num_sink` tokens."""
    return _shifted_attention(q, k, v, group_size, num_sink, causal, attention_mask, scale, backend, False)


def sparse_path(backend: str, device: torch.device, wrap: bool = False) -> str:
    """Resolve `backend` for tensors on `device` to 'flex', 'triton' or 'torch' ('auto': FlexAttention
    on CUDA, the reference elsewhere), or raise with what to use instead."""
    check_backend(backend, SPARSE_BACKENDS)
    if backend == "auto":
        return "flex" if device.type == "cuda" else "torch"
    if backend == "triton":
        if wrap:
            raise ValueError("backend='triton' has no wrap-around (rolled S2) variant: use 'flex' or 'torch'")
        check_triton(device)
    return backend


def _shifted_attention(q, k, v, group_size, num_sink, causal, attention_mask, scale, backend, wrap) -> torch.Tensor:
    _validate(q, k, v, group_size, num_sink, attention_mask)
    d = q.shape[-1]
    scale = d**-0.5 if scale is None else float(scale)
    keep = None if attention_mask is None else attention_mask.to(device=q.device, dtype=torch.bool)
    path = sparse_path(backend, q.device, wrap)
    if path == "flex":
        from athanor.kernels._sparse_flex import sparse_attention_flex

        return sparse_attention_flex(q, k, v, group_size, num_sink, causal, keep, scale, wrap)
    if path == "triton":
        from athanor.kernels._sparse_triton import sparse_attention_triton

        return sparse_attention_triton(q, k, v, group_size, num_sink, causal, keep, scale)
    return sparse_attention_reference(
        q, k, v, group_size=group_size, num_sink=num_sink, causal=causal, key_keep=keep, scale=scale, wrap=wrap
    )


def _validate(q, k, v, group_size, num_sink, attention_mask) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"{name} has shape {tuple(t.shape)}: expected [batch, heads, tokens, dim]")
        check_float(name, t)
    b, h, n, d = q.shape
    if k.shape != v.shape:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must have the same shape")
    if k.shape[0] != b or k.shape[2] != n or k.shape[3] != d:
        raise ValueError(f"k/v {tuple(k.shape)} must match q {tuple(q.shape)} in batch, tokens and dim")
    if h % k.shape[1] != 0:
        raise ValueError(f"q has {h} heads, k/v {k.shape[1]}: kv heads must divide query heads")
    if not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size={group_size!r}: must be an int >= 1")
    if not isinstance(num_sink, int) or num_sink < 0:
        raise ValueError(f"num_sink={num_sink!r}: must be an int >= 0")
    if attention_mask is not None and tuple(attention_mask.shape) != (b, n):
        raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}: expected ({b}, {n})")
