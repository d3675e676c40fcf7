"""LinVideo (2025): move a video diffusion transformer's self-attention layers to linear attention,
chosen automatically (one learnable gate per candidate layer, `convert/linvideo.py`) and trained
data-free with anytime distribution matching against the teacher (`loss.py`, `train.py`).

    .venv/bin/athanor submit recipes/linvideo_tiny.yaml --wait
    .venv/bin/python -m pytest tests/distill/linvideo tests/convert/test_linvideo.py -q

The untrained student (`eval.include_untrained`) is the hybrid switched before any training: the
target count of layers spread evenly over the candidates go linear with their initial feature maps.
After training the gates are rounded (`choose_linear`): layers at 0 become pure linear attention,
layers at 1 get their softmax processor back. Evaluation keys: see `evaluation.py` (class_accuracy over
every training caption by default); `evaluate` adds the step's latency at the evaluated clip size, the spine
`latency_ms` from `speed_probe` (one denoising step at linvideo.latency_*) and the speedup. Comparison arms
(`linvideo.compare`): `arms.py`.
"""

from __future__ import annotations

import copy
import json
import logging
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from athanor.convert import linvideo as lv
from athanor.convert.module_utils import count_params
from athanor.distill.fashion_mnist import CLASSES
from athanor.distill.intervals import PerSample
from athanor.distill.linvideo import arms as lv_arms
from athanor.distill.linvideo import evaluation as ev
from athanor.distill.linvideo.config import LinVideoArgs, LinVideoStudent
from athanor.distill.linvideo.data import (
    LinVideoTeacher,
    TrajectoryPoints,
    cached_trajectories,
    conditions_for,
    load_teacher,
)
from athanor.distill.linvideo.train import LinVideoModule
from athanor.distill.loaders import SeededLoader
from athanor.distill.method_base import MethodBase
from athanor.distill.spec import DataSpec, Direction, EvalSpec, MethodData, RecipeError, ResolvedSource, TrainSpec
from athanor.distill.timing import interleaved_latency

logger = logging.getLogger(__name__)


def _target(args: LinVideoArgs, candidates: int) -> int:
    if args.target is not None and args.target_fraction is not None:
        raise RecipeError("linvideo.target", args.target, "give target or target_fraction, not both")
    target = args.target if args.target is not None else round((args.target_fraction or 0.5) * candidates)
    if target > candidates:
        raise RecipeError("linvideo.target", target, f"only {candidates} candidate layers; give at most {candidates} "
                                                     "or list more in linvideo.candidate_layers")
    return target


def _finalize(model: torch.nn.Module, args: LinVideoArgs) -> torch.nn.Module:
    """Switch a model that still has hybrid layers (idempotent): the untrained copy the spine evaluates
    and times is switched here, by its (initial) gates."""
    if not lv.is_switched(model):
        candidates = len(lv.gate_values(model)) + len(lv.linear_layers(model))
        lv.switch(model, lv.choose_linear(model, _target(args, candidates)))
    return model


def _teacher_clips(teacher: LinVideoTeacher, payload: dict, args: LinVideoArgs) -> torch.Tensor:
    """The teacher's eval clips, sampled once per job (same noises every time) and kept in the payload."""
    if "teacher_clips" not in payload:
        payload["teacher_clips"] = ev.generate(teacher.transformer, payload, args.eval_steps, args.guidance_scale,
                                               args.shift)
    return payload["teacher_clips"]


