"""The sequence of one job: load → convert → evaluate before → train → evaluate after → time both
side by side → export → track → register. The only module that knows the order; methods only answer
the protocol calls of `distill/spec.py`.

Run by `athanor worker` (one process per job) or in the foreground by `athanor submit --wait`.
Tests: `.venv/bin/python -m pytest tests/jobs/test_cli_jobs.py tests/jobs/test_protocol.py -q`.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from athanor.convert.module_utils import count_params
from athanor.distill.intervals import split
from athanor.distill.timing import interleaved_latency
from athanor.jobs.arms import train_arms
from athanor.jobs.gate import judge
from athanor.jobs.launchers import interrupt_hooks
from athanor.jobs.leases import SIGTERM_NOTED, JobLease, JobStopped, engine_stopped, signals_deferred, sigterm_cancels
from athanor.jobs.lm_eval_stage import measured
from athanor.jobs.methods import get_method
from athanor.jobs.recipe import LoadedRecipe, load_recipe, resolve_recipe_paths
from athanor.jobs.registry import drop_job_versions, register, undo, version_tags, write_model_card
from athanor.jobs.results import (
    Results,
    check_finite,
    check_same_keys,
    disk_full,
    interval_table,
    job_result,
    outcome,
    remove_partial_writes,
)
from athanor.jobs.sources import resolve_source
from athanor.jobs.store import Job, JobStore
from athanor.jobs.tracking import Tracker

log = logging.getLogger("athanor.job")


@dataclass
class Prepared:
    """What every rank builds from the recipe before training."""

    loaded: LoadedRecipe
    method: Any
    teacher: Any
    student: Any
    data: Any
    init_rng: dict[str, Any] | None = None
    """The RNG states the student was initialised from: an arm at the job's seed starts from the same ones."""


def lineage_tags(job: Job, recipe: Any) -> dict[str, str]:
    """Where a run or a model version came from; the one place these tags are built."""
    return {"athanor.job_id": job.id, "athanor.method": recipe.method, "athanor.recipe_hash": job.recipe_hash,
            "athanor.teacher": recipe.teacher.source or "inline config"}


def _loaded_for(job: Job) -> LoadedRecipe:
    path = Path(job.recipe_path) if job.recipe_path else None
    loaded = load_recipe(path, text=job.recipe_text, overrides=job.overrides)
    resolve_recipe_paths(loaded)
    return loaded


def prepare(job: Job) -> Prepared:
    """Everything every rank needs: recipe, method, teacher, initial student, data."""
    # why: lightning loads once the job's lease heartbeats (a slow import must not let a short lease lapse)
    import lightning as L

    from athanor.jobs.resume import rng_states

    loaded = _loaded_for(job)
    recipe = loaded.recipe
    L.seed_everything(recipe.train.seed, verbose=False)
    method = get_method(recipe.method)
    base = Path(job.recipe_path).parent if job.recipe_path else None
    log.info("loading teacher %s", recipe.teacher.source or "from inline config")
    teacher = method.load_teacher(resolve_source(recipe.teacher, "teacher", base=base))
    log.info("building student")
    init_rng = rng_states()
    student = method.convert(teacher, loaded.student, loaded.args)
    log.info("preparing data")
    data = method.data(teacher, recipe.data, loaded.args)
    return Prepared(loaded, method, teacher, student, data, init_rng)


ARM_ENV = "ATHANOR_ARM"
"""Set for the ranks rank 0 launches to train one comparison arm, as NAME or NAME@SEED (empty: the main student)."""


def comparison_arms(p: Prepared) -> dict[str, Any]:
    """Arm name -> the method args that arm trains with (the optional protocol call; MethodBase's default: {})."""
    return p.method.comparison_arms(p.loaded.args, p.loaded.recipe.train) if p.method.trains else {}


