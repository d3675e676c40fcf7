"""Resume (issue 13): atomic step checkpoints, re-queueing of a job whose process died, the next attempt resuming
from the newest checkpoint into the same MLflow parent run, and the lease's attempt number fencing off an attempt
that was frozen (not dead) while its job ran again.

Tolerance: on CPU a resumed run is bit-identical to an uninterrupted one with the same seed (weights, metrics and
every logged training loss compared with ==): the checkpoint restores weights, optimizer, LR schedule and step,
and `jobs/resume.py` restores the data order, the position in the epoch and the RNG states.

    .venv/bin/python -m pytest tests/jobs/test_resume.py -q
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from harness import REPO, athanor, athanor_popen, child_runs, mlflow_client
from recipes_toy import TOY, write_toy
from safetensors.torch import load_file
from test_faults import _wait_for, assert_promises_kept
from toy_method import Toy, ToyArgs, ToyStudent

from athanor.distill.spec import DataSpec, ResolvedSource, TrainSpec
from athanor.jobs import resume
from athanor.jobs.store import JobStore

RESUMABLE = TOY.replace("log_every_n_steps: 5", "log_every_n_steps: 2\n  checkpoint_every_n_steps: 5")


def _toy_fit(job_dir: Path, *, steps: int = 12, every: int | None = 3, keep: int = 2, ckpt: Path | None = None,
             callbacks: tuple = ()) -> dict[str, torch.Tensor]:
    """Train the toy student in this process (seeded as a job does); its final weights."""
    import lightning as L

    from athanor.jobs.trainer import fit

    L.seed_everything(0, verbose=False)
    method = Toy()
    teacher = method.load_teacher(ResolvedSource("inline", config={"width": 8, "hidden": 16}))
    student = method.convert(teacher, ToyStudent(hidden=4), ToyArgs())
    data = method.data(teacher, DataSpec(batch_size=16), ToyArgs())
    train = TrainSpec(max_steps=steps, lr=0.01, checkpoint_every_n_steps=every, keep_checkpoints=keep)
    module = method.lightning_module(teacher, student, data, ToyArgs(), train)
    trained = fit(method, module, student, data, train, 16, job_dir=job_dir, progress=False,
                  callbacks=list(callbacks), ckpt_path=ckpt)
    return {k: v.detach().clone() for k, v in trained.state_dict().items()}


class Crash(Exception):
    """Stands in for a death (the checkpoint folder is what a killed process leaves)."""


def test_checkpoints_are_published_atomically_and_pruned_to_the_newest_n(tmp_path, monkeypatch, one_torch_thread):
    _toy_fit(tmp_path / "full", steps=12, every=3, keep=2)
    ckpts = tmp_path / "full" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == [  # no *.tmp left either, and each has its manifest
        "step=12.ckpt", "step=12.ckpt.manifest.json", "step=9.ckpt", "step=9.ckpt.manifest.json"]

    published = []
    real_commit = resume.commit

    def crash_at_the_third(partial: Path, final: Path, fence=None) -> bool:
        assert partial.name.startswith(final.name + ".") and partial.suffix == ".tmp" and partial.is_file()
        if len(published) == 2:  # written completely under its temporary name, then the process "dies"
            raise Crash
        published.append(final.name)
        return real_commit(partial, final, fence)

    monkeypatch.setattr(resume, "commit", crash_at_the_third)
    with pytest.raises(Crash):
        _toy_fit(tmp_path / "crashed", steps=12, every=3, keep=2)
    ckpts = tmp_path / "crashed" / "checkpoints"
    assert [p.name for p in resume.complete_checkpoints(ckpts)] == ["step=3.ckpt", "step=6.ckpt"]
    assert len(list(ckpts.glob("step=9.ckpt.*.tmp"))) == 1  # never visible as a checkpoint
    newest = resume.resume_checkpoint(ckpts, keep=1)
    assert newest == ckpts / "step=6.ckpt"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step=6.ckpt", "step=6.ckpt.manifest.json"]
    assert torch.load(newest, weights_only=True)["global_step"] == 6


def _publish(folder: Path, step: int, files: dict[str, bytes] | bytes) -> Path:
    """A checkpoint written under its temporary name (a file, or a folder of shards) and committed."""
    partial, final = folder / f"step={step}.ckpt.ab12.tmp", folder / f"step={step}.ckpt"
    if isinstance(files, bytes):
        partial.write_bytes(files)
    else:
        for name, data in files.items():
            (partial / name).parent.mkdir(parents=True, exist_ok=True)
            (partial / name).write_bytes(data)
    assert resume.commit(partial, final)
    return final


@pytest.mark.parametrize("damage", ["truncated", "flipped", "manifest_gone", "shard_gone"])
def test_a_damaged_newest_checkpoint_is_named_and_passed_over_for_the_newest_intact_one(tmp_path, caplog, damage):
    shards = {"checkpoint/mp_rank_00_model_states.pt": b"m" * 4096, "checkpoint/zero_pp_rank_0_optim.pt": b"o" * 64}
    kind = shards if damage == "shard_gone" else b"w" * 4096  # DeepSpeed writes a folder of shards
    older, newest = _publish(tmp_path, 10, kind), _publish(tmp_path, 15, kind)
    shard = newest / "checkpoint/zero_pp_rank_0_optim.pt" if newest.is_dir() else newest
    if damage == "truncated":  # what a full disk leaves
        shard.write_bytes(shard.read_bytes()[:1000])
    elif damage == "flipped":  # same size, one byte changed
        shard.write_bytes(b"x" + shard.read_bytes()[1:])
    elif damage == "manifest_gone":
        (tmp_path / "step=15.ckpt.manifest.json").unlink()
    else:
        shard.unlink()
    assert resume.resume_from(tmp_path, keep=2, attempt=2, rank0=False) == older  # another node's rank agrees
    with caplog.at_level("WARNING", logger="athanor.resume"):
        assert resume.resume_checkpoint(tmp_path, keep=2) == older
    said = " ".join(r.getMessage() for r in caplog.records)
    assert "checkpoint step=15.ckpt is damaged (" in said and "newest intact checkpoint step=10.ckpt" in said, said
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step=10.ckpt", "step=10.ckpt.manifest.json"]
    (tmp_path / "step=10.ckpt.manifest.json").write_text("{not json")
    assert resume.resume_checkpoint(tmp_path, keep=2) is None  # nothing intact: step 0, said in the log
    assert "step 0: no intact checkpoint is left" in caplog.text


def test_a_checkpoint_is_not_published_once_the_attempt_lost_its_job(tmp_path):
    partial, final = tmp_path / "step=5.ckpt.ab12.tmp", tmp_path / "step=5.ckpt"
    partial.write_bytes(b"weights")
    assert not resume.commit(partial, final, fence=lambda: False)
    assert not partial.exists() and not final.exists()
    partial.write_bytes(b"weights")
    assert resume.commit(partial, final, fence=lambda: True) and final.read_bytes() == b"weights"


@pytest.mark.parametrize("every,crash_at", [(5, 13), (8, 17), (3, 21)])
def test_a_resumed_fit_is_bit_identical_to_an_uninterrupted_one(tmp_path, one_torch_thread, every, crash_at):
    """16 batches per epoch, 40 steps: resumed from step 10 (mid-epoch), 16 (an epoch's last batch), 18 (the second
    epoch). The crash comes before that step's checkpoint: step 21 resumes from 18, not 21."""
    from lightning.pytorch.callbacks import Callback

    class CrashAt(Callback):
        def on_train_batch_end(self, trainer, *args) -> None:
            if trainer.global_step == crash_at:
                raise Crash

    reference = _toy_fit(tmp_path / "reference", steps=40, every=None)
    with pytest.raises(Crash):
        _toy_fit(tmp_path / "job", steps=40, every=every, callbacks=(CrashAt(),))
    ckpt = resume.resume_checkpoint(tmp_path / "job" / "checkpoints", keep=2)
    assert resume.checkpoint_step(ckpt) == (crash_at - 1) // every * every
    resumed = _toy_fit(tmp_path / "job", steps=40, every=every, ckpt=ckpt)
    assert all(torch.equal(resumed[k], reference[k]) for k in reference)


