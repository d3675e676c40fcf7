"""Triton kernels for linear attention on features φ(q), φ(k) (forward and backward, both forms).

Non-causal: a reduction kernel builds S = φ(K)ᵀV and z = Σφ(K) (one program per block of tokens,
fp32 atomics), then a per-block kernel writes φ(Q)S / (φ(Q)z + eps). Causal: one program per
(batch, head) walks the chunks in order, quadratic inside a chunk and a register-resident state
(S, z) between chunks; the backward walks forward for dφ(Q) and backward for dφ(K), dV.
Features come in float32 (fp16/bf16 features would flush the small entries that dominate long
sums); V stays in its dtype and is widened on load; the output is float32 (the caller casts it).
All products accumulate in float32; with fp16 or bf16 inputs the dots run on tensor cores in tf32
(a 10-bit mantissa, but float32's exponent range, so small features survive; fp16/bf16 V converts
to tf32 exactly), with float32 inputs in full fp32 ("ieee"). Padding: pad keys' feature rows are
zeroed before the kernels (a zero row adds nothing to S or z) and pad query outputs are set to zero.
Run on CPU with TRITON_INTERPRET=1 for tests: `.venv/bin/python -m pytest tests/kernels/test_triton_interpreter.py -q`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from athanor.kernels._common import pad_last, pow2_at_least_16


@triton.jit
def _nc_state_kernel(K, V, S, Z, N, F: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr, PREC: tl.constexpr):
    bh, blk = tl.program_id(0), tl.program_id(1)
    rows = blk * BLOCK + tl.arange(0, BLOCK)
    fs, ds = tl.arange(0, F), tl.arange(0, D)
    ok = rows[:, None] < N
    k = tl.load(K + bh * N * F + rows[:, None] * F + fs[None, :], mask=ok, other=0.0).to(tl.float32)
    v = tl.load(V + bh * N * D + rows[:, None] * D + ds[None, :], mask=ok, other=0.0).to(tl.float32)
    tl.atomic_add(S + bh * F * D + fs[:, None] * D + ds[None, :], tl.dot(tl.trans(k), v, input_precision=PREC))
    tl.atomic_add(Z + bh * F + fs, tl.sum(k, 0))


@triton.jit
def _nc_out_kernel(Q, S, Z, O, DEN, N, eps, F: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr, PREC: tl.constexpr):
    bh, blk = tl.program_id(0), tl.program_id(1)
    rows = blk * BLOCK + tl.arange(0, BLOCK)
    fs, ds = tl.arange(0, F), tl.arange(0, D)
    ok = rows < N
    q = tl.load(Q + bh * N * F + rows[:, None] * F + fs[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
    s = tl.load(S + bh * F * D + fs[:, None] * D + ds[None, :])
    z = tl.load(Z + bh * F + fs)
    den = tl.sum(q * z[None, :], 1) + eps
    out = tl.dot(q, s, input_precision=PREC) / den[:, None]
    tl.store(O + bh * N * D + rows[:, None] * D + ds[None, :], out, mask=ok[:, None])
    tl.store(DEN + bh * N + rows, den, mask=ok)


@triton.jit
def _nc_bwd_q_kernel(Q, S, Z, DO, O, DEN, DQ, DS, DZ, N, F: tl.constexpr, D: tl.constexpr,
                     BLOCK: tl.constexpr, PREC: tl.constexpr):
    bh, blk = tl.program_id(0), tl.program_id(1)
    rows = blk * BLOCK + tl.arange(0, BLOCK)
    fs, ds = tl.arange(0, F), tl.arange(0, D)
    ok = rows < N
    q = tl.load(Q + bh * N * F + rows[:, None] * F + fs[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
    do = tl.load(DO + bh * N * D + rows[:, None] * D + ds[None, :], mask=ok[:, None], other=0.0)
    o = tl.load(O + bh * N * D + rows[:, None] * D + ds[None, :], mask=ok[:, None], other=0.0)
    den = tl.load(DEN + bh * N + rows, mask=ok, other=1.0)
    s = tl.load(S + bh * F * D + fs[:, None] * D + ds[None, :])
    z = tl.load(Z + bh * F + fs)
    dnum = do / den[:, None]
    dden = -tl.sum(do * o, 1) / den
    dq = tl.dot(dnum, tl.trans(s), input_precision=PREC) + dden[:, None] * z[None, :]
    tl.store(DQ + bh * N * F + rows[:, None] * F + fs[None, :], dq, mask=ok[:, None])
    tl.atomic_add(DS + bh * F * D + fs[:, None] * D + ds[None, :], tl.dot(tl.trans(q), dnum, input_precision=PREC))
    tl.atomic_add(DZ + bh * F + fs, tl.sum(q * dden[:, None], 0))


@triton.jit
def _nc_bwd_kv_kernel(K, V, DS, DZ, DK, DV, N, F: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr,
                      PREC: tl.constexpr):
    bh, blk = tl.program_id(0), tl.program_id(1)
    rows = blk * BLOCK + tl.arange(0, BLOCK)
    fs, ds = tl.arange(0, F), tl.arange(0, D)
    ok = rows[:, None] < N
    k = tl.load(K + bh * N * F + rows[:, None] * F + fs[None, :], mask=ok, other=0.0).to(tl.float32)
    v = tl.load(V + bh * N * D + rows[:, None] * D + ds[None, :], mask=ok, other=0.0).to(tl.float32)
    d_s = tl.load(DS + bh * F * D + fs[:, None] * D + ds[None, :])
    dz = tl.load(DZ + bh * F + fs)
    dk = tl.dot(v, tl.trans(d_s), input_precision=PREC) + dz[None, :]
    dv = tl.dot(k, d_s, input_precision=PREC)
    tl.store(DK + bh * N * F + rows[:, None] * F + fs[None, :], dk, mask=ok)
    tl.store(DV + bh * N * D + rows[:, None] * D + ds[None, :], dv, mask=ok)


@triton.jit
def _causal_fwd_kernel(Q, K, V, O, DEN, N, eps, F: tl.constexpr, D: tl.constexpr, C: tl.constexpr,
                       PREC: tl.constexpr):
    bh = tl.program_id(0)
    fs, ds, cs = tl.arange(0, F), tl.arange(0, D), tl.arange(0, C)
    lower = cs[:, None] >= cs[None, :]
    state = tl.zeros((F, D), dtype=tl.float32)
    z = tl.zeros((F,), dtype=tl.float32)
    for start in range(0, N, C):
        rows = start + cs
        ok = rows < N
        q = tl.load(Q + bh * N * F + rows[:, None] * F + fs[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
        k = tl.load(K + bh * N * F + rows[:, None] * F + fs[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
        v = tl.load(V + bh * N * D + rows[:, None] * D + ds[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
        a = tl.where(lower, tl.dot(q, tl.trans(k), input_precision=PREC), 0.0)
        num = tl.dot(a, v, input_precision=PREC) + tl.dot(q, state, input_precision=PREC)
        den = tl.sum(a, 1) + tl.sum(q * z[None, :], 1) + eps
        tl.store(O + bh * N * D + rows[:, None] * D + ds[None, :], num / den[:, None], mask=ok[:, None])
        tl.store(DEN + bh * N + rows, den, mask=ok)
        state += tl.dot(tl.trans(k), v, input_precision=PREC)
        z += tl.sum(k, 0)


@triton.jit
def _causal_bwd_q_kernel(Q, K, V, DO, O, DEN, DQ, N, F: tl.constexpr, D: tl.constexpr, C: tl.constexpr,
                         PREC: tl.constexpr):
    bh = tl.program_id(0)
    fs, ds, cs = tl.arange(0, F), tl.arange(0, D), tl.arange(0, C)
    lower = cs[:, None] >= cs[None, :]
    state = tl.zeros((F, D), dtype=tl.float32)
    z = tl.zeros((F,), dtype=tl.float32)
    for start in range(0, N, C):
        rows = start + cs
        ok = rows < N
        k = tl.load(K + bh * N * F + rows[:, None] * F + fs[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
        v = tl.load(V + bh * N * D + rows[:, None] * D + ds[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
        do = tl.load(DO + bh * N * D + rows[:, None] * D + ds[None, :], mask=ok[:, None], other=0.0)
        o = tl.load(O + bh * N * D + rows[:, None] * D + ds[None, :], mask=ok[:, None], other=0.0)
        den = tl.load(DEN + bh * N + rows, mask=ok, other=1.0)
        dnum = do / den[:, None]
        dden = -tl.sum(do * o, 1) / den
        da = tl.where(lower, tl.dot(dnum, tl.trans(v), input_precision=PREC) + dden[:, None], 0.0)
        dq = tl.dot(da, k, input_precision=PREC) + tl.dot(dnum, tl.trans(state), input_precision=PREC)
        dq += dden[:, None] * z[None, :]
        tl.store(DQ + bh * N * F + rows[:, None] * F + fs[None, :], dq, mask=ok[:, None])
        state += tl.dot(tl.trans(k), v, input_precision=PREC)
        z += tl.sum(k, 0)


@triton.jit
def _causal_bwd_kv_kernel(Q, K, V, DO, O, DEN, DK, DV, N, F: tl.constexpr, D: tl.constexpr, C: tl.constexpr,
                          PREC: tl.constexpr):
    bh = tl.program_id(0)
    fs, ds, cs = tl.arange(0, F), tl.arange(0, D), tl.arange(0, C)
    lower = cs[:, None] >= cs[None, :]
    r_state = tl.zeros((F, D), dtype=tl.float32)  # Σ over later tokens of φ(q_i) dnum_iᵀ
    r_z = tl.zeros((F,), dtype=tl.float32)  # Σ over later tokens of φ(q_i) dden_i
    n_chunks = tl.cdiv(N, C)
    for it in range(0, n_chunks):
        rows = (n_chunks - 1 - it) * C + cs
        ok = rows < N
        q = tl.load(Q + bh * N * F + rows[:, None] * F + fs[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
        k = tl.load(K + bh * N * F + rows[:, None] * F + fs[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
        v = tl.load(V + bh * N * D + rows[:, None] * D + ds[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
        do = tl.load(DO + bh * N * D + rows[:, None] * D + ds[None, :], mask=ok[:, None], other=0.0)
        o = tl.load(O + bh * N * D + rows[:, None] * D + ds[None, :], mask=ok[:, None], other=0.0)
        den = tl.load(DEN + bh * N + rows, mask=ok, other=1.0)
        dnum = do / den[:, None]
        dden = -tl.sum(do * o, 1) / den
        a = tl.where(lower, tl.dot(q, tl.trans(k), input_precision=PREC), 0.0)
        da = tl.where(lower, tl.dot(dnum, tl.trans(v), input_precision=PREC) + dden[:, None], 0.0)
        dk = tl.dot(tl.trans(da), q, input_precision=PREC) + tl.dot(v, tl.trans(r_state), input_precision=PREC)
        dk += r_z[None, :]
        dv = tl.dot(tl.trans(a), dnum, input_precision=PREC) + tl.dot(k, r_state, input_precision=PREC)
        tl.store(DK + bh * N * F + rows[:, None] * F + fs[None, :], dk, mask=ok[:, None])
        tl.store(DV + bh * N * D + rows[:, None] * D + ds[None, :], dv, mask=ok[:, None])
        r_state += tl.dot(tl.trans(q), dnum, input_precision=PREC)
        r_z += tl.sum(q * dden[:, None], 0)


def launch_config(is_cuda: bool, f: int, d: int) -> tuple[int, int]:
    """(block/chunk size, num_warps). Small blocks under the CPU interpreter so tiny tests still
    cross several blocks/chunks; on GPU, smaller chunks when wide features would make the
    register-held tiles spill, and more warps for a larger causal state S (f×d fp32 in registers)."""
    return _block(is_cuda, f, d), _warps(f, d)


def _block(is_cuda: bool, f: int, d: int) -> int:
    if not is_cuda:
        return 16
    return 32 if max(f, d) > 64 else 64


def _warps(f: int, d: int) -> int:
    return 8 if f * d > 4096 else 4


class _LinearAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, phi_q, phi_k, v, causal: bool, eps: float):  # type: ignore[override]
        b, h, n, f0 = phi_q.shape
        d0 = v.shape[-1]
        f, d = pow2_at_least_16(f0), pow2_at_least_16(d0)
        pq, pk = (pad_last(t, f).view(b * h, n, f) for t in (phi_q, phi_k))
        pv = pad_last(v, d).view(b * h, n, d)
        prec = "ieee" if v.dtype == torch.float32 else "tf32"  # features are fp32: the input dtype is v's
        blk, warps = launch_config(phi_q.is_cuda, f, d)
        out = torch.empty(b * h, n, d, device=v.device, dtype=torch.float32)
        den = torch.empty(b * h, n, device=v.device, dtype=torch.float32)
        state = torch.zeros(b * h, f, d, device=v.device, dtype=torch.float32)
        z = torch.zeros(b * h, f, device=v.device, dtype=torch.float32)
        if causal:
            _causal_fwd_kernel[(b * h,)](pq, pk, pv, out, den, n, eps, F=f, D=d, C=blk, PREC=prec, num_warps=warps)
        else:
            grid = (b * h, triton.cdiv(n, blk))
            _nc_state_kernel[grid](pk, pv, state, z, n, F=f, D=d, BLOCK=blk, PREC=prec, num_warps=warps)
            _nc_out_kernel[grid](pq, state, z, out, den, n, eps, F=f, D=d, BLOCK=blk, PREC=prec, num_warps=warps)
        ctx.save_for_backward(pq, pk, pv, out, den, state, z)
        ctx.meta = (causal, b, h, n, f0, d0, f, d, prec, blk, warps, phi_q.dtype, phi_k.dtype, v.dtype)
        # float32, as the reference returns: the caller casts once, fused with its layout change.
        return out.view(b, h, n, d)[..., :d0]

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        pq, pk, pv, out, den, state, z = ctx.saved_tensors
        causal, b, h, n, f0, d0, f, d, prec, blk, warps, q_dtype, k_dtype, v_dtype = ctx.meta
        do = pad_last(grad_out.float(), d).view(b * h, n, d)
        dq = torch.empty(b * h, n, f, device=do.device, dtype=torch.float32)
        dk = torch.empty_like(dq)
        dv = torch.empty(b * h, n, d, device=do.device, dtype=torch.float32)
        dims = dict(F=f, D=d, PREC=prec, num_warps=warps)
        if causal:
            _causal_bwd_q_kernel[(b * h,)](pq, pk, pv, do, out, den, dq, n, C=blk, **dims)
            _causal_bwd_kv_kernel[(b * h,)](pq, pk, pv, do, out, den, dk, dv, n, C=blk, **dims)
        else:
            grid = (b * h, triton.cdiv(n, blk))
            d_state, dz = torch.zeros_like(state), torch.zeros_like(z)
            _nc_bwd_q_kernel[grid](pq, state, z, do, out, den, dq, d_state, dz, n, BLOCK=blk, **dims)
            _nc_bwd_kv_kernel[grid](pk, pv, d_state, dz, dk, dv, n, BLOCK=blk, **dims)

        def unpad(t: torch.Tensor, width: int, dtype: torch.dtype) -> torch.Tensor:
            return t.view(b, h, n, -1)[..., :width].to(dtype)

        return unpad(dq, f0, q_dtype), unpad(dk, f0, k_dtype), unpad(dv, d0, v_dtype), None, None


def linear_attention_triton(phi_q: torch.Tensor, phi_k: torch.Tensor, v: torch.Tensor, causal: bool,
                            eps: float, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Triton core on `[B, H, N, F]` features (taken in float32) and `[B, H, N, D]` values; float32
    output. attention_mask: bool [B, N] (True = real) or None; pad keys add nothing, pad queries
    output zeros (as `linear_attention_reference`)."""
    phi_q, phi_k = phi_q.float(), phi_k.float()
    keep = None if attention_mask is None else attention_mask.bool()[:, None, :, None]
    if keep is not None:
        phi_k = phi_k * keep
    out = _LinearAttention.apply(phi_q, phi_k, v, causal, float(eps))
    return out if keep is None else out.masked_fill(~keep, 0.0)
