"""SinkLoRA surgery (issue 11): shifted sparse attention with sinks as transformers attention
implementations (`attention`); RoPE position interpolation, LoRA with trainable embeddings and norms, and
merging for export (`lora`); the whole student in one call (`student`).

    .venv/bin/python -m pytest tests/convert/test_sinklora_attention.py -q
    .venv/bin/python -m pytest tests/convert/test_sinklora_lora.py -q
"""

from athanor.convert.sinklora.attention import (
    FULL_IMPLEMENTATIONS,
    GROUP_SIZE_KEY,
    NUM_SINK_KEY,
    SPARSE_IMPLEMENTATIONS,
    TEACHER_KEY,
    attention_implementation,
    base_model,
    check_group_size,
    check_model,
    check_num_sink,
    clear_settings,
    configure,
    register_sparse_attention,
    s2_attention_forward,
    s2_segmented_attention_forward,
    sf_attention_forward,
    sparse_attention_mask,
    sparse_settings,
    use_attention,
)
from athanor.convert.sinklora.lora import (
    ROPE_METHODS,
    add_lora,
    extend_context,
    merge_for_export,
    original_context,
    trainable_summary,
)
from athanor.convert.sinklora.student import IMPLEMENTATION, build_student, export_ready

__all__ = [
    "IMPLEMENTATION",
    "build_student",
    "export_ready",
    "FULL_IMPLEMENTATIONS",
    "GROUP_SIZE_KEY",
    "NUM_SINK_KEY",
    "SPARSE_IMPLEMENTATIONS",
    "TEACHER_KEY",
    "attention_implementation",
    "base_model",
    "check_group_size",
    "check_model",
    "check_num_sink",
    "clear_settings",
    "configure",
    "register_sparse_attention",
    "s2_attention_forward",
    "s2_segmented_attention_forward",
    "sf_attention_forward",
    "sparse_attention_mask",
    "sparse_settings",
    "use_attention",
    "ROPE_METHODS",
    "add_lora",
    "extend_context",
    "merge_for_export",
    "original_context",
    "trainable_summary",
]
