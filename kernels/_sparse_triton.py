"""Triton block-sparse flash attention for S2/SF-Attn (forward, and backward for dQ, dK, dV).

The mask is the one in `kernels.sparse_attention` (same group, or a sink key; causal; padding);
a query block visits only key blocks that intersect its groups, plus every sink block (those after
its groups too when non-causal), each block once, so the work is O(N·(G + num_sink + block)).
Online softmax in float32; rows that see no key output zeros with lse = +inf so the backward gives
them zero gradient. dK/dV are accumulated per query head (a sink key block visits every query
block) and summed over each K/V head's query heads (grouped-query attention) in PyTorch.
Interpreter tests: `.venv/bin/python -m pytest tests/kernels/test_triton_interpreter.py -q`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from athanor.kernels._common import pad_last, pow2_at_least_16


@triton.jit
def _visible(qpos, kpos, off, N, G, S, KEEP, b, CAUSAL: tl.constexpr, HAS_KEEP: tl.constexpr):
    gq = (qpos + off) // G
    gk = (kpos + off) // G
    vis = ((gq[:, None] == gk[None, :]) | (kpos[None, :] < S)) & (kpos[None, :] < N)
    if CAUSAL:
        vis = vis & (kpos[None, :] <= qpos[:, None])
    if HAS_KEEP:
        keep = tl.load(KEEP + b * N + kpos, mask=kpos < N, other=0)
        vis = vis & (keep[None, :] != 0)
    return vis


@triton.jit
def _head_setup(bh, H, HK, HALF):
    b = bh // H
    h = bh % H
    kvh = b * HK + h // (H // HK)
    off = tl.where(h >= H - H // 2, HALF, 0)  # the last H//2 heads are shifted by G/2
    return b, kvh, off


@triton.jit
def _group_span(m0, N, G, off, BM: tl.constexpr, BN: tl.constexpr, CAUSAL: tl.constexpr):
    """Key range [lo_blk, hi) covering the groups of query rows [m0, m0 + BM), lo_blk aligned down to
    BN (the range's blocks end at cdiv(hi, BN)·BN). Causal: clipped to keys up to the last row."""
    last = tl.minimum(m0 + BM, N) - 1
    lo = tl.maximum(((m0 + off) // G) * G - off, 0)
    hi = tl.minimum(((last + off) // G + 1) * G - off, N)
    if CAUSAL:
        hi = tl.minimum(hi, last + 1)
    return (lo // BN) * BN, hi


@triton.jit
def _fwd_block(q, K, V, KEEP, kbase, start, rows, ds, off, N, G, S, b, scale, m_i, l_i, acc,
               D: tl.constexpr, BN: tl.constexpr, CAUSAL: tl.constexpr, HAS_KEEP: tl.constexpr, PREC: tl.constexpr):
    """One key block of the online-softmax forward: returns the updated (max, sum, accumulator)."""
    kpos = start + tl.arange(0, BN)
    vis = _visible(rows, kpos, off, N, G, S, KEEP, b, CAUSAL, HAS_KEEP)
    k = tl.load(K + kbase + kpos[:, None] * D + ds[None, :], mask=kpos[:, None] < N, other=0.0)
    v = tl.load(V + kbase + kpos[:, None] * D + ds[None, :], mask=kpos[:, None] < N, other=0.0)
    s = tl.where(vis, tl.dot(q, tl.trans(k), input_precision=PREC) * scale, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp(m_i - m_new)
    p = tl.exp(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
    return m_new, l_i, acc


@triton.jit
def _dq_block(q, do, lse, delta, K, V, KEEP, kbase, start, rows, ds, off, N, G, S, b, scale,
              D: tl.constexpr, BN: tl.constexpr, CAUSAL: tl.constexpr, HAS_KEEP: tl.constexpr, PREC: tl.constexpr):
    """One key block's contribution to dQ (before the softmax scale)."""
    kpos = start + tl.arange(0, BN)
    vis = _visible(rows, kpos, off, N, G, S, KEEP, b, CAUSAL, HAS_KEEP)
    k = tl.load(K + kbase + kpos[:, None] * D + ds[None, :], mask=kpos[:, None] < N, other=0.0)
    v = tl.load(V + kbase + kpos[:, None] * D + ds[None, :], mask=kpos[:, None] < N, other=0.0)
    s = tl.where(vis, tl.dot(q, tl.trans(k), input_precision=PREC) * scale, float("-inf"))
    p = tl.exp(s - lse[:, None])
    dp = tl.dot(do, tl.trans(v.to(tl.float32)), input_precision=PREC)
    return tl.dot(p * (dp - delta[:, None]), k.to(tl.float32), input_precision=PREC)


@triton.jit
def _fwd_kernel(Q, K, V, KEEP, O, LSE, N, H, HK, G, HALF, S, scale, D: tl.constexpr, BM: tl.constexpr,
                BN: tl.constexpr, CAUSAL: tl.constexpr, HAS_KEEP: tl.constexpr, PREC: tl.constexpr):
    pid_m, bh = tl.program_id(0), tl.program_id(1)
    b, kvh, off = _head_setup(bh, H, HK, HALF)
    m0 = pid_m * BM
    rows = m0 + tl.arange(0, BM)
    ds = tl.arange(0, D)
    q = tl.load(Q + bh * N * D + rows[:, None] * D + ds[None, :], mask=rows[:, None] < N, other=0.0)
    lo_blk, hi = _group_span(m0, N, G, off, BM, BN, CAUSAL)
    m_i = tl.full((BM,), -1.0e30, dtype=tl.float32)  # finite: a fully masked block gives alpha = 1
    l_i = tl.zeros((BM,), dtype=tl.float32)
    acc = tl.zeros((BM, D), dtype=tl.float32)
    kbase = kvh * N * D
    # Sink blocks before the group range, the group range, then (non-causal only) sink blocks after it:
    # three disjoint block ranges, so a block holding both sinks and group keys is visited once.
    for start in range(0, tl.minimum(S, lo_blk), BN):
        m_i, l_i, acc = _fwd_block(q, K, V, KEEP, kbase, start, rows, ds, off, N, G, S, b, scale, m_i, l_i, acc,
                                   D, BN, CAUSAL, HAS_KEEP, PREC)
    for start in range(lo_blk, hi, BN):
        m_i, l_i, acc = _fwd_block(q, K, V, KEEP, kbase, start, rows, ds, off, N, G, S, b, scale, m_i, l_i, acc,
                                   D, BN, CAUSAL, HAS_KEEP, PREC)
    if not CAUSAL:  # causal: every key from `hi` on lies after the block's last query
        for start in range(tl.cdiv(hi, BN) * BN, S, BN):
            m_i, l_i, acc = _fwd_block(q, K, V, KEEP, kbase, start, rows, ds, off, N, G, S, b, scale, m_i, l_i,
                                       acc, D, BN, CAUSAL, HAS_KEEP, PREC)
    seen = l_i > 0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    lse = tl.where(seen, m_i + tl.log(tl.where(seen, l_i, 1.0)), float("inf"))
    tl.store(O + bh * N * D + rows[:, None] * D + ds[None, :], out, mask=rows[:, None] < N)
    tl.store(LSE + bh * N + rows, lse, mask=rows < N)


@triton.jit
def _bwd_dq_kernel(Q, K, V, KEEP, O, DO, LSE, DELTA, DQ, N, H, HK, G, HALF, S, scale, D: tl.constexpr,
                   BM: tl.constexpr, BN: tl.constexpr, CAUSAL: tl.constexpr, HAS_KEEP: tl.constexpr,
                   PREC: tl.constexpr):
    pid_m, bh = tl.program_id(0), tl.program_id(1)
    b, kvh, off = _head_setup(bh, H, HK, HALF)
    m0 = pid_m * BM
    rows = m0 + tl.arange(0, BM)
    ds = tl.arange(0, D)
    ok = rows[:, None] < N
    q = tl.load(Q + bh * N * D + rows[:, None] * D + ds[None, :], mask=ok, other=0.0)
    do = tl.load(DO + bh * N * D + rows[:, None] * D + ds[None, :], mask=ok, other=0.0)
    o = tl.load(O + bh * N * D + rows[:, None] * D + ds[None, :], mask=ok, other=0.0)
    lse = tl.load(LSE + bh * N + rows, mask=rows < N, other=float("inf"))
    delta = tl.sum(do * o, 1)  # rowsum(dO ∘ O), reused by the dK/dV kernel
    tl.store(DELTA + bh * N + rows, delta, mask=rows < N)
    lo_blk, hi = _group_span(m0, N, G, off, BM, BN, CAUSAL)
    dq = tl.zeros((BM, D), dtype=tl.float32)
    kbase = kvh * N * D
    # The forward's three disjoint block ranges (sinks before, group range, sinks after if non-causal).
    for start in range(0, tl.minimum(S, lo_blk), BN):
        dq += _dq_block(q, do, lse, delta, K, V, KEEP, kbase, start, rows, ds, off, N, G, S, b, scale,
                        D, BN, CAUSAL, HAS_KEEP, PREC)
    for start in range(lo_blk, hi, BN):
        dq += _dq_block(q, do, lse, delta, K, V, KEEP, kbase, start, rows, ds, off, N, G, S, b, scale,
                        D, BN, CAUSAL, HAS_KEEP, PREC)
    if not CAUSAL:
        for start in range(tl.cdiv(hi, BN) * BN, S, BN):
            dq += _dq_block(q, do, lse, delta, K, V, KEEP, kbase, start, rows, ds, off, N, G, S, b, scale,
                            D, BN, CAUSAL, HAS_KEEP, PREC)
    tl.store(DQ + bh * N * D + rows[:, None] * D + ds[None, :], dq * scale, mask=ok)


@triton.jit
def _bwd_dkv_kernel(Q, K, V, KEEP, DO, LSE, DELTA, DK, DV, N, H, HK, G, HALF, S, scale, D: tl.constexpr,
                    BM: tl.constexpr, BN: tl.constexpr, CAUSAL: tl.constexpr, HAS_KEEP: tl.constexpr,
                    PREC: tl.constexpr):
    pid_n, bh = tl.program_id(0), tl.program_id(1)
    b, kvh, off = _head_setup(bh, H, HK, HALF)
    n0 = pid_n * BN
    kpos = n0 + tl.arange(0, BN)
    ds = tl.arange(0, D)
    kbase = kvh * N * D
    k = tl.load(K + kbase + kpos[:, None] * D + ds[None, :], mask=kpos[:, None] < N, other=0.0)
    v = tl.load(V + kbase + kpos[:, None] * D + ds[None, :], mask=kpos[:, None] < N, other=0.0)
    last = tl.minimum(n0 + BN, N) - 1
    # Queries that can see this key block: its groups' queries, or every query for a sink block.
    lo = tl.maximum(((n0 + off) // G) * G - off, 0)
    hi = tl.minimum(((last + off) // G + 1) * G - off, N)
    sink_block = n0 < S
    lo = tl.where(sink_block, 0, lo)
    hi = tl.where(sink_block, N, hi)
    if CAUSAL:
        lo = tl.maximum(lo, n0)
    dk = tl.zeros((BN, D), dtype=tl.float32)
    dv = tl.zeros((BN, D), dtype=tl.float32)
    for start in range((lo // BM) * BM, hi, BM):
        rows = start + tl.arange(0, BM)
        ok = rows[:, None] < N
        q = tl.load(Q + bh * N * D + rows[:, None] * D + ds[None, :], mask=ok, other=0.0)
        do = tl.load(DO + bh * N * D + rows[:, None] * D + ds[None, :], mask=ok, other=0.0)
        lse = tl.load(LSE + bh * N + rows, mask=rows < N, other=float("inf"))
        delta = tl.load(DELTA + bh * N + rows, mask=rows < N, other=0.0)
        vis = _visible(rows, kpos, off, N, G, S, KEEP, b, CAUSAL, HAS_KEEP)
        s = tl.where(vis, tl.dot(q, tl.trans(k), input_precision=PREC) * scale, float("-inf"))
        p = tl.exp(s - lse[:, None])
        dv += tl.dot(tl.trans(p), do, input_precision=PREC)
        dp = tl.dot(do, tl.trans(v.to(tl.float32)), input_precision=PREC)
        dk += tl.dot(tl.trans(p * (dp - delta[:, None])), q.to(tl.float32), input_precision=PREC)
    tl.store(DK + bh * N * D + kpos[:, None] * D + ds[None, :], dk * scale, mask=kpos[:, None] < N)
    tl.store(DV + bh * N * D + kpos[:, None] * D + ds[None, :], dv, mask=kpos[:, None] < N)


def launch_config(is_cuda: bool) -> tuple[int, int]:
    """(BM, BN): small under the CPU interpreter so tiny tests span several blocks."""
    return (64, 64) if is_cuda else (16, 16)


class _SparseAttention(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx, q, k, v, keep, group_size: int, num_sink: int, causal: bool, scale: float
    ):
        b, h, n, d0 = q.shape
        hk = k.shape[1]
        d = pow2_at_least_16(d0)
        qp, kp, vp = (pad_last(t, d) for t in (q, k, v))
        keep_i8 = keep.to(torch.int8).contiguous() if keep is not None else qp.new_empty(1, dtype=torch.int8)
        bm, bn = launch_config(q.is_cuda)
        prec = "ieee" if q.dtype == torch.float32 else "tf32"
        out = torch.empty(b, h, n, d, device=q.device, dtype=torch.float32)
        lse = torch.empty(b, h, n, device=q.device, dtype=torch.float32)
        meta = dict(D=d, BM=bm, BN=bn, CAUSAL=causal, HAS_KEEP=keep is not None, PREC=prec)
        args = (n, h, hk, group_size, group_size // 2, num_sink, scale)
        _fwd_kernel[(triton.cdiv(n, bm), b * h)](qp, kp, vp, keep_i8, out, lse, *args, **meta)
        ctx.save_for_backward(qp, kp, vp, keep_i8, out, lse)
        ctx.args, ctx.meta, ctx.shape = args, meta, (b, h, hk, n, d0, d)
        return out[..., :d0].to(q.dtype)

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        qp, kp, vp, keep_i8, out, lse = ctx.saved_tensors
        b, h, hk, n, d0, d = ctx.shape
        meta = ctx.meta
        do = pad_last(grad_out.float(), d)
        delta = torch.empty_like(lse)
        dq = torch.empty(b, h, n, d, device=do.device, dtype=torch.float32)
        dk_h, dv_h = torch.empty_like(dq), torch.empty_like(dq)
        _bwd_dq_kernel[(triton.cdiv(n, meta["BM"]), b * h)](qp, kp, vp, keep_i8, out, do, lse, delta, dq,
                                                              *ctx.args, **meta)
        _bwd_dkv_kernel[(triton.cdiv(n, meta["BN"]), b * h)](qp, kp, vp, keep_i8, do, lse, delta, dk_h, dv_h,
                                                               *ctx.args, **meta)
        # Query heads sharing a K/V head are contiguous (h // (H / HK)): sum their contributions.
        dk = dk_h.view(b, hk, h // hk, n, d).sum(2)[..., :d0].to(kp.dtype)
        dv = dv_h.view(b, hk, h // hk, n, d).sum(2)[..., :d0].to(vp.dtype)
        return dq[..., :d0].to(qp.dtype), dk, dv, None, None, None, None, None


def sparse_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group_size: int, num_sink: int,
                            causal: bool, keep: torch.Tensor | None, scale: float) -> torch.Tensor:
    """Triton S2/SF attention on `[B, H, N, D]` (K/V `[B, HK, N, D]`); `keep` bool [B, N] or None."""
    return _SparseAttention.apply(q, k, v, keep, group_size, num_sink, causal, scale)
