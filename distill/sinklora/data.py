"""SinkLoRA's text: whole books split into training and held-out sets, tokenized once per job.

Training examples are non-overlapping chunks of exactly `target_length` tokens cut from the training
books (no padding, no packing across books); evaluation reads the held-out books as one token stream.
A tiny inline-config teacher is first pre-trained on the training books at its original context.

    .venv/bin/python -m pytest tests/distill/sinklora/test_sinklora.py -q
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from typing import Any

import torch

from athanor.distill import long_text
from athanor.distill.spec import RecipeError

log = logging.getLogger(__name__)


@dataclass
class BookTokens:
    """The tokenized split: one id list per training book, the held-out books as one stream."""

    train: dict[str, list[int]]
    heldout: list[int]
    heldout_titles: list[str] = field(default_factory=list)


def load_books(corpus: str, heldout: list[str] | int, seed: int) -> tuple[dict[str, str], dict[str, str]]:
    """(train, held-out) books of `corpus`; recipe errors name `sinklora.corpus` / `sinklora.heldout_books`."""
    try:
        books = long_text.books(corpus)  # type: ignore[arg-type]
    except FileNotFoundError as exc:
        raise RecipeError("sinklora.corpus", corpus, str(exc)) from exc
    try:
        return long_text.split_by_book(books, heldout, seed=seed)
    except ValueError as exc:
        raise RecipeError("sinklora.heldout_books", heldout, str(exc)) from exc


def tokenize_books(tokenizer: Any, corpus: str, heldout: list[str] | int, seed: int) -> BookTokens:
    """Every book tokenized without special tokens (whole novels: the tokenizer's length warning is moot)."""
    train, held = load_books(corpus, heldout, seed)

    def ids(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]

    log.info("tokenizing %d training and %d held-out books", len(train), len(held))
    stream = [t for title in sorted(held) for t in ids(held[title])]
    return BookTokens({title: ids(text) for title, text in sorted(train.items())}, stream, sorted(held))


def chunks(books: dict[str, list[int]], length: int, limit: int, seed: int) -> list[torch.Tensor]:
    """Up to `limit` non-overlapping `length`-token chunks of the books, drawn seeded across all books."""
    found = [torch.tensor(ids[start:start + length], dtype=torch.long) for _, ids in sorted(books.items())
             for start in range(0, len(ids) - length + 1, length)]
    if not found:
        raise RecipeError("sinklora.target_length", length, "no training book is that long; lower it or use "
                          "sinklora.corpus: all")
    random.Random(seed).shuffle(found)
    return found[:limit]


def heldout_stream(tokens: BookTokens, count: int) -> torch.Tensor:
    """The first `count` tokens of the held-out books (RecipeError if they are shorter)."""
    if len(tokens.heldout) < count:
        raise RecipeError("sinklora.eval_tokens", count, f"the held-out books {tokens.heldout_titles} have only "
                          f"{len(tokens.heldout):,} tokens; lower it or hold out more books")
    return torch.tensor(tokens.heldout[:count], dtype=torch.long)
