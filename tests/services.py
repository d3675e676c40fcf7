"""Private services on loopback for tests: a PostgreSQL cluster and an `mlflow server` (HTTP, served artifacts).

Each listens on 127.0.0.1 only, on a free port, and is stopped by the pid this module started (never by name).
Logs stay in the service's folder and are printed when it fails to start (and by `describe()`, e.g. in an
assertion message). Missing binaries fail the test saying what to install: CI installs them, nothing is skipped.

    from services import postgres_server, mlflow_server
    with postgres_server(tmp) as pg, mlflow_server(tmp / "mlflow", pg.database_uri("mlflow")) as server:
        server.uri  # http://127.0.0.1:PORT

Fixtures (module scope, one cluster and one server per test module): `postgres`, `mlflow_on_postgres`; a test
module imports them by their function names:

    from services import mlflow_on_postgres_fixture, postgres_fixture  # noqa: F401 — fixtures
"""

from __future__ import annotations

import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

INSTALL_POSTGRES = "apt-get install -y postgresql"
INSTALL_DRIVER = ".venv/bin/pip install psycopg2-binary"
LOOPBACK = "127.0.0.1"


def free_port() -> int:
    """A TCP port on 127.0.0.1 nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


def tail(path: Path, lines: int = 60) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def wait_until(ready: Callable[[], bool], timeout: float, what: str, proc: subprocess.Popen | None = None,
               log: Path | None = None) -> None:
    """Poll `ready()` until it is true; fail (with the log's tail) after `timeout` s or when `proc` exits first."""
    deadline = time.monotonic() + timeout
    while True:
        if ready():
            return
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"{what} exited with code {proc.returncode} before it was ready; its log {log}:\n"
                        f"{tail(log) if log else ''}", pytrace=False)
        if time.monotonic() > deadline:
            pytest.fail(f"{what} was not ready within {timeout:.0f} s; its log {log}:\n{tail(log) if log else ''}",
                        pytrace=False)
        time.sleep(0.2)


def stop_process(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 30) -> None:
    """Stop a process this module started (its own session: its children go with it), then reap it."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, sig)  # the process group of the session `proc` leads (start_new_session)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    deadline = time.monotonic() + timeout  # the group may outlive its leader for a moment (workers exiting)
    while _group_alive(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if _group_alive(proc.pid):
        os.killpg(proc.pid, signal.SIGKILL)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


# --------------------------------------------------------------------------------------------- PostgreSQL


def postgres_bindir() -> Path:
    """The newest Debian PostgreSQL server's bin folder (initdb, postgres); fails saying what to install."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    if initdb and (Path(initdb).resolve().parent / "postgres").is_file():
        return Path(initdb).resolve().parent
    pytest.fail(f"PostgreSQL server binaries (initdb, postgres) not found under /usr/lib/postgresql/*/bin or on "
                f"PATH: {INSTALL_POSTGRES}", pytrace=False)


def psycopg2():
    """The PostgreSQL driver the mlflow server and these tests use; fails saying what to install."""
    try:
        import psycopg2 as driver
    except ImportError:
        pytest.fail(f"the PostgreSQL driver psycopg2 is not installed: {INSTALL_DRIVER}", pytrace=False)
    return driver


def _postgres_account() -> dict:
    """Popen arguments that run a server binary as the `postgres` account when we are root (PostgreSQL refuses
    root); as ourselves otherwise."""
    if os.geteuid() != 0:
        return {}
    import pwd

    try:
        pwd.getpwnam("postgres")
    except KeyError:
        pytest.fail(f"running as root, and there is no `postgres` account to run PostgreSQL as: {INSTALL_POSTGRES} "
                    "(creates it)", pytrace=False)
    return {"user": "postgres", "group": "postgres", "extra_groups": []}


@dataclass
class Postgres:
    """A private PostgreSQL cluster on 127.0.0.1:`port`: superuser `postgres`, trust auth, socket in `root`."""

    root: Path
    port: int
    proc: subprocess.Popen
    log: Path
    bindir: Path

    def database_uri(self, database: str = "postgres") -> str:
        """A SQLAlchemy URI naming the psycopg2 driver: SQLAlchemy 2.1's plain `postgresql://` means psycopg 3."""
        return f"postgresql+psycopg2://postgres@{LOOPBACK}:{self.port}/{database}"

    def connect(self, database: str = "postgres"):
        return psycopg2().connect(host=LOOPBACK, port=self.port, user="postgres", dbname=database, connect_timeout=5)

    def query(self, sql: str, params: tuple = (), database: str = "postgres") -> list[tuple]:
        """The rows of one SQL query (e.g. to see what the mlflow server stored)."""
        with closing(self.connect(database)) as conn, conn, conn.cursor() as cur:
            cur.execute(sql, params)
            return cur.fetchall()

    def create_database(self, name: str) -> str:
        """A new empty database; its SQLAlchemy URI."""
        with closing(self.connect()) as conn:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute(f'CREATE DATABASE "{name}"')
        return self.database_uri(name)

    def ready(self) -> bool:
        try:
            self.connect().close()
        except Exception:  # noqa: BLE001 — not accepting connections yet
            return False
        return True

    def describe(self) -> str:
        return f"PostgreSQL on {LOOPBACK}:{self.port} (pid {self.proc.pid}), log {self.log}:\n{tail(self.log)}"

    def stop(self) -> None:
        """Fast shutdown: SIGINT to the postmaster we started (its backends are in its process group)."""
        stop_process(self.proc, signal.SIGINT)


