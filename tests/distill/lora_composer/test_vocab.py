"""The testbed's word-level tokenizer (`distill.lora_composer.vocab`): whole words, one token each."""

from __future__ import annotations

import torch
from transformers import AutoTokenizer

from athanor.distill.fashion_mnist import CLASSES
from athanor.distill.lora_composer.canvas import PLACES, Canvases, caption
from athanor.distill.lora_composer.sampling import word_positions
from athanor.distill.lora_composer.vocab import RARE_TOKENS, SPECIAL, save_tokenizer


def test_every_caption_word_is_one_known_token(tmp_path):
    tokenizer = save_tokenizer(tmp_path / "tok", common_words=50)
    unk = tokenizer.unk_token_id
    for label in range(len(CLASSES)):
        for place in PLACES:
            text = caption((label,), (place,))
            ids = tokenizer(text)["input_ids"]
            assert unk not in ids, text
            assert len(ids) == len(text.replace("-", " - ").split()), (text, tokenizer.convert_ids_to_tokens(ids))
    # Ten classes, ten different token runs naming them (between the article and "on the left")
    nouns = {tuple(tokenizer(caption((c,), ("left",)))["input_ids"][1:-3]) for c in range(len(CLASSES))}
    assert len(nouns) == len(CLASSES)


def test_rare_tokens_specials_and_unknown_words(tmp_path):
    tokenizer = save_tokenizer(tmp_path / "tok", common_words=50)
    rare = [tokenizer.convert_tokens_to_ids(t) for t in RARE_TOKENS]
    assert len(set(rare)) == len(RARE_TOKENS) and tokenizer.unk_token_id not in rare
    assert [tokenizer.convert_tokens_to_ids(t) for t in SPECIAL] == [0, 1, 2, 3]
    assert tokenizer.pad_token_id == 2
    assert tokenizer("a zebra")["input_ids"][-1] == tokenizer.unk_token_id  # not in the vocabulary
    assert tokenizer("A Sneaker")["input_ids"] == tokenizer("a sneaker")["input_ids"]  # lower-cased
    assert word_positions(tokenizer, "a sks sneaker on the left", "sks sneaker") == [1, 2]
    assert word_positions(tokenizer, "an ankle boot in the middle", "ankle boot") == [1, 2]


def test_saved_tokenizer_reloads_and_pads_like_the_original(tmp_path):
    tokenizer = save_tokenizer(tmp_path / "tok", common_words=50)
    again = AutoTokenizer.from_pretrained(tmp_path / "tok")
    texts = [e.caption for e in Canvases.from_split("test").batch(20, torch.Generator().manual_seed(0))]
    a = tokenizer(texts, padding="max_length", max_length=32, return_tensors="pt")["input_ids"]
    assert torch.equal(a, again(texts, padding="max_length", max_length=32, return_tensors="pt")["input_ids"])
    assert (a == tokenizer.unk_token_id).sum() == 0 and (a[:, -1] == tokenizer.pad_token_id).all()
