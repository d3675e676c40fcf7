"""The testbed's word-level tokenizer: every caption word, class name and concept token is one token.

    .venv/bin/python -m pytest tests/distill/lora_composer/test_vocab.py -q

The first testbed used the repo's 4,096-token byte-level BPE learned on Austen's novels, which cuts the
caption words into pieces ("sneaker" -> "s ne ak er", "middle" -> "m iddle"). A two-layer text encoder
trained from scratch beside the U-Net then has to assemble each class and place from pieces shared with
other words, and learned it slowly: after 50 minutes its states for "... on the left" and "... on the
right" were 0.97 cosine-similar, and the U-Net could not place items. Whole-word tokens give every class
and place its own embedding from the first step. The vocabulary: the special tokens, the caption words,
a set of rare tokens for concept LoRAs (DreamBooth-style: never seen in base training), and the 2,000 most
frequent words of the Austen novels so other prompts still tokenize; anything else is `<unk>`.
A `transformers.PreTrainedTokenizerFast`, saved and loaded like any other (`AutoTokenizer`).
"""

from __future__ import annotations

import collections
import re
from pathlib import Path

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from athanor.distill.fashion_mnist import CLASSES
from athanor.distill.lora_composer.canvas import PHRASES

SPECIAL = ("<s>", "</s>", "<pad>", "<unk>")  # ids 0..3: bos, eos, pad (the text encoder's config), unk
RARE_TOKENS = ("sks", "zwx", "qlv", "vmj", "bnq", "hta", "pfk", "xkz")
COMMON_WORDS = 2000


def caption_words() -> list[str]:
    """Every word a testbed caption can hold, as the pre-tokenizer splits it ("t-shirt" -> t, -, shirt)."""
    text = " ".join([*CLASSES, *PHRASES.values(), "a an and ,"])
    return list(dict.fromkeys(w for w, _ in pre_tokenizers.Whitespace().pre_tokenize_str(text.lower())))


def vocabulary(common_words: int = COMMON_WORDS) -> list[str]:
    """Special tokens, caption words, rare tokens, then the `common_words` most frequent other Austen words."""
    words = list(dict.fromkeys([*SPECIAL, *caption_words(), *RARE_TOKENS]))
    if common_words:
        from athanor.distill.long_text import austen_books
        counts = collections.Counter(w for text in austen_books().values() for w in re.findall(r"[a-z]+", text.lower()))
        known = set(words)
        words += [w for w, _ in counts.most_common(common_words + len(words)) if w not in known][:common_words]
    return words


def build_tokenizer(common_words: int = COMMON_WORDS) -> PreTrainedTokenizerFast:
    vocab = {word: i for i, word in enumerate(vocabulary(common_words))}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


def save_tokenizer(out: Path, common_words: int = COMMON_WORDS) -> PreTrainedTokenizerFast:
    tokenizer = build_tokenizer(common_words)
    tokenizer.save_pretrained(out)
    return tokenizer
