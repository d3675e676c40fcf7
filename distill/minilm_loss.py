"""MiniLM relation losses (v1: attention + value relation; v2: Q-Q, K-K, V-V relations).

Relations are computed from Q/K/V recomputed from the layer input (hidden_states[l] is the input of
layer l) with the layer's own projections, so attention dropout never enters the targets. Masked
(padding) keys are excluded from every softmax; the KL is averaged over relation heads and real
(non-padding) query tokens, as in Wang et al. 2020 (MiniLM) and 2021 (MiniLMv2).

Tests: `.venv/bin/python -m pytest tests/distill/test_minilm_loss.py -q`
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from convert.minilm import layer_list, qkv

# Relation name -> the two projections it relates ("attention" is softmax(QK^T/sqrt(d))).
RELATIONS: dict[str, tuple[str, str]] = {
    "attention": ("q", "k"),
    "value": ("v", "v"),
    "qq": ("q", "q"),
    "kk": ("k", "k"),
    "vv": ("v", "v"),
}


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tokenizer fields an encoder's forward takes (drops anything else a loader adds)."""
    keep = ("input_ids", "attention_mask", "token_type_ids")
    return {k: v for k, v in batch.items() if k in keep}


def resolve_layer(model: PreTrainedModel, layer: int) -> int:
    """A non-negative layer index (-1 is the last layer); IndexError when out of range."""
    n = len(layer_list(model))
    if not -n <= layer < n:
        raise IndexError(f"layer {layer} out of range for {n} layers")
    return layer % n


def layer_projections(
    model: PreTrainedModel, batch: dict[str, torch.Tensor], layer: int, needed: set[str]
) -> dict[str, torch.Tensor]:
    """Run `model` and recompute the `needed` projections ('q', 'k', 'v') of `layer` from its input."""
    out = model(**model_inputs(batch), output_hidden_states=True)
    x = out.hidden_states[layer]  # hidden_states[l] is the input of layer l
    linears = dict(zip("qkv", qkv(model, layer)))
    return {name: linears[name](x) for name in sorted(needed)}


def relation_logprobs(
    a: torch.Tensor, b: torch.Tensor, heads: int, key_mask: torch.Tensor
) -> torch.Tensor:
    """log softmax(A_h B_hᵀ / sqrt(d_h)) per head, over unmasked keys: (batch, heads, T, T), float32.

    a, b: (batch, T, heads * d_h); key_mask: (batch, T) bool, True for real tokens.
    """
    bsz, length, width = a.shape
    d = width // heads
    a = a.float().view(bsz, length, heads, d).transpose(1, 2)
    b = b.float().view(bsz, length, heads, d).transpose(1, 2)
    scores = torch.matmul(a, b.transpose(-1, -2)) / math.sqrt(d)
    # A finite minimum (not -inf) keeps masked entries at probability exactly 0 without NaNs.
    scores = scores.masked_fill(~key_mask[:, None, None, :], torch.finfo(scores.dtype).min)
    return F.log_softmax(scores, dim=-1)


def relation_kl(
    teacher_logp: torch.Tensor, student_logp: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """KL(teacher ‖ student) per query row, averaged over heads and real query tokens."""
    kl = F.kl_div(student_logp, teacher_logp, log_target=True, reduction="none")
    kl = kl.masked_fill(~mask[:, None, None, :], 0.0).sum(-1)  # (batch, heads, T)
    kl = kl * mask[:, None, :]
    return kl.sum() / (mask.sum() * teacher_logp.shape[1])


@dataclass(frozen=True)
class RelationSpec:
    """Which relations to match, with how many heads each side splits its projections into."""

    weights: dict[str, float]
    """Relation name (see RELATIONS) -> loss weight; zero-weight relations are skipped."""
    teacher_heads: int
    student_heads: int
    teacher_layer: int
    student_layer: int

    @property
    def needed(self) -> set[str]:
        return {p for name, w in self.weights.items() if w for p in RELATIONS[name]}


def teacher_targets(
    teacher: PreTrainedModel, batch: dict[str, torch.Tensor], spec: RelationSpec
) -> dict[str, torch.Tensor]:
    """The teacher's relation log-probabilities (no grad), one (batch, heads, T, T) per relation."""
    mask = batch["attention_mask"].bool()
    with torch.no_grad():
        proj = layer_projections(teacher, batch, spec.teacher_layer, spec.needed)
        return {
            name: relation_logprobs(proj[RELATIONS[name][0]], proj[RELATIONS[name][1]],
                                    spec.teacher_heads, mask)
            for name, w in spec.weights.items() if w
        }


def minilm_loss(
    student: PreTrainedModel,
    targets: dict[str, torch.Tensor],
    batch: dict[str, torch.Tensor],
    spec: RelationSpec,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Weighted sum of the relation KLs and each unweighted term (for logging)."""
    mask = batch["attention_mask"].bool()
    proj = layer_projections(student, batch, spec.student_layer, spec.needed)
    terms: dict[str, torch.Tensor] = {}
    total = torch.zeros((), device=mask.device)
    for name, target in targets.items():
        a, b = RELATIONS[name]
        logp = relation_logprobs(proj[a], proj[b], spec.student_heads, mask)
        terms[name] = relation_kl(target, logp, mask)
        total = total + spec.weights[name] * terms[name]
    return total, terms
