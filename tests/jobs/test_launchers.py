"""The engine-independent half of the launchers (jobs/launchers/__init__.py, JobStore.take_over), with a fake engine:
the engine's job state settles a RUNNING job, a stale heartbeat never re-queues an engine job, a requeued engine run
becomes the next attempt, a refused submission fails the job in one line.

    .venv/bin/python -m pytest tests/jobs/test_launchers.py -q
"""

from __future__ import annotations

import time

import pytest

from athanor.jobs import launchers
from athanor.jobs.launchers import EngineState, LaunchError
from athanor.jobs.store import JobStore


class FakeEngine:
    name = "fake"

    def __init__(self) -> None:
        self.states: dict[str, EngineState] = {}
        self.submitted: list[str] = []
        self.refuse: str | None = None

    def submit(self, job, train, store) -> str:
        if self.refuse:
            raise LaunchError(self.refuse)
        engine_id = f"e{len(self.submitted) + 1}"
        self.submitted.append(engine_id)
        self.states[engine_id] = EngineState("RUNNING", finished=False)
        return engine_id

    def state(self, job) -> EngineState:
        if job.engine_id not in self.states:
            raise LaunchError("controller down")
        return self.states[job.engine_id]

    def cancel(self, job) -> None:
        self.states[job.engine_id] = EngineState("CANCELLED", finished=True, cancelled=True)


class Train:
    launcher = "fake"


@pytest.fixture
def engine(monkeypatch):
    fake = FakeEngine()
    monkeypatch.setattr(launchers, "launcher_for", lambda name: fake)
    return fake


def _submitted(store: JobStore, max_attempts: int = 2):
    job = store.create(name="t", method="minilm", recipe_text="x", recipe_path=None, overrides=[], recipe_hash="h",
                       max_attempts=max_attempts)
    launchers.submit(store, store.claim(job.id), Train())
    return store.get(job.id)


def test_a_submitted_job_records_the_engine_and_its_id(tmp_path, engine):
    job = _submitted(JobStore(tmp_path))
    assert (job.status, job.engine, job.engine_id, job.attempts) == ("RUNNING", "fake", "e1", 1)


def test_a_refused_submission_fails_the_job_in_one_line(tmp_path, engine):
    engine.refuse = "sbatch: error: invalid partition specified: gpux"
    job = _submitted(JobStore(tmp_path))
    assert job.status == "FAILED" and job.error == "fake: sbatch: error: invalid partition specified: gpux"


def test_a_running_engine_job_is_left_alone_and_a_stale_heartbeat_does_not_requeue_it(tmp_path, engine):
    store = JobStore(tmp_path)
    job = _submitted(store)
    store.update(job.id, heartbeat_at=time.time() - 3600)  # waiting in the engine's queue: nobody beats
    assert launchers.reconcile(store) == [] and store.reap(lease_seconds=1) == []
    assert store.get(job.id).status == "RUNNING"


def test_an_engine_job_that_ended_without_reporting_is_requeued_then_failed_when_attempts_run_out(tmp_path, engine):
    store = JobStore(tmp_path)
    job = _submitted(store, max_attempts=2)
    engine.states["e1"] = EngineState("NODE_FAIL", finished=True, detail="reason NodeFail")
    (settled,) = launchers.reconcile(store)
    assert settled.status == "PENDING" and "fake job e1 ended NODE_FAIL: reason NodeFail" in settled.error
    launchers.submit(store, store.claim(job.id), Train())
    assert store.get(job.id).engine_id == "e2" and store.get(job.id).attempts == 2
    engine.states["e2"] = EngineState("FAILED", finished=True)
    (settled,) = launchers.reconcile(store)
    assert settled.status == "FAILED" and "attempts exhausted (2 of train.max_attempts = 2)" in settled.error


def test_an_engine_job_cancelled_through_the_engine_is_stopped_not_retried(tmp_path, engine):
    store = JobStore(tmp_path)
    job = _submitted(store, max_attempts=5)
    engine.cancel(store.get(job.id))
    (settled,) = launchers.reconcile(store)
    assert settled.status == "STOPPED" and settled.error.startswith("cancelled through fake")


def test_an_engine_that_cannot_be_asked_leaves_the_job_running(tmp_path, engine):
    store = JobStore(tmp_path)
    job = _submitted(store)
    store.update(job.id, engine_id="unknown-to-the-engine")
    assert launchers.reconcile(store) == [] and store.get(job.id).status == "RUNNING"


