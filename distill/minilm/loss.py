"""MiniLM losses: relations (v1: attention + value relation; v2: Q-Q, K-K, V-V) and an output term.

Relations are computed from Q/K/V recomputed from the layer input (hidden_states[l] is the input of
layer l) with the layer's own projections, so attention dropout never enters the targets. Masked
(padding) keys are excluded from every softmax; the KL is averaged over relation heads and real
(non-padding) query tokens, as in Wang et al. 2020 (MiniLM) and 2021 (MiniLMv2).

Relation losses reach only the embeddings, the layers below the distilled layer and that layer's
Q/K/V projections. The optional output term on the mask-mean-pooled last hidden state (the pooling
of the teacher's sentence-transformers head) reaches the rest: the distilled layer's attention
output and feed-forward, i.e. everything a sentence embedding is read from. `mse` and `cosine`
compare each text's embedding with the teacher's (equal widths); `similarity` compares the in-batch
cosine-similarity matrices, which any width has. It needs both forwards to run to the end; a
relation-only step ends them early.

Two things keep a step close to "teacher forward + student forward/backward" (see
benchmarks/minilm_step.py): forwards end at the distilled layer's input (`layer_input`), and the KL
and its gradient are fused by hand (`RelationKL`) instead of going through autograd's
log_softmax/kl_div graph, which stores and re-reads several (T × T) tensors per relation.

Tests: `.venv/bin/python -m pytest tests/distill/minilm/test_loss.py -q`
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
from transformers import PreTrainedModel

from athanor.convert.minilm import layer_list, qkv
from athanor.distill.encoder_eval import mean_pool

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


class _LayerReached(Exception):
    """Raised by the pre-hook once the distilled layer's input is captured, to end the forward."""


