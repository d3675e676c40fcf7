"""Exit codes of the CLI carry a job's outcome (jobs/cli_exit.py): `wait`, `logs -f` and `submit --wait` exit 0 for
SUCCEEDED, 1 FAILED, 3 STOPPED; `wait --timeout` 124; `cancel` of a final job 4 with one line; a reused submission id
4; bad labels 2. `submit --wait` shows the spine's stages and keeps third-party noise in the job log unless -v.

    .venv/bin/python -m pytest tests/jobs/test_cli_exit.py -q
"""

from __future__ import annotations

import subprocess
import threading
import time
from pathlib import Path

import pytest
from harness import CLI, athanor
from recipes_toy import TOY, write_toy

from athanor.jobs import cli
from athanor.jobs.store import JobStore


def _job_in(home: Path, status: str, error: str | None = None, log: str = "") -> str:
    """A job row that reached `status` (no training: the exit codes depend only on the row)."""
    store = JobStore(home)
    job = store.create(name="n", method="toy", recipe_text=TOY, recipe_path=None, overrides=[], recipe_hash="h")
    if status != "PENDING":
        store.claim(job.id)
        Path(store.get(job.id).log_path).write_text(log)
    if status not in ("PENDING", "RUNNING"):
        store.finish(job.id, status, error=error)
    return job.id


@pytest.mark.parametrize(("status", "code"), [("SUCCEEDED", 0), ("FAILED", 1), ("STOPPED", 3)])
def test_wait_and_logs_follow_exit_with_the_jobs_outcome(home, capsys, status, code):
    job_id = _job_in(home, status, error=None if status == "SUCCEEDED" else "it broke", log="step 1\n")
    assert cli.main(["wait", job_id]) == code
    out, err = capsys.readouterr()
    if status == "SUCCEEDED":
        assert out.strip() == f"job {job_id}: SUCCEEDED" and err == ""
    else:
        assert err.strip() == f"job {job_id}: {status} — it broke" and out == ""
    assert cli.main(["logs", job_id, "-f"]) == code
    out, err = capsys.readouterr()
    assert out == "step 1\n" and (err == "" if code == 0 else err.strip() == f"job {job_id}: {status} — it broke")
    assert cli.main(["logs", job_id]) == 0  # printing a log is not an outcome


def test_logs_follow_streams_until_the_job_fails_then_exits_1(home):
    job_id = _job_in(home, "RUNNING", log="started\n")
    store = JobStore(home)
    follower = subprocess.Popen([*CLI, "logs", job_id, "--follow"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
    time.sleep(2)  # the follower is in its loop: what follows is appended while it reads
    with open(store.get(job_id).log_path, "a") as log:
        log.write("loss nan\n")
    store.finish(job_id, "FAILED", error="training diverged")
    out, err = follower.communicate(timeout=120)
    assert follower.returncode == cli.EXIT_JOB_FAILED
    assert out == "started\nloss nan\n" and err.strip() == f"job {job_id}: FAILED — training diverged"


def test_wait_returns_when_a_running_job_finishes(home, capsys):
    job_id = _job_in(home, "RUNNING")
    store = JobStore(home)
    threading.Timer(1.5, lambda: store.finish(job_id, "SUCCEEDED")).start()
    assert cli.main(["wait", job_id, "--poll", "0.2"]) == cli.EXIT_OK
    assert capsys.readouterr().out.strip() == f"job {job_id}: SUCCEEDED"


def test_wait_timeout_is_124_and_says_no_worker_is_alive(home, capsys):
    job_id = _job_in(home, "PENDING")
    assert cli.main(["wait", job_id, "--timeout", "0.5", "--poll", "0.1"]) == cli.EXIT_TIMEOUT == 124
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0] == ("warning: 1 job(s) PENDING and no worker seen for 30 s (none ever ran on this home): start one "
                      "with `athanor worker`")
    assert err[1] == f"job {job_id}: still PENDING after 0.5 s (--timeout)"
    assert cli.main(["wait", "nope"]) == cli.EXIT_BAD_INPUT


@pytest.mark.parametrize("status", ["SUCCEEDED", "FAILED", "STOPPED"])
def test_cancel_of_a_final_job_is_4_with_one_line(home, capsys, status):
    job_id = _job_in(home, status)
    assert cli.main(["cancel", job_id]) == cli.EXIT_CONFLICT == 4
    out, err = capsys.readouterr()
    assert out == "" and err.splitlines() == [f"error: job {job_id} is already {status}; nothing to cancel"]
    assert JobStore(home).get(job_id).status == status


def test_cancel_of_a_pending_job_is_0_and_wait_then_says_stopped(home, capsys):
    job_id = _job_in(home, "PENDING")
    assert cli.main(["cancel", job_id]) == 0
    assert cli.main(["wait", job_id]) == cli.EXIT_JOB_STOPPED == 3
    assert "STOPPED — cancelled before it started" in capsys.readouterr().err


def test_submission_id_resubmits_once_and_a_different_recipe_is_4(tmp_path, home, capsys):
    path = write_toy(tmp_path)
    assert cli.main(["submit", str(path), "--submission-id", "nightly-1", "--label", "team=search"]) == 0
    (job,) = JobStore(home).list()
    assert job.submission_id == "nightly-1" and job.labels == {"team": "search"}
    capsys.readouterr()
    assert cli.main(["submit", str(path), "--submission-id", "nightly-1", "--label", "team=search"]) == 0
    assert capsys.readouterr().err.strip() == (f"job {job.id} (PENDING) was submitted earlier as 'nightly-1'; "
                                               f"nothing new queued")
    assert cli.main(["submit", str(path), "--submission-id", "nightly-1", "-o", "train.seed=3"]) == cli.EXIT_CONFLICT
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"error: submission id 'nightly-1' was used for job {job.id} with another recipe")
    assert [j.id for j in JobStore(home).list()] == [job.id]


