"""SentenceVAE evaluation: reconstruction, perplexity and generation cost, original LM vs SLLM.

    .venv/bin/python -m pytest tests/distill/test_sentencevae_eval.py -q

Perplexity counts every token of each held-out passage, the first sentence included: the LM
predicts token i from BOS and tokens < i; the SLLM predicts sentence j from the start vector and
sentences < j, and pays for each sentence's tokens and its end-of-sentence token (the boundary is
information the LM gets for free), divided by the same token count. So SLLM perplexity is an upper
bound for a proper token-level model over the same tokens.

Generation cost: greedy decoding of `gen_tokens` new tokens after the same prompts, batch 1, with
KV caches. `kv_bytes_per_token` is the LM's KV cache at the end divided by the tokens it covers
(prompt + generated); `mem_bytes_per_token` adds the SLLM decoder's transient cache at its peak.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch

from convert.sentencevae.sllm import SentenceVAEModel
from distill.sentencevae.train import Passage, bos_padded, collate, sllm_outputs


def cache_nbytes(cache) -> int:
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


def _sync(device: torch.device) -> None:
    """Wait for queued GPU work so wall-clock timings cover it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _chunks(items: Sequence, size: int):
    for i in range(0, len(items), size):
        yield items[i : i + size]


def vae_roundtrip(model: SentenceVAEModel, batch_size: int):
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


def reconstruction(roundtrip, sentences: Sequence[list[int]], edges: Sequence[int]) -> dict[str, float]:
    """Token accuracy and exact match of `roundtrip(sentences)`, overall and per length bucket.

    Token accuracy compares position by position over the reference length (a missing or wrong
    token is an error); exact match needs the whole decoded sentence, length included.
    Buckets: (0, e1], (e1, e2], ... labelled `len_{lo+1}_{hi}`; a bucket no sentence falls in is
    left out (both sides see the same sentences, so they report the same buckets).
    """
    decoded = roundtrip(sentences)
    correct = [sum(a == b for a, b in zip(ref, out)) for ref, out in zip(sentences, decoded)]
    total = [len(ref) for ref in sentences]
    exact = [float(ref == out) for ref, out in zip(sentences, decoded)]
    metrics = {"recon_token_acc": sum(correct) / max(sum(total), 1), "recon_exact": sum(exact) / max(len(exact), 1)}
    lo = 0
    for hi in edges:
        idx = [i for i, n in enumerate(total) if lo < n <= hi]
        if idx:
            metrics[f"recon_token_acc_len_{lo + 1}_{hi}"] = sum(correct[i] for i in idx) / sum(total[i] for i in idx)
            metrics[f"recon_exact_len_{lo + 1}_{hi}"] = sum(exact[i] for i in idx) / len(idx)
        lo = hi
    return metrics


@torch.no_grad()
def lm_nll(lm, passages: Sequence[Passage], bos_id: int, batch_size: int) -> tuple[float, int]:
    """Summed next-token NLL of every passage token (BOS prepended), and the token count."""
    lm.eval()
    device = next(lm.parameters()).device
    nll, count = 0.0, 0
    for chunk in _chunks(list(passages), batch_size):
        flat = [[t for s in p for t in s] for p in chunk]
        ids, mask = bos_padded(flat, bos_id)
        logits = lm(input_ids=ids.to(device), attention_mask=mask.to(device)).logits[:, :-1].float()
        targets = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100).to(device)
        nll += float(torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, ignore_index=-100, reduction="sum"))
        count += int((targets != -100).sum())
    return nll, count


@torch.no_grad()
def sllm_nll(model: SentenceVAEModel, passages: Sequence[Passage], batch_size: int) -> tuple[float, int]:
    """Summed NLL of every sentence's tokens + EOS under SLLM prediction → decoder, and the token count."""
    model.eval()
    device = next(model.parameters()).device
    nll, count = 0.0, 0
    for chunk in _chunks(list(passages), batch_size):
        batch = {k: v.to(device) for k, v in collate(chunk, model.cfg.pad_id).items()}
        out = sllm_outputs(model, batch)
        logits, targets = out["logits"].float(), out["targets"]
        nll += float(torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, ignore_index=-100, reduction="sum"))
        count += int(batch["lengths"].sum())
    return nll, count


@torch.no_grad()
def lm_generate(lm, prompt: list[int], new_tokens: int, bos_id: int) -> dict[str, float]:
    """Greedy cached decoding with the original LM; returns tokens, seconds and cache bytes."""
    lm.eval()
    device = next(lm.parameters()).device
    _sync(device)
    start = time.perf_counter()
    out = lm(input_ids=torch.tensor([[bos_id] + prompt], device=device), use_cache=True)
    cache, generated = out.cache, 0
    for _ in range(new_tokens):
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        generated += 1
        if generated == new_tokens:
            break
        out = lm(input_ids=nxt, cache=cache, use_cache=True)
        cache = out.cache
    _sync(device)
    seconds = time.perf_counter() - start
    kv = cache_nbytes(cache)
    return {"tokens": generated, "seconds": seconds, "kv_bytes": kv, "peak_bytes": kv, "context": len(prompt) + generated}


