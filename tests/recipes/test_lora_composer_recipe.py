"""LoRA-Composer through the job spine: the shipped recipe's bad-input errors at `athanor validate`, and
`recipes/lora_composer_fashion.yaml` end to end (`athanor submit --wait`): SUCCEEDED, the same keys before
(set_adapters mixing) and after (LoRA-Composer), one U-Net holding every adapter, sample grids and attention
maps in MLflow, the `plain` comparison row on both sides, a registry version whose download rebuilds the composer
and reproduces the job's images.

    .venv/bin/python -m pytest tests/recipes/test_lora_composer_recipe.py -q              # all (slow: ~10 min)
    .venv/bin/python -m pytest tests/recipes/test_lora_composer_recipe.py -q -m "not slow"
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from harness import RECIPES, artifact_files, athanor, child_runs, mlflow_client

from athanor.jobs.validate import check

RECIPE = RECIPES / "lora_composer_fashion.yaml"
TESTBED = Path(__file__).parents[2] / "distill" / "lora_composer" / "testbed"


def _edited(tmp_path: Path, edit) -> Path:
    """The shipped recipe with `edit(recipe_dict)` applied (overrides address dict keys, not list items)."""
    recipe = yaml.safe_load(RECIPE.read_text())
    edit(recipe["lora_composer"])
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _box_outside(section):
    section["scenes"][0]["regions"][1]["box"] = [0.5, 0.1, 1.2, 0.9]


def _unknown_concept(section):
    section["scenes"][1]["regions"][0]["concept"] = "coat"


@pytest.mark.parametrize("edit, key, words", [
    (_box_outside, "lora_composer.scenes[0].regions[1].box", "inside the canvas"),
    (_unknown_concept, "lora_composer.scenes[1].regions[0].concept", "use one of"),
])
def test_bad_scenes_are_one_clear_error(tmp_path, edit, key, words):
    report = check(_edited(tmp_path, edit))
    assert [p.path for p in report.problems] == [key], report.problems
    assert words in report.problems[0].message


@pytest.mark.parametrize("override, words", [
    ("lora_composer.concepts.bag.path=loras/nowhere", "save_lora_adapter"),
    ("lora_composer.concepts.bag.path=../../linvideo/testbed/classifier.safetensors", "inside the teacher directory"),
])
def test_bad_lora_paths_are_one_clear_error(override, words):
    report = check(RECIPE, overrides=[override])
    assert [p.path for p in report.problems] == ["lora_composer.concepts.bag.path"], report.problems
    assert words in report.problems[0].message


def test_a_lora_that_does_not_fit_the_unet_is_refused(tmp_path):
    """A LoRA trained for another U-Net (different widths): refused at validate, naming the key and module."""
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig

    from athanor.distill.lora_composer.testbed import UNET_CONFIG

    other = UNet2DConditionModel(**{**UNET_CONFIG, "block_out_channels": (32, 64, 96)})
    other.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]),
                      adapter_name="other")
    other.save_lora_adapter(tmp_path / "other", adapter_name="other")
    report = check(RECIPE, overrides=[f"lora_composer.concepts.dress.path={tmp_path / 'other'}"])
    assert [p.path for p in report.problems] == ["lora_composer.concepts.dress.path"], report.problems
    assert "does not fit" in report.problems[0].message


def test_overlapping_boxes_warn_but_validate(tmp_path, caplog):
    def overlap(section):
        section["scenes"][0]["regions"][1]["box"] = [0.3, 0.0625, 0.8, 0.9375]

    assert not check(_edited(tmp_path, overlap)).problems
    assert any("overlap by" in r.getMessage() for r in caplog.records)


@pytest.mark.slow
def test_fashion_recipe_end_to_end(tmp_path):
    from mlflow.artifacts import download_artifacts
    from safetensors.torch import load_file

    from athanor.distill.lora_composer.method import load_export
    from athanor.jobs.store import JobStore

    # The shipped recipe samples 7 listed + 16 generated scenes x 4 seeds x 20 steps on each side, with the ablation
    # ladder (its figures are in its header). Nothing below depends on how many scenes, seeds, steps or rungs: CI
    # samples each listed scene once, in 10 steps, with the plain row (tests/distill/lora_composer/test_scenes.py
    # checks the generated scenes, test_arms.py the ladder).
    shorter = ["lora_composer.seeds=[0]", "lora_composer.generate_scenes=null", "lora_composer.steps=10",
               "lora_composer.guidance_steps=5", "eval.latency_repeats=1", "lora_composer.compare=[plain]"]
    done = athanor("submit", str(RECIPE), "--wait", "--no-progress", *[a for o in shorter for a in ("-o", o)],
                   home=tmp_path, timeout=1500)
    (job,) = JobStore(tmp_path).list()
    assert job.status == "SUCCEEDED", f"{job.error}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    before, after = job.result["before"], job.result["after"]
    assert set(before) == set(after)
    for n in (2, 3):
        assert {f"presence_{n}", f"confusion_{n}", f"vanishing_{n}"} <= set(after)
    assert {f"presence_{c}" for c in ("sneaker", "bag", "trouser", "dress")} <= set(after)
    # One U-Net holds the four adapters: under 1.2x the base weights, far below four pipeline copies.
    assert after["weights_mb"] < 1.2 * after["base_weights_mb"] < after["copies_weights_mb"] / 3
    assert before["params"] == after["params"]
    # the plain row (base model, class words, same judge/boxes/seeds): sampled once, the same figures on both sides
    plain = {k: v for k, v in after.items() if k.startswith("arm_plain/")}
    assert {f"arm_plain/{k}" for k in ("presence_2", "presence_3", "confusion_2", "leakage")} <= set(plain)
    assert plain == {k: before[k] for k in plain}
    # per-box samples: paired intervals of after - before; the shipped gate holds on this one-seed run too
    differences = job.result["intervals"]["differences"]["after - before"]
    assert {"presence_2", "presence_sneaker", "leakage"} <= set(differences)
    assert job.result["gate"]["passed"], job.result["gate"]

    client = mlflow_client(tmp_path)
    assert {"baseline", "converted"} <= set(child_runs(client, job.mlflow_run_id))
    files = artifact_files(client, job.mlflow_run_id)
    for name in ("before/samples.png", "after/samples.png", "after/attention_maps.png", "arm_plain/samples.png"):
        assert any(p.endswith(name) for p in files), files
    (version,) = client.search_model_versions("name='lora-composer-fashion'")
    assert str(version.version) == job.model_version

    pulled = Path(download_artifacts("models:/lora-composer-fashion@candidate", dst_path=str(tmp_path / "pulled")))
    export = next(p.parent for p in pulled.rglob("composition.json"))
    composer, scenes, noise = load_export(export)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the job sampled (lora_composer.cpu_threads: 1): the same reduction order
    try:
        images, _ = composer.sample(scenes[0], noise)
    finally:
        torch.set_num_threads(threads)
    job_images = load_file(Path(job.result["export"]).parent / "artifacts" / "after" / "samples.safetensors")
    assert torch.equal(images, job_images["scene_0"])
