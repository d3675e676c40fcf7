"""KOALA evaluation, speed probe and export: the same keys for teacher and student, a pure `evaluate`,
peak memory of the measured model alone, the probe the spine times, and an export diffusers reloads.

    .venv/bin/python -m pytest tests/distill/koala/test_evaluation.py -q
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel
from PIL import Image

from athanor.convert.module_utils import count_params
from athanor.distill.intervals import split
from athanor.distill.koala import evaluation as koala_eval
from athanor.distill.koala.sampling import sample
from athanor.distill.memory import LiveBytes
from athanor.distill.spec import EvalSpec
from athanor.distill.timing import interleaved_latency

pytestmark = pytest.mark.usefixtures("one_torch_thread")
KEYS = {"params", "peak_mem_mb", "noise_mse", "latent_mse"}


def test_live_bytes_counts_the_peak_of_live_storages():
    with LiveBytes() as counter:
        a = torch.ones(1000)  # 4000 B
        b = a * 2  # 8000 B live
        del a
        c = b + 1  # a freed first: 8000 B
        d = c.view(10, 100)  # a view allocates nothing
        del b, c, d
        e = torch.zeros(3000)  # 12000 B, the peak
    assert counter.peak == 12000
    del e


class FakeAllocator:
    """The CUDA allocator statistics peak_memory_mb reads, with other models already resident."""

    def __init__(self, resident_mib: int) -> None:
        self.current = self.peak = resident_mib * 2**20

    def allocate(self, mib: int) -> None:
        self.current += mib * 2**20
        self.peak = max(self.peak, self.current)

    def free(self, mib: int) -> None:
        self.current -= mib * 2**20


def test_gpu_peak_memory_is_the_models_own(monkeypatch):
    """On a GPU the teacher, VAE, text encoders and EMA are resident while a model is measured: its
    figure must be its weights plus what its step allocates, not the whole device's peak."""
    weights_mib, others_mib, step_mib = 100, 5000, 300
    allocator = FakeAllocator(others_mib + weights_mib)
    for name, fn in {"synchronize": lambda device=None: None,
                     "reset_peak_memory_stats": lambda device=None: setattr(allocator, "peak", allocator.current),
                     "memory_allocated": lambda device=None: allocator.current,
                     "max_memory_allocated": lambda device=None: allocator.peak}.items():
        monkeypatch.setattr(torch.cuda, name, fn)
    weight = SimpleNamespace(device=torch.device("cuda", 0), numel=lambda: weights_mib * 2**18, element_size=lambda: 4)
    model = SimpleNamespace(parameters=lambda: iter([weight]), buffers=lambda: iter([]))

    def step() -> None:
        allocator.allocate(step_mib - 50)  # activations
        allocator.allocate(50)  # the output
        allocator.free(step_mib)

    assert koala_eval.peak_memory_mb(model, step) == pytest.approx(weights_mib + step_mib)


def test_evaluate_is_pure_with_the_same_keys_for_teacher_and_student(tiny, make_student, tmp_path):
    method, loaded, teacher = tiny
    student = make_student("koala-700m")
    data = method.data(teacher, loaded.recipe.data, loaded.args)
    spec = EvalSpec(latency_repeats=1)
    first = method.evaluate(student, teacher, data, spec, loaded.args, tmp_path / "untrained")  # no 'before' first
    before = method.evaluate(teacher.unet, teacher, data, spec, loaded.args, tmp_path / "before")
    again = method.evaluate(student, teacher, data, spec, loaded.args, tmp_path / "after")
    assert set(before) == set(first) == KEYS <= set(method.metrics)  # latency_ms and speedup are the spine's
    (first_values, first_rows), (again_values, again_rows) = split(first), split(again)
    assert first_values == again_values and vars(method) == {}  # nothing carried from one call to the next
    assert all(np.array_equal(first_rows[k].rows, again_rows[k].rows) for k in first_rows)
    # fidelity is per generated image (2 prompts x 1 seed), the teacher's rows are its zeros against itself
    assert set(first_rows) == set(split(before)[1]) == {"noise_mse", "latent_mse"}
    assert first_rows["noise_mse"].n == before["noise_mse"].n == 2
    assert before["noise_mse"].value == 0 and first["noise_mse"].value > 0 and first["latent_mse"].value > 0
    assert before["params"] == count_params(teacher.unet) and first["params"] == count_params(student)
    assert first["peak_mem_mb"] < before["peak_mem_mb"]
    (teacher_grid,) = (tmp_path / "before").glob("*.png")
    (student_grid,) = (tmp_path / "after").glob("*.png")
    assert Image.open(teacher_grid).size == (2 * 64, 64)  # 2 eval prompts, the teacher's row
    assert Image.open(student_grid).size == (2 * 64, 2 * 64)  # teacher row above student row