@torch.no_grad()
def sllm_generate(model: SentenceVAEModel, prompt: Passage, new_tokens: int, sentence_tokens: int | None = None,
                  stop_at_end: bool = False) -> dict[str, float]:
    """Greedy generation sentence by sentence: SLLM step → decoder (own KV cache) → encoder → next step.

    `sentence_tokens` forces every generated sentence to that length (benchmarks at a fixed length).
    `stop_at_end` ends the passage when the stop head says so (logit > 0); throughput measurements
    leave it off so both sides generate the same number of tokens.
    """
    model.eval()
    device = next(model.parameters()).device
    _sync(device)
    start = time.perf_counter()
    batch = {k: v.to(device) for k, v in collate([prompt], model.cfg.pad_id).items()}
    vectors = model.encode_passages(batch["sent"], batch["lengths"])
    pred, stop, cache = model.sllm.step(model.sllm.embed_inputs(vectors, True), use_cache=True)
    generated, peak = 0, 0
    while not (stop_at_end and stop[0, -1] > 0):
        dec_bytes: list[int] = []
        fixed = {"min_tokens": sentence_tokens, "max_tokens": sentence_tokens} if sentence_tokens else {"min_tokens": 1}
        tokens = model.decoder.generate(pred[:, -1], cache_bytes=dec_bytes, **fixed)[0]
        generated += len(tokens)
        peak = max(peak, cache_nbytes(cache) + dec_bytes[0])
        if generated >= new_tokens:
            break
        ids = torch.tensor([tokens], device=device)
        vec = model.encode(ids, torch.tensor([len(tokens)], device=device))
        pred, stop, cache = model.sllm.step(model.sllm.embed_inputs(vec[:, None], False), cache=cache, use_cache=True)
    _sync(device)
    seconds = time.perf_counter() - start
    kv = cache_nbytes(cache)
    return {"tokens": generated, "seconds": seconds, "kv_bytes": kv, "peak_bytes": max(peak, kv), "context": sum(map(len, prompt)) + generated}


def generation_cost(runs: Sequence[dict[str, float]]) -> dict[str, float]:
    """Aggregate per-prompt generation runs into tokens/s and bytes per token of context."""
    tokens = sum(r["tokens"] for r in runs)
    context = sum(r["context"] for r in runs)
    return {
        "gen_tokens_per_s": tokens / max(sum(r["seconds"] for r in runs), 1e-9),
        "kv_bytes_per_token": sum(r["kv_bytes"] for r in runs) / context,
        "mem_bytes_per_token": sum(r["peak_bytes"] for r in runs) / context,
    }


def evaluate_pair(
    model, passages: Sequence[Passage], prompts: Sequence[Passage], *, bos_id: int, gen_tokens: int,
    batch_size: int, repeats: int, edges: Sequence[int],
) -> dict[str, float]:
    """Metrics of one side: `model` is either the original causal LM or a SentenceVAEModel."""
    is_vae = isinstance(model, SentenceVAEModel)
    if is_vae:
        nll, count = sllm_nll(model, passages, batch_size)
    else:
        nll, count = lm_nll(model, passages, bos_id, batch_size)
    metrics = {"nll_per_token": nll / count, "ppl": float(torch.tensor(nll / count).exp())}
    sentences = [s for p in passages for s in p]
    # Tokens carried by one position of the (S)LLM's KV cache: 1 for the LM, sentence length for the SLLM.
    metrics["tokens_per_position"] = len([t for s in sentences for t in s]) / len(sentences) if is_vae else 1.0
    best: dict[str, float] | None = None
    for _ in range(repeats):  # the fastest repeat: least disturbed by other work on the machine
        runs = [sllm_generate(model, p, gen_tokens) if is_vae else lm_generate(model, [t for s in p for t in s], gen_tokens, bos_id) for p in prompts]
        cost = generation_cost(runs)
        if best is None or cost["gen_tokens_per_s"] > best["gen_tokens_per_s"]:
            best = cost
    metrics.update(best or {})
    # The original LM keeps every token in its cache, so its "round trip" is the identity (accuracy
    # 1 by construction); the keys exist on both sides so baseline and converted runs compare.
    roundtrip = vae_roundtrip(model, batch_size) if is_vae else (lambda sents: [list(s) for s in sents])
    metrics.update(reconstruction(roundtrip, sentences, edges))
    return metrics
