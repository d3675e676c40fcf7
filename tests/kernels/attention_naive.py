"""Naive dense attention for the kernel tests: an explicit N×N matrix with an explicit mask.

Deliberately independent of `kernels/` (no shared mask helpers), so a mask bug there shows up here.
"""

from __future__ import annotations

import math

import torch


def repeat_kv(t: torch.Tensor, num_heads: int) -> torch.Tensor:
    return t.repeat_interleave(num_heads // t.shape[1], dim=1)


def naive_linear(
    phi_q: torch.Tensor,
    phi_k: torch.Tensor,
    v: torch.Tensor,
    causal: bool,
    eps: float = 1e-6,
    keep: torch.Tensor | None = None,
) -> torch.Tensor:
    """out_i = Σ_j a_ij v_j / (Σ_j a_ij + eps), a_ij = φ(q_i)·φ(k_j), j over all (or j <= i) real
    tokens (`keep` [B, N], True = real); zeros at pad query positions."""
    a = phi_q.double() @ phi_k.double().transpose(-1, -2)
    n = a.shape[-1]
    if causal:
        a = a * torch.ones(n, n, dtype=torch.bool).tril()
    if keep is not None:
        a = a * keep.bool()[:, None, None, :]  # key j dropped
    out = (a @ v.double()) / (a.sum(-1, keepdim=True) + eps)
    if keep is not None:
        out = out * keep.bool()[:, None, :, None]  # query i outputs zeros
    return out.float()


def sparse_mask(
    n: int, num_heads: int, group_size: int, num_sink: int, causal: bool, keep: torch.Tensor | None,
    wrap: bool = False,
) -> torch.Tensor:
    """[B or 1, H, N, N] bool: LongLoRA groups without the wrap, shifted heads = last H//2. With
    `wrap` (no sinks): LongLoRA's roll, written out as a permutation of the shifted heads' tokens."""
    pos = torch.arange(n)
    masks = []
    for h in range(num_heads):
        shifted = h >= num_heads - num_heads // 2
        shift = group_size // 2 if shifted else 0
        if wrap and shifted:
            rolled = torch.arange(n).roll(-shift)  # rolled slot i holds token rolled[i]
            slot = torch.empty(n, dtype=torch.long)
            slot[rolled] = torch.arange(n)  # token p sits in slot[p]
            group, order = slot // group_size, slot
        else:
            group, order = (pos + shift) // group_size, pos
        m = (group[:, None] == group[None, :]) | (pos[None, :] < num_sink)
        if causal:
            m = m & (order[None, :] <= order[:, None])
        masks.append(m)
    mask = torch.stack(masks)[None]
    if keep is not None:
        mask = mask & keep.bool()[:, None, None, :]
    return mask


def naive_sparse(
    q, k, v, group_size: int, num_sink: int, causal: bool, keep: torch.Tensor | None = None, wrap: bool = False
) -> torch.Tensor:
    b, h, n, d = q.shape
    k, v = repeat_kv(k, h).double(), repeat_kv(v, h).double()
    scores = (q.double() @ k.transpose(-1, -2)) / math.sqrt(d)
    mask = sparse_mask(n, h, group_size, num_sink, causal, keep, wrap)
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # rows with no key: zeros
    return (probs @ v).float()
