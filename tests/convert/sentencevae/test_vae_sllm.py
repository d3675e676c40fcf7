"""SentenceVAE encoder/decoder/SLLM: `.venv/bin/python -m pytest tests/convert/sentencevae/test_vae_sllm.py -q`."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM

from athanor.convert.sentencevae.sllm import SentenceVAEModel
from athanor.convert.sentencevae.vae import KVCache, VAEConfig, focal_cross_entropy

V, H = 64, 32


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_lm(family: str):
    torch.manual_seed(0)
    if family == "llama":
        return LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=H, intermediate_size=64, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2,
                                            max_position_embeddings=64)).eval()
    if family == "opt":  # inner width 64 with project_in/out to the 32-wide embeddings (as OPT-350m)
        return OPTForCausalLM(OPTConfig(vocab_size=V, hidden_size=64, word_embed_proj_dim=H, ffn_dim=64,
                                        num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64)).eval()
    return GPT2LMHeadModel(GPT2Config(vocab_size=V, n_embd=H, n_layer=2, n_head=4, n_positions=64)).eval()


def tiny_vae(family: str = "llama", pooling: str = "weighted", layers: int = 2) -> SentenceVAEModel:
    cfg = VAEConfig(vocab_size=V, hidden_size=H, pad_id=0, bos_id=1, eos_id=2, max_sentence_tokens=12,
                    encoder_layers=layers, decoder_layers=layers, heads=4, ffn_size=64, pooling=pooling)
    torch.manual_seed(1)
    return SentenceVAEModel.from_lm(tiny_lm(family), cfg).eval()


@pytest.mark.parametrize("pooling", ["sum", "weighted"])
def test_padding_never_changes_a_sentence_vector(pooling: str) -> None:
    model = tiny_vae(pooling=pooling)
    sentence = torch.tensor([[5, 9, 17, 3, 40]])
    alone = model.encode(sentence, torch.tensor([5]))
    padded = torch.cat([sentence, torch.full((1, 7), 0)], dim=1)  # 7 pad tokens
    garbage = torch.cat([sentence, torch.randint(3, V, (1, 7))], dim=1)  # any ids past the length
    batch = torch.cat([padded, garbage, torch.randint(3, V, (1, 12))])
    out = model.encode(batch, torch.tensor([5, 5, 12]))
    assert alone.shape == (1, H) and out.shape == (3, H)
    torch.testing.assert_close(out[0], alone[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[1], alone[0], atol=1e-5, rtol=1e-5)
    assert (out[2] - alone[0]).abs().max() > 1e-3  # a different sentence does get a different vector


def test_sum_pooling_matches_reference() -> None:
    model = tiny_vae(pooling="sum")
    ids = torch.tensor([[7, 8, 9]])
    enc = model.encoder
    h = enc.layers(enc.embed(ids) + enc.pos.weight[:3])
    torch.testing.assert_close(model.encode(ids, torch.tensor([3])), enc.norm(h.sum(1)))
    with pytest.raises(ValueError, match="max_sentence_tokens"):
        model.encode(torch.ones(1, 13, dtype=torch.long), torch.tensor([13]))


def test_embeddings_start_from_the_lm_and_head_is_tied() -> None:
    lm = tiny_lm("llama")
    cfg = VAEConfig(vocab_size=V, hidden_size=H, pad_id=0, bos_id=1, eos_id=2, heads=4, ffn_size=64)
    model = SentenceVAEModel.from_lm(lm, cfg)
    torch.testing.assert_close(model.embed.weight, lm.get_input_embeddings().weight)
    assert model.encoder.embed is model.decoder.embed is model.embed
    memory = torch.randn(1, H)
    x = model.decoder.embed(torch.tensor([[1]])) + model.decoder.pos.weight[:1]
    for i, layer in enumerate(model.decoder.layers):
        x = layer(x, memory[:, None], None, i)
    scale = 1 / (lm.get_input_embeddings().weight.pow(2).mean().sqrt() * H**0.5)  # unit-scale logits at init
    torch.testing.assert_close(model.decoder.logit_scale.exp(), scale)
    expected = model.decoder.norm(x) @ model.embed.weight.T * scale
    torch.testing.assert_close(model.decoder(torch.tensor([[1]]), memory), expected)


def test_teacher_forced_targets() -> None:
    model = tiny_vae()
    sentences = torch.tensor([[5, 6, 7], [8, 0, 0]])
    logits, targets = model.decoder.teacher_forced(sentences, torch.tensor([3, 1]), torch.randn(2, H))
    assert logits.shape == (2, 4, V)
    assert targets.tolist() == [[5, 6, 7, 2], [8, 2, -100, -100]]


def test_decoder_is_causal() -> None:
    model = tiny_vae()
    memory = torch.randn(1, H)
    ids = torch.tensor([[1, 5, 6, 7, 8]])
    changed = ids.clone()
    changed[0, 3] = 30
    a, b = model.decoder(ids, memory), model.decoder(changed, memory)
    torch.testing.assert_close(a[:, :3], b[:, :3])
    assert (a[:, 3:] - b[:, 3:]).abs().max() > 1e-4


def test_kv_cached_decoding_equals_uncached() -> None:
    model = tiny_vae()
    memory = torch.randn(6, H) * 3
    # Step-by-step cached logits equal the full uncached pass.
    ids = torch.randint(3, V, (6, 9))
    full = model.decoder(ids, memory)
    cache = KVCache(len(model.decoder.layers))
    steps = [model.decoder(ids[:, i : i + 1], memory, cache) for i in range(9)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)
    assert cache.length == 9 and cache.nbytes() == 2 * 2 * 6 * 9 * H * 4 + 2 * 2 * 6 * 1 * H * 4
    # A multi-token chunk after a cached prefix (causal within the chunk).
    cache = KVCache(len(model.decoder.layers))
    chunked = torch.cat([model.decoder(ids[:, :4], memory, cache), model.decoder(ids[:, 4:], memory, cache)], 1)
    torch.testing.assert_close(chunked, full, atol=1e-5, rtol=1e-5)
    # Greedy and sampled generation agree with and without the cache.
    assert model.decoder.generate(memory) == model.decoder.generate(memory, use_cache=False)
    sampled = [model.decoder.generate(memory, temperature=1.0, use_cache=c, generator=torch.Generator().manual_seed(3))
               for c in (True, False)]
    assert sampled[0] == sampled[1]
    capped = model.decoder.generate(memory, max_tokens=3, min_tokens=3)
    assert all(len(s) == 3 and 2 not in s for s in capped)


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt"])
def test_sllm_is_causal(family: str) -> None:
    model = tiny_vae(family)
    vectors = torch.randn(2, 5, H)
    pred, stop = model.sllm(vectors)
    assert pred.shape == (2, 6, H) and stop.shape == (2, 6)
    for j in range(5):  # change sentence j+1 (input position j+1): outputs 0..j must not move
        changed = vectors.clone()
        changed[:, j] += torch.randn(H)
        p2, s2 = model.sllm(changed)
        torch.testing.assert_close(p2[:, : j + 1], pred[:, : j + 1], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(s2[:, : j + 1], stop[:, : j + 1], atol=1e-5, rtol=1e-5)
        assert (p2[:, j + 1] - pred[:, j + 1]).abs().max() > 1e-4  # the sentence itself is seen next


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt"])
def test_sllm_padding_and_cache(family: str) -> None:
    model = tiny_vae(family)
    vectors = torch.randn(1, 4, H)
    pred, stop = model.sllm(vectors)
    padded = torch.cat([vectors, torch.randn(1, 2, H)], dim=1)
    p2, s2 = model.sllm(padded, torch.tensor([[1, 1, 1, 1, 0, 0]]))
    torch.testing.assert_close(p2[:, :5], pred, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(s2[:, :5], stop, atol=1e-5, rtol=1e-5)
    # Prefill two sentences, then feed the rest one at a time through the LM's KV cache.
    p, s, cache = model.sllm.step(model.sllm.embed_inputs(vectors[:, :2], True), use_cache=True)
    outs = [p]
    for j in range(2, 4):
        embeds = model.sllm.embed_inputs(vectors[:, j : j + 1], False)
        p, s, cache = model.sllm.step(embeds, cache=cache, use_cache=True)
        outs.append(p)
    torch.testing.assert_close(torch.cat(outs, 1), pred, atol=1e-5, rtol=1e-5)


def test_save_and_reload(tmp_path) -> None:
    model = tiny_vae("gpt2")
    with torch.no_grad():
        model.sllm.stop.bias.fill_(0.3)
    model.save_pretrained(tmp_path)
    again = SentenceVAEModel.from_pretrained(tmp_path)
    ids, lengths = torch.randint(3, V, (3, 6)), torch.tensor([6, 4, 2])
    torch.testing.assert_close(again.encode(ids, lengths), model.encode(ids, lengths))
    vectors = torch.randn(1, 3, H)
    for a, b in zip(again.sllm(vectors), model.sllm(vectors)):
        torch.testing.assert_close(a, b)
    assert again.decoder.generate(vectors[0]) == model.decoder.generate(vectors[0])


def test_focal_loss_matches_reference() -> None:
    logits, targets = torch.randn(2, 5, 11), torch.tensor([[1, 2, 3, -100, -100], [4, 5, 6, 7, 8]])
    plain = F.cross_entropy(logits.transpose(1, 2), targets)
    torch.testing.assert_close(focal_cross_entropy(logits, targets, 0.0), plain)
    keep = targets != -100
    p = logits.softmax(-1).gather(-1, targets.clamp_min(0)[..., None]).squeeze(-1)[keep]
    torch.testing.assert_close(focal_cross_entropy(logits, targets, 2.0), (-(1 - p) ** 2 * p.log()).mean())
