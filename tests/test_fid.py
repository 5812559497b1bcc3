"""FID end to end offline, with a tiny TorchScript stand-in for `inception-2015-12-05.pt`.

The stand-in (`apt.eval.standins.StandInInception`) has the real file's interface: forward(img, return_features, use_fp16,
no_output_bias) on [0, 255] NCHW images of any size (it resizes to 299 itself, normalises
(x - 128) / 128 and runs `self.layers`), pool3-like 2048-d features; it is scripted and saved in
the test and loaded through the real `torch.jit.load` path.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from eval_helpers import load_benchmark_with_generator

from apt.eval.fid import (
    INCEPTION_PUBLIC_URL,
    InceptionFeatures,
    _feed,
    _make_metric,
    compute_fid,
    fid_report_markdown,
    frechet_distance_psd,
    list_images,
    load_inception,
    preprocess_image,
)
from apt.eval.frechet import frechet_distance
from apt.eval.standins import save_standin_inception
from apt.eval.video_io import write_png


@pytest.fixture(scope="module")
def inception_path(tmp_path_factory) -> str:
    return save_standin_inception(str(tmp_path_factory.mktemp("weights") / "inception-2015-12-05.pt"))


def make_images(d, n: int, seed: int, size: int = 128, shift: float = 0.0) -> str:
    os.makedirs(d, exist_ok=True)
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    for i in range(n):
        a, b, c = rng.uniform(1, 8, 3)
        img = np.stack([np.sin(a * x + b * y + c + k) * 0.4 + 0.5 + shift for k in range(3)], -1)
        write_png(os.path.join(d, f"{i:04d}.png"), (np.clip(img, 0, 1) * 255).astype(np.uint8))
    return str(d)


@pytest.fixture(scope="module")
def sets(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("images")
    return {"real": make_images(root / "real", 10, 1), "gen": make_images(root / "gen", 10, 2, shift=0.2)}


# ----------------------------------------------------------------- preprocessing / call convention


def test_preprocess_clean_and_torchscript_modes():
    img = np.full((1024, 1024, 3), 77, np.uint8)
    img[::2] = 200  # fine stripes: the antialiased PIL filter averages them
    x = preprocess_image(img, "clean")
    assert x.shape == (3, 299, 299) and x.dtype == torch.float32
    assert 0 <= float(x.min()) and float(x.max()) <= 255
    assert abs(float(x.mean()) - (77 + 200) / 2) < 3 and float(x.std()) < 20
    flat = preprocess_image(np.full((1024, 1024, 3), 77, np.uint8), "clean")
    assert torch.allclose(flat, torch.full_like(flat, 77.0), atol=1e-3)
    raw = preprocess_image(img, "torchscript")
    assert raw.shape == (3, 1024, 1024) and raw.dtype == torch.uint8
    with pytest.raises(ValueError, match="resize"):
        preprocess_image(img, "bilinear")


def test_wrapper_uses_documented_calls(inception_path):
    model = load_inception(inception_path)
    img = torch.randint(0, 256, (2, 3, 64, 48), dtype=torch.uint8)
    ts = InceptionFeatures(model, resize="torchscript")
    assert ts.num_features == 2048
    torch.testing.assert_close(ts(img), model(img, return_features=True))
    clean = InceptionFeatures(model, resize="clean")
    x = torch.rand(2, 3, 299, 299) * 255
    torch.testing.assert_close(clean(x), model.layers((x - 128) / 128).reshape(2, 2048))
    with pytest.raises(ValueError, match="299"):
        clean(img.float())


def test_psd_distance_matches_scipy_and_torchmetrics():
    from torchmetrics.image.fid import _compute_fid

    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(200, 40)), rng.normal(size=(150, 40)) @ rng.normal(size=(40, 40)) * 0.3
    mu_a, mu_b, s_a, s_b = a.mean(0), b.mean(0), np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    ref = frechet_distance(mu_a, s_a, mu_b, s_b)
    tm = float(_compute_fid(*(torch.from_numpy(t) for t in (mu_a, s_a, mu_b, s_b))))
    ours = frechet_distance_psd(*(torch.from_numpy(t) for t in (mu_a, s_a, mu_b, s_b)))
    assert ours == pytest.approx(ref, rel=1e-8) and ours == pytest.approx(tm, rel=1e-6)
    assert abs(frechet_distance_psd(torch.from_numpy(mu_a), torch.from_numpy(s_a),
                                    torch.from_numpy(mu_a), torch.from_numpy(s_a))) < 1e-9


def test_batch_size_does_not_change_statistics(inception_path, sets):
    detector = InceptionFeatures(load_inception(inception_path), resize="clean")
    paths = list_images(sets["gen"])
    sums = []
    for bs in (1, 10):
        metric = _make_metric(detector, "cpu")
        info = _feed(metric, paths, real=True, resize="clean", batch_size=bs, num_images=None,
                     device="cpu", expected_size=None)
        assert info["n"] == 10
        sums.append((metric.real_features_sum.clone(), metric.real_features_cov_sum.clone()))
    for s, c in sums[1:]:
        torch.testing.assert_close(s, sums[0][0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(c, sums[0][1], rtol=1e-5, atol=1e-6)
    assert sums[0][1].dtype == torch.float64


def test_jpeg_rejected_with_clear_error(tmp_path):
    from PIL import Image

    d = tmp_path / "mixed"
    make_images(d, 2, 0)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(d / "x.jpg")
    with pytest.raises(ValueError, match="JPEG"):
        list_images(str(d))


def test_missing_inception_names_file_and_source(tmp_path, sets):
    with pytest.raises(FileNotFoundError, match="inception-2015-12-05.pt") as e:
        compute_fid(sets["gen"], sets["real"], inception_path=str(tmp_path))
    assert INCEPTION_PUBLIC_URL in str(e.value)


# ----------------------------------------------------------------- end to end (2048-d linear algebra: seconds)


@pytest.mark.integration
def test_fid_end_to_end_cache_self_and_corrupt(inception_path, sets, tmp_path):
    cache = str(tmp_path / "cache")
    res = compute_fid(sets["gen"], sets["real"], inception_path=inception_path, cache_dir=cache, expected_size=128)
    assert res["fid"] > 0 and res["num_generated"] == res["num_real"] == 10
    assert res["resize"] == "clean" and "bicubic" in res["resize_filter"]
    assert res["detector"]["sha256"] and not res["real_stats_cache_hit"]
    assert np.load(res["real_stats_cache"])["sum_DD"].dtype == np.float64
    assert "FID" in fid_report_markdown(res)

    again = compute_fid(sets["gen"], sets["real"], inception_path=inception_path, cache_dir=cache, expected_size=128)
    assert again["real_stats_cache_hit"] and again["fid"] == pytest.approx(res["fid"], rel=1e-9)

    same = compute_fid(sets["real"], sets["real"], inception_path=inception_path, expected_size=128)
    assert abs(same["fid"]) < 1e-6 * res["fid"] + 1e-6

    bad = tmp_path / "real_bad"
    make_images(bad, 4, 1)
    data = (bad / "0000.png").read_bytes()
    (bad / "0100_truncated.png").write_bytes(data[: len(data) // 3])
    (bad / "0101_junk.png").write_bytes(b"not an image")
    with pytest.warns(UserWarning, match="skipping"):
        res_bad = compute_fid(sets["gen"], str(bad), inception_path=inception_path, expected_size=128)
    assert sorted(os.path.basename(s["path"]) for s in res_bad["skipped"]["real"]) == [
        "0100_truncated.png", "0101_junk.png"]
    assert res_bad["num_real"] == 4


@pytest.mark.integration
def test_fid_torchscript_resize_mode_and_n(inception_path, sets):
    res = compute_fid(sets["gen"], sets["real"], inception_path=inception_path, resize="torchscript",
                      num_images=6, expected_size=None)
    assert res["num_generated"] == res["num_real"] == 6 and res["N"] == 6
    assert "internal bilinear" in res["resize_filter"] and np.isfinite(res["fid"])


# ----------------------------------------------------------------- benchmark script


class FakeImageGenerator:
    num_frames, height, width = 1, 64, 64

    def generate(self, prompts, seeds, steps=1):
        rng = np.random.default_rng(seeds[0])
        return torch.from_numpy(rng.integers(0, 256, (len(seeds), 1, 64, 64, 3), dtype=np.uint8))


@pytest.mark.integration
def test_benchmark_images_generates_and_reports(inception_path, sets, tmp_path, monkeypatch):
    import json

    bench = load_benchmark_with_generator("benchmark_images", FakeImageGenerator(), monkeypatch)
    (tmp_path / "prompts.txt").write_text("a red cube\na blue ball\n")
    out = tmp_path / "run"
    res = bench.main(["--checkpoint", "ckpt", "--prompts", str(tmp_path / "prompts.txt"), "--real", sets["real"],
                      "--inception", inception_path, "--num-images", "6", "--height", "64", "--width", "64",
                      "--gen-batch-size", "4", "--expected-size", "64", "--cache-dir", "none", "--out", str(out)])
    assert res["num_generated"] == 6 and res["num_real"] == 6 and np.isfinite(res["fid"])
    assert len(json.loads((out / "samples" / "index.json").read_text())) == 6
    for f in ("report.json", "report.md", "sample_grid.png", "plot.png"):
        assert (out / f).is_file()
    again = bench.main(["--samples-dir", str(out / "samples"), "--real", sets["real"], "--inception", inception_path,
                        "--num-images", "6", "--cache-dir", "none", "--out", str(tmp_path / "re"),
                        "--compare", str(out / "report.json")])
    assert again["fid"] == pytest.approx(res["fid"], rel=1e-6)
    assert (tmp_path / "re" / "report.md").read_text().count("| run ") == 1
