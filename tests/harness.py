"""The two helpers every end-to-end test shares: run the `athanor` CLI, and read what a job left in MLflow.

    from harness import athanor, mlflow_client, child_runs, artifact_files
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import cli_fork

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "recipes"
CLI = [sys.executable, "-m", "athanor.jobs.cli"]
"""`athanor` as a module of this interpreter (the console script may belong to another environment)."""


def athanor(*args: str, home: Path | None = None, env: dict[str, str] | None = None, timeout: float = 1500,
            check: bool = False) -> subprocess.CompletedProcess:
    """`athanor ARGS` in a process of its own (as a user runs it), run from the repo root; `home` sets ATHANOR_HOME
    (default: the environment's, which the `home` fixture points at a fresh folder). The process is forked from a
    server that has imported the heavy libraries once (tests/cli_fork.py); ATHANOR_TEST_FRESH_INTERPRETER=1 starts
    a fresh interpreter for every call instead."""
    # A tracking URI left in this process by an in-process test must not leak into the job.
    full_env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    full_env.update(env or {})
    if home is not None:
        full_env["ATHANOR_HOME"] = str(home)
    if os.environ.get(cli_fork.FRESH) == "1":
        return subprocess.run([*CLI, *args], cwd=REPO, env=full_env, capture_output=True, text=True,
                              timeout=timeout, check=check)
    done = cli_fork.run(list(args), env=full_env, cwd=REPO, timeout=timeout)
    if check:
        done.check_returncode()
    return done


def athanor_popen(*args: str, env: dict[str, str] | None = None, merge_stderr: bool = False) -> Any:
    """`athanor ARGS` started and not waited for, as `subprocess.Popen([*CLI, *args], text=True, stdout=PIPE,
    stderr=PIPE or STDOUT)` would be (the same calls work on what it returns): forked as `athanor` is, or a real
    Popen under ATHANOR_TEST_FRESH_INTERPRETER=1."""
    full_env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    full_env.update(env or {})
    if os.environ.get(cli_fork.FRESH) == "1":
        return subprocess.Popen([*CLI, *args], cwd=REPO, env=full_env, stdout=subprocess.PIPE, text=True,
                                stderr=subprocess.STDOUT if merge_stderr else subprocess.PIPE)
    return cli_fork.start(list(args), env=full_env, cwd=REPO, merge_stderr=merge_stderr)


def mlflow_client(home: Path) -> Any:
    """An MlflowClient (tracking and registry) on the embedded store of athanor home `home`; also makes it
    the process default so `models:/…` URIs resolve."""
    import mlflow

    uri = f"sqlite:///{home / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return mlflow.MlflowClient(uri, uri)


def child_runs(client: Any, parent_id: str) -> dict[str, Any]:
    """The child runs of a job's parent run by name (`baseline`, `converted`, `untrained`)."""
    parent = client.get_run(parent_id)
    runs = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'")
    return {run.info.run_name: run for run in runs}


def eval_metrics(run: Any) -> dict[str, float]:
    """A child run's `eval/*` metrics without the prefix."""
    return {k.removeprefix("eval/"): v for k, v in run.data.metrics.items() if k.startswith("eval/")}


def artifact_files(client: Any, run_id: str, path: str | None = None) -> list[str]:
    """Every artifact file of a run (recursively)."""
    found: list[str] = []
    for item in client.list_artifacts(run_id, path):
        found += artifact_files(client, run_id, item.path) if item.is_dir else [item.path]
    return found
