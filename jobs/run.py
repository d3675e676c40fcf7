"""The sequence of one job: load → convert → evaluate before → train → evaluate after → export →
track → register. The only module that knows the order; methods only answer the protocol calls.

Run by `athanor worker` (one process per job) or in the foreground by `athanor submit --wait`.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distill.spec import RecipeError
from jobs.recipe import LoadedRecipe, RecipeInvalid, load_recipe, resolve_relative
from jobs.store import Job, JobStore

log = logging.getLogger("athanor.job")


class JobStopped(BaseException):
    """Raised inside the job process when it is cancelled (SIGTERM)."""


@dataclass
class Prepared:
    loaded: LoadedRecipe
    method: Any
    teacher: Any
    student: Any
    data: Any


def count_params(model: Any) -> int:
    return sum(p.numel() for p in model.parameters())


def _loaded_for(job: Job) -> LoadedRecipe:
    path = Path(job.recipe_path) if job.recipe_path else None
    loaded = load_recipe(path, text=job.recipe_text, overrides=job.overrides)
    recipe = loaded.recipe
    recipe.data.paths = [resolve_relative(p, path) for p in recipe.data.paths]
    if recipe.eval.sts_file:
        recipe.eval.sts_file = resolve_relative(recipe.eval.sts_file, path)
    return loaded


def prepare(job: Job) -> Prepared:
    """Everything every rank needs: recipe, method, teacher, initial student, data."""
    import lightning as L

    from jobs.methods import get_method
    from jobs.sources import resolve_source

    loaded = _loaded_for(job)
    recipe = loaded.recipe
    L.seed_everything(recipe.train.seed, verbose=False)
    method = get_method(recipe.method)
    base = Path(job.recipe_path).parent if job.recipe_path else None
    log.info("loading teacher %s", recipe.teacher.source or "from inline config")
    teacher = method.load_teacher(resolve_source(recipe.teacher, "teacher", base=base))
    log.info("building student")
    student = method.convert(teacher, loaded.student, loaded.args)
    log.info("preparing data")
    data = method.data(teacher, recipe.data, loaded.args)
    return Prepared(loaded, method, teacher, student, data)


def _train(p: Prepared, job: Job, store: JobStore, *, logger: Any, progress: bool, launch: bool = True) -> Any:
    """Train; rank 0 (`launch`) starts the other ranks of this node, which call this with launch=False."""
    import contextlib

    from jobs.trainer import fit, launched_ranks

    recipe = p.loaded.recipe
    module = p.method.lightning_module(p.teacher, p.student, p.data, p.loaded.args, recipe.train)
    job_dir = store.job_dir(job.id)
    ranks = launched_ranks(recipe.train, job.id, store.home, job_dir) if launch else contextlib.nullcontext()
    with ranks:
        return fit(p.method, module, p.student, p.data, recipe.train, recipe.data.batch_size,
                   job_dir=job_dir, logger=logger, progress=progress)


def run_rank(job_id: str, store: JobStore) -> None:
    """A non-zero training rank: same preparation, training only (rank 0 evaluates and tracks)."""
    job = store.get(job_id)
    _train(prepare(job), job, store, logger=False, progress=False, launch=False)


def _evaluate(p: Prepared, model: Any, artifact_dir: Path) -> dict[str, float]:
    p.method.artifact_dir = artifact_dir
    return {k: float(v) for k, v in p.method.evaluate(model, p.teacher, p.data, p.loaded.recipe.eval, p.loaded.args).items()}


def execute(job_id: str, store: JobStore, *, progress: bool = True) -> Job:
    """Run a claimed (RUNNING) job to a final status. Never raises for job failures."""
    job = store.get(job_id)
    job_dir = store.job_dir(job.id)
    handler = logging.FileHandler(job.log_path or job_dir / "job.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(handler)
    logging.getLogger().setLevel(logging.INFO)
    previous = signal.signal(signal.SIGTERM, _raise_stopped)
    store.update(job.id, pid=os.getpid())
    tracker = None
    partial = job_dir / "export.partial"
    started = time.time()
    try:
        p = prepare(job)
        recipe = p.loaded.recipe
        from jobs.tracking import Tracker

        tracker = Tracker(store.home, recipe.tracking.uri, recipe.tracking.experiment or recipe.name)
        run_id = tracker.start_parent(job, p.loaded)
        store.update(job.id, mlflow_run_id=run_id)
        artifact_dir = job_dir / "artifacts"
        artifact_dir.mkdir(exist_ok=True)

        teacher_model = p.method.teacher_model(p.teacher)
        params = {"teacher": count_params(teacher_model), "student": count_params(p.student)}
        log.info("evaluating the teacher (before)")
        before = _evaluate(p, teacher_model, artifact_dir / "before")
        tracker.log_child("baseline", before)

        student = p.student
        if p.method.trains:
            log.info("training for %d steps (%s)", recipe.train.max_steps, recipe.train.strategy)
            student = _train(p, job, store, logger=tracker.lightning_logger(), progress=progress)
            tracker.log_training_curves()
        log.info("evaluating the converted model (after)")
        after = _evaluate(p, student, artifact_dir / "after")
        if set(before) != set(after):
            raise RuntimeError(f"method {recipe.method} returned different metric keys before/after: "
                               f"{sorted(set(before) ^ set(after))}")
        tracker.log_child("converted", after)
        tracker.log_comparison(before, after)
        if any(artifact_dir.rglob("*")):
            tracker.log_artifact(artifact_dir, "samples")

        log.info("exporting")
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        p.method.export(student, p.teacher, partial, p.loaded.args)
        from jobs.registry import register, write_model_card

        card = write_model_card(partial, recipe=recipe, job_id=job.id, params=params, before=before, after=after)
        tracker.log_artifact(card, "model_card")
        export_dir = job_dir / "export"
        shutil.rmtree(export_dir, ignore_errors=True)
        partial.rename(export_dir)

        version = None
        if recipe.registry.enabled:
            log.info("registering %s", recipe.registry.name)
            headline = {f"after.{k}": f"{v:.6g}" for k, v in list(after.items())[:8]}
            tags = {"athanor.job_id": job.id, "athanor.recipe_hash": job.recipe_hash, "athanor.method": recipe.method,
                    "athanor.teacher": recipe.teacher.source or "inline config", **headline}
            version = register(tracker, export_dir=export_dir, flavor=p.method.mlflow_flavor,
                               task=p.method.mlflow_task, name=recipe.registry.name, alias=recipe.registry.alias, tags=tags)
        else:
            tracker.log_artifact(export_dir, "export")
        tracker.finish("SUCCEEDED")
        result = {"before": before, "after": after, "params": params, "export": str(export_dir),
                  "registered": {"name": recipe.registry.name, "version": version, "alias": recipe.registry.alias}
                  if version else None, "seconds": round(time.time() - started, 1)}
        store.finish(job.id, "SUCCEEDED", result=result, model_version=version)
    except JobStopped:
        log.warning("job cancelled")
        _close(tracker, "STOPPED")
        store.finish(job.id, "STOPPED", error="cancelled")
    except KeyboardInterrupt:
        log.warning("job interrupted")
        _close(tracker, "STOPPED")
        store.finish(job.id, "STOPPED", error="interrupted (Ctrl-C)")
    except (RecipeError, RecipeInvalid) as exc:
        log.error("recipe error: %s", exc)
        _close(tracker, "FAILED")
        store.finish(job.id, "FAILED", error=str(exc))
    except Exception as exc:
        log.error("job failed:\n%s", traceback.format_exc())
        _close(tracker, "FAILED")
        first = (str(exc).strip().splitlines() or [""])[0]
        store.finish(job.id, "FAILED", error=f"{type(exc).__name__}: {first} (full traceback in {job.log_path})")
    finally:
        shutil.rmtree(partial, ignore_errors=True)
        if store.get(job.id).status != "SUCCEEDED":  # no export that looks like a result of a failed job
            shutil.rmtree(job_dir / "export", ignore_errors=True)
        signal.signal(signal.SIGTERM, previous)
        logging.getLogger().removeHandler(handler)
        handler.close()
    return store.get(job.id)


def _raise_stopped(signum: int, frame: Any) -> None:
    raise JobStopped()


def _close(tracker: Any, status: str) -> None:
    if tracker is not None:
        try:
            tracker.finish(status)
        except Exception:  # tracking must not hide the job's own outcome
            log.exception("could not close the MLflow run")
