"""MiniLM model surgery: per-architecture Q/K/V accessors and student construction.

A student is either built from a smaller config (random init, seeded) or by keeping chosen teacher
layers (weights copied exactly, embeddings included). Everything works on the `meta` device too,
so the job spine can estimate parameter counts without loading weights.

Tests: `.venv/bin/python -m pytest tests/convert/test_minilm.py -q`
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from pydantic import Field
from transformers import AutoConfig, AutoModel, PreTrainedModel

from athanor.convert.recipe_types import RecipeError, Section


@dataclass(frozen=True)
class EncoderArch:
    """Where an encoder keeps its layers and each layer's query/key/value projections."""

    layers: str
    """Dotted path from the AutoModel to the ModuleList of transformer layers."""
    query: str
    key: str
    value: str
    """Dotted paths from one layer to its query/key/value `nn.Linear`."""


_BERT_LIKE = EncoderArch(
    layers="encoder.layer",
    query="attention.self.query",
    key="attention.self.key",
    value="attention.self.value",
)
# model_type -> accessor. Every entry is exercised by tests/convert/test_minilm.py.
ARCHS: dict[str, EncoderArch] = {
    "bert": _BERT_LIKE,
    "roberta": _BERT_LIKE,
    "xlm-roberta": _BERT_LIKE,
    "electra": _BERT_LIKE,
}


def arch_for(model_type: str, key: str = "teacher") -> EncoderArch:
    """The accessor for `model_type`, or a RecipeError naming `key` and the supported types."""
    if model_type not in ARCHS:
        raise RecipeError(
            key,
            model_type,
            f"MiniLM supports encoder model_types {sorted(ARCHS)}; use one of those as teacher",
        )
    return ARCHS[model_type]


def layer_list(model: PreTrainedModel) -> torch.nn.ModuleList:
    """The transformer layers of a supported encoder."""
    return model.get_submodule(arch_for(model.config.model_type).layers)


def qkv(model: PreTrainedModel, layer: int) -> tuple[torch.nn.Linear, torch.nn.Linear, torch.nn.Linear]:
    """The query, key and value projections of `layer` (index into the layer list)."""
    arch = arch_for(model.config.model_type)
    block = layer_list(model)[layer]
    return block.get_submodule(arch.query), block.get_submodule(arch.key), block.get_submodule(arch.value)


class MiniLMStudent(Section):
    """The student's shape: keep teacher layers (`keep_layers`) or give a smaller config."""

    keep_layers: list[int] | None = None
    """Teacher layer indices to keep, in order (e.g. [0, 2, 4]); their weights and the teacher's
    embeddings are copied exactly. Excludes the size keys below."""
    layers: int | None = Field(None, ge=1)
    """Number of layers of a student built from a config (random init)."""
    hidden_size: int | None = Field(None, ge=8)
    """Hidden size (default: the teacher's)."""
    heads: int | None = Field(None, ge=1)
    """Attention heads (default: the teacher's); must divide hidden_size."""
    intermediate_size: int | None = Field(None, ge=8)
    """Feed-forward width (default: the teacher's ratio to hidden_size)."""
    seed: int = 0
    """Seed for the random init of a config student."""


