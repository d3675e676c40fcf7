"""KOALA student construction: paper sizes, presets, block map, layouts.

    .venv/bin/python -m pytest tests/convert/test_koala.py -q
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel

from athanor.convert.koala import (
    UnsupportedLayout,
    block_map,
    build_student,
    even_subset,
    meta_unet,
    student_config,
)
from athanor.convert.module_utils import count_params
from athanor.distill.spec import RecipeError

SDXL = json.loads((Path(__file__).parents[1] / "fixtures" / "sdxl_unet_config.json").read_text())

# KOALA paper, Table 1 (U-Net parameters): SDXL-Base 2,567M, KOALA-1B 1,161M, KOALA-700M 782M.
PAPER_M = {"sdxl": 2567, "koala-1b": 1161, "koala-700m": 782}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_sdxl(**changes) -> dict:
    """SDXL's layout (block types, depths [1, 2, 10], text_time conditioning) at toy widths."""
    return {**SDXL, "block_out_channels": [32, 64, 128], "attention_head_dim": [2, 4, 8], "cross_attention_dim": 64,
            "addition_time_embed_dim": 8, "projection_class_embeddings_input_dim": 80, "norm_num_groups": 16,
            "sample_size": 8, **changes}


def tiny_sd15(**changes) -> dict:
    """SD1.5's layout: four stages, cross-attention in the first three, no added conditioning."""
    return {"down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
            "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
            "block_out_channels": [16, 32, 32, 32], "layers_per_block": 2, "attention_head_dim": 8,
            "cross_attention_dim": 24, "norm_num_groups": 8, "sample_size": 8, **changes}


def random_unet(config: dict, seed: int = 0) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return UNet2DConditionModel.from_config(config)


def parameter_count(config: dict) -> int:
    return count_params(meta_unet(config))


@pytest.mark.parametrize("preset", ["koala-1b", "koala-700m"])
def test_presets_give_the_paper_sizes_on_the_meta_device(preset):
    assert abs(parameter_count(SDXL) / 1e6 - PAPER_M["sdxl"]) / PAPER_M["sdxl"] < 0.005
    config = student_config(SDXL, preset)
    assert abs(parameter_count(config) / 1e6 - PAPER_M[preset]) / PAPER_M[preset] < 0.005
    assert config["layers_per_block"] == 1
    assert config["transformer_layers_per_block"] == ([1, 2, 6] if preset == "koala-1b" else [1, 2, 5])
    assert (config["mid_block_type"] is None) == (preset == "koala-700m")


def test_even_subset_keeps_first_and_last():
    assert even_subset(10, 6) == [0, 2, 4, 5, 7, 9]  # i·9/5 rounded half up
    assert even_subset(10, 5) == [0, 2, 5, 7, 9]  # i·9/4 = 0, 2.25, 4.5, 6.75, 9
    assert even_subset(3, 2) == [0, 2] and even_subset(2, 1) == [0]
    assert even_subset(10, 3, "first") == [0, 1, 2] and even_subset(10, 3, "last") == [7, 8, 9]
    with pytest.raises(ValueError):
        even_subset(3, 4)


def test_sdxl_block_map_follows_the_paper():
    bmap = block_map(SDXL, student_config(SDXL, "koala-1b"))
    # Encoder: first ResBlock-transformer pair per stage; decoder: the middle pair dropped.
    assert bmap.entries["down_blocks.2.resnets.0"] == "down_blocks.2.resnets.0"
    assert "down_blocks.2.resnets.1" not in bmap.entries
    assert bmap.entries["up_blocks.0.resnets.1"] == "up_blocks.0.resnets.2"
    assert bmap.entries["up_blocks.1.attentions.1"] == "up_blocks.1.attentions.2"
    layers = bmap.of_kind("transformer_layer")
    kept = [int(t.rsplit(".", 1)[1]) for s, t in layers.items() if s.startswith("down_blocks.2.attentions.0.")]
    assert kept == [0, 2, 4, 5, 7, 9]
    # 1B: 2 + 6 (encoder) + 6 (mid) + 2·6 + 2·2 (decoder) transformer layers.
    assert len(layers) == 2 + 6 + 6 + 12 + 4
    assert sum(s.startswith("mid_block") for s in layers) == 6
    assert not any(s.startswith("mid_block") for s in block_map(SDXL, student_config(SDXL, "koala-700m")).entries)
    first = block_map(SDXL, student_config(SDXL, "koala-700m"), "first").of_kind("transformer_layer")
    assert first["up_blocks.0.attentions.1.transformer_blocks.4"] == "up_blocks.0.attentions.2.transformer_blocks.4"


