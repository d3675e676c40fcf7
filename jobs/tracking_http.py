"""The tracker's side of a remote (`http(s)://`) MLflow server: short HTTP settings for the job's own requests, what
counts as "unreachable", a client whose every call is guarded, and the health check before a job tracks there.

Tests: `.venv/bin/python -m pytest tests/jobs/test_shared_tracking.py tests/jobs/test_faults.py -q`.
"""

from __future__ import annotations

import contextlib
import functools
import http.client
import os
import re
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import requests
import urllib3

__all__ = ["HTTP_DEFAULTS", "ONE_TRY", "TrackingUnavailable", "check_server", "http_settings", "unreachable"]


HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_TIMEOUT": "15", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
                 "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0.5"}
"""A tracking server that went away fails the job in well under a minute, not after MLflow's default
seven retries with exponential back-off (12 minutes measured). A user's own settings win."""
ONE_TRY = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}
"""Once the server was found unreachable: the job is failing; closing its run is tried once, quickly."""


class TrackingUnavailable(RuntimeError):
    """The tracking server cannot be reached: one line naming it."""


@contextlib.contextmanager
def http_settings(force: dict[str, str] | None = None) -> Iterator[None]:
    """MLflow reads its `MLFLOW_HTTP_REQUEST_*` settings from the environment at each request: inside this block,
    `HTTP_DEFAULTS` where the user set none (and `force` regardless); the environment as it was after it, so the
    settings hold for the job's own requests only, never for the user's other MLflow calls in this process."""
    wanted = {**{k: v for k, v in HTTP_DEFAULTS.items() if k not in os.environ}, **(force or {})}
    saved = {key: os.environ.get(key) for key in wanted}
    os.environ.update(wanted)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def unreachable(exc: BaseException) -> str | None:
    """Why `exc` means the server could not be reached ('connection refused', 'no answer within 15 s', 'HTTP 503 on
    every try', ...); None for anything else, e.g. an error the server answered with (even one that mentions a
    refused connection: its own database's)."""
    # why: `athanor list`/`status` and the worker loop import this module; mlflow costs seconds
    from mlflow.exceptions import RestException

    chain: list[BaseException] = []
    link: BaseException | None = exc
    while link is not None and link not in chain and len(chain) < 20:  # MLflow raises its own error inside `except`
        chain.append(link)
        for arg in (*getattr(link, "args", ()), getattr(link, "reason", None)):  # MaxRetryError, in requests' error
            if isinstance(arg, BaseException) and arg not in chain:
                chain.append(arg)
        link = link.__cause__ or link.__context__
    if any(isinstance(e, RestException) for e in chain):
        return None
    transport = [e for e in chain if isinstance(e, (requests.exceptions.RequestException, urllib3.exceptions.HTTPError,
                                                    http.client.HTTPException, OSError))]
    text = " ".join(str(e) for e in transport)

    def found(types: type | tuple[type, ...], *words: str) -> bool:
        return any(isinstance(e, types) for e in transport) or any(word in text for word in words)

    if found(ConnectionRefusedError, "Connection refused"):
        return "connection refused"
    if found(urllib3.exceptions.NameResolutionError, "Name or service not known", "name resolution"):
        return "host name not found"
    if found(ConnectionResetError, "Connection reset"):
        return "connection reset"
    if found(http.client.RemoteDisconnected, "Connection aborted", "without response"):
        return "connection closed before an answer"
    if found((urllib3.exceptions.ResponseError, requests.exceptions.RetryError)):
        codes = sorted(set(re.findall(r"too many (\d{3}) error", text)))
        return f"HTTP {'/'.join(codes) or 'error'} on every try"
    if found((requests.exceptions.Timeout, urllib3.exceptions.ReadTimeoutError, TimeoutError), "timed out"):
        return f"no answer within {os.environ.get('MLFLOW_HTTP_REQUEST_TIMEOUT', '?')} s"
    if found((requests.exceptions.ConnectionError, urllib3.exceptions.NewConnectionError,
              urllib3.exceptions.ProtocolError, ConnectionError)):
        return "connection failed"
    return None


class _Guarded:
    """An MlflowClient whose every call runs inside `tracker.guard` (a lost server: one line, not a traceback)."""

    def __init__(self, client: Any, tracker: Any) -> None:
        self._client, self._tracker = client, tracker

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._client, name)
        if not callable(attr):
            return attr

        @functools.wraps(attr)
        def call(*args: Any, **kwargs: Any) -> Any:
            with self._tracker.guard(name):
                return attr(*args, **kwargs)

        return call


def check_server(uri: str, timeout: float = 10) -> None:
    """GET <uri>/health before anything is tracked there."""
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as response:  # noqa: S310
            if response.status != 200:
                raise TrackingUnavailable(f"tracking server {uri} answered /health with HTTP {response.status}")
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise TrackingUnavailable(f"tracking server {uri} is unreachable ({reason}); start it or fix "
                                  "tracking.uri") from None
