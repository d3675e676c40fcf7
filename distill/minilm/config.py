"""MiniLM's recipe sections: `student:` and `minilm:` (pydantic, validated by `athanor validate`).

Kept apart from `method.py` so that the rest of the package (training, evaluation) can import the
settings without importing the method, and a reader finds every recipe key of the method in one file.
`MiniLMStudent` (the recipe's `student:` section) lives beside the surgery that reads it
(`convert/minilm.py`, which never imports `distill/`) and is re-exported here.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from athanor.convert.minilm import MiniLMStudent
from athanor.convert.recipe_types import RecipePath
from athanor.distill.minilm.loss import OutputLoss
from athanor.distill.spec import Section

__all__ = ["MiniLMStudent", "RelationWeights", "MiniLMArgs"]


class RelationWeights(Section):
    """Loss weight per relation; a zero weight drops that relation."""

    attention: float = Field(1.0, ge=0)
    """v1: attention distributions softmax(QKᵀ/√d)."""
    value: float = Field(1.0, ge=0)
    """v1: value relations softmax(VVᵀ/√d)."""
    qq: float = Field(1.0, ge=0)
    """v2: query-query relations."""
    kk: float = Field(1.0, ge=0)
    """v2: key-key relations."""
    vv: float = Field(1.0, ge=0)
    """v2: value-value relations."""


class MiniLMArgs(Section):
    """The recipe's `minilm:` section."""

    version: Literal["v1", "v2"] = "v2"
    """v1: attention + value relations, equal head counts; v2: Q-Q/K-K/V-V relation heads."""
    relation_heads: int | None = Field(None, ge=1)
    """v2: relation heads every Q/K/V is split into (default: the teacher's attention heads);
    must divide the attention width of teacher, student (and assistant)."""
    teacher_layer: int = -1
    """Teacher layer whose relations are the targets (-1: last)."""
    student_layer: int = -1
    """Student layer trained to match them (-1: last)."""
    weights: RelationWeights = Field(default_factory=RelationWeights)
    """Per-relation loss weights (v1 uses attention/value, v2 uses qq/kk/vv)."""
    assistant: MiniLMStudent | None = None
    """Optional teacher assistant (same keys as `student:`), distilled from the teacher first;
    the student then learns from the assistant's last layer."""
    assistant_steps: int = Field(0, ge=0)
    """Optimizer steps of the teacher → assistant phase (must be < train.max_steps)."""
    output_loss: OutputLoss = "none"
    """Output term on mask-mean-pooled last hidden states, training the layers relations never reach
    (the last layer's attention output and feed-forward); required for a student built from a
    config. 'cosine' (1 - cos per text, what sentence similarity reads) and 'mse' compare each
    embedding with the teacher's and need the teacher's width; 'similarity' matches the in-batch
    cosine-similarity matrix and works at any width; 'none': relations only."""
    output_loss_weight: float = Field(1.0, gt=0)
    """Weight of the output term against the relation losses (the terms' scales differ: cosine and
    similarity are small once the student is close)."""
    sts_file: RecipePath | None = None
    """Optional STS-format TSV (score in column 5, sentences in 6 and 7) for `eval/sts_spearman`;
    a relative path is tried from the working directory, then beside the recipe."""
