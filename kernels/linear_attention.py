"""Linear attention, causal and non-causal: one dispatcher over a Triton kernel and a PyTorch reference.

    out_i = φ_q(q_i)·S / (φ_q(q_i)·z + eps),   S = Σ_j φ_k(k_j) v_jᵀ,  z = Σ_j φ_k(k_j)

with the sums over all real keys j (non-causal: two GEMMs) or over real j ≤ i (causal: chunked —
quadratic inside a chunk, a running state S, z carried between chunks; no N×N matrix is ever built).
Padding: `attention_mask` [batch, tokens] (True/1 = real token) drops pad keys from S and z — a pad
key's feature row is zeroed, and a zero row adds nothing to either — and pad query positions output
zeros. φ_q and φ_k are one map, or a pair (Hedgehog/LoLCATs learn separate query and key maps).
Feature maps run in PyTorch (autograd covers Hedgehog's W) and yield float32 features, which both
paths keep in float32 (casting them to fp16/bf16 would flush the small entries that dominate long
sums); the cores accumulate in float32. Paths (`backend`):

* 'torch': the PyTorch reference, the truth every other path is tested against; 'auto' on CPU, and
  on CUDA for causal attention when fla is not installed. Its causal form is chunked: dense matmuls
  inside each chunk (causal mask), the state before each chunk an exclusive prefix sum of the chunks'
  φ(K)ᵀ[V | 1] (batched GEMMs and one cumsum, so every chunk runs in parallel on a GPU).
* 'fla': flash-linear-attention's chunk kernels for the causal numerator, our denominator
  (`kernels._linear_fla`); 'auto' on CUDA for causal attention when `fla` is importable.
* 'triton': our Triton kernels (`kernels._linear_triton`); 'auto' on CUDA for non-causal attention;
  CPU only under TRITON_INTERPRET=1 (tests).
Tests: `.venv/bin/python -m pytest tests/kernels/test_linear_attention.py -q`.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from athanor.kernels._common import check_backend, check_float, check_triton, fla_available, triton_available
from athanor.kernels.feature_maps import FeatureMap, HedgehogFeatureMap, elu_plus_one, resolve_feature_maps

Layout = Literal["bhnd", "bnhd"]
LinearBackend = Literal["auto", "fla", "triton", "torch"]
LINEAR_BACKENDS = ("auto", "fla", "triton", "torch")
__all__ = ["linear_attention", "linear_attention_reference", "linear_path", "HedgehogFeatureMap"]


def linear_path(backend: str, causal: bool, device: torch.device) -> str:
    """Resolve `backend` to 'fla', 'triton' or 'torch' for tensors on `device`, or raise with what to use.
    'auto': on CUDA, fla (causal; the PyTorch chunked reference without fla) or Triton (non-causal);
    elsewhere the reference."""
    check_backend(backend, LINEAR_BACKENDS)
    if backend == "auto":
        if device.type != "cuda":
            return "torch"
        if causal:
            return "fla" if fla_available() else "torch"
        return "triton" if triton_available() else "torch"
    if backend == "fla":
        if not causal:
            raise ValueError("backend='fla' is causal only; non-causal linear attention is two GEMMs: use 'auto'")
        if not fla_available():
            raise ValueError("backend='fla' but fla is not installed (PyPI fla-core): use backend='torch'")
        if device.type != "cuda":
            raise ValueError("backend='fla' needs CUDA tensors (fla's kernels are Triton, CUDA only)")
    if backend == "triton":
        check_triton(device)
    return backend


def linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    feature_map: FeatureMap = "elu+1",
    attention_mask: torch.Tensor | None = None,
    eps: float = 1e-6,
    layout: Layout = "bhnd",
    chunk_size: int = 64,
    backend: LinearBackend = "auto",
) -> torch.Tensor:
    """Linear attention on `[batch, heads, tokens, dim]` (or `[batch, tokens, heads, dim]` with
    layout='bnhd'). K/V may have fewer heads than Q (grouped-query: head h reads K/V head
    h // (heads / kv_heads)). Returns the output in q's layout and dtype, contiguous in that layout.

    feature_map: 'elu+1', 'relu', a module (e.g. HedgehogFeatureMap) or callable used for both q
    and k, or a pair `(query_map, key_map)`: q goes through the first, k through the second.
    attention_mask: None, or `[batch, tokens]` bool / 0-1 (nonzero = real token). Pad keys add
    nothing to S or z (causal too); outputs at pad query positions are zeros. Needs eps > 0: a query
    that sees only pads (a whole pad row, a causal prefix of pads) would divide 0 by 0."""
    q, k, v = _check_inputs(q, k, v, layout, chunk_size, eps)
    keep = _key_keep(attention_mask, q, eps)
    fmap_q, fmap_k = resolve_feature_maps(feature_map)
    if k.shape[1] != q.shape[1]:  # GQA: features are per token, so sharing K/V heads is a repeat
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    path = linear_path(backend, causal, q.device)
    offset = 0.0
    if fmap_q is elu_plus_one and fmap_k is elu_plus_one and path == "torch":
        # The reference folds the "+1" into its GEMMs (see linear_attention_reference).
        fmap_q = fmap_k = lambda x: F.elu(x.float())  # noqa: E731
        offset = 1.0
    phi_q, phi_k = fmap_q(q).float(), fmap_k(k).float()
    if phi_q.shape[:-1] != q.shape[:-1] or phi_k.shape[:-1] != k.shape[:-1]:
        raise ValueError("feature_map must keep [batch, heads, tokens] and map only the last dim")
    if phi_q.shape[-1] != phi_k.shape[-1]:
        raise ValueError(f"query and key feature maps give {phi_q.shape[-1]} vs {phi_k.shape[-1]} features")
    if path == "triton":
        from athanor.kernels._linear_triton import linear_attention_triton

        out = linear_attention_triton(phi_q, phi_k, v, causal, eps, attention_mask=keep)
    elif path == "fla":
        from athanor.kernels._linear_fla import linear_attention_fla

        out = linear_attention_fla(phi_q, phi_k, v, eps, keep)
    else:
        out = linear_attention_reference(
            phi_q, phi_k, v, causal=causal, eps=eps, chunk_size=chunk_size, feature_offset=offset,
            attention_mask=keep,
        )
    return _in_layout(out, q.dtype, layout)


def _in_layout(out: torch.Tensor, dtype: torch.dtype, layout: str) -> torch.Tensor:
    """The float32 result `[B, H, N, D]` in q's dtype and layout. 'bnhd' gets one copy that transposes
    and casts at once, so the caller holds a contiguous `[B, N, H, D]` (merging heads is then a view)."""
    if layout == "bhnd":
        return out.to(dtype)
    b, h, n, d = out.shape
    return out.new_empty(b, n, h, d, dtype=dtype).copy_(out.transpose(1, 2))


def _check_inputs(q, k, v, layout: str, chunk_size: int, eps: float) -> tuple[torch.Tensor, ...]:
    """Validate and return q, k, v in [batch, heads, tokens, dim]."""
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
    return q, k, v


def _key_keep(attention_mask: torch.Tensor | None, q: torch.Tensor, eps: float) -> torch.Tensor | None:
    """The padding mask as bool [batch, tokens] on q's device (True = real token), or None."""
    if attention_mask is None:
        return None
    b, _, n, _ = q.shape
    if tuple(attention_mask.shape) != (b, n):
        raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}: expected ({b}, {n})")
    if eps <= 0:
        raise ValueError("attention_mask needs eps > 0: a query that sees only pad keys would compute 0/0")
    return attention_mask.to(device=q.device) != 0


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
    feature_offset: float = 0.0,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """PyTorch core on features `[B, H, N, F]` and values `[B, H, N, D]`; float32 result.

    The features used are φ + feature_offset: passing elu(x) with offset 1 computes elu+1 without
    materialising the "+1" (it folds into a bias of the GEMMs — one memory pass less per input).
    attention_mask: bool [B, N] (True = real) or None; pad keys add nothing (the offset included),
    pad query positions output zeros."""
    pq, pk, vf = phi_q.float(), phi_k.float(), v.float()
    keep = None if attention_mask is None else attention_mask.bool()[:, None, :, None]  # [B, 1, N, 1]
    if causal:
        if feature_offset:
            pq, pk = pq + feature_offset, pk + feature_offset
        if keep is not None:
            pk = pk * keep
        out = _causal_chunked(pq, pk, vf, eps, chunk_size)
    else:
        out = _noncausal(pq, pk, vf, eps, feature_offset, keep)
    return out if keep is None else out.masked_fill(~keep, 0.0)


