"""S2/SF-Attn through FlexAttention (`torch.nn.attention.flex_attention`): the CUDA path.

The mask is `kernels.sparse_attention`'s (same group, or a sink key; causal; padding), written once as
`visible` on index tensors: FlexAttention evaluates it per element inside its kernel (as `mask_mod`),
and `block_mask` evaluates the same function on whole rows of positions to find which 128×128 tiles
are empty (skipped), full (no mask evaluated) or partial. The block mask depends only on the length,
group, sinks, causality, wrap-around and head count, so it is built once per such key and device and
cached; building it never holds an N×N mask (rows are evaluated a chunk at a time).

Padding (`keep`, bool [B, N]) changes per batch, so it is not baked into the cached tiles: the cached
full tiles are demoted to partial ones and the mask function reads `keep[b, kv]`, so every visited
tile applies the padding. Queries that see no key get zeros, as on the reference path (FlexAttention
outputs 0 for a fully masked row). GQA goes through `enable_gqa` (no K/V repeat).

`wrap=True` is LongLoRA's rolled S2-Attn: the shifted heads' tokens are rolled by −G/2, so their last
group holds the sequence's last G/2 tokens and its first G/2 tokens, and causality is by rolled
position (an early token then sees the end of the sequence, as in LongLoRA's training code).

On CUDA FlexAttention runs compiled (`torch.compile`; lengths, groups and sink counts reach the
kernel as values, so they do not multiply compilations: see `_mask_mod`). On CPU
it runs forward only (PyTorch has no CPU backward for it): compiled, or eagerly with
`compiled=False` (eager materialises the N×N scores: tests at tiny sizes only).
Tests: `.venv/bin/python -m pytest tests/kernels/test_sparse_flex.py -q`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch.nn.attention.flex_attention import BlockMask, flex_attention

Num = int | torch.Tensor
BLOCK = 128  # FlexAttention's default tile (its CUDA kernels' block sizes divide it)
_ROW_CHUNK = 8  # query tiles evaluated at a time when building a block mask: 8·128 rows × N keys


def visible(shifted: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor, *, n: Num, group: Num,
            sinks: Num | None, causal: bool, wrap: bool) -> torch.Tensor:
    """True where query `q_idx` sees key `kv_idx` (broadcasting index tensors); `shifted` marks heads
    whose groups are shifted by group // 2; `sinks` None: no sink tokens. Used both inside
    FlexAttention (numbers as 0-d tensors) and to build block masks (numbers as ints)."""
    half = group // 2
    if wrap:  # positions after rolling the shifted heads by −G/2 (LongLoRA; S2 has no sinks)
        # (p − G/2) mod n written with a non-negative left operand: compiled kernels need not agree
        # with Python on the sign of a remainder.
        back = n - half % n
        qp = torch.where(shifted, (q_idx + back) % n, q_idx)
        kp = torch.where(shifted, (kv_idx + back) % n, kv_idx)
        seen = qp // group == kp // group
    else:
        off = torch.where(shifted, half, 0)
        qp, kp = q_idx, kv_idx
        seen = (q_idx + off) // group == (kv_idx + off) // group
        if sinks is not None:
            seen = seen | (kv_idx < sinks)
    return seen & (kp <= qp) if causal else seen


@functools.lru_cache(maxsize=32)
def _mask_mod(heads: int, n: int, group: int, sinks: int, causal: bool, wrap: bool,
              device: torch.device) -> Callable:
    """One function object per key. Its numbers are 0-d tensors on the device: torch.compile takes them
    as inputs instead of specialising on their values, so another group, sink count or length is no new
    compilation (past 8 compilations of `flex_attention` in a process, dynamo stops compiling and
    FlexAttention silently runs its dense eager form). Causality, wrap-around and having sinks at all
    change the kernel's structure and do compile separately."""
    first_shifted, n_t, group_t, sinks_t = (torch.tensor(x, device=device)
                                           for x in (heads - heads // 2, n, group, sinks))
    sinks_or_none = sinks_t if sinks else None

    def mask_mod(b, h, q_idx, kv_idx):
        return visible(h >= first_shifted, q_idx, kv_idx, n=n_t, group=group_t, sinks=sinks_or_none,
                       causal=causal, wrap=wrap)

    return mask_mod


def _padded_mask_mod(base: Callable, keep: torch.Tensor) -> Callable:
    def mask_mod(b, h, q_idx, kv_idx):
        return base(b, h, q_idx, kv_idx) & keep[b, kv_idx]

    return mask_mod


def _tile_masks(n: int, group: int, sinks: int, causal: bool, wrap: bool,
                device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(any, all) visible per tile, bool [2, tiles, tiles] for the unshifted and the shifted pattern.
    Positions past n count as not visible, so a last partial tile is never full (as in create_block_mask)."""
    tiles = -(-n // BLOCK)
    kv = torch.arange(tiles * BLOCK, device=device)
    shifted = torch.tensor([False, True], device=device)[:, None, None]
    anys, alls = [], []
    for t0 in range(0, tiles, _ROW_CHUNK):
        q = torch.arange(t0 * BLOCK, min(t0 + _ROW_CHUNK, tiles) * BLOCK, device=device)
        vis = visible(shifted, q[:, None], kv[None, :], n=n, group=group, sinks=sinks or None, causal=causal,
                      wrap=wrap)
        vis = vis & (q[:, None] < n) & (kv[None, :] < n)
        vis = vis.view(2, -1, BLOCK, tiles, BLOCK)
        anys.append(vis.any(dim=(2, 4)))
        alls.append(vis.all(dim=(2, 4)))
    return torch.cat(anys, dim=1), torch.cat(alls, dim=1)


def _ordered(dense: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Tile rows as (count, indices): the visited tiles' column indices first, ascending."""
    counts = dense.sum(dim=-1, dtype=torch.int32)
    indices = dense.to(torch.int8).argsort(dim=-1, descending=True, stable=True).to(torch.int32)
    return counts, indices.contiguous()


@functools.lru_cache(maxsize=32)
def _cached_tiles(n: int, group: int, sinks: int, causal: bool, wrap: bool, heads: int,
                  device: torch.device) -> tuple[torch.Tensor, ...]:
    """(partial counts, partial indices, full counts, full indices), each [1, heads, tiles(, tiles)]."""
    anys, alls = _tile_masks(n, group, sinks, causal, wrap, device)
    pattern = (torch.arange(heads, device=device) >= heads - heads // 2).long()  # per head: 0 or 1
    partial, full = (anys & ~alls)[pattern][None], alls[pattern][None]
    return (*_ordered(partial), *_ordered(full))


def block_mask(n: int, heads: int, group: int, sinks: int, causal: bool, wrap: bool, device: torch.device,
               keep: torch.Tensor | None = None) -> BlockMask:
    """The BlockMask for `heads` query heads of length n (tiles cached); with `keep` [B, N] the padding
    is applied by the mask function on every visited tile (no tile is treated as full)."""
    part_n, part_i, full_n, full_i = _cached_tiles(n, group, sinks, causal, wrap, heads, torch.device(device))
    mask_mod = _mask_mod(heads, n, group, sinks, causal, wrap, torch.device(device))
    if keep is None:
        return BlockMask.from_kv_blocks(part_n, part_i, full_n, full_i, BLOCK_SIZE=BLOCK, mask_mod=mask_mod,
                                        seq_lengths=(n, n))
    # Full tiles join the partial ones: a tile's visited set is the union of both (disjoint) lists.
    anys = _dense(part_n, part_i) | _dense(full_n, full_i)
    counts, indices = _ordered(anys)
    return BlockMask.from_kv_blocks(counts, indices, BLOCK_SIZE=BLOCK, mask_mod=_padded_mask_mod(mask_mod, keep),
                                    seq_lengths=(n, n))


def _dense(counts: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Inverse of `_ordered`: bool [..., tiles, tiles]."""
    tiles = indices.shape[-1]
    valid = torch.arange(tiles, device=indices.device) < counts[..., None]
    dense = torch.zeros(*indices.shape[:-1], tiles, dtype=torch.bool, device=indices.device)
    return dense.scatter(-1, indices.long(), valid)


@functools.cache
def _compiled_flex() -> Callable:
    # Default (automatic) dynamic shapes: a second sequence length recompiles once with the length
    # symbolic, later lengths reuse that graph.
    return torch.compile(flex_attention)


def sparse_attention_flex(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group_size: int, num_sink: int,
                          causal: bool, keep: torch.Tensor | None, scale: float, wrap: bool = False,
                          compiled: bool = True) -> torch.Tensor:
    """S2/SF attention on `[B, H, N, D]` (K/V `[B, HK, N, D]`), output in q's dtype. `keep` bool [B, N]
    or None. `compiled=False` runs FlexAttention eagerly (dense N×N scores; for tests and debugging)."""
    if q.device.type == "cpu" and torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        raise ValueError("FlexAttention has no backward on CPU: run it under torch.no_grad(), or use "
                         "backend='torch' (the reference) to train on CPU")
    b, h, n, _ = q.shape
    mask = block_mask(n, h, group_size, num_sink, causal, wrap, q.device,
                      None if keep is None else keep.to(device=q.device, dtype=torch.bool))
    attend = _compiled_flex() if compiled else flex_attention
    return attend(q, k, v, block_mask=mask, scale=scale, enable_gqa=k.shape[1] != h)
