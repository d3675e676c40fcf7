"""The promotion gate: a recipe's `gate:` says what the converted model must keep of its teacher and how much
faster it must be; a job that meets it registers its version with the alias, one that misses it registers the
version without the alias, tagged with the conditions it failed (`athanor push` then needs `--force`).

    gate:
      retain: {sts_spearman: 0.97, perplexity: 0.9}   # fraction of the teacher's value kept (direction-aware)
      min_speedup: 1.5                                # teacher latency / converted latency, timed side by side

`retain` compares the job's point estimates: for a higher-is-better metric, after / before; for a lower-is-better
one (the method declares it, e.g. perplexity), before / after. Both must reach the threshold.

    .venv/bin/python -m pytest tests/jobs/test_gate.py -q
"""

from __future__ import annotations

import difflib
import math
from dataclasses import asdict, dataclass
from typing import Any

from pydantic import Field, field_validator

from athanor.distill.spec import Section, bounded

SPINE_METRICS = {"latency_ms": "lower"}
"""Metrics the spine adds to every method's (timed side by side), with their direction."""


def metric_key(name: str) -> str:
    """A gate key as the MLflow metric (`eval/sts_spearman`) or as the method's key (`sts_spearman`)."""
    return name.removeprefix("eval/")


class GateSpec(Section):
    """What a converted model must keep to be registered with the alias (`registry.alias`)."""

    retain: dict[str, float] = Field(default_factory=dict)
    """Metric -> the fraction of the teacher's value the converted model must keep (after/before, or
    before/after for a lower-is-better metric), e.g. {sts_spearman: 0.97}. Keys are the method's metrics."""
    min_speedup: float | None = bounded(None, gt=0, le=10_000, reason="no conversion is 10,000× faster")
    """Minimum measured speed-up (teacher latency / converted latency, timed interleaved in one run)."""

    @field_validator("retain")
    @classmethod
    def _fractions(cls, retain: dict[str, float]) -> dict[str, float]:
        bad = {k: v for k, v in retain.items() if not (isinstance(v, (int, float)) and 0 < v <= 10)}
        if bad:
            raise ValueError(f"each retain value is a fraction of the teacher's value in (0, 10], e.g. 0.95; "
                             f"got {bad}")
        return retain


def gate_problems(gate: GateSpec, metrics: dict[str, str]) -> list[tuple[str, str, str]]:
    """(key path, value, message) for every `gate.retain` key the method does not report, or reports without a
    direction (a size or count cannot be 'kept')."""
    known = {**metrics, **SPINE_METRICS}
    problems = []
    for name in gate.retain:
        key = metric_key(name)
        if key not in known:
            choices = sorted(k for k, d in known.items() if d != "neutral")
            guess = difflib.get_close_matches(key[:200], choices, n=1)
            listed = ", ".join(choices[:12]) + (f" and {len(choices) - 12} more" if len(choices) > 12 else "")
            problems.append((f"gate.retain.{name}", name, "not a metric this method reports; "
                             + (f"did you mean '{guess[0]}'? " if guess else "") + f"choose one of {listed}"))
        elif known[key] == "neutral":
            problems.append((f"gate.retain.{name}", name, "has no better direction (a size or a count); gate on a "
                             "quality metric, or on speed with gate.min_speedup"))
    return problems


@dataclass
class Condition:
    """One checked condition of a gate."""

    text: str
    passed: bool


@dataclass
class Verdict:
    """What the gate decided for one job."""

    passed: bool
    conditions: list[Condition]

    @property
    def failed(self) -> list[str]:
        return [c.text for c in self.conditions if not c.passed]

    def as_result(self) -> dict[str, Any]:
        return {"passed": self.passed, "failed": self.failed, "conditions": [asdict(c) for c in self.conditions]}

    def line(self) -> str:
        if not self.conditions:
            return "gate: none set"
        return "gate: passed" if self.passed else "gate: failed — " + "; ".join(self.failed)


def _retained(before: float, after: float, direction: str) -> float:
    if direction == "lower":
        return before / after if after > 0 else (math.inf if before > 0 else math.nan)
    return after / before if before > 0 else math.nan


def judge(gate: GateSpec, metrics: dict[str, str], before: dict[str, float], after: dict[str, float],
          speedup: float | None) -> Verdict:
    """Check every condition of `gate` against the job's measurements."""
    directions = {**metrics, **SPINE_METRICS}
    conditions = []
    for name, needed in gate.retain.items():
        key = metric_key(name)
        b, a = before.get(key, math.nan), after.get(key, math.nan)
        kept = _retained(b, a, directions.get(key, "higher"))
        if math.isnan(kept):
            conditions.append(Condition(f"{key}: cannot be judged (teacher {b:.4g}, converted {a:.4g}; retain needs "
                                        "a positive teacher value)", False))
            continue
        ratio = "before/after" if directions.get(key) == "lower" else "after/before"
        conditions.append(Condition(f"{key} kept {kept:.3f} of the teacher's ({ratio}; teacher {b:.4g}, "
                                    f"converted {a:.4g}; needs ≥ {needed:g})", kept >= needed))
    if gate.min_speedup is not None:
        ok = speedup is not None and math.isfinite(speedup) and speedup >= gate.min_speedup
        measured = f"{speedup:.2f}×" if speedup is not None else "not measured"
        conditions.append(Condition(f"speed-up {measured} (needs ≥ {gate.min_speedup:g}×)", ok))
    return Verdict(all(c.passed for c in conditions), conditions)