def _history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    return [(m.step, m.value) for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.timestamp)]


def _run_worker(env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    done = athanor("worker", "--once", env=env)
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    return done


def test_a_killed_job_is_requeued_and_resumes_into_the_same_run_matching_an_uninterrupted_one(tmp_path, home):
    """SIGKILL at step 17 (checkpoint at 15, losses logged every 2 steps): attempt 2 resumes at 15 in the same run;
    each curve has one point per step, and everything equals the uninterrupted job's."""
    path = write_toy(tmp_path, RESUMABLE.replace("lr: 0.01", "lr: 0.01\n  max_attempts: 2"))
    athanor("submit", str(path), check=True)
    done = _run_worker({"ATHANOR_TEST_HOOK": "kill:step:17"})
    athanor("submit", str(path), check=True)
    _run_worker()
    resumed, plain = sorted(JobStore(home).list(), key=lambda j: j.created_at)
    assert "re-queued for attempt 2" in done.stdout
    assert "test hook: kill at step 17" in Path(resumed.log_path).read_text()
    assert (resumed.status, resumed.attempts, resumed.result["attempts"]) == ("SUCCEEDED", 2, 2)
    assert (plain.status, plain.attempts) == ("SUCCEEDED", 1)

    client = mlflow_client(home)
    parents = [r for r in client.search_runs([client.get_run(resumed.mlflow_run_id).info.experiment_id])
               if "mlflow.parentRunId" not in r.data.tags]
    assert sorted(r.info.run_id for r in parents) == sorted([resumed.mlflow_run_id, plain.mlflow_run_id])
    children = child_runs(client, resumed.mlflow_run_id)
    assert sorted(children) == ["baseline", "converted"]  # one each, not one per attempt
    parent = client.get_run(resumed.mlflow_run_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["athanor.attempt"] == "2"
    assert [v for _, v in _history(client, resumed.mlflow_run_id, "job/attempt")] == [1.0, 2.0]
    curve, reference = (_history(client, run, "train/loss") for run in (resumed.mlflow_run_id, plain.mlflow_run_id))
    steps = [s for s, _ in curve]
    assert steps == sorted(set(steps)) and len(steps) == 15 and curve == reference  # continuous, no restart, equal

    assert resumed.result["after"]["mse_to_teacher"] == plain.result["after"]["mse_to_teacher"]  # tolerance: 0
    weights = [load_file(Path(j.result["export"]) / "model.safetensors") for j in (resumed, plain)]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[1])
    versions = client.search_model_versions("name='toy-student'")
    assert sorted(v.tags["athanor.job_id"] for v in versions) == sorted([resumed.id, plain.id])
    assert sorted(p.name for p in (home / "jobs" / resumed.id / "checkpoints").iterdir()) == [
        "step=25.ckpt", "step=25.ckpt.manifest.json", "step=30.ckpt", "step=30.ckpt.manifest.json"]  # keep: 2
    assert_promises_kept(home)


def test_a_job_that_dies_on_every_attempt_fails_saying_its_attempts_are_exhausted(tmp_path, home):
    path = write_toy(tmp_path, RESUMABLE.replace("lr: 0.01", "lr: 0.01\n  max_attempts: 2"))
    athanor("submit", str(path), check=True)
    done = _run_worker({"ATHANOR_TEST_HOOK": "kill:step:7,kill:step:13"})
    (job,) = JobStore(home).list()
    assert job.status == "FAILED" and job.attempts == 2, job
    assert "attempts exhausted (2 of train.max_attempts = 2)" in job.error
    assert "stopped reporting" in job.error or "code -9" in job.error
    assert "re-queued for attempt 2" in done.stdout
    assert mlflow_client(home).get_run(job.mlflow_run_id).info.status == "KILLED"
    assert_promises_kept(home)


def test_the_attempt_number_fences_an_earlier_attempt_out_of_a_requeued_job(home):
    store = JobStore(home)
    job = store.create(name="j", method="toy", recipe_text="x", recipe_path=None, overrides=[], recipe_hash="h",
                       max_attempts=3)
    first = store.claim(job.id)
    assert first.attempts == 1 and store.claim(job.id) is None  # a RUNNING job is never claimed again
    (requeued,) = store.reap(lease_seconds=0)
    assert (requeued.status, requeued.attempts, requeued.pid) == ("PENDING", 1, None)
    assert "re-queued for attempt 2" in requeued.error
    second = store.claim()
    assert second.attempts == 2 and second.error is None and store.claim() is None
    assert not store.heartbeat(job.id, attempt=1) and store.heartbeat(job.id, attempt=2)
    assert not store.finish(job.id, "FAILED", error="stale", attempt=1)
    assert store.retry_or_finish(job.id, 1, "stale") is None  # only the attempt that runs can be settled
    assert store.get(job.id).status == "RUNNING"
    assert store.finish(job.id, "SUCCEEDED", attempt=2) and store.get(job.id).status == "SUCCEEDED"


def _freeze_outside_writes(pgid: int, databases: list[Path]) -> None:
    """SIGSTOP a process group at a moment it holds no SQLite write lock (a process frozen inside a write would
    block every other writer until it wakes: SQLite's behaviour, not what this test is about)."""
    import sqlite3

    for _ in range(50):
        os.killpg(pgid, signal.SIGSTOP)
        try:
            for path in databases:
                db = sqlite3.connect(path, timeout=0.2, isolation_level=None)
                try:
                    db.execute("BEGIN IMMEDIATE")
                    db.execute("ROLLBACK")
                finally:
                    db.close()
            return
        except sqlite3.OperationalError:  # locked by the frozen process: let it finish that write
            os.killpg(pgid, signal.SIGCONT)
            time.sleep(0.05)
    raise AssertionError("the job process always held a database write lock")


def test_a_stale_lease_never_leads_to_two_live_runs_of_one_job(tmp_path, home):
    """Attempt 1 is frozen (SIGSTOP) past its lease: the job is re-queued and attempt 2 runs it. Woken up, attempt 1
    finds its lease gone and stops without writing anything; attempt 2 finishes the job."""
    env = {"ATHANOR_LEASE_SECONDS": "3"}
    slow = RESUMABLE.replace("max_steps: 30", "max_steps: 120").replace("lr: 0.01", "lr: 0.01\n  max_attempts: 2")
    job_id = athanor("submit", str(write_toy(tmp_path, slow + "toy:\n  sleep_s: 0.05\n")), check=True).stdout.split()[2]
    store = JobStore(home)
    first = athanor_popen("worker", "--once", env=env, merge_stderr=True)
    _wait_for(lambda: list((home / "jobs" / job_id / "checkpoints").glob("step=*.ckpt")), 120, "a checkpoint")
    frozen = store.get(job_id).pid
    _freeze_outside_writes(frozen, [home / "jobs.db", home / "mlflow.db"])
    try:
        time.sleep(4)
        listing = athanor("list", env=env)  # reaps the stale lease: re-queued, not failed
        assert listing.returncode == 0, listing.stderr[-3000:]
        assert store.get(job_id).status == "PENDING"
        second = athanor_popen("worker", "--once", env=env, merge_stderr=True)
        _wait_for(lambda: store.get(job_id).attempts == 2 and store.get(job_id).pid not in (None, frozen), 60,
                  "attempt 2 to start")
    finally:
        os.killpg(frozen, signal.SIGCONT)
    first_out = first.communicate(timeout=120)[0]
    now = store.get(job_id)  # attempt 1 neither failed nor stopped the job attempt 2 runs
    assert now.status in ("RUNNING", "SUCCEEDED") and now.attempts == 2, (now, first_out)
    second.communicate(timeout=300)
    job = store.get(job_id)
    assert job.status == "SUCCEEDED" and job.attempts == 2, (job, first_out)
    assert "lease was taken away" in Path(job.log_path).read_text()
    versions = mlflow_client(home).search_model_versions("name='toy-student'")
    assert [v.tags["athanor.job_id"] for v in versions] == [job_id]
    assert sorted(child_runs(mlflow_client(home), job.mlflow_run_id)) == ["baseline", "converted"]
    assert_promises_kept(home)


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("strategy", ["deepspeed_stage_2"])
def test_a_two_rank_job_resumes_on_every_rank_to_the_same_student(tmp_path, home, strategy):
    """Rank 0 picks the checkpoint and hands it to the rank it launches (here DeepSpeed's directory of shards; DDP's
    one file goes through the same hand-off, `resume_from`); both ranks resume, and the student equals the
    uninterrupted two-rank one. Two-rank DDP resuming: the Slurm time-limit test (tests/jobs/test_slurm.py)."""
    path = write_toy(tmp_path, RESUMABLE.replace("lr: 0.01", "lr: 0.01\n  max_attempts: 2"))
    ranks = ["-o", f"train.strategy={strategy}", "-o", "train.devices=2", "-o", "train.accelerator=cpu"]
    athanor("submit", str(path), *ranks, check=True)
    _run_worker({"ATHANOR_TEST_HOOK": "kill:step:13"})
    athanor("submit", str(path), *ranks, check=True)
    _run_worker()
    resumed, plain = sorted(JobStore(home).list(), key=lambda j: j.created_at)
    assert (resumed.status, resumed.attempts, plain.status) == ("SUCCEEDED", 2, "SUCCEEDED"), resumed.error
    assert "resuming from" in Path(resumed.log_path).read_text()
    weights = [load_file(Path(j.result["export"]) / "model.safetensors") for j in (resumed, plain)]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[1])
    client = mlflow_client(home)
    assert _history(client, resumed.mlflow_run_id, "train/loss") == _history(client, plain.mlflow_run_id, "train/loss")


@pytest.mark.slow
def test_repeated_kills_of_the_tiny_minilm_job_end_where_the_uninterrupted_run_ends(tmp_path, monkeypatch):
    """The acceptance measurement (benchmarks/resume_kills.py, run with its default 10 kills for the figure) at 2
    SIGKILLs, to keep CI short: 2 resumes, the same final metrics, weights and training curve as the uninterrupted
    run (tolerance 0 on CPU), one parent run. Its `athanor` calls go through the suite's forked CLI."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("resume_kills", REPO / "benchmarks" / "resume_kills.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    monkeypatch.setattr(bench, "athanor", lambda home, *args, env=None: athanor(*args, home=home, env=env,
                                                                                check=True, timeout=3600))
    figures = bench.main(["--kills", "2", "--home", str(tmp_path / "home")])
    assert (figures["kills"], figures["resumes"], figures["status"], figures["attempts"]) == (2, 2, "SUCCEEDED", 3)
    assert figures["metric_diff"] == figures["weight_diff"] == figures["loss_diff"] == 0 and figures["same_steps"]
    assert figures["runs"] == ["baseline", "converted", "parent"]
