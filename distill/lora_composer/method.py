"""LoRA-Composer (Yang et al., 2024): training-free composition of several concept LoRAs in one
diffusion U-Net, one region each (`convert/lora_composer.py`: the region-aware attention processor and
the adapters; `sampling.py`: latent re-initialisation and guidance; `evaluation.py`: the judge).

    .venv/bin/athanor submit recipes/lora_composer_fashion.yaml --wait
    .venv/bin/python -m pytest tests/distill/lora_composer tests/convert/test_lora_composer.py -q

Training-free (`trains = False`): `convert` loads every concept LoRA into the teacher's one U-Net as a
named adapter. "Before" is diffusers' `set_adapters` mixing of those adapters under each scene's global
prompt (`Mixer`), "after" is LoRA-Composer on the same U-Net, seeds and noise (`Composer`); the rows of
`lora_composer.compare` (the plain base model, the ablation ladder: `arms.py`) come beside them. The export is
the base pipeline's components, the adapters in the diffusers LoRA format and `composition.json`, from
which `load_export` rebuilds the composer and reproduces the job's images exactly.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from athanor.convert.lora_composer import adapter_bytes, load_concept_adapters
from athanor.distill.fashion_mnist import CLASSES
from athanor.distill.intervals import PerSample
from athanor.distill.lora_composer import evaluation as ev
from athanor.distill.lora_composer.arms import arm_metrics, arm_rows, check_arms, plain_scene
from athanor.distill.lora_composer.config import MAX_REGIONS, LoraComposerArgs, LoraComposerStudent
from athanor.distill.lora_composer.pipeline import Composer, ComposerTeacher, Mixer, Scene, load_teacher
from athanor.distill.lora_composer.sampling import ConceptRegion, word_positions
from athanor.distill.memory import model_bytes
from athanor.distill.method_base import MethodBase
from athanor.distill.spec import DataSpec, Direction, EvalSpec, MethodData, RecipeError, ResolvedSource

logger = logging.getLogger(__name__)
KEY = "lora_composer"


def declared_metrics() -> dict[str, Direction]:
    """Every key `evaluate` can return with its direction. Per-class presence is declared for the judge's
    classes (the only judge is the testbed's Fashion-MNIST classifier, `ComposerTeacher.judge_classes`)."""
    metrics: dict[str, Direction] = {}
    for n in range(1, MAX_REGIONS + 1):
        metrics.update({f"presence_{n}": "higher", f"confusion_{n}": "lower", f"vanishing_{n}": "lower"})
    metrics.update({f"presence_{ev.class_key(c)}": "higher" for c in CLASSES})
    metrics.update(leakage="lower", peak_mem_mb="neutral", params="neutral", weights_mb="neutral",
                   base_weights_mb="neutral", copies_weights_mb="neutral")
    metrics.update(arm_metrics())
    return metrics


def _overlap(a: tuple, b: tuple) -> float:
    w, h = min(a[2], b[2]) - max(a[0], b[0]), min(a[3], b[3]) - max(a[1], b[1])
    smaller = min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))
    return max(w, 0) * max(h, 0) / smaller if smaller > 0 else 0.0


def check_scenes(args: LoraComposerArgs, tokenizer) -> None:
    """Every region names a known concept inside the canvas, and every concept word is in its prompts."""
    for name, concept in args.concepts.items():
        _word_in(tokenizer, concept.prompt, concept.word, f"{KEY}.concepts.{name}.word")
    for s, scene in enumerate(args.all_scenes()):  # generated scenes: indices after the listed ones
        for r, region in enumerate(scene.regions):
            key = f"{KEY}.scenes[{s}].regions[{r}]"
            if region.concept not in args.concepts:
                raise RecipeError(f"{key}.concept", region.concept, f"use one of {sorted(args.concepts)}")
            x0, y0, x1, y1 = region.box
            if not (0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1):
                raise RecipeError(f"{key}.box", list(region.box), "a box is (x0, y0, x1, y1) inside the canvas: "
                                  "fractions with 0 ≤ x0 < x1 ≤ 1 and 0 ≤ y0 < y1 ≤ 1")
            _word_in(tokenizer, scene.prompt, args.concepts[region.concept].word, f"{KEY}.scenes[{s}].prompt")
        for a in range(len(scene.regions)):
            for b in range(a + 1, len(scene.regions)):
                share = _overlap(scene.regions[a].box, scene.regions[b].box)
                if share > args.overlap_warn:
                    logger.warning("%s.scenes[%d]: boxes %d and %d overlap by %.0f%% of the smaller one (over "
                                   "overlap_warn %.0f%%): their concepts will be averaged there", KEY, s, a, b,
                                   100 * share, 100 * args.overlap_warn)
    check_arms(args, tokenizer)


