"""LoRA-Composer evaluation pieces (`distill.lora_composer.evaluation`) against hand-computed expectations: box
outcomes (presence / confusion / vanishing), attention leakage, pixel boxes, the judge's box crops and the
baseline's attention-map recorder (against attention recomputed by hand on a small diffusers `Attention`).

    OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/distill/lora_composer/test_evaluation.py -q
"""

from __future__ import annotations

import math

import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor

from athanor.distill.lora_composer.evaluation import (
    MapRecorder,
    box_leakage,
    box_outcomes,
    judge_scene,
    leakage,
    pixel_box,
)
from athanor.distill.lora_composer.method import LoraComposer
from athanor.distill.lora_composer.pipeline import Scene
from athanor.distill.lora_composer.sampling import ConceptRegion

pytestmark = pytest.mark.usefixtures("one_torch_thread")

T, F = True, False


def outcomes(predicted: list[list[int]], labels: list[int]) -> dict[str, list[list[bool]]]:
    return {key: value.tolist() for key, value in box_outcomes(torch.tensor(predicted), labels).items()}


def test_box_outcomes_two_concepts():
    # Asked: sneaker (7) left, bag (8) right. Rows: both right; swapped; sneaker twice; neither anywhere.
    got = outcomes([[7, 8], [8, 7], [7, 7], [3, 5]], [7, 8])
    assert got["presence"] == [[T, T], [F, F], [T, F], [F, F]]
    assert got["confusion"] == [[F, F], [T, T], [F, T], [F, F]]  # a box holds the scene's OTHER concept
    assert got["vanishing"] == [[F, F], [F, F], [F, T], [T, T]]  # the bag is in no box of row 3


def test_box_outcomes_same_class_twice():
    # Two concepts of one class (7, 7): a box can never be "confused" (no other class is asked for), and a
    # concept vanishes only when class 7 is in no box at all.
    got = outcomes([[7, 3], [3, 3], [7, 7]], [7, 7])
    assert got["presence"] == [[T, F], [F, F], [T, T]]
    assert got["confusion"] == [[F, F], [F, F], [F, F]]
    assert got["vanishing"] == [[F, F], [T, T], [F, F]]


def test_box_outcomes_three_concepts():
    got = outcomes([[8, 8, 1], [1, 0, 3], [1, 8, 3]], [1, 8, 3])
    assert got["presence"] == [[F, T, F], [T, F, T], [T, T, T]]
    assert got["confusion"] == [[T, F, T], [F, F, F], [F, F, F]]
    assert got["vanishing"] == [[F, F, T], [F, T, F], [F, F, F]]
    # Three concepts, two of one class: labels (7, 7, 8), predicted (8, 7, 0).
    got = outcomes([[8, 7, 0]], [7, 7, 8])
    assert got["presence"] == [[F, T, F]]
    assert got["confusion"] == [[T, F, F]]  # box 0 (a 7) shows the 8; box 2 (the 8) shows 0, not a 7
    assert got["vanishing"] == [[F, F, F]]  # 7 is in box 1, 8 in box 0
    assert {v.dtype for v in box_outcomes(torch.tensor([[8, 7, 0]]), [7, 7, 8]).values()} == {torch.bool}


# On a 4×8 grid the box (0.25, 0, 0.75, 0.5) holds the cells whose centres lie inside it: columns 2-5 ((c + ½)/8
# in [0.25, 0.75)) and rows 0-1 ((r + ½)/4 < 0.5), 8 of 32 cells = a quarter of the map.
BOX, FULL = (0.25, 0.0, 0.75, 0.5), (0.0, 0.0, 1.0, 1.0)


def test_leakage_hand_made_maps():
    inside = torch.zeros(1, 2, 4, 8)
    inside[0, 0, 0:2, 2:6] = 0.3
    inside[0, 1, 1, 4] = 0.9
    assert leakage([inside], [BOX]) == pytest.approx(0.0, abs=1e-7)
    uniform = torch.full((2, 1, 4, 8), 0.05)
    assert leakage([uniform], [BOX, FULL]) == pytest.approx((0.75 + 0.0) / 2)  # mean over regions
    mixed = torch.zeros(1, 1, 4, 8)
    mixed[0, 0, 0, 2] = 3.0  # inside
    mixed[0, 0, 3, 7] = 1.0  # outside: a quarter of the mass
    # Mean over calls, also at different resolutions: (0.25 + 0.75) / 2.
    assert leakage([mixed, torch.ones(1, 1, 8, 16)], [BOX]) == pytest.approx(0.5)
    assert leakage([torch.zeros(1, 1, 4, 8)], [BOX]) == 0.0  # no mass at all: no leakage (no division by zero)
    assert math.isnan(leakage([], [BOX]))


