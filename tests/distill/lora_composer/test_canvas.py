"""Captioned Fashion-MNIST canvases of the LoRA-Composer testbed: boxes, captions, determinism, splits."""

from __future__ import annotations

import pytest
import torch

from athanor.distill.fashion_mnist import CLASSES, load_split, resize_items
from athanor.distill.lora_composer.canvas import (
    HEIGHT,
    PLACES,
    WIDTH,
    Canvases,
    caption,
    crop_boxes,
    judge_batch,
    layout,
)


@pytest.fixture(scope="module")
def train_canvases(fashion_mnist_dir):
    return Canvases.from_split("train", fashion_mnist_dir)


@pytest.fixture(scope="module")
def test_split(fashion_mnist_dir):
    return load_split("test", fashion_mnist_dir)


def test_layouts_stay_on_canvas_and_do_not_overlap():
    for places in [("left",), ("middle",), ("right",), ("left", "right"), PLACES]:
        boxes = layout(places)
        assert len(boxes) == len(places)
        for x0, y0, x1, y1 in boxes:
            assert 0 <= x0 < x1 <= WIDTH and 0 <= y0 < y1 <= HEIGHT
        for (a, b) in zip(boxes, boxes[1:]):
            assert a[2] <= b[0]  # left to right, disjoint
    with pytest.raises(ValueError):
        layout(("right", "left"))


def test_items_lie_inside_their_boxes(train_canvases):
    gen = torch.Generator().manual_seed(0)
    for count in (1, 2, 3):
        for _ in range(5):
            ex = train_canvases.example(gen, count=count)
            assert ex.image.shape == (1, HEIGHT, WIDTH)
            assert ex.image.min() >= -1 and ex.image.max() <= 1
            inside = torch.zeros(HEIGHT, WIDTH, dtype=torch.bool)
            for x0, y0, x1, y1 in ex.boxes:
                inside[y0:y1, x0:x1] = True
                assert (ex.image[0, y0:y1, x0:x1] > -0.5).any()  # something is drawn in every box
            assert (ex.image[0][~inside] == -1).all()  # background everywhere else


def test_captions_name_the_classes_and_places(train_canvases):
    gen = torch.Generator().manual_seed(1)
    for count in (1, 2, 3):
        ex = train_canvases.example(gen, count=count)
        assert len(ex.labels) == len(ex.places) == len(ex.boxes) == count
        assert ex.caption == caption(ex.labels, ex.places)
        position = 0
        for label, place in zip(ex.labels, ex.places):  # in order, each class with its place
            phrase = f"{CLASSES[label]} {'in the' if place == 'middle' else 'on the'} {place}"
            position = ex.caption.index(phrase, position)
        assert [int(train_canvases.labels[i]) for i in ex.indices] == list(ex.labels)
    assert caption((7, 8), ("left", "right")) == "a sneaker on the left and a bag on the right"
    assert caption((0, 9, 3), PLACES) == "a t-shirt on the left, an ankle boot in the middle and a dress on the right"


def test_given_classes_and_places_are_used(train_canvases):
    ex = train_canvases.example(torch.Generator().manual_seed(2), labels=(7, 8), places=("left", "right"))
    assert ex.labels == (7, 8) and ex.caption == "a sneaker on the left and a bag on the right"


def test_deterministic_given_a_seed(train_canvases):
    a = train_canvases.batch(6, torch.Generator().manual_seed(3))
    b = train_canvases.batch(6, torch.Generator().manual_seed(3))
    c = train_canvases.batch(6, torch.Generator().manual_seed(4))
    for x, y in zip(a, b):
        assert torch.equal(x.image, y.image)
        assert (x.caption, x.boxes, x.indices) == (y.caption, y.boxes, y.indices)
    assert [x.indices for x in a] != [z.indices for z in c]
    assert {len(x.labels) for x in train_canvases.batch(40, torch.Generator().manual_seed(5))} == {1, 2, 3}


def test_held_out_split_draws_test_images(fashion_mnist_dir, test_split):
    images, labels = test_split
    held_out = Canvases.from_split("test", fashion_mnist_dir)
    assert len(held_out.images) == 10_000
    ex = held_out.example(torch.Generator().manual_seed(6), count=3)
    for index, label, (x0, y0, x1, y1) in zip(ex.indices, ex.labels, ex.boxes):
        assert int(labels[index]) == label
        expected = resize_items(images[index:index + 1], x1 - x0)[0] * 2 - 1
        torch.testing.assert_close(ex.image[0, y0:y1, x0:x1], expected)


def test_box_crops_for_the_judge(train_canvases):
    crops, labels = judge_batch(train_canvases, 8, torch.Generator().manual_seed(7))
    assert crops.shape == (len(labels), 1, 28, 28) and 8 <= len(labels) <= 24
    ex = train_canvases.example(torch.Generator().manual_seed(8), count=2)
    crops = crop_boxes(ex.image.unsqueeze(0), [ex.boxes])
    x0, y0, x1, y1 = ex.boxes[1]
    assert torch.equal(crops[1], ex.image[:, y0:y1, x0:x1])  # 28×28 boxes are cropped as they are
