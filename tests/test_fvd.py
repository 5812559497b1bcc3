"""FVD (StyleGAN-V protocol) end to end offline, with a tiny TorchScript stand-in for I3D.

The stand-in (`apt.eval.standins.StandInI3D`) has the real `i3d_torchscript.pt` call signature,
forward(x, rescale, resize, return_features) -> (B, 400), is scripted and saved inside the test,
and goes through the same `torch.jit.load` path as the real file.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from eval_helpers import ROOT, load_benchmark_with_generator
from torch import nn

from apt.eval import fvd
from apt.eval.fvd import (
    I3D_KWARGS,
    ClipTooShortError,
    FVDProtocol,
    clip_frame_indices,
    compute_fvd,
    compute_set_stats,
    fvd_report_markdown,
    load_clip,
    load_i3d,
    preprocess_frame,
    spanning_stride,
)
from apt.eval.standins import save_standin_i3d
from apt.eval.video_io import write_video


@pytest.fixture(scope="module")
def detector_path(tmp_path_factory) -> str:
    # Resizes to 32x32 instead of 224x224 (and a 4x4 patch) to keep the test fast.
    path = str(tmp_path_factory.mktemp("weights") / "i3d_torchscript.pt")
    return save_standin_i3d(path, resize_to=32, patch=4)


def make_clip(seed: int, T: int = 20, H: int = 48, W: int = 64, shift: float = 0.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:H, 0:W]
    phase, freq, speed = rng.uniform(0, 6, 3), rng.uniform(4, 10), rng.uniform(0.5, 3)
    frames = [
        np.stack([np.sin((x + speed * t) / freq + phase[c]) * 0.4 + 0.5 + shift for c in range(3)], -1)
        for t in range(T)
    ]
    return (np.clip(np.stack(frames), 0, 1) * 255).astype(np.uint8)


def make_set(d, n: int, seed: int, **kw) -> str:
    os.makedirs(d, exist_ok=True)
    for i in range(n):
        write_video(os.path.join(d, f"{i:03d}.mp4"), make_clip(seed * 1000 + i, **kw), fps=24)
    return str(d)


@pytest.fixture(scope="module")
def sets(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("videos")
    return {
        "real": make_set(root / "real", 12, seed=1),
        "gen": make_set(root / "gen", 12, seed=2, shift=0.15),
    }


SMALL = dict(num_frames=16, resolution=32, num_videos=12)


# ----------------------------------------------------------------- protocol / preprocessing


def test_clip_indices_default_and_strided():
    assert clip_frame_indices(16) == list(range(16))
    assert spanning_stride(49, 16) == 3
    assert clip_frame_indices(16, stride=3) == list(range(0, 46, 3))
    assert clip_frame_indices(4, offset=5, stride=2) == [5, 7, 9, 11]
    with pytest.raises(ClipTooShortError):
        spanning_stride(10, 16)


def test_protocol_validates():
    with pytest.raises(ValueError, match="stride"):
        FVDProtocol(stride=0)
    with pytest.raises(ValueError, match="crop"):
        FVDProtocol(crop="random")
    with pytest.raises(ValueError, match="N"):
        FVDProtocol(num_videos=1)


def test_preprocess_frame_center_crop_and_resize():
    frame = np.full((72, 128, 3), 128, np.uint8)
    frame[:, :28] = (255, 0, 0)  # outside the centre 72x72 square (columns 28..99)
    frame[:, 100:] = (255, 0, 0)
    out = preprocess_frame(frame, crop="center", resolution=32)
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8
    assert np.abs(out.astype(int) - 128).max() <= 1  # no red left
    squashed = preprocess_frame(frame, crop="none", resolution=32)
    assert squashed.shape == (32, 32, 3) and squashed[:, 0, 0].mean() > 200
    assert preprocess_frame(frame, crop="center", resolution=None).shape == (72, 72, 3)


def test_load_clip_selects_documented_frames(tmp_path):
    # Frame i is flat grey 4 * i + 20, so the decoded clip tells which frames were taken.
    T = 49
    video = np.stack([np.full((72, 128, 3), 4 * i + 20, np.uint8) for i in range(T)])
    path = str(tmp_path / "ramp.mp4")
    write_video(path, video, fps=24)
    for stride, expect in [(1, list(range(16))), ("span", list(range(0, 46, 3)))]:
        clip_CTHW, facts = load_clip(path, FVDProtocol(stride=stride, resolution=32))
        assert clip_CTHW.shape == (3, 16, 32, 32) and clip_CTHW.dtype == np.uint8
        means = clip_CTHW.reshape(3, 16, -1).mean(axis=(0, 2))
        np.testing.assert_allclose(means, 4 * np.array(expect) + 20, atol=2.5)
        assert facts["fps"] == 24.0 and facts["source_size"] == "128x72"
    clip_CTHW, _ = load_clip(path, FVDProtocol(offset=10, stride=2, resolution=32))
    np.testing.assert_allclose(clip_CTHW.reshape(3, 16, -1).mean(axis=(0, 2)),
                               4 * np.arange(10, 42, 2) + 20, atol=2.5)
    with pytest.raises(ClipTooShortError):
        load_clip(path, FVDProtocol(offset=40, resolution=32))


def test_detector_gets_stylegan_v_call_convention(sets):
    seen = []

    class Spy(nn.Module):
        def forward(self, x, **kwargs):
            seen.append((x.dtype, tuple(x.shape), int(x.min()), int(x.max()), kwargs))
            return torch.randn(x.shape[0], 400)

    compute_set_stats(fvd.list_videos(sets["real"]), Spy(), FVDProtocol(**{**SMALL, "num_videos": 4}), batch_size=4)
    dtype, shape, lo, hi, kwargs = seen[0]
    assert kwargs == {"rescale": True, "resize": True, "return_features": True} == I3D_KWARGS
    assert dtype == torch.uint8 and shape == (4, 3, 16, 32, 32) and 0 <= lo <= hi <= 255


# ----------------------------------------------------------------- end to end


@pytest.mark.integration
def test_fvd_end_to_end_records_protocol(sets, detector_path, tmp_path):
    res = compute_fvd(sets["gen"], sets["real"], detector_path=detector_path, protocol=FVDProtocol(**SMALL),
                      batch_size=4, cache_dir=str(tmp_path / "cache"))
    assert res["fvd"] > 0 and np.isfinite(res["fvd"])
    assert res["num_generated"] == res["num_real"] == 12
    for key in ("resize", "crop", "fps", "clip_offset", "clip_stride", "num_frames", "N", "real_source"):
        assert key in res
    assert res["detector"]["sha256"] and res["detector"]["kwargs"] == I3D_KWARGS
    assert res["detector"]["public_source"].startswith("https://www.dropbox.com/s/ge9e5ujwgetktms/")
    assert os.path.isfile(res["real_stats_cache"]) and not res["real_stats_cache_hit"]
    assert np.load(res["real_stats_cache"])["sum_DD"].dtype == np.float64
    assert "FVD" in fvd_report_markdown(res)

    again = compute_fvd(sets["gen"], sets["real"], detector_path=detector_path, protocol=FVDProtocol(**SMALL),
                        batch_size=4, cache_dir=str(tmp_path / "cache"))
    assert again["real_stats_cache_hit"] and again["fvd"] == pytest.approx(res["fvd"], rel=1e-9)
    other = compute_fvd(sets["gen"], sets["real"], detector_path=detector_path,
                        protocol=FVDProtocol(**{**SMALL, "stride": 1, "offset": 1}), batch_size=4,
                        cache_dir=str(tmp_path / "cache"))
    assert not other["real_stats_cache_hit"]  # protocol is part of the cache key


def test_fvd_self_distance_near_zero(sets, detector_path):
    same = compute_fvd(sets["real"], sets["real"], detector_path=detector_path, protocol=FVDProtocol(**SMALL))
    diff = compute_fvd(sets["gen"], sets["real"], detector_path=detector_path, protocol=FVDProtocol(**SMALL))
    assert abs(same["fvd"]) < 1e-6 * max(diff["fvd"], 1.0) + 1e-6


def test_fvd_independent_of_batch_size(sets, detector_path):
    protocol = FVDProtocol(**SMALL)
    detector = load_i3d(detector_path)
    stats = {bs: compute_set_stats(fvd.list_videos(sets["gen"]), detector, protocol, batch_size=bs).stats
             for bs in (1, 5, 12)}
    for bs in (5, 12):
        assert stats[bs].n == 12
        np.testing.assert_allclose(stats[bs].mu, stats[1].mu, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(stats[bs].sigma, stats[1].sigma, rtol=1e-4, atol=1e-7)
    # The distance is a function of (mu, sigma) only, so equal statistics give equal FVD.


def test_corrupt_and_short_files_are_reported_and_skipped(sets, detector_path, tmp_path):
    real = tmp_path / "real_with_bad"
    make_set(real, 6, seed=1)
    good = (real / "000.mp4").read_bytes()
    (real / "100_truncated.mp4").write_bytes(good[: len(good) // 2])
    (real / "101_junk.mp4").write_bytes(b"\x00" * 1000)
    write_video(str(real / "102_short.mp4"), make_clip(5, T=8), fps=24)
    write_video(str(real / "103_12fps.mp4"), make_clip(6), fps=12)
    with pytest.warns(UserWarning, match="skipping"):
        res = compute_fvd(sets["gen"], str(real), detector_path=detector_path,
                          protocol=FVDProtocol(**SMALL), batch_size=4)
    skipped = {os.path.basename(s["path"]): s["reason"] for s in res["skipped"]["real"]}
    assert set(skipped) == {"100_truncated.mp4", "101_junk.mp4", "102_short.mp4"}
    assert "VideoDecodeError" in skipped["101_junk.mp4"] and "ClipTooShortError" in skipped["102_short.mp4"]
    assert res["num_real"] == 7  # 6 good + the 12 fps file (used, and listed as an fps mismatch)
    assert [os.path.basename(m["path"]) for m in res["fps_mismatch"]["real"]] == ["103_12fps.mp4"]


def test_n_limits_clips_and_list_file(sets, detector_path, tmp_path):
    files = fvd.list_videos(sets["real"])
    lst = tmp_path / "real.txt"
    lst.write_text("\n".join(files[:6]) + "\n")
    res = compute_fvd(sets["gen"], str(lst), detector_path=detector_path,
                      protocol=FVDProtocol(**{**SMALL, "num_videos": 5}))
    assert res["num_real"] == 5 and res["num_generated"] == 5 and res["N"] == 5


def test_missing_detector_names_file_and_source(tmp_path, sets):
    with pytest.raises(FileNotFoundError, match="i3d_torchscript.pt") as e:
        compute_fvd(sets["gen"], sets["real"], detector_path=str(tmp_path / "nope" / "i3d_torchscript.pt"))
    assert "https://www.dropbox.com/s/ge9e5ujwgetktms/i3d_torchscript.pt" in str(e.value)
    with pytest.raises(FileNotFoundError, match="i3d_torchscript.pt"):
        load_i3d(str(tmp_path))  # a directory without the file


@pytest.mark.integration
def test_cli_writes_json_and_markdown(sets, detector_path, tmp_path):
    import json
    import subprocess
    import sys

    out = tmp_path / "report"
    cmd = [sys.executable, os.path.join(ROOT, "eval", "fvd.py"), "--gen", sets["gen"], "--real", sets["real"],
           "--detector", detector_path, "--num-videos", "6", "--resolution", "32", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((out / "report.json").read_text())
    assert report["num_real"] == 6 and (out / "report.md").read_text().startswith("#")


# ----------------------------------------------------------------- benchmark script


class FakeVideoGenerator:
    """The `apt.inference.load_generator` interface: generate(prompts, seeds, steps) -> uint8 (B, T, H, W, 3)."""

    num_frames, height, width = 20, 48, 64

    def generate(self, prompts, seeds, steps=1):
        return torch.from_numpy(np.stack([make_clip(10_000 + s, shift=0.1) for s in seeds]))


@pytest.mark.integration
def test_benchmark_video_generates_and_reports(sets, detector_path, tmp_path, monkeypatch):
    import json

    bench = load_benchmark_with_generator("benchmark_video", FakeVideoGenerator(), monkeypatch)
    (tmp_path / "prompts.txt").write_text("a red cube\na blue ball\n")
    common = ["--real", sets["real"], "--detector", detector_path, "--num-videos", "6", "--resolution", "32",
              "--cache-dir", str(tmp_path / "cache")]
    out = tmp_path / "run"
    res = bench.main(["--checkpoint", str(tmp_path / "ckpt"), "--prompts", str(tmp_path / "prompts.txt"),
                      "--height", "48", "--width", "64", "--num-frames-generated", "20", "--out", str(out),
                      "--name", "fake-apt", *common])
    assert res["num_generated"] == 6 and res["generation"]["steps"] == 1
    index = json.loads((out / "samples" / "index.json").read_text())
    assert [e["prompt"] for e in index[:3]] == ["a red cube", "a blue ball", "a red cube"]
    assert [e["seed"] for e in index[:2]] == [0, 1]
    for f in ("report.json", "report.md", "sample_grid.mp4", "plot.png"):
        assert (out / f).is_file()
    from apt.eval.video_io import video_info

    assert (video_info(str(out / "sample_grid.mp4")).height, video_info(str(out / "sample_grid.mp4")).width) == (48, 64)

    again = bench.main(["--samples-dir", str(out / "samples"), "--out", str(tmp_path / "re"),
                        "--compare", str(out / "report.json"), *common])
    assert again["fvd"] == pytest.approx(res["fvd"], rel=1e-6) and again["real_stats_cache_hit"]
    assert "fake-apt" in (tmp_path / "re" / "report.md").read_text()

    with pytest.raises(ValueError, match="generates"):
        bench.main(["--checkpoint", "x", "--prompts", str(tmp_path / "prompts.txt"), "--out", str(tmp_path / "bad"),
                    *common])  # default benchmark size 49 x 720 x 1280 != the fake's 20 x 48 x 64
