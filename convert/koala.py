"""KOALA student construction for SDXL-family `UNet2DConditionModel`s (Lee et al., 2023).

    .venv/bin/python -m pytest tests/convert/test_koala.py -q

A KOALA student keeps the teacher's stages, channels and embeddings and removes depth:
one ResBlock(-Transformer pair) per encoder stage, two per decoder stage, fewer transformer layers
in deep stages, and (700M) no mid block. Every student block is initialised by copying one teacher
block; `BlockMap` records which, and is logged so a run says exactly where each weight came from.

Presets, derived from the teacher's config so they also apply to SD1.x/2.x and tiny U-Nets:
  koala-1b:   encoder ResBlocks 1 per stage (decoder 2), transformer stacks deeper than 2 keep 60%
              (SDXL [0, 2, 10] -> [0, 2, 6]), mid block kept (diffusers ties its depth to the
              last stage's: 6 for SDXL).
  koala-700m: as koala-1b but keeping 50% (SDXL -> [0, 2, 5]) and no mid block.
  custom:     per-stage counts given by the recipe (`student_config(..., layers_per_block=...)`).
              A decoder transformer depth of 0 where the teacher has attention drops that decoder stage's
              transformer stacks (CrossAttnUpBlock2D -> UpBlock2D): KOALA's decoder depth reduction taken to
              its end, for U-Nets whose stacks are already one layer deep (nothing else left to cut).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers import UNet2DConditionModel

from athanor.convert.recipe_types import RecipeError

logger = logging.getLogger(__name__)

PRESETS = ("koala-1b", "koala-700m", "custom")
_KEEP_FRACTION = {"koala-1b": 0.6, "koala-700m": 0.5}
"""Share of transformer layers kept in stacks deeper than 2 (paper: SDXL's 10 -> 6 / 5)."""
_KEEP_MID = {"koala-1b": True, "koala-700m": False}
_DOWN_TYPES = {"DownBlock2D": False, "CrossAttnDownBlock2D": True}  # type -> has attention
_UP_TYPES = {"UpBlock2D": False, "CrossAttnUpBlock2D": True}
_MID_TYPES = {"UNetMidBlock2DCrossAttn", None}
SELECTIONS = ("even", "first", "last")


class UnsupportedLayout(ValueError):
    """The teacher U-Net is not an SDXL-family layout; the message names the config key."""


@dataclass(frozen=True)
class Layout:
    """The depth-related part of a U-Net config, normalised to per-stage lists."""

    attention: list[bool]
    """Per encoder stage: does it have transformer stacks (CrossAttnDownBlock2D)?"""
    layers_per_block: list[int]
    """ResBlocks per encoder stage; the mirrored decoder stage has one more."""
    down_depth: list[int]
    """Transformer layers per stack in each encoder stage (also sets the mid block's depth)."""
    up_depth: list[int]
    """Transformer layers per stack in each decoder stage (decoder order)."""
    mid_block: bool
    up_attention: list[bool] | None = None
    """Per decoder stage (decoder order): transformer stacks? None: mirrors `attention`. A student may drop a
    decoder stage's stacks; it never adds one the teacher lacks."""

    @property
    def decoder_attention(self) -> list[bool]:
        return list(self.attention[::-1]) if self.up_attention is None else list(self.up_attention)


def _per_stage(config: dict, key: str, default: Any, n: int) -> list[int]:
    value = config.get(key, default)
    if isinstance(value, int):
        return [value] * n
    if not isinstance(value, list | tuple) or len(value) != n:
        raise UnsupportedLayout(f"{key}={value!r}: expected an int or one entry per stage ({n})")
    out = []
    for item in value:
        if isinstance(item, list | tuple):  # per-layer depths (asymmetric U-Nets)
            if len(set(item)) != 1:
                raise UnsupportedLayout(f"{key}={value!r}: per-layer transformer depths that differ within a stage")
            item = item[0]
        out.append(int(item))
    return out


def layout(config: dict) -> Layout:
    """Check that `config` is an SDXL-family U-Net and return its per-stage layout."""
    down, up = list(config.get("down_block_types", [])), list(config.get("up_block_types", []))
    bad = [t for t in down if t not in _DOWN_TYPES]
    if not down or bad:
        raise UnsupportedLayout(f"down_block_types={down!r}: supported block types are {sorted(_DOWN_TYPES)}")
    bad = [t for t in up if t not in _UP_TYPES]
    if len(up) != len(down) or bad:
        raise UnsupportedLayout(f"up_block_types={up!r}: need {len(down)} blocks of {sorted(_UP_TYPES)}")
    attention = [_DOWN_TYPES[t] for t in down]
    up_attention = [_UP_TYPES[t] for t in up]
    # A decoder stage without the attention its encoder stage has is a KOALA student's (depth 0 there).
    if any(u and not d for u, d in zip(up_attention, attention[::-1])):
        raise UnsupportedLayout(f"up_block_types={up!r} does not mirror down_block_types={down!r}")
    mid = config.get("mid_block_type", "UNetMidBlock2DCrossAttn")
    if mid not in _MID_TYPES:
        raise UnsupportedLayout(f"mid_block_type={mid!r}: supported are {sorted(map(str, _MID_TYPES))}")
    for key in ("dual_cross_attention", "only_cross_attention"):
        if config.get(key) not in (None, False) and config.get(key) != [False] * len(down):
            raise UnsupportedLayout(f"{key}={config.get(key)!r}: only False is supported")
    n = len(down)
    layers = _per_stage(config, "layers_per_block", 2, n)
    down_depth = _per_stage(config, "transformer_layers_per_block", 1, n)
    reverse = config.get("reverse_transformer_layers_per_block")
    up_depth = down_depth[::-1] if reverse is None else _per_stage(config, "reverse_transformer_layers_per_block", 1, n)
    return Layout(attention, layers, down_depth, up_depth, mid is not None,
                  None if up_attention == attention[::-1] else up_attention)


def _reduce(depth: int, fraction: float) -> int:
    # Round half up (not Python's banker's rounding) so the rule is easy to state.
    return depth if depth <= 2 else max(1, int(depth * fraction + 0.5))


def student_layout(teacher: Layout, preset: str, **custom: Any) -> Layout:
    """The student's layout for a preset; `custom` gives the per-stage counts (see `student_config`)."""
    n = len(teacher.attention)
    if preset in _KEEP_FRACTION:
        if any(v is not None for v in custom.values()):
            given = sorted(k for k, v in custom.items() if v is not None)
            raise RecipeError("student.preset", preset, f"per-stage counts {given} need preset 'custom'")
        frac = _KEEP_FRACTION[preset]
        return Layout(
            teacher.attention,
            [1] * n,
            [_reduce(d, frac) for d in teacher.down_depth],
            [_reduce(d, frac) for d in teacher.up_depth],
            teacher.mid_block and _KEEP_MID[preset],
        )
    if preset != "custom":
        raise RecipeError("student.preset", preset, f"choose one of {', '.join(PRESETS)}")
    layers = _custom_list(custom.get("layers_per_block"), teacher.layers_per_block, "layers_per_block", n)
    down = _custom_list(custom.get("transformer_depth"), teacher.down_depth, "transformer_depth", n)
    up = _custom_list(custom.get("decoder_transformer_depth"), down[::-1], "decoder_transformer_depth", n)
    # Stages without attention have no stack to size (the paper writes 0 for them): keep the
    # teacher's value, except in the last encoder stage, whose value diffusers uses for the mid block.
    down = [d if att or i == n - 1 else t
            for i, (d, t, att) in enumerate(zip(down, teacher.down_depth, teacher.attention))]
    up = [d if att else t for d, t, att in zip(up, teacher.up_depth, teacher.decoder_attention)]
    for key, counts, limit, least in (
        ("layers_per_block", layers, teacher.layers_per_block, 1),
        ("transformer_depth", down, teacher.down_depth, 1),
        ("decoder_transformer_depth", up, teacher.up_depth, 0),
    ):
        for i, (c, t) in enumerate(zip(counts, limit)):
            if not least <= c <= t:
                raise RecipeError(f"student.{key}", counts, f"stage {i} must be between {least} and the teacher's {t}")
    up_attention = [att and d > 0 for att, d in zip(teacher.decoder_attention, up)]
    # A dropped stage keeps a depth entry diffusers ignores (UpBlock2D has no stacks to size).
    up = [d if d > 0 else t for d, t in zip(up, teacher.up_depth)]
    mid = custom.get("mid_block")
    mid = teacher.mid_block if mid is None else bool(mid)
    if mid and not teacher.mid_block:
        raise RecipeError("student.mid_block", True, "the teacher has no mid block to copy; set false")
    return Layout(teacher.attention, layers, down, up, mid,
                  None if up_attention == teacher.attention[::-1] else up_attention)


def _custom_list(value: Any, default: list[int], key: str, n: int) -> list[int]:
    if value is None:
        return list(default)
    value = [value] * n if isinstance(value, int) else list(value)
    if len(value) != n:
        raise RecipeError(f"student.{key}", value, f"give one count per stage ({n} stages)")
    return [int(v) for v in value]


def student_config(teacher_config: dict, preset: str, **custom: Any) -> dict:
    """A diffusers U-Net config for the student. `custom` (preset 'custom' only): `layers_per_block`,
    `transformer_depth` (per encoder stage; the last also sets the mid block's depth),
    `decoder_transformer_depth` (decoder order; default: the encoder's reversed; 0 drops a stage's stacks) and
    `mid_block`."""
    teacher = layout(teacher_config)
    student = student_layout(teacher, preset, **custom)
    config = {k: v for k, v in teacher_config.items() if not k.startswith("_") or k == "_class_name"}
    config["layers_per_block"] = student.layers_per_block
    if len(set(student.layers_per_block)) == 1:
        config["layers_per_block"] = student.layers_per_block[0]
    config["transformer_layers_per_block"] = student.down_depth
    # diffusers reverses the encoder depths for the decoder unless told otherwise.
    config["reverse_transformer_layers_per_block"] = (
        None if student.up_depth == student.down_depth[::-1] else student.up_depth
    )
    config["mid_block_type"] = config.get("mid_block_type", "UNetMidBlock2DCrossAttn") if student.mid_block else None
    config["up_block_types"] = ["CrossAttnUpBlock2D" if att else "UpBlock2D" for att in student.decoder_attention]
    return config


def even_subset(n: int, k: int, selection: str = "even") -> list[int]:
    """`k` of `n` indices: evenly spaced with first and last kept, or the first / last `k`."""
    if not 1 <= k <= n:
        raise ValueError(f"cannot keep {k} of {n}")
    if selection == "first":
        return list(range(k))
    if selection == "last":
        return list(range(n - k, n))
    if k == 1:
        return [0]
    return [int(i * (n - 1) / (k - 1) + 0.5) for i in range(k)]


@dataclass
class BlockMap:
    """Student module path -> teacher module path it was copied from; anything unlisted
    (stem, time/text embeddings, samplers, norms, transformer projections) maps to itself."""

    entries: dict[str, str] = field(default_factory=dict)
    kinds: dict[str, str] = field(default_factory=dict)

    def add(self, student: str, teacher: str, kind: str) -> None:
        self.entries[student], self.kinds[student] = teacher, kind

    def teacher_name(self, student_name: str) -> str:
        """The teacher parameter/module name a student name was copied from (longest prefix wins)."""
        parts = student_name.split(".")
        for i in range(len(parts), 0, -1):
            prefix = ".".join(parts[:i])
            if prefix in self.entries:
                return ".".join([self.entries[prefix], *parts[i:]])
        return student_name

    def of_kind(self, kind: str) -> dict[str, str]:
        return {s: t for s, t in self.entries.items() if self.kinds[s] == kind}

    def lines(self) -> list[str]:
        return [f"{self.kinds[s]:<17} student {s} <- teacher {t}" for s, t in self.entries.items()]

    def to_json(self) -> str:
        return json.dumps({"entries": self.entries, "kinds": self.kinds}, indent=1)


def block_map(teacher_config: dict, config: dict, selection: str = "even") -> BlockMap:
    """Which teacher ResBlock / transformer stack / transformer layer each student block copies.

    Encoder stages keep their first ResBlock (the only one whose input width matches); decoder
    stages keep the first and last (their skip inputs differ) and drop the middle ones. Reduced
    transformer stacks keep `selection` layers ('even': evenly spaced, first and last kept)."""
    if selection not in SELECTIONS:
        raise RecipeError("koala.layer_selection", selection, f"choose one of {', '.join(SELECTIONS)}")
    t, s = layout(teacher_config), layout(config)
    bmap = BlockMap()

    def stack(s_path: str, t_path: str, s_depth: int, t_depth: int) -> None:
        bmap.add(s_path, t_path, "attention")
        for j, tj in enumerate(even_subset(t_depth, s_depth, selection)):
            bmap.add(f"{s_path}.transformer_blocks.{j}", f"{t_path}.transformer_blocks.{tj}", "transformer_layer")

    for i, attn in enumerate(s.attention):
        # Encoder: first ResBlock always (input width differs), the rest evenly spaced.
        for j, tj in enumerate(even_subset(t.layers_per_block[i], s.layers_per_block[i])):
            bmap.add(f"down_blocks.{i}.resnets.{j}", f"down_blocks.{i}.resnets.{tj}", "resnet")
            if attn:
                stack(f"down_blocks.{i}.attentions.{j}", f"down_blocks.{i}.attentions.{tj}", s.down_depth[i],
                      t.down_depth[i])
    if s.mid_block:
        for j in range(2):
            bmap.add(f"mid_block.resnets.{j}", f"mid_block.resnets.{j}", "resnet")
        stack("mid_block.attentions.0", "mid_block.attentions.0", s.down_depth[-1], t.down_depth[-1])
    for i, attn in enumerate(s.decoder_attention):
        stage = len(s.attention) - 1 - i
        n_t, n_s = t.layers_per_block[stage] + 1, s.layers_per_block[stage] + 1
        for j, tj in enumerate(even_subset(n_t, n_s)):
            bmap.add(f"up_blocks.{i}.resnets.{j}", f"up_blocks.{i}.resnets.{tj}", "resnet")
            if attn:
                stack(f"up_blocks.{i}.attentions.{j}", f"up_blocks.{i}.attentions.{tj}", s.up_depth[i], t.up_depth[i])
    return bmap


def build_student(
    teacher: UNet2DConditionModel, preset: str, *, selection: str = "even", **custom: Any
) -> tuple[UNet2DConditionModel, BlockMap]:
    """Build the student and copy the mapped teacher weights into it (on the teacher's device and
    dtype; on the meta device only the structure is built)."""
    teacher_config = dict(teacher.config)
    config = student_config(teacher_config, preset, **custom)
    bmap = block_map(teacher_config, config, selection)
    student = meta_unet(config)
    for line in bmap.lines():
        logger.info(line)
    reference = next(teacher.parameters())
    if reference.is_meta:
        return student, bmap
    source = teacher.state_dict()
    state = {}
    for name, meta_tensor in student.state_dict().items():
        teacher_name = bmap.teacher_name(name)
        if teacher_name not in source or source[teacher_name].shape != meta_tensor.shape:
            raise UnsupportedLayout(f"student {name} maps to teacher {teacher_name}, which is missing or "
                                    f"has another shape ({tuple(meta_tensor.shape)})")
        state[name] = source[teacher_name].detach().clone()  # a copy: training must not touch the teacher
    # assign=True adopts the copies directly instead of allocating (and random-initialising) twice.
    student.load_state_dict(state, strict=True, assign=True)
    leftover = [n for n, b in student.named_buffers() if b.is_meta]
    if leftover:
        raise RuntimeError(f"buffers left on the meta device: {leftover}")
    return student, bmap  # already in the teacher's dtype: assign=True adopted the copies


def meta_unet(config: dict) -> UNet2DConditionModel:
    """A U-Net built from `config` on the meta device: structure and sizes, no memory, no weights
    (count its parameters with `convert.module_utils.count_params`)."""
    with torch.device("meta"):
        return UNet2DConditionModel.from_config(config)
