"""S2/SF-Attn reference path: against a dense masked computation, causality, no wrap-around,
sinks, GQA, padding, dtypes, O(N·G) cost.

Run: `.venv/bin/python -m pytest tests/kernels/test_sparse_attention.py -q`
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from attention_naive import naive_sparse

import athanor.kernels._sparse_reference as sparse_ref
from athanor.kernels.sparse_attention import longlora_s2_attention, s2_attention, sf_attention


def _qkv(b=2, h=4, hk=None, n=37, d=16, seed=0, requires_grad=True):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, n, d, generator=g)
    k = torch.randn(b, hk or h, n, d, generator=g)
    v = torch.randn(b, hk or h, n, d, generator=g)
    return [t.requires_grad_(requires_grad) for t in (q, k, v)]


def _keep(b: int, n: int) -> torch.Tensor:
    keep = torch.ones(b, n, dtype=torch.bool)
    keep[0, :3] = False  # left padding
    keep[-1, n - 5 :] = False  # right padding
    return keep


def _grads(out, inputs):
    weight = torch.linspace(-1, 1, out.numel()).view_as(out)
    return list(torch.autograd.grad((out * weight).sum(), inputs))


CASES = [  # b, h, hk, n, group, sinks, causal, padded
    (2, 4, 4, 37, 8, 4, True, False),  # n not a multiple of G
    (2, 4, 2, 37, 8, 4, False, False),  # GQA 2, non-causal
    (1, 4, 1, 40, 8, 4, True, True),  # GQA 4, padding
    (2, 3, 3, 30, 6, 5, True, True),  # odd heads, sinks reaching the second shifted group
    (2, 3, 3, 30, 6, 5, False, True),  # non-causal: the first shifted group sees sinks after it
    (1, 2, 2, 21, 8, 6, False, False),
    (2, 4, 4, 30, 16, 0, False, True),
    (1, 2, 1, 1, 4, 4, True, False),  # one token
    (1, 2, 2, 9, 32, 4, True, False),  # group larger than the sequence
    (1, 2, 2, 33, 8, 12, True, False),  # sinks span whole groups
    (1, 4, 2, 40, 4, 24, False, True),  # non-causal: sinks far past the early groups
]


@pytest.mark.parametrize("b,h,hk,n,g,s,causal,padded", CASES)
def test_sf_reference_matches_dense(b, h, hk, n, g, s, causal, padded):
    q, k, v = _qkv(b, h, hk, n)
    keep = _keep(b, n) if padded else None
    out = sf_attention(q, k, v, group_size=g, num_sink=s, causal=causal, attention_mask=keep, backend="torch")
    ref = naive_sparse(q, k, v, g, s, causal, keep)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    for g_out, g_ref in zip(_grads(out, [q, k, v]), _grads(ref, [q, k, v])):
        torch.testing.assert_close(g_out, g_ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("causal,padded,hk", [(True, False, 4), (False, True, 2), (True, True, 1)])
def test_s2_reference_matches_dense(causal, padded, hk):
    q, k, v = _qkv(hk=hk, n=29)
    keep = _keep(2, 29) if padded else None
    out = s2_attention(q, k, v, group_size=8, causal=causal, attention_mask=keep, backend="torch")
    ref = naive_sparse(q, k, v, 8, 0, causal, keep)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    for g_out, g_ref in zip(_grads(out, [q, k, v]), _grads(ref, [q, k, v])):
        torch.testing.assert_close(g_out, g_ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("causal,padded,hk,n", [(True, False, 4, 32), (False, True, 2, 29), (True, True, 1, 40)])
def test_rolled_s2_reference_matches_dense(causal, padded, hk, n):
    """wrap=True: LongLoRA's rolled S2 (the dense mask writes the roll out as a permutation)."""
    q, k, v = _qkv(hk=hk, n=n)
    keep = _keep(2, n) if padded else None
    out = s2_attention(q, k, v, group_size=8, causal=causal, attention_mask=keep, wrap=True, backend="torch")
    ref = naive_sparse(q, k, v, 8, 0, causal, keep, wrap=True)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    for g_out, g_ref in zip(_grads(out, [q, k, v]), _grads(ref, [q, k, v])):
        torch.testing.assert_close(g_out, g_ref, rtol=1e-4, atol=1e-5)


