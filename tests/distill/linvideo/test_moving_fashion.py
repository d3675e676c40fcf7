"""Moving Fashion-MNIST clips: layout and range, motion measured from the rendered pixels (centroids
and bounding boxes), edge reflection, caption ids and frame labels. Uses Debian's dataset-fashion-mnist;
CI must have it (the test fails there without it), a developer machine may skip.

    .venv/bin/python -m pytest tests/distill/linvideo/test_moving_fashion.py -q
"""

from __future__ import annotations

import pytest
import torch

from athanor.distill.fashion_mnist import CLASSES, load_split
from athanor.distill.linvideo.moving_fashion import ClipSpec, MovingFashion, all_captions, render_clip

pytestmark = pytest.mark.usefixtures("one_torch_thread")
DIRECTIONS = ("left", "right", "up", "down")  # caption id = class · 4 + index here
AXIS_SIGN = {"left": (1, -1), "right": (1, 1), "up": (0, -1), "down": (0, 1)}  # (0 = rows, 1 = columns, sign)
SPEC = ClipSpec()
SPAN = SPEC.canvas - SPEC.item


@pytest.fixture(scope="module")
def fashion(fashion_mnist_dir):
    images, labels = load_split("test")
    return images[:120], labels[:120]


def synthetic():
    """One flat 28x28 image per class, its grey level 20·(label + 1): a frame's brightness names its
    class, and the item fills its whole 20x20 box, so the box position is exact."""
    labels = torch.arange(10)
    images = (20 * (labels + 1)).to(torch.uint8).view(10, 1, 1).expand(10, 28, 28).contiguous()
    return images, labels


def decoded_label(frame: torch.Tensor) -> int:
    grey = (float(frame.max()) + 1) / 2 * 255
    return round(grey / 20) - 1


def content_mask(frame: torch.Tensor) -> torch.Tensor:
    return frame > -1 + 1e-6


def centroid(frame: torch.Tensor) -> torch.Tensor:
    rows, cols = torch.nonzero(content_mask(frame), as_tuple=True)
    return torch.stack([rows.double().mean(), cols.double().mean()])


def box_origin(frame: torch.Tensor) -> tuple[int, int]:
    rows, cols = torch.nonzero(content_mask(frame), as_tuple=True)
    return int(rows.min()), int(cols.min())


def test_clip_layout_range_and_background(fashion):
    clips, ids = MovingFashion(*fashion).batch(6, torch.Generator().manual_seed(0))
    assert clips.shape == (6, 1, 8, 32, 32) and ids.shape == (6,)
    assert float(clips.min()) == -1.0 and float(clips.max()) <= 1.0
    for clip in clips:
        for frame in clip[0]:
            mask = content_mask(frame)
            assert 0 < int(mask.sum()) <= SPEC.item**2  # everything outside the item is exactly -1
            rows, cols = torch.nonzero(mask, as_tuple=True)
            assert int(rows.max() - rows.min()) < SPEC.item and int(cols.max() - cols.min()) < SPEC.item


def test_real_items_translate_by_speed_along_the_captioned_axis(fashion):
    clips, ids = MovingFashion(*fashion).batch(12, torch.Generator().manual_seed(1))
    for clip, cid in zip(clips, ids.tolist()):
        axis, _ = AXIS_SIGN[DIRECTIONS[cid % 4]]
        frames = clip[0]
        counts = {int(content_mask(f).sum()) for f in frames}
        assert len(counts) == 1  # the item is never cut off by the canvas
        centres = torch.stack([centroid(f) for f in frames])
        steps = centres[1:] - centres[:-1]
        assert torch.allclose(steps[:, axis].abs(), torch.full((7,), float(SPEC.speed), dtype=torch.float64), atol=1e-9)
        assert torch.allclose(steps[:, 1 - axis], torch.zeros(7, dtype=torch.float64), atol=1e-9)
        for a, b in zip(frames[:-1], frames[1:]):  # the same pixels, moved: a pure translation
            assert torch.equal(a[content_mask(a)], b[content_mask(b)])


def check_bounce(positions: list[int], sign: int) -> None:
    """Moves `speed` px per frame, first in the caption's direction; reverses exactly when the next
    move would leave [0, canvas − item], and never leaves it."""
    velocity = sign * SPEC.speed
    for here, there in zip(positions, positions[1:]):
        if not 0 <= here + velocity <= SPAN:
            velocity = -velocity
        assert there == here + velocity
    assert all(0 <= p <= SPAN for p in positions)