def test_speed_probe_is_one_unet_step_on_the_latency_device(tiny, make_student):
    method, loaded, teacher = tiny
    student = make_student("koala-700m").to(torch.bfloat16)  # a student trained under bf16-true
    data = method.data(teacher, loaded.recipe.data, loaded.args)
    args = loaded.args.model_copy(update={"latency_batch": 3})
    probes = {"teacher": method.speed_probe(teacher.unet, teacher, data, EvalSpec(), args),
              "student": method.speed_probe(student, teacher, data, EvalSpec(), args)}
    size = data.eval["latent_size"]
    assert probes["student"]().shape == (3, 4, *size) and probes["teacher"]().dtype == torch.float32
    assert set(interleaved_latency(probes, repeats=1)) == {"teacher", "student"}
    assert next(student.parameters()).device.type == "cpu" and not student.training


def test_export_reloads_with_diffusers(tiny, make_student, tmp_path):
    method, loaded, teacher = tiny
    student = make_student("koala-700m")
    path = method.export(student, teacher, tmp_path / "export", loaded.args)
    reloaded = UNet2DConditionModel.from_pretrained(path)
    data = method.data(teacher, loaded.recipe.data, loaded.args)
    (sample, t), kwargs = koala_eval.step_inputs(student, data.eval, 2, torch.device("cpu"))
    with torch.no_grad():
        assert torch.allclose(reloaded(sample, t, **kwargs).sample, student(sample, t, **kwargs).sample, atol=1e-6)
    entries = json.loads((path / "koala_block_map.json").read_text())["entries"]
    assert entries["up_blocks.0.resnets.1"] == "up_blocks.0.resnets.2"
    assert method.auto_class is None and method.mlflow_flavor == "artifacts"


def test_fidelity_rows_are_images_whose_mean_is_the_metric(tiny, make_student):
    """noise_mse / latent_mse as PerSample (one row per prompt and seed) equal the means over every
    prediction and every sampled latent, computed here from the teacher's trajectories directly."""
    method, loaded, teacher = tiny
    student = make_student("koala-700m").eval()
    args = loaded.args.model_copy(update={"eval_seeds": [0, 1]})
    data = method.data(teacher, loaded.recipe.data, args)
    scheduler = method._scheduler_config(teacher, args)
    sampling = (data.eval, scheduler, args.eval_steps, args.guidance_scale)
    scores, _ = koala_eval.fidelity(student, teacher, *sampling)
    from athanor.distill.koala.data import unet_kwargs
    from athanor.distill.koala.sampling import guided_conditioning

    cond, uncond = data.eval["cond"], data.eval["uncond"]
    kwargs = unet_kwargs(guided_conditioning(cond, uncond, args.guidance_scale), torch.device("cpu"), torch.float32)
    squared, latents = [], []
    with torch.no_grad():
        for run, noise in zip(koala_eval.teacher_samples(teacher, *sampling), data.eval["noises"]):
            for (x, t), teacher_pred in zip(run["inputs"], run["preds"]):
                squared.append(((student(x, t, **kwargs).sample - teacher_pred) ** 2).numpy().astype(np.float64))
            final, _, _ = sample(student, scheduler, cond, uncond, noise, args.eval_steps, args.guidance_scale)
            latents.append(((final - run["final"]) ** 2).numpy().astype(np.float64))
    assert scores["noise_mse"].n == scores["latent_mse"].n == 2 * 2  # prompts x seeds
    assert scores["noise_mse"].value == pytest.approx(float(np.mean(squared)), rel=1e-6)
    assert scores["latent_mse"].value == pytest.approx(float(np.mean(latents)), rel=1e-6)
