"""The toy world for long clips: the same captions and objects, with motion that wraps around the frame.

In the demo's world (``apt.toy.world``) an object's path must fit inside the frame, so its speed is capped
by the clip length and motion vanishes at 64 frames. Here space is a torus: an object leaves on one side
and comes back on the other, at a constant speed of 1-2 px/frame (the distractor 0.5-1.5) for any number of
frames. Start positions are uniform over the torus, so the process is stationary: every window of a long
clip is distributed as a short clip of this world, and a streaming generator can be scored on any window
of its output by the same classifier and the same real statistics.

Everything is numpy and determined by (seed, index, frames); the demo's world and its shards are untouched.

The ``free-shape`` variant leaves the shape out of the caption ("a red moving left on a black background"), the
``free-colour`` variant the colour ("a circle moving left on a black background"): the generator picks that attribute
in the first chunk and must keep it from its own context for the rest of the video, so an error it makes and then
reads back shows up as a change of it (exposure bias; docs/streaming.md). The toy's models draw the colour crisply
from noise, not the shape (docs/log/streaming.md), so only ``free-colour`` keeps something to lose.

Shape legend: clips are uint8 (T, H, W, C) = (frames, 16, 16, 3).
"""

from __future__ import annotations

import re

import numpy as np

from apt.toy.world import (
    COLOURS,
    DIRECTIONS,
    DISTRACTOR_RADIUS,
    DISTRACTOR_SPEED,
    MAIN_RADIUS,
    MAIN_SPEED,
    SHAPES,
    SIZE,
    ToyAttributes,
    _background,
    _signed_distance,
    caption,
    sample_attributes,
)

_GRID_Y, _GRID_X = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)


def _wrapped(d: np.ndarray) -> np.ndarray:
    """Signed offset on the torus: the nearest copy of the object, in [-SIZE/2, SIZE/2)."""
    return (d + SIZE / 2) % SIZE - SIZE / 2


