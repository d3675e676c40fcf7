"""A real uvicorn serving an ASGI app on 127.0.0.1 with an ephemeral port, in a thread of the test process
(tests/jobs/test_api.py), and `athanor serve` as a subprocess (tests/jobs/test_api_client.py).

    with served(create_app(home, None)) as url: urllib.request.urlopen(f"{url}/health")
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@contextmanager
def served(app: Any) -> Iterator[str]:
    """`app` under uvicorn on a socket bound to 127.0.0.1:0; yields its base URL."""
    import uvicorn

    from athanor.jobs.api import server_config

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(server_config(app, log_level="warning", backlog=1024))  # as `athanor serve` runs
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started and thread.is_alive() and time.time() < deadline:
        time.sleep(0.05)
    assert server.started, "uvicorn did not start"
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


@contextmanager
def athanor_serve(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> Iterator[str]:
    """`athanor serve --port 0 ARGS` in a subprocess (run from the repo root); yields its base URL, read
    from uvicorn's 'running on' line."""
    full_env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    full_env.update(env or {})
    proc = subprocess.Popen([sys.executable, "-m", "athanor.jobs.cli", "serve", "--port", "0", *args], cwd=REPO,
                            env=full_env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    found = threading.Event()
    url: list[str] = []

    def read() -> None:
        for line in proc.stderr:
            lines.append(line)
            match = re.search(r"running on (http://[\d.]+:\d+)", line)
            if match and not found.is_set():
                url.append(match.group(1))
                found.set()

    threading.Thread(target=read, daemon=True).start()
    try:
        assert found.wait(timeout), f"athanor serve did not start: {''.join(lines)[-2000:]}"
        yield url[0]
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
