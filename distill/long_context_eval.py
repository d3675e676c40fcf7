"""Long-context evaluation shared by the context-extension methods (SinkLoRA, issue 11).

- `sliding_window_perplexity`: the standard strided perplexity over one long token stream; every token
  after the first is scored exactly once, each with at most `window` tokens of context.
- `sliding_window_nlls`: the same windows' NLL sums and token counts, one per window (the samples).
- `passkey_prompt` / `passkey_accuracy` / `passkey_hits` (0/1 per trial): passkey retrieval as in Landmark
  Attention (Mohtashami & Jaggi, 2023) and LongLoRA: a five-digit key hidden at a relative depth inside
  repeated filler text, retrieved by greedy generation and scored by exact match of its digits.
- `fraction_of_gain`: the SinkLoRA figure, (PPL_base - PPL_m) / (PPL_base - PPL_full).

Plain torch + transformers-compatible models and tokenizers; no jobs/, MLflow or SQLite.

    .venv/bin/python -m pytest tests/distill/test_long_context_eval.py -q -p no:cacheprovider
"""

from __future__ import annotations

import inspect
import math
import random
import re
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

PASSKEY_INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
                 "I will quiz you about the important information there.")
FILLER_SENTENCES = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.",
                    "There and back again.")
PASSKEY_LINE = "The pass key is {passkey}. Remember it. {passkey} is the pass key."
PASSKEY_QUESTION = "What is the pass key? The pass key is"

GenerateFn = Callable[[torch.Tensor, int], torch.Tensor]


