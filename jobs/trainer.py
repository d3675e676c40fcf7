"""Lightning Trainer from a recipe's `train:` section, and the launch of extra ranks.

Multi-process runs are launched by us (one `python -m athanor.jobs.worker --rank` process per extra rank,
torchrun-style environment), never by Lightning re-executing the CLI command line. DeepSpeed on
CPU (testing, CI) uses `CPUDeepSpeedStrategy`: Lightning 2.6 refuses DeepSpeed without CUDA.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib
import logging
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from lightning.fabric.utilities.seed import reset_seed
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins.environments import SLURMEnvironment
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy

from athanor.distill.spec import STEPS_MAX, TrainSpec
from athanor.jobs.console import step_bar
from athanor.jobs.launchers import RANKS_LAUNCHED_ENV, slurm_task
from athanor.jobs.prefork import ForkedJob, Prefork
from athanor.jobs.resume import AtomicCheckpoint, resumable_loader

CHECKPOINTS = "checkpoints"
"""A job's (or comparison arm's) step checkpoints: `<job dir>/checkpoints/step=N.ckpt`."""


def use_gpu(train: TrainSpec) -> bool:
    return train.accelerator == "gpu" or (train.accelerator == "auto" and torch.cuda.is_available())


def world_size(train: TrainSpec) -> int:
    return train.devices * train.num_nodes


def _cpu_deepspeed_strategy_cls():
    class CPUDeepSpeedStrategy(DeepSpeedStrategy):
        """DeepSpeed ZeRO over gloo on CPU processes (DS_ACCELERATOR=cpu)."""

        def setup_environment(self) -> None:
            # Skip DeepSpeedStrategy's CUDA check; set up like DDP, then DeepSpeed's own init.
            DDPStrategy.setup_environment(self)

        def setup_distributed(self) -> None:
            reset_seed()
            self.set_world_ranks()
            # DeepSpeed JIT-compiles a shared-memory all-reduce for CPU ranks on first use: ~40 s of C++ on 2 cores,
            # a compiler at run time, and again for every new install path. CPU ranks serve tests and small runs,
            # where gloo's all-reduce (what DeepSpeed falls back to without the op) is enough.
            # (`import deepspeed.comm.torch as m` would bind PyTorch itself: the package has a `torch` attribute.)
            for module, builder in (("deepspeed.comm.torch", "build_shm_op"), ("deepspeed.comm.ccl", "build_ccl_op")):
                setattr(importlib.import_module(module), builder, lambda: None)
            self._init_deepspeed_distributed()

        def _setup_model_and_optimizer(self, model, optimizer, lr_scheduler=None):
            # why: optional dependency (DeepSpeed strategies only)
            import deepspeed

            engine, ds_optimizer, _, _ = deepspeed.initialize(
                args=argparse.Namespace(device_rank=self.local_rank),
                config=self.config,
                model=model,
                model_parameters=[p for p in model.parameters() if p.requires_grad],
                optimizer=optimizer,
                lr_scheduler=lr_scheduler,
                dist_init_required=False,
            )
            return engine, ds_optimizer

    return CPUDeepSpeedStrategy


def build_strategy(train: TrainSpec, micro_batch_size: int) -> Any:
    gpu = use_gpu(train)
    if train.strategy == "ddp":
        # Multi-stage methods (teacher assistant, SentenceVAE stages) leave parameters without
        # gradients in some steps; DDP must expect that.
        return DDPStrategy(process_group_backend="nccl" if gpu else "gloo", find_unused_parameters=True)
    if train.strategy.startswith("deepspeed"):
        if not gpu:
            os.environ.setdefault("DS_ACCELERATOR", "cpu")

        stage = int(train.strategy[-1])
        config = {
            "zero_optimization": {"stage": stage},
            "train_micro_batch_size_per_gpu": micro_batch_size,
            "zero_allow_untested_optimizer": True,
        }
        if train.gradient_clip_val:
            config["gradient_clipping"] = train.gradient_clip_val
        if train.precision.startswith("bf16"):
            config["bf16"] = {"enabled": True}
        elif train.precision.startswith("16"):
            config["fp16"] = {"enabled": True}
        cls = DeepSpeedStrategy if gpu else _cpu_deepspeed_strategy_cls()
        return cls(config=config, process_group_backend="nccl" if gpu else "gloo")
    return "auto"


def build_trainer(train: TrainSpec, *, job_dir: Path, micro_batch_size: int, logger: Any = False,
                  progress: bool = True, callbacks: list | None = None, fence: Callable[[], bool] | None = None):
    """The Trainer; with `train.checkpoint_every_n_steps`, atomic step checkpoints in `job_dir/checkpoints` (the
    newest `train.keep_checkpoints`), each published only while `fence()` holds (see jobs/resume.py)."""
    callbacks = list(callbacks or [])
    # Under Slurm a job checkpoints when warned of its end (time limit, pre-emption), even without periodic ones.
    every = train.checkpoint_every_n_steps or (STEPS_MAX if slurm_task() else None)
    if every:
        callbacks.append(AtomicCheckpoint(job_dir / CHECKPOINTS, every, train.keep_checkpoints, fence))
    if progress:
        callbacks.append(step_bar(max(1, train.log_every_n_steps)))  # optimizer steps of train.max_steps
    plugins = []
    if slurm_task():
        plugins.append(SLURMEnvironment(auto_requeue=False))  # ranks from Slurm; requeueing is athanor's (launchers)
    deepspeed = train.strategy.startswith("deepspeed")
    precision = train.precision
    if deepspeed and not use_gpu(train):
        precision = "32-true"  # DeepSpeed's CPU path trains in fp32; mixed precision needs CUDA
    return L.Trainer(
        accelerator="gpu" if use_gpu(train) else "cpu",
        devices=train.devices,
        num_nodes=train.num_nodes,
        strategy=build_strategy(train, micro_batch_size),
        precision=precision,
        max_steps=train.max_steps,
        accumulate_grad_batches=train.accumulate_grad_batches,
        gradient_clip_val=None if deepspeed else train.gradient_clip_val,
        log_every_n_steps=train.log_every_n_steps,
        logger=logger,
        callbacks=callbacks,
        plugins=plugins,
        enable_checkpointing=bool(every),
        enable_progress_bar=progress,
        enable_model_summary=False,
        default_root_dir=str(job_dir),
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


RANK_SERVER: Prefork | None = None
"""The server (jobs/prefork.py) that `rank_server` forked before the job started any thread: the other ranks of this
node are forked from it, in the job's process group, without re-importing the libraries."""