def _noncausal(pq: torch.Tensor, pk: torch.Tensor, v: torch.Tensor, eps: float, offset: float,
               keep: torch.Tensor | None) -> torch.Tensor:
    b, h, n, f = pq.shape
    d = v.shape[-1]
    count: float | torch.Tensor = n
    if keep is not None:  # zero pad keys' rows; the folded offset then counts real keys only
        pk = pk * keep
        if offset:
            v = v * keep
            count = keep.sum(dim=2, keepdim=True, dtype=torch.float32)  # [B, 1, 1, 1]
    state = pk.transpose(-1, -2) @ v  # [B, H, F, D]
    z = pk.sum(dim=2).unsqueeze(-1)  # [B, H, F, 1]
    if offset:  # Σ_j (φ_j + c) v_jᵀ = Σ φ_j v_jᵀ + c Σ v_j ;  Σ_j (φ_j + c) = Σ φ_j + c N
        state = state + offset * v.sum(dim=2, keepdim=True)
        z = z + offset * count
    # One GEMM gives numerator and denominator: φ(Q) [S | z]  ->  [N, D + 1].
    state_z = torch.cat([state, z], dim=-1).view(b * h, f, d + 1)
    if offset:  # (φ_q + c)·[S | z] = φ_q·[S | z] + c·colsum([S | z]), fused as the GEMM bias
        bias = offset * state_z.sum(dim=1, keepdim=True)
        both = torch.baddbmm(bias, pq.reshape(b * h, n, f), state_z)
    else:
        both = torch.bmm(pq.reshape(b * h, n, f), state_z)
    out = both[..., :d] / (both[..., d:] + eps)
    return out.view(b, h, n, d)