def _train(p: Prepared, job: Job, store: JobStore, *, logger: Any, progress: bool, launch: bool = True,
           arm: str = "", lease: JobLease | None = None) -> Any:
    """Train the student (or, with `arm` = NAME or NAME@SEED, a fresh student of that comparison arm, initialised
    as the main student was, or from SEED); rank 0 (`launch`) starts the other ranks of this node, which call this
    with launch=False. A later attempt resumes from the newest checkpoint. Every rank stops at the step after a
    cancel request (or a lost lease) and fails on a non-finite loss."""
    # why: lightning loads once the job's lease heartbeats (a slow import must not let a short lease lapse)
    import lightning as L

    from athanor.jobs.fault_hooks import fault_callbacks
    from athanor.jobs.progress import progress_callback
    from athanor.jobs.resume import RESUME_ENV, resume_from, set_rng_states
    from athanor.jobs.trainer import CHECKPOINTS, LocalRanks, fit, guard_callback, launched_ranks

    recipe, train = p.loaded.recipe, p.loaded.recipe.train
    args, student = p.loaded.args, p.student
    if arm:
        name, _, seed = arm.partition("@")
        args = comparison_arms(p)[name]
        if seed and int(seed) != train.seed:
            train = train.model_copy(update={"seed": int(seed)})
            L.seed_everything(train.seed, verbose=False)
        elif p.init_rng is not None:
            set_rng_states(p.init_rng)  # the same initial weights as the main student, where the shapes agree
        student = p.method.convert(p.teacher, p.loaded.student, args)
    module = p.method.lightning_module(p.teacher, student, p.data, args, train)
    job_dir = store.job_dir(job.id) / ("arms" if arm else "") / arm.replace("@", "_seed")
    job_dir.mkdir(parents=True, exist_ok=True)
    ckpt = resume_from(job_dir / CHECKPOINTS, train.keep_checkpoints, job.attempts, rank0=launch)
    ranks = (launched_ranks(train, job.id, store.home, job_dir,
                            extra_env={ARM_ENV: arm, RESUME_ENV: str(ckpt or "")}) if launch
             else contextlib.nullcontext(LocalRanks()))
    callbacks = [guard_callback(lambda: bool(lease and lease.cancelled) or store.cancel_requested(job.id),
                                **interrupt_hooks()), SIGTERM_NOTED.callback(),
                 *([progress_callback(store, job.id, job.attempts), *fault_callbacks(store.job_dir(job.id))]
                   if launch else [])]  # rank 0: the step count for status, and the test faults (none in normal use)
    with ranks as started:
        return fit(p.method, module, student, p.data, train, recipe.data.batch_size, job_dir=job_dir,
                   logger=logger, progress=progress, callbacks=callbacks, ckpt_path=ckpt,
                   fence=lease.holds if lease else None, before_fit=started.wait_ready)


def run_rank(job_id: str, store: JobStore) -> None:
    """A non-zero training rank: same preparation, training only (rank 0 evaluates and tracks)."""
    from athanor.jobs.fault_hooks import fault_hook

    job = store.get(job_id)
    fault_hook("rank")  # a test's 'fail:rank': this rank dies before it joins the others
    _train(prepare(job), job, store, logger=False, progress=False, launch=False, arm=os.environ.get(ARM_ENV, ""))


