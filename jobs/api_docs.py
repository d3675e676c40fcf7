"""`/docs` (Swagger UI) and `/redoc` served from installed files, so the API's documentation renders with no network
(FastAPI's own pages load their JavaScript and CSS from a CDN and are blank offline). The files come from PyPI's
`fastapi-offline` (Swagger UI and ReDoc) or `swagger-ui-bundle` (Swagger UI only); nothing is fetched at run time:
no CDN, no Google Fonts, no online validator. Without them the pages answer 503 naming the package to install.

    .venv/bin/python -m pytest tests/jobs/test_api_docs.py -q
"""

from __future__ import annotations

import importlib
from functools import cache
from pathlib import Path

from fastapi import FastAPI
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse, Response

from athanor.jobs.api_models import ApiError

ASSET_URL = "/docs-assets"
SWAGGER = ("swagger-ui-bundle.js", "swagger-ui.css")
REDOC = ("redoc.standalone.js",)
FAVICON = "favicon.png"
MEDIA = {".js": "text/javascript", ".css": "text/css", ".png": "image/png"}
PACKAGES = (("fastapi_offline", "static"), ("swagger_ui_bundle", "vendor"))
"""Where installed packages keep the files: (import name, folder searched below the package)."""


@cache
def assets() -> dict[str, Path]:
    """Asset file name -> its installed file, the first package that ships it winning."""
    found: dict[str, Path] = {}
    for module, folder in PACKAGES:
        try:
            root = Path(importlib.import_module(module).__file__).parent
        except ImportError:
            continue
        for name in (*SWAGGER, *REDOC, FAVICON):
            # swagger-ui-bundle keeps one folder per Swagger UI release: the newest (highest version) wins.
            matches = sorted((root / folder).rglob(name), key=lambda p: _version_key(p.parent.name))
            if matches and name not in found:
                found[name] = matches[-1]
    return found


def _version_key(folder: str) -> tuple[int, ...]:
    digits = "".join(c if c.isdigit() else " " for c in folder).split()
    return tuple(int(d) for d in digits)


def _missing(names: tuple[str, ...], page: str) -> None:
    if not all(n in assets() for n in names):
        raise ApiError(503, f"{page} needs files no installed package ships ({', '.join(names)}): install "
                            f"fastapi-offline (pip install fastapi-offline); the schema itself is at /openapi.json")


def add_docs(app: FastAPI, openapi_url: str = "/openapi.json") -> None:
    """GET /docs, /redoc and their files (the app must be built with docs_url=None, redoc_url=None)."""
    icon = f"{ASSET_URL}/{FAVICON}" if FAVICON in assets() else "data:,"  # no request for a favicon elsewhere

    @app.get("/docs", include_in_schema=False)
    def swagger() -> HTMLResponse:
        _missing(SWAGGER, "/docs")
        # validatorUrl null: Swagger UI would otherwise send the schema to swagger.io's online validator.
        return get_swagger_ui_html(openapi_url=openapi_url, title=f"{app.title} - Swagger UI",
                                   swagger_js_url=f"{ASSET_URL}/{SWAGGER[0]}",
                                   swagger_css_url=f"{ASSET_URL}/{SWAGGER[1]}", swagger_favicon_url=icon,
                                   swagger_ui_parameters={"validatorUrl": None})

    @app.get("/redoc", include_in_schema=False)
    def redoc() -> HTMLResponse:
        _missing(REDOC, "/redoc")
        return get_redoc_html(openapi_url=openapi_url, title=f"{app.title} - ReDoc",
                              redoc_js_url=f"{ASSET_URL}/{REDOC[0]}", redoc_favicon_url=icon, with_google_fonts=False)

    @app.get(ASSET_URL + "/{name}", include_in_schema=False)
    def asset(name: str) -> Response:
        path = assets().get(name)  # only the named files, never a path the client builds
        if path is None:
            raise ApiError(404, f"no documentation asset {name!r}")
        return FileResponse(path, media_type=MEDIA[path.suffix], headers={"Cache-Control": "max-age=86400"})
