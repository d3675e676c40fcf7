"""LoRA-Composer evaluation: the same scenes, seeds and noise sampled by the baseline (`Mixer`,
`set_adapters` mixing) and by LoRA-Composer (`Composer`), scored box by box by the judge classifier.

    .venv/bin/python -m pytest tests/distill/lora_composer/test_evaluation.py -q

Keys (identical for both sides), with n the number of concepts in a scene (2 or 3 in the recipe):
- `presence_n`: share of boxes where the judge finds the concept asked for in that box;
- `confusion_n`: share of boxes where it finds another concept of the same scene instead;
- `vanishing_n`: share of (image, concept) pairs where the concept is found in none of the scene's boxes;
- `presence_<class>`: presence per judged class (the concepts' `judge_class`, e.g. `presence_sneaker`) over
  every box asking for it;
- `leakage`: share of each concept's cross-attention mass (its word's tokens in the global prompt, mid-way
  through sampling) that falls outside its box, measured the same way for every arm on the real attention of
  the global prompt (the baseline's with its adapters mixed in, LoRA-Composer's global branch), never on the
  regional maps latent guidance optimises; the mean over scenes of each scene's mean over its boxes;
- `peak_mem_mb`: weights plus the most memory one sampling of the first scene holds at once.
Every key but `peak_mem_mb` is a `PerSample` over boxes (0/1 per box or per (image, concept) pair; a share per
box for leakage, weighted so each scene counts once), in the same order for both sides: scenes, then seeds,
then the scene's boxes.
Sample grids (one row per scene, one image per seed, boxes drawn), LoRA-Composer's per-concept
attention maps (PNG) and the sampled images themselves (`samples.safetensors`, `scene_<k>`: [seeds, C, H, W],
what an export must reproduce) are written into the artifact directory.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import torch
from diffusers.models.attention_processor import Attention, AttnProcessor
from PIL import Image, ImageDraw
from safetensors.torch import save_file

from athanor.distill.fashion_mnist import CLASSES
from athanor.distill.intervals import PerSample
from athanor.distill.lora_composer.canvas import crop_boxes
from athanor.distill.lora_composer.guidance import box_mask
from athanor.distill.lora_composer.pipeline import Composer, Mixer, Scene
from athanor.distill.lora_composer.sampling import word_positions
from athanor.distill.memory import peak_memory_mb

Box = tuple[float, float, float, float]


def pixel_box(box: Box, height: int, width: int) -> tuple[int, int, int, int]:
    x0, y0, x1, y1 = box
    return round(x0 * width), round(y0 * height), round(x1 * width), round(y1 * height)


def judge_scene(judge, images: torch.Tensor, scene: Scene) -> torch.Tensor:
    """[B, R] judge class index of every box of every image."""
    boxes = tuple(pixel_box(r.box, images.shape[-2], images.shape[-1]) for r in scene.regions)
    crops = crop_boxes(images.clamp(-1, 1), [boxes] * len(images))
    with torch.no_grad():
        return judge(crops).argmax(-1).view(len(images), len(boxes))


def box_outcomes(predicted: torch.Tensor, labels: list[int]) -> dict[str, torch.Tensor]:
    """From [B, R] judge classes and the R asked-for classes: per box presence / confusion [B, R], and per
    (image, concept) vanishing [B, R] (the concept's class appears in no box of that image)."""
    asked = torch.tensor(labels)
    present = predicted == asked
    others = [[j for j in range(len(labels)) if labels[j] != labels[i]] for i in range(len(labels))]
    confused = torch.stack([(predicted[:, i:i + 1] == asked[others[i]]).any(-1) if others[i] else
                            torch.zeros(len(predicted), dtype=torch.bool) for i in range(len(labels))], dim=1)
    vanished = ~(predicted.unsqueeze(1) == asked.view(1, -1, 1)).any(-1)
    return {"presence": present, "confusion": confused, "vanishing": vanished}


def class_key(name: str) -> str:
    """A judge class as a metric-key suffix: 'ankle boot' -> 'ankle_boot'."""
    return re.sub(r"[^0-9a-z]+", "_", name.lower()).strip("_")


def box_leakage(maps: list[torch.Tensor], boxes: list[Box]) -> torch.Tensor:
    """[R, B]: per region and image, the mean over calls of the attention mass outside the region's box
    ([R, B, h, w] maps, one per call, at any resolution)."""
    per_call = []
    for m in maps:
        h, w = m.shape[-2:]
        mass = m.flatten(2).sum(-1).clamp_min(1e-12)  # [R, B]
        outside = torch.stack([(m[i] * (1 - box_mask(box, h, w).to(m))).flatten(1).sum(-1)
                               for i, box in enumerate(boxes)])
        per_call.append(outside / mass)
    return torch.stack(per_call).mean(0)


def leakage(maps: list[torch.Tensor], boxes: list[Box]) -> float:
    """Mean over calls, regions and images of the attention mass outside the region's box ([R, B, h, w] maps)."""
    return float(box_leakage(maps, boxes).mean()) if maps and boxes else float("nan")


class MapRecorder(AttnProcessor):
    """Cross-attention processor that also keeps, when armed, each token group's attention map
    ([G, B, h, w], mean over heads, summed over the group's tokens). Used on the baseline, whose
    adapters act inside `to_q`/`to_k`/`to_v` (peft), so the maps are what the mixed model attends to."""

    def __init__(self, groups: list[list[int]], height: int, width: int) -> None:
        super().__init__()
        self.groups, self.height, self.width = groups, height, width
        self.armed, self.maps = False, []

    def __call__(self, attn: Attention, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 temb=None, *args, **kwargs):
        if not self.armed or encoder_hidden_states is None:
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        batch, tokens, _ = hidden_states.shape
        query = attn.head_to_batch_dim(attn.to_q(hidden_states))
        key = attn.head_to_batch_dim(attn.to_k(encoder_hidden_states))
        value = attn.head_to_batch_dim(attn.to_v(encoder_hidden_states))
        probs = attn.get_attention_scores(query, key, None)
        out = attn.to_out[1](attn.to_out[0](attn.batch_to_head_dim(torch.bmm(probs, value))))
        h = round((tokens * self.height / self.width) ** 0.5)
        per_head = probs.view(batch, attn.heads, tokens, -1).mean(1)
        self.maps.append(torch.stack([per_head[..., g].sum(-1) for g in self.groups]).view(
            len(self.groups), batch, h, tokens // h).detach())
        return out


def _mixer_sample(model: Mixer, scene: Scene, noise: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Baseline sampling with a MapRecorder armed at the middle step (the cond half of the CFG batch kept)."""
    groups = [word_positions(model.teacher.tokenizer, scene.prompt, r.word) for r in scene.regions]
    recorder = MapRecorder(groups, noise.shape[-2], noise.shape[-1])
    unet, previous = model.unet, model.unet.attn_processors
    unet.set_attn_processor({name: recorder if name.endswith("attn2.processor") else AttnProcessor()
                             for name in previous})
    middle = model.steps // 2

    def arm(step: int) -> None:
        recorder.armed = step == middle

    try:
        images, _ = model.sample(scene, noise, on_step=arm)
    finally:
        unet.set_attn_processor(previous)
    half = noise.shape[0]
    return images, {"global_maps": [m[:, half:] for m in recorder.maps]}


def sample_scene(model: Mixer | Composer, scene: Scene, noise: torch.Tensor) -> tuple[torch.Tensor, dict]:
    if isinstance(model, Mixer):
        return _mixer_sample(model, scene, noise)
    return model.sample(scene, noise)


def evaluate(model: Mixer | Composer, scenes: list[Scene], noise: torch.Tensor, labels: dict[str, int] | None,
             judge, artifact_dir: Path, classes: Sequence[str] = CLASSES,
             measure_memory: bool = True) -> dict[str, float | PerSample]:
    """Every key of the module docstring for `model` over `scenes` × the seeds' `noise` [S, C, H, W]; `labels`
    maps each adapter to its judge class, an index into `classes`. `measure_memory=False` (comparison arms)
    skips `peak_mem_mb` and its extra sampling."""
    tally: dict[str, list[torch.Tensor]] = defaultdict(list)
    leaks, weights, rows, attention_rows, samples = [], [], [], [], {}
    for k, scene in enumerate(scenes):
        images, info = sample_scene(model, scene, noise)
        samples[f"scene_{k}"] = images.contiguous()
        rows.append(_draw_row(images, scene))
        if info.get("global_maps"):  # real attention for every arm, never the maps guidance optimised
            shares = box_leakage(info["global_maps"], [r.box for r in scene.regions]).double().T.flatten()  # [B*R]
            leaks.append(shares)
            weights.append(torch.full_like(shares, 1 / len(shares)))  # each scene counts once, as its mean
        if isinstance(model, Composer) and info.get("maps"):
            attention_rows.append(_attention_row(info["maps"], scene, images.shape[-2:]))
        if judge is None or labels is None:
            continue
        outcome = box_outcomes(judge_scene(judge, images, scene), [labels[r.adapter] for r in scene.regions])
        n = len(scene.regions)
        for key, value in outcome.items():
            tally[f"{key}_{n}"].append(value.float().flatten())  # [B, R] -> image-major
        for i, region in enumerate(scene.regions):
            tally[f"presence_{class_key(classes[labels[region.adapter]])}"].append(outcome["presence"][:, i].float())
    metrics: dict[str, float | PerSample] = {key: PerSample.mean(torch.cat(values).double().numpy())
                                             for key, values in sorted(tally.items())}
    # Σ (share / k_s) / Σ (1 / k_s) over boxes: the mean over scenes of each scene's mean over its k_s boxes.
    metrics["leakage"] = (PerSample.ratio((torch.cat(leaks) * torch.cat(weights)).numpy(),
                                          torch.cat(weights).numpy()) if leaks else float("nan"))
    if measure_memory:
        metrics["peak_mem_mb"] = peak_memory_mb(model, lambda: model.sample(scenes[0], noise[:1]))
    _save_grid(rows, artifact_dir / "samples.png")
    save_file(samples, artifact_dir / "samples.safetensors")
    if attention_rows:
        _save_grid(attention_rows, artifact_dir / "attention_maps.png")
    return metrics


def _to_rgb(image: torch.Tensor) -> Image.Image:
    gray = ((image[0].clamp(-1, 1) + 1) * 127.5).round().byte().numpy()
    return Image.fromarray(gray, mode="L").convert("RGB")


def _draw_row(images: torch.Tensor, scene: Scene, scale: int = 4) -> Image.Image:
    """The seeds' images side by side, upscaled, each box outlined."""
    h, w = images.shape[-2:]
    row = Image.new("RGB", (len(images) * (w * scale + 4), h * scale), "white")
    colours = ["red", "lime", "cyan", "yellow", "magenta"]
    for k, image in enumerate(images):
        tile = _to_rgb(image).resize((w * scale, h * scale), Image.NEAREST)
        draw = ImageDraw.Draw(tile)
        for i, region in enumerate(scene.regions):
            x0, y0, x1, y1 = pixel_box(region.box, h * scale, w * scale)
            draw.rectangle([x0, y0, x1 - 1, y1 - 1], outline=colours[i % len(colours)])
        row.paste(tile, (k * (w * scale + 4), 0))
    return row


def _attention_row(maps: list[torch.Tensor], scene: Scene, size: tuple[int, int], scale: int = 4) -> Image.Image:
    """Each concept's cross-attention map (first seed, averaged over layers at the full resolution)."""
    resized = torch.stack([torch.nn.functional.interpolate(m[:, :1], size=size, mode="bilinear") for m in maps])
    mean = resized.mean(0)[:, 0]  # [R, H, W]
    tiles = (mean / mean.flatten(1).amax(-1).clamp_min(1e-12).view(-1, 1, 1)) * 2 - 1
    return _draw_row(tiles.unsqueeze(1), scene, scale)


def _save_grid(rows: list[Image.Image], path: Path) -> None:
    width, height = max(r.width for r in rows), sum(r.height + 4 for r in rows)
    grid = Image.new("RGB", (width, height), "white")
    y = 0
    for row in rows:
        grid.paste(row, (0, y))
        y += row.height + 4
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