def test_boxes_move_and_reflect_at_the_edges():
    clips, ids = MovingFashion(*synthetic()).batch(40, torch.Generator().manual_seed(2))
    flips = 0
    for clip, cid in zip(clips, ids.tolist()):
        axis, sign = AXIS_SIGN[DIRECTIONS[cid % 4]]
        origins = [box_origin(f) for f in clip[0]]
        assert len({o[1 - axis] for o in origins}) == 1  # no motion across the captioned axis
        positions = [o[axis] for o in origins]
        check_bounce(positions, sign)
        flips += any((b - a) * (c - b) < 0 for a, b, c in zip(positions, positions[1:], positions[2:]))
    assert flips > 0  # 7 moves of 2 px span more than 12 px: some clips must have bounced


@pytest.mark.parametrize(("direction", "start", "expected"), [
    ("right", (3, 10), [10, 12, 10, 8, 6, 4, 2, 0]),
    ("right", (3, 11), [11, 9, 7, 5, 3, 1, 3, 5]),  # 13 would leave the canvas: reverse at once
    ("up", (4, 0), [4, 2, 0, 2, 4, 6, 8, 10]),
    ("down", (12, 5), [12, 10, 8, 6, 4, 2, 0, 2]),
    ("left", (7, 12), [12, 10, 8, 6, 4, 2, 0, 2]),
])
def test_render_clip_positions_by_hand(direction, start, expected):
    item = torch.rand(SPEC.item, SPEC.item, generator=torch.Generator().manual_seed(3)) * 0.9 + 0.1
    clip = render_clip(item, direction, start, SPEC)
    assert clip.shape == (1, 8, 32, 32)
    axis, _ = AXIS_SIGN[direction]
    for f, pos in enumerate(expected):
        y, x = (pos, start[1]) if axis == 0 else (start[0], pos)
        frame = clip[0, f]
        assert torch.allclose(frame[y:y + SPEC.item, x:x + SPEC.item], item * 2 - 1)
        outside = frame.clone()
        outside[y:y + SPEC.item, x:x + SPEC.item] = -1
        assert bool((outside == -1).all())


def test_caption_ids_are_class_times_four_plus_direction():
    captions = all_captions()
    assert len(captions) == 40 and len(set(captions)) == 40
    assert captions[0] == "a t-shirt moving left" and captions[7 * 4 + 1] == "a sneaker moving right"
    assert captions[39] == "a ankle boot moving down"
    for label, name in enumerate(CLASSES):
        for d, direction in enumerate(DIRECTIONS):
            assert captions[label * 4 + d] == f"a {name} moving {direction}"
    clips, ids = MovingFashion(*synthetic()).batch(30, torch.Generator().manual_seed(4))
    assert len({i // 4 for i in ids.tolist()}) > 3
    for clip, cid in zip(clips, ids.tolist()):
        assert cid // 4 == decoded_label(clip[0, 0])
        moved = [abs(a - b) for a, b in zip(box_origin(clip[0, 0]), box_origin(clip[0, 1]))]
        assert moved == ([SPEC.speed, 0] if DIRECTIONS[cid % 4] in ("up", "down") else [0, SPEC.speed])


def test_caption_ids_of_a_single_class_split(fashion):
    images, labels = fashion
    keep = labels == 7
    _, ids = MovingFashion(images[keep], labels[keep]).batch(10, torch.Generator().manual_seed(5))
    assert set((ids // 4).tolist()) == {7}
    assert all(all_captions()[i].startswith("a sneaker moving ") for i in ids.tolist())


def test_frames_carry_their_class_label():
    frames, labels = MovingFashion(*synthetic()).frames(24, torch.Generator().manual_seed(6))
    assert frames.shape == (24, 1, 32, 32) and labels.shape == (24,)
    assert len(set(labels.tolist())) > 3
    for frame, label in zip(frames, labels.tolist()):
        assert decoded_label(frame) == label
        assert int(content_mask(frame[0]).sum()) == SPEC.item**2


def test_frames_of_real_items(fashion):
    frames, labels = MovingFashion(*fashion).frames(8, torch.Generator().manual_seed(7))
    assert frames.shape == (8, 1, 32, 32) and set(labels.tolist()) <= set(range(10))
    assert float(frames.min()) == -1.0 and float(frames.max()) <= 1.0
