"""Linear attention reference path: against a dense N×N computation, causality, layouts, GQA, dtypes,
padding masks, separate query/key feature maps.

Run: `.venv/bin/python -m pytest tests/kernels/test_linear_attention.py -q`
"""

from __future__ import annotations

import pytest
import torch
from attention_naive import naive_linear, repeat_kv
from torch import nn

from athanor.kernels.feature_maps import HedgehogFeatureMap, elu_plus_one, relu_map
from athanor.kernels.linear_attention import linear_attention


def _qkv(b=2, h=2, n=23, d=8, dv=None, hk=None, seed=0, requires_grad=True):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, n, d, generator=g)
    k = torch.randn(b, hk or h, n, d, generator=g)
    v = torch.randn(b, hk or h, n, dv or d, generator=g)
    return [t.requires_grad_(requires_grad) for t in (q, k, v)]


def _grads(out: torch.Tensor, inputs, weight: torch.Tensor | None = None) -> list[torch.Tensor]:
    if weight is None:
        weight = torch.linspace(-1, 1, out.numel()).view_as(out)  # a non-symmetric upstream gradient
    return list(torch.autograd.grad((out * weight).sum(), inputs))


def _keep(b: int, n: int) -> torch.Tensor:
    keep = torch.ones(b, n, dtype=torch.bool)
    keep[0, :3] = False  # left padding
    keep[-1, n - 5 :] = False  # right padding
    return keep


