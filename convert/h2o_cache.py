"""H2O (Heavy-Hitter Oracle, Zhang et al. 2023) KV cache and a local-window baseline, as transformers `Cache`s.

    .venv/bin/python -m pytest tests/convert/test_h2o_cache.py -q -p no:cacheprovider

Usage (transformers 5.x, Llama-family models: anything whose attention calls `cache.update` and then the
registered attention function with the returned keys)::

    enable_h2o(model)                                   # attn_implementation "h2o" (sdpa + score side channel)
    cache = H2OCache(heavy=0.1, recent=0.1)              # or absolute token counts: H2OCache(heavy=8, recent=8)
    model.generate(ids, cache=cache, max_new_tokens=64)
    cache.kv_bytes(), cache.max_kv_bytes
    LocalWindowCache(budget=0.2)                         # same budget, most recent tokens only (any attention)

Policy. Per layer, per batch row and per KV head, the cache keeps the `recent` most recent tokens plus the `heavy`
tokens with the highest accumulated attention score among the older ones, and evicts the rest. A float is a
ratio of the tokens seen so far (rounded up: 0.1 keeps 1 token from the first token on), an int an absolute
count. The score of a token is the sum of the softmax weights every later query (and itself) gave it while it
was cached, summed over the query heads that share its KV head (GQA). Between forward passes a layer holds at
most `heavy + recent` tokens; a forward pass of q new tokens attends to the kept tokens plus those q.

How the scores reach the cache. sdpa does not return attention weights, so `enable_h2o` registers an attention
implementation "h2o" with `AttentionInterface` (and sdpa's mask builder under the same name with
`AttentionMaskInterface`). Its output IS `sdpa_attention_forward`'s (bit-identical to plain sdpa); only when the
key tensor it receives was returned by `H2OLayer.update` (which tags it with a weak reference to its layer) does
it also compute softmax(QK^T * scale + mask) in query chunks and hand the column sums to the layer, which
accumulates them and evicts. No transformers internals are patched. If the scores never arrive (another
attention implementation), the next `update` raises.

Positions and masks after eviction (mirrors transformers' sliding-window layers). `get_seq_length()` returns the
number of tokens SEEN, so position ids / RoPE keep counting. `get_mask_sizes(q)` returns
`(kept + q, seen - kept)`: the mask builder then sees the kept tokens as positions just before the new ones,
which is exact for causality because every kept token precedes every new query. The 2-D padding mask is read
at those pseudo-positions too, and that stays exact for left padding: pad tokens start with score -inf, so an
eviction removes pads before any real token, and kept tokens stay in position order, so the kept pads are the
first `pads - evicted` entries, exactly where the mask read at seen-kept, seen-kept+1, ... has its zeros. The
local window keeps a contiguous suffix, so its pseudo-positions are the true ones (any attention works).

Teacher forcing longer than the budget: `teacher_forced_nll` feeds the sequence through the cache in chunks
(default 1 token: the decoding regime H2O is defined for) and scores each next token; with chunk c, tokens in a
chunk see kept + c tokens.

`kv_bytes()` counts keys and values held now; `max_kv_bytes` the most held after any layer's step (the
transient kept+new tensors of a forward pass, the scores and positions are not counted). Not supported:
`crop` (assisted decoding), torch.compile, models whose attention copies the key tensor before calling it.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, PretrainedConfig
from transformers.cache_utils import Cache, CacheLayerMixin
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

H2O_ATTENTION = "h2o"
SCORE_CHUNK = 256
"""Queries per block when computing the attention weights for the scores (bounds the q x kv temporary)."""


def _budget(value: int | float, name: str) -> Callable[[int], int]:
    """Tokens to keep after `seen` tokens: an int is a count, a float a ratio of `seen` (rounded up)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise ValueError(f"{name} must be a non-negative int (tokens) or float (ratio of tokens seen), got {value!r}")
    if isinstance(value, int):
        return lambda seen: value
    return lambda seen: math.ceil(value * seen)