def _word_in(tokenizer, prompt: str, word: str, key: str) -> None:
    try:
        word_positions(tokenizer, prompt, word)
    except ValueError:
        raise RecipeError(key, prompt, f"the concept word {word!r} must appear in this prompt "
                                       "(its attention is what is guided into the box)") from None


def lora_sources(teacher: ComposerTeacher, args: LoraComposerArgs) -> dict[str, Path]:
    """Adapter name -> LoRA path (relative paths inside the teacher's directory, which they may not leave)."""
    root = Path(teacher.path).resolve() if teacher.path else Path.cwd()
    sources = {}
    for name, concept in args.concepts.items():
        path = Path(concept.path).expanduser()
        if not path.is_absolute():
            path = (root / path).resolve()
            if root not in path.parents and path != root:
                raise RecipeError(f"{KEY}.concepts.{name}.path", concept.path,
                                  f"a relative LoRA path must stay inside the teacher directory {root}")
        sources[name] = path
    return sources


class LoraComposer(MethodBase[ComposerTeacher, Composer, LoraComposerArgs, dict[str, Any]]):
    """The LoRA-Composer method (see the module docstring). The export is diffusers components plus adapters and
    a composition config (artifacts, not a transformers model)."""

    name = "lora_composer"
    Args = LoraComposerArgs
    Student = LoraComposerStudent
    trains = False
    metrics = declared_metrics()

    def load_teacher(self, source: ResolvedSource, *, meta: bool = False) -> ComposerTeacher:
        return load_teacher(source, meta=meta)

    def teacher_model(self, teacher: ComposerTeacher) -> Mixer:
        args = teacher.args
        weights = {name: c.weight for name, c in args.concepts.items()}
        return Mixer(teacher, weights, args.steps, args.guidance_scale)

    def convert(self, teacher: ComposerTeacher, student: LoraComposerStudent, args: LoraComposerArgs) -> Composer:
        if args.cpu_threads is not None:
            torch.set_num_threads(args.cpu_threads)
        check_scenes(args, teacher.tokenizer)
        teacher.adapters = lora_sources(teacher, args)
        meta = next(teacher.unet.parameters()).is_meta  # `athanor validate`: check the files, load nothing
        load_concept_adapters(teacher.unet, teacher.adapters, key=f"{KEY}.concepts", validate_only=meta)
        teacher.args = args
        return Composer(teacher, args.settings())

    def data(self, teacher: ComposerTeacher, data: DataSpec, args: LoraComposerArgs) -> MethodData:
        """No training data; the evaluation payload: scenes, labels for the judge, one noise per seed."""
        scenes = [Scene(s.prompt, tuple(ConceptRegion(r.concept, tuple(r.box), args.concepts[r.concept].prompt,
                                                      args.concepts[r.concept].word) for r in s.regions))
                  for s in args.all_scenes()]
        labels = None
        if teacher.judge is not None and all(c.judge_class for c in args.concepts.values()):
            for name, c in args.concepts.items():
                if c.judge_class not in teacher.judge_classes:
                    raise RecipeError(f"{KEY}.concepts.{name}.judge_class", c.judge_class,
                                      f"use one of the judge's classes {list(teacher.judge_classes)}")
            labels = {name: teacher.judge_classes.index(c.judge_class) for name, c in args.concepts.items()}
        unet = teacher.unet.config
        size = unet.sample_size if isinstance(unet.sample_size, (list, tuple)) else (unet.sample_size,) * 2
        noise = torch.stack([torch.randn(unet.in_channels, *size, generator=torch.Generator().manual_seed(s))
                             for s in args.seeds])
        plain = [plain_scene(s, args) for s in args.all_scenes()] if "plain" in args.compare else None
        return MethodData(train_dataloader=lambda: [], eval={"scenes": scenes, "labels": labels, "noise": noise,
                                                             "plain_scenes": plain})

    def evaluate(self, model: Mixer | Composer, teacher: ComposerTeacher, data: MethodData, eval: EvalSpec,
                 args: LoraComposerArgs, artifact_dir: Path) -> dict[str, float | PerSample]:
        """The judge's per-box scores and the attention leakage (`PerSample` over boxes, the same scenes, seeds,
        noise and box order for the baseline and LoRA-Composer), peak memory and weight sizes, and the
        `compare` rows (`arm_<name>/<metric>`, sampled once, the same figures on both sides)."""
        payload = data.eval
        metrics = ev.evaluate(model, payload["scenes"], payload["noise"], payload["labels"], teacher.judge,
                              artifact_dir, teacher.judge_classes)
        metrics.update(arm_rows(teacher, payload, args, artifact_dir.parent))
        base = model_bytes(teacher.unet) + model_bytes(teacher.text_encoder) - adapter_bytes(teacher.unet)
        n = len(args.concepts)
        metrics.update(params=float(sum(p.numel() for p in model.parameters())),
                       weights_mb=(base + adapter_bytes(teacher.unet)) / 2**20, base_weights_mb=base / 2**20,
                       copies_weights_mb=n * base / 2**20 + adapter_bytes(teacher.unet) / 2**20)
        return metrics

    def speed_probe(self, model: Mixer | Composer, teacher: ComposerTeacher, data: MethodData, eval: EvalSpec,
                    args: LoraComposerArgs) -> Callable[[], Any]:
        """One whole sampling of the first scene with the first seed (guidance steps included)."""
        scene, noise = data.eval["scenes"][0], data.eval["noise"][:1]
        return lambda: model.sample(scene, noise)

    def export(self, student: Composer, teacher: ComposerTeacher, out_dir: Path, args: LoraComposerArgs) -> Path:
        """unet/, text_encoder/ (base weights, adapters not merged), tokenizer/, scheduler/, loras/<name>/
        (the diffusers LoRA files as given) and composition.json (concepts, scenes, seeds and settings)."""
        base = Path(teacher.path)
        for part in ("unet", "text_encoder", "tokenizer", "scheduler"):
            shutil.copytree(base / part, out_dir / part)
        concepts = {}
        for name, source in teacher.adapters.items():
            file = source if source.is_file() else source / "pytorch_lora_weights.safetensors"
            (out_dir / "loras" / name).mkdir(parents=True)
            shutil.copy2(file, out_dir / "loras" / name / "pytorch_lora_weights.safetensors")
            concepts[name] = {**args.concepts[name].model_dump(), "path": f"loras/{name}"}
        composition = {**args.model_dump(exclude={"cpu_threads"}), "concepts": concepts}
        (out_dir / "composition.json").write_text(json.dumps(composition, indent=1))
        return out_dir


def load_export(path: Path) -> tuple[Composer, list[Scene], torch.Tensor]:
    """Rebuild the composer from an export (diffusers components + adapters + composition.json), with the
    job's scenes and seed noise: `composer.sample(scene, noise)` reproduces the job's images."""
    method, args = LoraComposer(), LoraComposerArgs(**json.loads((Path(path) / "composition.json").read_text()))
    teacher = method.load_teacher(ResolvedSource(description=str(path), path=Path(path)))
    composer = method.convert(teacher, LoraComposerStudent(), args)
    payload = method.data(teacher, DataSpec(), args).eval
    return composer, payload["scenes"], payload["noise"]
