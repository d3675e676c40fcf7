"""What rank 0 of a job measured (`Results`) and the checks it must pass before anything is exported:
finite metrics where the method defines numbers, the same metric keys on every side; and `outcome`, the final
status and one-line error of a job that ended by an exception.

    .venv/bin/python -m pytest tests/jobs/test_faults.py tests/jobs/test_cli_jobs.py -q
"""

from __future__ import annotations

import errno
import logging
import math
import shutil
import sqlite3
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from athanor.distill.intervals import LEVEL, RESAMPLES, difference_intervals, side_intervals
from athanor.distill.spec import RecipeError
from athanor.jobs.leases import JobStopped
from athanor.jobs.recipe_yaml import RecipeInvalid
from athanor.jobs.tracking_http import TrackingUnavailable

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
    arms_sd: dict[str, dict[str, float]] = field(default_factory=dict)
    """With `train.seeds`: each arm's standard deviation over the seeds (its `arms` entry is the mean)."""
    comparison: dict[str, float] = field(default_factory=dict)
    """The method's summary over the arms (`compare_arms`), logged on the parent run."""
    samples: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Per-sample metrics (`distill.intervals.PerSample`) by side: before, after, untrained, arm_<name>."""
    intervals: dict[str, Any] = field(default_factory=dict)
    """95% paired-bootstrap intervals of the per-sample metrics (`interval_table`), once every side is measured."""
    gate: dict[str, Any] | None = None
    """The promotion gate's verdict (`jobs/gate.py`)."""


DIFFERENCES = (("after", "before"), ("after", "untrained"))
"""(minuend, subtrahend) sides whose paired differences are reported; each arm adds (after, arm_<name>)."""


def interval_table(samples: dict[str, dict[str, Any]], *, seed: int = 0) -> dict[str, Any]:
    """Each side's per-sample metrics with their 95% interval, and the paired differences after − before,
    after − untrained and after − arm_<name> (the same bootstrap draws for both sides of a difference)."""
    if not any(samples.values()):
        return {}
    pairs = [*DIFFERENCES, *(("after", side) for side in samples if side.startswith("arm_"))]
    return {
        "method": f"paired percentile bootstrap, {RESAMPLES} resamples, seed {seed}", "level": LEVEL,
        "sides": {side: {k: iv.as_dict() for k, iv in side_intervals(per, seed=seed).items()}
                  for side, per in samples.items() if per},
        "differences": {f"{a} - {b}": {k: iv.as_dict() for k, iv in
                                       difference_intervals(samples[b], samples[a], seed=seed).items()}
                        for a, b in pairs if samples.get(a) and samples.get(b)},
    }


def job_result(results: Results, *, registry: Any, version: str | None, export: Path, attempts: int,
               started: float) -> dict[str, Any]:
    """The job row's result: what `athanor status`, `submit --wait` and the HTTP API show."""
    alias = registry.alias if (results.gate or {}).get("passed", True) else None  # a failed gate: no alias
    registered = {"name": registry.name, "version": version, "alias": alias} if version else None
    return {"before": results.before, "after": results.after, "untrained": results.untrained,
            "arms": results.arms or None, "arms_sd": results.arms_sd or None,
            "comparison": results.comparison or None, "speedup": results.speedup,
            "intervals": results.intervals or None, "gate": results.gate, "params": results.params,
            "export": str(export), "attempts": attempts, "registered": registered,
            "seconds": round(time.time() - started, 1)}


def check_declared(method: Any, metrics: dict[str, Any], also: dict[str, str] | None = None) -> None:
    """Every key `evaluate` returned is one the method declares in `metrics` (with its direction), or one `also`
    declares (lm-evaluation-harness results, directed by their tasks)."""
    undeclared = sorted(set(metrics) - set(method.metrics) - set(also or {}))
    if undeclared:
        raise RuntimeError(f"method {method.name} returned metrics it does not declare in `metrics`: {undeclared}")


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


def disk_full(exc: BaseException) -> OSError | sqlite3.OperationalError | None:
    """The out-of-space error behind an exception (its cause and context chain followed), if any."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in (errno.ENOSPC, errno.EDQUOT):
            return current
        if isinstance(current, sqlite3.OperationalError) and "full" in str(current):
            return current
        if "No space left on device" in str(current):  # also as wrapped by torch or a library
            return current
        current = current.__cause__ or current.__context__
    return None


def disk_full_line(error: BaseException, job_dir: Path) -> str:
    """One line for a job that ran out of disk: the path written and the space left there."""
    where = Path(getattr(error, "filename", None) or job_dir)
    probe = next((p for p in (where, *where.parents) if p.exists()), job_dir)
    free = shutil.disk_usage(probe).free / 2**20
    return (f"disk full: no space left writing {where} ({free:.1f} MiB free on that disk); partial files were "
            "removed; free disk space (or lower train.keep_checkpoints) and submit the job again")


def remove_partial_writes(job_dir: Path) -> None:
    """Free what interrupted writes hold in a job folder (the export being written, `*.tmp` checkpoints and
    manifests): a job that ran out of disk must still be able to write its final status."""
    shutil.rmtree(job_dir / "export.partial", ignore_errors=True)
    for partial in sorted(job_dir.rglob("*.tmp")):
        if partial.is_dir() and not partial.is_symlink():
            shutil.rmtree(partial, ignore_errors=True)
        else:
            partial.unlink(missing_ok=True)


def outcome(exc: BaseException, job: Any, tracker: Any) -> tuple[str, str]:
    """The final status and one-line error for an exception that ended the job (its traceback goes to the log)."""
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
    if (full := disk_full(exc)) is not None:
        return "FAILED", disk_full_line(full, Path(job.log_path).parent)
    first = (str(exc).strip().splitlines() or [""])[0][:500]
    uri = getattr(tracker, "uri", "") or ""
    if uri.startswith("http") and type(exc).__module__.split(".")[0] in ("mlflow", "requests", "urllib3"):
        return "FAILED", f"tracking server {uri} failed during the job: {type(exc).__name__}: {first}"
    return "FAILED", f"{type(exc).__name__}: {first} (full traceback in {job.log_path})"
