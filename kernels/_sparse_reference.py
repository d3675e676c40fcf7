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
) -> torch.Tensor:
    """`key_keep`: bool [batch, tokens], True for real tokens, or None. Output in q's dtype."""
    h = q.shape[1]
    if k.shape[1] != h:
        rep = h // k.shape[1]
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    n_shift = h // 2
    outs = []
    for h0, h1, offset in ((0, h - n_shift, 0), (h - n_shift, h, group_size // 2)):
        if h1 > h0:
            outs.append(
                _attend_half(q[:, h0:h1], k[:, h0:h1], v[:, h0:h1], offset, group_size, num_sink, causal, key_keep, scale)
            )
    return torch.cat(outs, dim=1)


def _segments(n: int, offset: int, g: int) -> list[tuple[int, int]]:
    segs = [(0, min(offset, n))] if offset > 0 else []
    segs += [(a, min(a + g, n)) for a in range(offset, n, g)]
    return segs


def _attend_half(q, k, v, offset, g, num_sink, causal, keep, scale) -> torch.Tensor:
    b, h, n, d = q.shape
    out = torch.empty_like(q)
    segs = _segments(n, offset, g)
    # Full segments past the sinks share one prefix (all sinks) and one length: batch them.
    batched = [s for s in segs if s[1] - s[0] == g and s[0] >= num_sink]
    lone = [s for s in segs if s not in batched]
    if batched:
        a, e = batched[0][0], batched[-1][1]
        ng = len(batched)
        res = _group_attention(
            q[:, :, a:e].reshape(b, h, ng, g, d), k[:, :, a:e].reshape(b, h, ng, g, d),
            v[:, :, a:e].reshape(b, h, ng, g, d), k[:, :, :num_sink], v[:, :, :num_sink], causal,
            None if keep is None else keep[:, a:e].reshape(b, ng, g),
            None if keep is None else keep[:, :num_sink], scale,
        )
        out[:, :, a:e] = res.reshape(b, h, e - a, d)
    for a, e in lone:
        # Sinks outside this segment (those inside are ordinary group keys); sinks after it are
        # visible only without the causal mask.
        sinks = [j for j in range(num_sink) if j < a or (j >= e and not causal)]
        idx = torch.tensor(sinks, dtype=torch.long, device=q.device)
        res = _group_attention(
            q[:, :, None, a:e], k[:, :, None, a:e], v[:, :, None, a:e], k[:, :, idx], v[:, :, idx], causal,
            None if keep is None else keep[:, None, a:e], None if keep is None else keep[:, idx], scale,
        )
        out[:, :, a:e] = res[:, :, 0]
    return out


def _group_attention(qg, kg, vg, kp, vp, causal, keep_g, keep_p, scale) -> torch.Tensor:
    """qg/kg/vg [B, h, ng, L, D]; kp/vp [B, h, P, D] are extra (sink) keys every group sees; with
    causal=True they must lie before every query, so causality never hides them. Returns [B, h, ng, L, D]."""
    b, h, ng, length, d = qg.shape
    p = kp.shape[2]

    def fold(t: torch.Tensor) -> torch.Tensor:  # groups into the batch dim, heads kept for SDPA
        return t.transpose(1, 2).reshape(b * ng, h, t.shape[3], d)

    q, k, v = fold(qg), fold(kg), fold(vg)
    if p > 0:
        pre_k = kp[:, None].expand(b, ng, h, p, d).reshape(b * ng, h, p, d)
        pre_v = vp[:, None].expand(b, ng, h, p, d).reshape(b * ng, h, p, d)
        k, v = torch.cat([pre_k, k], dim=2), torch.cat([pre_v, v], dim=2)
    if keep_g is None:
        if causal and p > 0:
            # Bottom-right causal via SDPA's top-left is_causal: prepend p dummy query rows.
            q = torch.cat([q.new_zeros(b * ng, h, p, d), q], dim=2)
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
        mask = mask | ~row_ok
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.reshape(b * ng, 1, length, p + length), scale=scale)
        out = out * row_ok.reshape(b * ng, 1, length, 1).to(out.dtype)
    return out.reshape(b, ng, h, length, d).transpose(1, 2)
