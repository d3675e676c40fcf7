"""Sampling a scene two ways from one U-Net that holds every concept adapter:

- `sample_composed`: LoRA-Composer. The region-aware processor (`convert.lora_composer`) runs each
  concept's adapter and prompt inside its box and the base model with the global prompt outside;
  at t = T the latent is re-initialised from each concept token's best attention window; for the first
  `guidance_steps` steps the latent is pushed down the injection + fill + isolation loss
  (`distill.lora_composer.guidance`).
- `sample_mixed`: the baseline, diffusers' `set_adapters` mixing of the same adapters under the global
  prompt (what a user gets without LoRA-Composer).

Both are DDIM with classifier-free guidance on the same noise, and both arms' unconditional branch holds the
LoRAs the same way: the composer's runs the regional LoRAs with every prompt empty (as the authors' code does),
the baseline's its mixed adapters with the empty prompt. (With the base model as the composer's unconditional
branch, CFG would multiply the composer's whole LoRA effect by the guidance scale and the baseline's not.)
Both return the concept words' cross-attention maps under the global prompt at the middle step
(`info["global_maps"]`, [R, B, h, w] per layer): the real attention, never the maps latent guidance optimises,
on which the evaluation measures leakage for every arm.

    .venv/bin/python -m pytest tests/distill/lora_composer/test_sampling.py -q
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from diffusers import DDIMScheduler

from athanor.convert.lora_composer import Composition, Region, composed
from athanor.distill.lora_composer.guidance import LatentGuidance, reinit_latent

Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class ConceptRegion:
    """One concept of a scene: its adapter, its box, its own prompt and the word(s) naming it."""

    adapter: str
    box: Box
    prompt: str
    word: str


@dataclass(frozen=True)
class ComposerSettings:
    steps: int = 20
    guidance_scale: float = 3.0
    isolate: bool = True
    inject: bool = True
    reinit: bool = True
    guidance_steps: int = 25
    eta0: float = 20.0
    top_k: float = 0.2
    loss_weights: dict[str, float] = field(default_factory=dict)
    """Overrides of `guidance.DEFAULT_WEIGHTS` (injection 8, fill 1, isolation 10, as the reference's total)."""


@torch.no_grad()
def encode(text_encoder, tokenizer, prompts: list[str], max_length: int) -> torch.Tensor:
    """[N, max_length, D] text-encoder states of `prompts` (padded to `max_length`)."""
    ids = tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True,
                    return_tensors="pt")["input_ids"]
    device = next(text_encoder.parameters()).device
    return text_encoder(ids.to(device)).last_hidden_state


def word_positions(tokenizer, prompt: str, word: str) -> list[int]:
    """Token positions of `word` inside the tokenized `prompt` (its last occurrence); ValueError when absent.
    A byte-level BPE tokenizes a word differently at the very start of a prompt (no leading space): that
    occurrence is found too."""
    ids, word = tokenizer(prompt)["input_ids"], word.strip()
    target = tokenizer(" " + word, add_special_tokens=False)["input_ids"]
    for start in range(len(ids) - len(target), -1, -1):
        if ids[start:start + len(target)] == target:
            return list(range(start, start + len(target)))
    if word and re.match(rf"{re.escape(word)}\b", prompt.lstrip()):
        head = tokenizer(word, add_special_tokens=False)["input_ids"]
        special = set(tokenizer.all_special_ids)
        start = next((i for i, t in enumerate(ids) if t not in special), len(ids))
        if head and ids[start:start + len(head)] == head:
            return list(range(start, start + len(head)))
    raise ValueError(f"{word!r} is not a run of tokens in {prompt!r}")


def _ddim(scheduler_config: dict, steps: int) -> DDIMScheduler:
    ddim = DDIMScheduler.from_config(scheduler_config)
    ddim.set_timesteps(steps)
    return ddim


