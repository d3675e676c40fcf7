"""S2/SF-Attn through FlexAttention against the PyTorch reference and a dense masked computation, on CPU.

FlexAttention has no CPU backward, so its forward is checked here (gradients: benchmarks/gpu_all.sh).
Eagerly FlexAttention evaluates the mask function on every (query, key) pair and ignores the block
mask's tiles, so the tiles are checked on their own (against `create_block_mask` on the dense mask)
and the compiled path, which skips empty tiles and evaluates no mask on full ones, runs once here
with padding (full tiles demoted) at a length that has empty, full and partial tiles.
Run: `.venv/bin/python -m pytest tests/kernels/test_sparse_flex.py -q`
"""

from __future__ import annotations

import warnings

import pytest
import torch
from attention_naive import naive_sparse, sparse_mask
from torch.nn.attention.flex_attention import create_block_mask

from athanor.kernels._sparse_flex import BLOCK, block_mask, sparse_attention_flex
from athanor.kernels.sparse_attention import s2_attention, sf_attention, sparse_path


def _qkv(b: int, h: int, hk: int, n: int, d: int = 16, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, heads, n, d, generator=g) for heads in (h, hk, hk)]


def _keep(b: int, n: int) -> torch.Tensor:
    keep = torch.ones(b, n, dtype=torch.bool)
    keep[0, :3] = False  # left padding: the first queries see no key at all (causal)
    keep[-1, n - 5:] = False  # right padding
    return keep


def _flex(q, k, v, g, s, causal, keep, wrap=False, compiled=False):
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        return sparse_attention_flex(q, k, v, g, s, causal, keep, q.shape[-1] ** -0.5, wrap, compiled)


CASES = [  # b, h, hk, n, group, sinks, causal, padded, wrap
    (2, 4, 4, 37, 8, 4, True, False, False),  # n not a multiple of G
    (2, 4, 2, 37, 8, 4, False, False, False),  # GQA 2, non-causal
    (1, 4, 1, 40, 8, 4, True, True, False),  # GQA 4, padding
    (2, 3, 3, 30, 6, 5, True, True, False),  # odd heads, sinks reaching the second shifted group
    (2, 3, 3, 30, 6, 5, False, True, False),  # non-causal: early groups see sinks after them
    (1, 2, 1, 1, 4, 4, True, False, False),  # one token
    (1, 2, 2, 9, 32, 4, True, False, False),  # group larger than the sequence
    (1, 4, 2, 300, 64, 4, True, True, False),  # several tiles of 128
    (2, 4, 2, 32, 8, 0, True, False, True),  # LongLoRA's rolled S2, causal
    (2, 4, 4, 29, 8, 0, False, True, True),  # rolled, non-causal, partial last group, padding
    (1, 4, 2, 260, 64, 0, True, True, True),
]


@pytest.mark.parametrize("b,h,hk,n,g,s,causal,padded,wrap", CASES)
def test_flex_forward_matches_reference(b, h, hk, n, g, s, causal, padded, wrap):
    q, k, v = _qkv(b, h, hk, n)
    keep = _keep(b, n) if padded else None
    out = _flex(q, k, v, g, s, causal, keep, wrap)
    if wrap:
        ref = s2_attention(q, k, v, group_size=g, causal=causal, attention_mask=keep, wrap=True, backend="torch")
    else:
        ref = sf_attention(q, k, v, group_size=g, num_sink=s, causal=causal, attention_mask=keep, backend="torch")
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out, naive_sparse(q, k, v, g, s, causal, keep, wrap), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_flex_half_precision(dtype):
    q, k, v = (t.to(dtype) for t in _qkv(2, 4, 2, 50))
    keep = _keep(2, 50)
    out = _flex(q, k, v, 16, 4, True, keep)
    assert out.dtype == dtype
    ref = naive_sparse(q.float(), k.float(), v.float(), 16, 4, True, keep)
    tol = 2e-2 if dtype == torch.bfloat16 else 3e-3
    torch.testing.assert_close(out.float(), ref, rtol=tol, atol=tol)


@pytest.mark.parametrize("n,g,s,causal,wrap", [
    (700, 256, 4, True, False),  # empty, full and partial tiles; a partial last tile
    (640, 128, 0, False, False),  # groups aligned with the tiles
    (512, 200, 130, False, False),  # sinks spanning more than a tile
    (768, 256, 0, True, True),  # rolled: the wrapped group's tiles at both ends
    (100, 32, 4, True, False),  # one tile
])
def test_tiles_match_create_block_mask(n, g, s, causal, wrap):
    """Our tiles, built from rows of positions, against torch's own tiles of the dense naive mask."""
    heads = 3
    dense = sparse_mask(n, heads, g, s, causal, None, wrap)[0]
    expected = create_block_mask(lambda b, h, q, kv: dense[h, q, kv], 1, heads, n, n, device="cpu")
    ours = block_mask(n, heads, g, s, causal, wrap, torch.device("cpu"))
    for name in ("kv_num_blocks", "full_kv_num_blocks", "q_num_blocks", "full_q_num_blocks"):
        torch.testing.assert_close(getattr(ours, name), getattr(expected, name), rtol=0, atol=0)
    assert torch.equal(ours.to_dense(), expected.to_dense())
    assert int(ours.full_kv_num_blocks.sum()) > 0 or n <= BLOCK or g < BLOCK


def test_padding_demotes_full_tiles():
    plain = block_mask(700, 4, 256, 4, True, False, torch.device("cpu"))
    padded = block_mask(700, 4, 256, 4, True, False, torch.device("cpu"), keep=_keep(2, 700))
    assert padded.full_kv_num_blocks is None
    assert torch.equal(padded.to_dense(), plain.to_dense())  # the same tiles visited, all as partial


@pytest.mark.parametrize("wrap", [False, True])
def test_compiled_flex_with_padding_and_gqa(wrap):
    """The compiled path skips empty tiles and evaluates no mask on full ones: with padding every tile
    must still apply it (padding inside a tile that is full without it). Rolled S2 too: its mask takes
    remainders of shifted positions inside the compiled kernel."""
    n = 700
    q, k, v = _qkv(2, 4, 2, n)
    keep = _keep(2, n)
    keep[1, 130:150] = False  # inside a full tile of the unshifted heads' first group
    sinks = 0 if wrap else 4
    out = _flex(q, k, v, 256, sinks, True, keep, wrap=wrap, compiled=True)
    if wrap:
        ref = s2_attention(q, k, v, group_size=256, causal=True, attention_mask=keep, wrap=True, backend="torch")
    else:
        ref = sf_attention(q, k, v, group_size=256, num_sink=4, causal=True, attention_mask=keep, backend="torch")
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


def test_dispatch():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert sparse_path("auto", cpu) == "torch" and sparse_path("auto", cuda) == "flex"
    assert sparse_path("flex", cpu) == "flex"
    with pytest.raises(ValueError, match="no wrap-around"):
        sparse_path("triton", cuda, wrap=True)
    with pytest.raises(ValueError, match="backend="):
        sparse_path("sdpa", cpu)
    q, k, v = (t.requires_grad_() for t in _qkv(1, 2, 2, 16))
    with pytest.raises(ValueError, match="no backward on CPU"):
        sf_attention(q, k, v, group_size=8, backend="flex")
