"""What `athanor submit --wait` shows while the job runs in the foreground: the spine's stage lines (loading the
teacher, before, training with its progress bar, after, timing, export, registration) and nothing from third
parties. Lightning's and MLflow's own console lines (device banners, the litlogger tip, database migrations) and
Python warnings (deprecations, "N modules in eval mode", the srun hint) go to the job's log instead, where they
stay readable; `-v` shows them on the console as before.

    .venv/bin/python -m pytest tests/jobs/test_cli_exit.py -q -k wait_shows_stages
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator
from typing import Any, TextIO

import lightning.pytorch  # noqa: F401 — installs its console handler on import: before foreground() runs
from lightning.pytorch.callbacks.progress import ProgressBar
from tqdm import tqdm

THIRD_PARTY = ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning", "lightning_fabric",
               "mlflow", "alembic", "deepspeed", "torch.distributed")
"""Loggers that print to the console by themselves (their own handlers) during a job."""


class StageLines(logging.Handler):
    """athanor's INFO records as 'HH:MM:SS message' on the console (the same records also reach the job log)."""

    def __init__(self, stream: TextIO) -> None:
        super().__init__(logging.INFO)
        self.stream = stream
        self.setFormatter(logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.stream.write(self.format(record) + "\n")
            self.stream.flush()
        except (OSError, ValueError):  # a closed pipe must not fail the job
            pass


def _console_handlers(logger: logging.Logger) -> list[logging.Handler]:
    return [h for h in logger.handlers
            if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)]


@contextlib.contextmanager
def foreground(verbose: bool = False, stream: TextIO | None = None) -> Iterator[None]:
    """Stage lines on `stream` (stdout; stderr when stdout carries JSON); unless `verbose`, third-party console
    output and warnings are sent to the logging tree (the job log) instead of the console."""
    stages = StageLines(stream or sys.stdout)
    athanor = logging.getLogger("athanor")
    athanor.addHandler(stages)
    saved: list[tuple[logging.Logger, list[logging.Handler], bool]] = []
    if not verbose:
        # why: the ranks import this module (step_bar) without mlflow; loaded here before its handler moves
        import mlflow  # noqa: F401

        # Lightning's and MLflow's loggers print through their own handlers and do not propagate; the job log (a
        # handler on the root logger) gets their records once they propagate without those handlers.
        for name in THIRD_PARTY:
            logger = logging.getLogger(name)
            handlers = _console_handlers(logger)
            saved.append((logger, handlers, logger.propagate))
            for handler in handlers:
                logger.removeHandler(handler)
            logger.propagate = True
    # warnings.warn -> the `py.warnings` logger -> the job log (a handler on the root logger while the job runs); the
    # null handler keeps logging's last-resort handler from printing one raised before that handler exists.
    captured, quiet = logging.getLogger("py.warnings"), logging.NullHandler()
    if not verbose:
        logging.captureWarnings(True)
        captured.addHandler(quiet)
    try:
        yield
    finally:
        logging.captureWarnings(False)
        captured.removeHandler(quiet)
        athanor.removeHandler(stages)
        for logger, handlers, propagate in saved:
            for handler in handlers:
                logger.addHandler(handler)
            logger.propagate = propagate


def step_bar(refresh_steps: int = 1) -> Any:
    """The training bar of a foreground job: optimizer steps out of train.max_steps (Lightning's own bar counts
    batches per epoch, which says little when training stops at a step count), on stderr, with the metrics the
    module shows on its progress bar. Rank 0 only (Lightning disables it on the others)."""
    class StepBar(ProgressBar):
        def __init__(self) -> None:
            super().__init__()
            self.enabled, self.bar = True, None

        def disable(self) -> None:
            self.enabled = False

        def enable(self) -> None:
            self.enabled = True

        def on_train_start(self, trainer: Any, pl_module: Any) -> None:
            if self.enabled and trainer.max_steps > 0:
                self.bar = tqdm(total=trainer.max_steps, initial=trainer.global_step, desc="training", unit="step",
                                file=sys.stderr, dynamic_ncols=True)

        def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            if self.bar is not None and (trainer.global_step - self.bar.n >= refresh_steps
                                         or trainer.global_step >= trainer.max_steps):
                self.bar.update(trainer.global_step - self.bar.n)
                shown = {k: v for k, v in self.get_metrics(trainer, pl_module).items() if k != "v_num"}
                if shown:
                    self.bar.set_postfix(shown, refresh=False)

        def on_train_end(self, trainer: Any, pl_module: Any) -> None:
            if self.bar is not None:
                self.bar.update(trainer.global_step - self.bar.n)
                self.bar.close()
                self.bar = None

    return StepBar()