def _causal_chunked(pq: torch.Tensor, pk: torch.Tensor, v: torch.Tensor, eps: float, c: int) -> torch.Tensor:
    b, h, n, f = pq.shape
    d = v.shape[-1]
    c = min(c, n)
    pad = (-n) % c
    # A ones column on V makes every product carry the denominator along: [num | den] in one GEMM.
    # Padding goes on the features (not the raw keys): φ(0) = 1 for elu+1, but a zero φ(k) adds nothing.
    v1 = torch.cat([v, v.new_ones(b, h, n, 1)], dim=-1)
    pq, pk, v1 = (F.pad(t, (0, 0, 0, pad)) for t in (pq, pk, v1))
    nc = (n + pad) // c
    qc, kc = pq.view(b * h * nc, c, f), pk.view(b * h * nc, c, f)
    vc = v1.view(b * h * nc, c, d + 1)
    scores = torch.bmm(qc, kc.transpose(-1, -2)).tril()  # intra-chunk, j <= i
    # State before each chunk: exclusive prefix sum over chunks of φ(k)ᵀ[v | 1].
    kv = torch.bmm(kc.transpose(-1, -2), vc).view(b * h, nc, f, d + 1)
    state = (kv.cumsum(dim=1) - kv).view(b * h * nc, f, d + 1)
    both = torch.baddbmm(torch.bmm(scores, vc), qc, state)
    out = (both[..., :d] / (both[..., d:] + eps)).view(b, h, nc * c, d)
    return out[:, :, :n]
