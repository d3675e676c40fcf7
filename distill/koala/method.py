"""KOALA (Lee et al., 2023): shrink an SDXL-family U-Net (convert/koala.py) and distil it with
task + output + self-attention feature knowledge distillation.

    .venv/bin/athanor submit recipes/koala_tiny.yaml --wait
    .venv/bin/python -m pytest tests/distill/test_koala.py tests/convert/test_koala.py -q

Evaluation logs the same keys before (teacher) and after (trained student): `params_m`, `step_ms`
(one U-Net step, on CPU by default), `speedup` (teacher step_ms / model step_ms), `peak_mem_mb`,
`noise_mse` / `latent_mse` (fidelity to the teacher) and `init_noise_mse` / `init_latent_mse` (the
student right after construction, measured during the 'before' evaluation, so that every run
shows what training gained). Sample grids (teacher row, model row; same seeds) are written as PNGs
into `self.artifact_dir` (set by the spine before each evaluate) and listed in `self.artifacts`.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from diffusers import UNet2DConditionModel
from pydantic import Field
from torch.utils.data import DataLoader

from convert.koala import block_map, build_student
from distill.koala import evaluation as koala_eval
from distill.koala.data import KoalaTeacher, data_free_set, encode_prompts, image_caption_set, load_teacher, time_ids
from distill.koala.train import KoalaModule, feature_pairs
from distill.spec import DataSpec, EvalSpec, MethodData, RecipeError, ResolvedSource, Section, TrainSpec

logger = logging.getLogger(__name__)

DEFAULT_PROMPTS = [
    "a photo of an astronaut riding a horse on the moon",
    "a watercolor painting of a lighthouse at dawn",
    "a close-up photo of a red fox in the snow",
    "an isometric illustration of a tiny cozy cabin",
]


class KoalaStudent(Section):
    """The student U-Net: a KOALA preset, or per-stage counts with preset 'custom'."""

    preset: Literal["koala-1b", "koala-700m", "custom"] = "koala-1b"
    """koala-1b (SDXL: 1,161M parameters), koala-700m (782M, no mid block), or custom."""
    layers_per_block: int | list[int] | None = None
    """custom: ResBlocks per encoder stage (decoder stages get one more), ≤ the teacher's."""
    transformer_depth: list[int] | None = None
    """custom: transformer layers per encoder stage (≤ the teacher's; the last also sets the mid
    block's depth; ignored for stages without attention)."""
    decoder_transformer_depth: list[int] | None = None
    """custom: transformer layers per decoder stage, decoder order (default: encoder's reversed)."""
    mid_block: bool | None = None
    """custom: keep the mid block (default: as the teacher)."""


class KoalaArgs(Section):
    """KOALA distillation settings (the recipe's `koala:` section)."""

    lambda_task: float = Field(1.0, ge=0)
    """Weight of MSE(student prediction, ground-truth ε / v); unused in data-free mode."""
    lambda_out: float = Field(1.0, ge=0)
    """Weight of MSE(student prediction, teacher prediction)."""
    lambda_feat: float = Field(1.0, ge=0)
    """Weight of the feature KD term (sum of MSEs over feature sites)."""
    feature_sites: Literal["self_attention", "block"] = "self_attention"
    """'self_attention': attn1 outputs of the kept transformer layers (KOALA); 'block': U-Net
    stage outputs (BK-SDM)."""
    layer_selection: Literal["even", "first", "last"] = "even"
    """Which teacher transformer layers a reduced stack keeps: evenly spaced (first and last
    kept), the first ones, or the last ones."""
    prediction_type: Literal["auto", "epsilon", "v_prediction"] = "auto"
    """What the U-Net predicts; 'auto' takes the teacher scheduler's prediction_type."""
    data_free: bool = False
    """Train on noised latents and `prompts` (teacher targets only) instead of `data:` images."""
    prompts: list[str] = Field(default_factory=lambda: list(DEFAULT_PROMPTS))
    """Training prompts for data-free mode."""
    data_free_examples: int = Field(256, ge=1)
    """Examples per data-free epoch (prompts repeat; noise is fresh every step)."""
    image_column: str = "image"
    """Image column of the image-caption dataset (captions: `data.text_column`)."""
    resolution: int | None = Field(None, ge=8)
    """Training/eval resolution in pixels (default: the U-Net's sample_size × the VAE factor)."""
    cache_dir: str | None = None
    """Directory caching encoded latents and text embeddings of the image-caption dataset."""
    gradient_checkpointing: bool = False
    """Recompute student activations in backward (less memory, ~30% slower)."""
    ema: bool = False
    """Keep an exponential moving average of the student; evaluate and export the EMA weights."""
    ema_decay: float = Field(0.999, gt=0, lt=1)
    """EMA decay per optimizer step."""
    eval_prompts: list[str] = Field(default_factory=lambda: list(DEFAULT_PROMPTS))
    """Fixed prompts for fidelity metrics and sample grids."""
    eval_seeds: list[int] = Field(default_factory=lambda: [0, 1])
    """Fixed seeds (one initial noise each, shared by teacher and student)."""
    eval_steps: int = Field(20, ge=1)
    """Denoising steps for evaluation sampling (the teacher's scheduler class)."""
    guidance_scale: float = Field(5.0, ge=1.0)
    """Classifier-free guidance for evaluation sampling (1 disables it)."""
    latency_device: Literal["cpu", "model"] = "cpu"
    """Where per-step latency and peak memory are measured: 'cpu', or the model's own device."""
    latency_batch: int = Field(1, ge=1)
    """Latents per timed U-Net step."""
    cpu_threads: int | None = Field(None, ge=1)
    """Torch intra-op CPU threads for the whole job (None: torch's default). 1 avoids OpenMP
    oversubscription on a CPU shared with other processes, which can slow CPU runs tenfold."""