def _hedgehog(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Hedgehog features written out here, independent of kernels.feature_maps."""
    proj = torch.einsum("bhnd,hdf->bhnf", x, weight)
    return torch.cat([proj.softmax(-1), (-proj).softmax(-1)], dim=-1)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("fmap_name", ["elu+1", "relu", "hedgehog"])
@pytest.mark.parametrize("n,chunk", [(1, 4), (23, 4), (23, 64), (32, 8)])
def test_reference_matches_dense(causal, fmap_name, n, chunk):
    q, k, v = _qkv(n=n, dv=6)
    if fmap_name == "hedgehog":
        fmap = HedgehogFeatureMap(num_heads=2, head_dim=8, feature_dim=5)
        inputs = [q, k, v, fmap.weight]
        dense_fmap = fmap
    else:
        fmap = fmap_name
        if fmap_name == "relu":
            # relu zeroes whole rows: shift so no causal prefix has φ(q)·Σφ(k) ≈ 0 (den = eps,
            # where fp32 and the float64 dense result legitimately disagree).
            q, k = (t.detach().add(1.0).requires_grad_() for t in (q, k))
        inputs = [q, k, v]
        dense_fmap = elu_plus_one if fmap_name == "elu+1" else relu_map
    out = linear_attention(q, k, v, causal=causal, feature_map=fmap, chunk_size=chunk, backend="torch")
    ref = naive_linear(dense_fmap(q), dense_fmap(k), v, causal)
    assert out.shape == (2, 2, n, 6)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    for g_out, g_ref in zip(_grads(out, inputs), _grads(ref, inputs)):
        torch.testing.assert_close(g_out, g_ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("fmap", ["elu+1", "hedgehog"])
def test_causal_never_sees_the_future(fmap):
    q, k, v = _qkv(n=40, requires_grad=False)
    feature_map = HedgehogFeatureMap(2, 8) if fmap == "hedgehog" else fmap
    base = linear_attention(q, k, v, causal=True, feature_map=feature_map, chunk_size=8, backend="torch")
    for i in (0, 7, 8, 25, 38):
        q2, k2, v2 = (t.clone() for t in (q, k, v))
        for t in (q2, k2, v2):
            t[:, :, i + 1 :] += 5.0 * torch.randn_like(t[:, :, i + 1 :])
        out = linear_attention(q2, k2, v2, causal=True, feature_map=feature_map, chunk_size=8, backend="torch")
        torch.testing.assert_close(out[:, :, : i + 1], base[:, :, : i + 1], rtol=0, atol=1e-6)
        assert not torch.allclose(out[:, :, i + 1 :], base[:, :, i + 1 :])


def test_noncausal_sees_every_token():
    q, k, v = _qkv(n=12, requires_grad=False)
    base = linear_attention(q, k, v, causal=False, backend="torch")
    v2 = v.clone()
    v2[:, :, -1] += 1.0
    out = linear_attention(q, k, v2, causal=False, backend="torch")
    assert (out[:, :, 0] - base[:, :, 0]).abs().max() > 1e-3


@pytest.mark.parametrize("causal", [False, True])
def test_bnhd_layout_is_the_transpose(causal):
    q, k, v = _qkv(n=17, requires_grad=False)
    out = linear_attention(q, k, v, causal=causal, backend="torch")
    t = [x.transpose(1, 2) for x in (q, k, v)]
    out_t = linear_attention(*t, causal=causal, layout="bnhd", backend="torch")
    assert out_t.shape == (2, 17, 2, 8)
    torch.testing.assert_close(out_t.transpose(1, 2), out)


@pytest.mark.parametrize("ratio", [1, 2, 4])
def test_grouped_query_matches_repeated_kv(ratio):
    q, k, v = _qkv(h=4, hk=4 // ratio, n=19)
    out = linear_attention(q, k, v, causal=True, chunk_size=8, backend="torch")
    ref = naive_linear(elu_plus_one(q), elu_plus_one(repeat_kv(k, 4)), repeat_kv(v, 4), causal=True)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    for g_out, g_ref in zip(_grads(out, [q, k, v]), _grads(ref, [q, k, v])):
        torch.testing.assert_close(g_out, g_ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
def test_half_precision_reference(dtype, causal):
    q, k, v = _qkv(n=50, requires_grad=False)
    qh, kh, vh = (t.to(dtype).requires_grad_() for t in (q, k, v))
    out = linear_attention(qh, kh, vh, causal=causal, chunk_size=16, backend="torch")
    assert out.dtype == dtype
    ref = naive_linear(elu_plus_one(qh.float()), elu_plus_one(kh.float()), vh.float(), causal)
    tol = 2e-2 if dtype == torch.bfloat16 else 2e-3  # one rounding of the output, fp32 inside
    torch.testing.assert_close(out.float(), ref, rtol=tol, atol=tol)
    grads = torch.autograd.grad(out.float().sum(), (qh, kh, vh))
    assert all(g.dtype == dtype and torch.isfinite(g).all() for g in grads)


def test_hedgehog_map():
    fmap = HedgehogFeatureMap(num_heads=3, head_dim=4)
    x = torch.randn(2, 3, 5, 4)
    phi = fmap(x)
    assert phi.shape == (2, 3, 5, 8) and fmap.out_dim == 8
    # Identity start: softmax(x) ⊕ softmax(-x) exactly.
    torch.testing.assert_close(phi, torch.cat([x.softmax(-1), (-x).softmax(-1)], -1))
    q, k, v = _qkv(h=3, d=4, n=9, requires_grad=False)
    linear_attention(q, k, v, causal=False, feature_map=fmap, backend="torch").sum().backward()
    assert fmap.weight.grad is not None and fmap.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="built for"):
        fmap(torch.randn(1, 2, 5, 4))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("fmap_name", ["elu+1", "relu", "hedgehog"])
def test_padding_matches_dense(causal, fmap_name):
    """Pad keys add nothing to S or z (elu+1 folds its "+1" into the GEMMs: pads must not get it)."""
    q, k, v = _qkv(n=23, dv=6)
    if fmap_name == "relu":
        q, k = (t.detach().add(1.0).requires_grad_() for t in (q, k))
    keep = _keep(2, 23)
    fmap = HedgehogFeatureMap(2, 8, feature_dim=5) if fmap_name == "hedgehog" else fmap_name
    dense_fmap = {"elu+1": elu_plus_one, "relu": relu_map}.get(fmap_name, fmap)
    inputs = [q, k, v] + ([fmap.weight] if fmap_name == "hedgehog" else [])
    out = linear_attention(q, k, v, causal=causal, feature_map=fmap, attention_mask=keep, chunk_size=8,
                           backend="torch")
    ref = naive_linear(dense_fmap(q), dense_fmap(k), v, causal, keep=keep)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    assert (out.masked_select(~keep[:, None, :, None]) == 0).all()  # documented: zeros at pad queries
    for g_out, g_ref in zip(_grads(out, inputs), _grads(ref, inputs)):
        torch.testing.assert_close(g_out, g_ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("fmap_name", ["elu+1", "hedgehog"])
def test_padded_batch_equals_each_sequence_alone(causal, fmap_name):
    """At real positions, outputs and gradients are those of the sequence with its pads removed;
    pads (left, right, in the middle) get zero gradient. GQA: K/V heads shared by two query heads."""
    b, n = 3, 21
    keep = torch.ones(b, n, dtype=torch.bool)
    keep[0, :4], keep[1, 15:], keep[2, 5:9] = False, False, False
    q, k, v = _qkv(b=b, h=4, hk=2, n=n)
    fmap = HedgehogFeatureMap(4, 8, feature_dim=5) if fmap_name == "hedgehog" else fmap_name
    kw = dict(causal=causal, feature_map=fmap, chunk_size=8, backend="torch")
    out = linear_attention(q, k, v, attention_mask=keep, **kw)
    weight = torch.linspace(-1, 1, out.numel()).view_as(out)
    grads = _grads(out, [q, k, v], weight)
    for i in range(b):
        real = keep[i].nonzero().squeeze(1)
        alone_in = [t[i : i + 1, :, real].detach().requires_grad_() for t in (q, k, v)]
        alone = linear_attention(*alone_in, **kw)
        torch.testing.assert_close(out[i : i + 1, :, real], alone, rtol=1e-5, atol=1e-6)
        alone_grads = _grads(alone, alone_in, weight[i : i + 1, :, real])
        for g, g_alone in zip(grads, alone_grads):
            torch.testing.assert_close(g[i : i + 1, :, real], g_alone, rtol=1e-5, atol=1e-6)
            assert (g[i, :, ~keep[i]] == 0).all()


def test_attention_mask_forms():
    """bool, 0/1 integers and 0/1 floats mean the same; the bnhd layout takes the same [batch, tokens] mask."""
    q, k, v = _qkv(n=17, requires_grad=False)
    keep = _keep(2, 17)
    base = linear_attention(q, k, v, causal=True, attention_mask=keep, backend="torch")
    for mask in (keep.long(), keep.float()):
        torch.testing.assert_close(linear_attention(q, k, v, causal=True, attention_mask=mask, backend="torch"), base)
    t = [x.transpose(1, 2) for x in (q, k, v)]
    out_t = linear_attention(*t, causal=True, attention_mask=keep, layout="bnhd", backend="torch")
    torch.testing.assert_close(out_t.transpose(1, 2), base)
    with pytest.raises(ValueError, match="attention_mask has shape"):
        linear_attention(q, k, v, causal=True, attention_mask=keep[:, :5])
    with pytest.raises(ValueError, match="eps > 0"):
        linear_attention(q, k, v, causal=True, attention_mask=keep, eps=0.0)


@pytest.mark.parametrize("causal", [False, True])
def test_separate_query_and_key_maps(causal):
    """A pair (query_map, key_map): q goes through the first, k through the second (Hedgehog/LoLCATs)."""
    torch.manual_seed(0)
    fq, fk = HedgehogFeatureMap(2, 8, feature_dim=5), HedgehogFeatureMap(2, 8, feature_dim=5)
    q, k, v = _qkv(n=23, dv=6)
    inputs = [q, k, v, fq.weight, fk.weight]
    out = linear_attention(q, k, v, causal=causal, feature_map=(fq, fk), chunk_size=8, backend="torch")
    ref = naive_linear(_hedgehog(q, fq.weight), _hedgehog(k, fk.weight), v, causal)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    for g_out, g_ref in zip(_grads(out, inputs), _grads(ref, inputs)):
        torch.testing.assert_close(g_out, g_ref, rtol=1e-4, atol=1e-5)
    swapped = linear_attention(q, k, v, causal=causal, feature_map=[fk, fq], chunk_size=8, backend="torch")
    assert (swapped - out).abs().max() > 1e-3  # the two maps really differ: order matters
    as_modules = linear_attention(q, k, v, causal=causal, feature_map=nn.ModuleList([fq, fk]), chunk_size=8,
                                  backend="torch")
    torch.testing.assert_close(as_modules, out, rtol=0, atol=0)


def test_pair_of_named_maps():
    q, k, v = _qkv(n=19, requires_grad=False)
    k = k + 1.0  # relu keys: keep Σφ(k) away from 0
    out = linear_attention(q, k, v, causal=True, feature_map=("elu+1", "relu"), chunk_size=8, backend="torch")
    torch.testing.assert_close(out, naive_linear(elu_plus_one(q), relu_map(k), v, True), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="a pair must be"):
        linear_attention(q, k, v, causal=True, feature_map=("elu+1", "relu", "relu"))
    with pytest.raises(ValueError, match="5 vs 10 features"):
        linear_attention(q, k, v, causal=True, feature_map=(lambda x: x[..., :5].exp(), HedgehogFeatureMap(2, 8, 5)))


def test_bad_inputs_are_named(monkeypatch):
    q, k, v = _qkv(requires_grad=False)
    with pytest.raises(ValueError, match="feature_map='softplus'"):
        linear_attention(q, k, v, causal=True, feature_map="softplus")
    with pytest.raises(ValueError, match="HedgehogFeatureMap"):
        linear_attention(q, k, v, causal=True, feature_map="hedgehog")
    with pytest.raises(ValueError, match="layout"):
        linear_attention(q, k, v, causal=True, layout="nbhd")
    with pytest.raises(ValueError, match="token counts"):
        linear_attention(q, k[:, :, :5], v[:, :, :5], causal=True)
    with pytest.raises(ValueError, match="dtype"):
        linear_attention(q.long(), k, v, causal=True)
    with pytest.raises(ValueError, match="heads"):
        linear_attention(q, k[:, :1], v, causal=True)
    with pytest.raises(ValueError, match="backend"):
        linear_attention(q, k, v, causal=True, backend="cuda")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="CUDA"):
        linear_attention(q, k, v, causal=True, backend="triton")


@pytest.mark.parametrize("n,chunk", [(300, 64), (300, 128), (257, 16), (100, 37)])
@pytest.mark.parametrize("fmap_name", ["elu+1", "hedgehog"])
def test_chunked_causal_matches_dense(n, chunk, fmap_name):
    """The PyTorch chunked path (the CUDA path without fla) at lengths that are not a multiple of the
    chunk, with GQA and padding: outputs and every gradient against the dense N×N computation."""
    q, k, v = _qkv(b=2, h=4, hk=2, n=n, d=8, dv=6)
    keep = _keep(2, n)
    fmap = HedgehogFeatureMap(4, 8, feature_dim=5) if fmap_name == "hedgehog" else fmap_name
    dense_fmap = elu_plus_one if fmap_name == "elu+1" else fmap
    inputs = [q, k, v] + ([fmap.weight] if fmap_name == "hedgehog" else [])
    out = linear_attention(q, k, v, causal=True, feature_map=fmap, attention_mask=keep, chunk_size=chunk,
                           backend="torch")
    ref = naive_linear(dense_fmap(q), dense_fmap(repeat_kv(k, 4)), repeat_kv(v, 4), True, keep=keep)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    for g_out, g_ref in zip(_grads(out, inputs), _grads(ref, inputs)):
        torch.testing.assert_close(g_out, g_ref, rtol=1e-4, atol=1e-5)


def test_chunk_size_does_not_change_the_result():
    """Chunk 1 is the token-by-token recurrence; any chunk size (smaller, equal to, larger than N) agrees."""
    q, k, v = _qkv(n=150, requires_grad=False)
    base = linear_attention(q, k, v, causal=True, chunk_size=1, backend="torch")
    for chunk in (7, 64, 128, 150, 512):
        out = linear_attention(q, k, v, causal=True, chunk_size=chunk, backend="torch")
        torch.testing.assert_close(out, base, rtol=1e-5, atol=1e-6)


def test_dispatch(monkeypatch):
    import athanor.kernels.linear_attention as la

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    for causal in (False, True):
        assert la.linear_path("auto", causal, cpu) == "torch"
    monkeypatch.setattr(la, "fla_available", lambda: True)
    assert la.linear_path("auto", True, cuda) == "fla"
    assert la.linear_path("auto", False, cuda) == "triton"
    with pytest.raises(ValueError, match="needs CUDA"):
        la.linear_path("fla", True, cpu)
    with pytest.raises(ValueError, match="causal only"):
        la.linear_path("fla", False, cuda)
    monkeypatch.setattr(la, "fla_available", lambda: False)
    assert la.linear_path("auto", True, cuda) == "torch"  # the PyTorch chunked path
    with pytest.raises(ValueError, match="not installed"):
        la.linear_path("fla", True, cuda)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_hedgehog_projection_in_input_dtype_keeps_small_features(dtype):
    """fp16/bf16 inputs: the projection runs in their dtype, the softmax in float32, so every feature,
    the smallest included, is float32 and close *relative to itself* to the float64 map: within the
    logits' rounding, 2·max|logit|·u (u: the dtype's unit roundoff), never flushed to zero."""
    fmap = HedgehogFeatureMap(num_heads=2, head_dim=16)
    with torch.no_grad():
        fmap.weight.copy_(torch.randn(fmap.weight.shape, generator=torch.Generator().manual_seed(3)))
    x = torch.randn(1, 2, 40, 16, generator=torch.Generator().manual_seed(4)).to(dtype)
    phi = fmap(x)
    assert phi.dtype == torch.float32
    w = fmap.weight.to(dtype).double()
    ref = _hedgehog(x.double(), w)
    assert ref.min() < 1e-6  # entries a half-precision feature would flush or round away
    u = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}[dtype]
    bound = 2.5 * torch.einsum("bhnd,hdf->bhnf", x.double(), w).abs().max() * u
    assert ((phi.double() - ref) / ref).abs().max() < bound


def test_bnhd_output_is_contiguous_in_the_input_dtype():
    """layout='bnhd' returns contiguous [B, N, H, D] in q's dtype (one transposing, casting copy), so a
    caller merging heads gets a view; values equal the bhnd result."""
    q, k, v = (t.to(torch.bfloat16) for t in _qkv(n=17, requires_grad=False))
    t = [x.transpose(1, 2) for x in (q, k, v)]
    out = linear_attention(*t, causal=False, feature_map=HedgehogFeatureMap(2, 8), layout="bnhd", backend="torch")
    assert out.is_contiguous() and out.dtype == torch.bfloat16 and out.shape == (2, 17, 2, 8)
    ref = linear_attention(q, k, v, causal=False, feature_map=HedgehogFeatureMap(2, 8), backend="torch")
    torch.testing.assert_close(out, ref.transpose(1, 2), rtol=0, atol=0)
