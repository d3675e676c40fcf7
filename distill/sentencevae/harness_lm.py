"""A SentenceVAE student as an lm-evaluation-harness model (`eval.lm_eval`): the SLLM predicts each sentence's vector
from the sentences before it and the decoder scores that sentence's tokens (teacher-forced), so a text's token
log-likelihoods are exactly what the method's own perplexity sums (`evaluation.sllm_nll`).

- `loglikelihood(context, continuation)`: the text `context + continuation` is segmented as the training data is;
  the continuation is the tokens past those of `context` segmented alone (the harness's HFLM splits tokens the same
  way), plus the end-of-sentence token of every sentence that ends inside it (a sentence's boundary is part of
  what the student predicts, as in `sllm_nll`). `is_greedy`: every one of those tokens was the decoder's argmax.
- `loglikelihood_rolling(text)`: every token and end-of-sentence of the text, as `sllm_nll` counts them.
- Generation tasks are refused: the student generates sentence by sentence (`generate_until` would need the
  harness's stop strings inside a sentence).

    .venv/bin/python -m pytest tests/distill/sentencevae/test_harness_lm.py -q
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as F
from lm_eval.api.model import LM

from athanor.convert.sentencevae.segment import SegmentRules, segment_ids
from athanor.convert.sentencevae.sllm import SentenceVAEModel
from athanor.distill.sentencevae.train import collate, sllm_outputs


class SentenceVAELM(LM):
    """`model` (a SentenceVAE student) scored through its SLLM and decoder, texts segmented with `rules`."""

    def __init__(self, model: SentenceVAEModel, tokenizer: Any, rules: SegmentRules, batch_size: int = 8) -> None:
        super().__init__()
        self.model, self.tokenizer, self.batch_size = model.eval(), tokenizer, batch_size
        self.rules = rules

    def segment(self, text: str) -> list[list[int]]:
        """`text` in sentences of token ids, as the training data is cut (no cap on the number of sentences)."""
        if not text.strip():
            return []
        return segment_ids(text, self.tokenizer, replace(self.rules, max_sentences=max(len(text), 1)))

    @torch.no_grad()
    def scores(self, passages: list[list[list[int]]]) -> list[tuple[list[float], list[bool], list[int]]]:
        """Per passage, one entry per token in reading order with each sentence's end-of-sentence after its tokens:
        (log-likelihood, whether it was the argmax, the index of the passage token it closes or is: -1-j for the
        end of sentence that closes token j)."""
        device = next(self.model.parameters()).device
        out: list[tuple[list[float], list[bool], list[int]]] = []
        for start in range(0, len(passages), self.batch_size):
            chunk = passages[start:start + self.batch_size]
            batch = {k: v.to(device) for k, v in collate(chunk, self.model.cfg.pad_id).items()}
            result = sllm_outputs(self.model, batch)
            logp = F.log_softmax(result["logits"].float(), dim=-1)
            targets = result["targets"]
            picked = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
            greedy = logp.argmax(-1) == targets
            rows = iter(range(len(targets)))  # the decoder's rows: real sentences in (passage, sentence) order
            for passage in chunk:
                ll, best, where, seen = [], [], [], 0
                for sentence in passage:
                    row = next(rows)
                    for i in range(len(sentence) + 1):  # the tokens, then the end of sentence
                        ll.append(float(picked[row, i]))
                        best.append(bool(greedy[row, i]))
                        where.append(seen + i if i < len(sentence) else -seen - len(sentence))
                    seen += len(sentence)
                out.append((ll, best, where))
        return out

    def loglikelihood(self, requests: list[Any]) -> list[tuple[float, bool]]:
        passages, skip = [], []
        for request in requests:
            context, continuation = request.args[0], request.args[1]
            passages.append(self.segment(context + continuation))
            skip.append(sum(len(s) for s in self.segment(context)))
        results = []
        for (ll, best, where), first in zip(self.scores(passages), skip):
            mine = [i for i, w in enumerate(where) if (w >= first if w >= 0 else -w > first)]
            results.append((sum(ll[i] for i in mine), all(best[i] for i in mine)))
        return results

    def loglikelihood_rolling(self, requests: list[Any]) -> list[float]:
        return [sum(ll) for ll, _, _ in self.scores([self.segment(r.args[0]) for r in requests])]

    def generate_until(self, requests: list[Any]) -> list[str]:
        raise NotImplementedError("a SentenceVAE student generates sentence by sentence: lm-eval generation tasks "
                                  "are not supported; use loglikelihood or multiple-choice tasks")
