"""Sentence segmentation for SentenceVAE: text → character spans → per-sentence token ids.

    .venv/bin/python -m pytest tests/convert/sentencevae/test_segment.py -q

The passage is tokenized once, as the LM sees it, and each token is assigned to the sentence that
holds its last character. So the concatenation of the sentences' tokens is exactly the LM's own
tokenization of the passage (perplexities of the LM and the SLLM count the same tokens), and a
byte-level BPE token such as " World" (leading space) lands in the sentence it begins.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

ASCII_TERMINATORS = ".!?;:"
CJK_TERMINATORS = "。！？；：…"
CLOSERS = "\"')]}»”’」』）】"
"""Closing quotes/brackets that stay with the sentence they close: 'He said "Stop." Then...'."""

DEFAULT_ABBREVIATIONS = (
    "e.g.", "i.e.", "etc.", "vs.", "cf.", "al.", "mr.", "mrs.", "ms.", "dr.", "prof.", "st.",
    "jr.", "sr.", "no.", "fig.", "eq.", "approx.", "inc.", "ltd.", "dept.", "u.s.", "a.m.", "p.m.",
)  # fmt: skip


@dataclass(frozen=True)
class SegmentRules:
    """How a passage is cut into sentences. Deterministic: same text and rules, same sentences."""

    terminators: str = ASCII_TERMINATORS
    """ASCII terminators split only before whitespace or the end ('3.14', 'a:b' stay whole)."""
    cjk_terminators: str = CJK_TERMINATORS
    """CJK terminators split wherever they occur (CJK text has no spaces)."""
    split_on_newline: bool = True
    abbreviations: tuple[str, ...] = DEFAULT_ABBREVIATIONS
    """Words ending in '.' that do not end a sentence (compared case-insensitively)."""
    max_sentence_tokens: int = 32
    """Longer sentences are split into chunks of this many tokens."""
    max_sentences: int = 16
    """Sentences kept per passage (the rest is dropped)."""
    _abbrev: frozenset[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.max_sentence_tokens < 1 or self.max_sentences < 1:
            raise ValueError("max_sentence_tokens and max_sentences must be >= 1")
        object.__setattr__(self, "_abbrev", frozenset(a.lower() for a in self.abbreviations))


def _is_abbreviation(text: str, dot: int, rules: SegmentRules) -> bool:
    """True when the word ending with the '.' at index `dot` is in the abbreviation list."""
    start = dot
    while start > 0 and not text[start - 1].isspace() and text[start - 1] not in "([{\"'":
        start -= 1
    return text[start : dot + 1].lower() in rules._abbrev


def split_spans(text: str, rules: SegmentRules = SegmentRules()) -> list[tuple[int, int]]:
    """Character spans [start, end) of the sentences; together they cover `text` exactly.

    Each sentence absorbs the whitespace after it (spaces, empty lines); leading whitespace of the
    passage goes to the first sentence. A whitespace-only text has no sentences.
    """
    if not text.strip():
        return []
    cuts: list[int] = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        end: int | None = None
        if c == "\n" and rules.split_on_newline:
            end = i + 1
        elif c in rules.cjk_terminators:
            end = i + 1
            while end < n and (text[end] in rules.cjk_terminators or text[end] in CLOSERS):
                end += 1
        elif c in rules.terminators:
            end = i + 1
            while end < n and (text[end] in rules.terminators or text[end] in CLOSERS):
                end += 1
            if end < n and not text[end].isspace():
                end = None  # '3.14', 'a:b', 'example.com': not a sentence end
            elif c == "." and end == i + 1 and _is_abbreviation(text, i, rules):
                end = None
        if end is None:
            i += 1
            continue
        while end < n and text[end].isspace():
            end += 1  # absorb trailing spaces and empty lines
        if text[:end].strip() and end > (cuts[-1] if cuts else 0):
            cuts.append(end)
        i = end
    if not cuts or cuts[-1] < n:
        if text[cuts[-1] if cuts else 0 :].strip():
            cuts.append(n)
        else:
            cuts[-1] = n  # only whitespace left: it belongs to the last sentence
    starts = [0] + cuts[:-1]
    return list(zip(starts, cuts))


def split_text(text: str, rules: SegmentRules = SegmentRules()) -> list[str]:
    """The sentences of `text` as strings (trailing whitespace included)."""
    return [text[a:b] for a, b in split_spans(text, rules)]


def assign_tokens(
    spans: Sequence[tuple[int, int]], offsets: Sequence[tuple[int, int]], ids: Sequence[int]
) -> list[list[int]]:
    """Group token ids by the sentence holding each token's last character."""
    sentences: list[list[int]] = [[] for _ in spans]
    k = 0
    for tok, (a, b) in zip(ids, offsets):
        last = max(a, b - 1)
        while k + 1 < len(spans) and last >= spans[k][1]:
            k += 1
        sentences[k].append(int(tok))
    return [s for s in sentences if s]


def cap_sentences(sentences: list[list[int]], rules: SegmentRules) -> list[list[int]]:
    """Split over-long sentences at the token cap, then keep at most `max_sentences`."""
    cap = rules.max_sentence_tokens
    out = [s[i : i + cap] for s in sentences for i in range(0, len(s), cap)]
    return out[: rules.max_sentences]


def segment_ids(text: str, tokenizer, rules: SegmentRules, max_tokens: int | None = None) -> list[list[int]]:
    """Token ids of each sentence of `text` (no special tokens), capped by `rules`.

    `tokenizer` must be a fast tokenizer (offset mapping). `max_tokens` truncates the passage first.
    """
    spans = split_spans(text, rules)
    if not spans:
        return []
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    if max_tokens is not None:
        ids, offsets = ids[:max_tokens], offsets[:max_tokens]
    return cap_sentences(assign_tokens(spans, offsets, ids), rules)
