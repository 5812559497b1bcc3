"""The demo's side-by-side picture (apt.toy.side_by_side): labelled, enlarged by nearest neighbour."""

import numpy as np
import pytest
from PIL import Image

from apt.toy import side_by_side as sbs

ROWS = ["teacher-25step-cfg", "distilled-1step", "apt-1step", "apt-2step"]
PROMPTS = [f"a red circle moving {d} on a black background" for d in ("left", "right", "up")]


def clips(P: int = 3, R: int = 4, T: int = 4) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, size=(P, R, T, 16, 16, 3), dtype=np.uint8)


def find_block(img: np.ndarray, block: np.ndarray) -> list[tuple[int, int]]:
    """Top-left corners where ``block`` occurs in ``img`` exactly."""
    h, w = block.shape[:2]
    hits = np.argwhere((img[: img.shape[0] - h + 1, : img.shape[1] - w + 1] == block[0, 0]).all(-1))
    return [(y, x) for y, x in hits if np.array_equal(img[y : y + h, x : x + w], block)]


def test_each_frame_is_an_8x_nearest_neighbour_block_in_its_row_and_column():
    x = clips()
    img = sbs.side_by_side_image(x, ROWS, PROMPTS)
    assert sbs.SCALE == 8 and sbs.text_width(max(ROWS, key=len)) + 2 * sbs.PAD <= sbs.LABEL_MIN_WIDTH
    tile = 16 * sbs.SCALE  # 128 px: a clip pixel is an 8x8 square
    group_w = sbs.LABEL_MIN_WIDTH + 4 * (tile + sbs.PAD)
    group_h = sbs.TITLE_HEIGHT + 4 * (tile + sbs.PAD)
    assert img.shape == (2 * sbs.GAP + 2 * group_h + sbs.GAP, 2 * sbs.GAP + 2 * group_w + sbs.GAP, 3)  # 3 groups, 2 per line
    for p, r, t in [(0, 0, 0), (0, 3, 3), (1, 2, 1), (2, 1, 2)]:
        block = x[p, r, t].repeat(8, axis=0).repeat(8, axis=1)
        (y, x0), = find_block(img, block)
        assert y == sbs.GAP + (p // 2) * (group_h + sbs.GAP) + sbs.TITLE_HEIGHT + r * (tile + sbs.PAD)
        assert x0 == sbs.GAP + (p % 2) * (group_w + sbs.GAP) + sbs.LABEL_MIN_WIDTH + t * (tile + sbs.PAD)
        assert (img[y : y + 8, x0 : x0 + 8] == x[p, r, t, 0, 0]).all()  # one source pixel, one k x k square


def test_prompts_and_row_names_are_written_in_the_picture():
    x = clips()
    img = sbs.side_by_side_image(x, ROWS, PROMPTS)
    blank = sbs.side_by_side_image(x, [""] * 4, [""] * 3)
    assert img.shape == blank.shape
    dark = (img.sum(-1) < 200) & (blank.sum(-1) >= 200)  # text pixels: dark where the unlabelled picture is not
    tile = 16 * sbs.SCALE
    group_w = sbs.LABEL_MIN_WIDTH + 4 * (tile + sbs.PAD)
    title = dark[sbs.GAP : sbs.GAP + sbs.TITLE_HEIGHT, sbs.GAP : sbs.GAP + group_w]
    assert title.sum() > 200  # the first prompt over its group
    for r in range(4):  # each row's name in the label column, level with its tiles
        y = sbs.GAP + sbs.TITLE_HEIGHT + r * (tile + sbs.PAD)
        assert dark[y : y + tile, sbs.GAP : sbs.GAP + sbs.LABEL_MIN_WIDTH].sum() > 100, ROWS[r]
    with pytest.raises(ValueError, match="3 prompts x 4 rows of clips, but 2 prompts and 4 row names"):
        sbs.side_by_side_image(x, ROWS, PROMPTS[:2])


def test_save_writes_the_png_and_an_animated_gif(tmp_path):
    x = clips(P=2, T=3)
    png, gif = sbs.save_side_by_side(x, ROWS, PROMPTS[:2], tmp_path)
    assert np.array_equal(np.asarray(Image.open(png)), sbs.side_by_side_image(x, ROWS, PROMPTS[:2]))
    with Image.open(gif) as g:
        assert g.n_frames == 3
        one_tile_per_row = sbs.side_by_side_image(x[:, :, :1], ROWS, PROMPTS[:2], groups_per_line=4)
        assert g.size == (one_tile_per_row.shape[1], one_tile_per_row.shape[0])