def test_pixel_box():
    assert pixel_box((0.25, 0.5, 0.75, 1.0), 32, 64) == (16, 16, 48, 32)
    assert pixel_box((0.0, 0.0, 1.0, 1.0), 32, 64) == (0, 0, 64, 32)
    # The recipe's two-item layout on the testbed canvas: 28×28 boxes at x 2..30 and 34..62, y 2..30.
    assert pixel_box((0.03125, 0.0625, 0.46875, 0.9375), 32, 64) == (2, 2, 30, 30)
    assert pixel_box((0.53125, 0.0625, 0.96875, 0.9375), 32, 64) == (34, 2, 62, 30)


def test_judge_scene_crops_each_box():
    """A stand-in judge whose class is the crop's mean value binned into 10 levels over [-1, 1]."""
    levels = torch.linspace(-1, 1, 10)

    def judge(crops: torch.Tensor) -> torch.Tensor:
        assert crops.shape[1:] == (1, 28, 28)
        return -(crops.mean((1, 2, 3))[:, None] - levels).abs()

    images = torch.full((2, 1, 32, 64), -1.0)
    images[0, :, :, :32], images[0, :, :, 32:] = levels[3], levels[8]
    images[1, :, :, :32], images[1, :, :, 32:] = 5.0, levels[0]  # 5 is clamped to 1: class 9
    scene = Scene("p", (ConceptRegion("a", (0.03125, 0.0625, 0.46875, 0.9375), "a", "a"),
                        ConceptRegion("b", (0.53125, 0.0625, 0.96875, 0.9375), "b", "b")))
    assert judge_scene(judge, images, scene).tolist() == [[3, 8], [9, 0]]


QUERY_DIM, CONTEXT_DIM, HEADS, HEAD_DIM, TOKENS = 8, 6, 2, 4, 5
GROUPS = [[1, 2], [4]]


@pytest.fixture
def attn() -> Attention:
    torch.manual_seed(0)
    return Attention(query_dim=QUERY_DIM, cross_attention_dim=CONTEXT_DIM, heads=HEADS, dim_head=HEAD_DIM).eval()


def test_map_recorder_matches_hand_computed_attention(attn):
    """A 4×8 layer of a 16×32 input: 32 queries, 5 context tokens, 2 heads of 4 channels."""
    gen = torch.Generator().manual_seed(1)
    hidden, context = torch.randn(3, 32, QUERY_DIM, generator=gen), torch.randn(3, TOKENS, CONTEXT_DIM, generator=gen)
    attn.set_processor(AttnProcessor())
    with torch.no_grad():
        reference = attn(hidden, encoder_hidden_states=context)
    recorder = MapRecorder(GROUPS, height=16, width=32)
    attn.set_processor(recorder)
    with torch.no_grad():
        unarmed = attn(hidden, encoder_hidden_states=context)
        recorder.armed = True
        armed = attn(hidden, encoder_hidden_states=context)
        self_attn = Attention(query_dim=QUERY_DIM, heads=HEADS, dim_head=HEAD_DIM).eval()
        self_attn.set_processor(recorder)
        self_attn(hidden)  # self-attention (no encoder states): nothing to record
    torch.testing.assert_close(unarmed, reference, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(armed, reference, atol=1e-6, rtol=1e-6)
    assert len(recorder.maps) == 1
    with torch.no_grad():
        q = attn.to_q(hidden).view(3, 32, HEADS, HEAD_DIM).transpose(1, 2)  # [B, heads, 32, 4]
        k = attn.to_k(context).view(3, TOKENS, HEADS, HEAD_DIM).transpose(1, 2)  # [B, heads, 5, 4]
        probs = ((q @ k.transpose(-1, -2)) / HEAD_DIM**0.5).softmax(-1).mean(1)  # [B, 32, 5], mean over heads
    expected = torch.stack([probs[..., 1] + probs[..., 2], probs[..., 4]]).view(2, 3, 4, 8)
    assert recorder.maps[0].shape == (2, 3, 4, 8) and not recorder.maps[0].requires_grad
    torch.testing.assert_close(recorder.maps[0], expected, atol=1e-6, rtol=1e-5)
    everything = MapRecorder([list(range(TOKENS))], height=16, width=32)
    everything.armed = True
    attn.set_processor(everything)
    with torch.no_grad():
        attn(hidden, encoder_hidden_states=context)
    torch.testing.assert_close(everything.maps[0], torch.ones(1, 3, 4, 8))  # probabilities sum to 1


def _inside(box, h: int, w: int) -> torch.Tensor:
    """Independent of `box_mask`: a cell is inside when its centre ((c + ½)/w, (r + ½)/h) lies in the box."""
    x0, y0, x1, y1 = box
    rows, cols = (torch.arange(h) + 0.5) / h, (torch.arange(w) + 0.5) / w
    return ((rows[:, None] >= y0) & (rows[:, None] < y1) & (cols >= x0) & (cols < x1)).float()


def test_box_leakage_per_region_and_image():
    gen = torch.Generator().manual_seed(0)
    maps = [torch.rand(2, 3, 4, 8, generator=gen), torch.rand(2, 3, 8, 16, generator=gen)]
    boxes = [BOX, (0.5, 0.5, 1.0, 1.0)]
    expected = torch.zeros(2, 3)
    for m in maps:
        for i, box in enumerate(boxes):
            inside = _inside(box, *m.shape[-2:])
            expected[i] += (m[i] * (1 - inside)).sum((-1, -2)) / m[i].sum((-1, -2)) / len(maps)
    torch.testing.assert_close(box_leakage(maps, boxes), expected)
    assert leakage(maps, boxes) == pytest.approx(float(expected.mean()))


TWO = ((0.03125, 0.0625, 0.46875, 0.9375), (0.53125, 0.0625, 0.96875, 0.9375))
THREE = ((0.015625, 0.1875, 0.328125, 0.8125), (0.34375, 0.1875, 0.65625, 0.8125),
         (0.671875, 0.1875, 0.984375, 0.8125))
LEVELS = torch.linspace(-1, 1, 10)


class ScriptedSampler(torch.nn.Module):
    """Stands in for a sampler: per scene prompt, images whose boxes hold given judge levels, and given maps."""

    def __init__(self, scripts: dict[str, tuple[list[list[int]], list[torch.Tensor]]]) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(4))
        self.scripts = scripts

    def sample(self, scene: Scene, noise: torch.Tensor) -> tuple[torch.Tensor, dict]:
        classes, maps = self.scripts[scene.prompt]
        images = torch.full((len(classes), 1, 32, 64), -1.0)
        for b, row in enumerate(classes):
            for region, c in zip(scene.regions, row):
                x0, y0, x1, y1 = pixel_box(region.box, 32, 64)
                images[b, :, y0:y1, x0:x1] = LEVELS[c]
        # `maps` stands for the regional maps guidance optimises (uniform here): leakage must ignore them
        return images[:len(noise)], {"global_maps": maps, "maps": [torch.ones_like(m) for m in maps]}


