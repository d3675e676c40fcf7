"""Evaluation of text encoders against their teacher: size, agreement, STS. No timing here: the
spine times `speed_probe` callables of teacher and student interleaved (`distill/timing.py`).

Every metric is defined for any pair of models, so the teacher ("before") and the student ("after")
report the same keys:

- `params`: parameter count (a plain float).
- `embedding_cosine`: mean cosine between the model's and the teacher's mean-pooled embeddings of
  each held-out text. Defined only when both have the same hidden size (NaN otherwise, so that
  before and after still log the same keys); 1.0 for the teacher. Per sample: one cosine per text.
- `similarity_agreement`: similarity-structure agreement, defined for any hidden size. Mean-pooled
  embeddings of the held-out texts give each model a cosine-similarity matrix S (texts × texts); for
  each text, the cosine between its model row and its teacher row, diagonal dropped and each row
  mean-centred (i.e. the Pearson correlation of the two rows), averaged over texts.
  1.0 for the teacher; ≈0 for unrelated embeddings. Per sample: one correlation per text.
- `sts_spearman` (only with an STS file, `minilm.sts_file`): Spearman correlation of embedding
  cosine vs gold score. Per sample: one (cosine, gold score) row per sentence pair, so a bootstrap
  resamples pairs and recomputes the rank correlation.

The per-sample metrics are `PerSample`s (`distill/intervals.py`) whose rows follow the held-out texts
and the STS file in their order, the same for every model: the spine's paired intervals rely on it.

Tests: `.venv/bin/python -m pytest tests/distill/test_encoder_eval.py -q`
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import torch

from athanor.convert.module_utils import count_params
from athanor.distill.intervals import PerSample
from athanor.distill.spec import EvalSpec, RecipeError

STS_KEY = "minilm.sts_file"


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of the real-token vectors: (batch, T, D), (batch, T) -> (batch, D), float32."""
    m = mask.to(torch.float32).unsqueeze(-1)
    return (hidden.float() * m).sum(1) / m.sum(1).clamp(min=1.0)


def _forward(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(**batch).last_hidden_state


@torch.no_grad()
def embed(model: torch.nn.Module, tokenizer: Any, texts: list[str], batch_size: int,
          max_length: int) -> torch.Tensor:
    """Mean-pooled embeddings of `texts` (float32, on CPU)."""
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(texts), batch_size):
        batch = tokenizer(texts[i:i + batch_size], truncation=True, max_length=max_length,
                          padding=True, return_tensors="pt").to(device)
        out.append(mean_pool(_forward(model, dict(batch)), batch["attention_mask"]).cpu())
    return torch.cat(out)


def agreement_rows(model_emb: torch.Tensor, teacher_emb: torch.Tensor) -> torch.Tensor:
    """Per text, the Pearson correlation of the two models' cosine-similarity rows (no diagonal): [n]."""
    n = model_emb.shape[0]
    if n < 3:
        raise ValueError("similarity agreement needs at least 3 texts")

    def rows(e: torch.Tensor) -> torch.Tensor:
        e = torch.nn.functional.normalize(e.double(), dim=-1)
        s = e @ e.T
        off = s[~torch.eye(n, dtype=torch.bool)].view(n, n - 1)
        return off - off.mean(dim=1, keepdim=True)

    return torch.nn.functional.cosine_similarity(rows(model_emb), rows(teacher_emb), dim=1)


def similarity_agreement(model_emb: torch.Tensor, teacher_emb: torch.Tensor) -> float:
    """Mean per-text Pearson correlation of the two models' cosine-similarity rows (no diagonal)."""
    return agreement_rows(model_emb, teacher_emb).mean().item()


def mean_cosine(model_emb: torch.Tensor, teacher_emb: torch.Tensor) -> PerSample | float:
    """Per-text cosine of the two models' embeddings (their mean is the metric); NaN when the widths differ
    (a plain float: there are no rows to resample)."""
    if model_emb.shape != teacher_emb.shape:
        return float("nan")
    cosines = torch.nn.functional.cosine_similarity(model_emb.double(), teacher_emb.double(), dim=-1)
    return PerSample.mean(cosines.numpy())


def read_sts(path: str) -> tuple[list[str], list[str], list[float]]:
    """STS-Benchmark TSV: genre, file, year, id, score, sentence1, sentence2 (+ ignored extras)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise RecipeError(STS_KEY, path, "no such file")
    first, second, scores = [], [], []
    with p.open(encoding="utf-8") as f:
        for lineno, row in enumerate(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE), 1):
            if not row or not any(row):
                continue
            if len(row) < 7:
                raise RecipeError(STS_KEY, f"{path}:{lineno}",
                                  f"expected 7 tab-separated fields, found {len(row)}")
            try:
                score = float(row[4])
            except ValueError:
                if lineno == 1:  # a header line
                    continue
                raise RecipeError(STS_KEY, f"{path}:{lineno}",
                                  f"score {row[4]!r} is not a number") from None
            first.append(row[5])
            second.append(row[6])
            scores.append(score)
    if len(scores) < 3:
        raise RecipeError(STS_KEY, path, "needs at least 3 scored pairs")
    return first, second, scores


def sts_spearman(model: torch.nn.Module, tokenizer: Any, path: str, batch_size: int,
                 max_length: int) -> PerSample:
    """Spearman correlation between cosine(embedding1, embedding2) and the gold scores, one row per pair."""
    first, second, scores = read_sts(path)
    a = embed(model, tokenizer, first, batch_size, max_length)
    b = embed(model, tokenizer, second, batch_size, max_length)
    cosine = torch.nn.functional.cosine_similarity(a, b, dim=-1)
    return PerSample.spearman(cosine.numpy(), scores)


def evaluate_encoder(model: torch.nn.Module, teacher: torch.nn.Module, tokenizer: Any,
                     texts: list[str], spec: EvalSpec, max_length: int,
                     sts_file: str | None = None) -> dict[str, float | PerSample]:
    """All metrics above for `model` against `teacher`, both on CPU in eval mode."""
    texts = texts[: spec.max_texts]
    modes = (model.training, teacher.training)
    model.eval().to("cpu")
    teacher.eval().to("cpu")
    try:
        model_emb = embed(model, tokenizer, texts, spec.batch_size, max_length)
        teacher_emb = (model_emb if model is teacher
                       else embed(teacher, tokenizer, texts, spec.batch_size, max_length))
        metrics: dict[str, float | PerSample] = {
            "params": float(count_params(model)),
            "embedding_cosine": mean_cosine(model_emb, teacher_emb),
            "similarity_agreement": PerSample.mean(agreement_rows(model_emb, teacher_emb).numpy()),
        }
        if sts_file:
            metrics["sts_spearman"] = sts_spearman(model, tokenizer, sts_file, spec.batch_size, max_length)
    finally:
        model.train(modes[0])
        teacher.train(modes[1])
    return metrics
