"""Job processes forked from a preloaded parent: a job starts with torch, Lightning, MLflow and transformers
already imported, instead of paying ~9 s of CPU (and as much start-up latency) to import them again.

The worker starts one `Prefork` before it starts any thread. Its server is a fork of the worker that imports
those libraries once, then forks each job's process on request. That process is what
`python -m athanor.jobs.worker --job ID` would be: its own session (so `athanor cancel --force` stops it and
every rank it starts), stdout and stderr appended to the job's log, the job's environment and working directory,
and athanor imported afresh (the server drops the athanor modules it inherited, so each job runs the code
installed when it starts, as a fresh interpreter would). Its exit status comes back to the worker over a pipe.

When the server cannot be used — threads already running in the worker (a fork would copy their locks held),
or the server gone — the job starts as a fresh interpreter, as before; `ATHANOR_PREFORK=0` asks for that always.
"""

from __future__ import annotations

import json
import logging
import os
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

PRELOAD = ("torch", "lightning.pytorch", "mlflow", "transformers")
"""What every training job imports first; a library missing here is simply imported by the job itself."""

SWITCH = "ATHANOR_PREFORK"
"""`ATHANOR_PREFORK=0`: every job starts as a fresh `python -m athanor.jobs.worker --job ID`."""


def run_module_as_main(module: str, argv: list[str], env: dict[str, str], cwd: str, base_path: list[str]) -> int:
    """In a forked child: become `python -m MODULE *argv` with this environment and working directory, and return
    its exit code once the interpreter would exit (non-daemon threads joined, atexit handlers run, streams flushed).
    `base_path` is sys.path after the script's directory (PYTHONPATH's entries and the interpreter's own)."""
    import atexit
    import runpy
    import traceback

    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    sys.argv[:] = ["-m", *argv]  # run_module puts the module's path first, as `python -m` does
    sys.path[:] = [cwd, *filter(None, env.get("PYTHONPATH", "").split(os.pathsep)), *base_path]
    if env.get("PYTHONUNBUFFERED"):  # read at interpreter start; the streams were made before
        for stream in (sys.stdout, sys.stderr):
            stream.reconfigure(line_buffering=True, write_through=True)
    if "mlflow" in sys.modules:  # MLflow decides at import whether telemetry is on; decide with this env
        from mlflow.telemetry import set_telemetry_client

        set_telemetry_client()
    if "torch" in sys.modules and env.get("OMP_NUM_THREADS", "").isdigit():  # read once, when torch loaded OpenMP
        sys.modules["torch"].set_num_threads(int(env["OMP_NUM_THREADS"]))
    code = 0
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as stop:
        if stop.code is None or isinstance(stop.code, int):
            code = stop.code or 0
        else:
            print(stop.code, file=sys.stderr)
            code = 1
    except BaseException:  # what the interpreter does with an uncaught exception
        traceback.print_exc()
        code = 1
    for thread in threading.enumerate():  # what the interpreter does at exit
        if thread is not threading.main_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    return code