def run_to_layer(
    model: PreTrainedModel, batch: dict[str, torch.Tensor], layer: int, early_exit: bool = True
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(hidden states entering `layer`, the last hidden state or None when the forward ended early).

    A forward pre-hook on the layer captures its input. With `early_exit` it also ends the forward
    there: no relation loss reads the later layers (or the distilled layer's own output), so running
    them would only cost time — a sixth of the teacher and a third of a 3-layer student. An output
    loss, and strategies whose hooks need every forward to complete (DeepSpeed ZeRO-3), run it all.
    """
    captured: list[torch.Tensor] = []

    def grab(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        captured.append(args[0] if args else kwargs["hidden_states"])
        if early_exit:
            raise _LayerReached

    handle = layer_list(model)[layer].register_forward_pre_hook(grab, with_kwargs=True)
    last = None
    try:
        last = model(**model_inputs(batch)).last_hidden_state
    except _LayerReached:
        pass
    finally:
        handle.remove()
    return captured[0], last


def layer_input(
    model: PreTrainedModel, batch: dict[str, torch.Tensor], layer: int, early_exit: bool = True
) -> torch.Tensor:
    """The hidden states entering `layer` (what hidden_states[layer] would hold)."""
    return run_to_layer(model, batch, layer, early_exit)[0]


def projections_of(model: PreTrainedModel, x: torch.Tensor, layer: int, needed: set[str]
                   ) -> dict[str, torch.Tensor]:
    """The `needed` projections ('q', 'k', 'v') of `layer` applied to its input `x`."""
    linears = dict(zip("qkv", qkv(model, layer)))
    return {name: linears[name](x) for name in sorted(needed)}


def layer_projections(
    model: PreTrainedModel, batch: dict[str, torch.Tensor], layer: int, needed: set[str],
    early_exit: bool = True,
) -> dict[str, torch.Tensor]:
    """Recompute the `needed` projections ('q', 'k', 'v') of `layer` from its input."""
    return projections_of(model, layer_input(model, batch, layer, early_exit), layer, needed)


def _float32(x: torch.Tensor) -> torch.autocast:
    """Switch autocast off: relations are computed in float32 under any training precision."""
    return torch.autocast(x.device.type, enabled=False)


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(batch, T, heads * d) -> (batch * heads, T, d), float32."""
    bsz, length, width = x.shape
    return x.float().view(bsz, length, heads, width // heads).transpose(1, 2).reshape(
        bsz * heads, length, width // heads)


def _from_heads(x: torch.Tensor, bsz: int, heads: int, dtype: torch.dtype) -> torch.Tensor:
    """(batch * heads, T, d) -> (batch, T, heads * d) in `dtype`."""
    _, length, d = x.shape
    return x.view(bsz, heads, length, d).transpose(1, 2).reshape(bsz, length, heads * d).to(dtype)


def _masked_softmax(a: torch.Tensor, b: torch.Tensor, key_bias: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(A Bᵀ/√d + bias) and its log-normaliser, for (batch*heads, T, d) inputs.

    Masked keys carry a -inf bias, so exp() gives exactly 0 there. (A finite minimum instead
    makes CPU exp() several times slower on those entries.)
    """
    scores = torch.baddbmm(key_bias, a, b.transpose(1, 2), alpha=1 / math.sqrt(a.shape[-1]))
    peak = scores.amax(dim=-1, keepdim=True)
    probs = scores.sub_(peak).exp_()  # in place: one exp pass, no extra (T, T) buffer
    total = probs.sum(dim=-1, keepdim=True)
    return probs.div_(total), (peak + total.log()).squeeze(-1)


def _expected_score(probs: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Σ_j p_ij (a_i·b_j)/√d per row, as a_i·(P B)_i/√d: a matmul instead of a (T, T) product."""
    return (a * torch.bmm(probs, b)).sum(-1) / math.sqrt(a.shape[-1])


def key_bias(mask: torch.Tensor, heads: int) -> torch.Tensor:
    """(batch, T) bool mask -> (batch * heads, 1, T) additive bias: 0 for real keys, -inf else."""
    bias = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
    bias = bias.masked_fill(~mask, float("-inf"))
    return bias[:, None, None, :].expand(-1, heads, 1, -1).reshape(-1, 1, mask.shape[1])


def row_weights(mask: torch.Tensor, heads: int) -> torch.Tensor:
    """(batch * heads, T) weights averaging over heads and real query tokens (0 for padding)."""
    w = mask.float() / (mask.sum() * heads)
    return w[:, None, :].expand(-1, heads, -1).reshape(-1, mask.shape[1])


@dataclass(frozen=True)
class Relation:
    """A teacher relation: per-head row distributions and their Σ p log p (row negative entropy)."""

    probs: torch.Tensor
    """(batch * heads, T, T) float32, exactly 0 on padding keys."""
    plogp: torch.Tensor
    """(batch * heads, T) Σ_j p_ij log p_ij."""
    heads: int

    def view(self, bsz: int) -> torch.Tensor:
        """Probabilities as (batch, heads, T, T)."""
        return self.probs.view(bsz, self.heads, *self.probs.shape[1:])


def teacher_relation(a: torch.Tensor, b: torch.Tensor, heads: int, mask: torch.Tensor) -> Relation:
    """The relation softmax(A_h B_hᵀ/√d) of (batch, T, heads*d) projections, without gradient."""
    with torch.no_grad(), _float32(a):
        ah, bh = _heads(a, heads), _heads(b, heads)
        probs, lse = _masked_softmax(ah, bh, key_bias(mask, heads))
        # Σ p log p = Σ p (s - lse) = E_p[s] - lse (p sums to 1): no log of zeros, no (T, T) pass.
        return Relation(probs, _expected_score(probs, ah, bh) - lse, heads)


class RelationKL(torch.autograd.Function):
    """Σ_rows w_i KL(p_i ‖ softmax(s_i)), s = A_h B_hᵀ/√d over unmasked keys, fused by hand.

    KL_i = Σ p log p − Σ_j p_ij s_ij + logsumexp(s_i), and ∂KL_i/∂s_ij = q_ij − p_ij with
    q = softmax(s): autograd would store and revisit several (T, T) intermediates per relation;
    this keeps one (q) and needs a single exp pass, which is most of the cost on CPU.
    """

    @staticmethod
    def forward(ctx, a: torch.Tensor, b: torch.Tensor, probs: torch.Tensor, plogp: torch.Tensor,
                weights: torch.Tensor, bias: torch.Tensor, heads: int) -> torch.Tensor:
        with _float32(a):
            ah, bh = _heads(a, heads), _heads(b, heads)
            q, lse = _masked_softmax(ah, bh, bias)
            kl = plogp - _expected_score(probs, ah, bh) + lse
        ctx.save_for_backward(ah, bh, probs, q, weights)
        ctx.meta = (a.shape[0], heads, a.dtype, b.dtype)
        return (kl * weights).sum()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        ah, bh, probs, q, weights = ctx.saved_tensors
        bsz, heads, a_dtype, b_dtype = ctx.meta
        scale = (weights * (grad / math.sqrt(ah.shape[-1]))).unsqueeze(-1)
        g = (q - probs).mul_(scale)  # ∂loss/∂scores, times 1/√d for the projections
        grad_a = _from_heads(torch.bmm(g, bh), bsz, heads, a_dtype)
        grad_b = _from_heads(torch.bmm(g.transpose(1, 2), ah), bsz, heads, b_dtype)
        return grad_a, grad_b, None, None, None, None, None


def relation_kl(target: Relation, a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor
                ) -> torch.Tensor:
    """KL(teacher ‖ student) per real query row, averaged over relation heads and real tokens."""
    heads = target.heads
    return RelationKL.apply(a, b, target.probs, target.plogp, row_weights(mask, heads),
                            key_bias(mask, heads), heads)


OutputLoss = Literal["none", "mse", "cosine", "similarity"]


@dataclass(frozen=True)
class RelationSpec:
    """Which relations to match, over how many (relation) heads, at which layers; the output term."""

    weights: dict[str, float]
    """Relation name (see RELATIONS) -> loss weight; zero-weight relations are skipped."""
    heads: int
    """Heads both sides split their projections into (v1: the shared attention head count)."""
    teacher_layer: int
    student_layer: int
    early_exit: bool = True
    """End each forward at the distilled layer's input when no output term needs the rest."""
    output_loss: OutputLoss = "none"
    """Term on mean-pooled last hidden states: 'mse', 'cosine' (1 - cos), 'similarity' or 'none'."""
    output_weight: float = 1.0

    @property
    def needed(self) -> set[str]:
        return {p for name, w in self.weights.items() if w for p in RELATIONS[name]}

    @property
    def exits_early(self) -> bool:
        """Forwards may stop at the distilled layer: only when no output term reads the last layer."""
        return self.early_exit and self.output_loss == "none"


@dataclass(frozen=True)
class Targets:
    """What the source model (teacher or assistant) gives one batch: relations and its embedding."""

    relations: dict[str, Relation]
    embedding: torch.Tensor | None = field(default=None)
    """(batch, D) float32 mean-pooled last hidden state, when the spec has an output term."""


def teacher_targets(
    teacher: PreTrainedModel, batch: dict[str, torch.Tensor], spec: RelationSpec
) -> Targets:
    """The teacher's relations (no grad), one per non-zero weight, and its pooled embedding."""
    mask = batch["attention_mask"].bool()
    with torch.no_grad():
        x, last = run_to_layer(teacher, batch, spec.teacher_layer, spec.exits_early)
        proj = projections_of(teacher, x, spec.teacher_layer, spec.needed)
        embedding = mean_pool(last, mask) if spec.output_loss != "none" else None
    relations = {
        name: teacher_relation(proj[RELATIONS[name][0]], proj[RELATIONS[name][1]], spec.heads, mask)
        for name, w in spec.weights.items() if w
    }
    return Targets(relations, embedding)


def cosine_matrix(x: torch.Tensor) -> torch.Tensor:
    """(batch, D) -> (batch, batch) cosine similarities between the rows."""
    x = torch.nn.functional.normalize(x, dim=-1)
    return x @ x.T


def output_term(kind: OutputLoss, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """mse: mean squared difference per dimension; cosine: mean (1 - cos) per text; similarity:
    mean squared difference of the off-diagonal in-batch cosine similarities. float32."""
    with _float32(student):
        student, teacher = student.float(), teacher.float()
        if kind == "mse":
            return torch.nn.functional.mse_loss(student, teacher)
        if kind == "cosine":
            return (1 - torch.nn.functional.cosine_similarity(student, teacher, dim=-1)).mean()
        n = student.shape[0]
        off = ~torch.eye(n, dtype=torch.bool, device=student.device)
        return (cosine_matrix(student) - cosine_matrix(teacher))[off].pow(2).mean() if n > 1 else student.sum() * 0


def minilm_loss(
    student: PreTrainedModel,
    targets: Targets,
    batch: dict[str, torch.Tensor],
    spec: RelationSpec,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Weighted sum of the relation KLs (+ the output term) and each unweighted term (for logging)."""
    mask = batch["attention_mask"].bool()
    x, last = run_to_layer(student, batch, spec.student_layer, spec.exits_early)
    proj = projections_of(student, x, spec.student_layer, spec.needed)
    terms: dict[str, torch.Tensor] = {}
    total = torch.zeros((), device=mask.device)
    for name, target in targets.relations.items():
        a, b = RELATIONS[name]
        terms[name] = relation_kl(target, proj[a], proj[b], mask)
        total = total + spec.weights[name] * terms[name]
    if spec.output_loss != "none":
        assert targets.embedding is not None and last is not None, "an output term needs full forwards"
        terms["output"] = output_term(spec.output_loss, mean_pool(last, mask), targets.embedding)
        total = total + spec.output_weight * terms["output"]
    return total, terms
