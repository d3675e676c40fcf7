"""MiniLM: deep self-attention distillation of BERT-family encoders (registered as `minilm`).

v1 (Wang et al. 2020) matches the last layer's attention distributions and value relations
softmax(VVᵀ/√d), head by head, so teacher and student need the same head count. v2 (Wang et al.
2021) matches Q-Q, K-K and V-V relations after splitting every projection into `relation_heads`
relation heads, so head counts and hidden sizes may differ, at a chosen teacher/student layer.
An optional teacher assistant is distilled first (teacher → assistant → student, one module).

Relation losses never reach the last layer's attention output, its feed-forward or the pooler. The
output term (`minilm.output_loss`: mse/cosine on mean-pooled embeddings) trains them; a student
built from a config (random init) must use it, or it would be registered with random output layers.

Recipe sections (defined in `config.py`): `student:` (MiniLMStudent) and `minilm:` (MiniLMArgs), e.g.

    student: {keep_layers: [0, 2, 4]}
    minilm: {version: v2, relation_heads: 12, output_loss: cosine}

A sentence-transformers teacher (a directory with `modules.json`) gives a sentence-transformers
export (`distill/minilm/export.py`).

Tests: `.venv/bin/python -m pytest tests/distill/minilm tests/convert/test_minilm.py -q`
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModel, PreTrainedModel

from athanor.convert.minilm import arch_for, build_student
from athanor.distill.encoder_eval import STS_KEY, evaluate_encoder
from athanor.distill.hf import build_hf_model, load_config, load_tokenizer
from athanor.distill.intervals import PerSample
from athanor.distill.loaders import SeededLoader
from athanor.distill.method_base import MethodBase
from athanor.distill.minilm.config import MiniLMArgs, MiniLMStudent
from athanor.distill.minilm.export import check_st_student, export_encoder, read_st_modules
from athanor.distill.minilm.loss import RelationSpec, model_inputs, resolve_layer
from athanor.distill.minilm.module import MiniLMModule
from athanor.distill.spec import DataSpec, Direction, EvalSpec, MethodData, RecipeError, ResolvedSource, TrainSpec
from athanor.distill.text_data import TokenizeCollate, load_texts


@dataclass
class TextTeacher:
    """What load_teacher returns: the encoder, its tokenizer and, for a sentence-transformers
    directory, where it lives and its module list (so the export can be one too)."""

    model: PreTrainedModel
    tokenizer: Any
    description: str = ""
    st_dir: Path | None = None
    st_modules: list[dict[str, Any]] = field(default_factory=list)


def sts_path(args: MiniLMArgs) -> str | None:
    """`minilm.sts_file` as an absolute path. The spine has already made a path beside the recipe
    absolute (a RecipePath) and `validate` checked it; what is left relative is read from the working
    directory (direct API use)."""
    if args.sts_file is None:
        return None
    path = Path(args.sts_file).expanduser()
    path = path if path.is_absolute() else Path.cwd() / path
    if not path.is_file():
        raise RecipeError(STS_KEY, args.sts_file, f"no such file (relative paths are read from {Path.cwd()})")
    return str(path)


def check_output_loss(student: MiniLMStudent, args: MiniLMArgs, teacher: TextTeacher,
                      widths: dict[str, int]) -> None:
    """Refuse a config-built student without an output term, a per-embedding term between different
    widths, and an output term the teacher's own sentence pooling would not read (mean pooling).

    Why no projection for a narrower student: measured on the tiny recipe, a learned map (even an
    isometry) lets the student satisfy a per-text cosine without its own similarities following the
    teacher's (held-out agreement fell from 0.85 untrained to 0.67); the width-free 'similarity'
    term raised it (0.88)."""
    if student.keep_layers is None and args.output_loss == "none":
        raise RecipeError(
            "minilm.output_loss", "none",
            "a student built from a config (student.layers) starts random and relation losses never "
            "reach its last layer's output projection and feed-forward: set minilm.output_loss "
            "(cosine or mse at the teacher's width, similarity at any width), or copy teacher layers "
            "with student.keep_layers",
        )
    if args.output_loss in ("mse", "cosine") and len(set(widths.values())) > 1:
        sizes = ", ".join(f"{k} {v}" for k, v in widths.items())
        raise RecipeError("minilm.output_loss", args.output_loss,
                          f"compares each embedding with its teacher's, so widths must match ({sizes}): "
                          "use output_loss: similarity (width-free) or keep the teacher's hidden size")
    pooling = next((m for m in teacher.st_modules if m.get("mode")), None)
    if args.output_loss != "none" and pooling is not None and pooling["mode"] != "mean":
        raise RecipeError("minilm.output_loss", args.output_loss,
                          f"the teacher pools with {pooling['mode']!r}; the output term matches mean pooling")


def _relation_names(args: MiniLMArgs) -> dict[str, float]:
    names = ("attention", "value") if args.version == "v1" else ("qq", "kk", "vv")
    weights = {n: getattr(args.weights, n) for n in names}
    if not any(weights.values()):
        raise RecipeError("minilm.weights", weights, f"give at least one of {names} a weight > 0")
    return weights


def _layer(model: PreTrainedModel, layer: int, key: str) -> int:
    n = model.config.num_hidden_layers
    if n == 0:  # the model is what is wrong, not the layer index
        model_key = "teacher.config.num_hidden_layers" if key == "minilm.teacher_layer" else "student.layers"
        raise RecipeError(model_key, 0, "a model with no layers has no attention to distil: give it at least one")
    try:
        return resolve_layer(model, layer)
    except IndexError:
        raise RecipeError(key, layer, f"must be in -{n}..{n - 1}") from None


def relation_spec(source: PreTrainedModel, target: PreTrainedModel, args: MiniLMArgs,
                  source_layer: int, target_layer: int, target_key: str,
                  early_exit: bool = True) -> RelationSpec:
    """Check head compatibility of one (source → target) pair and describe its loss."""
    weights = _relation_names(args)
    heads, t_heads = source.config.num_attention_heads, target.config.num_attention_heads
    if args.version == "v1":
        if heads != t_heads:
            raise RecipeError(
                f"{target_key}.heads", t_heads,
                f"v1 compares attention maps head by head: use {heads} heads or minilm.version: v2",
            )
    else:
        heads = args.relation_heads or heads
        for model, key in ((source, "teacher"), (target, target_key)):
            if model.config.hidden_size % heads:
                raise RecipeError("minilm.relation_heads", heads,
                                  f"must divide the {key} hidden size {model.config.hidden_size}")
    return RelationSpec(weights, heads, source_layer, target_layer, early_exit,
                        args.output_loss, args.output_loss_weight)


class MiniLM(MethodBase[TextTeacher, PreTrainedModel, MiniLMArgs, dict[str, Any]]):
    """The MiniLM method (see module docstring)."""

    name = "minilm"
    Args = MiniLMArgs
    Student = MiniLMStudent
    mlflow_flavor = "transformers"
    mlflow_task = "feature-extraction"
    auto_class = "AutoModel"
    # A direct cosine between embeddings of different widths is undefined (see encoder_eval).
    nan_metrics = frozenset({"embedding_cosine"})
    # What evaluate_encoder returns (sts_spearman only with minilm.sts_file); agreement with the teacher and
    # with human similarity scores are better higher, a parameter count has no better direction.
    metrics: dict[str, Direction] = {
        "params": "neutral", "embedding_cosine": "higher", "similarity_agreement": "higher", "sts_spearman": "higher",
    }

    def load_teacher(self, source: ResolvedSource, *, meta: bool = False) -> TextTeacher:
        config = load_config(source, examples="bert, roberta")
        arch_for(config.model_type, "teacher")
        tokenizer = load_tokenizer(source)
        model = build_hf_model(AutoModel, source, config, meta=meta)
        st_modules = read_st_modules(source.path) if source.path is not None else []
        return TextTeacher(model.eval(), tokenizer, source.description,
                           source.path if st_modules else None, st_modules)

    def convert(self, teacher: TextTeacher, student: MiniLMStudent, args: MiniLMArgs) -> PreTrainedModel:
        model = self._convert(teacher, student, args)
        widths = {"teacher": teacher.model.config.hidden_size, "student": model.config.hidden_size}
        if args.assistant is not None:
            widths["minilm.assistant"] = args.assistant.hidden_size or widths["teacher"]
        check_output_loss(student, args, teacher, widths)
        check_st_student(teacher.st_modules, teacher.model, model)
        # Read by export: a config-built student's pooler is random (no loss reaches it).
        model.minilm_init = "keep_layers" if student.keep_layers is not None else "config"
        return model

    def _convert(self, teacher: TextTeacher, student: MiniLMStudent, args: MiniLMArgs) -> PreTrainedModel:
        t = teacher.model
        t_layer = _layer(t, args.teacher_layer, "minilm.teacher_layer")
        if args.assistant is None:
            model = build_student(t, student, "student")
            s_layer = _layer(model, args.student_layer, "minilm.student_layer")
            relation_spec(t, model, args, t_layer, s_layer, "student")  # fail at submission
            return model
        assistant = build_student(t, args.assistant, "minilm.assistant")
        model = build_student(t, student, "student", parent=assistant)
        s_layer = _layer(model, args.student_layer, "minilm.student_layer")
        a_layer = resolve_layer(assistant, -1)
        relation_spec(t, assistant, args, t_layer, a_layer, "minilm.assistant")
        relation_spec(assistant, model, args, a_layer, s_layer, "student")
        return model

    def data(self, teacher: TextTeacher, data: DataSpec, args: MiniLMArgs) -> MethodData:
        train, held_out = load_texts(data)
        loader = SeededLoader(train, batch_size=data.batch_size, seed=data.seed, num_workers=data.num_workers,
                              collate_fn=TokenizeCollate(teacher.tokenizer, data.max_length))
        return MethodData(
            train_dataloader=loader,
            eval={"texts": held_out, "tokenizer": teacher.tokenizer, "max_length": data.max_length,
                  "sts_file": sts_path(args)},
            num_train_examples=len(train),
        )

    def teacher_model(self, teacher: TextTeacher) -> PreTrainedModel:
        return teacher.model

    def lightning_module(self, teacher: TextTeacher, student: PreTrainedModel, data: MethodData,
                         args: MiniLMArgs, train: TrainSpec) -> MiniLMModule:
        t = teacher.model
        t_layer = _layer(t, args.teacher_layer, "minilm.teacher_layer")
        s_layer = _layer(student, args.student_layer, "minilm.student_layer")
        # ZeRO-3 gathers/releases parameters in module hooks: let every forward run to the end.
        exit_early = train.strategy != "deepspeed_stage_3"
        if args.assistant is None:
            spec = relation_spec(t, student, args, t_layer, s_layer, "student", exit_early)
            return MiniLMModule(t, student, spec, train)
        if not 0 < args.assistant_steps < train.max_steps:
            raise RecipeError("minilm.assistant_steps", args.assistant_steps,
                              f"must be between 1 and train.max_steps - 1 ({train.max_steps - 1})")
        assistant = build_student(t, args.assistant, "minilm.assistant")
        a_layer = resolve_layer(assistant, -1)
        a_spec = relation_spec(t, assistant, args, t_layer, a_layer, "minilm.assistant", exit_early)
        spec = relation_spec(assistant, student, args, a_layer, s_layer, "student", exit_early)
        return MiniLMModule(t, student, spec, train, assistant, a_spec, args.assistant_steps)

    def trained_student(self, module: MiniLMModule) -> PreTrainedModel:
        return module.release_student()

    def evaluate(self, model: PreTrainedModel, teacher: TextTeacher, data: MethodData,
                 eval: EvalSpec, args: MiniLMArgs, artifact_dir: Path) -> dict[str, float | PerSample]:
        """Size, agreement with the teacher and STS (`distill/encoder_eval.py`); the agreement and STS metrics
        are `PerSample`s over the held-out texts and the STS pairs, in file order for every model."""
        return evaluate_encoder(model, teacher.model, teacher.tokenizer, data.eval["texts"],
                                eval, data.eval["max_length"], sts_file=data.eval.get("sts_file"))

    def speed_probe(self, model: PreTrainedModel, teacher: TextTeacher, data: MethodData,
                    eval: EvalSpec, args: MiniLMArgs) -> Callable[[], Any]:
        """One forward of `model` (eval mode) on the first eval batch, tokenised once, on its device."""
        texts = data.eval["texts"][: eval.batch_size]
        device = next(model.parameters()).device
        batch = model_inputs(dict(teacher.tokenizer(texts, truncation=True, max_length=data.eval["max_length"],
                                                    padding=True, return_tensors="pt").to(device)))
        model.eval()

        def probe() -> Any:
            with torch.no_grad():
                return model(**batch).last_hidden_state

        return probe

    def export(self, student: PreTrainedModel, teacher: TextTeacher, out_dir: Path,
               args: MiniLMArgs) -> Path:
        """A transformers directory (AutoModel + tokenizer); a sentence-transformers one as well when
        the teacher is one; plus `training_notes.txt` for the model card."""
        return export_encoder(student, teacher.tokenizer, teacher.st_dir, teacher.st_modules, Path(out_dir),
                              args.output_loss, getattr(student, "minilm_init", "keep_layers"))
