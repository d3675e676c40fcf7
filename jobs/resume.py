"""Step checkpoints that a retried job resumes from, exactly where its killed attempt left off.

- `AtomicCheckpoint`: every `train.checkpoint_every_n_steps` optimizer steps, a checkpoint is written under
  `step=N.ckpt.<token>.tmp` (a file, or DeepSpeed's directory, by every rank), fsynced, then renamed by rank 0 to
  `step=N.ckpt`: a `*.ckpt` is always complete. Only the newest `train.keep_checkpoints` are kept. A `fence` (the
  job's lease) is checked before the rename: an attempt whose job was re-queued meanwhile (it was frozen, not
  dead) never publishes or deletes a checkpoint again.
- `ResumePosition`: what Lightning's checkpoint lacks for an exact resume. The training loader's position (the
  RNG state its current epoch's order was drawn from, and the batches of that epoch already trained on) and the
  global RNG states (dropout). Restored from the checkpoint, the loader replays that epoch's order and skips the
  batches done, and the RNG states are put back just before the first resumed step; the resumed run then computes
  what the uninterrupted one computes (bit-identical on CPU, tested).
- `resume_checkpoint`: the newest intact checkpoint of a job directory (leftover `*.tmp`, damaged and surplus
  checkpoints are removed first; every checkpoint is published with a manifest of its files' sizes and SHA-256,
  jobs/checkpoint_manifest.py, and one that no longer matches it is passed over, naming it), which
  `trainer.fit(ckpt_path=...)` restores: weights, optimizer, LR schedule, step counter, loops.

Tests: `.venv/bin/python -m pytest tests/jobs/test_resume.py -q`.
"""

from __future__ import annotations

import logging
import os
import random
import re
import secrets
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from weakref import proxy

import numpy as np
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from athanor.jobs import checkpoint_manifest as manifest

log = logging.getLogger("athanor.resume")

RESUME_ENV = "ATHANOR_RESUME_CKPT"
"""The checkpoint rank 0 resumes from, handed to the ranks it launches (empty: a fresh start)."""
_STEP = re.compile(r"step=(\d+)")


def checkpoint_step(path: Path) -> int:
    """The optimizer step in a checkpoint's name (`step=120.ckpt`), -1 when it has none."""
    found = _STEP.search(path.name)
    return int(found.group(1)) if found else -1


def complete_checkpoints(ckpt_dir: Path) -> list[Path]:
    """The complete checkpoints in `ckpt_dir` (renamed from `.tmp`), oldest step first."""
    if not ckpt_dir.is_dir():
        return []
    found = [p for p in ckpt_dir.iterdir() if p.name.endswith(".ckpt") and checkpoint_step(p) >= 0]
    return sorted(found, key=checkpoint_step)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _remove_checkpoint(path: Path) -> None:
    _remove(path)
    manifest.manifest_path(path).unlink(missing_ok=True)


def intact_checkpoints(ckpt_dir: Path) -> tuple[list[Path], dict[Path, str]]:
    """(the complete checkpoints whose files match their manifest, oldest first; the damaged ones and why)."""
    intact, damaged = [], {}
    for path in complete_checkpoints(ckpt_dir):
        if (reason := manifest.damage(path)) is None:
            intact.append(path)
        else:
            damaged[path] = reason
    return intact, damaged


def resume_checkpoint(ckpt_dir: Path, keep: int) -> Path | None:
    """The newest intact checkpoint in `ckpt_dir` (None: none, train from step 0), after removing partial `*.tmp`
    writes a killed attempt left, damaged checkpoints (each named in the log with what was wrong) and all but the
    newest `keep` intact ones."""
    if ckpt_dir.is_dir():
        for partial in ckpt_dir.glob("*.tmp"):
            log.info("removing the partial checkpoint %s", partial.name)
            _remove(partial)
    intact, damaged = intact_checkpoints(ckpt_dir)
    for path, reason in damaged.items():
        log.warning("checkpoint %s is damaged (%s): not resuming from it, removed", path.name, reason)
        _remove_checkpoint(path)
    for old in intact[:-keep]:
        _remove_checkpoint(old)
    if damaged:
        log.warning("falling back to %s", f"the newest intact checkpoint {intact[-1].name}" if intact
                    else "step 0: no intact checkpoint is left")
    return intact[-1] if intact else None


