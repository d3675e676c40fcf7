"""`/docs` (Swagger UI) and `/redoc` render offline from installed files (jobs/api_docs.py): the pages name no
outside address, the files are served by the API itself, and headless Chromium, with every host but 127.0.0.1
unresolvable, renders the operations of `athanor serve`.

    .venv/bin/python -m pytest tests/jobs/test_api_docs.py -q
"""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest
from api_server import athanor_serve
from fastapi.testclient import TestClient

from athanor.jobs.api import create_app

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--virtual-time-budget=20000", "--window-size=1400,1000",
         # Offline: every name but the loopback fails to resolve, so a CDN reference would leave the page blank.
         "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1"]
OUTSIDE = re.compile(r"(src|href)=\"(https?:)?//", re.IGNORECASE)


@pytest.fixture
def client(home) -> TestClient:
    with TestClient(create_app(home, None)) as test_client:
        yield test_client


@pytest.mark.parametrize(("page", "files"), [("/docs", ["swagger-ui-bundle.js", "swagger-ui.css"]),
                                             ("/redoc", ["redoc.standalone.js"])])
def test_doc_pages_load_only_files_the_api_serves(client, page, files):
    response = client.get(page)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    html = response.text
    assert not OUTSIDE.search(html) and "cdn.jsdelivr" not in html and "fonts.googleapis" not in html, html
    for name in files:
        assert f'"/docs-assets/{name}"' in html
        asset = client.get(f"/docs-assets/{name}")
        assert asset.status_code == 200 and len(asset.content) > 10_000
        assert asset.headers["content-type"].startswith("text/javascript" if name.endswith(".js") else "text/css")
    assert '"validatorUrl": null' in html or page == "/redoc"  # no schema sent to an online validator


def test_only_the_named_doc_files_are_served(client):
    assert client.get("/docs-assets/nope.js").json()["detail"] == "no documentation asset 'nope.js'"
    for name in ("nope.js", "..%2F..%2Fapi.py", "%2Fetc%2Fpasswd", "..%2Fstatic%2Ffavicon.png"):
        assert client.get(f"/docs-assets/{name}").status_code == 404
    assert "/docs-assets/{name}" not in client.get("/openapi.json").json()["paths"]


@pytest.mark.browser
@pytest.mark.skipif(CHROMIUM is None, reason="needs headless Chromium (Debian package `chromium`; .ci/run installs it)")
def test_docs_render_offline_in_chromium(tmp_path, home):
    with athanor_serve() as url:
        common = [CHROMIUM, *FLAGS, f"--user-data-dir={tmp_path / 'profile'}"]
        shot = tmp_path / "docs.png"
        subprocess.run([*common, f"--screenshot={shot}", f"{url}/docs"], capture_output=True, timeout=180, check=True)
        docs = subprocess.run([*common, "--dump-dom", f"{url}/docs"], capture_output=True, text=True, timeout=180,
                              check=True).stdout
        redoc = subprocess.run([*common, "--dump-dom", f"{url}/redoc"], capture_output=True, text=True, timeout=180,
                               check=True).stdout
    # Swagger UI built its DOM from /openapi.json: one block per operation, with their paths and summaries.
    assert len(re.findall(r'class="opblock opblock-(get|post)', docs)) >= 9, docs[:3000]
    assert "/jobs/{job_id}/cancel" in docs and "submit a recipe" in docs and "athanor" in docs
    assert shot.stat().st_size > 20_000  # a rendered page, not a blank one
    assert "submit a recipe" in redoc and "/jobs/{job_id}/push" in redoc, redoc[:3000]