class LinVideo(MethodBase[LinVideoTeacher, torch.nn.Module, LinVideoArgs, dict[str, Any]]):
    """The LinVideo method (see the module docstring). The export is a diffusers transformer directory plus
    linvideo.json (`convert.linvideo.load_student`), logged as artifacts."""

    name = "linvideo"
    Args = LinVideoArgs
    Student = LinVideoStudent
    nan_metrics = frozenset({"psnr_db", "class_accuracy"})
    """psnr_db is NaN for the teacher (identical clips); class_accuracy without a classifier."""
    metrics: dict[str, Direction] = {
        "params": "neutral", "velocity_mse": "lower", "psnr_db": "higher", "frame_mmd": "lower",
        "temporal_jitter": "neutral", "jitter_ratio": "neutral", "class_accuracy": "higher",
        "linear_layers": "neutral", "attention_gmacs": "neutral", "eval_clip_latency_ms": "neutral",
        "eval_clip_speedup": "neutral"}
    """Jitter is neither better low nor high (a still clip has none): it should match the teacher's.
    attention_gmacs is a cost, like params; eval_clip_latency_ms and eval_clip_speedup time the step at the
    evaluated clip size (the spine's latency_ms and the gate's speed-up are at linvideo.latency_*). The teacher's
    velocity_mse and frame_mmd are 0 and its psnr_db NaN, so a gate can retain none of them: it retains
    class_accuracy (over every caption by default) and sets a minimum speed-up."""

    def load_teacher(self, source: ResolvedSource, *, meta: bool = False) -> LinVideoTeacher:
        return load_teacher(source, meta=meta)

    def teacher_model(self, teacher: LinVideoTeacher) -> torch.nn.Module:
        return teacher.transformer

    def convert(self, teacher: LinVideoTeacher, student: LinVideoStudent, args: LinVideoArgs) -> torch.nn.Module:
        candidates = lv.candidate_layers(teacher.transformer, args.candidate_layers)
        _target(args, len(candidates))
        lv_arms.arm_args(args)  # bad `compare` arms are refused here, at validate time
        model = copy.deepcopy(teacher.transformer)
        lv.install(model, candidates, feature_map=args.feature_map, feature_dim=args.feature_dim)
        return model

    def _shape(self, teacher: LinVideoTeacher, args: LinVideoArgs) -> tuple[int, int, int, int]:
        config = teacher.transformer.config
        frames = args.frames or teacher.clip.get("frames")
        height = args.height or teacher.clip.get("canvas")
        width = args.width or teacher.clip.get("canvas")
        if not (frames and height and width):
            raise RecipeError("linvideo.frames", frames, "the teacher ships no clip size: set linvideo.frames, "
                                                         "linvideo.height and linvideo.width (latent size)")
        p_t, p_h, p_w = _patch(dict(config))
        checks = (("frames", frames, p_t), ("height", height, p_h), ("width", width, p_w),
                  ("latency_frames", args.latency_frames, p_t), ("latency_height", args.latency_height, p_h),
                  ("latency_width", args.latency_width, p_w))
        for key, value, p in checks:
            if value is not None and value % p:
                raise RecipeError(f"linvideo.{key}", value, f"must be a multiple of the patch size {p}")
        return (config.in_channels, frames, height, width)

    def data(self, teacher: LinVideoTeacher, data: DataSpec, args: LinVideoArgs) -> MethodData:
        prompts = list(args.prompts or teacher.captions)
        if not prompts:
            raise RecipeError("linvideo.prompts", args.prompts, "the teacher ships no captions: list training prompts")
        eval_prompts = list(args.eval_prompts or prompts)  # every caption unless the recipe narrows it
        if not args.eval_seeds:
            raise RecipeError("linvideo.eval_seeds", args.eval_seeds, "give at least one eval seed")
        shape = self._shape(teacher, args)
        cond = conditions_for(teacher, prompts, "linvideo.prompts")
        sampling = dict(steps=args.trajectory_steps, guidance=args.guidance_scale, shift=args.shift)
        cache_dir = Path(args.cache_dir) if args.cache_dir else None
        model = teacher.transformer
        train_cache = cached_trajectories(model, cond, shape, cache_dir, samples=args.samples_per_prompt,
                                          seed=data.seed, **sampling)
        held = cached_trajectories(model, cond, shape, cache_dir, samples=1, seed=data.seed + 1_000_003, **sampling)
        pick = torch.linspace(0, len(held) - 1, min(args.heldout_points, len(held))).round().long()
        # one held-out trajectory per prompt (samples=1): the prompt index names a point's trajectory
        points = {"x": held.x[pick], "t": held.t[pick], "cond": cond[held.cond[pick]], "trajectory": held.cond[pick]}
        logger.info("data-free: %d trajectory points from %d prompts x %d samples", len(train_cache), len(prompts),
                    args.samples_per_prompt)
        eval_cond = conditions_for(teacher, eval_prompts, "linvideo.eval_prompts")
        noises = [torch.randn((len(eval_prompts), *shape), generator=torch.Generator().manual_seed(s))
                  for s in args.eval_seeds]
        payload = {"cond": eval_cond, "uncond": torch.zeros_like(eval_cond[:1]), "noises": noises,
                   "heldout": points, "labels": _labels(eval_prompts, len(args.eval_seeds)), "shape": shape,
                   "prompts": eval_prompts, "conditions": cond, "train_prompts": prompts}
        train = TrajectoryPoints(train_cache, cond, args.t_min)
        loader = SeededLoader(train, batch_size=data.batch_size, seed=data.seed, num_workers=data.num_workers)
        return MethodData(train_dataloader=loader, eval=payload, num_train_examples=len(train))

    def lightning_module(self, teacher: LinVideoTeacher, student: torch.nn.Module, data: MethodData,
                         args: LinVideoArgs, train: TrainSpec) -> LinVideoModule:
        target = _target(args, len(lv.gate_values(student)))  # a fresh student: choose_linear is the even spread
        return LinVideoModule(student, teacher.transformer, train, target=target,
                              objective=args.objective, log_both=args.log_both, lambda_select=args.lambda_select,
                              alpha=(args.alpha_start, args.alpha_end), lambda_transfer=args.lambda_transfer,
                              eta=args.adm_eta, lr_gate=args.lr_gate, lr_feature_maps=args.lr_feature_maps,
                              train_weights=args.train_weights, uncond_fraction=args.uncond_fraction,
                              reg_warmup=args.reg_warmup, commit_at=args.commit_at,
                              rollout=dict(steps=args.trajectory_steps, guidance=args.guidance_scale, shift=args.shift)
                              if args.adm_source == "rollout" else None,
                              fixed_linear=lv.choose_linear(student, target) if args.selection == "even_spread"
                              else None)

    def trained_student(self, module: LinVideoModule) -> torch.nn.Module:
        model = module.student.eval()
        rounded = [n for n, r in lv.gate_values(model).items() if round(r) == 0]
        chosen = lv.choose_linear(model, module.target)
        if sorted(rounded) != sorted(chosen):
            logger.warning("gates did not settle on the target: %d rounded to 0, target %d; the %d lowest r "
                           "go linear", len(rounded), module.target, module.target)
        module.r_history.append((module.trainer.global_step if module._trainer else -1, lv.gate_values(model)))
        lv.switch(model, chosen)
        model.linvideo_history = module.r_history  # for the trajectory plot in evaluate
        return model

    def evaluate(self, model: torch.nn.Module, teacher: LinVideoTeacher, data: MethodData, eval: EvalSpec,
                 args: LinVideoArgs, artifact_dir: Path) -> dict[str, float | PerSample]:
        is_teacher = model is teacher.transformer
        payload = data.eval
        teacher_clips = _teacher_clips(teacher, payload, args)
        clips = teacher_clips if is_teacher else ev.generate(_finalize(model, args).eval(), payload, args.eval_steps,
                                                             args.guidance_scale, args.shift)
        metrics: dict[str, float | PerSample] = {
            "params": float(count_params(model)),
            "velocity_mse": ev.heldout_velocity_mse(model, teacher.transformer, payload["heldout"]),
            **ev.clip_metrics(clips, teacher_clips, payload["labels"], teacher.classifier, is_teacher)}
        linear = [] if is_teacher else lv.linear_layers(model)
        metrics["linear_layers"] = float(len(linear))
        metrics["attention_gmacs"] = self._attention_gmacs(model, teacher, payload["shape"], len(linear), args) / 1e9
        metrics.update(self._eval_clip_speed(model, teacher, payload, eval, args))
        artifact_dir = Path(artifact_dir)
        rows = [teacher_clips] if is_teacher else [teacher_clips, clips]
        ev.save_gif(rows, artifact_dir / ("teacher.gif" if is_teacher else "teacher_vs_student.gif"))
        history = getattr(model, "linvideo_history", None)
        if history:
            ev.plot_gates(history, linear, artifact_dir / "gate_trajectories.png")
        elif linear:
            (artifact_dir / "chosen_layers.json").write_text(json.dumps({"linear": linear}, indent=1))
        return metrics

    def _eval_clip_speed(self, model: torch.nn.Module, teacher: LinVideoTeacher, payload: dict, eval: EvalSpec,
                         args: LinVideoArgs) -> dict[str, float]:
        """One denoising step at the evaluated clip size, this model and the teacher timed interleaved (the
        spine times them at linvideo.latency_*, which may be larger): speed beside the quality it goes with."""
        x = torch.randn((args.latency_batch, *payload["shape"]), generator=torch.Generator().manual_seed(0))
        cond = payload["cond"][:1].expand(args.latency_batch, -1, -1)
        t = torch.full((args.latency_batch,), 500.0)
        models = {"teacher": teacher.transformer.eval(), "model": model.eval()}
        calls = {side: (lambda m=m: m(x, t, cond).sample) for side, m in models.items()}
        ms = interleaved_latency(calls, repeats=eval.latency_repeats)
        return {"eval_clip_latency_ms": ms["model"], "eval_clip_speedup": ms["teacher"] / max(ms["model"], 1e-9)}

    def comparison_arms(self, args: LinVideoArgs, train: TrainSpec) -> dict[str, LinVideoArgs]:
        """The `compare` arms (`arms.py`): the same budget, data and initialisation, one setting changed."""
        arms = lv_arms.arm_args(args)
        if arms and train.num_nodes > 1:
            raise RecipeError("linvideo.compare", args.compare, "comparison arms run on one node; set "
                              "train.num_nodes: 1 or compare: []")
        return arms

    def compare_arms(self, args: LinVideoArgs, before: Mapping[str, float], untrained: Mapping[str, float] | None,
                     after: Mapping[str, float], arms: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
        """class_accuracy per row, the share of the teacher's each keeps, and whether the converted student beat
        each arm (`arms.summary`)."""
        return lv_arms.summary(args, before, untrained, after, arms)

    def _attention_gmacs(self, model: torch.nn.Module, teacher: LinVideoTeacher, shape: tuple, linear: int,
                         args: LinVideoArgs) -> float:
        config = dict(teacher.transformer.config)
        tokens = _tokens(config, shape)
        layers = len(lv.candidate_layers(teacher.transformer, args.candidate_layers))
        cost = lv.attention_cost(config, tokens, linear, layers, args.feature_dim, feature_map=args.feature_map)
        return cost["after_macs"]

    def cost_notes(self, teacher: LinVideoTeacher, student: torch.nn.Module, args: LinVideoArgs) -> list[str]:
        """Self-attention MACs per denoising step (one sample) before and after, for `validate`."""
        config = dict(teacher.transformer.config)
        candidates = lv.candidate_layers(teacher.transformer, args.candidate_layers)
        target = _target(args, len(candidates))
        try:
            shape = self._shape(teacher, args)
        except RecipeError:
            return [f"LinVideo: {target} of {len(candidates)} self-attention layers become linear; set "
                    "linvideo.frames/height/width to see the attention cost per step"]
        tokens = _tokens(config, shape)
        cost = lv.attention_cost(config, tokens, target, len(candidates), args.feature_dim,
                                 feature_map=args.feature_map)
        return [f"self-attention per denoising step ({tokens:,} tokens, 1 sample): {len(candidates)} softmax layers "
                f"{cost['before_macs'] / 1e9:,.1f} GMAC -> {len(candidates) - target} softmax + {target} linear "
                f"({args.feature_map}) {cost['after_macs'] / 1e9:,.1f} GMAC ({cost['ratio']:.2f}x less)"]

    def speed_probe(self, model: torch.nn.Module, teacher: LinVideoTeacher, data: MethodData, eval: EvalSpec,
                    args: LinVideoArgs) -> Callable[[], Any]:
        """One denoising step (a transformer forward) on `latency_batch` clips."""
        if model is not teacher.transformer:
            _finalize(model, args)
        model.eval()
        payload = data.eval
        channels, frames, height, width = payload["shape"]
        shape = (channels, args.latency_frames or frames, args.latency_height or height, args.latency_width or width)
        x = torch.randn((args.latency_batch, *shape), generator=torch.Generator().manual_seed(0))
        cond = payload["cond"][:1].expand(args.latency_batch, -1, -1)
        t = torch.full((args.latency_batch,), 500.0)

        @torch.no_grad()
        def step() -> Any:
            return model(x, t, cond).sample

        return step

    def export(self, student: torch.nn.Module, teacher: LinVideoTeacher, out_dir: Path, args: LinVideoArgs) -> Path:
        """A diffusers directory (`from_pretrained`) + linvideo.json/.safetensors (`load_student`) + the
        conditions it was trained on, so the export samples on its own."""
        out_dir = Path(out_dir)
        settings = args.model_dump(include={"objective", "adm_source", "selection", "feature_map", "lambda_select",
                                            "lambda_transfer", "train_weights", "target", "target_fraction"})
        lv.save_student(student, out_dir, extra={"teacher": teacher.description, "settings": settings,
                                                 "load": "athanor.convert.linvideo.load_student(path)"})
        if teacher.conditions is not None:
            save_file({"conditions": teacher.conditions.contiguous()}, out_dir / "conditions.safetensors")
            (out_dir / "captions.json").write_text(json.dumps({"captions": teacher.captions, "clip": teacher.clip}))
        return out_dir


def _patch(config: dict) -> tuple[int, int, int]:
    """(time, height, width) patch of Wan (a triple) or CogVideoX (patch_size + patch_size_t)."""
    patch = config.get("patch_size")
    if isinstance(patch, (list, tuple)):
        return tuple(int(p) for p in patch)
    return (int(config.get("patch_size_t") or 1), int(patch), int(patch))


def _tokens(config: dict, shape: tuple) -> int:
    p_t, p_h, p_w = _patch(config)
    return (shape[1] // p_t) * (shape[2] // p_h) * (shape[3] // p_w)


def _labels(prompts: list[str], seeds: int) -> torch.Tensor | None:
    """The Fashion-MNIST class each prompt names (longest match), repeated per seed; None if any names none."""
    labels = []
    for prompt in prompts:
        found = [i for i, c in sorted(enumerate(CLASSES), key=lambda ic: -len(ic[1]))
                 if re.search(rf"\b{re.escape(c)}\b", prompt.lower())]
        if not found:
            return None
        labels.append(found[0])
    return torch.tensor(labels).repeat(seeds)
