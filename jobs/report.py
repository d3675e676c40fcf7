"""How a job's measurements read: the before/after table with 95% intervals, as markdown (the MLflow run's
description and the model card) and in the terminal (`athanor status`, `submit --wait`).

A metric measured per sample shows `value ± half-width` on each side and the paired difference after − before
with its interval; a difference whose interval contains 0 is marked "n.s." (not significant at 95%).

    athanor status JOB_ID
"""

from __future__ import annotations

import math
from typing import Any

from rich.console import Console
from rich.table import Table

from athanor.jobs.gate import metric_key


def _half_width(intervals: dict[str, Any] | None, side: str, key: str) -> float | None:
    entry = ((intervals or {}).get("sides") or {}).get(side, {}).get(key)
    return entry.get("half_width") if entry else None


def metric_kind(key: str) -> str:
    """How a metric's numbers read: 'count' (parameters, tokens: whole, with thousands separators), 'ms' (a
    latency) or 'number' (a score, loss or ratio: four significant digits, never an exponent above 1e-3)."""
    if key == "params" or key.endswith(("_params", "_count", "_tokens")) or key.startswith("num_"):
        return "count"
    return "ms" if key.endswith("_ms") else "number"


def _number(value: float, digits: int) -> str:
    if value == 0:
        return "0"
    if abs(value) >= 10**digits:
        return f"{value:,.0f}"
    return f"{value:.{digits}g}" if abs(value) >= 1e-3 else f"{value:.{max(digits - 2, 1)}e}"


def format_value(key: str, value: float | None, half_width: float | None = None, digits: int = 4) -> str:
    """`value` (± `half_width`) formatted by the metric's kind; `—` where it is undefined (NaN, missing)."""
    if value is None or math.isnan(value):
        return "—"
    if math.isinf(value):
        return "∞" if value > 0 else "−∞"
    kind = metric_kind(key)
    text = f"{value:,.0f}" if kind == "count" else _number(value, digits)
    if half_width is not None and math.isfinite(half_width):
        text += " ± " + (f"{half_width:,.0f}" if kind == "count" else _number(half_width, 2))
    return text + (" ms" if kind == "ms" else "")


def difference_text(intervals: dict[str, Any] | None, pair: str, key: str) -> str:
    """`+0.012 [0.004, 0.020]`, `… (n.s.)` when the interval contains 0, `—` without per-sample values."""
    entry = ((intervals or {}).get("differences") or {}).get(pair, {}).get(key)
    if not entry or entry.get("low") is None or not math.isfinite(entry.get("estimate", math.nan)):
        return "—"
    text = f"{entry['estimate']:+.3g} [{entry['low']:.3g}, {entry['high']:.3g}]"
    return text if entry["significant"] else text + " (n.s.)"


def _ratio(before: float, after: float) -> str:
    return f"{after / before:.3f}" if before and math.isfinite(before) and math.isfinite(after) else "—"


def headline_keys(keys: list[str], directions: dict[str, str], retain: list[str] = ()) -> list[str]:
    """The metrics a reader looks at first: the gate's `retain` keys, then every quality metric (one with a better
    direction) the method declares; sizes, counts and the latency (the speed-up stands for it) come after."""
    gated = [metric_key(k) for k in retain if metric_key(k) in keys]
    quality = [k for k in keys if directions.get(k) in ("higher", "lower") and k != "latency_ms"]
    return list(dict.fromkeys(gated + quality))


def ordered(keys: list[str], headline: list[str] | None) -> list[str]:
    """`keys` with the headline ones first (in headline order)."""
    first = [k for k in headline or [] if k in keys]
    return first + [k for k in keys if k not in first]


def comparison_rows(before: dict[str, float], after: dict[str, float], intervals: dict[str, Any] | None,
                    untrained: dict[str, float] | None = None,
                    headline: list[str] | None = None) -> list[list[str]]:
    """[metric, before, (untrained,) after, after − before [95% interval], after/before] per metric, the headline
    metrics first, each number formatted by its kind (`format_value`)."""
    rows = []
    for key in ordered(list(before), headline):
        b, a = before[key], after.get(key, math.nan)
        middle = ([format_value(key, untrained.get(key, math.nan), _half_width(intervals, "untrained", key))]
                  if untrained else [])
        rows.append([key, format_value(key, b, _half_width(intervals, "before", key)), *middle,
                     format_value(key, a, _half_width(intervals, "after", key)),
                     difference_text(intervals, "after - before", key), _ratio(b, a)])
    return rows


