"""SinkLoRA's measurements, the same keys for the original model (before) and the converted one (after).

Always full causal attention (SF-Attn is a training device). On held-out books:
- `ppl_original_length` / `ppl_target_length`: strided perplexity with windows of the original and the
  target context, every held-out token counted once (`distill.long_context_eval.sliding_window_perplexity`).
- `passkey_acc` (mean) and `passkey_acc_<L>` per prompt length: greedy passkey retrieval at several depths.
- KV-cache compression at each budget b (a fraction of the tokens seen): `h2o_ppl_<b%>` (H2O, b/2 heavy
  hitters + b/2 recent tokens per layer and head) against `local_ppl_<b%>` (the b most recent tokens), both
  teacher-forced token by token through the cache, next to `cache_ppl_full` (the same tokens, full cache);
  `*_kv_mb` are the caches' peak sizes; `passkey_acc_h2o_<b%>` / `passkey_acc_local_<b%>`: passkey retrieval
  decoding through each cache (prompt prefilled, then evicted to the budget).

The quality metrics are `PerSample` (`distill/intervals.py`), their samples the same for every model: the
perplexities token-weighted over the sliding windows (each scores its own tokens) or over the cache sequences,
the passkey accuracies a mean of one 0/1 per prompt (same keys, depths and filler for every model).

    .venv/bin/python -m pytest tests/distill/sinklora/test_sinklora.py -q
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from athanor.convert.h2o_cache import H2OCache, LocalWindowCache, enable_h2o, teacher_forced_nll
from athanor.convert.sinklora import attention_implementation, base_model, use_attention
from athanor.distill.intervals import PerSample
from athanor.distill.long_context_eval import passkey_hits, sliding_window_nlls
from athanor.distill.sinklora.config import SinkLoRAArgs, budget_label


@contextmanager
def h2o_attention(model: nn.Module) -> Iterator[None]:
    """The "h2o" attention (sdpa that also feeds an H2OCache its scores) for a block, then the previous one."""
    base = base_model(model)
    before = base.config._attn_implementation
    enable_h2o(base)
    try:
        yield
    finally:
        use_attention(base, before)


def _per_sequence(nlls: torch.Tensor) -> PerSample:
    """Token-weighted perplexity of [sequences, tokens] per-token NLLs, one sample per sequence."""
    nlls = nlls.double()
    return PerSample.perplexity(nlls.sum(-1).tolist(), [nlls.shape[-1]] * nlls.shape[0])


def cache_comparison(model: nn.Module, sequences: Sequence[torch.Tensor],
                     budgets: Sequence[float]) -> dict[str, float | PerSample]:
    """Perplexity (one sample per sequence) and peak KV megabytes of H2O and local-window caches at each
    budget, and the full cache."""
    device = next(model.parameters()).device
    config = base_model(model).config
    out: dict[str, float | PerSample] = {}
    with torch.no_grad():
        ids = torch.stack(list(sequences)).to(device)
        logits = model(input_ids=ids).logits[:, :-1].float()
        full_nll = F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
        out["cache_ppl_full"] = _per_sequence(full_nll)
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim  # K and V, every layer
        out["cache_kv_mb_full"] = ids.numel() * per_token * next(model.parameters()).element_size() / 2**20
    for budget in budgets:
        label = budget_label(budget)
        caches = {"h2o": lambda b=budget: H2OCache(heavy=b / 2, recent=b / 2, config=config),
                  "local": lambda b=budget: LocalWindowCache(budget=b, config=config)}
        for kind, make in caches.items():
            nlls, peak = [], 0
            with h2o_attention(model) if kind == "h2o" else attention_implementation(model, "sdpa"):
                for seq in sequences:
                    cache = make()
                    nlls.append(teacher_forced_nll(model, seq.reshape(1, -1).to(device), cache))
                    peak += cache.max_kv_bytes
            out[f"{kind}_ppl_{label}"] = _per_sequence(torch.cat(nlls, 0))
            out[f"{kind}_kv_mb_{label}"] = peak / 2**20
    return out


def evaluate_lm(model: nn.Module, tokenizer: Any, heldout: torch.Tensor, args: SinkLoRAArgs, *, original_length: int,
                batch_size: int, cache_length: int) -> dict[str, float | PerSample]:
    """Every metric of the module docstring for `model` (a causal LM or a peft wrapper of one)."""
    out: dict[str, float | PerSample] = {}
    was_training = model.training
    model.eval()
    try:
        with attention_implementation(model, "sdpa"):
            for key, window in (("original", original_length), ("target", args.target_length)):
                stride = max(1, round(window * args.eval_stride_fraction))
                nlls, tokens = sliding_window_nlls(model, heldout, window, stride, batch_size=batch_size)
                out[f"ppl_{key}_length"] = PerSample.perplexity(nlls, tokens)
            out.update(passkey_metrics(model, tokenizer, args))
        if args.cache_budgets:
            sequences = [heldout[i * cache_length:(i + 1) * cache_length] for i in range(args.cache_sequences)]
            out.update(cache_comparison(model, sequences, args.cache_budgets))
    finally:
        model.train(was_training)
    return out


def cache_generate_fn(model: nn.Module, tokenizer: Any, make_cache: Callable[[], Any]) -> Callable:
    """`generate_fn` for `passkey_accuracy` decoding greedily through a fresh cache from `make_cache` (the prompt
    is prefilled with full attention, then the cache keeps its budget while the answer is generated)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    @torch.no_grad()
    def generate(input_ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        x = input_ids.reshape(1, -1).to(next(model.parameters()).device)
        out = model.generate(x, attention_mask=torch.ones_like(x), cache=make_cache(), max_new_tokens=max_new_tokens,
                             min_new_tokens=max_new_tokens, do_sample=False, num_beams=1, pad_token_id=pad)
        return out[0, x.shape[1]:].cpu()

    return generate


def passkey_metrics(model: nn.Module, tokenizer: Any, args: SinkLoRAArgs) -> dict[str, PerSample]:
    """`passkey_acc` over every (length, depth), `passkey_acc_<L>` per length, and `passkey_acc_h2o_<b>` /
    `passkey_acc_local_<b>` through each cache budget ({} without lengths): each a mean of one 0/1 per prompt
    (every (length, depth) has `passkey_trials` prompts, so this is also the mean of the per-depth accuracies)."""
    if not args.passkey_lengths:
        return {}
    lengths, depths, trials = args.passkey_lengths, args.passkey_depths, args.passkey_trials
    hits = passkey_hits(model, tokenizer, lengths, depths, trials)
    out = {f"passkey_acc_{n}": PerSample.mean([h for d in depths for h in hits[(n, d)]]) for n in lengths}
    out["passkey_acc"] = PerSample.mean([h for trial in hits.values() for h in trial])
    config = base_model(model).config
    for budget in args.cache_budgets:
        caches = {"h2o": lambda b=budget: H2OCache(heavy=b / 2, recent=b / 2, config=config),
                  "local": lambda b=budget: LocalWindowCache(budget=b, config=config)}
        for kind, make in caches.items():
            with h2o_attention(model) if kind == "h2o" else nullcontext():
                cached = passkey_hits(model, tokenizer, lengths, depths, trials,
                                      generate_fn=cache_generate_fn(model, tokenizer, make))
            out[f"passkey_acc_{kind}_{budget_label(budget)}"] = PerSample.mean(
                [h for trial in cached.values() for h in trial])
    return out


def forward_probe(model: nn.Module, ids: torch.Tensor) -> Any:
    """One full-attention forward over `ids` [batch, T] (the speed probe: a prefill at the target length)."""
    device = next(model.parameters()).device
    ids = ids.to(device)

    @torch.no_grad()
    def probe() -> torch.Tensor:
        with attention_implementation(model, "sdpa"):
            return model(input_ids=ids).logits[:, -1]

    model.eval()
    return probe
