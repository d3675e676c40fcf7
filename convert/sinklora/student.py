"""The SinkLoRA student in one call: a copy of the causal LM with RoPE interpolated to the target length, the
training attention switched on (SF-Attn, LongLoRA's S2-Attn, segmented S2 without sinks, or full) and peft LoRA
plus trainable embeddings and norms, initialised from `init_seed` so every comparison arm starts the same.

    .venv/bin/python -m pytest tests/convert/test_sinklora_student.py -q

Evaluation and export always use full causal attention (`attention_implementation(model, "sdpa")`);
`export_ready` merges the LoRA weights and removes the sparse-attention settings from the config, so the
saved directory is a plain transformers model with the new RoPE scaling.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Literal

import torch
from peft import PeftModel
from transformers import PreTrainedModel

from athanor.convert.sinklora.attention import check_model, clear_settings, configure, use_attention
from athanor.convert.sinklora.lora import ATTENTION_PROJECTIONS, add_lora, extend_context, merge_for_export

TrainingAttention = Literal["sf", "s2", "s2_segmented", "full"]
IMPLEMENTATION: dict[str, str] = {"sf": "sf_attention", "s2": "s2_attention",
                                  "s2_segmented": "s2_segmented_attention", "full": "sdpa"}
"""Recipe value -> transformers attention implementation used while training: 'sf' SinkLoRA's SF-Attn, 's2'
LongLoRA's S2-Attn as published (rolled, with wrap-around), 's2_segmented' SF-Attn without sinks (SinkLoRA's
no-sink ablation), 'full' full causal attention."""


def build_student(lm: PreTrainedModel, *, target_length: int, rope_scaling: str = "linear",
                  attention: TrainingAttention = "sf", group_size: int | None = None, num_sink: int = 4,
                  lora_rank: int = 8, lora_alpha: float = 16.0, lora_dropout: float = 0.0,
                  lora_targets: Sequence[str] = ATTENTION_PROJECTIONS,
                  train_embeddings_and_norms: bool = True, original_length: int | None = None,
                  init_seed: int | None = None) -> PeftModel:
    """A trainable copy of `lm` (left untouched); `group_size` defaults to a quarter of the target length
    (LongLoRA's and SinkLoRA's setting); `original_length` overrides the context `lm` is treated as
    pretrained at; `init_seed` seeds the LoRA initialisation (None: the global RNG as it stands), so students
    that differ only in `attention` start from identical LoRA weights. Raises RecipeError naming the recipe
    key for impossible settings."""
    check_model(lm)
    student = copy.deepcopy(lm)
    extend_context(student, target_length, rope_scaling, original=original_length)
    if attention != "full":
        configure(student, group_size=group_size or target_length // 4, num_sink=num_sink, target_length=target_length)
    use_attention(student, IMPLEMENTATION[attention])
    if init_seed is None:
        return add_lora(student, lora_rank, lora_alpha, lora_dropout, lora_targets, train_embeddings_and_norms)
    # why: a forked RNG, so the seed fixes only the LoRA init (peft's kaiming-uniform A; B starts at zero) and
    # leaves the caller's stream (data order, dropout) as it was
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(init_seed)
        return add_lora(student, lora_rank, lora_alpha, lora_dropout, lora_targets, train_embeddings_and_norms)


def export_ready(model: PreTrainedModel | PeftModel) -> PreTrainedModel:
    """The model to save: LoRA merged (a peft model is spent by this), full attention, no sparse settings."""
    merged = merge_for_export(model) if isinstance(model, PeftModel) else model
    use_attention(merged, "sdpa")
    clear_settings(merged)
    return merged