class ForkedJob:
    """A process the server forked, used as a subprocess.Popen: `pid`, `returncode`, `poll`, `wait`, `terminate`,
    `kill`."""

    def __init__(self, prefork: Prefork, pid: int) -> None:
        self.prefork, self.pid, self.returncode = prefork, pid, None

    def poll(self) -> int | None:
        if self.returncode is None:
            self.returncode = self.prefork.status(self.pid, timeout=0)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            self.returncode = self.prefork.status(self.pid, timeout=timeout)
            if self.returncode is None:
                raise subprocess.TimeoutExpired(["python", "-m", "(forked)", str(self.pid)], timeout or 0)
        return self.returncode

    def send_signal(self, signum: int) -> None:
        if self.poll() is None:
            try:
                os.kill(self.pid, signum)
            except ProcessLookupError:
                pass

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class Prefork:
    """The caller's side of the server: `launch` a process, then wait for it through the ForkedJob it returns."""

    def __init__(self, server_pid: int, requests: int, replies: int) -> None:
        """Use `Prefork.start()`."""
        self.server_pid, self.requests, self.replies = server_pid, requests, replies
        self._buffer = b""
        self._exited: dict[int, int] = {}
        self.alive = True

    @classmethod
    def start(cls, preload: tuple[str, ...] = PRELOAD, *, fresh_athanor: bool = True) -> Prefork | None:
        """The server, forked now, importing `preload`; None when it must not be (threads running, switched off).
        `fresh_athanor`: the server drops the athanor modules it inherited, so each process it forks imports athanor
        anew (a worker's jobs run the code installed when they start). A job's rank server keeps them: its ranks
        must run the job's own code, and a method the job already imported from outside athanor (ATHANOR_METHODS)
        subclasses the athanor classes the job has, not new copies."""
        if os.environ.get(SWITCH) == "0" or threading.active_count() > 1 or not hasattr(os, "fork"):
            return None
        requests_r, requests_w = os.pipe()
        replies_r, replies_w = os.pipe()
        for stream in (sys.stdout, sys.stderr):
            stream.flush()  # or the server's copy of a buffer would be written a second time
        pid = os.fork()
        if pid == 0:
            os.close(requests_w)
            os.close(replies_r)
            try:
                _serve(requests_r, replies_w, preload, fresh_athanor)
            finally:
                os._exit(0)
        os.close(requests_r)
        os.close(replies_w)
        return cls(pid, requests_w, replies_r)

    def launch(self, argv: list[str], env: dict[str, str], log_path: Path, *,
               new_session: bool = True) -> ForkedJob | None:
        """`python -m *argv` (a module and its arguments), forked by the server with stdout and stderr appended to
        `log_path`, in a session of its own or (`new_session=False`) in the caller's process group; None if the
        server is gone (start a fresh interpreter instead)."""
        request = {"argv": argv, "env": env, "cwd": os.getcwd(), "log": str(log_path), "path": _base_path(),
                   "session": new_session}
        try:
            os.write(self.requests, json.dumps(request).encode() + b"\n")
        except OSError:
            self.close()
            return None
        while self.alive:
            reply = self._read(None)
            if reply is not None and "pid" in reply:
                return ForkedJob(self, reply["pid"])
        return None

    def status(self, pid: int, timeout: float | None) -> int | None:
        """The exit status of process `pid` (negative: the signal that killed it) once it has exited, waiting up
        to `timeout` seconds (None: until it exits); None while it runs. If the server is gone, -1 once the process
        is: its status went with the server."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while pid not in self._exited:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if self.alive:
                self._read(left)  # records every exit it reads
            elif not _alive(pid):
                return -1
            else:
                time.sleep(0.5 if left is None else min(0.5, left))
            if left == 0.0 and pid not in self._exited:
                return None
        return self._exited[pid]

    def close(self) -> None:
        """Stop the server (what it forked keeps running) and reap it."""
        if not self.alive:
            return
        self.alive = False
        for fd in (self.requests, self.replies):
            try:
                os.close(fd)
            except OSError:
                pass
        try:
            os.waitpid(self.server_pid, 0)
        except ChildProcessError:
            pass

    def _read(self, timeout: float | None) -> dict | None:
        """The server's next message (exits are recorded as they come), or None: none within `timeout`, or the
        server is gone."""
        while b"\n" not in self._buffer:
            ready, _, _ = select.select([self.replies], [], [], timeout)
            if not ready:
                return None
            try:
                chunk = os.read(self.replies, 65536)
            except OSError:
                chunk = b""
            if not chunk:
                self.close()
                return None
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        message = json.loads(line)
        if "exited" in message:
            self._exited[message["exited"]] = message["code"]
        return message


def _base_path() -> list[str]:
    """This interpreter's sys.path less its first entry (the script's or -m's directory) and PYTHONPATH's."""
    own = set(filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep)))
    return [entry for entry in sys.path[1:] if entry not in own]


def _alive(pid: int) -> bool:
    # why: imported here, not at the top: the test harness imports this module before it sets a call's environment,
    # and the store reads settings (ATHANOR_LEASE_SECONDS) from the environment when it is imported
    from athanor.jobs.store import process_alive

    return process_alive(pid)


def _serve(requests: int, replies: int, preload: tuple[str, ...], fresh_athanor: bool) -> None:
    """The server: preload, then fork one job process per request line and report each one's exit."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the worker's to handle; it then closes our pipe
    null = os.open(os.devnull, os.O_RDWR)  # what the libraries print at import is nobody's; and a caller reading
    for fd in (0, 1, 2):  # the worker's stdout to its end must not wait for this server too
        os.dup2(null, fd)
    os.close(null)
    athanor = [name for name in sys.modules if name == "athanor" or name.startswith("athanor.")]
    for name in athanor if fresh_athanor else ():  # each job imports athanor afresh, as a fresh interpreter would
        del sys.modules[name]
    for name in preload:
        try:
            __import__(name)
        except Exception:  # noqa: BLE001 — the job imports it again and reports the failure itself
            pass
    children: set[int] = set()
    pending = b""
    while True:
        ready, _, _ = select.select([requests], [], [], 0.2)
        _report_exits(children, replies)
        if not ready:
            continue
        chunk = os.read(requests, 65536)
        if not chunk:  # the worker stopped: a job still running carries on in its own session
            return
        pending += chunk
        while b"\n" in pending:
            line, pending = pending.split(b"\n", 1)
            pid = os.fork()
            if pid == 0:
                os._exit(_job_process(json.loads(line), requests, replies))
            children.add(pid)
            os.write(replies, json.dumps({"pid": pid}).encode() + b"\n")


def _report_exits(children: set[int], replies: int) -> None:
    for pid in list(children):
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            children.discard(pid)
            code = os.waitstatus_to_exitcode(status)
            try:
                os.write(replies, json.dumps({"exited": pid, "code": code}).encode() + b"\n")
            except OSError:  # the worker is gone; nobody waits for the status
                pass


def _job_process(request: dict, requests: int, replies: int) -> int:
    """In the forked process: its own session (unless asked not to), its log, then the module."""
    if request.get("session", True):
        os.setsid()
    for fd in (requests, replies):
        os.close(fd)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    root = logging.getLogger()  # a fresh interpreter's root logger has no handlers; the job adds its own
    for handler in list(root.handlers):
        root.removeHandler(handler)
    log = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    null = os.open(os.devnull, os.O_RDONLY)
    for source, fd in ((null, 0), (log, 1), (log, 2)):
        os.dup2(source, fd)
    os.close(log)
    os.close(null)
    module, *argv = request["argv"]
    return run_module_as_main(module, argv, request["env"], request["cwd"], request["path"])


def spawn_fresh(argv: list[str], env: dict[str, str], log_path: Path) -> subprocess.Popen:
    """`python -m *argv` as a fresh interpreter in its own session, stdout and stderr appended to `log_path`."""
    with open(log_path, "ab") as logfile:
        return subprocess.Popen([sys.executable, "-m", *argv], stdout=logfile, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
