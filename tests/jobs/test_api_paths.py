"""Recipe paths are confined by type (issue 23, items 1-3): every string field of every method's recipe schema
is either a path type (RecipePath, RecipeGlob, RecipeCacheDir, TeacherFile, ModelRef, DataLoader, TrackingURI)
or declared free text (Text), and every path-typed field of every method, set to somewhere outside the home,
is refused over HTTP (422 naming the key) before anything is read or written. Globs and folders are expanded
and every match confined; NUL bytes are one keyed error.

    .venv/bin/python -m pytest tests/jobs/test_api_paths.py -q
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin

import pytest
from fastapi.testclient import TestClient
from harness import RECIPES, athanor
from pydantic import BaseModel
from recipes_toy import TOY

from athanor.convert.recipe_types import NotAPath, PathRole, Section, path_fields
from athanor.jobs.api import create_app
from athanor.jobs.methods import METHODS
from athanor.jobs.recipe import load_recipe, recipe_model
from athanor.jobs.store import JobStore

YAML = {"content-type": "application/yaml"}
SHIPPED = {"minilm": "minilm_tiny.yaml", "koala": "koala_tiny.yaml", "sentencevae": "sentencevae_tiny.yaml",
           "linvideo": "linvideo_tiny.yaml", "sinklora": "sinklora_tiny.yaml",
           "lora_composer": "lora_composer_fashion.yaml"}


def _bare_str(annotation: Any) -> bool:
    """Whether a type holds a `str` that carries neither a PathRole nor NotAPath (dict keys are names)."""
    if get_origin(annotation) is Annotated:
        marked = any(isinstance(m, (PathRole, NotAPath)) for m in annotation.__metadata__)
        return not marked and _bare_str(get_args(annotation)[0])
    if annotation is str:
        return True
    if get_origin(annotation) is Literal:
        return False
    args = get_args(annotation)[1:] if get_origin(annotation) is dict else get_args(annotation)
    return any(_bare_str(a) for a in args if a is not Ellipsis)


def _sections(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for a in get_args(annotation) if a is not Ellipsis for m in _sections(a)]


def untyped_strings(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Keys of the string fields (nested sections, lists and dicts of sections included) of no declared kind."""
    found = []
    for name, info in model.model_fields.items():
        marked = any(isinstance(m, (PathRole, NotAPath)) for m in info.metadata)
        if not marked and _bare_str(info.annotation):
            found.append(f"{prefix}{name}")
        for section in _sections(info.annotation):
            found += untyped_strings(section, f"{prefix}{name}.")
    return found


def test_every_string_field_of_every_method_is_a_path_type_or_text():
    class Forgetful(Section):  # what a new method's author might write: the walk must catch it
        notes: str | None = None
        listed: list[str] = []
        nested: dict[str, list[str]] = {}

    assert untyped_strings(Forgetful) == ["notes", "listed", "nested"]
    untyped = {method: untyped_strings(recipe_model(method)) for method in METHODS}
    assert all(keys == [] for keys in untyped.values()), untyped


@pytest.fixture
def client(home) -> TestClient:
    with TestClient(create_app(home, None)) as test_client:
        yield test_client


def _recipe(method: str) -> str:
    return TOY if method.startswith("toy") else (RECIPES / SHIPPED[method]).read_text()


def _hostile(role: PathRole, outside: Path) -> list[str]:
    """Values that read or write outside the home, for a field of this role."""
    if role.kind == "store":
        return [f"sqlite+pysqlite:///{outside}/mlflow.db", f"sqlite:///{outside}/mlflow.db", f"file://{outside}",
                str(outside / "mlruns")]
    if role.base == "teacher":
        return [str(outside / "secret.txt"), "../../outside/secret.txt"]
    return [str(outside / "secret.txt"), "../outside/secret.txt", f"{outside}/*.txt"]


