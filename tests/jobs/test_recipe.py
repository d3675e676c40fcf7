"""Recipe schema: every error collected with key path, line and fix; safe YAML; overrides; schema docs."""

from __future__ import annotations

import json

import pytest
from recipes_toy import TOY, write_toy

from athanor.jobs import cli
from athanor.jobs.recipe import RecipeInvalid, json_schema, load_recipe, recipe_model

BROKEN = """\
name: toy-demo
method: toy
teacher:
  config: {width: 8, hidden: 16}
student:
  hiden: 4
train:
  max_stepz: 30
  strategy: dpp
  lr: fast
registry:
  name: "bad/name"
"""


def test_valid_recipe_fills_documented_defaults():
    loaded = load_recipe(text=TOY)
    assert loaded.recipe.train.max_steps == 30
    assert loaded.recipe.train.strategy == "auto"
    assert loaded.recipe.registry.alias == "candidate"
    assert loaded.args.fail_at is None and loaded.student.hidden == 4
    assert len(loaded.hash) == 16


def test_every_problem_is_reported_at_once_with_lines_and_suggestions():
    with pytest.raises(RecipeInvalid) as info:
        load_recipe(text=BROKEN)
    by_path = {p.path: p for p in info.value.problems}
    assert set(by_path) == {"student.hiden", "train.max_stepz", "train.strategy", "train.lr", "registry.name"}
    assert by_path["student.hiden"].line == 6 and "did you mean 'hidden'" in by_path["student.hiden"].message
    assert by_path["train.max_stepz"].line == 8 and "did you mean 'max_steps'" in by_path["train.max_stepz"].message
    assert by_path["train.strategy"].line == 9 and by_path["train.strategy"].value == "dpp"
    assert "'ddp'" in by_path["train.strategy"].message  # the allowed values are listed
    assert by_path["registry.name"].line == 12
    rendered = str(info.value).splitlines()
    assert len(rendered) == 5 and rendered[0].startswith("recipe:6: student.hiden = 4: unknown key")


def test_unknown_method_still_reports_the_other_sections():
    text = TOY.replace("method: toy", "method: minlm").replace("max_steps: 30", "max_steps: -1")
    with pytest.raises(RecipeInvalid) as info:
        load_recipe(text=text)
    paths = {p.path: p for p in info.value.problems}
    assert "did you mean 'minilm'" in paths["method"].message and "koala" in paths["method"].message
    assert "train.max_steps" in paths


def test_yaml_tags_that_run_code_are_refused(tmp_path):
    marker = tmp_path / "pwned"
    text = TOY + f"description: !!python/object/apply:os.system ['touch {marker}']\n"
    with pytest.raises(RecipeInvalid) as info:
        load_recipe(text=text)
    assert info.value.problems[0].path == "(yaml)"
    assert not marker.exists()


def test_overrides_are_typed_and_reported_without_file_lines():
    loaded = load_recipe(text=TOY, overrides=["train.max_steps=7", "train.strategy=ddp", "eval.max_texts=9"])
    assert loaded.recipe.train.max_steps == 7 and loaded.recipe.train.strategy == "ddp"
    assert loaded.hash != load_recipe(text=TOY).hash
    with pytest.raises(RecipeInvalid) as info:
        load_recipe(text=TOY, overrides=["train.max_steps=lots"])
    (problem,) = info.value.problems
    assert problem.path == "train.max_steps" and problem.line is None and problem.value == "lots"
    with pytest.raises(RecipeInvalid):
        load_recipe(text=TOY, overrides=["no-equals-sign"])


def test_teacher_needs_exactly_one_source():
    text = TOY.replace("  config: {width: 8, hidden: 16}\n", "  source: somewhere\n  config: {width: 8}\n")
    with pytest.raises(RecipeInvalid) as info:
        load_recipe(text=text)
    assert info.value.problems[0].path == "teacher" and "exactly one" in info.value.problems[0].message


def test_schema_documents_every_field():
    schema = recipe_model("toy").model_json_schema()
    train = schema["$defs"]["JobTrainSpec"]["properties"]
    assert all(prop.get("description") for prop in train.values()), "every train field needs a docstring"
    assert train["strategy"]["default"] == "auto"
    assert {v["title"] for v in json_schema()["oneOf"]} >= {"MinilmRecipe", "ToyRecipe"}


def test_validate_command_prints_every_problem_in_one_go(tmp_path, capsys, home):
    path = write_toy(tmp_path, BROKEN)
    assert cli.main(["validate", str(path)]) == cli.EXIT_BAD_INPUT
    err = capsys.readouterr().err.splitlines()
    assert len([line for line in err if line.startswith(str(path))]) == 5
    assert err[-1] == f"5 problem(s) in {path}"


def test_validate_reports_semantic_problems_and_a_meta_estimate(tmp_path, capsys, home):
    assert cli.main(["validate", str(write_toy(tmp_path))]) == 0
    out = capsys.readouterr().out
    assert "teacher: 0.00M parameters" in out and "student:" in out and "27.1% of the teacher" in out
    too_big = write_toy(tmp_path, TOY.replace("hidden: 4", "hidden: 64"), "big.yaml")
    assert cli.main(["validate", str(too_big)]) == cli.EXIT_BAD_INPUT
    assert "student.hidden = 64: must be at most the teacher's 16" in capsys.readouterr().err


