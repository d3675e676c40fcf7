"""The SinkLoRA student in one call: a copy of the causal LM with RoPE interpolated to the target length, the
training attention switched on (SF-Attn, S2-Attn or full) and peft LoRA plus trainable embeddings and norms.

    .venv/bin/python -m pytest tests/convert/test_sinklora_student.py -q

Evaluation and export always use full causal attention (`attention_implementation(model, "sdpa")`);
`export_ready` merges the LoRA weights and removes the sparse-attention settings from the config, so the
saved directory is a plain transformers model with the new RoPE scaling.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Literal

from peft import PeftModel
from transformers import PreTrainedModel

from athanor.convert.sinklora.attention import check_model, clear_settings, configure, use_attention
from athanor.convert.sinklora.lora import ATTENTION_PROJECTIONS, add_lora, extend_context, merge_for_export

TrainingAttention = Literal["sf", "s2", "full"]
IMPLEMENTATION: dict[str, str] = {"sf": "sf_attention", "s2": "s2_attention", "full": "sdpa"}
"""Recipe value -> transformers attention implementation used while training."""


def build_student(lm: PreTrainedModel, *, target_length: int, rope_scaling: str = "linear",
                  attention: TrainingAttention = "sf", group_size: int | None = None, num_sink: int = 4,
                  lora_rank: int = 8, lora_alpha: float = 16.0, lora_dropout: float = 0.0,
                  lora_targets: Sequence[str] = ATTENTION_PROJECTIONS,
                  train_embeddings_and_norms: bool = True, original_length: int | None = None) -> PeftModel:
    """A trainable copy of `lm` (left untouched); `group_size` defaults to a quarter of the target length
    (LongLoRA's and SinkLoRA's setting); `original_length` overrides the context `lm` is treated as
    pretrained at. Raises RecipeError naming the recipe key for impossible settings."""
    check_model(lm)
    student = copy.deepcopy(lm)
    extend_context(student, target_length, rope_scaling, original=original_length)
    if attention != "full":
        configure(student, group_size=group_size or target_length // 4, num_sink=num_sink, target_length=target_length)
    use_attention(student, IMPLEMENTATION[attention])
    return add_lora(student, lora_rank, lora_alpha, lora_dropout, lora_targets, train_embeddings_and_norms)


def export_ready(model: PreTrainedModel | PeftModel) -> PreTrainedModel:
    """The model to save: LoRA merged (a peft model is spent by this), full attention, no sparse settings."""
    merged = merge_for_export(model) if isinstance(model, PeftModel) else model
    use_attention(merged, "sdpa")
    clear_settings(merged)
    return merged
