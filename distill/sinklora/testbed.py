"""The tokenizer of the tiny SinkLoRA testbed: byte-level BPE (4,096 tokens) trained on Austen's novels except
the held-out one, so `recipes/sinklora_tiny.yaml` pre-trains and extends a tiny Llama in minutes on a CPU
(a 30k-word vocabulary made the LM head 80% of every step). Made once and committed:

    .venv/bin/python -m athanor.distill.sinklora.testbed --out distill/sinklora/testbed/tokenizer

Deterministic for a given `tokenizers` version (the trainer is single-pass over sorted books).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from athanor.distill import long_text

HELDOUT = ["Persuasion"]
"""The book `sinklora_tiny` holds out: the tokenizer never sees it either."""
SPECIAL = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}


def train_tokenizer(out: Path, vocab_size: int = 4096) -> None:
    """Byte-level BPE on the training books, saved as a transformers fast tokenizer directory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    train, _ = long_text.split_by_book(long_text.books("austen"), HELDOUT)
    tokenizer = Tokenizer(models.BPE(unk_token=SPECIAL["unk_token"]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL.values()),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator([train[title] for title in sorted(train)], trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, model_max_length=1_000_000, **SPECIAL)
    fast.save_pretrained(out)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--vocab-size", type=int, default=4096)
    cli = parser.parse_args()
    train_tokenizer(cli.out, cli.vocab_size)
    print(f"wrote {cli.out}")