def test_evaluate_returns_per_box_samples_equal_to_hand_counts(tmp_path):
    """Two scenes × two seeds judged by a stand-in judge (a box's mean level binned into the 10 classes)."""
    from athanor.distill.intervals import PerSample
    from athanor.distill.lora_composer.evaluation import evaluate

    def judge(crops: torch.Tensor) -> torch.Tensor:
        return -(crops.mean((1, 2, 3))[:, None] - LEVELS).abs()

    labels = {"a": 3, "b": 8, "c": 5}  # dress, bag, sandal
    scenes = [Scene("two", tuple(ConceptRegion(n, box, n, n) for n, box in zip("ab", TWO))),
              Scene("three", tuple(ConceptRegion(n, box, n, n) for n, box in zip("abc", THREE)))]
    gen = torch.Generator().manual_seed(1)
    maps = {"two": [torch.rand(2, 2, 4, 8, generator=gen)], "three": [torch.rand(3, 2, 4, 8, generator=gen)]}
    # seed 0 as asked; seed 1 swapped (two) / the bag's box shows a dress, the sandal's a sandal (three)
    model = ScriptedSampler({"two": ([[3, 8], [8, 3]], maps["two"]),
                             "three": ([[3, 8, 0], [3, 3, 5]], maps["three"])})
    out = evaluate(model, scenes, torch.zeros(2, 1, 32, 64), labels, judge, tmp_path)

    assert all(isinstance(out[k], PerSample) for k in out if k != "peak_mem_mb")
    assert out["presence_2"].rows.tolist() == [1, 1, 0, 0]  # image-major: seed 0's boxes, then seed 1's
    assert out["confusion_2"].rows.tolist() == [0, 0, 1, 1]
    assert out["presence_3"].rows.tolist() == [1, 1, 0, 1, 0, 1]
    assert out["presence_3"].value == pytest.approx(4 / 6)
    assert out["confusion_3"].value == pytest.approx(1 / 6)  # seed 1: the bag's box shows the scene's dress
    assert out["vanishing_3"].value == pytest.approx(2 / 6)  # seed 0: no sandal; seed 1: no bag
    assert out["presence_dress"].value == pytest.approx(3 / 4)
    assert out["presence_bag"].value == out["presence_sandal"].value == pytest.approx(1 / 2)
    # leakage: the mean over the two scenes of each scene's mean outside-share over its boxes and seeds, of the
    # real (global-prompt) maps
    per_scene = []
    for scene in scenes:
        (m,) = maps[scene.prompt]
        shares = [float((m[i, b] * (1 - _inside(r.box, 4, 8))).sum() / m[i, b].sum())
                  for i, r in enumerate(scene.regions) for b in range(2)]
        per_scene.append(sum(shares) / len(shares))
    assert out["leakage"].value == pytest.approx(sum(per_scene) / 2)
    assert out["leakage"].n == 4 + 6
    assert set(out) <= set(LoraComposer.metrics)
