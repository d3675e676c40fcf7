"""H2O and local-window KV caches on a tiny random Llama (GQA: 4 query heads, 2 KV heads).

    .venv/bin/python -m pytest tests/convert/test_h2o_cache.py -q -p no:cacheprovider

`initializer_range=0.2` makes the random attention peaked, so heavy hitters are not simply the oldest tokens.
"""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM, LogitsProcessor, LogitsProcessorList
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

from athanor.convert.h2o_cache import H2OCache, LocalWindowCache, enable_h2o, teacher_forced_nll

HEADS, KV_HEADS, HEAD_DIM, LAYERS = 4, 2, 16, 2


@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                         num_key_value_heads=KV_HEADS, vocab_size=100, max_position_embeddings=512,
                         initializer_range=0.2, bos_token_id=None, eos_token_id=None, pad_token_id=0)
    return enable_h2o(LlamaForCausalLM(config).eval())


def prompt(length: int, seed: int = 1, batch: int = 1) -> torch.Tensor:
    return torch.randint(1, 100, (batch, length), generator=torch.Generator().manual_seed(seed))


def generate(model, ids, cache, new_tokens: int, processors=(), **kwargs):
    return model.generate(ids, cache=cache, max_new_tokens=new_tokens, do_sample=False, output_scores=True,
                          return_dict_in_generate=True, logits_processor=LogitsProcessorList(processors), **kwargs)


class SizeProbe(LogitsProcessor):
    """Records (tokens seen, tokens kept per layer) after every forward pass of `generate`."""

    def __init__(self, cache):
        self.cache, self.sizes = cache, []

    def __call__(self, input_ids, scores):
        self.sizes.append((self.cache.get_seq_length(), [layer.kept() for layer in self.cache.layers]))
        return scores


def kv_bytes_for(tokens: int) -> int:
    return tokens * LAYERS * 2 * KV_HEADS * HEAD_DIM * 4  # layers x (k, v) x heads x dim x float32


@pytest.mark.parametrize("make_cache", [lambda: H2OCache(heavy=32, recent=32), lambda: H2OCache(heavy=1.0, recent=0),
                                        lambda: LocalWindowCache(64), lambda: LocalWindowCache(1.0)],
                         ids=["h2o-count", "h2o-ratio", "window-count", "window-ratio"])
def test_budget_at_least_length_equals_dynamic_cache(model, make_cache):
    ids = prompt(9)
    model.set_attn_implementation("sdpa")
    try:
        reference = generate(model, ids, DynamicCache(config=model.config), 30)
    finally:
        enable_h2o(model)
    cache = make_cache()
    out = generate(model, ids, cache, 30)
    assert torch.equal(out.sequences, reference.sequences)
    assert all(torch.equal(a, b) for a, b in zip(out.scores, reference.scores))
    assert cache.kept() == 38 and cache.kv_bytes() == cache.max_kv_bytes == kv_bytes_for(38)


@pytest.mark.parametrize("make_cache", [lambda: H2OCache(heavy=8, recent=8), lambda: LocalWindowCache(16)],
                         ids=["h2o", "window"])
def test_never_exceeds_budget(model, make_cache):
    cache = make_cache()
    probe = SizeProbe(cache)
    out = generate(model, prompt(10), cache, 60, [probe])
    assert len(probe.sizes) == 60 and probe.sizes[-1][0] == 69
    assert all(kept == [min(seen, 16)] * LAYERS for seen, kept in probe.sizes)
    assert cache.max_kv_bytes == cache.kv_bytes() == kv_bytes_for(16)
    assert all(torch.isfinite(s).all() for s in out.scores)
    for layer in cache.layers:  # the newest token is always kept
        assert (layer.positions.max(dim=-1).values == 68).all()


