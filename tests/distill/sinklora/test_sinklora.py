"""The SinkLoRA method's parts: data chunks, evaluation against independent references, the training module
against its untrained start, the comparison arms and their summary.

    .venv/bin/python -m pytest tests/distill/sinklora/test_sinklora.py -q
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from athanor.convert.sinklora import build_student, trainable_summary
from athanor.distill.sinklora.data import BookTokens, chunks, heldout_stream
from athanor.distill.sinklora.evaluation import cache_comparison, evaluate_lm
from athanor.distill.sinklora.method import SinkLoRA, SinkLoRAArgs
from athanor.distill.sinklora.train import SinkLoRAModule
from athanor.distill.spec import RecipeError, TrainSpec

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CONTEXT, VOCAB = 32, 64


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=CONTEXT)
    return LlamaForCausalLM(config).eval()


def stream(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed))


def args(**kw) -> SinkLoRAArgs:
    defaults = {"target_length": 4 * CONTEXT, "cache_budgets": [], "passkey_lengths": []}
    return SinkLoRAArgs(**{**defaults, **kw})


# --- data ---------------------------------------------------------------------------------------------------

def test_chunks_are_whole_non_overlapping_and_seeded():
    books = {"a": list(range(100)), "b": list(range(1000, 1050))}
    got = chunks(books, 20, limit=100, seed=0)
    assert len(got) == 5 + 2 and all(c.shape == (20,) for c in got)  # the tails (0 and 10 tokens) are dropped
    starts = sorted(int(c[0]) for c in got)
    assert starts == [0, 20, 40, 60, 80, 1000, 1020]
    assert [c.tolist() for c in chunks(books, 20, limit=3, seed=0)] == [c.tolist() for c in got[:3]]
    assert [c.tolist() for c in chunks(books, 20, 100, seed=1)] != [c.tolist() for c in got]


def test_data_errors_name_their_keys():
    with pytest.raises(RecipeError) as info:
        chunks({"a": [1, 2, 3]}, 20, 10, 0)
    assert info.value.key == "sinklora.target_length"
    with pytest.raises(RecipeError) as info:
        heldout_stream(BookTokens({}, [1, 2, 3], ["Persuasion"]), 10)
    assert info.value.key == "sinklora.eval_tokens"


# --- evaluation ---------------------------------------------------------------------------------------------

def disjoint_window_ppl(model, ids: torch.Tensor, window: int) -> float:
    """Independent reference: every window of `window` + 1 tokens scored on its own (stride == window)."""
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, ids.numel() - 1, window):
            x = ids[start:start + window + 1]
            logits = model(x[None, :-1]).logits[0]
            total += F.cross_entropy(logits, x[1:], reduction="sum").item()
            count += x.numel() - 1
    return math.exp(total / count)


def test_perplexities_equal_an_independent_computation_under_full_attention():
    teacher = tiny_llama()
    student = build_student(teacher, target_length=4 * CONTEXT, attention="sf")  # evaluated with sdpa anyway
    ids = stream(4 * CONTEXT * 3 + 1)
    out = evaluate_lm(student, None, ids, args(eval_stride_fraction=1.0), original_length=CONTEXT, batch_size=2,
                      cache_length=CONTEXT)
    from athanor.convert.sinklora import attention_implementation

    with attention_implementation(student, "sdpa"):
        assert out["ppl_original_length"] == pytest.approx(disjoint_window_ppl(student, ids, CONTEXT), rel=1e-4)
        assert out["ppl_target_length"] == pytest.approx(disjoint_window_ppl(student, ids, 4 * CONTEXT), rel=1e-4)
    assert student.get_base_model().config._attn_implementation == "sf_attention"  # restored


def test_caches_at_a_full_budget_equal_the_full_cache_and_smaller_budgets_hold_less():
    model = tiny_llama()
    sequences = [stream(48, seed=s) for s in (1, 2)]
    out = cache_comparison(model, sequences, [1.0, 0.25])
    assert out["h2o_ppl_100"] == pytest.approx(out["cache_ppl_full"], rel=1e-4)
    assert out["local_ppl_100"] == pytest.approx(out["cache_ppl_full"], rel=1e-4)
    assert out["h2o_kv_mb_100"] == pytest.approx(out["cache_kv_mb_full"], rel=0.05)
    for kind in ("h2o", "local"):
        assert out[f"{kind}_kv_mb_25"] < 0.3 * out["cache_kv_mb_full"]
        assert out[f"{kind}_ppl_25"] != pytest.approx(out["cache_ppl_full"], rel=1e-6)  # evicting changes the NLL


def test_passkey_metrics_have_a_key_per_length(minilm_tokenizer_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(minilm_tokenizer_dir)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=len(tokenizer),
                                         max_position_embeddings=128)).eval()
    out = evaluate_lm(model, tokenizer, stream(300), args(target_length=128, passkey_lengths=[64, 128],
                                                          passkey_trials=1, cache_budgets=[0.5]),
                      original_length=64, batch_size=2, cache_length=64)
    keys = {"passkey_acc", "passkey_acc_64", "passkey_acc_128", "passkey_acc_h2o_50", "passkey_acc_local_50"}
    assert keys <= set(out)
    assert out["passkey_acc"] == out["passkey_acc_h2o_50"] == 0.0  # a random model never retrieves a five-digit key
    assert model.config._attn_implementation == "sdpa"  # the h2o attention was switched off again


# --- training -----------------------------------------------------------------------------------------------

def test_training_through_sf_attention_lowers_the_loss_and_moves_only_lora_embeddings_and_norms():
    student = build_student(tiny_llama(), target_length=4 * CONTEXT, attention="sf", group_size=32)
    frozen = {n: p.detach().clone() for n, p in student.named_parameters() if not p.requires_grad}
    batch = (torch.arange(2 * 4 * CONTEXT) % 8).reshape(2, -1)  # a cycle: learnable in a few steps
    module = SinkLoRAModule(student, TrainSpec(max_steps=30, lr=1e-2, warmup_steps=0))
    optimizer = module.configure_optimizers()["optimizer"]
    module.log = lambda *a, **k: None  # outside a Trainer
    student.train()
    start = module.training_step(batch, 0).item()
    for step in range(30):
        loss = module.training_step(batch, step)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert module.training_step(batch, 0).item() < start - 0.4  # measured 4.25 -> 3.39 (the head stays frozen)
    for name, param in student.named_parameters():
        if name in frozen:
            torch.testing.assert_close(param, frozen[name], rtol=0, atol=0)
    assert trainable_summary(student)["other"] == 0


# --- comparison arms ----------------------------------------------------------------------------------------

def test_comparison_arms_change_only_the_attention_and_drop_the_costly_tests():
    method = SinkLoRA()
    recipe_args = args(compare=["full", "s2"], passkey_lengths=[64], cache_budgets=[0.2])
    arms = method.comparison_arms(recipe_args, TrainSpec())
    assert list(arms) == ["full", "s2"]
    assert [a.attention for a in arms.values()] == ["full", "s2"]
    assert all(a.passkey_lengths == [] and a.cache_budgets == [] and a.compare == [] for a in arms.values())
    assert all(a.target_length == recipe_args.target_length for a in arms.values())
    assert method.comparison_arms(args(), TrainSpec()) == {}


@pytest.mark.parametrize("compare, train, why", [
    (["sf", "full"], TrainSpec(), "already"),
    (["s2"], TrainSpec(), "add 'full'"),
    (["full"], TrainSpec(num_nodes=2), "one node"),
])
def test_impossible_comparisons_name_the_compare_key(compare, train, why):
    with pytest.raises(RecipeError, match=why) as info:
        SinkLoRA().comparison_arms(args(compare=compare), train)
    assert info.value.key == "sinklora.compare"


def test_fraction_of_gain_against_the_full_attention_arm():
    key = "ppl_target_length"
    out = SinkLoRA().compare_arms(args(attention="sf", compare=["full", "s2"]), {key: 50.0}, {key: 40.0},
                                  {key: 22.0}, {"full": {key: 20.0}, "s2": {key: 32.0}})
    assert out["ppl_base"] == 40.0  # the untrained student, when measured
    assert out["fraction_of_gain_sf"] == pytest.approx((40 - 22) / (40 - 20))
    assert out["fraction_of_gain_s2"] == pytest.approx((40 - 32) / (40 - 20))
    assert "fraction_of_gain_full" not in out
    no_untrained = SinkLoRA().compare_arms(args(compare=["full"]), {key: 50.0}, None, {key: 22.0},
                                           {"full": {key: 20.0}})
    assert no_untrained["fraction_of_gain_sf"] == pytest.approx((50 - 22) / (50 - 20))
    # a full arm that did not improve on the base gives no fraction (it would be meaningless), not a crash
    worse = SinkLoRA().compare_arms(args(compare=["full"]), {key: 50.0}, None, {key: 22.0}, {"full": {key: 60.0}})
    assert "fraction_of_gain_sf" not in worse and worse["ppl_full"] == 60.0


def test_a_rehearsal_original_length_sets_the_interpolation_base_and_cannot_exceed_the_real_context():
    from athanor.distill.sinklora.method import CausalTeacher, SinkLoRAStudent

    teacher = CausalTeacher(tiny_llama(), tokenizer=None, original_length=CONTEXT)
    student = SinkLoRA().convert(teacher, SinkLoRAStudent(), args(original_length=CONTEXT // 2, target_length=64))
    config = student.get_base_model().config
    assert config.rope_parameters["factor"] == 4.0 and config.original_max_position_embeddings == CONTEXT // 2
    with pytest.raises(RecipeError) as info:
        SinkLoRA().convert(teacher, SinkLoRAStudent(), args(original_length=2 * CONTEXT, target_length=256))
    assert info.value.key == "sinklora.original_length"
