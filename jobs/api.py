"""`athanor serve`: the HTTP job API, a FastAPI app over the same job store as the CLI (`athanor worker`
runs what it queues). OpenAPI at /openapi.json (docs at /docs and /redoc, offline: jobs/api_docs.py); the recipe
JSON Schema at /schema/recipe and among the OpenAPI components. Routes: jobs/api_routes.py; models:
jobs/api_models.py; recipe path confinement: jobs/api_paths.py; job JSON and MLflow links: jobs/job_view.py.

    athanor serve --port 8000          # 127.0.0.1 only; any other --host needs ATHANOR_TOKEN
    .venv/bin/python -m pytest tests/jobs/test_api.py -q

Rules: whenever a token is set (`ATHANOR_TOKEN`, at least 16 characters; required off the loopback) every
route but /health needs `Authorization: Bearer <token>`, compared in constant time; request bodies are
capped at 256 KiB (the recipe limit), by Content-Length and by the bytes received; every error is one
JSON body `{"detail": ..., "problems": [...]}`, never a traceback.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
from pathlib import Path
from typing import Any

import h11
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from athanor.jobs.api_docs import add_docs
from athanor.jobs.api_models import ApiError, ErrorOut, ProblemOut, json_value
from athanor.jobs.api_routes import add_routes
from athanor.jobs.job_view import mlflow_ui_url
from athanor.jobs.recipe_yaml import MAX_RECIPE_BYTES, MISSING
from athanor.jobs.store import JobStore, StoreError

log = logging.getLogger("athanor.api")
MAX_BODY = MAX_RECIPE_BYTES
MIN_TOKEN_CHARS = 16
PUBLIC = ("/health",)


class AsciiJSONResponse(JSONResponse):
    """JSON with non-ASCII escaped, so a recipe's lone surrogates (YAML "\\ud800") still encode."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode("ascii")


def error_response(status: int, detail: str, problems: list[ProblemOut] = (),
                   headers: dict[str, str] | None = None) -> JSONResponse:
    body = ErrorOut(detail=detail, problems=list(problems)).model_dump(mode="json")
    return AsciiJSONResponse(body, status_code=status, headers=headers)


class _TooLarge(Exception):
    """The body grew past the limit while it was being received (no or a false Content-Length)."""


class Guard:
    """Outermost ASGI layer: the bearer token first (nothing is read before it), then the body limit."""

    def __init__(self, app: ASGIApp, token: str | None, max_body: int = MAX_BODY) -> None:
        self.app, self.token, self.max_body = app, token.encode() if token else None, max_body

    def _authorized(self, headers: dict[bytes, bytes]) -> bool:
        scheme, _, given = headers.get(b"authorization", b"").partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(given.strip(), self.token)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        if sum(name == b"authorization" for name, _ in scope["headers"]) > 1:  # which one would count?
            await error_response(400, "send one Authorization header, not several")(scope, receive, send)
            return
        if self.token and scope["path"] not in PUBLIC and not self._authorized(headers):
            response = error_response(401, "missing or wrong bearer token: send 'Authorization: Bearer "
                                           "$ATHANOR_TOKEN'", headers={"WWW-Authenticate": "Bearer"})
            await response(scope, receive, send)
            return
        length = headers.get(b"content-length", b"0").strip()
        if not length.isdigit():
            await error_response(400, "Content-Length is not a number")(scope, receive, send)
            return
        if int(length) > self.max_body:
            await error_response(413, self._too_large())(scope, receive, send)
            return
        await self._limited(scope, receive, send)

    def _too_large(self) -> str:
        return f"request body over {self.max_body // 1024} KiB; a recipe is a few KiB of YAML"

    async def _limited(self, scope: Scope, receive: Receive, send: Send) -> None:
        received, started = 0, False

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_body:
                raise _TooLarge()
            return message

        async def watched(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, watched)
        except _TooLarge:
            if not started:
                await error_response(413, self._too_large())(scope, receive, send)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def token_problem(host: str, token: str | None) -> str | None:
    """Why `athanor serve` must not start on `host` with `token`; None when it may."""
    if token is not None and len(token) < MIN_TOKEN_CHARS:
        return f"ATHANOR_TOKEN must be at least {MIN_TOKEN_CHARS} characters (e.g. `openssl rand -hex 32`)"
    if token is None and not is_loopback(host):
        return (f"--host {host} is not a loopback address: set ATHANOR_TOKEN (a secret of at least "
                f"{MIN_TOKEN_CHARS} characters; every request must then carry it) or keep --host 127.0.0.1")
    return None


def _request_problems(errors: Any) -> list[ProblemOut]:
    return [ProblemOut(path=".".join(str(p) for p in e.get("loc", ())) or "(request)",
                       value=json_value(e.get("input", MISSING)), fix=str(e.get("msg", "invalid"))) for e in errors]


def _install_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.detail, [ProblemOut.of(p) for p in exc.problems])

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(422, "invalid request", _request_problems(exc.errors()))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail), headers=exc.headers)

    @app.exception_handler(StoreError)
    async def store_error(request: Request, exc: StoreError) -> JSONResponse:
        return error_response(503, str(exc))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("%s %s failed", request.method, request.url.path)
        return error_response(500, f"internal error ({type(exc).__name__}); the server log has the details")


def create_app(home: Path, token: str | None, *, mlflow_ui: str | None = None) -> FastAPI:
    """The API over the job store in `home`; with `token`, every route but /health requires it. `mlflow_ui`: the
    MLflow UI's base URL job links point to (default: $ATHANOR_MLFLOW_UI, else `athanor ui`'s address)."""
    app = FastAPI(title="athanor", version="0.1.0", default_response_class=AsciiJSONResponse,
                  docs_url=None, redoc_url=None,  # served from installed files instead of a CDN (jobs/api_docs.py)
                  description="Distillation jobs over HTTP: submit a recipe YAML, watch the job, push its model. "
                              "`athanor worker` runs what is queued. Recipe JSON Schema: GET /schema/recipe.")
    _install_handlers(app)
    add_routes(app, JobStore(home), mlflow_ui_url(mlflow_ui))
    add_docs(app)
    app.add_middleware(Guard, token=token)
    return app


def _json_framing_errors() -> type:
    """uvicorn's h11 protocol, answering a request it cannot parse (a bad Content-Length, a NUL in a header) with
    a JSON error like every other answer of the API, instead of uvicorn's plain-text 400."""
    class JsonFramingErrors(H11Protocol):
        def send_400_response(self, msg: str) -> None:
            body = json.dumps({"detail": f"malformed HTTP request ({msg}); nothing was read",
                               "problems": []}).encode("ascii")
            headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                       (b"connection", b"close")]
            for event in (h11.Response(status_code=400, headers=headers, reason=b"Bad Request"), h11.Data(data=body),
                          h11.EndOfMessage()):
                self.transport.write(self.conn.send(event))
            self.transport.close()

    return JsonFramingErrors


def server_config(app: ASGIApp, **options: Any) -> Any:
    """The uvicorn configuration `athanor serve` runs (and the tests serve with): h11 with JSON framing errors."""
    return uvicorn.Config(app, http=_json_framing_errors(), timeout_keep_alive=5, server_header=False, **options)


def serve(home: Path, host: str = "127.0.0.1", port: int = 8000, token: str | None = None,
          mlflow_ui: str | None = None) -> None:
    """Run the API with uvicorn until interrupted (the caller checked `token_problem` and `mlflow_ui_url`)."""
    app = create_app(home, token, mlflow_ui=mlflow_ui)
    uvicorn.Server(server_config(app, host=host, port=port, log_level="info")).run()
