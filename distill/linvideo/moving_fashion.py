"""Moving Fashion-MNIST: real Fashion-MNIST items moving and bouncing on a small canvas, captioned
by class and direction ("a sneaker moving left"). The LinVideo testbed teacher learns to generate
these clips (`distill/linvideo/teacher.py`).

    .venv/bin/python -m pytest tests/distill/linvideo/test_moving_fashion.py -q

A clip is `[1, frames, canvas, canvas]` in [-1, 1] (background −1): the diffusers video layout
`[channels, frames, height, width]`. The item starts at a random position and moves `speed` pixels
per frame in its caption's direction, reflecting off the canvas edges (so the direction can flip
mid-clip, as bouncing objects do; the caption names the starting direction).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from athanor.distill.fashion_mnist import CLASSES, resize_items

DIRECTIONS = {"left": (0, -1), "right": (0, 1), "up": (-1, 0), "down": (1, 0)}


def caption(label: int, direction: str) -> str:
    return f"a {CLASSES[label]} moving {direction}"


def all_captions() -> list[str]:
    """Every caption, class-major: index = label · len(DIRECTIONS) + direction index."""
    return [caption(label, d) for label in range(len(CLASSES)) for d in DIRECTIONS]


@dataclass(frozen=True)
class ClipSpec:
    frames: int = 8
    canvas: int = 32
    item: int = 20
    speed: int = 2


def _bounce(start: int, velocity: int, steps: int, span: int) -> list[int]:
    """Positions of a point moving `velocity` per step inside [0, span], reflecting at the ends."""
    positions, pos, vel = [], start, velocity
    for _ in range(steps):
        positions.append(pos)
        nxt = pos + vel
        if nxt < 0 or nxt > span:
            vel = -vel
            nxt = pos + vel
        pos = min(max(nxt, 0), span)
    return positions


def render_clip(item: torch.Tensor, direction: str, start: tuple[int, int], spec: ClipSpec) -> torch.Tensor:
    """One clip [1, frames, canvas, canvas] in [-1, 1] of `item` ([size, size] in [0, 1])."""
    dy, dx = DIRECTIONS[direction]
    span = spec.canvas - spec.item
    ys = _bounce(start[0], dy * spec.speed, spec.frames, span)
    xs = _bounce(start[1], dx * spec.speed, spec.frames, span)
    clip = torch.zeros(spec.frames, spec.canvas, spec.canvas)
    for f, (y, x) in enumerate(zip(ys, xs)):
        clip[f, y:y + spec.item, x:x + spec.item] = item
    return (clip * 2 - 1).unsqueeze(0)


class MovingFashion:
    """Draws captioned clips from a Fashion-MNIST split: `batch(n, generator)` -> (clips, caption ids)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, spec: ClipSpec = ClipSpec()) -> None:
        self.items, self.labels, self.spec = resize_items(images, spec.item), labels, spec
        self.directions = list(DIRECTIONS)

    def batch(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.randint(len(self.items), (n,), generator=generator)
        dirs = torch.randint(len(self.directions), (n,), generator=generator)
        starts = torch.randint(self.spec.canvas - self.spec.item + 1, (n, 2), generator=generator)
        clips = torch.stack([render_clip(self.items[i], self.directions[d], (int(s[0]), int(s[1])), self.spec)
                             for i, d, s in zip(idx.tolist(), dirs.tolist(), starts)])
        caption_ids = self.labels[idx] * len(self.directions) + dirs
        return clips, caption_ids

    def frames(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Single frames [n, 1, canvas, canvas] at random positions with their class labels (classifier data)."""
        clips, ids = self.batch(n, generator)
        pick = torch.randint(self.spec.frames, (n,), generator=generator)
        return clips[torch.arange(n), :, pick], ids // len(self.directions)
