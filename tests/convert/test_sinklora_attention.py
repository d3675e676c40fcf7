"""SinkLoRA attention surgery on a tiny random Llama (GQA: 4 query heads, 2 kv heads), float32, CPU.

    .venv/bin/python -m pytest tests/convert/test_sinklora_attention.py -q

Equality with full attention needs group_size >= 2·N, not N: a shifted head's first group is the half
group [0, G/2), so with N <= G < 2N the shifted heads still split the sequence at G/2. "s2_attention" is
LongLoRA's rolled S2 (wrap-around: not causal in original positions, no padding); "sf_attention" and
"s2_segmented_attention" share the segmented pattern.
"""

from __future__ import annotations

from unittest import mock

import pytest
import torch
from transformers import BertConfig, BertForMaskedLM, LlamaConfig, LlamaForCausalLM
from transformers.masking_utils import AttentionMaskInterface
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from athanor.convert import sinklora
from athanor.convert.recipe_types import RecipeError
from athanor.convert.sinklora import attention as sparse
from athanor.convert.sinklora import (
    attention_implementation,
    check_group_size,
    check_model,
    check_num_sink,
    configure,
    use_attention,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

N = 24  # tokens in the test sequences
SEGMENTED = ("sf_attention", "s2_segmented_attention")
"""The implementations whose pattern is positional (causal, padding-invariant); "s2_attention" wraps around."""


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=100, max_position_embeddings=256)
    return LlamaForCausalLM(config).eval()


@pytest.fixture
def model() -> LlamaForCausalLM:
    return tiny_llama()