class JobRun:
    """Rank 0's stages of one job, each a method; `run()` calls them in order and returns the result."""

    def __init__(self, job: Job, store: JobStore, *, progress: bool) -> None:
        self.job, self.store, self.progress = job, store, progress
        self.job_dir = store.job_dir(job.id)
        self.partial = self.job_dir / "export.partial"
        self.export_dir = self.job_dir / "export"
        self.threads = _torch_threads()  # before Lightning's launcher changes it; timings use this count
        self.tracker: Any = None
        self.lease: JobLease | None = None
        self.samples: dict[str, dict[str, Any]] = {}  # side -> its per-sample metrics (for the intervals)
        self.verdict: Any = None  # the promotion gate's, once before and after are measured
        self.started = time.time()

    def run(self) -> None:
        """Every stage in order, ending with the job SUCCEEDED; a cancel is honoured at each boundary."""
        self.stage("prepare")
        p = prepare(self.job)
        recipe = p.loaded.recipe
        self.stage("tracking")
        self.start_tracking(p)
        untrained = copy.deepcopy(p.student) if recipe.eval.include_untrained else None
        results = Results(params={"teacher": count_params(p.method.teacher_model(p.teacher)),
                                  "student": count_params(p.student)})
        self.stage("before")
        results.before = self.evaluate(p, p.method.teacher_model(p.teacher), "before")
        if untrained is not None:
            results.untrained = self.evaluate(p, untrained, "untrained")
        self.stage("train")
        student = self.train(p)
        self.stage("after")
        results.after = self.evaluate(p, student, "after")
        check_finite(p.method, results.after)
        self.stage("arms")
        self.train_arms(p, results)
        self.stage("timing")
        self.time_side_by_side(p, student, untrained, results)
        results.intervals = interval_table(self.samples, seed=recipe.train.seed)
        self.verdict = judge(recipe.gate, p.method.metrics, results.before, results.after, results.speedup)
        results.gate = self.verdict.as_result()
        log.info("%s", self.verdict.line())
        self.stage("track")
        self.track_results(p, results)
        self.stage("export")
        self.export(p, student, results)
        self.stage("register")  # the last point a cancel stops the job: registration completes or is undone
        with signals_deferred():
            self.register_and_finish(p, results)

    def stage(self, name: str) -> None:
        """A stage boundary: test faults fire here, and a requested cancel stops the job."""
        self.hook(name)
        if self.lease is not None:
            self.lease.check(name)
        self.store.report_progress(self.job.id, self.job.attempts, stage=name, progress_step=None, progress_total=None)

    def holds(self) -> bool:
        """This attempt still holds the job (its lease was not lost)."""
        return self.lease is None or not self.lease.lost

    def hook(self, stage: str) -> None:
        # why: lightning loads once the job's lease heartbeats (a slow import must not let a short lease lapse)
        from athanor.jobs.fault_hooks import fault_hook

        fault_hook(stage, self.lease)

    def start_tracking(self, p: Prepared) -> None:
        recipe, job = p.loaded.recipe, self.job
        log.info("opening MLflow tracking (%s)", recipe.tracking.uri or "the home's embedded store")
        self.tracker = Tracker(self.store.home, recipe.tracking.uri, recipe.tracking.experiment or recipe.name)
        self.tracker.describe(job, p.loaded)
        if job.attempts > 1 and job.mlflow_run_id:  # a retry: the same parent run, its curves continue
            log.info("attempt %d of %d: continuing MLflow run %s", job.attempts, job.max_attempts, job.mlflow_run_id)
            self.tracker.resume_parent(job.mlflow_run_id, job.attempts)
            return
        run_id = self.tracker.start_parent(job, p.loaded, lineage_tags(job, recipe))
        self.store.update(job.id, mlflow_run_id=run_id)
        self.tracker.set_attempt(job.attempts)
        self.tracker.log_datasets(recipe.data, p.data.num_train_examples, recipe.eval.max_texts)

    def evaluate(self, p: Prepared, model: Any, side: str, args: Any = None) -> dict[str, float]:
        log.info("evaluating %s", {"before": "the teacher (before)", "after": "the converted model (after)",
                                   "untrained": "the untrained student"}.get(side, f"comparison arm {side}"))
        artifact_dir = self.job_dir / "artifacts" / side
        artifact_dir.mkdir(parents=True, exist_ok=True)
        metrics = p.method.evaluate(model, p.teacher, p.data, p.loaded.recipe.eval, args or p.loaded.args,
                                    artifact_dir)
        metrics = measured(p, model, side, metrics)  # + lm-evaluation-harness results (`eval.lm_eval`)
        values, self.samples[side] = split(metrics)
        return values

    def train_arms(self, p: Prepared, results: Results) -> None:
        train_arms(self, p, results)

    def train(self, p: Prepared) -> Any:
        recipe = p.loaded.recipe
        if not p.method.trains:
            log.info("training-free method: no training step")
            return p.student
        log.info("training for %d steps (%s)", recipe.train.max_steps, recipe.train.strategy)
        with self.tracker.system_metrics():
            student = _train(p, self.job, self.store, logger=self.tracker.lightning_logger(holds=self.holds),
                             progress=self.progress, lease=self.lease)
        if self.holds():  # an attempt that lost its job (re-queued while frozen) stops at the next stage
            self.tracker.log_training_curves()
        return student

    def time_side_by_side(self, p: Prepared, student: Any, untrained: Any, results: Results) -> None:
        """Teacher and student (and the untrained copy) timed interleaved in one measurement."""
        spec, args = p.loaded.recipe.eval, p.loaded.args
        models = {"before": p.method.teacher_model(p.teacher), "after": student}
        if untrained is not None:
            models["untrained"] = untrained
        log.info("timing %s side by side (%d rounds, %d threads)", " and ".join(models), spec.latency_repeats,
                 self.threads)
        probes = {side: p.method.speed_probe(model, p.teacher, p.data, spec, args) for side, model in models.items()}
        ms = interleaved_latency(probes, repeats=spec.latency_repeats, threads=self.threads)
        results.before["latency_ms"], results.after["latency_ms"] = ms["before"], ms["after"]
        if results.untrained is not None:
            results.untrained["latency_ms"] = ms["untrained"]
        results.speedup = ms["before"] / ms["after"] if ms["after"] > 0 else float("nan")
        check_same_keys(p.loaded.recipe.method, results)

    def track_results(self, p: Prepared, results: Results) -> None:
        self.tracker.log_child("baseline", results.before)
        self.tracker.log_child("converted", results.after)
        if results.untrained is not None:
            self.tracker.log_child("untrained", results.untrained)
        self.tracker.log_metrics({f"compare/{k}": v for k, v in results.comparison.items()})
        self.tracker.log_comparison(results)
        artifacts = self.job_dir / "artifacts"
        if any(f.is_file() for f in artifacts.rglob("*")):
            self.tracker.log_artifact(artifacts, "samples")

    def export(self, p: Prepared, student: Any, results: Results) -> None:
        """Write into export.partial, add the model card, then rename: never a half-written export."""
        log.info("exporting")
        shutil.rmtree(self.partial, ignore_errors=True)
        self.partial.mkdir(parents=True)
        p.method.export(student, p.teacher, self.partial, p.loaded.args)
        card = write_model_card(self.partial, recipe=p.loaded.recipe, job_id=self.job.id, results=results,
                                trains=p.method.trains)
        self.tracker.log_artifact(card, "model_card")
        shutil.rmtree(self.export_dir, ignore_errors=True)
        self.partial.rename(self.export_dir)

    def register_and_finish(self, p: Prepared, results: Results) -> None:
        """Register, close the run, write SUCCEEDED; if anything after the new version fails, undo it."""
        recipe = p.loaded.recipe
        registration = None
        verdict = self.verdict
        if recipe.registry.enabled:
            log.info("registering %s", recipe.registry.name)
            if self.job.attempts > 1:  # a version an earlier attempt created before it died is not this job's result
                drop_job_versions(self.tracker, recipe.registry.name, self.job.id)
            registration = register(self.tracker, export_dir=self.export_dir, method=p.method,
                                    name=recipe.registry.name, alias=recipe.registry.alias if verdict.passed else None,
                                    tags={**lineage_tags(self.job, recipe), **version_tags(results, verdict)},
                                    hook=self.hook)
        else:
            self.tracker.log_artifact(self.export_dir, "export")
        try:
            self.hook("finish")
            result = job_result(results, registry=recipe.registry, version=registration.version if registration
                                else None, export=self.export_dir, attempts=self.job.attempts, started=self.started)
            if not self.store.finish(self.job.id, "SUCCEEDED", result=result, attempt=self.job.attempts,
                                     model_version=registration.version if registration else None):
                raise RuntimeError("the job row was finished elsewhere (its lease was reaped); result discarded")
        except BaseException:
            if registration is not None:
                undo(self.tracker, registration)
            raise
        self.tracker.finish("SUCCEEDED")


