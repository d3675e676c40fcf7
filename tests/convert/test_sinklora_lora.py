"""SinkLoRA fine-tuning surgery (RoPE interpolation, LoRA + embed/norm, merge for export) on a tiny random
Llama (GQA: 4 query heads, 2 kv heads, 64-token context), float32, CPU.

    .venv/bin/python -m pytest tests/convert/test_sinklora_lora.py -q
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from athanor.convert.recipe_types import RecipeError
from athanor.convert.sinklora import add_lora, extend_context, merge_for_export, trainable_summary

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CONTEXT = 64


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=100, max_position_embeddings=CONTEXT)
    return LlamaForCausalLM(config).eval()


def ids(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 100, (1, n), generator=torch.Generator().manual_seed(seed))


def rotary(model: LlamaForCausalLM, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.zeros(1, len(positions), 64)
    return model.model.rotary_emb(x, positions[None])


def test_linear_extension_interpolates_positions():
    model = tiny_llama()
    positions = torch.arange(0, CONTEXT)
    cos_before, sin_before = rotary(model, positions)
    extend_context(model, 4 * CONTEXT, "linear")
    assert model.config.max_position_embeddings == 4 * CONTEXT
    assert model.config.original_max_position_embeddings == CONTEXT
    assert model.config.rope_parameters["rope_type"] == "linear" and model.config.rope_parameters["factor"] == 4.0
    cos_after, sin_after = rotary(model, 4 * positions)
    torch.testing.assert_close(cos_after, cos_before, atol=1e-5, rtol=0)
    torch.testing.assert_close(sin_after, sin_before, atol=1e-5, rtol=0)
    # every attention layer reads the one rebuilt module: the long forward runs
    with torch.no_grad():
        assert model(ids(3 * CONTEXT)).logits.shape == (1, 3 * CONTEXT, 100)


def test_second_extension_is_relative_to_the_original_context():
    model = tiny_llama()
    extend_context(model, 2 * CONTEXT)
    extend_context(model, 8 * CONTEXT)
    assert model.config.rope_parameters["factor"] == 8.0 and model.config.max_position_embeddings == 8 * CONTEXT


@pytest.mark.parametrize("target", [CONTEXT, CONTEXT // 2, 0, 100.5])
def test_target_not_longer_than_original_is_an_error(target):
    model = tiny_llama()
    with pytest.raises(RecipeError) as error:
        extend_context(model, target)
    assert error.value.key == "sinklora.target_length" and str(CONTEXT) in error.value.fix
    assert model.config.rope_parameters["rope_type"] == "default"  # nothing changed


def test_unknown_method_is_an_error():
    with pytest.raises(RecipeError) as error:
        extend_context(tiny_llama(), 4 * CONTEXT, "ntk")
    assert error.value.key == "sinklora.rope_scaling"


@pytest.mark.parametrize("method", ["dynamic", "yarn"])
def test_dynamic_and_yarn_build_and_run(method):
    model = tiny_llama()
    with torch.no_grad():
        short_before = model(ids(16)).logits
        extend_context(model, 4 * CONTEXT, method)
        long = model(ids(2 * CONTEXT)).logits
        short_after = model(ids(16)).logits
    assert model.config.rope_parameters["rope_type"] == method and model.config.rope_parameters["factor"] == 4.0
    assert torch.isfinite(long).all()
    if method == "dynamic":  # NTK scaling starts only past the original context
        assert model.config.max_position_embeddings == CONTEXT
        torch.testing.assert_close(short_after, short_before)
    else:
        assert model.config.max_position_embeddings == 4 * CONTEXT
        assert model.config.rope_parameters["original_max_position_embeddings"] == CONTEXT


def lora_model(seed: int = 0):
    model = tiny_llama(seed)
    extend_context(model, 4 * CONTEXT)
    return add_lora(model, rank=4, alpha=8, dropout=0.0)


def is_lora_embed_or_norm(name: str) -> bool:
    return "lora_" in name or "embed_tokens" in name or "norm" in name


def test_only_lora_embeddings_and_norms_train():
    peft_model = lora_model()
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all(is_lora_embed_or_norm(n) for n in trainable)
    for projection in ("q_proj", "k_proj", "v_proj", "o_proj"):
        assert any(f"{projection}.lora_A" in n for n in trainable)
        assert any(f"{projection}.lora_B" in n for n in trainable)
    assert any("embed_tokens" in n for n in trainable) and any("input_layernorm" in n for n in trainable)
    assert any(n.endswith("model.norm.weight") for n in trainable)
    assert not any("lm_head" in n or "mlp" in n for n in trainable)
    # rank 4, hidden 64, kv width 32: q and o 4·64+64·4, k and v 4·64+4·32 -> 1792 per layer;
    # norms: 2 per layer + the final one, 64 each
    assert trainable_summary(peft_model) == {"lora": 2 * 1792, "embed": 100 * 64, "norm": 5 * 64, "other": 0}

    before = {n: p.detach().clone() for n, p in peft_model.named_parameters()}
    optimizer = torch.optim.SGD([p for p in peft_model.parameters() if p.requires_grad], lr=0.1)
    peft_model.train()
    tokens = ids(32)
    peft_model(tokens, labels=tokens).loss.backward()
    optimizer.step()
    changed = {n for n, p in peft_model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= trainable
    assert any("lora_B" in n for n in changed) and any("embed_tokens" in n for n in changed)


def test_without_embeddings_and_norms_only_lora_trains():
    peft_model = add_lora(tiny_llama(), rank=4, alpha=8, dropout=0.1, train_embeddings_and_norms=False)
    assert trainable_summary(peft_model) == {"lora": 2 * 1792, "embed": 0, "norm": 0, "other": 0}


@pytest.mark.parametrize(("kwargs", "key"), [
    ({"rank": 0}, "sinklora.lora_rank"),
    ({"alpha": 0}, "sinklora.lora_alpha"),
    ({"dropout": 1.0}, "sinklora.lora_dropout"),
    ({"targets": ("query",)}, "sinklora.lora_targets"),
])
def test_bad_lora_arguments_are_errors(kwargs, key):
    with pytest.raises(RecipeError) as error:
        add_lora(tiny_llama(), **{"rank": 4, "alpha": 8, "dropout": 0.0, **kwargs})
    assert error.value.key == key


def test_merged_export_reloads_with_the_adapter_outputs(tmp_path):
    peft_model = lora_model()
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    peft_model.train()
    tokens = ids(96)  # longer than the original context
    for _ in range(2):
        optimizer.zero_grad()
        peft_model(tokens, labels=tokens).loss.backward()
        optimizer.step()
    peft_model.eval()
    with torch.no_grad():
        expected = peft_model(tokens).logits
    merged = merge_for_export(peft_model)
    assert not any("lora_" in n for n, _ in merged.named_parameters())
    merged.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert reloaded.config.rope_parameters["rope_type"] == "linear" and reloaded.config.rope_parameters["factor"] == 4.0
    assert reloaded.config.max_position_embeddings == 4 * CONTEXT
    assert reloaded.config.original_max_position_embeddings == CONTEXT
    with torch.no_grad():
        torch.testing.assert_close(reloaded(tokens).logits, expected, atol=1e-5, rtol=1e-5)


def test_merge_needs_a_peft_model():
    with pytest.raises(TypeError):
        merge_for_export(tiny_llama())
