"""The toy world: procedural 16x16 clips of a captioned moving shape (the embedded default dataset).

Each clip shows one captioned object (shape, colour, direction of motion) over a textured
background, plus one smaller uncaptioned distractor drawn underneath it. Size, start position,
speed, the distractor and the background texture are random per clip, so that the caption leaves
real uncertainty: a one-step regression onto a multi-step sampler averages those modes and blurs,
which is what the demo must show (docs/design.md §5, "A world where one-step regression blurs").

    caption (video, frames > 1): "a red circle moving left on a black background"
    caption (image, frames = 1): "a red circle on a black background"

Everything is numpy and fully determined by (seed, index): `make_sample(index, seed, frames)`.
Rendering is anti-aliased from signed distances (1 px soft edge) so sub-pixel motion is visible.

Shape legend: clips are uint8 (T, H, W, C) = (frames, 16, 16, 3).
"""

from __future__ import annotations

import itertools
import re
from dataclasses import asdict, dataclass

import numpy as np

SIZE = 16
"""Height and width of every clip, in pixels."""
FPS = 8
"""Nominal frame rate recorded in shard metadata."""

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (230, 40, 40),
    "green": (40, 200, 40),
    "blue": (50, 90, 255),
    "yellow": (240, 220, 40),
    "cyan": (40, 220, 230),
    "magenta": (230, 50, 230),
}
DIRECTIONS: dict[str, tuple[float, float]] = {  # (dx, dy) per frame in image coordinates (y down)
    "left": (-1.0, 0.0),
    "right": (1.0, 0.0),
    "up": (0.0, -1.0),
    "down": (0.0, 1.0),
}
# Dark-to-mid backgrounds: every object colour has one channel >= 200, so all 24 pairs contrast.
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "black": (12, 12, 12),
    "gray": (100, 100, 100),
    "navy": (20, 30, 100),
    "brown": (100, 60, 25),
}

TOY_WORDS: tuple[str, ...] = (
    ("a", "moving", "on", "background") + SHAPES + tuple(COLOURS) + tuple(DIRECTIONS) + tuple(BACKGROUNDS)
)
"""Every word a toy caption can contain (for building a tokenizer)."""

# Nuisance ranges (pixels, pixels/frame, uint8 levels).
MAIN_RADIUS = (3.0, 4.0)
DISTRACTOR_RADIUS = (1.6, 2.2)
MAIN_SPEED = (1.0, 2.0)
DISTRACTOR_SPEED = (0.5, 1.5)
CENTRE_RANGE = (1.5, 13.5)  # centres stay here, so at least about half of the object is in frame
GRADIENT_AMPLITUDE = 12.0
NOISE_STD = 3.0

_CAPTION_RE = re.compile(r"^a (\w+) (\w+)(?: moving (\w+))? on a (\w+) background$")
_GRID_Y, _GRID_X = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)


@dataclass(frozen=True)
class ToyAttributes:
    """The captioned content of a clip. `direction` is None for images (frames == 1)."""

    shape: str
    colour: str
    direction: str | None
    background: str

    def __post_init__(self) -> None:
        for name, value, allowed in (
            ("shape", self.shape, SHAPES),
            ("colour", self.colour, tuple(COLOURS)),
            ("background", self.background, tuple(BACKGROUNDS)),
        ):
            if value not in allowed:
                raise ValueError(f"unknown {name} {value!r}; expected one of {list(allowed)}")
        if self.direction is not None and self.direction not in DIRECTIONS:
            raise ValueError(
                f"unknown direction {self.direction!r}; expected one of {list(DIRECTIONS)} or None"
            )

    def to_dict(self) -> dict[str, str | None]:
        return asdict(self)


def _check_frames(frames: int) -> None:
    if not isinstance(frames, (int, np.integer)) or frames < 1:
        raise ValueError(f"frames must be a positive int, got {frames!r}")


