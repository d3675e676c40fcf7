"""KOALA (Lee et al., 2023): shrink an SDXL-family U-Net (convert/koala.py) and distil it with
task + output + self-attention feature knowledge distillation.

    .venv/bin/athanor submit recipes/koala_tiny.yaml --wait
    .venv/bin/python -m pytest tests/distill/koala tests/convert/test_koala.py -q

Evaluation logs the same keys for the teacher, the trained student and (with `eval.include_untrained`)
the untrained student: `params`, `peak_mem_mb` (one U-Net step of that model alone), `noise_mse` /
`latent_mse` (fidelity to the teacher; 0 for the teacher itself) and, when the teacher ships the
Fashion-canvas testbed's judge and the eval prompts are canvas captions, `box_accuracy` (prompted items
the judge finds in their boxes); the last three per generated image (`PerSample`, seed-major rows).
The spine adds `latency_ms` from
`speed_probe` (one U-Net step on `koala.latency_device`), timed interleaved with the teacher's.
Sample grids (teacher row, model row; same seeds) are written as PNGs into the `artifact_dir` the spine
passes to `evaluate`. The method object holds no per-job state: every call is a function of its inputs.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import UNet2DConditionModel

from athanor.convert.koala import block_map, build_student
from athanor.convert.module_utils import count_params
from athanor.distill.intervals import PerSample
from athanor.distill.koala import evaluation as koala_eval
from athanor.distill.koala.canvases import CanvasRows, check_canvas_teacher
from athanor.distill.koala.config import KoalaArgs, KoalaStudent
from athanor.distill.koala.data import (
    KoalaTeacher,
    PromptRows,
    data_free_set,
    image_caption_set,
    load_teacher,
    prompt_conditioning,
)
from athanor.distill.koala.sampling import teacher_latents
from athanor.distill.koala.train import KoalaModule, Rollout, feature_pairs
from athanor.distill.loaders import SeededLoader
from athanor.distill.method_base import MethodBase
from athanor.distill.spec import DataSpec, Direction, EvalSpec, MethodData, RecipeError, ResolvedSource, TrainSpec

logger = logging.getLogger(__name__)


def _threads(args: KoalaArgs) -> None:
    if args.cpu_threads is not None:
        torch.set_num_threads(args.cpu_threads)


def _to_accelerator(*models: torch.nn.Module | None) -> None:
    """Encoding and evaluation sampling run on the GPU when there is one (SDXL on a CPU: hours)."""
    if torch.cuda.is_available():
        for model in models:
            if model is not None:
                model.to("cuda")


class Koala(MethodBase[KoalaTeacher, UNet2DConditionModel, KoalaArgs, dict[str, Any]]):
    """The KOALA method (see the module docstring). The export is a diffusers U-Net directory (artifacts, no
    transformers Auto class); every KOALA metric is finite for teacher and student alike."""

    name = "koala"
    Args = KoalaArgs
    Student = KoalaStudent
    metrics: dict[str, Direction] = {
        "params": "neutral", "peak_mem_mb": "neutral", "noise_mse": "lower", "latent_mse": "lower",
        "box_accuracy": "higher"}
    """noise_mse / latent_mse are 0 for the teacher, so a gate cannot retain them; box_accuracy (only with a
    teacher that ships the testbed's judge) and the speed-up can be gated."""

    def load_teacher(self, source: ResolvedSource, *, meta: bool = False) -> KoalaTeacher:
        return load_teacher(source, meta=meta)

    def teacher_model(self, teacher: KoalaTeacher) -> UNet2DConditionModel:
        return teacher.unet

    def convert(self, teacher: KoalaTeacher, student: KoalaStudent, args: KoalaArgs) -> UNet2DConditionModel:
        _threads(args)
        custom = student.model_dump(exclude={"preset"})
        model, bmap = build_student(teacher.unet, student.preset, selection=args.layer_selection, **custom)
        logger.info("KOALA %s: %d blocks copied from the teacher", student.preset, len(bmap.entries))
        return model

    def _scheduler_config(self, teacher: KoalaTeacher, args: KoalaArgs) -> dict:
        # diffusers resets keys listed in `_use_default_values` on from_config: an override would vanish.
        config = {k: v for k, v in teacher.scheduler_config.items() if k != "_use_default_values"}
        if args.prediction_type != "auto":
            config["prediction_type"] = args.prediction_type
        return config

    def _resolution(self, teacher: KoalaTeacher, args: KoalaArgs) -> tuple[int, int]:
        """(height, width) in pixels."""
        scale = teacher.vae_scale
        if args.resolution is None:
            return tuple(side * scale for side in teacher.sample_hw)
        if args.resolution % scale:
            raise RecipeError("koala.resolution", args.resolution, f"must be a multiple of the VAE factor {scale}")
        return args.resolution, args.resolution

    def _latent_hw(self, teacher: KoalaTeacher, resolution: tuple[int, int]) -> tuple[int, int]:
        return resolution[0] // teacher.vae_scale, resolution[1] // teacher.vae_scale

    def data(self, teacher: KoalaTeacher, data: DataSpec, args: KoalaArgs) -> MethodData:
        resolution = self._resolution(teacher, args)
        _to_accelerator(teacher.vae, *teacher.text_encoders)
        payload = self._eval_payload(teacher, args, resolution)
        if args.train_data == "data_free":
            train = self._data_free_set(teacher, data, args, resolution)
        elif args.train_data == "canvases":
            check_canvas_teacher(teacher, resolution)
            train = CanvasRows(teacher, args.canvas_examples, data.seed, args.canvas_split)
        else:
            if resolution[0] != resolution[1]:
                raise RecipeError("koala.resolution", args.resolution, "image-caption training crops square "
                                  f"images, but this U-Net's is {resolution[0]}x{resolution[1]}: set a square side")
            train = image_caption_set(teacher, data, args.image_column, resolution[0], args.cache_dir)
        loader = SeededLoader(train, batch_size=data.batch_size, seed=data.seed, num_workers=data.num_workers)
        return MethodData(train_dataloader=loader, eval=payload, num_train_examples=len(train))

    def _eval_payload(self, teacher: KoalaTeacher, args: KoalaArgs, resolution: tuple[int, int]) -> dict:
        """Eval prompts' conditioning, the empty prompt's (guidance), and one fixed noise per eval seed.
        `latent_size` and `resolution` are (height, width): of the U-Net's input and of the images."""
        if not args.eval_prompts or not args.eval_seeds:
            raise RecipeError("koala.eval_prompts", args.eval_prompts,
                              "give at least one eval prompt and one eval seed")
        cond = prompt_conditioning(teacher, list(args.eval_prompts), resolution)
        uncond = prompt_conditioning(teacher, [""], resolution)
        size, channels = self._latent_hw(teacher, resolution), teacher.unet.config.in_channels
        noises = [torch.randn(len(args.eval_prompts), channels, *size, generator=torch.Generator().manual_seed(s))
                  for s in args.eval_seeds]
        return {"cond": cond, "uncond": uncond, "noises": noises, "latent_size": size, "resolution": resolution}

    def _data_free_set(self, teacher: KoalaTeacher, data: DataSpec, args: KoalaArgs,
                       resolution: tuple[int, int]) -> PromptRows:
        """Teacher-sampled latents for the training prompts (see `distill/koala/sampling.py` for why)."""
        if not args.prompts:
            raise RecipeError("koala.prompts", args.prompts, "data-free mode needs at least one training prompt")
        cond = prompt_conditioning(teacher, list(args.prompts), resolution)
        uncond = prompt_conditioning(teacher, [""], resolution)
        _to_accelerator(teacher.unet)
        latents = teacher_latents(teacher.unet, self._scheduler_config(teacher, args), cond, uncond,
                                  self._latent_hw(teacher, resolution), steps=args.data_free_steps,
                                  guidance=args.guidance_scale, samples=args.data_free_samples, seed=data.seed)
        logger.info("data-free: %d teacher samples (%d steps each) for %d prompts", len(latents),
                    args.data_free_steps, len(args.prompts))
        return data_free_set(cond, latents, args.data_free_examples)

    def lightning_module(self, teacher: KoalaTeacher, student: UNet2DConditionModel, data: MethodData,
                         args: KoalaArgs, train: TrainSpec) -> KoalaModule:
        if args.ema and train.strategy == "deepspeed_stage_3":
            raise RecipeError("koala.ema", True, "EMA needs whole parameters; use strategy ddp or deepspeed_stage_2")
        bmap = block_map(dict(teacher.unet.config), dict(student.config), args.layer_selection)
        pairs = feature_pairs(bmap, dict(student.config), args.feature_sites)
        scheduler = self._scheduler_config(teacher, args)
        if args.kd_weighting == "x0" and scheduler.get("prediction_type", "epsilon") != "epsilon":
            raise RecipeError("koala.kd_weighting", "x0", f"x0 weights are for ε-prediction, this U-Net predicts "
                              f"{scheduler.get('prediction_type')!r}: use kd_weighting uniform")
        return KoalaModule(student, teacher, pairs, scheduler, train,
                           weights=(args.lambda_task, args.lambda_out, args.lambda_feat),
                           gradient_checkpointing=args.gradient_checkpointing,
                           ema_decay=args.ema_decay if args.ema else None,
                           uncond=data.eval["uncond"] if args.uncond_prob > 0 or args.kd_guidance
                           or args.rollout_prob > 0 else None,
                           uncond_prob=args.uncond_prob, kd_guidance=args.kd_guidance,
                           kd_x0_cap=args.kd_x0_cap if args.kd_weighting == "x0" else None,
                           rollout=Rollout(args.rollout_prob, args.eval_steps, args.guidance_scale)
                           if args.rollout_prob > 0 else None)

    def trained_student(self, module: KoalaModule) -> UNet2DConditionModel:
        model = module.trained()
        module.student_taps.remove()  # evaluation and export need no feature hooks
        module.teacher_taps.remove()
        model.disable_gradient_checkpointing()
        return model

    def evaluate(self, model: UNet2DConditionModel, teacher: KoalaTeacher, data: MethodData, eval: EvalSpec,
                 args: KoalaArgs, artifact_dir: Path) -> dict[str, float | PerSample]:
        _threads(args)  # again: Lightning's DDP/DeepSpeed launchers reset the thread count
        _to_accelerator(model, teacher.unet, teacher.vae)
        payload = data.eval
        sampling = (payload, self._scheduler_config(teacher, args), args.eval_steps, args.guidance_scale)
        metrics: dict[str, float | PerSample] = {
            "params": float(count_params(model)),
            "peak_mem_mb": koala_eval.step_peak_memory_mb(model, payload, args.latency_batch, args.latency_device)}
        teacher_finals = [run["final"] for run in koala_eval.teacher_samples(teacher, *sampling)]
        if model is teacher.unet:  # the teacher vs itself is 0 by definition; skip a second sampling pass
            zeros = np.zeros(len(args.eval_prompts) * len(args.eval_seeds))  # a student's rows, all 0
            metrics.update(noise_mse=PerSample.mean(zeros), latent_mse=PerSample.mean(zeros))
            finals, rows = teacher_finals, [[f] for f in teacher_finals]
        else:
            scores, finals = koala_eval.fidelity(model, teacher, *sampling)
            metrics.update(scores)
            rows = [[t, m] for t, m in zip(teacher_finals, finals)]
        scenes = koala_eval.judged_scenes(teacher, list(args.eval_prompts), payload["resolution"])
        if scenes is not None:
            metrics["box_accuracy"] = koala_eval.box_accuracy(teacher.judge, finals, scenes)
        _write_grids(rows, teacher, Path(artifact_dir), "teacher" if model is teacher.unet else "teacher_vs_student")
        return metrics

    def speed_probe(self, model: UNet2DConditionModel, teacher: KoalaTeacher, data: MethodData, eval: EvalSpec,
                    args: KoalaArgs) -> Callable[[], Any]:
        """One U-Net step on the latency batch, on `koala.latency_device` (the model is moved there and
        stays: the probe is timed right away, and evaluation and training move models where they need)."""
        _threads(args)
        device = koala_eval.measurement_device(model, args.latency_device)
        model.to(device).eval()
        inputs, kwargs = koala_eval.step_inputs(model, data.eval, args.latency_batch, device)

        @torch.no_grad()
        def step() -> Any:
            return model(*inputs, **kwargs).sample

        return step

    def export(self, student: UNet2DConditionModel, teacher: KoalaTeacher, out_dir: Path, args: KoalaArgs) -> Path:
        """A directory `UNet2DConditionModel.from_pretrained` loads, plus the block map used."""
        out_dir = Path(out_dir)
        student.save_pretrained(out_dir, safe_serialization=True)
        bmap = block_map(dict(teacher.unet.config), dict(student.config), args.layer_selection)
        (out_dir / "koala_block_map.json").write_text(bmap.to_json())
        settings = args.model_dump(include={"feature_sites", "layer_selection", "lambda_task", "lambda_out",
                                            "lambda_feat", "train_data", "kd_weighting", "kd_x0_cap", "kd_guidance",
                                            "uncond_prob", "rollout_prob", "ema"})
        (out_dir / "koala.json").write_text(json.dumps({"teacher": teacher.description, **settings}, indent=1))
        return out_dir


def _write_grids(rows: list[list[torch.Tensor]], teacher: KoalaTeacher, folder: Path, title: str) -> list[Path]:
    """One PNG per eval seed: one row per model (teacher first), one column per eval prompt."""
    return [koala_eval.save_grid([koala_eval.to_images(teacher, latents) for latents in seed_rows],
                                 folder / f"{title}_seed{i}.png") for i, seed_rows in enumerate(rows)]
