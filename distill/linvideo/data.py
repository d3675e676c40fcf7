"""LinVideo teacher and data-free training data: the teacher's own sampling trajectories.

    .venv/bin/python -m pytest tests/distill/linvideo/test_data.py -q

The teacher is a diffusers video transformer (a `transformer/` subfolder of the source directory,
the directory itself, or an inline `config:`). Its conditions are precomputed text embeddings: the
testbed ships `conditions.safetensors` + `captions.json` (`distill/linvideo/teacher.py`); prompts
not among them are encoded with all-MiniLM-L6-v2's token states (the testbed's text encoder), which
needs a 384-wide `text_dim`. The zero embedding is the unconditional input (classifier-free guidance).

Trajectory cache: for each (prompt, sample) the teacher samples from seeded noise with Euler steps,
and every visited (x_t, t) with the next time t' of the trajectory is kept. Training draws those
points (ADM: the student steps x_t → x̂_{t'} itself; velocity MSE: both velocities at x_t). The cache
is written as safetensors under `cache_dir`, keyed by a fingerprint of the teacher weights and the
sampling settings, so a rerun with the same settings reads it back instead of sampling again.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import Dataset

from athanor.distill.linvideo.sampling import sample
from athanor.distill.spec import RecipeError, ResolvedSource

MINILM_WIDTH = 384


@dataclass
class LinVideoTeacher:
    """The transformer, its precomputed conditions and (for the testbed) the frame classifier."""

    transformer: torch.nn.Module
    captions: list[str] = field(default_factory=list)
    conditions: torch.Tensor | None = None
    """[len(captions), tokens, text_dim] precomputed text embeddings, or None."""
    clip: dict[str, int] = field(default_factory=dict)
    """frames / canvas of the clips the teacher was trained on (from captions.json), if known."""
    classifier: torch.nn.Module | None = None
    description: str = ""
    pipeline_dir: Path | None = None
    """A diffusers pipeline folder with text_encoder/ and tokenizer/ (Wan: UMT5), for new prompts."""


def _transformer_class(config: dict) -> Any:
    import diffusers

    name = config.get("_class_name", "WanTransformer3DModel")
    cls = getattr(diffusers, str(name), None)
    if cls is None or not hasattr(cls, "from_config"):
        raise RecipeError("teacher", name, "name a diffusers video transformer class in _class_name, "
                                           "e.g. WanTransformer3DModel or CogVideoXTransformer3DModel")
    return cls


def load_teacher(source: ResolvedSource, *, meta: bool = False) -> LinVideoTeacher:
    """Inline config (random init, seeded; `transformer:` sub-config or the config itself), or a
    directory with `transformer/` (plus the testbed's conditions and classifier) or a bare model dir."""
    if source.config is not None:
        config = dict(source.config.get("transformer", source.config))
        cls = _transformer_class(config)
        config = {k: v for k, v in config.items() if not k.startswith("_")}
        if meta:
            with torch.device("meta"):
                return LinVideoTeacher(cls.from_config(config), description=source.description)
        torch.manual_seed(source.seed)
        return LinVideoTeacher(cls.from_config(config).eval(), description=source.description)
    path = Path(source.path)
    model_dir = path / "transformer" if (path / "transformer" / "config.json").is_file() else path
    if not (model_dir / "config.json").is_file():
        raise RecipeError("teacher.source", str(path), "expected a diffusers transformer directory "
                                                       "(config.json) or a folder with transformer/config.json")
    config = json.loads((model_dir / "config.json").read_text())
    cls = _transformer_class(config)
    if meta:
        with torch.device("meta"):
            return LinVideoTeacher(cls.from_config(config), description=source.description)
    teacher = LinVideoTeacher(cls.from_pretrained(model_dir).eval(), description=source.description)
    if (path / "captions.json").is_file() and (path / "conditions.safetensors").is_file():
        meta_info = json.loads((path / "captions.json").read_text())
        teacher.captions, teacher.clip = list(meta_info["captions"]), dict(meta_info.get("clip", {}))
        teacher.conditions = load_file(path / "conditions.safetensors")["conditions"]
    if (path / "text_encoder" / "config.json").is_file() and (path / "tokenizer").is_dir():
        teacher.pipeline_dir = path
    if (path / "classifier.safetensors").is_file():
        from athanor.distill.fashion_mnist import FashionClassifier

        classifier = FashionClassifier()
        classifier.load_state_dict(load_file(path / "classifier.safetensors"))
        teacher.classifier = classifier.eval()
    return teacher


def text_dim(model: torch.nn.Module) -> int:
    config = model.config
    return int(config.get("text_dim") or config.get("text_embed_dim") or config.get("cross_attention_dim"))


def conditions_for(teacher: LinVideoTeacher, prompts: list[str], key: str) -> torch.Tensor:
    """[len(prompts), tokens, text_dim]: the precomputed embedding of each known caption, MiniLM for the rest."""
    width = text_dim(teacher.transformer)
    known = {c: i for i, c in enumerate(teacher.captions)}
    missing = [p for p in prompts if p not in known]
    encoded: dict[str, torch.Tensor] = {}
    if missing and teacher.pipeline_dir is not None:
        encoded = dict(zip(missing, encode_with_pipeline(teacher.pipeline_dir, missing)))
    elif missing:
        if width != MINILM_WIDTH:
            raise RecipeError(key, missing[0], f"not among the teacher's precomputed captions, and its text_dim "
                                               f"{width} is not all-MiniLM-L6-v2's {MINILM_WIDTH}: use captions "
                                               f"from the teacher's captions.json")
        from athanor.distill.linvideo.teacher import encode_captions

        encoded = dict(zip(missing, encode_captions(missing)))
    rows = [teacher.conditions[known[p]] if p in known else encoded[p] for p in prompts]
    tokens = max(r.shape[0] for r in rows)
    return torch.stack([torch.nn.functional.pad(r, (0, 0, 0, tokens - r.shape[0])) for r in rows]).float()


@torch.no_grad()
def encode_with_pipeline(path: Path, prompts: list[str], max_tokens: int = 512) -> torch.Tensor:
    """Prompt embeddings as the diffusers Wan pipeline makes them: the pipeline's own text encoder
    (UMT5 for Wan), last hidden states, padding positions zeroed, `max_tokens` long."""
    import transformers

    arch = json.loads((path / "text_encoder" / "config.json").read_text()).get("architectures", ["AutoModel"])[0]
    encoder_class = getattr(transformers, arch, transformers.AutoModel)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path / "tokenizer")
    encoder = encoder_class.from_pretrained(path / "text_encoder").eval()
    if torch.cuda.is_available():
        encoder.to("cuda")
    batch = tokenizer(prompts, padding="max_length", max_length=max_tokens, truncation=True, return_tensors="pt")
    mask = batch["attention_mask"].to(encoder.device)
    states = encoder(batch["input_ids"].to(encoder.device), attention_mask=mask).last_hidden_state
    return (states * mask.unsqueeze(-1)).float().cpu()


