"""`athanor ARGS` as a process forked from a server that has already imported torch, Lightning, MLflow and
transformers: the CLI's own work without re-paying ~6 s of CPU for those imports on every call (the suite makes
~150 such calls on 2 cores). Used by `harness.athanor`; `ATHANOR_TEST_FRESH_INTERPRETER=1` runs every call as a fresh
`python -m athanor.jobs.cli` instead.

What the child gets is what a fresh `python -m athanor.jobs.cli ARGS` gets: the call's environment (os.environ
replaced), working directory, sys.argv and sys.path (the directory, PYTHONPATH's entries, then the interpreter's
own), stdout and stderr in files, athanor and everything else imported afresh (only the libraries above are
already in sys.modules), exit code from SystemExit, non-daemon threads joined and atexit handlers run before it
exits. Those libraries read a few settings once, when imported: the offline switches, OMP_NUM_THREADS and
USE_HUB_KERNELS, which tests/conftest.py sets for the whole session before any call; MLflow's telemetry switch
is read again in the child.

The server is multiprocessing's forkserver (single-threaded when it forks, so the child inherits no held lock),
one per pytest process, started on the first call.
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

FRESH = "ATHANOR_TEST_FRESH_INTERPRETER"
PRELOAD = ["cli_fork_preload"]
"""The forkserver imports this module of tests/ (which imports the libraries) before it serves any fork."""


def _interpreter_path() -> list[str]:
    """sys.path of a fresh interpreter, less its first entry (the script's or -m's directory) and PYTHONPATH."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    shown = subprocess.run([sys.executable, "-c", "import sys; print('\\n'.join(sys.path[1:]))"], env=env,
                           capture_output=True, text=True, check=True, timeout=60)
    return shown.stdout.splitlines()


_CONTEXT = None
_BASE_PATH: list[str] = []


def _context():
    global _CONTEXT, _BASE_PATH
    if _CONTEXT is None:
        import multiprocessing
        from multiprocessing import forkserver

        _BASE_PATH = _interpreter_path()
        _CONTEXT = multiprocessing.get_context("forkserver")
        _CONTEXT.set_forkserver_preload(PRELOAD)
        # The server imports PRELOAD from its own sys.path (Python 3.11 ignores the sys.path multiprocessing passes
        # it): started here, with this folder on its PYTHONPATH.
        saved = os.environ.get("PYTHONPATH")
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).parent), saved]))
        try:
            forkserver.ensure_running()
        finally:
            if saved is None:
                os.environ.pop("PYTHONPATH")
            else:
                os.environ["PYTHONPATH"] = saved
    return _CONTEXT


def run(argv: list[str], *, env: dict[str, str], cwd: Path, timeout: float) -> subprocess.CompletedProcess:
    """`python -m athanor.jobs.cli *argv` in a forked child; a CompletedProcess as subprocess.run gives one
    (TimeoutExpired past `timeout`, the child killed)."""
    context = _context()
    cmd = [sys.executable, "-m", "athanor.jobs.cli", *argv]
    with tempfile.TemporaryDirectory(prefix="athanor-cli-") as folder:
        out, err = Path(folder) / "stdout", Path(folder) / "stderr"
        child = context.Process(target=_child, args=(argv, env, str(cwd), _BASE_PATH, str(out), str(err)),
                                daemon=False)
        child.start()
        child.join(timeout)
        if child.exitcode is None:
            child.kill()
            child.join()
            raise subprocess.TimeoutExpired(cmd, timeout, out.read_text(errors="replace"),
                                            err.read_text(errors="replace"))
        return subprocess.CompletedProcess(cmd, child.exitcode, out.read_text(errors="replace"),
                                           err.read_text(errors="replace"))


class ForkedCLI:
    """A running `athanor ARGS` forked by `start`, used as a text-mode subprocess.Popen: pid, returncode, poll, wait,
    send_signal, terminate, kill, communicate, and `.stdout.read()` / `.stderr.read()` (what it wrote so far).
    Its stdout and stderr are files (one file when started with stderr=subprocess.STDOUT)."""

    def __init__(self, child, folder: tempfile.TemporaryDirectory, out: Path, err: Path | None, cmd: list[str]):
        self._child, self._folder, self._out, self._err, self.args = child, folder, out, err, cmd
        self.pid, self.returncode = child.pid, None

    def poll(self) -> int | None:
        if self.returncode is None and self._child.exitcode is not None:
            self.returncode = self._child.exitcode
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        self._child.join(timeout)
        if self.poll() is None:
            raise subprocess.TimeoutExpired(self.args, timeout)
        return self.returncode

    def send_signal(self, signum: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, signum)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def communicate(self, timeout: float | None = None) -> tuple[str, str | None]:
        self.wait(timeout)
        return self.stdout.read(), (self.stderr.read() if self._err is not None else None)

    @property
    def stdout(self) -> io.StringIO:
        return io.StringIO(self._out.read_text(errors="replace"))

    @property
    def stderr(self) -> io.StringIO:
        return io.StringIO((self._err or self._out).read_text(errors="replace"))


def start(argv: list[str], *, env: dict[str, str], cwd: Path, merge_stderr: bool = False) -> ForkedCLI:
    """`python -m athanor.jobs.cli *argv` forked, not waited for (see ForkedCLI)."""
    context = _context()
    folder = tempfile.TemporaryDirectory(prefix="athanor-cli-")
    out = Path(folder.name) / "stdout"
    err = out if merge_stderr else Path(folder.name) / "stderr"
    child = context.Process(target=_child, args=(argv, env, str(cwd), _BASE_PATH, str(out), str(err)), daemon=False)
    child.start()
    return ForkedCLI(child, folder, out, None if merge_stderr else err, [sys.executable, "-m", "athanor.jobs.cli",
                                                                        *argv])


def _child(argv: list[str], env: dict[str, str], cwd: str, base_path: list[str], out: str, err: str) -> None:
    """In the forked child: become `python -m athanor.jobs.cli *argv`, then exit with its code."""
    for fd, path in ((1, out), (2, err)):  # first: fd 1 is the pytest worker's channel to its controller
        target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)  # append: out and err may be one file
        os.dup2(target, fd)
        os.close(target)
    from athanor.jobs.prefork import run_module_as_main  # the product's own, for the job processes it forks

    os._exit(run_module_as_main("athanor.jobs.cli", argv, env, cwd, base_path))