def longlora_rolled(q, k, v, g: int) -> torch.Tensor:
    """LongLoRA's S2-Attn written as its paper/code does it (independent of the kernel): the last H//2
    heads' q/k/v rolled by -G/2 along the tokens, every head cut into groups of G, causal softmax
    attention per group, the shifted heads' output rolled back by +G/2. Needs N divisible by G."""
    b, h, n, d = q.shape
    k, v = (t.repeat_interleave(h // t.shape[1], dim=1) for t in (k, v))  # GQA: kv head h // (H / kv)
    shifted = torch.arange(h) >= h - h // 2
    q, k, v = (torch.where(shifted[None, :, None, None], t.roll(-(g // 2), dims=2), t) for t in (q, k, v))
    qg, kg, vg = (t.reshape(b, h, n // g, g, d) for t in (q, k, v))
    scores = qg @ kg.transpose(-1, -2) / d**0.5
    scores = scores.masked_fill(~torch.ones(g, g, dtype=torch.bool).tril(), float("-inf"))
    out = (torch.softmax(scores, dim=-1) @ vg).reshape(b, h, n, d)
    return torch.where(shifted[None, :, None, None], out.roll(g // 2, dims=2), out)


@pytest.mark.parametrize("h,hk,n,g", [(4, 4, 32, 8), (4, 2, 48, 16), (6, 3, 24, 4), (2, 1, 16, 16)])
def test_longlora_s2_matches_an_independent_rolled_computation(h, hk, n, g):
    q, k, v = _qkv(h=h, hk=hk, n=n)
    out = longlora_s2_attention(q, k, v, group_size=g, backend="torch")
    ref = longlora_rolled(q, k, v, g)
    assert torch.allclose(out, ref, rtol=1e-5, atol=1e-5)
    for g_out, g_ref in zip(_grads(out, [q, k, v]), _grads(ref, [q, k, v])):
        torch.testing.assert_close(g_out, g_ref, rtol=1e-4, atol=1e-5)
    # it is s2_attention(wrap=True); the segmented default differs (no wrap-around)
    torch.testing.assert_close(out, s2_attention(q, k, v, group_size=g, wrap=True, backend="torch"), rtol=0, atol=0)
    if g < n:
        assert not torch.allclose(out, s2_attention(q, k, v, group_size=g, backend="torch"), atol=1e-3)


def test_rolled_s2_wraps_the_end_onto_the_start():
    """Rolled, the shifted heads' first G/2 tokens share a group with the last G/2 (and, causal by
    rolled position, see them); the unshifted heads and every other token are unaffected."""
    n, g = 32, 8
    q, k, v = _qkv(n=n, requires_grad=False)
    base = s2_attention(q, k, v, group_size=g, wrap=True, backend="torch")
    k2, v2 = k.clone(), v.clone()
    k2[:, :, n - g // 2:] += 3.0
    v2[:, :, n - g // 2:] += 3.0
    out = s2_attention(q, k2, v2, group_size=g, wrap=True, backend="torch")
    assert (out[:, 2:, : g // 2] - base[:, 2:, : g // 2]).abs().amin(dim=-1).min() > 1e-4  # sees the end
    torch.testing.assert_close(out[:, :, g // 2: n - g], base[:, :, g // 2: n - g], rtol=0, atol=1e-6)
    torch.testing.assert_close(out[:, :2, : n - g], base[:, :2, : n - g], rtol=0, atol=1e-6)


@pytest.mark.parametrize("fn", ["s2", "sf"])
def test_causal_never_sees_the_future(fn):
    q, k, v = _qkv(n=45, requires_grad=False)
    kwargs = dict(group_size=8, causal=True, backend="torch") | ({"num_sink": 4} if fn == "sf" else {})
    attn = sf_attention if fn == "sf" else s2_attention
    base = attn(q, k, v, **kwargs)
    for i in (0, 3, 4, 11, 12, 30, 43):
        q2, k2, v2 = (t.clone() for t in (q, k, v))
        for t in (q2, k2, v2):
            t[:, :, i + 1 :] = torch.randn_like(t[:, :, i + 1 :])
        out = attn(q2, k2, v2, **kwargs)
        torch.testing.assert_close(out[:, :, : i + 1], base[:, :, : i + 1], rtol=0, atol=1e-6)


@pytest.mark.parametrize("causal", [True, False])
def test_no_wrap_around_to_the_end(causal):
    """LongLoRA's roll puts the last G/2 tokens in the shifted heads' first group; ours does not."""
    n, g = 32, 8
    q, k, v = _qkv(n=n, requires_grad=False)
    base = s2_attention(q, k, v, group_size=g, causal=causal, backend="torch")
    k2, v2 = k.clone(), v.clone()
    k2[:, :, n - g // 2 :] += 3.0
    v2[:, :, n - g // 2 :] += 3.0
    out = s2_attention(q, k2, v2, group_size=g, causal=causal, backend="torch")
    # Shifted heads (2, 3): first group is tokens [0, 4); unshifted (0, 1): [0, 8).
    torch.testing.assert_close(out[:, :, : n - g], base[:, :, : n - g], rtol=0, atol=1e-6)


def test_sinks_are_global_and_s2_has_none():
    q, k, v = _qkv(n=40, requires_grad=False)
    v2 = v.clone()
    v2[:, :, 1] += 2.0  # a sink token (num_sink=4)
    sf_base, sf_out = (sf_attention(q, k, vv, group_size=8, backend="torch") for vv in (v, v2))
    s2_base, s2_out = (s2_attention(q, k, vv, group_size=8, backend="torch") for vv in (v, v2))
    assert (sf_out[:, :, -1] - sf_base[:, :, -1]).abs().min() > 1e-4  # every head, last token
    torch.testing.assert_close(s2_out[:, :, 8:], s2_base[:, :, 8:], rtol=0, atol=0)


def test_padded_keys_have_no_influence():
    q, k, v = _qkv(n=27, requires_grad=False)
    keep = _keep(2, 27)
    base = sf_attention(q, k, v, group_size=8, attention_mask=keep, causal=False, backend="torch")
    k2, v2 = k.clone(), v.clone()
    for t in (k2, v2):
        t[~keep[:, None].expand_as(t[..., 0])] = 100.0
    out = sf_attention(q, k2, v2, group_size=8, attention_mask=keep, causal=False, backend="torch")
    torch.testing.assert_close(out, base, rtol=0, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_reference(dtype):
    q, k, v = _qkv(n=50, hk=2, requires_grad=False)
    qh, kh, vh = (t.to(dtype).requires_grad_() for t in (q, k, v))
    for keep in (None, _keep(2, 50)):
        out = sf_attention(qh, kh, vh, group_size=16, attention_mask=keep, backend="torch")
        assert out.dtype == dtype
        ref = naive_sparse(qh.float(), kh.float(), vh.float(), 16, 4, True, keep)
        tol = 2e-2 if dtype == torch.bfloat16 else 3e-3
        torch.testing.assert_close(out.float(), ref, rtol=tol, atol=tol)
        grads = torch.autograd.grad(out.float().sum(), (qh, kh, vh))
        assert all(g.dtype == dtype and torch.isfinite(g).all() for g in grads)


def test_reference_cost_is_per_group(monkeypatch):
    """O(N·G): every SDPA call sees at most G (+ sink) keys per query, never the whole sequence."""
    shapes = []
    real_sdpa = F.scaled_dot_product_attention

    def recording(q, k, v, **kw):
        shapes.append((q.shape[:-1].numel(), k.shape[-2]))  # all query rows (groups folded in batch)
        return real_sdpa(q, k, v, **kw)

    monkeypatch.setattr(sparse_ref.F, "scaled_dot_product_attention", recording)
    q, k, v = _qkv(b=1, n=256, requires_grad=False)
    sf_attention(q, k, v, group_size=32, num_sink=4, backend="torch")
    assert shapes and max(kv for _, kv in shapes) <= 32 + 4
    scores = sum(rows * kv for rows, kv in shapes)
    assert scores <= 4 * 256 * (32 + 4) * 1.25  # heads × N × (G + sinks), dummy rows included
    assert scores < 4 * 256 * 256 / 5  # far below dense


def test_bad_inputs_are_named():
    q, k, v = _qkv(requires_grad=False)
    with pytest.raises(ValueError, match="group_size"):
        sf_attention(q, k, v, group_size=0)
    with pytest.raises(ValueError, match="num_sink"):
        sf_attention(q, k, v, group_size=8, num_sink=-1)
    with pytest.raises(ValueError, match="kv heads must divide"):
        s2_attention(q, k[:, :3], v[:, :3], group_size=8)
    with pytest.raises(ValueError, match="attention_mask"):
        s2_attention(q, k, v, group_size=8, attention_mask=torch.ones(2, 5))
    with pytest.raises(ValueError, match="same shape"):
        s2_attention(q, k, v[:, :, :5], group_size=8)
    with pytest.raises(ValueError, match="expected"):
        s2_attention(q[0], k, v, group_size=8)