@pytest.mark.parametrize("preset,custom", [
    ("koala-1b", {}),
    ("koala-700m", {}),
    ("custom", {"layers_per_block": [2, 1, 1], "transformer_depth": [1, 1, 3], "decoder_transformer_depth": [4, 2, 1],
                "mid_block": False}),
])
def test_student_weights_equal_the_mapped_teacher_weights(preset, custom):
    teacher = random_unet(tiny_sdxl())
    student, bmap = build_student(teacher, preset, **custom)
    t_state, s_state = teacher.state_dict(), student.state_dict()
    for name, value in s_state.items():
        assert torch.equal(value, t_state[bmap.teacher_name(name)]), name
    for s_name, t_name in bmap.entries.items():  # block by block, as the log states it
        s_block, t_block = student.get_submodule(s_name), teacher.get_submodule(t_name)
        s_sub, t_sub = s_block.state_dict(), t_block.state_dict()
        if bmap.kinds[s_name] == "attention":  # stacks differ in depth; compare the stack's own parts
            s_sub = {k: v for k, v in s_sub.items() if not k.startswith("transformer_blocks.")}
            t_sub = {k: v for k, v in t_sub.items() if not k.startswith("transformer_blocks.")}
        assert s_sub.keys() == t_sub.keys() and all(torch.equal(s_sub[k], t_sub[k]) for k in s_sub), s_name
    # The copies are independent of the teacher: training the student must not move the teacher.
    p = next(student.parameters())
    with torch.no_grad():
        p.add_(1.0)
    assert not torch.equal(p, t_state[bmap.teacher_name(next(iter(s_state)))])
    assert count_params(student) == parameter_count(student_config(tiny_sdxl(), preset, **custom))


def test_custom_counts_shape_the_config():
    config = student_config(SDXL, "custom", layers_per_block=[2, 1, 1], transformer_depth=[1, 2, 4],
                            decoder_transformer_depth=[8, 2, 1], mid_block=False)
    assert config["layers_per_block"] == [2, 1, 1] and config["transformer_layers_per_block"] == [1, 2, 4]
    assert config["reverse_transformer_layers_per_block"] == [8, 2, 1] and config["mid_block_type"] is None
    model = meta_unet(config)
    assert len(model.down_blocks[0].resnets) == 2 and len(model.up_blocks[2].resnets) == 3  # mirrors stage 0
    assert len(model.up_blocks[0].resnets) == 2
    assert len(model.up_blocks[0].attentions[0].transformer_blocks) == 8
    assert len(model.down_blocks[2].attentions[0].transformer_blocks) == 4


def test_decoder_depth_zero_drops_that_stages_stacks_and_nothing_else():
    # Independent reference: the teacher's config with that decoder block's type edited by hand, loaded with the
    # teacher's weights minus the dropped stacks (strict): the student must be exactly that network.
    teacher = random_unet(tiny_sdxl())
    student, bmap = build_student(teacher, "custom", decoder_transformer_depth=[10, 0, 0])
    reference = UNet2DConditionModel.from_config({**tiny_sdxl(), "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D",
                                                                                     "UpBlock2D"]})
    dropped = "up_blocks.1.attentions."
    reference.load_state_dict({k: v for k, v in teacher.state_dict().items() if not k.startswith(dropped)}, strict=True)
    assert not any(name.startswith(dropped) for name in student.state_dict())
    assert not any(name.startswith(dropped[:-1]) for name in bmap.entries)
    sample, text = torch.randn(1, 4, 8, 8), torch.randn(1, 5, 64)
    added = {"text_embeds": torch.randn(1, 32), "time_ids": torch.randn(1, 6)}
    with torch.no_grad():
        out = student(sample, 10, encoder_hidden_states=text, added_cond_kwargs=added).sample
        assert torch.equal(out, reference(sample, 10, encoder_hidden_states=text, added_cond_kwargs=added).sample)
        assert not torch.allclose(out, teacher(sample, 10, encoder_hidden_states=text, added_cond_kwargs=added).sample)
    assert count_params(student) < count_params(teacher)


