"""MiniLM: deep self-attention distillation of BERT-family encoders (registered as `minilm`).

v1 (Wang et al. 2020) matches the last layer's attention distributions and value relations
softmax(VVᵀ/√d), head by head, so teacher and student need the same head count. v2 (Wang et al.
2021) matches Q-Q, K-K and V-V relations after splitting every projection into `relation_heads`
relation heads, so head counts and hidden sizes may differ, at a chosen teacher/student layer.
An optional teacher assistant is distilled first (teacher → assistant → student, one module).

Recipe sections handled here: `student:` (MiniLMStudent) and `minilm:` (MiniLMArgs), e.g.

    student: {keep_layers: [0, 2, 4]}
    minilm: {version: v2, relation_heads: 12}

Tests: `.venv/bin/python -m pytest tests/distill/test_minilm.py tests/convert/test_minilm.py -q`
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field
from transformers import AutoConfig, AutoModel, AutoTokenizer, PreTrainedModel

from convert.minilm import ARCHS, MiniLMStudent, arch_for, build_student
from distill.text_data import TrainLoader, load_texts
from distill.hf import build_hf_model
from distill.minilm.loss import RelationSpec, resolve_layer
from distill.minilm.module import MiniLMModule
from distill.spec import (
    DataSpec, EvalSpec, MethodData, RecipeError, ResolvedSource, Section, TrainSpec,
)
from distill.encoder_eval import evaluate_encoder


class RelationWeights(Section):
    """Loss weight per relation; a zero weight drops that relation."""

    attention: float = Field(1.0, ge=0)
    """v1: attention distributions softmax(QKᵀ/√d)."""
    value: float = Field(1.0, ge=0)
    """v1: value relations softmax(VVᵀ/√d)."""
    qq: float = Field(1.0, ge=0)
    """v2: query-query relations."""
    kk: float = Field(1.0, ge=0)
    """v2: key-key relations."""
    vv: float = Field(1.0, ge=0)
    """v2: value-value relations."""


class MiniLMArgs(Section):
    """The recipe's `minilm:` section."""

    version: Literal["v1", "v2"] = "v2"
    """v1: attention + value relations, equal head counts; v2: Q-Q/K-K/V-V relation heads."""
    relation_heads: int | None = Field(None, ge=1)
    """v2: relation heads every Q/K/V is split into (default: the teacher's attention heads);
    must divide the attention width of teacher, student (and assistant)."""
    teacher_layer: int = -1
    """Teacher layer whose relations are the targets (-1: last)."""
    student_layer: int = -1
    """Student layer trained to match them (-1: last)."""
    weights: RelationWeights = Field(default_factory=RelationWeights)
    """Per-relation loss weights (v1 uses attention/value, v2 uses qq/kk/vv)."""
    assistant: MiniLMStudent | None = None
    """Optional teacher assistant (same keys as `student:`), distilled from the teacher first;
    the student then learns from the assistant's last layer."""
    assistant_steps: int = Field(0, ge=0)
    """Optimizer steps of the teacher → assistant phase (must be < train.max_steps)."""


@dataclass
class TextTeacher:
    """What load_teacher returns: the encoder and its tokenizer."""

    model: PreTrainedModel
    tokenizer: Any
    description: str = ""


def _relation_names(args: MiniLMArgs) -> dict[str, float]:
    names = ("attention", "value") if args.version == "v1" else ("qq", "kk", "vv")
    weights = {n: getattr(args.weights, n) for n in names}
    if not any(weights.values()):
        raise RecipeError("minilm.weights", weights, f"give at least one of {names} a weight > 0")
    return weights


def _layer(model: PreTrainedModel, layer: int, key: str) -> int:
    try:
        return resolve_layer(model, layer)
    except IndexError:
        n = model.config.num_hidden_layers
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
    return RelationSpec(weights, heads, source_layer, target_layer, early_exit)


class MiniLM:
    """The MiniLM method (see module docstring)."""

    name: ClassVar[str] = "minilm"
    Args: ClassVar[type[Section]] = MiniLMArgs
    Student: ClassVar[type[Section]] = MiniLMStudent
    trains: ClassVar[bool] = True
    mlflow_flavor: ClassVar[str] = "transformers"
    mlflow_task: ClassVar[str | None] = "feature-extraction"

    def load_teacher(self, source: ResolvedSource, *, meta: bool = False) -> TextTeacher:
        if source.path is not None:
            config = AutoConfig.from_pretrained(source.path, trust_remote_code=source.trust_remote_code)
        elif source.config is not None:
            cfg = dict(source.config)
            if "model_type" not in cfg:
                raise RecipeError("teacher.config", cfg, f"add model_type (one of {sorted(ARCHS)})")
            config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
        else:
            raise RecipeError("teacher", source.description, "give a model directory or a config")
        arch_for(config.model_type, "teacher")
        tokenizer_path = source.tokenizer_path or source.path
        if tokenizer_path is None:
            raise RecipeError("teacher.tokenizer", None, "an inline-config teacher needs a tokenizer path")
        try:
            tokenizer = AutoTokenizer.from_pretrained(tokenizer_path,
                                                      trust_remote_code=source.trust_remote_code)
        except (OSError, ValueError) as exc:
            raise RecipeError("teacher.tokenizer", str(tokenizer_path), f"no tokenizer found: {exc}") from exc
        model = build_hf_model(AutoModel, source, config, meta=meta)
        return TextTeacher(model.eval(), tokenizer, source.description)

    def convert(self, teacher: TextTeacher, student: MiniLMStudent, args: MiniLMArgs) -> PreTrainedModel:
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
        return MethodData(
            train_dataloader=TrainLoader(train, teacher.tokenizer, data),
            eval={"texts": held_out, "tokenizer": teacher.tokenizer, "max_length": data.max_length},
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
                 eval: EvalSpec, args: MiniLMArgs) -> dict[str, float]:
        return evaluate_encoder(model, teacher.model, teacher.tokenizer, data.eval["texts"],
                                eval, data.eval["max_length"])

    def export(self, student: PreTrainedModel, teacher: TextTeacher, out_dir: Path,
               args: MiniLMArgs) -> Path:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        student.save_pretrained(out_dir)
        teacher.tokenizer.save_pretrained(out_dir)
        return out_dir
