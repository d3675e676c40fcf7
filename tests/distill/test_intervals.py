"""Per-sample metrics and their paired-bootstrap intervals (distill/intervals.py), against independent
computations: the normal-theory interval of a mean, scipy's own paired bootstrap, scipy's Spearman.

    .venv/bin/python -m pytest tests/distill/test_intervals.py -q
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from athanor.distill.intervals import PerSample, interval, paired_difference, split


def test_the_interval_of_a_mean_matches_the_normal_theory_interval_on_a_large_sample():
    values = np.random.default_rng(1).normal(3.0, 2.0, size=4000)
    got = interval(PerSample.mean(values))
    half = 1.959964 * values.std(ddof=1) / math.sqrt(len(values))  # CLT: the bootstrap agrees at this n
    assert got.estimate == pytest.approx(values.mean())
    assert got.low == pytest.approx(values.mean() - half, abs=0.1 * half)
    assert got.high == pytest.approx(values.mean() + half, abs=0.1 * half)


def test_a_paired_difference_matches_scipys_paired_percentile_bootstrap():
    rng = np.random.default_rng(2)
    before = rng.normal(0.0, 1.0, size=300)
    after = before + rng.normal(0.15, 0.3, size=300)  # strongly paired: most variance is shared
    got = paired_difference(PerSample.mean(before), PerSample.mean(after), resamples=4000)
    ref = stats.bootstrap((before, after), lambda b, a: np.mean(a) - np.mean(b), paired=True, vectorized=False,
                          n_resamples=4000, method="percentile", random_state=7).confidence_interval
    half = (ref.high - ref.low) / 2
    assert got.low == pytest.approx(ref.low, abs=0.1 * half) and got.high == pytest.approx(ref.high, abs=0.1 * half)
    unpaired = 1.96 * math.sqrt(before.var(ddof=1) / 300 + after.var(ddof=1) / 300)
    assert got.half_width < 0.5 * unpaired  # pairing is what makes a small difference visible
    assert got.significant and got.estimate == pytest.approx(after.mean() - before.mean())


def test_a_difference_of_identical_sides_is_not_significant_and_a_clear_one_is():
    x = np.random.default_rng(3).random(50)
    same = paired_difference(PerSample.mean(x), PerSample.mean(x))
    assert (same.estimate, same.low, same.high, same.significant) == (0.0, 0.0, 0.0, False)
    noisy = paired_difference(PerSample.mean(x), PerSample.mean(x + np.random.default_rng(4).normal(0, 0.3, 50)))
    assert noisy.low < 0 < noisy.high and not noisy.significant
    clear = paired_difference(PerSample.mean(x), PerSample.mean(x + 0.5))
    assert clear.significant and clear.low == pytest.approx(0.5) and clear.high == pytest.approx(0.5)


def test_statistics_equal_their_textbook_definitions():
    rng = np.random.default_rng(5)
    x, y = rng.random(40), rng.random(40)
    y[:5] = y[5:10]  # ties: average ranks, as scipy does
    assert PerSample.spearman(x, y).value == pytest.approx(stats.spearmanr(x, y).statistic)
    nll, tokens = rng.random(12) * 50, rng.integers(10, 40, 12)
    assert PerSample.perplexity(nll, tokens).value == pytest.approx(math.exp(nll.sum() / tokens.sum()))
    correct, total = rng.integers(0, 10, 12), rng.integers(10, 20, 12)
    assert PerSample.ratio(correct, total).value == pytest.approx(correct.sum() / total.sum())
    hits = [1, 0, 1, 1]
    assert interval(PerSample.mean(hits)).estimate == 0.75


def test_a_spearman_interval_resamples_pairs():
    rng = np.random.default_rng(6)
    gold = rng.random(200)
    pred = gold + rng.normal(0, 0.3, 200)
    got = interval(PerSample.spearman(pred, gold), resamples=1000)
    # Fisher's z interval for a rank correlation (Bonett & Wright's variance), an independent approximation.
    r = stats.spearmanr(pred, gold).statistic
    se = math.sqrt((1 + r * r / 2) / (200 - 3))
    low, high = math.tanh(math.atanh(r) - 1.96 * se), math.tanh(math.atanh(r) + 1.96 * se)
    assert got.low == pytest.approx(low, abs=0.02) and got.high == pytest.approx(high, abs=0.02)


def test_paired_sides_need_the_same_samples_and_split_separates_the_per_sample_metrics():
    with pytest.raises(ValueError, match="same samples on both sides"):
        paired_difference(PerSample.mean([1.0, 2.0]), PerSample.mean([1.0, 2.0, 3.0]))
    values, per_sample = split({"params": 10, "acc": PerSample.mean([1, 0, 1, 0])})
    assert values == {"params": 10.0, "acc": 0.5} and list(per_sample) == ["acc"]
    assert interval(PerSample.mean([1.0, 1.0, 1.0])).as_dict()["half_width"] == 0.0


def test_the_vectorised_ratio_and_perplexity_resamples_equal_the_statistic_on_each_resample():
    from athanor.distill.intervals import _indices, _replicates

    rng = np.random.default_rng(8)
    rows = (rng.random(30) * 40, rng.integers(5, 30, 30))
    indices = _indices(30, 50, seed=1)
    for metric in (PerSample.perplexity(*rows), PerSample.ratio(*rows)):
        looped = [metric.statistic(metric.rows[i]) for i in indices]
        assert np.allclose(_replicates(metric, indices), looped, rtol=1e-12)