def wrap_trajectory(rng: np.random.Generator, frames: int, direction: str, speed_range: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
    """Centres (x_T, y_T) on the torus: a uniform start, a constant speed drawn from ``speed_range``."""
    speed = rng.uniform(*speed_range)
    x0, y0 = rng.uniform(0.0, SIZE, size=2)
    ux, uy = DIRECTIONS[direction]
    steps = np.arange(frames, dtype=np.float32)
    return ((x0 + ux * speed * steps) % SIZE).astype(np.float32), ((y0 + uy * speed * steps) % SIZE).astype(np.float32)


def _coverage(shape: str, cx_T: np.ndarray, cy_T: np.ndarray, radius: float) -> np.ndarray:
    """Anti-aliased coverage in [0, 1] (T, H, W) of a shape drawn on the torus."""
    dx = _wrapped(_GRID_X[None] - cx_T[:, None, None])
    dy = _wrapped(_GRID_Y[None] - cy_T[:, None, None])
    return np.clip(0.5 - _signed_distance(shape, dx, dy, radius), 0.0, 1.0)


def render_long_clip(attrs: ToyAttributes, rng: np.random.Generator, frames: int) -> np.ndarray:
    """One clip of any length, uint8 (T, 16, 16, 3): the captioned object over a distractor, both wrapping around."""
    if attrs.direction is None or frames < 2:
        raise ValueError(f"the long-clip world renders clips (frames >= 2 with a direction), got frames={frames}, direction={attrs.direction!r}")
    d_shape = SHAPES[rng.integers(len(SHAPES))]
    other_colours = [c for c in COLOURS if c != attrs.colour]
    d_colour = other_colours[rng.integers(len(other_colours))]
    d_radius = rng.uniform(*DISTRACTOR_RADIUS)
    d_xy = wrap_trajectory(rng, frames, list(DIRECTIONS)[rng.integers(len(DIRECTIONS))], DISTRACTOR_SPEED)
    radius = rng.uniform(*MAIN_RADIUS)
    xy = wrap_trajectory(rng, frames, attrs.direction, MAIN_SPEED)
    clip_THWC = np.broadcast_to(_background(rng, attrs.background), (frames, SIZE, SIZE, 3))
    for shape, colour, r, (cx, cy) in ((d_shape, d_colour, d_radius, d_xy), (attrs.shape, attrs.colour, radius, xy)):
        alpha_THW1 = _coverage(shape, cx, cy, r)[..., None]
        clip_THWC = clip_THWC * (1.0 - alpha_THW1) + np.asarray(COLOURS[colour], np.float32) * alpha_THW1
    return np.clip(np.rint(clip_THWC), 0, 255).astype(np.uint8)


def free_shape_caption(attrs: ToyAttributes) -> str:
    """The caption without the shape: "a red moving left on a black background"."""
    return f"a {attrs.colour} moving {attrs.direction} on a {attrs.background} background"


def free_colour_caption(attrs: ToyAttributes) -> str:
    """The caption without the colour: "a circle moving left on a black background"."""
    return f"a {attrs.shape} moving {attrs.direction} on a {attrs.background} background"


FREE_ATTRIBUTE = {"free-shape": "shape", "free-colour": "colour"}
"""The worlds captioned without one attribute, and that attribute."""

_FREE_RE = re.compile(r"^a (\w+) moving (\w+) on a (\w+) background$")


def parse_free_caption(text: str) -> tuple[str, dict[str, str]]:
    """(world, the attributes the caption names) of a free-shape or free-colour caption; ValueError naming the text otherwise."""
    m = _FREE_RE.match(text.strip())
    if m is not None:
        first, direction, background = m.groups()
        if first in COLOURS:
            return "free-shape", {"colour": first, "direction": direction, "background": background}
        if first in SHAPES:
            return "free-colour", {"shape": first, "direction": direction, "background": background}
    raise ValueError(f"not a free-shape or free-colour toy caption: {text!r}")


def make_long_sample(index: int, seed: int, frames: int = 64, *, free_shape: bool = False, free_colour: bool = False) -> dict:
    """Sample ``index`` of the long-clip world with ``seed``: dict(pixels uint8 THWC, caption, attributes).
    ``free_shape`` / ``free_colour``: the same clip, captioned without its shape / its colour."""
    if free_shape and free_colour:
        raise ValueError("a caption leaves out the shape or the colour, not both")
    rng = np.random.default_rng([int(seed), int(index), 0x10])  # its own stream: never the demo world's clip
    attrs = sample_attributes(rng, frames)
    text = free_shape_caption(attrs) if free_shape else free_colour_caption(attrs) if free_colour else caption(attrs)
    return {"pixels": render_long_clip(attrs, rng, frames), "caption": text, "attributes": attrs}


def without(text: str, attribute: str) -> str:
    """A demo-world caption ("a red circle moving left on a black background") with its ``attribute`` ("shape" or
    "colour") left out: "a red moving left on ..." / "a circle moving left on ..."."""
    m = re.match(r"^a (\w+) (\w+) moving (\w+) on a (\w+) background$", text.strip())
    if m is None:
        raise ValueError(f"not a toy caption: {text!r}")
    colour, shape, direction, background = m.groups()
    return f"a {shape if attribute == 'colour' else colour} moving {direction} on a {background} background"


def world_prompts(prompts: list[str], world: str) -> list[str]:
    """The prompts as the streaming world ``world`` ("long", "free-shape" or "free-colour") captions them."""
    if world not in ("long", *FREE_ATTRIBUTE):
        raise ValueError(f"unknown streaming world {world!r}; choose long, free-shape or free-colour")
    return [without(p, FREE_ATTRIBUTE[world]) for p in prompts] if world in FREE_ATTRIBUTE else list(prompts)


WORLDS = ("demo", "long", *FREE_ATTRIBUTE)
"""World names of ``apt.toy.shards.write_toy_shards``: the demo's, the long-clip world, and it captioned without the
shape or without the colour."""