def sample_attributes(rng: np.random.Generator, frames: int) -> ToyAttributes:
    """Uniform random attributes; no direction for images (frames == 1)."""
    _check_frames(frames)
    return ToyAttributes(
        shape=SHAPES[rng.integers(len(SHAPES))],
        colour=list(COLOURS)[rng.integers(len(COLOURS))],
        direction=list(DIRECTIONS)[rng.integers(len(DIRECTIONS))] if frames > 1 else None,
        background=list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))],
    )


def caption(attrs: ToyAttributes) -> str:
    """ "a red circle moving left on a black background" (no "moving ..." when direction is None)."""
    motion = f" moving {attrs.direction}" if attrs.direction is not None else ""
    return f"a {attrs.colour} {attrs.shape}{motion} on a {attrs.background} background"


def parse_caption(text: str) -> ToyAttributes:
    """Inverse of `caption`; raises ValueError naming the caption if it is not a toy caption."""
    m = _CAPTION_RE.match(text.strip())
    if m is None:
        raise ValueError(f"not a toy caption: {text!r}")
    colour, shape, direction, background = m.groups()
    try:
        return ToyAttributes(shape=shape, colour=colour, direction=direction, background=background)
    except ValueError as e:
        raise ValueError(f"not a toy caption: {text!r} ({e})") from None


def _signed_distance(shape: str, dx: np.ndarray, dy: np.ndarray, radius: float) -> np.ndarray:
    """Approximate signed distance (pixels, negative inside) to a shape centred at the origin.

    Sizes are scaled so the three shapes cover similar areas at the same `radius`.
    """
    if shape == "circle":
        return np.sqrt(dx * dx + dy * dy) - radius
    if shape == "square":
        return np.maximum(np.abs(dx), np.abs(dy)) - 0.85 * radius
    # Upward equilateral triangle as the intersection of three half-planes; inradius = R / 2.
    circumradius = 1.3 * radius
    d_bottom = dy
    d_left = -0.866 * dx - 0.5 * dy
    d_right = 0.866 * dx - 0.5 * dy
    return np.maximum(np.maximum(d_bottom, d_left), d_right) - 0.5 * circumradius


def _trajectory(
    rng: np.random.Generator, frames: int, direction: str, speed_range: tuple[float, float]
) -> tuple[np.ndarray, np.ndarray]:
    """Centres (x_T, y_T) of an object moving at a random speed, staying inside CENTRE_RANGE."""
    lo, hi = CENTRE_RANGE
    span = hi - lo
    # Cap the speed so the whole path fits: 8 frames at 2 px/frame would leave the frame.
    max_speed = min(speed_range[1], span / max(frames - 1, 1))
    speed = rng.uniform(min(speed_range[0], max_speed), max_speed)
    travel = speed * (frames - 1)
    along = rng.uniform(lo, hi - travel) + speed * np.arange(frames, dtype=np.float32)
    across = np.full(frames, rng.uniform(lo + 1.0, hi - 1.0), dtype=np.float32)
    ux, uy = DIRECTIONS[direction]
    if ux + uy < 0:  # left / up: mirror the increasing path
        along = (lo + hi) - along
    return (along, across) if ux != 0 else (across, along)