def test_custom_accepts_the_papers_notation():
    # The paper writes [0, 2, 6] (no transformer in SDXL's first stage); it means koala-1b's stacks.
    paper = student_config(SDXL, "custom", layers_per_block=1, transformer_depth=[0, 2, 6],
                           decoder_transformer_depth=[6, 2, 0])
    assert paper == student_config(SDXL, "koala-1b")


def test_sd1_and_sd2_layouts_work():
    teacher = random_unet(tiny_sd15())
    student, bmap = build_student(teacher, "koala-700m")
    assert student.mid_block is None and [len(b.resnets) for b in student.up_blocks] == [2, 2, 2, 2]
    sample = torch.randn(1, 4, 8, 8)
    out = student(sample, 10, encoder_hidden_states=torch.randn(1, 5, 24)).sample
    assert out.shape == sample.shape
    sd2 = tiny_sd15(transformer_layers_per_block=3, use_linear_projection=True)
    assert student_config(sd2, "koala-1b")["transformer_layers_per_block"] == [2, 2, 2, 2]  # 3·0.6 = 1.8 -> 2
    assert student_config(sd2, "koala-700m")["transformer_layers_per_block"] == [2, 2, 2, 2]  # 1.5 -> 2


def test_meta_teacher_builds_a_meta_student():
    with torch.device("meta"):
        teacher = UNet2DConditionModel.from_config(SDXL)
    student, bmap = build_student(teacher, "koala-700m")
    assert next(student.parameters()).is_meta and len(bmap.of_kind("transformer_layer")) == 2 + 5 + 10 + 4


@pytest.mark.parametrize("change,named", [
    ({"down_block_types": ["DownBlock2D", "SimpleCrossAttnDownBlock2D", "CrossAttnDownBlock2D"]}, "down_block_types"),
    ({"up_block_types": ["CrossAttnUpBlock2D"] * 3}, "up_block_types"),  # attention the encoder stage lacks
    ({"mid_block_type": "UNetMidBlock2DSimpleCrossAttn"}, "mid_block_type"),
    ({"transformer_layers_per_block": [1, 2]}, "transformer_layers_per_block"),
    ({"dual_cross_attention": True}, "dual_cross_attention"),
])
def test_unsupported_layouts_name_what_differs(change, named):
    with pytest.raises(UnsupportedLayout, match=named):
        student_config({**SDXL, **change}, "koala-1b")


@pytest.mark.parametrize("preset,custom,key", [
    ("koala-2b", {}, "student.preset"),
    ("koala-1b", {"transformer_depth": [1, 2, 3]}, "student.preset"),
    ("custom", {"transformer_depth": [1, 2, 11]}, "student.transformer_depth"),
    ("custom", {"layers_per_block": [1, 1]}, "student.layers_per_block"),
    ("custom", {"decoder_transformer_depth": [-1, 2, 1]}, "student.decoder_transformer_depth"),
    ("custom", {"transformer_depth": [1, 0, 10]}, "student.transformer_depth"),  # encoder stacks stay
])
def test_bad_student_settings_are_recipe_errors(preset, custom, key):
    with pytest.raises(RecipeError) as info:
        student_config(SDXL, preset, **custom)
    assert info.value.key == key


def test_custom_mid_block_needs_one_in_the_teacher():
    with pytest.raises(RecipeError, match="mid block"):
        student_config({**SDXL, "mid_block_type": None}, "custom", mid_block=True)
