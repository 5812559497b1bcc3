"""mp4 (PyAV) and PNG I/O used by the evaluators."""

from __future__ import annotations

import numpy as np
import pytest

from apt.eval.video_io import (
    VideoDecodeError,
    VideoStreamWriter,
    iter_clips,
    iter_frames,
    read_png,
    read_video,
    video_info,
    write_png,
    write_video,
)


def smooth_clip(T: int = 10, H: int = 32, W: int = 48, seed: int = 0) -> np.ndarray:
    """A compressible clip (gradients that move), so lossy x264 stays close to the input."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:H, 0:W]
    base = rng.uniform(0, 1, 3)
    frames = [
        np.stack([(np.sin((x + 2 * t) / 6 + c * 2 + base[c]) * 0.4 + 0.5) * 255 for c in range(3)], -1)
        for t in range(T)
    ]
    return np.clip(np.stack(frames), 0, 255).astype(np.uint8)


def test_write_read_roundtrip(tmp_path):
    clip = smooth_clip()
    path = str(tmp_path / "a.mp4")
    write_video(path, clip, fps=24)
    info = video_info(path)
    assert (info.fps, info.num_frames, info.height, info.width) == (24.0, 10, 32, 48)
    back = read_video(path)
    assert back.shape == clip.shape and back.dtype == np.uint8
    assert np.abs(back.astype(int) - clip.astype(int)).mean() < 6
    assert read_video(path, max_frames=3).shape[0] == 3
    assert sum(1 for _ in iter_frames(path)) == 10


def test_write_accepts_torch_and_rejects_bad_input(tmp_path):
    import torch

    write_video(str(tmp_path / "t.mp4"), torch.from_numpy(smooth_clip(T=2)), fps=12)
    assert video_info(str(tmp_path / "t.mp4")).fps == 12.0
    with pytest.raises(ValueError, match="uint8"):
        write_video(str(tmp_path / "f.mp4"), smooth_clip().astype(np.float32))
    with pytest.raises(ValueError, match="even"):
        write_video(str(tmp_path / "o.mp4"), smooth_clip(H=31))


def test_stream_writer_is_playable_while_it_grows(tmp_path):
    """The streaming mp4: every frame reaches the file as it is written (a copy taken mid-stream decodes the frames
    before it, as a player or a killed stream would see them), and the closed file holds them all."""
    import shutil

    clip, path = smooth_clip(T=12), tmp_path / "s" / "stream.mp4"
    with VideoStreamWriter(path, fps=8) as video:
        for t, frame in enumerate(clip):
            video.write(frame)
            if t == 5:
                shutil.copy(path, tmp_path / "partial.mp4")
    partial = read_video(str(tmp_path / "partial.mp4"))
    assert 5 <= partial.shape[0] <= 6 and np.abs(partial.astype(int) - clip[: partial.shape[0]].astype(int)).mean() < 6
    back = read_video(str(path))
    assert back.shape == clip.shape and np.abs(back.astype(int) - clip.astype(int)).mean() < 6
    assert video_info(str(path)).fps == 8.0
    with pytest.raises(ValueError, match="even"):
        VideoStreamWriter(tmp_path / "odd.mp4", fps=8).write(smooth_clip(T=1, H=31)[0])
    with VideoStreamWriter(tmp_path / "sizes.mp4", fps=8) as video:
        video.write(clip[0])
        with pytest.raises(ValueError, match="frame 1 is 16x48, the video 32x48"):
            video.write(smooth_clip(T=1, H=16)[0])


def test_iter_clips_strided(tmp_path):
    path = str(tmp_path / "a.mp4")
    write_video(path, smooth_clip(T=20), fps=24)
    clips = list(iter_clips(path, num_frames=4, stride=2))  # frames 0..6, 8..14
    assert [c.shape[0] for c in clips] == [4, 4]


@pytest.mark.parametrize("cut", ["head", "half", "tail"])
def test_truncated_or_corrupt_raises_specific_error(tmp_path, cut):
    good = tmp_path / "good.mp4"
    write_video(str(good), smooth_clip(), fps=24)
    data = good.read_bytes()
    bad = tmp_path / "bad.mp4"
    bad.write_bytes({"head": data[:64], "half": data[: len(data) // 2], "tail": data[:-200]}[cut])
    with pytest.raises(VideoDecodeError) as e:
        read_video(str(bad))
    assert e.value.path == str(bad)


def test_garbage_and_missing(tmp_path):
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(VideoDecodeError):
        read_video(str(junk))
    with pytest.raises(FileNotFoundError):
        read_video(str(tmp_path / "missing.mp4"))


def test_png_roundtrip_and_jpeg_rejected(tmp_path):
    from PIL import Image

    img = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    write_png(str(tmp_path / "a.png"), img)
    np.testing.assert_array_equal(read_png(str(tmp_path / "a.png")), img)
    Image.fromarray(img).save(tmp_path / "b.png", format="JPEG")  # JPEG bytes under .png
    with pytest.raises(ValueError, match="not PNG"):
        read_png(str(tmp_path / "b.png"))