def test_a_requeued_engine_run_takes_over_as_the_next_attempt_once(tmp_path, engine):
    store = JobStore(tmp_path)
    job = _submitted(store, max_attempts=2)
    assert store.take_over(job.id, "e1", 0).attempts == 1  # the first run is the claimed attempt
    assert store.take_over(job.id, "other", 0) is None  # not this job's engine job
    resumed = store.take_over(job.id, "e1", 1)
    assert (resumed.attempts, resumed.engine_run, resumed.status) == (2, 1, "RUNNING")
    assert store.take_over(job.id, "e1", 1).attempts == 2  # rank 0 asking again changes nothing
    assert store.take_over(job.id, "e1", 2) is None  # a third run: attempts exhausted
    job = store.get(job.id)
    assert job.status == "FAILED" and "attempts exhausted" in job.error


def test_a_requeued_run_of_a_cancelled_job_does_not_go_on(tmp_path, engine):
    store = JobStore(tmp_path)
    job = _submitted(store, max_attempts=3)
    store.request_cancel(job.id)
    assert store.take_over(job.id, "e1", 1) is None
    assert store.get(job.id).status == "STOPPED"


def test_once_any_rank_is_warned_every_rank_checkpoints_and_rank_0_requeues_once():
    from types import SimpleNamespace

    from athanor.jobs.trainer import guard_callback

    warned, handed, saved, asked = [], [], [], []

    def any_rank(flag: bool, all: bool) -> bool:  # the collective: here another rank saw the signal at step 9
        asked.append(flag)
        return flag or len(asked) >= 3

    guard = guard_callback(lambda: False, interrupted=lambda: bool(warned), on_interrupt=lambda: handed.append(1))
    saver = SimpleNamespace(save_now=lambda trainer: saved.append(trainer.global_step))
    for step in (7, 8, 9, 10, 11):
        trainer = SimpleNamespace(global_step=step, is_global_zero=True, should_stop=False,
                                  strategy=SimpleNamespace(reduce_boolean_decision=any_rank),
                                  checkpoint_callbacks=[saver])
        guard.on_train_batch_end(trainer, None, None, None, step)
    assert saved == [9] and handed == [1]  # at the step the ranks agreed on, once
    assert len(asked) == 3  # no collective after the hand-over


@pytest.mark.parametrize("launcher", ["slurm", "ray"])
def test_an_engine_with_accelerator_auto_is_refused_at_validation_naming_the_key(launcher, tmp_path):
    from harness import RECIPES

    from athanor.jobs.validate import check

    report = check(RECIPES / "minilm_tiny.yaml", overrides=[f"train.launcher={launcher}"])
    (problem,) = report.problems
    assert problem.path == "train.launcher" and "set train.accelerator to 'gpu' or 'cpu'" in problem.message
    assert check(RECIPES / "minilm_tiny.yaml", overrides=[f"train.launcher={launcher}", "train.accelerator=cpu"]
                 ).problems == []


class _Rank:
    """A started rank as LocalRanks sees it: poll() is None while it runs, then its exit code."""

    def __init__(self, exits_after_polls: int | None = None, code: int = 1) -> None:
        self.polls, self.exits_after_polls, self.code = 0, exits_after_polls, code

    def poll(self) -> int | None:
        self.polls += 1
        return self.code if self.exits_after_polls is not None and self.polls > self.exits_after_polls else None


def test_rank_zero_waits_for_every_started_rank_and_fails_at_once_when_one_exits_first(tmp_path):
    from athanor.jobs.trainer import LocalRanks

    ready = [tmp_path / "rank1.ready", tmp_path / "rank2.ready"]
    logs = [tmp_path / "rank1.log", tmp_path / "rank2.log"]
    for path in ready:
        path.touch()
    LocalRanks([1, 2], [_Rank(), _Rank()], logs, ready).wait_ready(poll_seconds=0)  # both there: returns
    LocalRanks().wait_ready(poll_seconds=0)  # no started ranks (one process, or a cluster engine's): returns
    ready[1].unlink()
    dying = LocalRanks([1, 2], [_Rank(), _Rank(exits_after_polls=3, code=7)], logs, ready)
    with pytest.raises(RuntimeError, match=r"^training rank 2 exited with code 7 before joining the other ranks; "
                                           r"see .*rank2\.log$"):
        dying.wait_ready(poll_seconds=0)
    ready[1].touch()
    LocalRanks([1, 2], [_Rank(), _Rank(exits_after_polls=0)], logs, ready).wait_ready(poll_seconds=0)  # exited after
    ready[0].unlink()
    with pytest.raises(RuntimeError, match=r"^training rank 1 did not reach training within 0 s; see .*rank1\.log$"):
        LocalRanks([1, 2], [_Rank(), _Rank()], logs, ready).wait_ready(poll_seconds=0, timeout_seconds=0)
