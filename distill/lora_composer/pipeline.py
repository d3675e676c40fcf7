"""The LoRA-Composer teacher (a text-to-image base: U-Net, text encoder, tokenizer, scheduler, and an
optional judge classifier) and the two samplers the job compares, both over the SAME U-Net holding every
concept adapter: `Mixer` (diffusers `set_adapters` mixing, the baseline) and `Composer` (LoRA-Composer); plus
`PlainBase`, the base model alone (the `plain` comparison row, `arms.py`).

    .venv/bin/python -m pytest tests/distill/lora_composer -q

A teacher directory is a diffusers pipeline layout without a VAE (pixel space, like the testbed in
`distill/lora_composer/testbed/`): `unet/`, `text_encoder/` (CLIP), `tokenizer/`, `scheduler/`, plus
`judge.safetensors` (a `distill.fashion_mnist.FashionClassifier`) when the testbed judges presence.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import load_file
from torch import nn
from transformers import AutoTokenizer, CLIPTextConfig, CLIPTextModel

from athanor.distill.fashion_mnist import CLASSES, FashionClassifier
from athanor.distill.lora_composer.sampling import ComposerSettings, ConceptRegion, sample_composed, sample_mixed
from athanor.distill.spec import RecipeError, ResolvedSource

Box = tuple[float, float, float, float]


@dataclass
class ComposerTeacher:
    unet: UNet2DConditionModel
    text_encoder: CLIPTextModel
    tokenizer: object
    scheduler_config: dict
    path: Path | None = None
    description: str = ""
    judge: FashionClassifier | None = None
    judge_classes: tuple[str, ...] = CLASSES
    adapters: dict[str, Path] = field(default_factory=dict)
    """Adapter name -> the LoRA file loaded into `unet` (set by the method's `convert`)."""
    args: Any = None
    """The method's recipe section, kept by `convert` for `teacher_model` (the baseline's weights and steps)."""

    @property
    def max_length(self) -> int:
        return int(self.text_encoder.config.max_position_embeddings)


def load_teacher(source: ResolvedSource, *, meta: bool = False) -> ComposerTeacher:
    """A pipeline directory (see the module docstring); `meta=True` builds the modules on the meta device."""
    if source.path is None:
        raise RecipeError("teacher.source", source.description, "LoRA-Composer needs a pipeline directory (unet/, "
                          "text_encoder/, tokenizer/, scheduler/), e.g. pkg:athanor.distill.lora_composer/testbed")
    path = Path(source.path)
    missing = [part for part in ("unet/config.json", "text_encoder/config.json", "tokenizer", "scheduler")
               if not (path / part).exists()]
    if missing:
        raise RecipeError("teacher.source", str(path), f"not a text-to-image pipeline directory: missing "
                          f"{', '.join(missing)} (expected unet/, text_encoder/, tokenizer/, scheduler/)")
    if "UNet2DConditionModel" not in (path / "unet" / "config.json").read_text():
        raise RecipeError("teacher.source", str(path), "unet/ is not a UNet2DConditionModel; LoRA-Composer "
                          "composes adapters in an SD1.x/SDXL-style conditional U-Net")
    scheduler_file = next((path / "scheduler").glob("*.json"), None)
    scheduler_config = json.loads(scheduler_file.read_text()) if scheduler_file else {}
    tokenizer = AutoTokenizer.from_pretrained(path / "tokenizer")
    if meta:
        with torch.device("meta"):
            unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(path / "unet"))
            text_encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(path / "text_encoder"))
        return ComposerTeacher(unet, text_encoder, tokenizer, scheduler_config, path, source.description)
    unet = UNet2DConditionModel.from_pretrained(path / "unet").eval().requires_grad_(False)
    text_encoder = CLIPTextModel.from_pretrained(path / "text_encoder").eval().requires_grad_(False)
    teacher = ComposerTeacher(unet, text_encoder, tokenizer, scheduler_config, path, source.description)
    if (path / "judge.safetensors").is_file():
        teacher.judge = FashionClassifier()
        teacher.judge.load_state_dict(load_file(path / "judge.safetensors"))
        teacher.judge.eval()
    return teacher


@dataclass(frozen=True)
class Scene:
    """What one composed image is asked for: the global prompt and one region per concept."""

    prompt: str
    regions: tuple[ConceptRegion, ...]


class Mixer(nn.Module):
    """The baseline: every concept adapter active at once (`set_adapters` with `weights`), global prompt."""

    uses_adapters = True
    """False for the `plain` arm (`PlainBase`): the scene's adapters stay off."""

    def __init__(self, teacher: ComposerTeacher, weights: dict[str, float], steps: int, guidance_scale: float):
        super().__init__()
        self.unet, self.text_encoder, self.teacher = teacher.unet, teacher.text_encoder, teacher
        self.weights, self.steps, self.guidance_scale = weights, steps, guidance_scale

    def sample(self, scene: Scene, noise: torch.Tensor,
               on_step: Callable[[int], None] | None = None) -> tuple[torch.Tensor, dict]:
        names = [r.adapter for r in scene.regions] if self.uses_adapters else []
        images = sample_mixed(self.unet, self.text_encoder, self.teacher.tokenizer, self.teacher.scheduler_config,
                              names, [self.weights.get(n, 1.0) for n in names], scene.prompt, noise, self.steps,
                              self.guidance_scale, self.teacher.max_length, on_step)
        return images, {}


class PlainBase(Mixer):
    """The `plain` comparison arm: the base model, every adapter off, sampled like the baseline (same steps,
    guidance scale, noise) under a scene whose prompt names the concepts by their class words
    (`arms.plain_scene`): whether the concepts need LoRAs and composition at all."""

    uses_adapters = False

    def __init__(self, teacher: ComposerTeacher, steps: int, guidance_scale: float):
        super().__init__(teacher, {}, steps, guidance_scale)


class Composer(nn.Module):
    """LoRA-Composer over the teacher's U-Net (the same module the Mixer uses: adapters are not copied)."""

    def __init__(self, teacher: ComposerTeacher, settings: ComposerSettings):
        super().__init__()
        self.unet, self.text_encoder = teacher.unet, teacher.text_encoder
        self.teacher, self.settings = teacher, settings

    def sample(self, scene: Scene, noise: torch.Tensor) -> tuple[torch.Tensor, dict]:
        return sample_composed(self.unet, self.text_encoder, self.teacher.tokenizer, self.teacher.scheduler_config,
                               list(scene.regions), scene.prompt, noise, self.settings, self.teacher.max_length)
