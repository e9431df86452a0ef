"""Procedural toy videos: one coloured shape moving over a black background, as the prompt says.

This is evaluation data (what the probes compare against) as much as training data. Every video is a pure function of (prompt, seed): the ground truth of what a toy
model should produce is known exactly, which is what makes the toy pair's quality measurable.
Layout: float32 [3, F, H, W] in [-1, 1] (the toy latent space: the pixel "VAE" is the identity).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..families.toy_vocab import COLOURS, DIRECTIONS, SHAPES, words

# RGB in [0, 1]; pixels are 2 * rgb - 1
COLOUR_RGB = {
    "red": (1.0, 0.0, 0.0), "green": (0.0, 1.0, 0.0), "blue": (0.0, 0.0, 1.0),
    "yellow": (1.0, 1.0, 0.0), "magenta": (1.0, 0.0, 1.0), "cyan": (0.0, 1.0, 1.0),
}
DIRECTION_VECTORS = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0)}


@dataclass(frozen=True)
class Geometry:
    """Sizes and speeds the renderer draws from; `GEOMETRY` is the toy world, the others are history."""

    radius: tuple[float, float]  # half-extent of the shape, pixels
    speed: tuple[float, float]  # pixels per frame
    square_half_side: float  # x radius


# v1, the first toy world: shapes of 5-7 px (a shape spans several 4x4 patches), a square of the
# circle's area; circle and square then differ by ~10 px a frame and the models never learned to
# tell them apart (docs/toy-training.md, items 4-6).
GEOMETRY_V1 = Geometry(radius=(5.0, 7.0), speed=(1.2, 2.0), square_half_side=0.85)
# v2: larger shapes, with a square filling the circle's bounding box (they differ by 0.86 r^2, 42-78
# px a frame); slower, so the largest still travels >= 6.4 px inside the 32 px frame.
GEOMETRY_V2 = Geometry(radius=(7.0, 9.5), speed=(0.8, 1.3), square_half_side=1.0)
GEOMETRIES = {"v1": GEOMETRY_V1, "v2": GEOMETRY_V2}
GEOMETRY = GEOMETRY_V2


@dataclass(frozen=True)
class PromptSpec:
    colour: str
    shape: str
    direction: str

    def __post_init__(self):
        for value, options in ((self.colour, COLOURS), (self.shape, SHAPES), (self.direction, DIRECTIONS)):
            if value not in options:
                raise ValueError(f"{value!r} is not in the toy vocabulary {options}")

    @property
    def text(self) -> str:
        return f"a {self.colour} {self.shape} moving {self.direction}"

    @classmethod
    def parse(cls, prompt: str) -> "PromptSpec":
        found = words(prompt)  # case, punctuation and articles read as families/toy_vocab.py does
        pick = lambda options: next((w for w in found if w in options), None)  # noqa: E731
        colour, shape, direction = pick(COLOURS), pick(SHAPES), pick(DIRECTIONS)
        if None in (colour, shape, direction):
            raise ValueError(f"prompt {prompt!r} needs a colour {COLOURS}, a shape {SHAPES} and a direction "
                             f"{DIRECTIONS}, e.g. 'a red circle moving left'")
        return cls(colour, shape, direction)


def all_prompts() -> list[PromptSpec]:
    """The whole vocabulary: 6 colours x 3 shapes x 4 directions."""
    return [PromptSpec(c, s, d) for c in COLOURS for s in SHAPES for d in DIRECTIONS]


def shape_mask(shape: str, cx: float, cy: float, r: float, size: int,
               square_half_side: float = GEOMETRY.square_half_side) -> np.ndarray:
    """Boolean [size, size] mask of a shape centred at (cx, cy) with half-extent r."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    if shape == "circle":
        return (x - cx) ** 2 + (y - cy) ** 2 <= r * r
    if shape == "square":
        h = r * square_half_side
        return (np.abs(x - cx) <= h) & (np.abs(y - cy) <= h)
    if shape == "triangle":  # apex up, base at the bottom
        top, bottom = cy - r, cy + r
        half_width = r * (y - top) / (2 * r)
        return (y >= top) & (y <= bottom) & (np.abs(x - cx) <= half_width)
    raise ValueError(f"unknown shape {shape!r}")


def trajectory(spec: PromptSpec, rng: np.random.Generator, frames: int, size: int, geometry: Geometry = GEOMETRY):
    """Radius and per-frame centres of a shape that stays fully inside the frame."""
    r = rng.uniform(*geometry.radius)
    speed = rng.uniform(*geometry.speed)
    dx, dy = DIRECTION_VECTORS[spec.direction]
    travel = speed * (frames - 1)
    lo, hi = r + 0.5, size - r - 0.5
    # along the motion axis the start must leave room for the whole travel
    start_along = rng.uniform(lo + travel, hi) if (dx < 0 or dy < 0) else rng.uniform(lo, hi - travel)
    across = rng.uniform(lo, hi)
    centres = []
    for t in range(frames):
        along = start_along + (dx + dy) * speed * t
        centres.append((along, across) if dx != 0 else (across, along))
    return r, centres


def render(spec: PromptSpec, seed: int, frames: int = 9, size: int = 32, geometry: Geometry = GEOMETRY) -> np.ndarray:
    """float32 [3, F, size, size] in [-1, 1], deterministic in (spec, seed, geometry)."""
    key = (COLOURS.index(spec.colour), SHAPES.index(spec.shape), DIRECTIONS.index(spec.direction))
    rng = np.random.default_rng([seed, *key])
    r, centres = trajectory(spec, rng, frames, size, geometry)
    rgb = np.asarray(COLOUR_RGB[spec.colour], np.float32)
    video = np.full((3, frames, size, size), -1.0, np.float32)
    for t, (cx, cy) in enumerate(centres):
        mask = shape_mask(spec.shape, cx, cy, r, size, geometry.square_half_side)
        video[:, t][:, mask] = (2 * rgb - 1)[:, None]
    return video


def sample_batch(rng: np.random.Generator, batch: int, frames: int = 9, size: int = 32, geometry: Geometry = GEOMETRY):
    """A random training batch: (videos [B, 3, F, H, W], prompt texts)."""
    vocab = all_prompts()
    specs = [vocab[i] for i in rng.integers(0, len(vocab), batch)]
    seeds = rng.integers(0, 2**31 - 1, batch)
    videos = np.stack([render(s, int(seed), frames, size, geometry) for s, seed in zip(specs, seeds)])
    return videos, [s.text for s in specs]
