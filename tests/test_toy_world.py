"""The toy world: determinism, captions, rendering."""

from __future__ import annotations

import time

import numpy as np
import pytest

from apt.toy import world


def test_make_sample_is_determined_by_seed_and_index() -> None:
    a, b = world.make_sample(7, seed=3, frames=8), world.make_sample(7, seed=3, frames=8)
    assert np.array_equal(a["pixels"], b["pixels"]) and a["caption"] == b["caption"]
    assert not np.array_equal(a["pixels"], world.make_sample(8, seed=3, frames=8)["pixels"])
    assert not np.array_equal(a["pixels"], world.make_sample(7, seed=4, frames=8)["pixels"])


@pytest.mark.parametrize("frames", [1, 8])
def test_caption_round_trip_for_every_combination(frames: int) -> None:
    combos = world.all_attributes(frames)
    assert len(combos) == (288 if frames > 1 else 72)
    for attrs in combos:
        text = world.caption(attrs)
        assert world.parse_caption(text) == attrs
        assert set(text.split()) <= set(world.TOY_WORDS)
    assert world.caption(combos[0]).startswith("a red circle " if frames == 1 else "a red circle moving")


def test_caption_format() -> None:
    attrs = world.ToyAttributes("circle", "red", "left", "black")
    assert world.caption(attrs) == "a red circle moving left on a black background"
    assert (
        world.caption(world.ToyAttributes("circle", "red", None, "black")) == "a red circle on a black background"
    )


@pytest.mark.parametrize("text", ["a purple circle on a black background", "hello", ""])
def test_parse_caption_rejects_non_toy_text(text: str) -> None:
    with pytest.raises(ValueError, match="not a toy caption"):
        world.parse_caption(text)


@pytest.mark.parametrize("frames", [1, 4, 8])
def test_render_shapes_and_values(frames: int) -> None:
    s = world.make_sample(0, seed=0, frames=frames)
    p = s["pixels"]
    assert p.dtype == np.uint8 and p.shape == (frames, 16, 16, 3)
    assert p.max() >= 200  # the saturated object is visible
    assert (s["attributes"].direction is None) == (frames == 1)
    if frames > 1:
        assert not np.array_equal(p[0], p[-1])  # it moves


def test_main_object_moves_in_captioned_direction() -> None:
    rng = np.random.default_rng(0)
    for direction, (dx, dy) in world.DIRECTIONS.items():
        attrs = world.ToyAttributes("square", "red", direction, "black")
        clip = world.render_clip(attrs, rng, 8).astype(float)
        # Centroid of strongly red pixels (red is the only colour with R high and G, B low).
        mask = (clip[..., 0] > 150) & (clip[..., 1] < 100) & (clip[..., 2] < 100)
        ys, xs = np.mgrid[0:16, 0:16]
        cx = [(xs * m).sum() / m.sum() for m in mask]
        cy = [(ys * m).sum() / m.sum() for m in mask]
        assert np.sign(round(cx[-1] - cx[0])) == dx and np.sign(round(cy[-1] - cy[0])) == dy, direction


def test_render_rejects_direction_frames_mismatch() -> None:
    with pytest.raises(ValueError, match="direction"):
        world.render_clip(world.ToyAttributes("circle", "red", None, "black"), np.random.default_rng(0), 8)


def test_eval_prompts_are_balanced() -> None:
    prompts = world.eval_prompts(576, seed=0, frames=8)
    assert len(prompts) == 576 and len(set(prompts)) == 288
    assert all(prompts.count(p) == 2 for p in set(prompts))
    assert prompts == world.eval_prompts(576, seed=0, frames=8)
    assert all(" moving " not in p for p in world.eval_prompts(10, seed=0, frames=1))


def test_rendering_is_fast() -> None:
    t0 = time.perf_counter()
    for i in range(500):
        world.make_sample(i, seed=0, frames=8)
    assert time.perf_counter() - t0 < 2.5  # ~0.2 ms/clip idle: 20k clips in a few seconds