def _check_shape(spec: MiniLMStudent, parent: dict, key: str, parent_name: str) -> dict[str, int]:
    """Resolve a student section against its parent config; return the four size fields."""
    n_parent = parent["num_hidden_layers"]
    if spec.keep_layers is not None:
        for name in ("layers", "hidden_size", "heads", "intermediate_size"):
            if getattr(spec, name) is not None:
                raise RecipeError(
                    f"{key}.{name}", getattr(spec, name),
                    "keep_layers copies teacher layers as they are: remove this key or keep_layers",
                )
        keep = spec.keep_layers
        if not keep:
            raise RecipeError(f"{key}.keep_layers", keep, "list at least one layer index")
        bad = [i for i in keep if not 0 <= i < n_parent]
        if bad:
            raise RecipeError(
                f"{key}.keep_layers", keep, f"indices must be in 0..{n_parent - 1} ({parent_name} layers)"
            )
        if len(set(keep)) != len(keep):
            raise RecipeError(f"{key}.keep_layers", keep, "each layer may be kept once")
        return {
            "num_hidden_layers": len(keep),
            "hidden_size": parent["hidden_size"],
            "num_attention_heads": parent["num_attention_heads"],
            "intermediate_size": parent["intermediate_size"],
        }
    if spec.layers is None:
        raise RecipeError(key, spec.model_dump(exclude_none=True), "set keep_layers or layers")
    if spec.layers > n_parent:
        raise RecipeError(
            f"{key}.layers", spec.layers, f"must not exceed the {parent_name}'s {n_parent} layers"
        )
    hidden = spec.hidden_size or parent["hidden_size"]
    if hidden > parent["hidden_size"]:
        raise RecipeError(
            f"{key}.hidden_size", hidden,
            f"must not exceed the {parent_name}'s hidden size {parent['hidden_size']}",
        )
    heads = spec.heads or parent["num_attention_heads"]
    if hidden % heads:
        raise RecipeError(f"{key}.heads", heads, f"must divide hidden_size {hidden}")
    ratio = parent["intermediate_size"] / parent["hidden_size"]
    return {
        "num_hidden_layers": spec.layers,
        "hidden_size": hidden,
        "num_attention_heads": heads,
        "intermediate_size": spec.intermediate_size or int(round(hidden * ratio)),
    }


def build_student(
    teacher: PreTrainedModel,
    spec: MiniLMStudent,
    key: str = "student",
    parent: PreTrainedModel | None = None,
) -> PreTrainedModel:
    """Build the student of `teacher` (layers copied from `teacher`, sizes checked against `parent`).

    `parent` is the model the student must not exceed (the teacher, or the teacher assistant when
    one sits between them); keep_layers always index the teacher's layers.
    """
    arch = arch_for(teacher.config.model_type)
    parent = parent if parent is not None else teacher
    base = teacher.config.to_dict()
    if spec.keep_layers is not None and parent is not teacher:
        # keep_layers index the teacher: check them against the teacher, the size against parent.
        sizes = _check_shape(spec, base, key, "teacher")
        if sizes["num_hidden_layers"] > parent.config.num_hidden_layers:
            raise RecipeError(
                f"{key}.keep_layers", spec.keep_layers,
                f"keeps more layers than the assistant's {parent.config.num_hidden_layers}",
            )
        if sizes["hidden_size"] > parent.config.hidden_size:
            raise RecipeError(
                f"{key}.keep_layers", spec.keep_layers,
                f"copies hidden size {sizes['hidden_size']}, wider than the assistant's "
                f"{parent.config.hidden_size}",
            )
    else:
        sizes = _check_shape(spec, parent.config.to_dict(), key,
                             "teacher" if parent is teacher else "assistant")
    base.update(sizes)
    for drop in ("architectures", "_name_or_path", "transformers_version", "model_type"):
        base.pop(drop, None)
    config = AutoConfig.for_model(teacher.config.model_type, **base)
    device = next(teacher.parameters()).device
    if device.type == "meta":
        with torch.device("meta"):
            return AutoModel.from_config(config)
    # Seed only the student's init; restore the caller's RNG so training order is unaffected.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        student = AutoModel.from_config(config)
    student.to(device=device, dtype=next(teacher.parameters()).dtype)
    if spec.keep_layers is not None:
        _copy_kept_layers(teacher, student, spec.keep_layers, arch.layers)
    return student


def _copy_kept_layers(
    teacher: PreTrainedModel, student: PreTrainedModel, keep: list[int], layers_path: str
) -> None:
    """Copy every teacher tensor into the student, renumbering the kept layers 0..len(keep)-1."""
    source = teacher.state_dict()
    prefix = layers_path + "."
    renumber = {str(t): str(s) for s, t in enumerate(keep)}
    mapped: dict[str, torch.Tensor] = {}
    for name, tensor in source.items():
        if name.startswith(prefix):
            index, _, rest = name[len(prefix):].partition(".")
            if index not in renumber:
                continue
            name = f"{prefix}{renumber[index]}.{rest}"
        mapped[name] = tensor
    # strict=True: any tensor the student has but the teacher lacks is a bug, not a silent init.
    student.load_state_dict(mapped, strict=True)
