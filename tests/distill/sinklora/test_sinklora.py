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
from athanor.distill.sinklora.config import SinkLoRAArgs
from athanor.distill.sinklora.data import BookTokens, chunks, heldout_stream
from athanor.distill.sinklora.evaluation import cache_comparison, evaluate_lm
from athanor.distill.sinklora.method import SinkLoRA
from athanor.distill.sinklora.train import SinkLoRAModule, longlora_optimizer, lr_factor
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

def disjoint_windows(model, ids: torch.Tensor, window: int) -> tuple[list[float], list[int]]:
    """Independent reference: every window of `window` + 1 tokens scored on its own (stride == window): its
    summed NLL and its token count."""
    nlls, counts = [], []
    with torch.no_grad():
        for start in range(0, ids.numel() - 1, window):
            x = ids[start:start + window + 1]
            logits = model(x[None, :-1]).logits[0]
            nlls.append(F.cross_entropy(logits, x[1:], reduction="sum").item())
            counts.append(x.numel() - 1)
    return nlls, counts


def disjoint_window_ppl(model, ids: torch.Tensor, window: int) -> float:
    nlls, counts = disjoint_windows(model, ids, window)
    return math.exp(sum(nlls) / sum(counts))


def test_perplexities_equal_an_independent_computation_under_full_attention():
    teacher = tiny_llama()
    student = build_student(teacher, target_length=4 * CONTEXT, attention="sf")  # evaluated with sdpa anyway
    ids = stream(4 * CONTEXT * 3 + 1)
    out = evaluate_lm(student, None, ids, args(eval_stride_fraction=1.0), original_length=CONTEXT, batch_size=2,
                      cache_length=CONTEXT)
    from athanor.convert.sinklora import attention_implementation

    with attention_implementation(student, "sdpa"):
        for key, window in (("ppl_original_length", CONTEXT), ("ppl_target_length", 4 * CONTEXT)):
            assert out[key].value == pytest.approx(disjoint_window_ppl(student, ids, window), rel=1e-4)
            # one sample per window: its summed NLL and its tokens, in the stream's order
            nlls, counts = disjoint_windows(student, ids, window)
            assert out[key].n == len(nlls) == 4 * CONTEXT * 3 // window
            assert out[key].rows[:, 1].tolist() == counts
            assert out[key].rows[:, 0] == pytest.approx(nlls, rel=1e-4)
    assert student.get_base_model().config._attn_implementation == "sf_attention"  # restored


def test_caches_at_a_full_budget_equal_the_full_cache_and_smaller_budgets_hold_less():
    model = tiny_llama()
    sequences = [stream(48, seed=s) for s in (1, 2)]
    out = cache_comparison(model, sequences, [1.0, 0.25])
    full = out["cache_ppl_full"].value
    assert out["h2o_ppl_100"].value == pytest.approx(full, rel=1e-4)
    assert out["local_ppl_100"].value == pytest.approx(full, rel=1e-4)
    assert out["h2o_kv_mb_100"] == pytest.approx(out["cache_kv_mb_full"], rel=0.05)
    for kind in ("h2o", "local"):
        assert out[f"{kind}_kv_mb_25"] < 0.3 * out["cache_kv_mb_full"]
        assert out[f"{kind}_ppl_25"].value != pytest.approx(full, rel=1e-6)  # evicting changes the NLL
        assert out[f"{kind}_ppl_25"].n == 2  # one sample per sequence


def test_cache_perplexity_is_token_weighted_over_the_sequences():
    """The full-cache perplexity against each sequence scored by its own forward, pooled by tokens."""
    model = tiny_llama()
    sequences = [stream(40, seed=3), stream(40, seed=4)]
    out = cache_comparison(model, sequences, [])
    with torch.no_grad():
        sums = [F.cross_entropy(model(s[None, :-1]).logits[0], s[1:], reduction="sum").item() for s in sequences]
    assert out["cache_ppl_full"].value == pytest.approx(math.exp(sum(sums) / 78), rel=1e-5)
    assert out["cache_ppl_full"].rows[:, 0] == pytest.approx(sums, rel=1e-5)
    assert out["cache_ppl_full"].rows[:, 1].tolist() == [39, 39]


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
    assert keys <= set(out) <= set(SinkLoRA.metrics)
    # a random model never retrieves a five-digit key: one 0 per prompt (2 lengths x 3 depths x 1 trial)
    assert out["passkey_acc"].rows.tolist() == out["passkey_acc_h2o_50"].rows.tolist() == [0.0] * 6
    assert out["passkey_acc_64"].n == 3 and out["passkey_acc_64"].value == 0.0
    assert model.config._attn_implementation == "sdpa"  # the h2o attention was switched off again