def sample_composed(unet, text_encoder, tokenizer, scheduler_config: dict, regions: list[ConceptRegion],
                    global_prompt: str, noise: torch.Tensor, settings: ComposerSettings,
                    max_length: int = 77) -> tuple[torch.Tensor, dict]:
    """LoRA-Composer sampling of `noise` [B, C, H, W]; returns (x₀, info) where info holds the guidance
    losses per guided step, `maps` (the middle step's regional cross-attention maps, detached: what guidance
    optimises, drawn as the attention picture) and `global_maps` (see the module docstring; absent when a
    concept word is not in the global prompt)."""
    batch, height, width = noise.shape[0], noise.shape[-2], noise.shape[-1]
    embeds = encode(text_encoder, tokenizer, [global_prompt, ""] + [r.prompt for r in regions], max_length)
    composition = Composition(
        [Region(r.adapter, r.box, embeds[2 + i:3 + i], word_positions(tokenizer, r.prompt, r.word))
         for i, r in enumerate(regions)],
        embeds[:1], height=height, width=width, isolate=settings.isolate, inject=settings.inject, record=True)
    uncond, empty = embeds[1:2].expand(batch, -1, -1), embeds[1:2]
    global_tokens = _global_tokens(tokenizer, global_prompt, regions)
    boxes, ddim = [r.box for r in regions], _ddim(scheduler_config, settings.steps)
    guide = LatentGuidance(settings.guidance_steps, settings.eta0, settings.loss_weights or None, top_k=settings.top_k)
    info: dict = {"guidance_loss": []}
    z = noise.clone()
    with composed(unet, composition):
        for i, t in enumerate(ddim.timesteps):
            if i == 0 and settings.reinit and regions:
                with torch.no_grad():
                    composition.reset()
                    unet(z, t, encoder_hidden_states=uncond)
                    z = reinit_latent(z, _mean_map(composition.maps), boxes)
            if regions and guide.should_guide(i):
                composition.reset()
                with torch.enable_grad():
                    z_in = z.detach().requires_grad_(True)
                    unet(z_in, t, encoder_hidden_states=uncond)
                    loss = guide.loss(composition.maps, boxes, composition.fg_bg_mass if settings.isolate else None)
                    z = guide.step(z_in, loss, i).detach()
                info["guidance_loss"].append(loss.item())
            composition.reset()
            middle = i == len(ddim.timesteps) // 2
            composition.global_tokens = global_tokens if middle else None  # one step's maps: the cost stays small
            with torch.no_grad():
                eps_c = unet(z, t, encoder_hidden_states=uncond).sample  # the processor reads its own prompts
                if middle:
                    info["maps"] = [m.detach() for m in composition.maps]
                    if global_tokens is not None:
                        info["global_maps"] = list(composition.global_maps)
                with composition.empty_prompts(empty):
                    eps_u = unet(z, t, encoder_hidden_states=uncond).sample
                z = ddim.step(eps_u + settings.guidance_scale * (eps_c - eps_u), t, z).prev_sample
            composition.global_tokens = None
    return z, info


def _global_tokens(tokenizer, global_prompt: str, regions: list[ConceptRegion]) -> list[list[int]] | None:
    """Each concept word's token positions in the global prompt, or None when one is missing there (a recipe
    always has them: `check_scenes`)."""
    try:
        return [word_positions(tokenizer, global_prompt, r.word) for r in regions]
    except ValueError:
        return None


def _mean_map(maps: list[torch.Tensor]) -> torch.Tensor:
    """Average the recorded [R, B, h, w] maps over layers at the largest resolution ([R, B, H, W])."""
    size = max(m.shape[-2:] for m in maps)
    resized = [torch.nn.functional.interpolate(m.flatten(0, 1).unsqueeze(1), size=size, mode="bilinear",
                                               align_corners=False).squeeze(1).view(*m.shape[:2], *size)
               for m in maps]
    return torch.stack(resized).mean(0)


@torch.no_grad()
def sample_mixed(unet, text_encoder, tokenizer, scheduler_config: dict, adapters: list[str],
                 weights: list[float], global_prompt: str, noise: torch.Tensor, steps: int = 20,
                 guidance_scale: float = 3.0, max_length: int = 77,
                 on_step: Callable[[int], None] | None = None) -> torch.Tensor:
    """The `set_adapters` baseline: every adapter active at once (with `weights`) under the global prompt, in both
    CFG branches (the unconditional one: adapters on, empty prompt). With no adapters it is the base model (the
    `plain` arm). `on_step(i)` is called before step i's U-Net call (the evaluation arms its attention recorder)."""
    embeds = encode(text_encoder, tokenizer, [global_prompt, ""], max_length)
    cond, uncond = embeds[:1].expand(noise.shape[0], -1, -1), embeds[1:].expand(noise.shape[0], -1, -1)
    if adapters:
        unet.enable_adapters()
        unet.set_adapters(adapters, weights)
    try:
        ddim, z = _ddim(scheduler_config, steps), noise.clone()
        for i, t in enumerate(ddim.timesteps):
            if on_step is not None:
                on_step(i)
            eps_u, eps_c = unet(torch.cat([z, z]), t, encoder_hidden_states=torch.cat([uncond, cond])).sample.chunk(2)
            z = ddim.step(eps_u + guidance_scale * (eps_c - eps_u), t, z).prev_sample
    finally:
        if adapters:
            # why: set_adapters scales each LoRA layer's `scaling` by its weight, and the composer reads `scaling`
            unet.set_adapters(adapters, [1.0] * len(adapters))
            unet.disable_adapters()
    return z
