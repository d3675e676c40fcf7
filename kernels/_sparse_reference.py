"""PyTorch reference for shifted sparse attention (S2/SF): SDPA per group on reshaped blocks.

Each head half (unshifted, shifted by G/2) is cut into contiguous segments; every full-size segment
that starts after the sinks is batched into one SDPA call with the sink keys as a shared prefix,
and the few others (the first, which holds the sinks, and a partial last one) run alone. Without a
padding mask no mask tensor is built: causal-with-prefix is SDPA's fast `is_causal` path on a
square block whose first rows are dummy queries. Cost O(N·(G + num_sink)).
Tests: `.venv/bin/python -m pytest tests/kernels/test_sparse_attention.py -q`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sparse_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    group_size: int,
    num_sink: int,
    causal: bool,
    key_keep: torch.Tensor | None,
    scale: float,
    wrap: bool = False,
) -> torch.Tensor:
    """`key_keep`: bool [batch, tokens], True for real tokens, or None. Output in q's dtype.
    `wrap=True` (no sinks): LongLoRA's rolled S2, the shifted half rolled by −G/2 around grouped
    attention with no shift, so its last group wraps the sequence's end onto its start."""
    h = q.shape[1]
    if k.shape[1] != h:
        rep = h // k.shape[1]
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    n_shift = h // 2
    # split/cat rather than slicing: their backward is a cat/split, where a slice's backward
    # writes a full-size zero gradient per slice (it dominated the backward time).
    sizes = [h - n_shift, n_shift]
    outs = []
    half = group_size // 2
    for qh, kh, vh, offset in zip(q.split(sizes, 1), k.split(sizes, 1), v.split(sizes, 1), (0, half)):
        if not qh.shape[1]:
            continue
        if wrap and offset:
            qh, kh, vh = (t.roll(-half, 2) for t in (qh, kh, vh))
            keep = None if key_keep is None else key_keep.roll(-half, 1)
            out = _attend_half(qh, kh, vh, 0, group_size, 0, causal, keep, scale).roll(half, 2)
        else:
            out = _attend_half(qh, kh, vh, offset, group_size, num_sink, causal, key_keep, scale)
        outs.append(out)
    return torch.cat(outs, dim=1)


def _pieces(n: int, offset: int, g: int, num_sink: int) -> list[tuple[int, int, bool]]:
    """Contiguous segments (start, end, batched): a shifted head's first half group, then groups of
    g; runs of full groups that start after the sinks are merged into one batched piece."""
    segs = ([(0, min(offset, n))] if offset > 0 else []) + [(a, min(a + g, n)) for a in range(offset, n, g)]
    pieces: list[tuple[int, int, bool]] = []
    for a, e in segs:
        batched = e - a == g and a >= num_sink
        if batched and pieces and pieces[-1][2]:
            pieces[-1] = (pieces[-1][0], e, True)
        else:
            pieces.append((a, e, batched))
    return pieces


def _attend_half(q, k, v, offset, g, num_sink, causal, keep, scale) -> torch.Tensor:
    b, h, n, d = q.shape
    pieces = _pieces(n, offset, g, num_sink)
    sizes = [e - a for a, e, _ in pieces]
    qs, ks, vs = q.split(sizes, 2), k.split(sizes, 2), v.split(sizes, 2)
    keeps = keep.split(sizes, 1) if keep is not None else [None] * len(pieces)
    outs = []
    for i, (a, e, batched) in enumerate(pieces):
        # Sinks outside this piece (those inside are ordinary group keys); sinks after it are
        # visible only without the causal mask. Taken from the (small) pieces that hold them.
        sinks = [j for j in range(num_sink) if j < a or (j >= e and not causal)]
        kp, vp, keep_p = _gather(sinks, pieces, ks, vs, keeps)
        ng = (e - a) // g if batched else 1
        length = e - a if not batched else g
        res = _group_attention(
            qs[i].reshape(b, h, ng, length, d), ks[i].reshape(b, h, ng, length, d),
            vs[i].reshape(b, h, ng, length, d), kp, vp, causal,
            None if keep is None else keeps[i].reshape(b, ng, length), keep_p, scale,
        )
        outs.append(res.reshape(b, h, e - a, d))
    return torch.cat(outs, dim=2)


def _gather(positions, pieces, ks, vs, keeps):
    """K, V [B, h, P, D] and keep [B, P] (or None) at sorted `positions`, read piece by piece."""
    parts_k, parts_v, parts_keep = [], [], []
    for (a, e, _), kk, vv, kp in zip(pieces, ks, vs, keeps):
        local = [j - a for j in positions if a <= j < e]
        if local:
            lo, hi = local[0], local[-1] + 1  # sink positions inside one piece are contiguous
            parts_k.append(kk[:, :, lo:hi])
            parts_v.append(vv[:, :, lo:hi])
            parts_keep.append(None if kp is None else kp[:, lo:hi])
    if not parts_k:
        b, h, _, d = ks[0].shape
        empty = ks[0].new_zeros(b, h, 0, d)
        return empty, empty, None if keeps[0] is None else keeps[0].new_zeros(b, 0)
    keep_cat = None if parts_keep[0] is None else torch.cat(parts_keep, dim=1)
    return torch.cat(parts_k, dim=2), torch.cat(parts_v, dim=2), keep_cat


def _group_attention(qg, kg, vg, kp, vp, causal, keep_g, keep_p, scale) -> torch.Tensor:
    """qg/kg/vg [B, h, ng, L, D]; kp/vp [B, h, P, D] are extra (sink) keys every group sees; with
    causal=True they must lie before every query, so causality never hides them. Returns [B, h, ng, L, D]."""
    b, h, ng, length, d = qg.shape
    p = kp.shape[2]
    # Groups fold into the head dim ([B, h*ng, ...] is a view of [B, h, ng, ...]), no transpose copies.
    q = qg.reshape(b, h * ng, length, d)
    if p > 0:
        k = torch.cat([kp[:, :, None].expand(b, h, ng, p, d), kg], dim=3).view(b, h * ng, p + length, d)
        v = torch.cat([vp[:, :, None].expand(b, h, ng, p, d), vg], dim=3).view(b, h * ng, p + length, d)
    else:
        k, v = kg.reshape(b, h * ng, length, d), vg.reshape(b, h * ng, length, d)
    if keep_g is None:
        if causal and p > 0:
            # Bottom-right causal via SDPA's top-left is_causal: prepend p dummy query rows.
            q = torch.cat([q.new_zeros(b, h * ng, p, d), q], dim=2)
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)[:, :, p:]
        else:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)
    else:
        keys = keep_g if p == 0 else torch.cat([keep_p[:, None].expand(b, ng, p), keep_g], dim=2)
        mask = keys[:, :, None, :].expand(b, ng, length, p + length)
        if causal:
            tri = torch.ones(length, length, dtype=torch.bool, device=q.device).tril()
            allowed = torch.cat([tri.new_ones(length, p), tri], dim=1)
            mask = mask & allowed
        row_ok = mask.any(dim=-1, keepdim=True)
        # A query with no visible key outputs zeros; open its row so softmax stays finite.
        mask = (mask | ~row_ok)[:, None].expand(b, h, ng, length, p + length).reshape(b, h * ng, length, p + length)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
        out = out * row_ok[:, None].expand(b, h, ng, length, 1).reshape(b, h * ng, length, 1).to(out.dtype)
    return out.reshape(b, h, ng, length, d)
