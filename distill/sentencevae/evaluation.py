"""SentenceVAE evaluation: reconstruction, perplexity and generation cost, original LM vs SLLM.

    .venv/bin/python -m pytest tests/distill/sentencevae -q

Perplexity counts every token of each held-out passage, the first sentence included: the LM
predicts token i from BOS and tokens < i; the SLLM predicts sentence j from the start vector and
sentences < j, and pays for each sentence's tokens and its end-of-sentence token (the boundary is
information the LM gets for free), divided by the same token count. So SLLM perplexity is an upper
bound for a proper token-level model over the same tokens.

Generation: greedy decoding of `gen_tokens` new tokens after the same prompts, batch 1, with KV caches,
the budget counted in generated tokens on both sides alike. The LM emits exactly `gen_tokens` tokens
(EOS does not stop it); the SLLM emits sentences of exactly `sentence_tokens` tokens (the last one cut to
the budget), whatever its decoder's end-of-sentence logits say. Why: the SLLM's work per token falls as
its sentences grow (one SLLM step and one encoder pass per sentence), so a decoder that never ends a
sentence would look cheap and one that ends at once dear; with the lengths fixed, both sides do a fixed
amount of work and the cost compares models, not end-of-sentence habits. `gen_sentence_tokens` (same
key both sides) is the mean generated sentence length: the SLLM's forced length, and for the LM its
output cut into sentences by the same segmentation rules as the data.

`kv_bytes_per_token` is the (S)LLM's KV cache at the end divided by the tokens it covers (prompt +
generated); `mem_bytes_per_token` adds the SLLM decoder's transient cache at its peak. No wall-clock
timing here: `generation_probe` is the unit of work the spine times, teacher and student interleaved.

Per-sample metrics (`PerSample`, `distill/intervals.py`), their rows in held-out order on both sides:
`ppl` (token-weighted: one (summed NLL, tokens) row per passage) and `nll_per_token` (the same rows, their
ratio); `recon_token_acc` (one (correct, tokens) row per sentence, Σ correct / Σ tokens) and `recon_exact`
(one 0/1 row per sentence, their mean), overall and per length bucket. The generation costs are global
quantities over a few prompts (plain floats).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from athanor.convert.module_utils import count_params
from athanor.convert.sentencevae.sllm import SentenceVAEModel
from athanor.distill.intervals import PerSample
from athanor.distill.sentencevae.train import Passage, bos_padded, collate, sllm_outputs

Segmenter = Callable[[list[int]], list[list[int]]]
"""Generated token ids -> the ids of each sentence, by the segmentation rules of the data."""
RoundTrip = Callable[[Sequence[list[int]]], list[list[int]]]
"""Sentences -> the sentences a model reconstructs from them."""


def cache_nbytes(cache: Any) -> int:
    """Bytes held by a transformers Cache (per-layer keys/values) or nested tuples of tensors."""
    if cache is None:
        return 0
    if torch.is_tensor(cache):
        return cache.numel() * cache.element_size()
    if hasattr(cache, "layers"):
        return sum(cache_nbytes(getattr(layer, name, None)) for layer in cache.layers for name in ("keys", "values"))
    if isinstance(cache, (tuple, list)):
        return sum(cache_nbytes(c) for c in cache)
    raise TypeError(f"cannot size a cache of type {type(cache).__name__}")


def _chunks(items: Sequence, size: int) -> Iterator[Sequence]:
    """Consecutive slices of `size` items (the last one shorter)."""
    for i in range(0, len(items), size):
        yield items[i : i + size]


def vae_roundtrip(model: SentenceVAEModel, batch_size: int) -> RoundTrip:
    """Sentences → encoder vectors → greedy KV-cached decoding, in batches."""

    @torch.no_grad()
    def roundtrip(sentences: Sequence[list[int]]) -> list[list[int]]:
        model.eval()
        device = next(model.parameters()).device
        decoded: list[list[int]] = []
        for chunk in _chunks(list(sentences), batch_size):
            batch = collate([[s] for s in chunk], model.cfg.pad_id)
            sent, lengths = batch["sent"][:, 0].to(device), batch["lengths"][:, 0].to(device)
            decoded += model.decoder.generate(model.encode(sent, lengths))
        return decoded

    return roundtrip


def bucket_suffix(lo: int, hi: int) -> str:
    """The key suffix of the length bucket (lo, hi]: `len_{lo+1}_{hi}`."""
    return f"len_{lo + 1}_{hi}"


def reconstruction(roundtrip: RoundTrip, sentences: Sequence[list[int]],
                   edges: Sequence[int]) -> dict[str, PerSample]:
    """Token accuracy and exact match of `roundtrip(sentences)`, overall and per length bucket.

    Token accuracy compares position by position over the reference length (a missing or wrong
    token is an error); exact match needs the whole decoded sentence, length included.
    Buckets: (0, e1], (e1, e2], ... labelled `len_{lo+1}_{hi}`; a bucket no sentence falls in is
    left out (both sides see the same sentences, so they report the same buckets). Every metric is a
    `PerSample` over the sentences (of its bucket), in the order given.
    """
    decoded = roundtrip(sentences)
    correct = [sum(a == b for a, b in zip(ref, out)) for ref, out in zip(sentences, decoded)]
    total = [len(ref) for ref in sentences]
    exact = [float(ref == out) for ref, out in zip(sentences, decoded)]
    metrics = {"recon_token_acc": PerSample.ratio(correct, total), "recon_exact": PerSample.mean(exact)}
    lo = 0
    for hi in edges:
        idx = [i for i, n in enumerate(total) if lo < n <= hi]
        if idx:
            label = bucket_suffix(lo, hi)
            metrics[f"recon_token_acc_{label}"] = PerSample.ratio([correct[i] for i in idx], [total[i] for i in idx])
            metrics[f"recon_exact_{label}"] = PerSample.mean([exact[i] for i in idx])
        lo = hi
    return metrics


@torch.no_grad()
def lm_nll(lm: torch.nn.Module, passages: Sequence[Passage], bos_id: int,
           batch_size: int) -> tuple[list[float], list[int]]:
    """Per passage: the summed next-token NLL of every token (BOS prepended), and its token count."""
    lm.eval()
    device = next(lm.parameters()).device
    nll: list[float] = []
    count: list[int] = []
    for chunk in _chunks(list(passages), batch_size):
        flat = [[t for s in p for t in s] for p in chunk]
        ids, mask = bos_padded(flat, bos_id)
        logits = lm(input_ids=ids.to(device), attention_mask=mask.to(device)).logits[:, :-1].float()
        targets = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100).to(device)
        token_nll = F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=-100, reduction="none")
        nll += token_nll.double().sum(1).tolist()  # ignored (padding) positions contribute 0
        count += (targets != -100).sum(1).tolist()
    return nll, count


@torch.no_grad()
def sllm_nll(model: SentenceVAEModel, passages: Sequence[Passage], batch_size: int) -> tuple[list[float], list[int]]:
    """Per passage: the summed NLL of every sentence's tokens + EOS under SLLM prediction → decoder, and
    its token count (EOS not counted: the LM side counts the same tokens)."""
    model.eval()
    device = next(model.parameters()).device
    nll: list[float] = []
    count: list[int] = []
    for chunk in _chunks(list(passages), batch_size):
        batch = {k: v.to(device) for k, v in collate(chunk, model.cfg.pad_id).items()}
        out = sllm_outputs(model, batch)
        logits, targets = out["logits"].float(), out["targets"]
        token_nll = F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=-100, reduction="none")
        # The decoder's rows are the real sentences in (passage, sentence) order: add each to its passage.
        owner = (batch["lengths"] > 0).nonzero()[:, 0]
        per_passage = torch.zeros(len(chunk), dtype=torch.float64, device=device)
        nll += per_passage.index_add_(0, owner, token_nll.double().sum(1)).tolist()
        count += batch["lengths"].sum(1).tolist()
    return nll, count


def sentence_plan(budget: int, sentence_tokens: int) -> list[int]:
    """Lengths of the sentences that make up a `budget` of tokens: `sentence_tokens` each, the last one
    cut so the total is exactly the budget (no credit for tokens past it)."""
    full, rest = divmod(budget, sentence_tokens)
    return [sentence_tokens] * full + ([rest] if rest else [])


@torch.no_grad()
def lm_generate(lm: torch.nn.Module, prompt: list[int], new_tokens: int, bos_id: int) -> dict[str, Any]:
    """Greedy cached decoding of exactly `new_tokens` tokens with the original LM (EOS does not stop it):
    the generated ids, their count, cache bytes and the context the cache covers."""
    lm.eval()
    device = next(lm.parameters()).device
    out = lm(input_ids=torch.tensor([[bos_id] + prompt], device=device), use_cache=True)
    cache, ids = out.cache, []
    while True:
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        ids.append(int(nxt))
        if len(ids) == new_tokens:  # the last token is not fed back (nor is the SLLM's last sentence)
            break
        out = lm(input_ids=nxt, cache=cache, use_cache=True)
        cache = out.cache
    kv = cache_nbytes(cache)
    return {"ids": ids, "tokens": len(ids), "kv_bytes": kv, "peak_bytes": kv, "context": len(prompt) + len(ids)}


@torch.no_grad()
def sllm_generate(model: SentenceVAEModel, prompt: Passage, new_tokens: int, sentence_tokens: int | None = None,
                  stop_at_end: bool = False) -> dict[str, Any]:
    """Greedy generation sentence by sentence: SLLM step → decoder (own KV cache) → encoder → next step,
    until `new_tokens` tokens (never more: the last sentence is cut to the budget).

    `sentence_tokens` forces every sentence to that length (the measurements: the work no longer depends on
    where the decoder would end sentences); None lets the decoder end them (at least one token each).
    `stop_at_end` ends the passage early where the stop head says so (logit > 0); measurements leave it off.
    """
    model.eval()
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in collate([prompt], model.cfg.pad_id).items()}
    vectors = model.encode_passages(batch["sent"], batch["lengths"])
    pred, stop, cache = model.sllm.step(model.sllm.embed_inputs(vectors, True), use_cache=True)
    sentences: list[list[int]] = []
    generated, peak = 0, 0
    while generated < new_tokens and not (stop_at_end and stop[0, -1] > 0):
        left = new_tokens - generated
        length = min(sentence_tokens, left) if sentence_tokens else None
        dec_bytes: list[int] = []
        tokens = model.decoder.generate(pred[:, -1], length or left, min_tokens=length or 1, cache_bytes=dec_bytes)[0]
        sentences.append(tokens)
        generated += len(tokens)
        peak = max(peak, cache_nbytes(cache) + dec_bytes[0])
        if generated >= new_tokens:
            break
        ids = torch.tensor([tokens], device=device)
        vec = model.encode(ids, torch.tensor([len(tokens)], device=device))
        pred, stop, cache = model.sllm.step(model.sllm.embed_inputs(vec[:, None], False), cache=cache, use_cache=True)
    kv = cache_nbytes(cache)
    return {"sentences": sentences, "tokens": generated, "kv_bytes": kv, "peak_bytes": max(peak, kv),
            "context": sum(map(len, prompt)) + generated}


def generation_runs(model: torch.nn.Module, prompts: Sequence[Passage], *, bos_id: int, gen_tokens: int,
                    sentence_tokens: int) -> list[dict[str, Any]]:
    """One greedy generation of `gen_tokens` tokens per prompt: the LM token by token, the SLLM in
    sentences of `sentence_tokens` tokens. The same budget and prompts on both sides."""
    if isinstance(model, SentenceVAEModel):
        return [sllm_generate(model, p, gen_tokens, sentence_tokens=sentence_tokens) for p in prompts]
    return [lm_generate(model, [t for s in p for t in s], gen_tokens, bos_id) for p in prompts]


def generation_probe(model: torch.nn.Module, prompts: Sequence[Passage], *, bos_id: int, gen_tokens: int,
                     sentence_tokens: int) -> Callable[[], int]:
    """The speed probe: a zero-argument call generating from every prompt (see `generation_runs`), returning
    the tokens generated (always prompts × gen_tokens, so latency ratios are throughput ratios)."""
    prompts = list(prompts)

    def probe() -> int:
        runs = generation_runs(model, prompts, bos_id=bos_id, gen_tokens=gen_tokens, sentence_tokens=sentence_tokens)
        return sum(r["tokens"] for r in runs)

    return probe


def generation_cost(runs: Sequence[dict[str, Any]], segment: Segmenter | None = None) -> dict[str, float]:
    """Cache bytes per token of context and the mean generated sentence length of per-prompt runs.

    SLLM runs carry their sentences; LM runs are cut into sentences by `segment` (the data's rules: text
    without a sentence end is one sentence, split at the cap as the data is; output that decodes to
    whitespace only counts as one sentence). LM runs without `segment` (no tokenizer, e.g. a benchmark's
    random LM) have no `gen_sentence_tokens`."""
    context = sum(r["context"] for r in runs)
    cost = {
        "kv_bytes_per_token": sum(r["kv_bytes"] for r in runs) / context,
        "mem_bytes_per_token": sum(r["peak_bytes"] for r in runs) / context,
    }
    if "sentences" in runs[0]:
        sentences = [s for r in runs for s in r["sentences"]]
    elif segment is not None:
        sentences = [s for r in runs for s in (segment(r["ids"]) or [r["ids"]])]
    else:
        return cost
    return {**cost, "gen_sentence_tokens": sum(map(len, sentences)) / max(len(sentences), 1)}


def evaluate_pair(
    model: torch.nn.Module, passages: Sequence[Passage], prompts: Sequence[Passage], *, bos_id: int, gen_tokens: int,
    sentence_tokens: int, segment: Segmenter, batch_size: int, edges: Sequence[int],
) -> dict[str, float | PerSample]:
    """Metrics of one side: `model` is either the original causal LM or a SentenceVAEModel."""
    is_vae = isinstance(model, SentenceVAEModel)
    if is_vae:
        nll, count = sllm_nll(model, passages, batch_size)
    else:
        nll, count = lm_nll(model, passages, bos_id, batch_size)
    metrics: dict[str, float | PerSample] = {
        "params": float(count_params(model)), "nll_per_token": PerSample.ratio(nll, count),
        "ppl": PerSample.perplexity(nll, count)}
    sentences = [s for p in passages for s in p]
    # Tokens carried by one position of the (S)LLM's KV cache: 1 for the LM, sentence length for the SLLM.
    metrics["tokens_per_position"] = len([t for s in sentences for t in s]) / len(sentences) if is_vae else 1.0
    runs = generation_runs(model, prompts, bos_id=bos_id, gen_tokens=gen_tokens, sentence_tokens=sentence_tokens)
    metrics.update(generation_cost(runs, segment))
    # The original LM keeps every token in its cache, so its "round trip" is the identity (accuracy
    # 1 by construction); the keys exist on both sides so baseline and converted runs compare.
    roundtrip = vae_roundtrip(model, batch_size) if is_vae else (lambda sents: [list(s) for s in sents])
    metrics.update(reconstruction(roundtrip, sentences, edges))
    return metrics
