"""Captioned Fashion-MNIST canvases for the LoRA-Composer testbed: one, two or three real items at
known boxes on a `[1, 32, 64]` canvas in [-1, 1] (background −1), captioned by class and place
("a sneaker on the left and a bag on the right").

    .venv/bin/python -m pytest tests/distill/lora_composer/test_canvas.py -q

Layouts (boxes are pixel coordinates `(x0, y0, x1, y1)`, end-exclusive, on the 64-wide canvas):
one item (28×28) on the left, in the middle or on the right; two items (28×28) on the left and on
the right; three items (20×20) on the left, in the middle and on the right. The train split draws
from Fashion-MNIST's 60k training images, the held-out split from its 10k test images.
Everything is deterministic given a `torch.Generator` seed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from athanor.distill.fashion_mnist import CLASSES, load_split, resize_items

HEIGHT, WIDTH = 32, 64
LARGE, SMALL = 28, 20
PLACES = ("left", "middle", "right")
PHRASES = {"left": "on the left", "middle": "in the middle", "right": "on the right"}
Box = tuple[int, int, int, int]


def layout(places: tuple[str, ...]) -> tuple[Box, ...]:
    """Boxes for the items at `places` (one place; ("left", "right"); or all three)."""
    if len(places) == 3:
        if tuple(places) != PLACES:
            raise ValueError(f"three items go left, middle, right, not {places}")
        y = (HEIGHT - SMALL) // 2
        return tuple((x, y, x + SMALL, y + SMALL) for x in (1, 22, 43))
    xs = {"left": 2, "middle": (WIDTH - LARGE) // 2, "right": WIDTH - LARGE - 2}
    if len(places) == 2 and tuple(places) != ("left", "right"):
        raise ValueError(f"two items go left, right, not {places}")
    if len(places) not in (1, 2) or any(p not in xs for p in places):
        raise ValueError(f"places={places}: use one of {PLACES}, ('left', 'right') or all three")
    y = (HEIGHT - LARGE) // 2
    return tuple((xs[p], y, xs[p] + LARGE, y + LARGE) for p in places)


def _noun(label: int) -> str:
    name = CLASSES[label]
    return ("an " if name[0] in "aeiou" else "a ") + name


def caption(labels: tuple[int, ...], places: tuple[str, ...]) -> str:
    """"a sneaker on the left", "a bag on the left and a coat on the right",
    "a dress on the left, an ankle boot in the middle and a shirt on the right"."""
    parts = [f"{_noun(label)} {PHRASES[place]}" for label, place in zip(labels, places)]
    if len(parts) == 1:
        return parts[0]
    return ", ".join(parts[:-1]) + " and " + parts[-1]


def places_for(count: int, generator: torch.Generator | None = None) -> tuple[str, ...]:
    """The layout of `count` items (a random place for one item)."""
    if count == 1:
        return (PLACES[int(torch.randint(3, (1,), generator=generator))],)
    if count == 2:
        return ("left", "right")
    if count == 3:
        return PLACES
    raise ValueError(f"count={count}: use 1, 2 or 3 items")


@dataclass(frozen=True)
class Example:
    image: torch.Tensor  # [1, HEIGHT, WIDTH] in [-1, 1]
    caption: str
    labels: tuple[int, ...]
    places: tuple[str, ...]
    boxes: tuple[Box, ...]
    indices: tuple[int, ...]  # which split images were drawn


def render(items: list[torch.Tensor], boxes: tuple[Box, ...]) -> torch.Tensor:
    """Canvas [1, HEIGHT, WIDTH] in [-1, 1] with `items` ([size, size] in [0, 1]) pasted into `boxes`."""
    canvas = torch.zeros(HEIGHT, WIDTH)
    for item, (x0, y0, x1, y1) in zip(items, boxes):
        canvas[y0:y1, x0:x1] = torch.maximum(canvas[y0:y1, x0:x1], item)
    return (canvas * 2 - 1).unsqueeze(0)


class Canvases:
    """Canvases drawn from one split's images (`uint8 [N, 28, 28]`) and labels."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.images, self.labels = images, labels
        self.by_class = [torch.nonzero(labels == c).flatten() for c in range(len(CLASSES))]

    @classmethod
    def from_split(cls, split: str = "train", data_dir: Path | None = None) -> Canvases:
        return cls(*load_split(split, data_dir))

    def example(self, generator: torch.Generator, count: int | None = None,
                labels: tuple[int, ...] | None = None, places: tuple[str, ...] | None = None) -> Example:
        """One canvas; `count` (default: 1, 2 or 3 at random), classes and places drawn unless given."""
        if places is None:
            if count is None:
                count = len(labels) if labels is not None else int(torch.randint(1, 4, (1,), generator=generator))
            places = places_for(count, generator)
        if labels is None:
            labels = tuple(int(c) for c in torch.randint(len(CLASSES), (len(places),), generator=generator))
        if len(labels) != len(places):
            raise ValueError(f"{len(labels)} labels for {len(places)} places")
        boxes = layout(tuple(places))
        indices = tuple(int(pool[torch.randint(len(pool), (1,), generator=generator)])
                        for pool in (self.by_class[c] for c in labels))
        items = [resize_items(self.images[i:i + 1], box[2] - box[0])[0] for i, box in zip(indices, boxes)]
        return Example(render(items, boxes), caption(labels, tuple(places)), tuple(labels), tuple(places),
                       boxes, indices)

    def batch(self, n: int, generator: torch.Generator, count: int | None = None) -> list[Example]:
        return [self.example(generator, count) for _ in range(n)]


def stack(examples: list[Example]) -> tuple[torch.Tensor, list[str]]:
    """(images [B, 1, HEIGHT, WIDTH], captions)."""
    return torch.stack([e.image for e in examples]), [e.caption for e in examples]


def crop_boxes(images: torch.Tensor, boxes: list[tuple[Box, ...]], size: int = LARGE) -> torch.Tensor:
    """Every box of every image, cropped and resized to [M, 1, size, size] (the judge's input), in
    image-major, box-minor order."""
    crops = []
    for image, image_boxes in zip(images, boxes):
        for x0, y0, x1, y1 in image_boxes:
            crop = image[:, y0:y1, x0:x1].unsqueeze(0)
            if crop.shape[-1] != size or crop.shape[-2] != size:
                crop = F.interpolate(crop, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
            crops.append(crop[0])
    return torch.stack(crops)


def judge_batch(canvases: Canvases, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(box crops [M, 1, 28, 28], labels [M]) from `n` random canvases: the judge's training and test data."""
    examples = canvases.batch(n, generator)
    images, _ = stack(examples)
    crops = crop_boxes(images, [e.boxes for e in examples])
    return crops, torch.tensor([c for e in examples for c in e.labels])