def execute(job_id: str, store: JobStore, *, progress: bool = True, engine: bool = False) -> Job:
    """Run the claimed (RUNNING) attempt of a job to a final status. Never raises for job failures. Nothing is
    written once the attempt lost its lease (its job was re-queued, perhaps running again elsewhere). Under a
    cluster engine (`engine`) SIGTERM is the engine's (pre-emption, scancel), not a cancel: its job state decides."""
    job = store.get(job_id)
    store.update(job.id, pid=os.getpid())
    run, noted = JobRun(job, store, progress=progress), SIGTERM_NOTED
    with (_job_log(job, store), JobLease(store, job.id, attempt=job.attempts) as lease,
          noted.installed() if engine else sigterm_cancels(lease)):
        run.lease = lease
        try:
            run.run()
        except BaseException as exc:  # noqa: BLE001 — every outcome ends in a final status
            if engine and (why := engine_stopped(exc, noted.seen)):
                log.warning("%s; the engine's job state decides what comes next", why)
                raise SystemExit(143) from None
            if disk_full(exc) is not None:  # space first: the final status must still be written
                remove_partial_writes(run.job_dir)
            status, error = outcome(exc, job, run.tracker)
            if run.tracker is not None and run.tracker.lost and job.attempts < job.max_attempts:
                # The tracking server went away mid-job: the kept checkpoint resumes in the next attempt.
                store.retry_or_finish(job.id, job.attempts, error)
            elif store.finish(job.id, status, error=error, attempt=job.attempts) and run.tracker is not None:
                _close(run.tracker, status)
            if not isinstance(exc, (Exception, JobStopped, KeyboardInterrupt)):
                raise
        finally:
            now = store.get(job.id)
            if now.attempts == job.attempts and not lease.lost:  # the job folder is still this attempt's
                shutil.rmtree(run.partial, ignore_errors=True)
                if now.status != "SUCCEEDED":  # no export that looks like a result of a failed job
                    shutil.rmtree(run.export_dir, ignore_errors=True)
    return store.get(job.id)


def _torch_threads() -> int:
    return torch.get_num_threads()


@contextlib.contextmanager
def _job_log(job: Job, store: JobStore) -> Iterator[None]:
    handler = logging.FileHandler(job.log_path or store.job_dir(job.id) / "job.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        yield
    finally:
        root.removeHandler(handler)
        handler.close()


def _close(tracker: Any, status: str) -> None:
    try:
        tracker.finish(status)
    except Exception:  # tracking must not hide the job's own outcome
        log.exception("could not close the MLflow run")
