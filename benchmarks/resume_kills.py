"""Kill the tiny MiniLM job with SIGKILL at N random training steps and compare what it ends with against an
uninterrupted run of the same recipe and seed.

Both jobs run `recipes/minilm_tiny.yaml` with `train.checkpoint_every_n_steps` set (default 2); the killed one
with `train.max_attempts = N + 1` and the test fault `kill:step:S1,...,kill:step:SN` (jobs/resume.py: SIGKILL to
the job's process group at optimizer step Si, once each). Kill steps are drawn after the first checkpoint, so every
kill is followed by a resume from a checkpoint. `athanor worker --once` re-queues the job after each death and runs
the next attempt, which resumes from the newest checkpoint into the same MLflow run. Printed: kills, resumes (the
attempts that logged "resuming from"), the final status, the largest difference over the `after` metrics (timing
excluded), over the exported weights and over the logged training losses, and the MLflow runs of the job.

Run: `.venv/bin/python benchmarks/resume_kills.py [--kills 10] [--seed 0] [--every 2] [--home DIR]`
"""

from __future__ import annotations

import argparse
import math
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "minilm_tiny.yaml"
MAX_STEPS = 40  # the recipe's


def athanor(home: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if k != "ATHANOR_TEST_HOOK"}
    full.update({"ATHANOR_HOME": str(home), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                 "MLFLOW_ENABLE_ASYNC_LOGGING": "false", **(env or {})})
    return subprocess.run([sys.executable, "-m", "athanor.jobs.cli", *args], cwd=REPO, env=full, capture_output=True,
                          text=True, check=True, timeout=3600)


def run_job(home: Path, overrides: list[str], hook: str = "") -> str:
    """Submit the recipe and run it to a final status with `athanor worker --once`; the job id."""
    args = [a for o in overrides for a in ("-o", o)]
    job_id = athanor(home, "submit", str(RECIPE), *args).stdout.split()[2]
    athanor(home, "worker", "--once", env={"ATHANOR_TEST_HOOK": hook} if hook else None)
    return job_id


def _difference(a: float, b: float) -> float:
    """|a - b|; 0 when both are NaN (a metric a method defines as undefined here), inf when only one is."""
    if math.isnan(a) or math.isnan(b):
        return 0.0 if math.isnan(a) and math.isnan(b) else math.inf
    return abs(a - b)


def compare(home: Path, killed_id: str, plain_id: str) -> dict[str, Any]:
    """The figures: status, attempts, resumes, largest metric/weight/loss differences, MLflow runs of the job."""
    import mlflow
    from safetensors.torch import load_file

    from athanor.jobs.store import JobStore

    store = JobStore(home)
    killed, plain = store.get(killed_id), store.get(plain_id)
    uri = f"sqlite:///{home / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri, uri)
    keys = [k for k in plain.result["after"] if k != "latency_ms"]
    metric_diff = max(_difference(killed.result["after"][k], plain.result["after"][k]) for k in keys)
    weights = [load_file(next(Path(j.result["export"]).rglob("model.safetensors"))) for j in (killed, plain)]
    weight_diff = max((weights[0][k] - weights[1][k]).abs().max().item() for k in weights[1])
    curves = [sorted(client.get_metric_history(j.mlflow_run_id, "train/loss"), key=lambda m: m.timestamp)
              for j in (killed, plain)]
    same_steps = [m.step for m in curves[0]] == [m.step for m in curves[1]]
    loss_diff = max(abs(a.value - b.value) for a, b in zip(*curves)) if same_steps else float("inf")
    experiment = client.get_run(killed.mlflow_run_id).info.experiment_id
    runs = [r for r in client.search_runs([experiment]) if r.data.tags.get("athanor.job_id") == killed_id
            or r.data.tags.get("mlflow.parentRunId") == killed.mlflow_run_id]
    log = Path(killed.log_path).read_text(errors="replace")
    return {"status": killed.status, "attempts": killed.attempts, "resumes": log.count("resuming from"),
            "kills": log.count("test hook: kill at step"), "metric_diff": metric_diff, "weight_diff": weight_diff,
            "loss_points": len(curves[0]), "same_steps": same_steps, "loss_diff": loss_diff,
            "runs": sorted(r.info.run_name if "mlflow.parentRunId" in r.data.tags else "parent" for r in runs),
            "after": killed.result["after"],
            "reference": plain.result["after"], "metrics": keys}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0, help="draws the kill steps")
    parser.add_argument("--every", type=int, default=2, help="train.checkpoint_every_n_steps")
    parser.add_argument("--home", type=Path, default=None, help="athanor home (default: a new temporary one)")
    args = parser.parse_args(argv)
    home = args.home or Path(tempfile.mkdtemp(prefix="athanor-resume-"))
    steps = sorted(random.Random(args.seed).sample(range(args.every + 1, MAX_STEPS), args.kills))
    common = [f"train.checkpoint_every_n_steps={args.every}", "eval.latency_repeats=1"]
    started = time.time()
    plain = run_job(home, common)
    middle = time.time()
    killed = run_job(home, [*common, f"train.max_attempts={args.kills + 1}"],
                     ",".join(f"kill:step:{s}" for s in steps))
    figures = compare(home, killed, plain)
    print(f"kill -9 at steps {steps} of {MAX_STEPS} (checkpoints every {args.every}); home {home}")
    print(f"{figures['kills']} kills -> {figures['resumes']} resumes; {figures['status']} after "
          f"{figures['attempts']} attempts ({time.time() - middle:.0f} s; uninterrupted: {middle - started:.0f} s)")
    for key in figures["metrics"]:
        print(f"  after.{key}: resumed {figures['after'][key]:.9g}, uninterrupted {figures['reference'][key]:.9g}")
    print(f"max |difference|: metrics {figures['metric_diff']:.3g}, exported weights {figures['weight_diff']:.3g}, "
          f"train/loss {figures['loss_diff']:.3g} over {figures['loss_points']} logged steps "
          f"(same steps: {figures['same_steps']})")
    print(f"MLflow runs of the killed job: {figures['runs']}")
    return figures


if __name__ == "__main__":
    main()