HEADER = ["metric", "before (teacher)", "after (converted)", "after − before [95% CI]", "after/before"]


def comparison_markdown(before: dict[str, float], after: dict[str, float], speedup: float | None,
                        intervals: dict[str, Any] | None = None, headline: list[str] | None = None) -> str:
    """The before/after table in markdown (model card and MLflow run description)."""
    lines = ["| " + " | ".join(HEADER) + " |", "|---" * len(HEADER) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in comparison_rows(before, after, intervals, headline=headline)]
    text = "\n".join(lines)
    if intervals:
        text += (f"\n\n± is the half-width of a 95% interval ({intervals['method']}, over the same samples on both "
                 "sides); n.s.: the difference's interval contains 0.")
    if speedup is not None:
        text += (f"\n\nSpeed-up (teacher latency / converted latency, timed interleaved in one measurement): "
                 f"**{times(speedup)}**")
    return text + "\n"


def times(speedup: float) -> str:
    """A speed-up as `2.31×` (`—` where it could not be measured)."""
    text = format_value("speedup", speedup, digits=3)
    return text if text == "—" else text + "×"


def summary_line(before: dict[str, float], after: dict[str, float], speedup: float | None,
                 headline: list[str], gate: dict[str, Any] | None) -> str:
    """One line above the table (a description folds after a few lines): the headline metrics before → after,
    the speed-up and the gate's verdict."""
    parts = [f"**{k}** {format_value(k, before[k])} → {format_value(k, after.get(k))}" for k in headline[:3]
             if k in before]
    if speedup is not None:
        parts.append(f"speed-up **{times(speedup)}**")
    if gate and gate.get("conditions"):
        parts.append("gate **passed**" if gate["passed"] else "gate **failed**: " + "; ".join(gate["failed"]))
    return " · ".join(parts)


def print_table(job: Any) -> None:
    """The job's result in the terminal: the table, the arms, the speed-up, the gate, the registration."""
    result = job.result or {}
    untrained = result.get("untrained") or {}
    intervals = result.get("intervals")
    table = Table(title=f"{job.name} ({job.method}) — job {job.id}")
    header = HEADER[:2] + (["untrained student"] if untrained else []) + HEADER[2:]
    for i, name in enumerate(header):
        table.add_column(name, justify="left" if i == 0 else "right")
    for row in comparison_rows(result.get("before", {}), result.get("after", {}), intervals, untrained):
        table.add_row(*row)
    Console(width=160).print(table)
    if intervals:
        print(f"± : half-width of a 95% interval ({intervals['method']}); n.s.: the interval of the difference "
              "contains 0")
    _print_arms(result)
    if result.get("speedup") is not None:
        print(f"speed-up: {result['speedup']:.2f}x (teacher vs converted, timed interleaved in one measurement)")
    gate = result.get("gate")
    if gate and gate.get("conditions"):
        print("gate: passed" if gate["passed"] else "gate: failed — " + "; ".join(gate["failed"]))
    reg = result.get("registered")
    if reg:
        alias = f"alias '{reg['alias']}'" if reg.get("alias") else "no alias: the gate was not met"
        print(f"registered: {reg['name']} version {reg['version']} ({alias})")
    print(f"export: {result.get('export')}; the job took {result.get('seconds')} s")


def _print_arms(result: dict[str, Any]) -> None:
    if not result.get("comparison"):
        return
    arms = sorted(result.get("arms") or {})
    print(f"comparison arms ({', '.join(arms)}, child runs arm_*): " +
          ", ".join(f"{k} {v:.4g}" for k, v in result["comparison"].items()))
    differences = (result.get("intervals") or {}).get("differences") or {}
    for arm in arms:
        shown = [f"{key} {difference_text(result.get('intervals'), f'after - arm_{arm}', key)}"
                 for key in differences.get(f"after - arm_{arm}", {})]
        if shown:
            print(f"  after − arm {arm} [95% CI]: " + ", ".join(shown))