def test_schema_command_is_json(capsys):
    assert cli.main(["schema", "--method", "toy"]) == 0
    assert json.loads(capsys.readouterr().out)["title"] == "ToyRecipe"


def test_method_path_fields_are_checked_and_resolved_beside_the_recipe(tmp_path, monkeypatch):
    from athanor.jobs.recipe import resolve_recipe_paths
    from athanor.jobs.validate import check

    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "recipes"
    folder.mkdir()
    path = folder / "toy.yaml"
    path.write_text(TOY + "toy:\n  notes_file: notes.txt\n")
    (report,) = [check(path)]
    assert [(p.path, p.value) for p in report.problems] == [("toy.notes_file", "notes.txt")]
    (folder / "notes.txt").write_text("beside the recipe\n")
    assert check(path).problems == []
    loaded = load_recipe(path)
    resolve_recipe_paths(loaded)
    assert loaded.args.notes_file == str(folder / "notes.txt")


def test_yaml_scalars_follow_yaml_1_2_and_bounds_give_their_reason():
    """`on`/`yes` are strings (not consent), `1e-3` is a number (as users mean it), and a bound says why."""
    text = TOY.replace("lr: 0.01", "lr: 1e-3").replace("name: toy-demo", "name: toy-demo\ndescription: on")
    loaded = load_recipe(text=text)
    assert loaded.recipe.train.lr == 0.001 and loaded.recipe.description == "on"
    with pytest.raises(RecipeInvalid) as info:
        load_recipe(text=TOY, overrides=["train.max_steps=20000000", "train.devices=2000"])
    messages = {p.path: p.message for p in info.value.problems}
    assert messages["train.max_steps"].startswith("must be at most 10,000,000: ")
    assert messages["train.devices"].startswith("must be at most 1,024: ")
    train = recipe_model("toy").model_json_schema()["$defs"]["JobTrainSpec"]
    assert train["properties"]["max_steps"]["maximum"] == 10**7


def test_merge_keys_may_be_overridden_but_plain_keys_not_repeated():
    merged = "  config:\n    <<: &base {width: 8, hidden: 4}\n    hidden: 16"
    text = TOY.replace("  config: {width: 8, hidden: 16}", merged)
    assert load_recipe(text=text).recipe.teacher.config == {"width": 8, "hidden": 16}
    with pytest.raises(RecipeInvalid) as info:
        load_recipe(text=TOY.replace("  hidden: 4", "  hidden: 4\n  hidden: 5"))
    (problem,) = info.value.problems
    assert problem.path == "student.hidden" and problem.line == 8 and "lines 7 and 8" in problem.message


@pytest.mark.parametrize("alias", ["latest", "LATEST", "v1", "v12"])
def test_an_alias_mlflow_reserves_is_refused_at_validate_time_not_after_training(alias):
    with pytest.raises(RecipeInvalid) as info:
        load_recipe(text=TOY, overrides=[f"registry.alias={alias}"])
    (problem,) = info.value.problems
    assert problem.path == "registry.alias" and "reserved by MLflow" in problem.message
    assert load_recipe(text=TOY, overrides=["registry.alias=v1-candidate"]).recipe.registry.alias == "v1-candidate"


@pytest.mark.parametrize(("override", "words"), [
    ("train.max_steps=010", "is not a number"),     # YAML 1.1: octal 8
    ("train.max_steps=1:30", "is not a number"),    # YAML 1.1: sexagesimal 90
    ("train.max_steps=0b11", "is not a number"),    # YAML 1.1: binary 3
    ("train.max_steps=true", "true/false is not a number"),
    ("train.lr='0.01'", "is not a number"),
    ("tracking.uri=javascript:alert(1)", "not an MLflow tracking store"),
    ("tracking.uri=ftp://host/x", "not an MLflow tracking store"),
])
def test_yaml_1_1_surprises_and_foreign_uris_are_one_keyed_error(override, words):
    with pytest.raises(RecipeInvalid) as info:
        load_recipe(text=TOY, overrides=[override])
    (problem,) = info.value.problems
    assert problem.path == override.partition("=")[0] and words in problem.message


def test_yaml_1_2_numbers_and_mlflow_uris_are_accepted():
    loaded = load_recipe(text=TOY, overrides=["train.max_steps=0o17", "train.log_every_n_steps=0x10",
                                              "tracking.uri=sqlite+pysqlite:///tmp/m.db"])
    assert loaded.recipe.train.max_steps == 15 and loaded.recipe.train.log_every_n_steps == 16
    described = TOY.replace("name: toy-demo", "name: toy-demo\ndescription: 010")
    assert load_recipe(text=described).recipe.description == "010"  # a string field keeps the text


def test_a_key_given_twice_with_o_is_refused_not_silently_the_last():
    with pytest.raises(RecipeInvalid) as info:
        load_recipe(text=TOY, overrides=["train.max_steps=5", "train.max_steps=6"])
    (problem,) = info.value.problems
    assert problem.path == "train.max_steps" and "set 2 times" in problem.message