def test_ratio_budget_grows_with_tokens_seen(model):
    cache = H2OCache()  # 10% + 10%, rounded up
    probe = SizeProbe(cache)
    generate(model, prompt(20), cache, 50, [probe])
    expected = 4  # after the 20-token prompt: 2 + 2
    for seen, kept in probe.sizes:  # evicted tokens are gone: one step adds at most one token
        expected = min(expected + (seen > 20), 2 * -(-seen // 10))
        assert kept == [expected] * LAYERS
    assert probe.sizes[-1] == (69, [14] * LAYERS)


def hand_scores(model, ids: torch.Tensor) -> list[torch.Tensor]:
    """Per layer, eager softmax(QK^T/sqrt(d) + causal) column sums, summed over the queries of each KV head."""
    model.set_attn_implementation("eager")
    try:
        attentions = model(ids, output_attentions=True).attentions
    finally:
        enable_h2o(model)
    return [a.sum(dim=2).view(a.shape[0], KV_HEADS, HEADS // KV_HEADS, -1).sum(dim=2) for a in attentions]


def expected_kept(scores: torch.Tensor, heavy: int, recent: int) -> torch.Tensor:
    older = scores.shape[-1] - recent
    top = scores[..., :older].topk(heavy, dim=-1).indices
    tail = torch.arange(older, scores.shape[-1]).expand(*scores.shape[:2], recent)
    return torch.cat([top, tail], dim=-1).sort(dim=-1).values


@torch.no_grad()
def test_heavy_hitters_are_top_accumulated_scores(model):
    ids, heavy, recent = prompt(40, seed=2, batch=2), 6, 5
    cache = H2OCache(heavy=heavy, recent=recent)
    model(ids, cache=cache, use_cache=True)
    for layer, scores in zip(cache.layers, hand_scores(model, ids)):
        kept = expected_kept(scores, heavy, recent)
        assert not torch.equal(kept[..., :heavy], torch.arange(heavy).expand_as(kept[..., :heavy]))  # not trivial
        assert torch.equal(layer.positions, kept)
        torch.testing.assert_close(layer.scores, scores.gather(2, kept), rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_scores_accumulate_over_decoding_steps(model):
    """Second eviction, layer 0: the new token's attention over the kept set, computed from the projections."""
    ids, heavy, recent = prompt(30, seed=3), 5, 4
    cache = H2OCache(heavy=heavy, recent=recent)
    model(ids, cache=cache, use_cache=True)
    layer = cache.layers[0]
    keys, scores, positions = layer.keys.clone(), layer.scores.clone(), layer.positions.clone()
    token = prompt(1, seed=4)
    model(token, cache=cache, use_cache=True)

    attn = model.model.layers[0].self_attn
    hidden = model.model.layers[0].input_layernorm(model.model.embed_tokens(token))
    cos, sin = model.model.rotary_emb(hidden, position_ids=torch.tensor([[30]]))
    q = attn.q_proj(hidden).view(1, 1, HEADS, HEAD_DIM).transpose(1, 2)
    k = attn.k_proj(hidden).view(1, 1, KV_HEADS, HEAD_DIM).transpose(1, 2)
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    all_keys = repeat_kv(torch.cat([keys, k], dim=2), HEADS // KV_HEADS)
    weights = (q @ all_keys.transpose(-1, -2) * HEAD_DIM**-0.5).softmax(dim=-1)[:, :, 0]
    total = torch.cat([scores, torch.zeros(1, KV_HEADS, 1)], dim=-1) + weights.view(1, KV_HEADS, 2, -1).sum(dim=2)
    index = expected_kept(total, heavy, recent)
    all_positions = torch.cat([positions, torch.full((1, KV_HEADS, 1), 30)], dim=-1)
    assert torch.equal(layer.positions, all_positions.gather(2, index))
    torch.testing.assert_close(layer.scores, total.gather(2, index), rtol=1e-5, atol=1e-5)


def test_local_window_keeps_exactly_the_last_positions(model):
    cache = LocalWindowCache(12)
    generate(model, prompt(7, batch=2), cache, 25)
    seen = cache.get_seq_length()
    assert seen == 31
    for layer in cache.layers:
        assert torch.equal(layer.positions, torch.arange(seen - 12, seen).expand(2, KV_HEADS, 12))


def test_teacher_forcing_longer_than_budget(model):
    ids = prompt(80, seed=5)
    with torch.no_grad():
        full = torch.nn.functional.cross_entropy(model(ids).logits[0, :-1], ids[0, 1:], reduction="none")
    torch.testing.assert_close(teacher_forced_nll(model, ids, H2OCache(heavy=100, recent=0))[0], full,
                               rtol=1e-5, atol=1e-5)
    for cache, chunk in [(H2OCache(8, 8), 1), (H2OCache(8, 8), 4), (LocalWindowCache(16), 1)]:
        nll = teacher_forced_nll(model, ids, cache, chunk_size=chunk)
        assert nll.shape == (1, 79) and torch.isfinite(nll).all()
        assert cache.kept() == 16 and cache.get_seq_length() == 79
        assert not torch.allclose(nll, full[None])  # evictions changed the predictions


@pytest.mark.parametrize("chunk", [1, 4])
@torch.no_grad()
def test_positions_and_causality_after_eviction(model, chunk):
    """Local window, fed in chunks: equals one full forward whose mask lets token t see [chunk start - 8, t]."""
    ids, budget = prompt(40, seed=8), 8
    nll = teacher_forced_nll(model, ids, LocalWindowCache(budget), chunk_size=chunk)
    t = torch.arange(40)
    start = t // chunk * chunk
    visible = (t[None] <= t[:, None]) & (t[None] >= start[:, None] - budget)
    logits = model(ids, attention_mask=visible[None, None]).logits
    full = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="none")
    torch.testing.assert_close(nll[0], full, rtol=1e-5, atol=1e-5)


def test_left_padded_batch_matches_single_sequences(model):
    """Padding survives eviction: each row of a left-padded batch generates as it does alone.

    The prefill keeps 3 of the short row's 5 pads (14 tokens, budget 12): they must stay masked after eviction.
    """
    long, short = prompt(14, seed=6), prompt(9, seed=7)
    ids = torch.cat([long, torch.cat([torch.zeros(1, 5, dtype=torch.long), short], dim=1)])
    mask = (torch.arange(14) >= torch.tensor([[0], [5]])).long()
    cache = H2OCache(heavy=6, recent=6)
    batch = generate(model, ids, cache, 12, attention_mask=mask)
    assert cache.get_seq_length() == 25 and cache.kept() == 12
    for row, single_ids in enumerate([long, short]):
        single = generate(model, single_ids, H2OCache(heavy=6, recent=6), 12)
        assert torch.equal(batch.sequences[row, 14:], single.sequences[0, single_ids.shape[1]:])
        for a, b in zip(batch.scores, single.scores):
            torch.testing.assert_close(a[row], b[0], rtol=1e-4, atol=1e-4)


def test_h2o_needs_its_attention(model):
    model.set_attn_implementation("sdpa")
    try:
        cache = H2OCache(heavy=2, recent=2)
        model(prompt(5), cache=cache, use_cache=True)
        with pytest.raises(RuntimeError, match="enable_h2o"):
            model(prompt(1), cache=cache, use_cache=True)
    finally:
        enable_h2o(model)


@pytest.mark.parametrize("kwargs", [{"heavy": -1}, {"heavy": 0, "recent": 0}, {"recent": "10%"}, {"heavy": True}])
def test_bad_budgets(kwargs):
    with pytest.raises(ValueError, match="heavy|recent"):
        H2OCache(**kwargs)