def _model_device(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def _windows(n_positions: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, lo) per window over prediction positions 0..n_positions-1 (position p predicts token
    p + 1): the model reads ids[begin:end] and the predictions at positions [lo, end) are scored."""
    spans, prev_end = [], 0
    for begin in range(0, n_positions, stride):
        end = min(begin + window, n_positions)
        spans.append((begin, end, max(prev_end, begin)))
        prev_end = end
        if end == n_positions:
            break
    return spans


def _batches(spans: list[tuple[int, int, int]], batch_size: int) -> list[list[tuple[int, int, int]]]:
    """Consecutive windows of the same length and scored count, at most `batch_size` per batch."""
    batches: list[list[tuple[int, int, int]]] = []
    for span in spans:
        shape = (span[1] - span[0], span[1] - span[2])
        last = batches[-1] if batches else None
        if last and len(last) < batch_size and (last[0][1] - last[0][0], last[0][1] - last[0][2]) == shape:
            last.append(span)
        else:
            batches.append([span])
    return batches


@torch.no_grad()
def sliding_window_nlls(model: nn.Module, input_ids: torch.Tensor, window: int, stride: int,
                        batch_size: int = 1) -> tuple[list[float], list[int]]:
    """Per window of `sliding_window_perplexity` (same windows, same order): the summed negative log-likelihood
    (nats, float64) of the tokens that window scores, and how many it scores. The windows score disjoint tokens,
    so they are the samples of a token-weighted perplexity (`PerSample.perplexity(nlls, tokens)`)."""
    ids = input_ids.reshape(-1) if input_ids.dim() == 2 and input_ids.shape[0] == 1 else input_ids
    if ids.dim() != 1:
        raise ValueError(f"input_ids must be [T] or [1, T], got shape {tuple(input_ids.shape)}")
    if window < 2 or not 1 <= stride <= window or batch_size < 1:
        raise ValueError(f"need window >= 2, 1 <= stride <= window and batch_size >= 1; "
                         f"got window={window}, stride={stride}, batch_size={batch_size}")
    if ids.numel() < 2:
        raise ValueError(f"need at least 2 tokens to score, got {ids.numel()}")
    ids = ids.to(_model_device(model), dtype=torch.long)
    keep_kw = "logits_to_keep" in inspect.signature(model.forward).parameters
    was_training = model.training
    model.eval()
    nlls: list[float] = []
    tokens: list[int] = []
    try:
        for batch in _batches(_windows(ids.numel() - 1, window, stride), batch_size):
            x = torch.stack([ids[b:e] for b, e, _ in batch])
            n = batch[0][1] - batch[0][2]  # scored tokens per window: the last n predictions
            logits = model(x, logits_to_keep=n).logits if keep_kw else model(x).logits
            logits = logits[:, -n:]
            logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # fp16/bf16 -> fp32
            targets = torch.stack([ids[lo + 1:e + 1] for _, e, lo in batch])
            nll = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                              reduction="none").view(len(batch), n)
            nlls += nll.double().sum(-1).tolist()
            tokens += [n] * len(batch)
    finally:
        model.train(was_training)
    return nlls, tokens


def sliding_window_perplexity(model: nn.Module, input_ids: torch.Tensor, window: int, stride: int,
                              batch_size: int = 1) -> dict[str, float | int]:
    """Strided perplexity of a causal LM over one token stream `input_ids` ([T] or [1, T]).

    The model reads windows of `window` tokens starting at 0, stride, 2*stride, ... (the last one cut at
    T - 1); seen as spans ids[b : b + window + 1] of inputs plus the final label, the first window scores
    all its tokens after the first and each later window only its last `stride` tokens (fewer for a final
    partial window), i.e. the predictions the previous window did not make. So every token except the
    first is counted exactly once (`tokens == T - 1`), each predicted from at most `window` tokens of
    context and, after the first window, at least `window - stride + 1`. stride == window gives disjoint
    chunks with no overlap (the cheapest, least context); smaller strides cost window/stride forwards
    per window of text.

    The model is put in eval mode for the call (its training flag is restored) and called as
    `model(ids).logits`; where its forward accepts `logits_to_keep` only the scored positions' logits are
    computed. Log-softmax in at least float32; NLLs summed in float64 (`sliding_window_nlls`: per window).
    Returns {"ppl": exp(mean NLL), "nll": mean NLL, "tokens": number of scored tokens}.
    """
    nlls, tokens = sliding_window_nlls(model, input_ids, window, stride, batch_size)
    mean = math.fsum(nlls) / sum(tokens)
    return {"ppl": math.exp(mean), "nll": mean, "tokens": sum(tokens)}


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _filler(n_sentences: int, start: int) -> str:
    return " ".join(FILLER_SENTENCES[(start + i) % len(FILLER_SENTENCES)] for i in range(n_sentences))


def _prompt_text(n_sentences: int, depth: float, passkey: int, start: int) -> str:
    before = round(depth * n_sentences)
    parts = [PASSKEY_INTRO, _filler(before, start), PASSKEY_LINE.format(passkey=passkey),
             _filler(n_sentences - before, start + before), PASSKEY_QUESTION]
    return " ".join(p for p in parts if p)


def passkey_prompt(tokenizer: Any, length_tokens: int, depth: float, passkey: int,
                   seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A passkey-retrieval prompt of about `length_tokens` tokens, and the answer's token ids (both 1-D).

    Layout: an instruction line, filler sentences ("The grass is green. The sky is blue. ..." cycled),
    "The pass key is {passkey}. Remember it. {passkey} is the pass key." after `round(depth * n)` of the n
    filler sentences (depth 0 = right after the instruction, 1 = just before the question), more filler,
    then "What is the pass key? The pass key is" at the very end. n is chosen (one sentence at a time) so
    the tokenized prompt is as close as possible to `length_tokens`. `seed` picks which filler sentence the
    cycle starts with. Tokenized without special tokens, with the tokenizer's BOS prepended if it has one.
    The answer ids are how " {passkey}" tokenizes after the prompt.
    """
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    start = random.Random(seed).randrange(len(FILLER_SENTENCES))
    bos = [tokenizer.bos_token_id] if getattr(tokenizer, "bos_token_id", None) is not None else []

    def count(n: int) -> int:
        return len(bos) + len(_encode(tokenizer, _prompt_text(n, depth, passkey, start)))

    per_sentence = max(1.0, (count(50) - count(0)) / 50)
    n = max(0, round((length_tokens - count(0)) / per_sentence))
    for _ in range(8):  # tokenization is not exactly linear in n: walk to the closest count
        best = min((m for m in (n - 1, n, n + 1) if m >= 0), key=lambda m: (abs(count(m) - length_tokens), m))
        if best == n:
            break
        n = best
    prompt = _prompt_text(n, depth, passkey, start)
    prompt_ids = bos + _encode(tokenizer, prompt)
    full_ids = bos + _encode(tokenizer, f"{prompt} {passkey}")
    if full_ids[:len(prompt_ids)] == prompt_ids and len(full_ids) > len(prompt_ids):
        answer = full_ids[len(prompt_ids):]
    else:  # the answer merged with the prompt's last token: fall back to tokenizing it alone
        answer = _encode(tokenizer, f" {passkey}")
    return torch.tensor(prompt_ids, dtype=torch.long), torch.tensor(answer, dtype=torch.long)


def greedy_generate_fn(model: nn.Module, tokenizer: Any = None) -> GenerateFn:
    """`generate_fn` for `passkey_accuracy`: `model.generate` greedy, returning only the new token ids."""
    pad = None if tokenizer is None else (tokenizer.pad_token_id if tokenizer.pad_token_id is not None
                                          else getattr(tokenizer, "eos_token_id", None))

    @torch.no_grad()
    def generate(input_ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        x = input_ids.reshape(1, -1).to(_model_device(model))
        out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens,
                             min_new_tokens=max_new_tokens, do_sample=False, num_beams=1, pad_token_id=pad)
        return out[0, x.shape[1]:].cpu()

    return generate


def passkey_hits(model: nn.Module | None, tokenizer: Any, lengths: Sequence[int], depths: Sequence[float],
                 trials: int, seed: int = 0,
                 generate_fn: GenerateFn | None = None) -> dict[tuple[int, float], list[int]]:
    """Passkey retrieval per (length, depth): one 0/1 per trial (1: the answer is right), in trial order.

    Each trial draws a five-digit passkey (deterministic in `seed`, not in the model: every model gets the same
    prompts in the same order), builds `passkey_prompt`, generates len(answer ids) new tokens with
    `generate_fn(input_ids [1, T], max_new_tokens) -> new ids` (default: greedy `model.generate`), decodes them
    and counts a hit when the first run of digits equals the key.
    """
    if trials < 1:
        raise ValueError(f"trials must be >= 1, got {trials}")
    if generate_fn is None:
        if model is None:
            raise ValueError("passkey retrieval needs a model or a generate_fn")
        generate_fn = greedy_generate_fn(model, tokenizer)
    was_training = model.training if model is not None else False
    if model is not None:
        model.eval()
    rng = random.Random(seed)
    results: dict[tuple[int, float], list[int]] = {}
    try:
        for length in lengths:
            for depth in depths:
                hits = []
                for _ in range(trials):
                    passkey = rng.randint(10000, 99999)
                    ids, answer = passkey_prompt(tokenizer, length, depth, passkey, seed=rng.randrange(2**31))
                    new = generate_fn(ids.reshape(1, -1), answer.numel())
                    digits = re.search(r"\d+", tokenizer.decode(new.reshape(-1).tolist(), skip_special_tokens=True))
                    hits.append(int(digits is not None and digits.group() == str(passkey)))
                results[(length, depth)] = hits
    finally:
        if model is not None:
            model.train(was_training)
    return results


def passkey_accuracy(model: nn.Module | None, tokenizer: Any, lengths: Sequence[int], depths: Sequence[float],
                     trials: int, seed: int = 0,
                     generate_fn: GenerateFn | None = None) -> dict[tuple[int, float], float]:
    """Passkey retrieval accuracy per (length, depth): the fraction of `trials` prompts whose answer is right
    (`passkey_hits` averaged)."""
    hits = passkey_hits(model, tokenizer, lengths, depths, trials, seed, generate_fn)
    return {key: sum(h) / len(h) for key, h in hits.items()}


def fraction_of_gain(ppl_base: float, ppl_method: float, ppl_full: float) -> float:
    """SinkLoRA's figure: the share of the full-attention arm's perplexity gain a method recovers,
    (ppl_base - ppl_method) / (ppl_base - ppl_full). 1 = as good as full attention, 0 = no better than the
    base model, negative = worse than the base. Raises ValueError when the full-attention arm did not
    improve on the base (ppl_full >= ppl_base): the ratio is then meaningless."""
    for name, value in (("ppl_base", ppl_base), ("ppl_method", ppl_method), ("ppl_full", ppl_full)):
        if not math.isfinite(value) or value <= 0:
            raise ValueError(f"{name} must be a finite positive perplexity, got {value}")
    if ppl_full >= ppl_base:
        raise ValueError(f"fraction_of_gain: the full-attention arm did not improve on the base model "
                         f"(ppl_full={ppl_full} >= ppl_base={ppl_base}), so there is no gain to recover")
    return (ppl_base - ppl_method) / (ppl_base - ppl_full)
