"""The job lifecycle (jobs/lifecycle.py) against its table, on a real store: every allowed transition is made, every
other one is refused with one line and writes nothing; the fences (attempt, cancel flag, attempts left) hold.

    .venv/bin/python -m pytest tests/jobs/test_lifecycle.py -q -n 0
"""

from __future__ import annotations

import itertools
from typing import get_args

import pytest

from athanor.jobs.api_models import Status
from athanor.jobs.lifecycle import FINAL, TRANSITIONS, JobStatus, TransitionRefused, transition
from athanor.jobs.store import Job, JobStore

ALL = list(JobStatus)


@pytest.fixture
def store(tmp_path) -> JobStore:
    return JobStore(tmp_path / "home")


def _job_in(store: JobStore, status: JobStatus, *, max_attempts: int = 2) -> Job:
    """A job that reached `status` through the store's own lifecycle calls."""
    job = store.create(name="n", method="toy", recipe_text="x", recipe_path=None, overrides=[], recipe_hash="h",
                       max_attempts=max_attempts)
    if status is not JobStatus.PENDING:
        store.claim(job.id)
    if status in FINAL:
        assert store.finish(job.id, status, error=None if status is JobStatus.SUCCEEDED else "why")
    job = store.get(job.id)
    assert job.status is status
    return job


def _move(store: JobStore, job_id: str, to: JobStatus, **kwargs) -> None:
    with store._transaction() as db:
        transition(db, job_id, to, **kwargs)


def test_the_table_covers_every_status_and_final_ones_are_left_never():
    assert set(TRANSITIONS) == set(JobStatus)
    assert all(TRANSITIONS[s] == frozenset() for s in FINAL)
    assert all(isinstance(s, str) and s == s.value for s in JobStatus)  # the column and JSON keep the names


@pytest.mark.parametrize(("start", "to"), list(itertools.product(ALL, ALL)))
def test_every_transition_in_the_table_is_made_and_every_other_refused(store, start, to):
    job = _job_in(store, start)
    if to in TRANSITIONS[start]:
        _move(store, job.id, to)
        after = store.get(job.id)
        assert after.status is to
        starts_attempt = (start, to) in {(JobStatus.PENDING, JobStatus.RUNNING), (JobStatus.RUNNING, JobStatus.RUNNING)}
        assert after.attempts == job.attempts + starts_attempt
        assert (after.finished_at is not None) == (to in FINAL)
    else:
        with pytest.raises(TransitionRefused, match=f"{start} → {to} is not a job transition"):
            _move(store, job.id, to)
        assert store.get(job.id) == job  # nothing written


def test_a_stale_attempt_moves_nothing(store):
    job = _job_in(store, JobStatus.RUNNING)
    _move(store, job.id, JobStatus.PENDING)  # re-queued (attempt 1 died); attempt 2 claims it
    store.claim(job.id)
    for to in (JobStatus.PENDING, JobStatus.RUNNING, JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
        with pytest.raises(TransitionRefused, match="attempt 1 no longer holds the job"):
            _move(store, job.id, to, attempt=1)
    _move(store, job.id, JobStatus.SUCCEEDED, attempt=2)
    assert store.get(job.id).status == "SUCCEEDED"


@pytest.mark.parametrize("to", [JobStatus.PENDING, JobStatus.RUNNING])
def test_a_retry_needs_attempts_left_and_no_cancel(store, to):
    exhausted = _job_in(store, JobStatus.RUNNING, max_attempts=1)
    with pytest.raises(TransitionRefused, match="attempts exhausted"):
        _move(store, exhausted.id, to)
    cancelled = _job_in(store, JobStatus.RUNNING)
    assert store.request_cancel(cancelled.id) == "RUNNING"
    with pytest.raises(TransitionRefused, match="a cancel was requested"):
        _move(store, cancelled.id, to)
    # the store's wrapper settles such a job instead: STOPPED (cancel) or FAILED (exhausted)
    assert store.retry_or_finish(cancelled.id, 1, "died").status == "STOPPED"
    assert store.retry_or_finish(exhausted.id, 1, "died").status == "FAILED"


def test_the_store_writes_no_status_outside_the_lifecycle(store):
    job = _job_in(store, JobStatus.PENDING)
    with pytest.raises(ValueError, match="lifecycle"):
        store.update(job.id, status="RUNNING")
    with pytest.raises(TransitionRefused, match="no such job"):
        _move(store, "no-such-job", JobStatus.RUNNING)
    assert not store.finish(job.id, "FAILED")  # PENDING → FAILED is no transition: refused, reported as not made
    assert store.get(job.id).status == "PENDING"


def test_the_api_names_the_same_statuses():
    assert set(get_args(Status)) == set(JobStatus)