@contextlib.contextmanager
def rank_server(train: TrainSpec) -> Iterator[None]:
    """While open, this node's other ranks are forked from a server forked on entry (RANK_SERVER): enter it before
    the process starts any thread. Nothing to do for one rank, or under a cluster engine (it starts every rank)."""
    global RANK_SERVER
    if train.launcher != "local" or train.devices <= 1 or RANK_SERVER is not None:
        yield
        return
    RANK_SERVER = Prefork.start(fresh_athanor=False)  # the ranks run the job's own modules
    try:
        yield
    finally:
        if RANK_SERVER is not None:
            RANK_SERVER.close()
        RANK_SERVER = None


def _start_rank(job_id: str, env: dict[str, str], log_path: Path) -> ForkedJob | subprocess.Popen:
    argv = ["athanor.jobs.worker", "--rank", job_id]
    proc = (RANK_SERVER.launch(argv, env, log_path, new_session=False)
            if RANK_SERVER is not None and RANK_SERVER.alive else None)
    how = "forked from the rank server"
    if proc is None:
        with open(log_path, "ab") as log:
            proc = subprocess.Popen([sys.executable, "-m", *argv], env=env, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=False)
        how = "a fresh interpreter"
    logging.getLogger("athanor.job").info("rank %s: process %d, %s; log: %s", env["RANK"], proc.pid, how, log_path)
    return proc


RENDEZVOUS_SECONDS = 1800.0
"""How long rank 0 waits for the ranks it started to reach training: torch's default process-group timeout."""
RANK_READY_ENV = "ATHANOR_RANK_READY"
"""Set by rank 0 for each rank it starts: the file that rank creates just before it joins the process group."""