def _static_position(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    lo, hi = CENTRE_RANGE
    return (
        np.array([rng.uniform(lo + 1.0, hi - 1.0)], dtype=np.float32),
        np.array([rng.uniform(lo + 1.0, hi - 1.0)], dtype=np.float32),
    )


def _coverage(shape: str, cx_T: np.ndarray, cy_T: np.ndarray, radius: float) -> np.ndarray:
    """Anti-aliased coverage in [0, 1], (T, H, W)."""
    dx = _GRID_X[None] - cx_T[:, None, None]
    dy = _GRID_Y[None] - cy_T[:, None, None]
    return np.clip(0.5 - _signed_distance(shape, dx, dy, radius), 0.0, 1.0)


def _background(rng: np.random.Generator, name: str) -> np.ndarray:
    """Mild per-clip texture (fixed over time): a random linear gradient plus pixel noise, (H, W, 3)."""
    angle = rng.uniform(0.0, 2.0 * np.pi)
    amplitude = rng.uniform(0.0, GRADIENT_AMPLITUDE)
    ramp = ((_GRID_X - 7.5) * np.cos(angle) + (_GRID_Y - 7.5) * np.sin(angle)) / 7.5
    noise = rng.normal(0.0, NOISE_STD, size=(SIZE, SIZE)).astype(np.float32)
    return np.asarray(BACKGROUNDS[name], dtype=np.float32) + (amplitude * ramp + noise)[..., None]


def render_clip(attrs: ToyAttributes, rng: np.random.Generator, frames: int) -> np.ndarray:
    """Render one clip, uint8 (T, 16, 16, 3); nuisances (size, position, speed, distractor, texture)
    are drawn from `rng`."""
    _check_frames(frames)
    if (attrs.direction is None) != (frames == 1):
        raise ValueError(
            f"direction {attrs.direction!r} does not fit frames={frames}: "
            "images (frames=1) have no direction, clips (frames>1) need one"
        )
    # Distractor: smaller, another colour, any shape, its own motion; drawn under the main object.
    d_shape = SHAPES[rng.integers(len(SHAPES))]
    other_colours = [c for c in COLOURS if c != attrs.colour]
    d_colour = other_colours[rng.integers(len(other_colours))]
    d_radius = rng.uniform(*DISTRACTOR_RADIUS)
    if frames > 1:
        d_xy = _trajectory(rng, frames, list(DIRECTIONS)[rng.integers(len(DIRECTIONS))], DISTRACTOR_SPEED)
    else:
        d_xy = _static_position(rng)
    radius = rng.uniform(*MAIN_RADIUS)
    xy = _trajectory(rng, frames, attrs.direction, MAIN_SPEED) if frames > 1 else _static_position(rng)

    clip_THWC = np.broadcast_to(_background(rng, attrs.background), (frames, SIZE, SIZE, 3))
    for shape, colour, r, (cx, cy) in (
        (d_shape, d_colour, d_radius, d_xy),
        (attrs.shape, attrs.colour, radius, xy),
    ):
        alpha_THW1 = _coverage(shape, cx, cy, r)[..., None]
        clip_THWC = clip_THWC * (1.0 - alpha_THW1) + np.asarray(COLOURS[colour], np.float32) * alpha_THW1
    return np.clip(np.rint(clip_THWC), 0, 255).astype(np.uint8)


def make_sample(index: int, seed: int, frames: int = 8) -> dict:
    """Sample `index` of the toy dataset with `seed`: dict(pixels uint8 THWC, caption, attributes).

    Fully determined by (seed, index, frames); independent of any other sample.
    """
    rng = np.random.default_rng([int(seed), int(index)])
    attrs = sample_attributes(rng, frames)
    return {"pixels": render_clip(attrs, rng, frames), "caption": caption(attrs), "attributes": attrs}


def all_attributes(frames: int) -> list[ToyAttributes]:
    """Every attribute combination (288 for clips, 72 for images), in a fixed order."""
    _check_frames(frames)
    directions: list[str | None] = list(DIRECTIONS) if frames > 1 else [None]
    return [
        ToyAttributes(shape=s, colour=c, direction=d, background=b)
        for s, c, d, b in itertools.product(SHAPES, COLOURS, directions, BACKGROUNDS)
    ]


def eval_prompts(n: int, seed: int, frames: int = 8) -> list[str]:
    """A balanced prompt set: every attribute combination appears floor(n/K) or ceil(n/K) times.

    Built from consecutive seeded permutations of all K combinations, so for n < K it is a random
    subset without repeats.
    """
    combos = all_attributes(frames)
    rng = np.random.default_rng([int(seed), 0x70])
    prompts: list[str] = []
    while len(prompts) < n:
        prompts.extend(caption(combos[i]) for i in rng.permutation(len(combos)))
    return prompts[:n]


def render_batch(attrs: list[ToyAttributes], seed: int, frames: int) -> np.ndarray:
    """Render one clip per attribute set (nuisances from `seed`), uint8 (B, T, 16, 16, 3)."""
    rng = np.random.default_rng([int(seed), 0x72])
    return np.stack([render_clip(a, rng, frames) for a in attrs])
