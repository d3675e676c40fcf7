"""Linear attention, causal and non-causal: one dispatcher over a Triton kernel and a PyTorch reference.

    out_i = φ(q_i)·S / (φ(q_i)·z + eps),   S = Σ_j φ(k_j) v_jᵀ,  z = Σ_j φ(k_j)

with the sums over all j (non-causal: two GEMMs) or over j ≤ i (causal: chunked — quadratic inside
a chunk, a running state S, z carried between chunks; no N×N matrix is ever built). Feature maps
run in PyTorch (autograd covers Hedgehog's W); the core runs on φ(q), φ(k), v and accumulates in
float32 on both paths. Triton runs on CUDA tensors (`backend='auto'`), or anywhere with
`backend='triton'` under TRITON_INTERPRET=1.
Tests: `.venv/bin/python -m pytest tests/kernels/test_linear_attention.py -q`.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from kernels._common import Backend, check_float, use_triton
from kernels.feature_maps import FeatureMap, HedgehogFeatureMap, resolve_feature_map

Layout = Literal["bhnd", "bnhd"]
__all__ = ["linear_attention", "linear_attention_reference", "HedgehogFeatureMap"]


def linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    feature_map: FeatureMap = "elu+1",
    eps: float = 1e-6,
    layout: Layout = "bhnd",
    chunk_size: int = 64,
    backend: Backend = "auto",
) -> torch.Tensor:
    """Linear attention on `[batch, heads, tokens, dim]` (or `[batch, tokens, heads, dim]` with
    layout='bnhd'). K/V may have fewer heads than Q (grouped-query: head h reads K/V head
    h // (heads / kv_heads)). Returns the output in q's layout and dtype."""
    if layout not in ("bhnd", "bnhd"):
        raise ValueError(f"layout={layout!r}: use 'bhnd' ([batch, heads, tokens, dim]) or 'bnhd'")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"{name} has shape {tuple(t.shape)}: expected 4 dims ({layout})")
        check_float(name, t)
    if layout == "bnhd":
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    _check_shapes(q, k, v)
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size}: must be >= 1")
    if eps < 0:
        raise ValueError(f"eps={eps}: must be >= 0")
    fmap = resolve_feature_map(feature_map)
    if k.shape[1] != q.shape[1]:  # GQA: features are per token, so sharing K/V heads is a repeat
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    phi_q, phi_k = fmap(q), fmap(k)
    if phi_q.shape[:-1] != q.shape[:-1] or phi_k.shape[:-1] != k.shape[:-1]:
        raise ValueError("feature_map must keep [batch, heads, tokens] and map only the last dim")
    if use_triton(backend, q, k, v):
        from kernels._linear_triton import linear_attention_triton

        # Features go in the input dtype (half the memory traffic); the kernels accumulate in fp32.
        out = linear_attention_triton(phi_q.to(q.dtype), phi_k.to(q.dtype), v, causal, eps)
    else:
        out = linear_attention_reference(phi_q, phi_k, v, causal=causal, eps=eps, chunk_size=chunk_size)
    out = out.to(q.dtype)
    return out.transpose(1, 2) if layout == "bnhd" else out


def _check_shapes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    b, h, n, d = q.shape
    if k.shape[0] != b or v.shape[0] != b:
        raise ValueError(f"batch sizes differ: q {b}, k {k.shape[0]}, v {v.shape[0]}")
    if k.shape[2] != n or v.shape[2] != n:
        raise ValueError(f"token counts differ: q {n}, k {k.shape[2]}, v {v.shape[2]}")
    if k.shape[3] != d:
        raise ValueError(f"q and k head dims differ: {d} vs {k.shape[3]}")
    if k.shape[1] != v.shape[1] or h % k.shape[1] != 0:
        raise ValueError(f"heads: q {h}, k {k.shape[1]}, v {v.shape[1]}; k and v must match and divide q's")


def linear_attention_reference(
    phi_q: torch.Tensor,
    phi_k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    eps: float = 1e-6,
    chunk_size: int = 64,
) -> torch.Tensor:
    """PyTorch core on features `[B, H, N, F]` and values `[B, H, N, D]`; float32 result."""
    pq, pk, vf = phi_q.float(), phi_k.float(), v.float()
    if not causal:
        state = pk.transpose(-1, -2) @ vf  # [B, H, F, D]
        z = pk.sum(dim=2, keepdim=True).transpose(-1, -2)  # [B, H, F, 1]
        return (pq @ state) / (pq @ z + eps)
    return _causal_chunked(pq, pk, vf, eps, chunk_size)


def _causal_chunked(pq: torch.Tensor, pk: torch.Tensor, v: torch.Tensor, eps: float, c: int) -> torch.Tensor:
    b, h, n, f = pq.shape
    c = min(c, n)
    pad = (-n) % c
    # Padding goes on the features (not the raw keys): φ(0) = 1 for elu+1, but a zero φ(k) adds nothing.
    pq, pk, v = (F.pad(t, (0, 0, 0, pad)) for t in (pq, pk, v))
    nc = (n + pad) // c
    qc, kc, vc = pq.view(b, h, nc, c, f), pk.view(b, h, nc, c, f), v.view(b, h, nc, c, -1)
    scores = (qc @ kc.transpose(-1, -2)).tril()  # intra-chunk, j <= i
    num = scores @ vc
    den = scores.sum(-1, keepdim=True)
    # State before each chunk: exclusive prefix sums over chunks of φ(k)ᵀv and Σφ(k).
    kv = kc.transpose(-1, -2) @ vc  # [B, H, nc, F, D]
    ksum = kc.sum(dim=3)  # [B, H, nc, F]
    state = kv.cumsum(dim=2) - kv
    z = (ksum.cumsum(dim=2) - ksum).unsqueeze(-1)
    num = num + qc @ state
    den = den + qc @ z
    out = (num / (den + eps)).view(b, h, nc * c, -1)
    return out[:, :, :n]