def _fsync(path: Path) -> None:
    """Flush a file (every file, for a directory) and the directory entries to disk."""
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    for name in [*files, path.parent]:
        fd = os.open(name, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def commit(partial: Path, final: Path, fence: Callable[[], bool] | None = None) -> bool:
    """Publish a completely written checkpoint: fsync, then rename `partial` to `final` (atomic on one file
    system). False, and the partial write removed, when `fence()` says this attempt no longer holds the job."""
    if fence is not None and not fence():
        log.error("not publishing checkpoint %s: this attempt no longer holds the job", final.name)
        _remove(partial)
        return False
    _fsync(partial)
    manifest.write(partial, final)  # sizes and checksums, published before the checkpoint they describe
    if final.exists():
        _remove(final)
    os.replace(partial, final)
    fd = os.open(final.parent, os.O_RDONLY)
    try:
        os.fsync(fd)  # the rename itself
    finally:
        os.close(fd)
    return True


class AtomicCheckpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint (newest `keep` by step) that writes `<name>.<token>.tmp` (a name of this fit's
    own) and renames it when complete. Once `fence()` fails, it writes and deletes nothing more."""

    def __init__(self, dirpath: Path, every_n_steps: int, keep: int, fence: Callable[[], bool] | None = None) -> None:
        super().__init__(dirpath=dirpath, filename="{step}", monitor="step", mode="max", save_top_k=keep,
                         every_n_train_steps=every_n_steps, save_last=False)
        self.fence, self.token, self.fenced_out = fence, "", False

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self.token = trainer.strategy.broadcast(secrets.token_hex(4))

    def _save_checkpoint(self, trainer: Any, filepath: str) -> None:
        if self.fenced_out:
            return
        partial = Path(f"{filepath}.{self.token}.tmp")
        trainer.save_checkpoint(partial, self.save_weights_only)  # every rank writes its part; ends in a barrier
        published = commit(partial, Path(filepath), self.fence) if trainer.is_global_zero else True
        self.fenced_out = not trainer.strategy.broadcast(published)
        self._last_global_step_saved = trainer.global_step
        self._last_checkpoint_saved = filepath
        if trainer.is_global_zero and published:
            for logger in trainer.loggers:
                logger.after_save_checkpoint(proxy(self))

    def save_now(self, trainer: Any) -> None:
        """A checkpoint of the current step outside the schedule (called on every rank together), unless this step
        has one already: what an interrupted job resumes from."""
        if self._last_global_step_saved != trainer.global_step:
            self._save_topk_checkpoint(trainer, self._monitor_candidates(trainer))

    def _should_remove_checkpoint(self, trainer: Any, previous: str, current: str) -> bool:
        """Also the checkpoint this fit resumed from (Lightning keeps it): it is loaded, and newer ones exist."""
        return previous != current and Path(self.dirpath).resolve() in Path(previous).resolve().parents

    def _remove_checkpoint(self, trainer: Any, filepath: str) -> None:
        if not self.fenced_out:  # an attempt that lost its job deletes nothing the next attempt may resume from
            super()._remove_checkpoint(trainer, filepath)
            if trainer.is_global_zero:
                manifest.manifest_path(Path(filepath)).unlink(missing_ok=True)


@dataclass
class _Position:
    """Shared by a resumable loader class and the copies Lightning makes of it (a distributed sampler swapped in)."""

    epoch_start: Any = None
    """RNG state (the loader's generator, else torch's global one) the current epoch's iterator started from."""
    loader: Any = None
    """The instance iterated last (Lightning may iterate a copy with a distributed sampler)."""
    pending: tuple[Any, int] | None = None
    """(RNG state, batches to skip) for the next iterator: set when resuming."""
    skipping: int = 0


class _Skipping:
    """An index sampler whose first pass skips `n` entries (batches); later passes (persistent workers) do not."""

    def __init__(self, base: Any, n: int) -> None:
        self.base, self.n = base, n

    def __iter__(self) -> Iterator[Any]:
        # A generator: nothing is drawn before the DataLoader's iterator takes its base seed, as without skipping.
        n, self.n = self.n, 0
        it = iter(self.base)
        for _ in range(n):
            next(it, None)
        yield from it

    def __len__(self) -> int:
        return len(self.base)


def resumable_loader(loader: Any) -> tuple[Any, ResumePosition]:
    """`loader` (a DataLoader) made resumable in place, and the callback that saves and restores its position.

    Its class becomes a subclass (adding no instance state, so the object keeps its own) that records the RNG
    state each epoch's order is drawn from and, on resume, replays that order, skipping the batches already
    trained on (their indices only: no data is loaded). The position lives with the class: copies Lightning makes
    of the loader (a distributed sampler swapped in) share it."""
    position = _Position()

    def __iter__(self: Any) -> Any:
        source = getattr(self, "generator", None)
        if position.pending is not None:
            (state, position.skipping), position.pending = position.pending, None
            if state is not None:
                source.set_state(state) if source is not None else torch.set_rng_state(state)
        position.epoch_start = source.get_state() if source is not None else torch.get_rng_state()
        position.loader = self
        try:
            return super(resumable, self).__iter__()
        finally:
            position.skipping = 0

    def index_sampler(self: Any) -> Any:
        base = super(resumable, self)._index_sampler
        return _Skipping(base, position.skipping) if position.skipping else base

    def state_dict(self: Any) -> dict[str, Any]:  # Lightning's resumable-loader interface; ResumePosition saves it
        return {}

    def load_state_dict(self: Any, state: dict[str, Any]) -> None:
        pass

    cls = type(loader)
    resumable = type(f"Resumable{cls.__name__}", (cls,),
                     {"__iter__": __iter__, "_index_sampler": property(index_sampler), "state_dict": state_dict,
                      "load_state_dict": load_state_dict, "__module__": __name__})
    try:
        loader.__class__ = resumable
    except TypeError:  # a loader class with its own slots: it resumes with the right weights, not the data order
        log.warning("%s cannot be made resumable: a resumed run sees other batches than an uninterrupted one",
                    cls.__name__)
    return loader, ResumePosition(position)


class ResumePosition(Callback):
    """Saves the loader position and the RNG states in each checkpoint; restores them when fit resumes from one."""

    def __init__(self, position: _Position) -> None:
        self.position = position
        self.trainer: Any = None
        self._rng_to_restore: dict[str, Any] | None = None

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self.trainer = trainer

    def state_dict(self) -> dict[str, Any]:
        trainer = self.trainer
        done = trainer.fit_loop.epoch_loop.batch_progress.current.ready
        if done >= trainer.num_training_batches:  # saved at the last batch: the next epoch starts afresh
            source = getattr(self.position.loader, "generator", None)
            state, done = (source.get_state() if source is not None else torch.get_rng_state()), 0
        else:
            state = self.position.epoch_start
        return {"epoch_start_rng": state, "batches_done": done, "rng": rng_states()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.position.pending = (state_dict["epoch_start_rng"], int(state_dict["batches_done"]))
        self._rng_to_restore = state_dict["rng"]

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        """After the loader's first iterator exists, before any hook of the first resumed step."""
        if self._rng_to_restore is not None:
            set_rng_states(self._rng_to_restore)
            self._rng_to_restore = None


def rng_states() -> dict[str, Any]:
    """torch (CPU and CUDA), numpy and Python global RNG states, as types `torch.load(weights_only=True)` reads."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)],
            "python": random.getstate()}


def set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    kind, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, state, gauss = states["python"]
    random.setstate((version, tuple(state), gauss))


def resume_from(ckpt_dir: Path, keep: int, attempt: int, *, rank0: bool) -> Path | None:
    """The checkpoint this process's fit resumes from: none on a first attempt; on a later one the newest complete
    checkpoint (rank 0 tidies the folder first, then hands its choice to the ranks it launches in RESUME_ENV;
    a rank started elsewhere, on another node sharing the job folder, finds the same newest one)."""
    if not rank0 and RESUME_ENV in os.environ:
        return Path(os.environ[RESUME_ENV]) if os.environ[RESUME_ENV] else None
    if attempt <= 1:
        return None
    if rank0:
        found = resume_checkpoint(ckpt_dir, keep)
    else:
        found = (intact_checkpoints(ckpt_dir)[0] or [None])[-1]
    log.info("attempt %d: %s", attempt, f"resuming from {found}" if found else "no checkpoint; training from step 0")
    return found
