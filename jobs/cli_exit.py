"""Exit codes of the `athanor` command line, one meaning each, so scripts can branch on a job's outcome:

    0    done; for `submit --wait`, `wait`, `logs -f`: the job SUCCEEDED
    1    the job FAILED (or the command could not reach what it drives: a cluster engine, the store)
    2    bad input: an invalid recipe, option or label, no such job
    3    the job was STOPPED (cancelled)
    4    conflict: `cancel` of a job that is already final, a submission id reused for another request
    124  `wait --timeout` ran out before the job was final

    .venv/bin/python -m pytest tests/jobs/test_cli_exit.py -q
"""

from __future__ import annotations

EXIT_OK, EXIT_JOB_FAILED, EXIT_BAD_INPUT, EXIT_JOB_STOPPED, EXIT_CONFLICT, EXIT_TIMEOUT = 0, 1, 2, 3, 4, 124


def exit_for(status: str) -> int:
    """The exit code that reports a final job status."""
    return {"SUCCEEDED": EXIT_OK, "STOPPED": EXIT_JOB_STOPPED}.get(status, EXIT_JOB_FAILED)
