"""`build_student` and `export_ready` (convert/sinklora/student.py) on a tiny random Llama (GQA), CPU.

    .venv/bin/python -m pytest tests/convert/test_sinklora_student.py -q
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, BertConfig, BertModel, LlamaConfig, LlamaForCausalLM

from athanor.convert.recipe_types import RecipeError
from athanor.convert.sinklora import build_student, export_ready, trainable_summary

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CONTEXT = 64


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=100, max_position_embeddings=CONTEXT)
    return LlamaForCausalLM(config).eval()


def ids(n: int) -> torch.Tensor:
    return torch.randint(0, 100, (2, n), generator=torch.Generator().manual_seed(1))


def test_student_is_an_extended_lora_copy_and_the_teacher_is_untouched():
    teacher = tiny_llama()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = build_student(teacher, target_length=4 * CONTEXT, attention="sf", num_sink=4)
    base = student.get_base_model()
    assert base.config._attn_implementation == "sf_attention"
    assert base.config.sinklora_group_size == CONTEXT  # default: a quarter of the target length
    assert base.config.rope_parameters["factor"] == 4.0
    counts = trainable_summary(student)
    assert counts["lora"] > 0 and counts["embed"] == 100 * 64 and counts["norm"] > 0 and counts["other"] == 0
    # the teacher keeps its weights, its context and its attention
    assert teacher.config.max_position_embeddings == CONTEXT and teacher.config._attn_implementation == "sdpa"
    assert not hasattr(teacher.config, "sinklora_group_size")
    for key, value in teacher.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=0)


@pytest.mark.parametrize("attention, implementation", [("s2", "s2_attention"), ("full", "sdpa"),
                                                       ("s2_segmented", "s2_segmented_attention")])
def test_training_attention_is_selectable(attention, implementation):
    student = build_student(tiny_llama(), target_length=2 * CONTEXT, attention=attention, group_size=32)
    assert student.get_base_model().config._attn_implementation == implementation


def lora_weights(student) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in student.named_parameters() if "lora_" in n}


def test_the_init_seed_gives_every_attention_the_same_lora_weights_and_spares_the_callers_rng():
    teacher = tiny_llama()
    torch.manual_seed(123)
    stream = torch.rand(3)
    torch.manual_seed(123)
    students = {a: build_student(teacher, target_length=2 * CONTEXT, attention=a, group_size=32, init_seed=7)
                for a in ("sf", "s2", "s2_segmented", "full")}
    torch.testing.assert_close(torch.rand(3), stream, rtol=0, atol=0)  # the caller's RNG did not move
    first = lora_weights(students["sf"])
    assert first and any(float(w.abs().sum()) > 0 for w in first.values())  # A is random (B starts at zero)
    for student in students.values():
        got = lora_weights(student)
        assert got.keys() == first.keys()
        for name, weight in got.items():
            torch.testing.assert_close(weight, first[name], rtol=0, atol=0)
    other = lora_weights(build_student(teacher, target_length=2 * CONTEXT, attention="sf", group_size=32,
                                       init_seed=8))
    assert any(not torch.equal(other[n], first[n]) for n in first)


def test_export_ready_equals_the_adapter_model_and_reloads(tmp_path):
    student = build_student(tiny_llama(), target_length=4 * CONTEXT, attention="sf")
    with torch.no_grad():  # a non-zero LoRA update, so merging has something to merge
        for name, param in student.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    x = ids(3 * CONTEXT)
    from athanor.convert.sinklora import attention_implementation

    with torch.no_grad(), attention_implementation(student, "sdpa"):
        expected = student(x).logits
    merged = export_ready(student)
    assert merged.config._attn_implementation == "sdpa" and not hasattr(merged.config, "sinklora_group_size")
    merged.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert reloaded.config.rope_parameters["factor"] == 4.0 and reloaded.config.max_position_embeddings == 4 * CONTEXT
    with torch.no_grad():
        torch.testing.assert_close(merged(x).logits, expected, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(reloaded(x).logits, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kwargs, key", [
    ({"target_length": CONTEXT // 2}, "sinklora.target_length"),
    ({"target_length": 4 * CONTEXT, "group_size": 512}, "sinklora.group_size"),  # longer than the target
    ({"target_length": 4 * CONTEXT, "group_size": 33}, "sinklora.group_size"),  # odd: no half-group shift
    ({"target_length": 4 * CONTEXT, "num_sink": -1}, "sinklora.num_sink"),
    ({"target_length": 4 * CONTEXT, "lora_targets": ["not_a_layer"]}, "sinklora.lora_targets"),
])
def test_bad_settings_name_their_recipe_key(kwargs, key):
    with pytest.raises(RecipeError) as info:
        build_student(tiny_llama(), **kwargs)
    assert info.value.key == key


def test_a_non_causal_model_is_refused():
    encoder = BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                                   vocab_size=50))
    with pytest.raises(RecipeError) as info:
        build_student(encoder, target_length=1024)
    assert info.value.key == "teacher"
