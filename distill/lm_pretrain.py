"""Brief next-token pre-training of a randomly initialised causal LM, so a tiny testbed baseline is a real
LM (SentenceVAE and SinkLoRA tiny recipes). Shared by the text methods.

    .venv/bin/python -m pytest tests/distill/sentencevae/test_sentencevae.py -q -k pretrain
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Sequence

import torch

log = logging.getLogger(__name__)


def bos_padded(sequences: Sequence[list[int]], bos_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists → BOS-prefixed, right-padded ids [B, T+1] and their attention mask."""
    length = max(len(seq) for seq in sequences) + 1
    ids = torch.full((len(sequences), length), bos_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, seq in enumerate(sequences):
        ids[b, 1 : len(seq) + 1] = torch.tensor(seq, dtype=torch.long)
        mask[b, : len(seq) + 1] = 1
    return ids, mask


def pretrain_lm(lm: torch.nn.Module, passages: Sequence[list[int]], *, steps: int, lr: float, batch_size: int,
                bos_id: int, seed: int = 0) -> list[float]:
    """Briefly train a randomly initialised causal LM (next-token CE) so the baseline is a real LM.

    `passages` are token-id lists (already truncated). Returns the loss of every step.
    """
    rng = random.Random(seed)
    torch.manual_seed(seed)
    lm.train()
    opt = torch.optim.AdamW(lm.parameters(), lr=lr, weight_decay=0.01)
    def warmup_cosine(s: int) -> float:
        return min(1.0, (s + 1) / max(steps // 10, 1)) * 0.5 * (1 + math.cos(math.pi * s / steps))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine)
    losses = []
    order: list[int] = []
    for _ in range(steps):
        if len(order) < batch_size:
            order += rng.sample(range(len(passages)), len(passages))
        chosen, order = [passages[i] for i in order[:batch_size]], order[batch_size:]
        ids, mask = bos_padded(chosen, bos_id)
        labels = ids.masked_fill(mask == 0, -100)
        labels[:, 0] = -100
        loss = lm(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(lm.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if (len(losses)) % 25 == 0 or len(losses) == steps:
            log.info("teacher pre-training step %d/%d: loss %.3f", len(losses), steps, losses[-1])
    lm.eval()
    return losses