@dataclass
class LocalRanks:
    """The ranks this node's rank 0 started (local ranks 1..N-1): global rank, process, log, and the file each
    creates once it is about to join the process group."""

    ranks: list[int] = field(default_factory=list)
    procs: list[ForkedJob | subprocess.Popen] = field(default_factory=list)
    logs: list[Path] = field(default_factory=list)
    ready: list[Path] = field(default_factory=list)

    def wait_ready(self, poll_seconds: float = 0.2, timeout_seconds: float = RENDEZVOUS_SECONDS) -> None:
        """Rank 0, before it joins the process group: return once every started rank is about to join it too, and
        raise at once, naming the rank, when one exited first. Why: a rank that dies before the rendezvous (an
        import error, a missing file on its side, out of memory) would leave rank 0 waiting there until the
        process group's timeout instead of failing the job now. A rank still preparing after `timeout_seconds`
        (the process group's own timeout) fails the job too."""
        deadline = time.monotonic() + timeout_seconds
        while not all(path.exists() for path in self.ready):
            for rank, proc, log_path, path in zip(self.ranks, self.procs, self.logs, self.ready):
                if path.exists():
                    continue
                if (code := proc.poll()) is not None:
                    raise RuntimeError(f"training rank {rank} exited with code {code} before joining the other "
                                       f"ranks; see {log_path}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"training rank {rank} did not reach training within {timeout_seconds:.0f} s; "
                                       f"see {log_path}")
            time.sleep(poll_seconds)


def mark_rank_ready() -> None:
    """A started rank, just before it joins the process group: tell rank 0 it got there (see LocalRanks)."""
    if path := os.environ.get(RANK_READY_ENV):
        Path(path).touch()


@contextlib.contextmanager
def launched_ranks(train: TrainSpec, job_id: str, home: Path, log_dir: Path,
                   extra_env: dict[str, str] | None = None) -> Iterator[LocalRanks]:
    """Start ranks 1..N-1 of this node for `job_id` and set rank 0's environment (torchrun-style);
    `extra_env` goes to the started ranks only. Rank 0 calls the yielded `wait_ready()` before it joins them.

    Multi-node: every node runs `athanor worker --rank` itself; here NODE_RANK, MASTER_ADDR and
    MASTER_PORT are taken from the environment when set.
    """
    n_local = train.devices
    if world_size(train) == 1 or os.environ.get(RANKS_LAUNCHED_ENV):  # a cluster engine started every rank
        yield LocalRanks()
        return
    env_keys = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK", "DS_ACCELERATOR")
    saved = {k: os.environ.get(k) for k in env_keys}
    node_rank = int(os.environ.get("NODE_RANK", "0"))
    base = {
        "MASTER_ADDR": os.environ.get("MASTER_ADDR", "127.0.0.1"),
        "MASTER_PORT": os.environ.get("MASTER_PORT", str(_free_port())),
        "WORLD_SIZE": str(world_size(train)),
        "NODE_RANK": str(node_rank),
    }
    if not use_gpu(train) and train.strategy.startswith("deepspeed"):
        base["DS_ACCELERATOR"] = "cpu"
    ranks = LocalRanks()
    try:
        for local in range(1, n_local):
            rank = node_rank * n_local + local
            ready = log_dir / f"rank{rank}.ready"
            ready.unlink(missing_ok=True)  # an earlier attempt's
            env = {**os.environ, **base, "LOCAL_RANK": str(local), "RANK": str(rank), "ATHANOR_HOME": str(home),
                   RANK_READY_ENV: str(ready), **(extra_env or {})}
            ranks.ranks.append(rank)
            ranks.logs.append(log_dir / f"rank{local}.log")
            ranks.ready.append(ready)
            ranks.procs.append(_start_rank(job_id, env, ranks.logs[-1]))
        os.environ.update({**base, "LOCAL_RANK": "0", "RANK": str(node_rank * n_local)})
        yield ranks
        for proc in ranks.procs:
            if proc.wait(timeout=600) != 0:
                raise RuntimeError(f"training rank exited with code {proc.returncode}; see {log_dir}/rank*.log")
    finally:
        for proc in ranks.procs:
            if proc.poll() is None:
                proc.terminate()
        for path in ranks.ready:
            path.unlink(missing_ok=True)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class NonFiniteLoss(RuntimeError):
    """Training diverged: the job fails at the step it happened, and nothing is exported or registered."""


