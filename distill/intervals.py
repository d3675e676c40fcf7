"""Per-sample metrics and their 95% intervals: a paired bootstrap over the same samples on every side.

A method's `evaluate` returns, for a metric measured per sample (per clip, box, pair, passage), a `PerSample`
instead of a float: the rows (one per sample, in the same order for the teacher, the student and every arm) and
the statistic that turns rows into the metric. The job's spine reports the statistic as the metric, and with
`paired_intervals` a 95% interval for each side and for each difference (after − before, arm − after), drawing the
same resampled rows for both sides of a difference. A difference whose interval contains 0 is not significant.

    .venv/bin/python -m pytest tests/distill/test_intervals.py -q
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

RESAMPLES = 2000
"""Bootstrap resamples: the 2.5% / 97.5% percentiles then move by well under a tenth of the half-width."""
LEVEL = 0.95


def _mean(rows: np.ndarray) -> float:
    return float(rows.mean())


def _spearman(rows: np.ndarray) -> float:
    """Spearman's rank correlation of the two columns (average ranks for ties)."""
    from scipy.stats import rankdata

    x, y = rankdata(rows[:, 0]), rankdata(rows[:, 1])
    x, y = x - x.mean(), y - y.mean()
    denominator = math.sqrt(float((x * x).sum() * (y * y).sum()))
    return float((x * y).sum() / denominator) if denominator > 0 else float("nan")


def _perplexity(rows: np.ndarray) -> float:
    """exp(Σ negative log-likelihood / Σ tokens) over rows (nll_sum, tokens): token-weighted, as perplexity is."""
    return float(math.exp(rows[:, 0].sum() / rows[:, 1].sum()))


def _ratio(rows: np.ndarray) -> float:
    return float(rows[:, 0].sum() / rows[:, 1].sum())


@dataclass(frozen=True)
class PerSample:
    """A metric measured per sample: `statistic(rows)` is its value; rows are resampled together."""

    rows: np.ndarray
    """One row per sample ([n] or [n, k]), in the same order on every side that is compared."""
    statistic: Callable[[np.ndarray], float] = _mean
    """Rows -> the metric (the mean, a rank correlation over pairs, a token-weighted perplexity, ...)."""

    @property
    def value(self) -> float:
        return self.statistic(self.rows)

    @property
    def n(self) -> int:
        return len(self.rows)

    @classmethod
    def mean(cls, values: Sequence[float] | np.ndarray) -> PerSample:
        """The mean of one value per sample (an accuracy from 0/1 hits, a per-clip MSE)."""
        return cls(np.asarray(values, dtype=np.float64).reshape(-1), _mean)

    @classmethod
    def spearman(cls, x: Sequence[float], y: Sequence[float]) -> PerSample:
        """Spearman correlation of predicted `x` with reference `y`, one pair per sample."""
        return cls(np.column_stack([np.asarray(x, np.float64), np.asarray(y, np.float64)]), _spearman)

    @classmethod
    def perplexity(cls, nll_sums: Sequence[float], tokens: Sequence[float]) -> PerSample:
        """Perplexity from each passage's summed negative log-likelihood (nats) and its token count."""
        return cls(np.column_stack([np.asarray(nll_sums, np.float64), np.asarray(tokens, np.float64)]), _perplexity)

    @classmethod
    def ratio(cls, numerators: Sequence[float], denominators: Sequence[float]) -> PerSample:
        """Σ numerator / Σ denominator (e.g. correct tokens / tokens), one (numerator, denominator) per sample."""
        return cls(np.column_stack([np.asarray(numerators, np.float64), np.asarray(denominators, np.float64)]),
                   _ratio)


@dataclass(frozen=True)
class Interval:
    """A point estimate and its 95% percentile-bootstrap interval."""

    estimate: float
    low: float
    high: float
    n: int

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2

    @property
    def significant(self) -> bool:
        """For a difference: the interval excludes 0."""
        return not (self.low <= 0.0 <= self.high)

    def as_dict(self) -> dict[str, float | int | bool | None]:
        """JSON-safe: a bound that could not be estimated is None."""
        def number(x: float) -> float | None:
            return float(x) if math.isfinite(x) else None

        return {"estimate": number(self.estimate), "low": number(self.low), "high": number(self.high),
                "half_width": number(self.half_width), "n": self.n,
                "significant": bool(math.isfinite(self.low) and self.significant)}


def _indices(n: int, resamples: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def _replicates(metric: PerSample, indices: np.ndarray) -> np.ndarray:
    """The statistic on every resample; the mean and the sum-ratio statistics vectorised (no Python loop)."""
    if metric.statistic is _mean and metric.rows.ndim == 1:
        return metric.rows[indices].mean(axis=1)
    if metric.statistic in (_ratio, _perplexity):
        sums = metric.rows[indices].sum(axis=1)  # [resamples, 2]: Σ numerator, Σ denominator
        ratio = sums[:, 0] / sums[:, 1]
        return np.exp(ratio) if metric.statistic is _perplexity else ratio
    return np.array([metric.statistic(metric.rows[i]) for i in indices])


def _interval(estimate: float, replicates: np.ndarray, n: int, level: float) -> Interval:
    finite = replicates[np.isfinite(replicates)]
    if len(finite) < len(replicates) * 0.9:  # e.g. a correlation of resamples without variance
        return Interval(estimate, float("nan"), float("nan"), n)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(finite, [tail, 100 - tail])
    return Interval(estimate, float(low), float(high), n)


def interval(metric: PerSample, *, resamples: int = RESAMPLES, seed: int = 0, level: float = LEVEL) -> Interval:
    """The metric and its percentile-bootstrap interval over its samples."""
    indices = _indices(metric.n, resamples, seed)
    return _interval(metric.value, _replicates(metric, indices), metric.n, level)


def paired_difference(first: PerSample, second: PerSample, *, resamples: int = RESAMPLES, seed: int = 0,
                      level: float = LEVEL) -> Interval:
    """second − first and its paired-bootstrap interval: each resample draws the same samples for both sides."""
    if first.n != second.n:
        raise ValueError(f"a paired interval needs the same samples on both sides ({first.n} vs {second.n} rows)")
    indices = _indices(first.n, resamples, seed)
    replicates = _replicates(second, indices) - _replicates(first, indices)
    return _interval(second.value - first.value, replicates, first.n, level)


def split(metrics: dict[str, float | PerSample]) -> tuple[dict[str, float], dict[str, PerSample]]:
    """A method's evaluation as (every metric's value, the per-sample ones)."""
    per_sample = {k: v for k, v in metrics.items() if isinstance(v, PerSample)}
    values = {k: (v.value if isinstance(v, PerSample) else float(v)) for k, v in metrics.items()}
    return values, per_sample


def side_intervals(samples: dict[str, PerSample], **kw) -> dict[str, Interval]:
    return {key: interval(metric, **kw) for key, metric in samples.items()}


def difference_intervals(first: dict[str, PerSample], second: dict[str, PerSample], **kw) -> dict[str, Interval]:
    """second − first for every per-sample metric both sides have with the same number of samples."""
    return {key: paired_difference(first[key], second[key], **kw) for key in first
            if key in second and first[key].n == second[key].n}


def plus_minus(value: float, half_width: float | None, digits: int = 4) -> str:
    """`value ± half-width` (just the value when there is no interval)."""
    if half_width is None or not math.isfinite(half_width):
        return f"{value:.{digits}g}"
    return f"{value:.{digits}g} ± {half_width:.2g}"