class _BudgetLayer(CacheLayerMixin):
    """One layer's kept keys/values [batch, kv_heads, kept, dim] plus each kept token's position."""

    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self, on_step: Callable[[], None] = lambda: None, max_length: int = -1) -> None:
        super().__init__()
        self.on_step, self.max_length = on_step, max_length
        self.positions: torch.Tensor | None = None  # [batch, kv_heads, kept] int64, index in the fed sequence
        self.seen = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        batch, heads = key_states.shape[:2]
        self.keys = key_states.new_empty(batch, heads, 0, key_states.shape[-1])
        self.values = value_states.new_empty(batch, heads, 0, value_states.shape[-1])
        self.positions = torch.empty(batch, heads, 0, dtype=torch.long, device=self.device)
        self.is_initialized = True

    def _append(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        batch, heads, q = key_states.shape[:3]
        new = torch.arange(self.seen, self.seen + q, device=self.device).expand(batch, heads, q)
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        self.positions = torch.cat([self.positions, new], dim=-1)
        self.seen += q

    def _token_tensors(self) -> dict[str, torch.Tensor]:
        """Every per-token tensor (token axis 2), by attribute name."""
        names = ("keys", "values", "positions", "scores")
        return {n: getattr(self, n) for n in names if getattr(self, n, None) is not None}

    def _keep(self, index: torch.Tensor) -> None:
        """Keep the tokens at `index` [batch, kv_heads, k] (in that order) in every per-token tensor."""
        for name, tensor in self._token_tensors().items():
            idx = index if tensor.dim() == 3 else index[..., None].expand(-1, -1, -1, tensor.shape[-1])
            setattr(self, name, tensor.gather(2, idx))

    def _batch_apply(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        for name, tensor in self._token_tensors().items():
            setattr(self, name, fn(tensor))

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """(kv_length, kv_offset): kept tokens sit at the pseudo-positions just before the new ones."""
        kept = self.kept()
        return kept + query_length, self.seen - kept

    def get_seq_length(self) -> int:
        """Tokens seen (not kept): the next token's position."""
        return self.seen

    def get_max_length(self) -> int:
        return self.max_length

    def kept(self) -> int:
        return 0 if self.keys is None else self.keys.shape[-2]

    def kv_bytes(self) -> int:
        if self.keys is None:
            return 0
        return self.keys.numel() * self.keys.element_size() + self.values.numel() * self.values.element_size()

    def reset(self) -> None:
        for name in self._token_tensors():
            setattr(self, name, None)
        self.seen, self.is_initialized = 0, False

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._batch_apply(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._batch_apply(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._batch_apply(lambda t: t[indices])

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove:
            raise NotImplementedError(f"{type(self).__name__} evicts tokens and cannot be rolled back (crop)")


class LocalWindowLayer(_BudgetLayer):
    """Keeps the most recent `budget` tokens."""

    def __init__(self, budget: int | float, **kwargs) -> None:
        super().__init__(**kwargs)
        self.budget = _budget(budget, "budget")

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args,
               **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        self._append(key_states, value_states)
        keys, values = self.keys, self.values
        keep = self.budget(self.seen)
        if self.kept() > keep:
            start = self.kept() - keep
            self.keys, self.values = self.keys[:, :, start:], self.values[:, :, start:]
            self.positions = self.positions[:, :, start:]
        self.on_step()
        return keys, values


class H2OLayer(_BudgetLayer):
    """Keeps the `recent` most recent tokens plus the `heavy` older ones with the highest accumulated scores."""

    def __init__(self, heavy: int | float, recent: int | float, layer_idx: int = 0, **kwargs) -> None:
        super().__init__(**kwargs)
        self.heavy, self.recent = _budget(heavy, "heavy"), _budget(recent, "recent")
        self.layer_idx = layer_idx
        self.scores: torch.Tensor | None = None  # [batch, kv_heads, kept] float32, accumulated attention (pads -inf)
        self.awaiting_scores = False

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args,
               **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        if self.awaiting_scores:
            raise RuntimeError(
                f"H2OCache layer {self.layer_idx}: the attention scores of the previous step never arrived. Use the "
                f"'{H2O_ATTENTION}' attention implementation: convert.h2o_cache.enable_h2o(model)")
        self._append(key_states, value_states)
        self.awaiting_scores = True
        self.keys._h2o_layer = weakref.ref(self)  # read (and removed) by h2o_attention_forward
        return self.keys, self.values

    def observe(self, scores: torch.Tensor, new_valid: torch.Tensor) -> None:
        """Add this step's column sums [batch, kv_heads, kv] (kept + new tokens), then evict down to the budget.

        `new_valid` [batch, q] is False for padding tokens among the new ones: they start at -inf.
        """
        arrival = torch.zeros_like(new_valid, dtype=scores.dtype).masked_fill(~new_valid, float("-inf"))
        prior = arrival.new_empty(*scores.shape[:2], 0) if self.scores is None else self.scores
        self.scores = torch.cat([prior, arrival[:, None].expand(*scores.shape[:2], -1)], dim=-1) + scores
        self.awaiting_scores = False
        heavy, recent, kept = self.heavy(self.seen), self.recent(self.seen), self.kept()
        if kept > heavy + recent:
            older = kept - recent
            top = self.scores[..., :older].topk(heavy, dim=-1).indices.sort(dim=-1).values
            tail = torch.arange(older, kept, device=top.device).expand(*top.shape[:2], recent)
            self._keep(torch.cat([top, tail], dim=-1))
        self.on_step()


class _BudgetCache(Cache):
    """Layers made on demand by `make_layer(layer_idx)`; tracks the bytes it holds."""

    def __init__(self, make_layer: Callable[[int], _BudgetLayer], num_layers: int = 0) -> None:
        super().__init__(layers=[])
        self._make_layer = make_layer
        self.max_kv_bytes = 0
        for idx in range(num_layers):
            self.layers.append(make_layer(idx))

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args,
               **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        while len(self.layers) <= layer_idx:
            self.layers.append(self._make_layer(len(self.layers)))
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    def kv_bytes(self) -> int:
        """Bytes of keys and values held now, all layers."""
        return sum(layer.kv_bytes() for layer in self.layers)

    def kept(self, layer_idx: int = 0) -> int:
        """Tokens held by one layer (all heads hold the same number)."""
        return self.layers[layer_idx].kept() if layer_idx < len(self.layers) else 0

    def _measure(self) -> None:
        self.max_kv_bytes = max(self.max_kv_bytes, self.kv_bytes())

    def reset(self) -> None:
        super().reset()
        self.max_kv_bytes = 0


def _num_layers(config: PretrainedConfig | None) -> int:
    return 0 if config is None else config.get_text_config(decoder=True).num_hidden_layers


class H2OCache(_BudgetCache):
    """Heavy hitters + recent tokens per layer and KV head. Needs `enable_h2o(model)` (attention "h2o")."""

    def __init__(self, heavy: int | float = 0.1, recent: int | float = 0.1,
                 config: PretrainedConfig | None = None) -> None:
        if heavy == 0 and recent == 0:
            raise ValueError("H2OCache: heavy and recent are both 0, nothing would be kept")
        for name, value in (("heavy", heavy), ("recent", recent)):
            _budget(value, name)
        self.heavy, self.recent = heavy, recent
        fixed = heavy + recent if isinstance(heavy, int) and isinstance(recent, int) else -1
        super().__init__(lambda idx: H2OLayer(heavy, recent, layer_idx=idx, on_step=self._measure, max_length=fixed),
                         _num_layers(config))


class LocalWindowCache(_BudgetCache):
    """The most recent `budget` tokens per layer (int: tokens, float: ratio of tokens seen). Any attention."""

    def __init__(self, budget: int | float = 0.2, config: PretrainedConfig | None = None) -> None:
        if budget == 0:
            raise ValueError("LocalWindowCache: budget 0 keeps nothing")
        _budget(budget, "budget")
        self.budget = budget
        fixed = budget if isinstance(budget, int) else -1
        super().__init__(lambda idx: LocalWindowLayer(budget, on_step=self._measure, max_length=fixed),
                         _num_layers(config))


def attention_column_sums(query: torch.Tensor, key: torch.Tensor, attention_mask: torch.Tensor | None,
                          scaling: float, chunk: int = SCORE_CHUNK) -> torch.Tensor:
    """Sum over queries of softmax(QK^T * scaling + mask), per query head: [batch, heads, kv] float32.

    `key` has the query heads already (repeat_kv). `attention_mask` is bool (True = attend) or additive float,
    broadcastable to [batch, heads, q, kv]; None means causal aligned to the last key (or no mask for one query).
    Fully masked query rows (left padding) contribute nothing.
    """
    q, kv = query.shape[2], key.shape[2]
    keys_t = key.float().transpose(-1, -2)
    total = query.new_zeros(query.shape[0], query.shape[1], kv, dtype=torch.float32)
    for start in range(0, q, chunk):
        rows = slice(start, min(start + chunk, q))
        logits = query[:, :, rows].float() @ keys_t * scaling
        if attention_mask is not None and attention_mask.dtype == torch.bool:
            logits = logits.masked_fill(~attention_mask[..., rows, :], float("-inf"))
        elif attention_mask is not None:
            logits = logits + attention_mask[..., rows, :].float()
        elif q > 1:
            q_pos = torch.arange(rows.start, rows.stop, device=query.device)[:, None] + (kv - q)
            logits = logits.masked_fill(q_pos < torch.arange(kv, device=query.device), float("-inf"))
        total += logits.softmax(dim=-1).nan_to_num(0.0).sum(dim=-2)
    return total


def h2o_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                          **kwargs) -> tuple[torch.Tensor, None]:
    """sdpa attention; when `key` comes from an `H2OLayer`, also report the attention column sums to it."""
    ref = key.__dict__.pop("_h2o_layer", None)
    layer = ref() if ref is not None else None
    if layer is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    groups, q = query.shape[1] // key.shape[1], query.shape[2]
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    output, _ = sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                       **kwargs)
    sums = attention_column_sums(query, repeat_kv(key, groups), attention_mask, scaling)
    sums = sums.view(sums.shape[0], key.shape[1], groups, -1).sum(dim=2)
    new_valid = torch.ones(key.shape[0], q, dtype=torch.bool, device=key.device)
    if attention_mask is not None:  # the last query row sees every new token unless it is padding
        last = attention_mask[:, 0, -1, -q:]
        new_valid = last if last.dtype == torch.bool else last == 0
    layer.observe(sums, new_valid.expand(key.shape[0], q))
    return output, None


def register_h2o_attention() -> None:
    """Register "h2o" with transformers' attention and mask interfaces (idempotent)."""
    AttentionInterface.register(H2O_ATTENTION, h2o_attention_forward)
    AttentionMaskInterface.register(H2O_ATTENTION, sdpa_mask)


def enable_h2o(model: torch.nn.Module) -> torch.nn.Module:
    """Switch `model` to the "h2o" attention (plain sdpa unless an `H2OCache` is in use); returns it."""
    register_h2o_attention()
    model.set_attn_implementation(H2O_ATTENTION)
    return model


@torch.no_grad()
def teacher_forced_nll(model: torch.nn.Module, input_ids: torch.Tensor, cache: Cache,
                       chunk_size: int = 1) -> torch.Tensor:
    """Per-token NLL [batch, T-1] of `input_ids` [batch, T], fed through `cache` `chunk_size` tokens at a time."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    length, losses = input_ids.shape[1], []
    for start in range(0, length - 1, chunk_size):
        stop = min(start + chunk_size, length - 1)
        logits = model(input_ids=input_ids[:, start:stop], cache=cache, use_cache=True).logits
        targets = input_ids[:, start + 1:stop + 1]
        losses.append(F.cross_entropy(logits.float().transpose(1, 2), targets, reduction="none"))
    return torch.cat(losses, dim=1)