def _threads(args: KoalaArgs) -> None:
    if args.cpu_threads is not None:
        torch.set_num_threads(args.cpu_threads)


def _to_accelerator(*models: torch.nn.Module | None) -> None:
    """Encoding and evaluation sampling run on the GPU when there is one (SDXL on a CPU: hours)."""
    if torch.cuda.is_available():
        for model in models:
            if model is not None:
                model.to("cuda")


class Koala:
    """The KOALA method (see the module docstring)."""

    name: ClassVar[str] = "koala"
    Args: ClassVar[type[Section]] = KoalaArgs
    Student: ClassVar[type[Section]] = KoalaStudent
    trains: ClassVar[bool] = True
    mlflow_flavor: ClassVar[str] = "artifacts"
    mlflow_task: ClassVar[str | None] = None

    def __init__(self) -> None:
        self.artifact_dir: Path | None = None
        self.artifacts: list[Path] = []
        self.initial_student: UNet2DConditionModel | None = None
        self._init_metrics: dict[str, float] | None = None
        self._teacher_ms: float | None = None

    def load_teacher(self, source: ResolvedSource, *, meta: bool = False) -> KoalaTeacher:
        return load_teacher(source, meta=meta)

    def teacher_model(self, teacher: KoalaTeacher) -> UNet2DConditionModel:
        return teacher.unet

    def convert(self, teacher: KoalaTeacher, student: KoalaStudent, args: KoalaArgs) -> UNet2DConditionModel:
        _threads(args)
        custom = student.model_dump(exclude={"preset"})
        model, bmap = build_student(teacher.unet, student.preset, selection=args.layer_selection, **custom)
        logger.info("KOALA %s: %d blocks copied from the teacher", student.preset, len(bmap.entries))
        self.initial_student = model  # still untrained when the 'before' evaluation runs
        return model

    def _scheduler_config(self, teacher: KoalaTeacher, args: KoalaArgs) -> dict:
        # diffusers resets keys listed in `_use_default_values` on from_config: an override would vanish.
        config = {k: v for k, v in teacher.scheduler_config.items() if k != "_use_default_values"}
        if args.prediction_type != "auto":
            config["prediction_type"] = args.prediction_type
        return config

    def _resolution(self, teacher: KoalaTeacher, args: KoalaArgs) -> int:
        resolution = args.resolution or teacher.unet.config.sample_size * teacher.vae_scale
        if resolution % teacher.vae_scale:
            raise RecipeError("koala.resolution", resolution, f"must be a multiple of the VAE factor {teacher.vae_scale}")
        return resolution

    def data(self, teacher: KoalaTeacher, data: DataSpec, args: KoalaArgs) -> MethodData:
        resolution = self._resolution(teacher, args)
        _to_accelerator(teacher.vae, *teacher.text_encoders)
        if args.data_free:
            train = data_free_set(teacher, args.prompts, resolution, args.data_free_examples)
        else:
            train = image_caption_set(teacher, data, args.image_column, resolution, args.cache_dir)
        generator = torch.Generator().manual_seed(data.seed)
        loader = lambda: DataLoader(train, batch_size=data.batch_size, shuffle=True, generator=generator,  # noqa: E731
                                    num_workers=data.num_workers, drop_last=len(train) >= data.batch_size)
        if not args.eval_prompts or not args.eval_seeds:
            raise RecipeError("koala.eval_prompts", args.eval_prompts, "give at least one eval prompt and one eval seed")
        cond = encode_prompts(teacher, list(args.eval_prompts))
        uncond = encode_prompts(teacher, [""])
        if teacher.sdxl_conditioning:
            ids = time_ids((resolution, resolution), (0, 0), (resolution, resolution))
            cond["time_ids"], uncond["time_ids"] = ids.repeat(len(args.eval_prompts), 1), ids[None]
        size, channels = resolution // teacher.vae_scale, teacher.unet.config.in_channels
        noises = [torch.randn(len(args.eval_prompts), channels, size, size, generator=torch.Generator().manual_seed(s))
                  for s in args.eval_seeds]
        payload = {"cond": cond, "uncond": uncond, "noises": noises, "latent_size": size, "resolution": resolution}
        return MethodData(train_dataloader=loader, eval=payload, num_train_examples=len(train))

    def lightning_module(self, teacher: KoalaTeacher, student: UNet2DConditionModel, data: MethodData,
                         args: KoalaArgs, train: TrainSpec) -> KoalaModule:
        if args.ema and train.strategy == "deepspeed_stage_3":
            raise RecipeError("koala.ema", True, "EMA needs whole parameters; use strategy ddp or deepspeed_stage_2")
        bmap = block_map(dict(teacher.unet.config), dict(student.config), args.layer_selection)
        pairs = feature_pairs(bmap, dict(student.config), args.feature_sites)
        return KoalaModule(student, teacher, pairs, self._scheduler_config(teacher, args), train,
                           weights=(args.lambda_task, args.lambda_out, args.lambda_feat),
                           latent_size=data.eval["latent_size"], gradient_checkpointing=args.gradient_checkpointing,
                           ema_decay=args.ema_decay if args.ema else None)

    def trained_student(self, module: KoalaModule) -> UNet2DConditionModel:
        model = module.trained()
        module.student_taps.remove()  # evaluation and export need no feature hooks
        module.teacher_taps.remove()
        model.disable_gradient_checkpointing()
        return model

    def evaluate(self, model: UNet2DConditionModel, teacher: KoalaTeacher, data: MethodData, eval: EvalSpec,
                 args: KoalaArgs) -> dict[str, float]:
        _threads(args)  # again: Lightning's DDP/DeepSpeed launchers reset the thread count
        _to_accelerator(model, teacher.unet, teacher.vae)
        payload, is_teacher = data.eval, model is teacher.unet
        sampling = (payload, self._scheduler_config(teacher, args), args.eval_steps, args.guidance_scale)
        metrics = koala_eval.efficiency(model, payload, eval.latency_repeats, args.latency_batch, args.latency_device)
        if is_teacher:
            self._teacher_ms = metrics["step_ms"]
        elif self._teacher_ms is None:  # 'after' without a 'before' in this process
            self._teacher_ms = koala_eval.efficiency(teacher.unet, payload, eval.latency_repeats, args.latency_batch,
                                                     args.latency_device)["step_ms"]
        metrics["speedup"] = self._teacher_ms / metrics["step_ms"]
        runs = koala_eval.teacher_samples(teacher, *sampling)
        if is_teacher:  # the teacher vs itself is 0 by definition; skip a second sampling pass
            scores, finals = {"noise_mse": 0.0, "latent_mse": 0.0}, [r["final"] for r in runs]
            self._init_metrics = {f"init_{k}": math.nan for k in scores}
            if self.initial_student is not None:  # convert() ran and training has not yet
                _to_accelerator(self.initial_student)
                init_scores, finals = koala_eval.fidelity(self.initial_student, teacher, *sampling)
                self._init_metrics = {f"init_{k}": v for k, v in init_scores.items()}
        else:
            scores, finals = koala_eval.fidelity(model, teacher, *sampling)
        metrics.update(scores)
        metrics.update(self._init_metrics or {f"init_{k}": math.nan for k in scores})
        self._grids([r["final"] for r in runs], finals, teacher,
                    "teacher_vs_initial_student" if is_teacher else "teacher_vs_trained_student")
        return metrics

    def _grids(self, teacher_finals: list[torch.Tensor], model_finals: list[torch.Tensor], teacher: KoalaTeacher,
               title: str) -> None:
        """One PNG per seed: teacher row above model row, one column per eval prompt."""
        self.artifacts = []
        if self.artifact_dir is None:
            return
        for i, (t, m) in enumerate(zip(teacher_finals, model_finals)):
            rows = [koala_eval.to_images(teacher, t), koala_eval.to_images(teacher, m)]
            self.artifacts.append(koala_eval.save_grid(rows, Path(self.artifact_dir) / f"{title}_seed{i}.png"))

    def export(self, student: UNet2DConditionModel, teacher: KoalaTeacher, out_dir: Path, args: KoalaArgs) -> Path:
        """A directory `UNet2DConditionModel.from_pretrained` loads, plus the block map used."""
        out_dir = Path(out_dir)
        student.save_pretrained(out_dir, safe_serialization=True)
        bmap = block_map(dict(teacher.unet.config), dict(student.config), args.layer_selection)
        (out_dir / "koala_block_map.json").write_text(bmap.to_json())
        settings = args.model_dump(include={"feature_sites", "layer_selection", "lambda_task", "lambda_out",
                                            "lambda_feat", "data_free", "ema"})
        (out_dir / "koala.json").write_text(json.dumps({"teacher": teacher.description, **settings}, indent=1))
        return out_dir
