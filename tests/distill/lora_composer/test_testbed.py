"""The testbed trainer's pieces (`distill.lora_composer.testbed`): Min-SNR weights, tokenizer/encoder agreement."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDPMScheduler

from athanor.distill.lora_composer.testbed import (
    SCHEDULER_CONFIG,
    TEXT_CONFIG,
    build_models,
    make_tokenizer,
    snr_weight,
)


def _cosine_alpha_bar(t: int, steps: int = 1000, s: float = 0.008) -> float:
    """Nichol & Dhariwal's cosine schedule, ᾱ(t) = f(t) / f(0), f(t) = cos²((t/T + s) / (1 + s) · π/2), for the
    noise level after step t (diffusers indexes the first step as t = 0)."""
    f = lambda u: math.cos((u / steps + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    return f(t + 1) / f(0)


def test_min_snr_weights_match_the_cosine_schedule():
    sched = DDPMScheduler(**SCHEDULER_CONFIG)
    t = torch.tensor([0, 50, 200, 400, 600, 800])
    weights = snr_weight(sched, t, 5.0)
    for ti, w in zip(t.tolist(), weights.tolist()):
        alpha_bar = _cosine_alpha_bar(ti)
        snr = alpha_bar / (1 - alpha_bar)
        assert math.isclose(w, min(snr, 5.0) / snr, rel_tol=1e-3), (ti, w, snr)
    assert weights[0] < 0.01 and weights[-1] == 1.0  # nearly clean steps down-weighted, noisy ones untouched
    assert torch.equal(snr_weight(sched, t, None), torch.ones(len(t)))


def test_text_encoder_is_built_for_the_tokenizers_vocabulary(tmp_path):
    for kind in ("bpe", "words"):
        tokenizer = make_tokenizer(kind, tmp_path / kind)
        _, text_encoder = build_models(0, len(tokenizer))
        assert text_encoder.config.vocab_size == len(tokenizer)
        assert tokenizer.pad_token_id == TEXT_CONFIG["pad_token_id"]
        ids = tokenizer(["a sks sneaker on the left"], padding="max_length", max_length=32, return_tensors="pt")
        assert text_encoder(ids["input_ids"]).last_hidden_state.shape == (1, 32, TEXT_CONFIG["hidden_size"])
    assert len(make_tokenizer("bpe", tmp_path / "bpe")) == TEXT_CONFIG["vocab_size"]  # the config default is the BPE
    with pytest.raises(ValueError, match="--tokenizer 'sentencepiece'"):
        make_tokenizer("sentencepiece", tmp_path / "x")