def ids(n: int = N, seed: int = 1, batch: int = 1) -> torch.Tensor:
    return torch.randint(0, 100, (batch, n), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def logits(model: LlamaForCausalLM, tokens: torch.Tensor, **kwargs) -> torch.Tensor:
    return model(tokens, **kwargs).logits


def sparse_model(name: str = "sf_attention", group_size: int = 8, num_sink: int = 2) -> LlamaForCausalLM:
    m = tiny_llama()
    configure(m, group_size=group_size, num_sink=num_sink)
    use_attention(m, name)
    return m


# --- switching ----------------------------------------------------------------------------------------------


def test_round_trip_sdpa_sf_sdpa(model):
    tokens = ids()
    full = logits(model, tokens)
    configure(model, group_size=2 * N, num_sink=0)
    use_attention(model, "sf_attention")
    assert model.config._attn_implementation == "sf_attention"
    torch.testing.assert_close(logits(model, tokens), full, rtol=1e-5, atol=1e-5)
    configure(model, group_size=8, num_sink=0)
    assert not torch.allclose(logits(model, tokens), full, atol=1e-3)  # G < N: really sparse
    use_attention(model, "sdpa")
    assert model.config._attn_implementation == "sdpa"
    torch.testing.assert_close(logits(model, tokens), full, rtol=1e-5, atol=1e-5)


def test_segmented_s2_with_a_group_covering_the_sequence_is_full_causal(model):
    tokens = ids()
    full = logits(model, tokens)
    configure(model, group_size=2 * N, num_sink=4)  # s2 ignores num_sink
    with attention_implementation(model, "s2_segmented_attention"):
        torch.testing.assert_close(logits(model, tokens), full, rtol=1e-5, atol=1e-5)
        configure(model, group_size=8, num_sink=4)
        assert not torch.allclose(logits(model, tokens), full, atol=1e-3)
    assert model.config._attn_implementation == "sdpa"  # the context manager restored it


def test_sparse_attention_without_configure_is_a_clear_error(model):
    with pytest.raises(ValueError, match="configure"):
        use_attention(model, "sf_attention")
    with pytest.raises(ValueError, match="use one of"):
        use_attention(model, "flash_sparse")


def test_decoding_with_a_cache_is_refused_under_sparse_attention():
    m = sparse_model()
    with pytest.raises(ValueError, match="whole sequence"):
        m.generate(ids(8), max_new_tokens=2, do_sample=False)


def test_gradients_equal_sdpa_with_a_group_covering_the_sequence(model):
    """Training goes through the kernel: with G >= 2N the weight gradients are full attention's."""
    tokens, mask, positions = padded_batch("left")
    weights = torch.randn(2, N, 100, generator=torch.Generator().manual_seed(5))

    def grads() -> torch.Tensor:
        model.zero_grad()
        out = model(tokens, attention_mask=mask, position_ids=positions).logits
        (out * weights)[mask.bool()].sum().backward()  # real positions only: pad queries' outputs are arbitrary
        return model.model.layers[0].self_attn.q_proj.weight.grad.clone()

    full = grads()
    configure(model, group_size=2 * N, num_sink=0)
    with attention_implementation(model, "sf_attention"):
        torch.testing.assert_close(grads(), full, rtol=1e-4, atol=1e-6)


# --- behaviour ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", SEGMENTED)
def test_causality(name):
    m = sparse_model(name, group_size=8, num_sink=2)
    tokens = ids()
    changed = tokens.clone()
    changed[0, 17] = (changed[0, 17] + 1) % 100
    before, after = logits(m, tokens), logits(m, changed)
    torch.testing.assert_close(after[:, :17], before[:, :17], rtol=0, atol=0)
    assert not torch.allclose(after[:, 17:], before[:, 17:])


def padded_batch(side: str, pad: int = 5) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row 0: a sequence of N - pad tokens padded on `side`; row 1: N real tokens. Returns (ids, mask, position_ids)."""
    short, full = ids(N - pad, seed=2), ids(N, seed=3)
    filler = torch.zeros(1, pad, dtype=torch.long)
    real = torch.ones(1, N - pad, dtype=torch.long)
    row = torch.cat([filler, short], 1) if side == "left" else torch.cat([short, filler], 1)
    row_mask = torch.cat([filler, real], 1) if side == "left" else torch.cat([real, filler], 1)
    mask = torch.cat([row_mask, torch.ones(1, N, dtype=torch.long)])
    return torch.cat([row, full]), mask, (mask.cumsum(1) - 1).clamp(min=0)


def test_longlora_s2_lets_the_first_half_group_see_the_end():
    """LongLoRA's wrap-around, the leak SinkLoRA's segmentation removes: changing the last token changes
    the first tokens' logits under "s2_attention" (and under no other implementation)."""
    tokens = ids()
    changed = tokens.clone()
    changed[0, N - 1] = (changed[0, N - 1] + 1) % 100
    rolled = sparse_model("s2_attention", group_size=8)
    assert not torch.allclose(logits(rolled, changed)[:, :4], logits(rolled, tokens)[:, :4])
    segmented = sparse_model("s2_segmented_attention", group_size=8)
    torch.testing.assert_close(logits(segmented, changed)[:, :-1], logits(segmented, tokens)[:, :-1], rtol=0, atol=0)


def test_longlora_s2_refuses_padded_rows():
    m = sparse_model("s2_attention", group_size=8)
    tokens, mask, positions = padded_batch("right")
    with pytest.raises(ValueError, match="unpadded rows"):
        logits(m, tokens, attention_mask=mask, position_ids=positions)
    full = torch.ones_like(mask)  # an all-real mask is no padding
    torch.testing.assert_close(logits(m, tokens, attention_mask=full), logits(m, tokens), rtol=0, atol=0)


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("name", SEGMENTED)
def test_padding_is_respected(name, side):
    m = sparse_model(name, group_size=8, num_sink=2)  # pad 5: not a multiple of the group, nor of G/2
    tokens, mask, positions = padded_batch(side)
    batch = logits(m, tokens, attention_mask=mask, position_ids=positions)
    real = mask[0].bool()
    torch.testing.assert_close(batch[0, real], logits(m, tokens[:1, real])[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(batch[1], logits(m, tokens[1:])[0], rtol=1e-5, atol=1e-5)


def test_the_attention_function_and_mask_function_run():
    m = sparse_model()
    tokens, mask, positions = padded_batch("left")
    mask_fn = mock.Mock(wraps=sparse.sparse_attention_mask)
    with (mock.patch.object(sparse, "sf_attention", wraps=sparse.sf_attention) as kernel,
          mock.patch.dict(AttentionMaskInterface._global_mapping, {"sf_attention": mask_fn})):
        logits(m, tokens, attention_mask=mask, position_ids=positions)
    assert kernel.call_count == m.config.num_hidden_layers
    assert mask_fn.call_count == 1
    keep = kernel.call_args.kwargs["attention_mask"]  # the padding mask reached the kernel
    assert keep.shape == (2, N) and int(keep.sum()) == int(mask.sum())


def test_without_the_mask_registration_padding_is_silently_attended():
    """Why AttentionMaskInterface matters: unregistered, transformers passes attention_mask=None."""
    m = sparse_model()
    tokens, mask, positions = padded_batch("left")
    real = mask[0].bool()
    alone = logits(m, tokens[:1, real])[0]
    with mock.patch.dict(AttentionMaskInterface._global_mapping):
        del AttentionMaskInterface._global_mapping["sf_attention"]
        unmasked = logits(m, tokens, attention_mask=mask, position_ids=positions)[0, real]
    assert not torch.allclose(unmasked, alone, atol=1e-3)


def test_packed_sequences_are_refused():
    m = sparse_model()
    packed = torch.cat([torch.arange(12), torch.arange(12)])[None]  # two sequences in one row
    with pytest.raises(ValueError, match="causal mask with padding"):
        logits(m, ids(), position_ids=packed, use_cache=False)  # transformers detects packing without a cache


# --- an independent dense reference -------------------------------------------------------------------------


def dense_shifted_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group_size: int, num_sink: int,
                            keep: torch.Tensor, scale: float, wrap: bool = False) -> torch.Tensor:
    """The pattern written out from the kernel docstring, as one masked softmax over all token pairs. `wrap`:
    LongLoRA's roll, a shifted head's token p sits at (p - G/2) mod n, grouped and causal by that position."""
    b, h, n, d = q.shape
    k, v = (t.repeat_interleave(h // t.shape[1], dim=1) for t in (k, v))
    pos = torch.arange(n)
    shift = torch.tensor([0] * (h - h // 2) + [group_size // 2] * (h // 2))
    if wrap:
        where = (pos[None, :] - shift[:, None]) % n  # [h, n]: each token's rolled position
        group = where // group_size
        order = where[:, :, None] >= where[:, None, :]
    else:
        group = (pos[None, :] + shift[:, None]) // group_size  # [h, n]
        order = (pos[:, None] >= pos[None, :])[None]
    visible = (group[:, :, None] == group[:, None, :]) | (pos < num_sink)[None, None, :]
    visible = visible & order
    visible = visible[None] & keep[:, None, None, :]  # [b, h, n, n]
    scores = (q @ k.transpose(-1, -2) * scale).masked_fill(~visible, float("-inf"))
    weights = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # a query that sees nothing outputs zeros
    return weights @ v


SEGMENTED_CASES = [("sf_attention", 4, 2), ("sf_attention", 6, 0), ("sf_attention", 4, 7),
                   ("s2_segmented_attention", 6, 3)]


@pytest.mark.parametrize(("name", "group_size", "num_sink", "padded"), [
    *[(*case, padded) for case in SEGMENTED_CASES for padded in (False, True)],
    ("s2_attention", 6, 3, False), ("s2_attention", 4, 0, False),  # rolled: no padding (refused, tested above)
])
def test_one_layer_matches_a_dense_masked_softmax(name, group_size, num_sink, padded):
    m = sparse_model(name, group_size=group_size, num_sink=num_sink)
    layer, n = m.model.layers[0].self_attn, 13  # 13: a partial last group
    hidden = torch.randn(2, n, 64, generator=torch.Generator().manual_seed(4))
    positions = torch.arange(n)[None].expand(2, -1)
    cos, sin = m.model.rotary_emb(hidden, position_ids=positions)
    keep = torch.ones(2, n, dtype=torch.bool)
    if padded:
        keep[0, 9:] = False  # right padding: the pattern stays positional
    with torch.no_grad():
        out, _ = layer(hidden, position_embeddings=(cos, sin), attention_mask=keep if padded else None)
        shape = (2, n, -1, layer.head_dim)
        q, k, v = (proj(hidden).view(shape).transpose(1, 2) for proj in (layer.q_proj, layer.k_proj, layer.v_proj))
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        sinks = num_sink if name == "sf_attention" else 0
        ref = dense_shifted_attention(q, k, v, group_size, sinks, keep, layer.scaling, wrap=name == "s2_attention")
        ref = layer.o_proj(ref.transpose(1, 2).reshape(2, n, -1))
    torch.testing.assert_close(out[keep], ref[keep], rtol=1e-5, atol=1e-5)


# --- bad input ----------------------------------------------------------------------------------------------


def test_a_non_causal_model_is_refused_naming_the_teacher():
    bert = BertForMaskedLM(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                      intermediate_size=64, vocab_size=100))
    for call in (lambda: check_model(bert), lambda: configure(bert, group_size=8)):
        with pytest.raises(RecipeError, match="not causal") as err:
            call()
        assert err.value.key == "teacher" and "BertForMaskedLM" in str(err.value)
    with pytest.raises(RecipeError) as err:
        check_model(torch.nn.Linear(2, 2))
    assert err.value.key == "teacher"


def test_a_llama_made_bidirectional_is_refused(model):
    model.config.is_causal = False
    with pytest.raises(RecipeError, match="not causal") as err:
        check_model(model)
    assert err.value.key == "teacher"


@pytest.mark.parametrize(("group_size", "target"), [(0, None), (1, None), (7, None), (-4, None), (8.0, None),
                                                    ("8", None), (True, None), (512, 256), (10, 8)])
def test_a_group_size_that_does_not_fit_names_its_key_and_value(group_size, target):
    with pytest.raises(RecipeError) as err:
        check_group_size(group_size, target)
    assert err.value.key == sinklora.GROUP_SIZE_KEY == "sinklora.group_size"
    assert repr(group_size) in str(err.value)
    if target is not None:
        assert f"target length {target}" in str(err.value)


def test_good_settings_pass(model):
    check_group_size(2)
    check_group_size(64, target_length=64)
    check_group_size(6, target_length=20)  # a partial last group is fine
    check_num_sink(0)
    check_model(model)


@pytest.mark.parametrize("num_sink", [-1, 2.5, None])
def test_a_bad_sink_count_names_its_key(model, num_sink):
    with pytest.raises(RecipeError) as err:
        configure(model, group_size=8, num_sink=num_sink)
    assert err.value.key == "sinklora.num_sink" and repr(num_sink) in str(err.value)