def guard_callback(should_stop: Callable[[], bool], poll_seconds: float = 1.0, *,
                   interrupted: Callable[[], bool] | None = None, on_interrupt: Callable[[], Any] | None = None) -> Any:
    """A Lightning callback run on every rank: a non-finite loss raises NonFiniteLoss before its backward
    pass (naming the step, counted from 0 as Lightning's global_step), and a cancel request (`should_stop()`,
    polled at most every `poll_seconds`) stops the fit after this batch. With `interrupted` (an engine's warning
    that the job will be killed, seen by any rank), the ranks agree after each step; once one saw it, every rank
    writes a step checkpoint now (collectively) and rank 0 calls `on_interrupt()` (requeue)."""
    class Guard(Callback):
        last_poll = 0.0
        handed_over = False

        def on_before_backward(self, trainer: Any, pl_module: Any, loss: torch.Tensor) -> None:
            if not torch.isfinite(loss.detach()).all():
                raise NonFiniteLoss(f"training diverged: the loss is {loss.detach().float().mean().item()} at "
                                    f"optimizer step {trainer.global_step}; lower train.lr or check the data")

        def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            if interrupted is not None and not self.handed_over:
                # A collective every step: every rank must decide at the same step to checkpoint together.
                if trainer.strategy.reduce_boolean_decision(interrupted(), all=False):
                    self.hand_over(trainer)
            now = time.monotonic()
            if now - self.last_poll >= poll_seconds:
                self.last_poll = now
                if should_stop():
                    trainer.should_stop = True

        def hand_over(self, trainer: Any) -> None:
            self.handed_over = True
            for callback in trainer.checkpoint_callbacks:
                if callable(save_now := getattr(callback, "save_now", None)):
                    save_now(trainer)
            if trainer.is_global_zero and on_interrupt is not None:
                on_interrupt()

    return Guard()


def fit(method: Any, module: Any, student: Any, data: Any, train: TrainSpec, micro_batch_size: int, *,
        job_dir: Path, logger: Any = False, progress: bool = True, callbacks: list | None = None,
        ckpt_path: Path | None = None, fence: Callable[[], bool] | None = None,
        before_fit: Callable[[], None] | None = None) -> Any:
    """Train (from step 0, or resumed from `ckpt_path`: weights, optimizer, schedule, step, data position, RNG)
    and return the trained student, consolidated on every rank (ZeRO-3 included). `before_fit` runs just before
    this rank joins the process group (rank 0: `LocalRanks.wait_ready`)."""
    zero3 = train.strategy == "deepspeed_stage_3"
    blueprint = copy.deepcopy(student) if zero3 else None
    loader, position = resumable_loader(data.train_dataloader())
    trainer = build_trainer(train, job_dir=job_dir, micro_batch_size=micro_batch_size, logger=logger,
                            progress=progress, callbacks=[*(callbacks or []), position], fence=fence)
    mark_rank_ready()
    if before_fit is not None:
        before_fit()
    trainer.fit(module, train_dataloaders=loader, ckpt_path=str(ckpt_path) if ckpt_path else None)
    trained = method.trained_student(module)
    if zero3:
        # why: optional dependency (DeepSpeed strategies only)
        import deepspeed

        params = list(trained.parameters())
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            state = {k: v.detach().clone() for k, v in trained.state_dict().items()}
        blueprint.load_state_dict(state)
        trained = blueprint
    trained.train(False)
    _leave_process_group()
    return trained


def _leave_process_group() -> None:
    """Tear down the training ranks' process group: the ranks it joined have exited, and a later `fit` in this
    process (a comparison arm) must form a new group with newly launched ranks, not reuse a dead one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