def test_declared_metrics_and_the_recipe_values_their_keys_come_from():
    metrics = SinkLoRA.metrics
    assert metrics["ppl_target_length"] == metrics["h2o_ppl_20"] == metrics["cache_ppl_full"] == "lower"
    assert metrics["passkey_acc"] == metrics["passkey_acc_32768"] == metrics["passkey_acc_local_5"] == "higher"
    assert metrics["params"] == metrics["h2o_kv_mb_100"] == metrics["cache_kv_mb_full"] == "neutral"
    assert "latency_ms" not in metrics  # the spine's
    assert args(passkey_lengths=[16, 1_048_576], cache_budgets=[0.05, 0.1, 0.15, 0.35, 1.0]).cache_budgets[-1] == 1.0
    for bad in ({"passkey_lengths": [100]}, {"passkey_lengths": [8]}, {"cache_budgets": [0.07]},
                {"cache_budgets": [1.5]}):
        with pytest.raises(ValueError, match="powers of two|multiples of 5%"):
            args(**bad)


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
    recipe_args = args(compare=["full", "s2", "s2_segmented"], passkey_lengths=[64], cache_budgets=[0.2])
    arms = method.comparison_arms(recipe_args, TrainSpec())
    assert list(arms) == ["full", "s2", "s2_segmented"]
    assert [a.attention for a in arms.values()] == ["full", "s2", "s2_segmented"]
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


def test_the_unextended_teacher_is_a_row_and_each_arm_says_whether_it_beats_it(caplog):
    """`before` is the teacher at the target length with no extension (its own RoPE, full attention)."""
    key = "ppl_target_length"
    compare = args(attention="sf", compare=["full", "s2", "s2_segmented"])
    arms = {"full": {key: 20.0}, "s2": {key: 31.0}, "s2_segmented": {key: 25.0}}
    with caplog.at_level("WARNING", logger="athanor.distill.sinklora.method"):
        out = SinkLoRA().compare_arms(compare, {key: 30.0}, {key: 40.0}, {key: 22.0}, arms)
    assert out["ppl_unextended"] == 30.0 and out["ppl_base"] == 40.0
    assert out["sf_beats_unextended"] == 1.0 and out["full_beats_unextended"] == 1.0
    assert out["s2_segmented_beats_unextended"] == 1.0 and out["s2_beats_unextended"] == 0.0
    lines = [r.getMessage() for r in caplog.records if "unextended" in r.getMessage()]
    assert len(lines) == 1 and "s2 31" in lines[0] and "sf " not in lines[0]  # one line, naming who loses
    caplog.clear()
    # the teacher unextended already scores as well as the extended SF student (a tie does not beat it)
    with caplog.at_level("WARNING", logger="athanor.distill.sinklora.method"):
        tie = SinkLoRA().compare_arms(compare, {key: 22.0}, {key: 40.0}, {key: 22.0}, arms)
    assert tie["sf_beats_unextended"] == 0.0 and tie["full_beats_unextended"] == 1.0
    assert tie["fraction_of_gain_sf"] == pytest.approx((40 - 22) / (40 - 20))  # the gain is still reported
    (line,) = [r.getMessage() for r in caplog.records if "unextended" in r.getMessage()]
    assert "sf 22" in line and "at 128 tokens 22 without extension" in line
    caplog.clear()
    with caplog.at_level("WARNING", logger="athanor.distill.sinklora.method"):
        SinkLoRA().compare_arms(compare, {key: 90.0}, {key: 40.0}, {key: 22.0}, arms)
    assert not [r for r in caplog.records if "unextended" in r.getMessage()]  # every arm beats it: no line