@contextmanager
def postgres_server(logs: Path, timeout: float = 60) -> Iterator[Postgres]:
    """initdb a cluster in a fresh temp folder (readable by the `postgres` account, which cannot enter pytest's
    root-only tmp folders), run `postgres` on a free loopback port, yield it, stop it and remove the folder.
    Its log is written to `logs/postgres.log` (kept)."""
    bindir = postgres_bindir()
    psycopg2()
    account = _postgres_account()
    logs.mkdir(parents=True, exist_ok=True)
    log = logs / "postgres.log"
    root = Path(tempfile.mkdtemp(prefix="athanor-pg-"))
    try:
        if account:
            shutil.chown(root, "postgres", "postgres")
        data, sockets = root / "data", root / "sockets"
        with open(log, "ab") as out:
            done = subprocess.run([str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust",
                                   "-E", "UTF8", "--locale=C", "--no-sync"], cwd=root, stdout=out,
                                  stderr=subprocess.STDOUT, timeout=timeout, **account)
        if done.returncode:
            pytest.fail(f"initdb failed (code {done.returncode}); its log {log}:\n{tail(log)}", pytrace=False)
        (sockets).mkdir()
        if account:
            shutil.chown(sockets, "postgres", "postgres")
        port = free_port()
        with open(log, "ab") as out:
            proc = subprocess.Popen(
                [str(bindir / "postgres"), "-D", str(data), "-p", str(port), "-k", str(sockets),
                 "-c", f"listen_addresses={LOOPBACK}", "-c", "fsync=off", "-c", "synchronous_commit=off",
                 "-c", "full_page_writes=off", "-c", "max_connections=50"],
                cwd=root, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                **account)
        server = Postgres(root, port, proc, log, bindir)
        try:
            wait_until(server.ready, timeout, "PostgreSQL", proc, log)
            yield server
        finally:
            server.stop()
    finally:
        shutil.rmtree(root, ignore_errors=True)


# ------------------------------------------------------------------------------------------ mlflow server


@dataclass
class MlflowServer:
    """`mlflow server` on 127.0.0.1:`port` with a SQL backend and proxied artifacts in `artifacts`."""

    backend_uri: str
    artifacts: Path
    log: Path
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None
    starts: int = 0

    @property
    def uri(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as response:  # noqa: S310 — loopback
                return response.status == 200
        except OSError:
            return False

    def start(self, timeout: float = 180) -> MlflowServer:
        """Start it (again, on the same port and store) and wait until /health answers; a running one is kept."""
        if self.proc is not None and self.proc.poll() is None:
            return self
        self.starts += 1
        env = {**{k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")},
               "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}  # nothing leaves 127.0.0.1
        with open(self.log, "ab") as out:
            out.write(f"\n==== start {self.starts} on port {self.port}\n".encode())
            out.flush()
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", self.backend_uri,
                 "--serve-artifacts", "--artifacts-destination", str(self.artifacts), "--host", LOOPBACK,
                 "--port", str(self.port), "--workers", "1"],
                cwd=self.artifacts.parent, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True)
        try:
            wait_until(self.healthy, timeout, "the mlflow server", self.proc, self.log)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Stop the server we started (SIGKILL: it goes away as a crashed or unplugged server would)."""
        if self.proc is not None:
            stop_process(self.proc, sig)

    def describe(self) -> str:
        pid = self.proc.pid if self.proc else None
        return f"mlflow server {self.uri} (pid {pid}), log {self.log}:\n{tail(self.log)}"


@contextmanager
def mlflow_server(folder: Path, backend_uri: str, timeout: float = 180) -> Iterator[MlflowServer]:
    """`mlflow server --backend-store-uri BACKEND --serve-artifacts --artifacts-destination FOLDER/artifacts` on a
    free loopback port; its log is FOLDER/mlflow-server.log."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "artifacts").mkdir(exist_ok=True)
    server = MlflowServer(backend_uri, folder / "artifacts", folder / "mlflow-server.log")
    try:
        yield server.start(timeout)
    finally:
        server.stop()


@pytest.fixture(scope="module", name="postgres")
def postgres_fixture(tmp_path_factory) -> Iterator[Postgres]:
    """One private PostgreSQL cluster per test module."""
    with postgres_server(tmp_path_factory.mktemp("postgres")) as server:
        print(f"PostgreSQL on {LOOPBACK}:{server.port}, log {server.log}")  # shown with a failing test's output
        yield server


@pytest.fixture(scope="module", name="mlflow_on_postgres")
def mlflow_on_postgres_fixture(postgres, tmp_path_factory) -> Iterator[MlflowServer]:
    """One `mlflow server` per test module, its runs and registry in database `mlflow` of `postgres`."""
    backend = postgres.create_database("mlflow")
    with mlflow_server(tmp_path_factory.mktemp("mlflow-server"), backend) as server:
        print(f"mlflow server {server.uri}, log {server.log}")
        yield server
