"""Causal linear attention through flash-linear-attention's chunk kernels (PyPI `fla-core`, import `fla`).

fla computes the numerator Σ_{j≤i} (φ_q(q_i)·φ_k(k_j)) v_j in chunks on tensor cores
(`fla.ops.linear_attn.chunk_linear_attn`, i.e. `chunk_simple_gla` without decay). Its own
normalisation (`normalize=True`) divides by q·Σk + 1e-10 with the scale folded in; ours divides by
φ_q(q_i)·Σ_{j≤i} φ_k(k_j) + eps, so the kernel runs with `normalize=False, scale=1` and the
denominator is computed here in float32 (one cumulative sum of the key features, one row-wise dot),
differentiable through autograd. Features stay float32 (as on every path), V is widened to match.
Padding: pad keys' feature rows are zeroed (they add nothing to either sum), pad queries output zeros.
fla's kernels are Triton and need CUDA; `kernels.linear_attention` dispatches here on CUDA for causal
attention when `fla` is importable. Checked against the reference by `benchmarks/gpu_all.sh`.
"""

from __future__ import annotations

import torch


def linear_attention_fla(phi_q: torch.Tensor, phi_k: torch.Tensor, v: torch.Tensor, eps: float,
                         keep: torch.Tensor | None) -> torch.Tensor:
    """Causal linear attention on features `[B, H, N, F]` and values `[B, H, N, D]`; float32 result."""
    from fla.ops.linear_attn import chunk_linear_attn

    pq, pk = phi_q.float(), phi_k.float()
    if keep is not None:
        pk = pk * keep[:, None, :, None]
    # fla takes [B, T, H, K]: transposed views (fla makes them contiguous once, inside).
    num, _ = chunk_linear_attn(pq.transpose(1, 2), pk.transpose(1, 2), v.float().transpose(1, 2), scale=1.0,
                               normalize=False)
    den = (pq * pk.cumsum(dim=2)).sum(dim=-1, keepdim=True) + eps  # [B, H, N, 1]
    out = num.transpose(1, 2) / den
    return out if keep is None else out.masked_fill(~keep[:, None, :, None], 0.0)