def lora_weights(student) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in student.named_parameters() if "lora_" in n}


def test_every_arm_starts_from_the_main_students_lora_initialisation():
    """As the job does it: the main student is converted (pretraining its teacher first, which reseeds and draws
    from the RNG), then each arm from the same RNG states; all must start from identical LoRA weights."""
    from types import SimpleNamespace

    from athanor.distill.sinklora.config import SinkLoRAStudent
    from athanor.distill.sinklora.method import CausalTeacher

    tokens = BookTokens({"a": stream(600, seed=1).tolist()}, stream(100, seed=2).tolist(), ["b"])
    tokenizer = SimpleNamespace(bos_token_id=1, cls_token_id=None, eos_token_id=None)
    teacher = CausalTeacher(tiny_llama(), tokenizer=tokenizer, original_length=CONTEXT, tokens=tokens)
    torch.manual_seed(5)  # the job's seed
    init_rng = torch.get_rng_state()
    main = SinkLoRA().convert(teacher, SinkLoRAStudent(), args(attention="sf", pretrain_steps=2, pretrain_batch_size=2))
    assert len(teacher.pretrain_losses) == 2
    first = lora_weights(main)
    for arm in ("full", "s2", "s2_segmented"):
        torch.set_rng_state(init_rng)
        got = lora_weights(SinkLoRA().convert(teacher, SinkLoRAStudent(), args(attention=arm, pretrain_steps=2)))
        assert got.keys() == first.keys()
        for name, weight in got.items():
            torch.testing.assert_close(weight, first[name], rtol=0, atol=0)
    torch.manual_seed(6)  # an arm at another seed starts elsewhere
    other = lora_weights(SinkLoRA().convert(teacher, SinkLoRAStudent(), args(attention="s2")))
    assert any(not torch.equal(other[n], first[n]) for n in first)


def test_longlora_training_settings_by_default():
    """LongLoRA fine-tunes with weight decay 0 and a constant learning rate after warm-up."""
    params = [torch.nn.Parameter(torch.zeros(2))]
    train = TrainSpec(max_steps=100, lr=1e-3, warmup_steps=10)
    opt = longlora_optimizer(params, train)
    optimizer, scheduler = opt["optimizer"], opt["lr_scheduler"]["scheduler"]
    assert optimizer.param_groups[0]["weight_decay"] == 0.0  # not TrainSpec's generic 0.01
    lrs = []
    for _ in range(100):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)  # linear warm-up over 10 steps
    assert all(lr == pytest.approx(1e-3) for lr in lrs[10:])  # then constant
    # a recipe that sets train.weight_decay gets it; lr_schedule: linear decays to 0 at max_steps
    explicit = TrainSpec.model_validate({"max_steps": 100, "lr": 1e-3, "weight_decay": 0.05})
    assert longlora_optimizer(params, explicit)["optimizer"].param_groups[0]["weight_decay"] == 0.05
    assert lr_factor(55, 10, 100, "linear") == pytest.approx(0.5) and lr_factor(55, 10, 100, "constant") == 1.0
    module = SinkLoRA().lightning_module(None, build_student(tiny_llama(), target_length=4 * CONTEXT),
                                         None, args(lr_schedule="linear"), train)
    assert module.lr_schedule == "linear"


def test_a_rehearsal_original_length_sets_the_interpolation_base_and_cannot_exceed_the_real_context():
    from athanor.distill.sinklora.config import SinkLoRAStudent
    from athanor.distill.sinklora.method import CausalTeacher

    teacher = CausalTeacher(tiny_llama(), tokenizer=None, original_length=CONTEXT)
    student = SinkLoRA().convert(teacher, SinkLoRAStudent(), args(original_length=CONTEXT // 2, target_length=64))
    config = student.get_base_model().config
    assert config.rope_parameters["factor"] == 4.0 and config.original_max_position_embeddings == CONTEXT // 2
    with pytest.raises(RecipeError) as info:
        SinkLoRA().convert(teacher, SinkLoRAStudent(), args(original_length=2 * CONTEXT, target_length=256))
    assert info.value.key == "sinklora.original_length"
