"""Interleaved timing: every round calls every entry once, in rotating order, one sample per round.

    .venv/bin/python -m pytest tests/distill/test_timing.py -q
"""

from __future__ import annotations

import pytest

from athanor.distill.timing import interleaved_latency, interleaved_samples


def test_rounds_rotate_and_pair_one_sample_per_entry():
    order: list[str] = []
    calls = {name: (lambda n=name: order.append(n)) for name in ("a", "b", "c")}
    samples = interleaved_samples(calls, repeats=4, warmup=1)
    assert {k: len(v) for k, v in samples.items()} == {"a": 4, "b": 4, "c": 4}
    assert order[:3] == ["a", "b", "c"]  # the warm-up round
    assert order[3:] == ["a", "b", "c", "b", "c", "a", "c", "a", "b", "a", "b", "c"]
    assert all(ms >= 0 for values in samples.values() for ms in values)


def test_latency_is_the_median_and_bad_repeats_are_refused():
    assert set(interleaved_latency({"x": lambda: None}, repeats=3)) == {"x"}
    with pytest.raises(ValueError, match="repeats=0"):
        interleaved_samples({"x": lambda: None}, repeats=0)