@dataclass
class TrajectoryCache:
    """Points on teacher trajectories: x [N, C, F, H, W], t and t_next [N], cond [N] (prompt index)."""

    x: torch.Tensor
    t: torch.Tensor
    t_next: torch.Tensor
    cond: torch.Tensor
    finals: torch.Tensor
    """The trajectories' end points x₀ [trajectories, C, F, H, W] (the teacher's clips)."""

    def save(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".partial")
        save_file({k: v.contiguous() for k, v in self.__dict__.items()}, tmp)
        tmp.replace(path)  # a crash mid-write leaves no cache that looks complete
        return path

    @classmethod
    def load(cls, path: Path) -> TrajectoryCache:
        return cls(**load_file(path))

    def __len__(self) -> int:
        return len(self.t)


def fingerprint(model: torch.nn.Module, settings: dict) -> str:
    """A short hash of the weights and the sampling settings (what makes two caches the same)."""
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().numpy().tobytes()[:4096])
        digest.update(str(float(tensor.float().sum())).encode())
    return digest.hexdigest()[:16]


@torch.no_grad()
def teacher_trajectories(model: torch.nn.Module, conditions: torch.Tensor, shape: tuple[int, ...], *,
                         samples: int, steps: int, guidance: float, shift: float, seed: int,
                         batch: int = 8) -> TrajectoryCache:
    """Sample `samples` clips per condition from seeded noise; keep every (x_t, t, t_next) visited."""
    xs, ts, nexts, conds, finals = [], [], [], [], []
    uncond = torch.zeros_like(conditions[:1])
    jobs = [(c, s) for c in range(len(conditions)) for s in range(samples)]
    for start in range(0, len(jobs), batch):
        chunk = jobs[start:start + batch]
        noise = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(seed + 7919 * c + s))
                             for c, s in chunk])
        cond = conditions[[c for c, _ in chunk]]
        final, path = sample(model, noise, cond, uncond, steps=steps, guidance=guidance, shift=shift,
                             keep_trajectory=True)
        times = [t for t, _ in path] + [0.0]
        for i, (t, x) in enumerate(path):
            xs.append(x)
            ts.append(torch.full((len(chunk),), t))
            nexts.append(torch.full((len(chunk),), times[i + 1]))
            conds.append(torch.tensor([c for c, _ in chunk]))
        finals.append(final)
    return TrajectoryCache(torch.cat(xs), torch.cat(ts), torch.cat(nexts), torch.cat(conds), torch.cat(finals))


def cached_trajectories(model: torch.nn.Module, conditions: torch.Tensor, shape: tuple[int, ...],
                        cache_dir: Path | None, **settings: Any) -> TrajectoryCache:
    """`teacher_trajectories`, read from / written to `cache_dir` when one is given."""
    if cache_dir is None:
        return teacher_trajectories(model, conditions, shape, **settings)
    digest = hashlib.sha256(conditions.detach().float().cpu().contiguous().numpy().tobytes()).hexdigest()
    key = fingerprint(model, {"shape": list(shape), "conditions": digest,  # order matters: cond holds indices
                              "n": len(conditions), **settings})
    path = Path(cache_dir) / f"trajectories-{key}.safetensors"
    if path.is_file():
        return TrajectoryCache.load(path)
    cache = teacher_trajectories(model, conditions, shape, **settings)
    cache.save(path)
    return cache


class TrajectoryPoints(Dataset):
    """Training items from a cache: dicts of x, t, t_next and the condition embedding.
    Points whose next time is below `t_min` are left out (ADM's (1 − t)/t weight explodes there)."""

    def __init__(self, cache: TrajectoryCache, conditions: torch.Tensor, t_min: float) -> None:
        self.cache, self.conditions = cache, conditions
        self.index = torch.nonzero(cache.t_next >= t_min).flatten()

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        j = int(self.index[i])
        return {"x": self.cache.x[j], "t": self.cache.t[j], "t_next": self.cache.t_next[j],
                "cond": self.conditions[int(self.cache.cond[j])]}