@pytest.mark.parametrize(("args", "key"), [
    (["--label", "team"], "--label"), (["--label", "bad key=x"], "--label.bad key"),
    (["--label", "a=1", "--label", "a=2"], "--label a"), (["--submission-id", "no spaces"], "--submission-id")])
def test_bad_labels_and_submission_ids_are_2_naming_the_option(tmp_path, home, capsys, args, key):
    assert cli.main(["submit", str(write_toy(tmp_path)), *args]) == cli.EXIT_BAD_INPUT
    lines = capsys.readouterr().err.strip().splitlines()
    assert len([line for line in lines if f": {key}" in line]) == 1, lines
    assert "no job was created" in lines[-1] and JobStore(home).list() == []


NOISE = ("litlogger", "deprecated", "module(s) in eval mode", "GPU available", "Creating initial MLflow database")


def test_submit_wait_shows_stages_and_keeps_third_party_noise_in_the_log(tmp_path, home):
    done = athanor("submit", str(write_toy(tmp_path)), "--wait", timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    stages = ["loading teacher", "evaluating the teacher (before)", "training for 30 steps",
              "evaluating the converted model (after)", "timing before and after", "exporting",
              "registering toy-student"]
    positions = [done.stdout.find(s) for s in stages]
    assert -1 not in positions and positions == sorted(positions), done.stdout
    assert "30/30" in done.stderr  # the training bar
    assert not [n for n in NOISE if n in done.stdout + done.stderr], done.stderr
    (job,) = JobStore(home).list()
    log = Path(job.log_path).read_text()
    assert "litlogger" in log and "eval mode" in log  # kept, in the job's log


def test_submit_wait_verbose_shows_third_party_output(tmp_path, home):
    path = write_toy(tmp_path, TOY.replace("max_steps: 30", "max_steps: 3"))
    done = athanor("submit", str(path), "--wait", "-v", "--no-progress", timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "GPU available" in done.stderr and "eval mode" in done.stderr and "loading teacher" in done.stdout


def test_submit_wait_of_a_cancelled_job_is_3(tmp_path, home):
    path = write_toy(tmp_path, TOY.replace("max_steps: 30", "max_steps: 100000") + "toy:\n  sleep_s: 0.05\n")
    proc = subprocess.Popen([*CLI, "submit", str(path), "--wait", "--no-progress"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    store = JobStore(home)
    deadline = time.time() + 300
    while not [j for j in store.list() if j.stage == "train" and j.progress_step] and time.time() < deadline:
        time.sleep(0.5)
    (job,) = store.list()
    assert cli.main(["cancel", job.id]) == 0
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == cli.EXIT_JOB_STOPPED, err[-3000:]
    assert err.strip().splitlines()[-1] == f"job {job.id}: STOPPED — cancelled"