@pytest.mark.parametrize("method", sorted(SHIPPED) + ["toy"])
def test_every_path_field_of_every_method_is_refused_outside_the_home(client, home, tmp_path, method):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("not for a recipe\n")
    text = _recipe(method)
    fields = [(key, role, isinstance(getattr(section, name), list))
              for key, section, name, role in path_fields(load_recipe(None, text=text).recipe)]
    assert fields, "a method with no path field at all: the walk found nothing"
    tried = 0
    for key, role, is_list in fields:
        extra = ["teacher.config=null"] if key == "teacher.source" else []  # a source replaces an inline config
        for value in _hostile(role, outside):
            override = [f"{key}={json.dumps([value] if is_list else value)}", *extra]
            response = client.post("/jobs", content=text, headers=YAML, params={"override": override})
            assert response.status_code == 422, (key, value, response.text)
            problems = response.json()["problems"]
            assert any(p["path"] == key for p in problems), (key, value, problems)
            tried += 1
    assert JobStore(home).list() == [] and not (outside / "mlflow.db").exists() and not (outside / "mlruns").exists()
    print(f"{method}: {len(fields)} path fields, {tried} hostile values, all 422")


def test_globs_and_folders_are_expanded_and_every_match_confined(client, home, tmp_path):
    outside = tmp_path / "etc"
    outside.mkdir()
    (outside / "passwd").write_text("root:x:0:0\n")
    (home / "data" / "own").mkdir(parents=True)
    (home / "data" / "own" / "a.txt").write_text("a passage\n")
    (home / "data" / "link").symlink_to(outside)  # inside the home, pointing out of it
    files = TOY.replace("data:\n", "data:\n  kind: files\n")
    for paths in ("[data/*/passwd]", "['data/**/*']", "[data]", "[data/link/passwd]"):
        response = client.post("/jobs", content=files.replace("data:\n", f"data:\n  paths: {paths}\n", 1),
                               headers=YAML)
        assert response.status_code == 422, (paths, response.text)
        (problem,) = response.json()["problems"]
        assert problem["path"] == "data.paths" and "athanor home" in problem["fix"], problem
    good = client.post("/jobs", content=files.replace("data:\n", "data:\n  paths: [data/own/*.txt]\n", 1),
                       headers=YAML)
    assert good.status_code == 201, good.text
    # The job reads the matches that were checked, not the pattern again.
    assert good.json()["overrides"] == [f"data.paths={json.dumps([str((home / 'data/own/a.txt').resolve())])}"]


def test_a_nul_byte_in_a_path_is_one_keyed_error(client, home, tmp_path):
    for key, value in (("data.paths", '["a\\0b"]'), ("teacher.source", '"pkg:x\\0y"'),
                       ("tracking.uri", '"sqlite:///a\\0.db"')):
        response = client.post("/jobs", content=TOY, headers=YAML, params={"override": f"{key}={value}"})
        assert response.status_code == 422, response.text
        (problem,) = [p for p in response.json()["problems"] if "NUL" in p["fix"]]
        assert problem["path"].startswith(key), problem
    path = tmp_path / "toy.yaml"
    path.write_text(TOY)
    done = athanor("validate", str(path), "-o", 'teacher.source="pkg:x\\0y"')
    assert done.returncode != 0 and "Traceback" not in done.stderr + done.stdout
    assert "teacher.source" in done.stdout + done.stderr and "NUL byte" in done.stdout + done.stderr


def _raw(url: str, request: bytes) -> tuple[int, dict]:
    """Send raw bytes (framing no client library would produce); (status, JSON body)."""
    import socket

    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as conn:
        conn.sendall(request)
        reply = b""
        while chunk := conn.recv(65536):
            reply += chunk
    head, _, body = reply.partition(b"\r\n\r\n")
    assert b"content-type: application/json" in head.lower(), reply[:500]
    return int(head.split()[1]), json.loads(body)


def test_malformed_framing_and_duplicate_authorization_answer_json(home):
    from api_server import served

    token = "s3cret-token-of-32-characters-xx"
    with served(create_app(home, token)) as url:
        for request in (b"POST /jobs HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n",
                        b"POST /jobs HTTP/1.1\r\nHost: x\r\nContent-Length: 1, 2\r\n\r\n",
                        b"GET /jobs HTTP/1.1\r\nHost: x\r\nX-Note: a\x00b\r\n\r\n"):
            status, body = _raw(url, request)
            assert status == 400 and body["detail"].startswith("malformed HTTP request"), body
        twice = (f"GET /jobs HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
                 f"Authorization: Bearer wrong\r\nConnection: close\r\n\r\n").encode()
        status, body = _raw(url, twice)
        assert status == 400 and "one Authorization header" in body["detail"], body
        once = f"GET /jobs HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n"
        assert _raw(url, once.encode())[0] == 200
    assert JobStore(home).list() == []
