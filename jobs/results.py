"""What rank 0 of a job measured (`Results`) and the checks it must pass before anything is exported:
finite metrics where the method defines numbers, the same metric keys on every side; and `outcome`, the final
status and one-line error of a job that ended by an exception.

    .venv/bin/python -m pytest tests/jobs/test_faults.py tests/jobs/test_cli_jobs.py -q
"""

from __future__ import annotations

import logging
import math
import traceback
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("athanor.job")


class NonFiniteMetrics(RuntimeError):
    """The converted model's evaluation gave NaN or infinity where the method defines a number."""


@dataclass
class Results:
    """What rank 0 measured; becomes the job's result, the MLflow runs and the model card."""

    params: dict[str, int]
    before: dict[str, float] = field(default_factory=dict)
    after: dict[str, float] = field(default_factory=dict)
    untrained: dict[str, float] | None = None
    speedup: float | None = None
    arms: dict[str, dict[str, float]] = field(default_factory=dict)
    """Comparison arms (optional protocol call `comparison_arms`): arm name -> its evaluation."""
    comparison: dict[str, float] = field(default_factory=dict)
    """The method's summary over the arms (`compare_arms`), logged on the parent run."""


def check_finite(method: Any, metrics: dict[str, float]) -> None:
    bad = sorted(k for k, v in metrics.items() if not math.isfinite(v) and k not in method.nan_metrics)
    if bad:
        raise NonFiniteMetrics(f"the converted model's {', '.join(bad)} is not finite "
                               f"({', '.join(f'{k}={metrics[k]}' for k in bad)}); nothing was exported or registered")


def check_same_keys(method: str, results: Results) -> None:
    sides = {"after": results.after, **({"untrained": results.untrained} if results.untrained else {})}
    for name, metrics in sides.items():
        if set(metrics) != set(results.before):
            raise RuntimeError(f"method {method} returned different metric keys before/{name}: "
                               f"{sorted(set(results.before) ^ set(metrics))}")


def outcome(exc: BaseException, job: Any, tracker: Any) -> tuple[str, str]:
    """The final status and one-line error for an exception that ended the job (its traceback goes to the log)."""
    from athanor.distill.spec import RecipeError
    from athanor.jobs.leases import JobStopped
    from athanor.jobs.recipe import RecipeInvalid
    from athanor.jobs.tracking import TrackingUnavailable

    if isinstance(exc, JobStopped):
        log.warning("job cancelled")
        return "STOPPED", "cancelled"
    if isinstance(exc, KeyboardInterrupt):
        log.warning("job interrupted")
        return "STOPPED", "interrupted (Ctrl-C)"
    if isinstance(exc, (RecipeError, RecipeInvalid, TrackingUnavailable)):
        log.error("%s", exc)
        return "FAILED", str(exc)
    log.error("job failed:\n%s", traceback.format_exc())
    first = (str(exc).strip().splitlines() or [""])[0][:500]
    uri = getattr(tracker, "uri", "") or ""
    if uri.startswith("http") and type(exc).__module__.split(".")[0] in ("mlflow", "requests", "urllib3"):
        return "FAILED", f"tracking server {uri} failed during the job: {type(exc).__name__}: {first}"
    return "FAILED", f"{type(exc).__name__}: {first} (full traceback in {job.log_path})"
