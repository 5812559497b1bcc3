"""The long-clip toy world, the drift report, the peak-memory meter and the streaming bar."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from apt.eval.tensor_memory import PeakTensorMemory
from apt.toy.long_world import make_long_sample
from apt.toy.stream_report import check_stream_bar
from apt.toy.world import DIRECTIONS, make_sample, parse_caption


def centroid_x(frame_HWC: np.ndarray, colour) -> float:
    mask = (np.abs(frame_HWC.astype(int) - np.array(colour)).sum(-1) < 60)
    return np.angle(np.exp(2j * np.pi * np.nonzero(mask)[1] / 16).mean()) * 16 / (2 * np.pi)  # circular mean on the torus


def test_long_clips_keep_moving_and_wrap_around():
    from apt.toy.world import COLOURS

    moved = 0
    for i in range(40):
        s = make_long_sample(i, seed=0, frames=128)
        a = s["attributes"]
        assert s["pixels"].shape == (128, 16, 16, 3) and s["caption"] == f"a {a.colour} {a.shape} moving {a.direction} on a {a.background} background"
        if a.direction not in ("left", "right"):
            continue
        colour, sign = COLOURS[a.colour], DIRECTIONS[a.direction][0]
        steps = [(centroid_x(s["pixels"][t + 1], colour) - centroid_x(s["pixels"][t], colour) + 8) % 16 - 8 for t in range(100, 120)]
        moved += np.median(steps) * sign > 0.5  # still moving its captioned way after 100 frames
    assert moved >= 10


def test_every_window_of_a_long_clip_is_a_clip_of_the_world():
    s = make_long_sample(3, seed=1, frames=64)
    assert np.array_equal(make_long_sample(3, seed=1, frames=64)["pixels"], s["pixels"])  # determined by (seed, index)
    a = parse_caption(s["caption"])
    assert a.direction is not None
    with pytest.raises(ValueError, match="frames >= 2"):
        make_long_sample(0, seed=0, frames=1)


def test_the_demo_world_is_untouched():
    """The long world draws from its own stream: the demo world's clip of the same (seed, index) is unchanged."""
    a, b = make_sample(5, seed=0, frames=4), make_long_sample(5, seed=0, frames=4)
    assert not np.array_equal(a["pixels"], b["pixels"])
    assert np.array_equal(a["pixels"], make_sample(5, seed=0, frames=4)["pixels"])


def test_peak_tensor_memory_counts_live_storages():
    with PeakTensorMemory() as m:
        for _ in range(5):
            x = torch.randn(100, 1000)
            y = x * 2
        del x, y
    assert m.peak == 3 * 400_000  # x, y and the next x
    with PeakTensorMemory() as m:
        keep = [torch.randn(100, 1000) for _ in range(5)]
        view = keep[0][:10]  # a view allocates nothing
    assert m.peak == 5 * 400_000 and view.shape == (10, 1000)


def row(name, **kw):
    base = {"name": name, "attribute_accuracy_1x": 0.9, "attribute_accuracy_4x": 0.9, "first_chunk_seconds": 0.01, "fps": 1000.0,
            "peak_bytes_1x": 100, "peak_bytes_16x": 105}
    return base | kw


def report(**rows):
    return {"rows": [rows.get(n, row(n)) for n in ("teacher-forced-1step", "student-forced-1step", "causal-teacher")], "whole_clip_seconds": 0.1}


def test_stream_bar_lines():
    r = report(**{"teacher-forced-1step": row("teacher-forced-1step", attribute_accuracy_4x=0.8), "causal-teacher": row("causal-teacher", fps=10.0)})
    lines = check_stream_bar(r)
    assert [x["met"] for x in lines] == [True, True, True, True, True]
    r["rows"][1] = row("student-forced-1step", attribute_accuracy_4x=0.84, first_chunk_seconds=0.03, fps=500.0, peak_bytes_16x=120)
    assert [x["met"] for x in check_stream_bar(r)] == [False, False, False, False, False]
    with pytest.raises(KeyError, match="causal-teacher"):
        check_stream_bar({"rows": [row("student-forced-1step"), row("teacher-forced-1step")]})


def test_free_shape_world_and_its_drift_metric():
    """Captioned without the shape; a window's shape counts as right when it is the first window's. Real videos keep
    their shape, so the metric reads them as (nearly) always right; a video whose shape changes is caught."""
    from apt.toy.classifier import load_toy_classifier
    from apt.toy.drift import long_real_batches, long_real_stats, window_metrics
    from apt.toy.long_world import free_shape_caption, parse_free_caption

    s, f = make_long_sample(2, seed=4, frames=16), make_long_sample(2, seed=4, frames=16, free_shape=True)
    assert np.array_equal(s["pixels"], f["pixels"]) and f["caption"] == free_shape_caption(s["attributes"])
    a = s["attributes"]
    assert parse_free_caption(f["caption"]) == ("free-shape", {"colour": a.colour, "direction": a.direction, "background": a.background})
    with pytest.raises(ValueError, match="free-shape"):
        parse_free_caption(s["caption"])
    classifier = load_toy_classifier("assets/toy_classifier")
    n = 48
    real = long_real_stats(classifier, frames=8, n=n, seed=9)
    videos = [make_long_sample(i, seed=11, frames=24, free_shape=True) for i in range(n)]
    x = torch.from_numpy(np.stack([v["pixels"] for v in videos])).permute(0, 4, 1, 2, 3).float() / 127.5 - 1
    prompts = [v["caption"] for v in videos]
    curve = window_metrics(classifier, x, prompts, real, window_frames=8)
    assert [w["first_frame"] for w in curve] == [0, 8, 16]
    assert all(w["per_attribute"]["shape_kept"] >= 0.75 for w in curve) and curve[0]["per_attribute"]["shape_kept"] == 1.0
    swapped = x.clone()
    swapped[:, :, 16:] = x.roll(1, dims=0)[:, :, 16:]  # the last window shows another video: shapes (and more) change
    assert window_metrics(classifier, swapped, prompts, real, window_frames=8)[2]["attribute_accuracy"] < curve[2]["attribute_accuracy"] - 0.3
    assert next(iter(long_real_batches(8, 2, seed=9)))[0].shape == (2, 3, 8, 16, 16)


def test_world_prompts_leave_the_shape_out_of_free_shape_captions():
    from apt.toy.long_world import parse_free_caption, world_prompts

    prompts = ["a red circle moving left on a black background", "a cyan triangle moving down on a gray background"]
    assert world_prompts(prompts, "long") == prompts
    free = world_prompts(prompts, "free-shape")
    assert free == ["a red moving left on a black background", "a cyan moving down on a gray background"]
    assert [parse_free_caption(p)[1]["colour"] for p in free] == ["red", "cyan"]
    no_colour = world_prompts(prompts, "free-colour")
    assert no_colour == ["a circle moving left on a black background", "a triangle moving down on a gray background"]
    assert [parse_free_caption(p) for p in no_colour] == [("free-colour", {"shape": "circle", "direction": "left", "background": "black"}),
                                                          ("free-colour", {"shape": "triangle", "direction": "down", "background": "gray"})]
    with pytest.raises(ValueError, match="unknown streaming world"):
        world_prompts(prompts, "demo")
    with pytest.raises(ValueError, match="not a toy caption"):
        world_prompts(["a red circle"], "free-shape")


def test_whole_clip_row_comes_from_the_full_demo_only_when_not_quick(tmp_path, monkeypatch):
    from apt.toy.stream_demo import whole_clip_checkpoint

    monkeypatch.chdir(tmp_path)
    assert whole_clip_checkpoint(None) is None  # no `python -m apt demo` run here
    (tmp_path / "runs" / "demo").mkdir(parents=True)
    (tmp_path / "runs" / "demo" / "report.json").write_text('{"apt_checkpoint": "runs/demo/apt_video/checkpoints/step-000200"}')
    assert whole_clip_checkpoint(None) == "runs/demo/apt_video/checkpoints/step-000200"
    assert whole_clip_checkpoint(None, quick=True) is None  # tiny --quick models are not compared with the full demo's
    assert whole_clip_checkpoint("given", quick=True) == "given"


def test_free_colour_world_and_its_drift_metric():
    """Captioned without the colour; a window's colour counts as right when it is the first window's. Real videos
    keep their colour in every window; a video whose colour changes is caught."""
    from apt.toy.classifier import load_toy_classifier
    from apt.toy.drift import long_real_stats, window_metrics
    from apt.toy.long_world import free_colour_caption

    s, f = make_long_sample(3, seed=4, frames=16), make_long_sample(3, seed=4, frames=16, free_colour=True)
    assert np.array_equal(s["pixels"], f["pixels"]) and f["caption"] == free_colour_caption(s["attributes"])
    assert s["attributes"].colour not in f["caption"] and s["attributes"].shape in f["caption"]
    with pytest.raises(ValueError, match="not both"):
        make_long_sample(3, seed=4, frames=16, free_shape=True, free_colour=True)
    classifier = load_toy_classifier("assets/toy_classifier")
    n = 48
    real = long_real_stats(classifier, frames=8, n=n, seed=9)
    videos = [make_long_sample(i, seed=11, frames=24, free_colour=True) for i in range(n)]
    x = torch.from_numpy(np.stack([v["pixels"] for v in videos])).permute(0, 4, 1, 2, 3).float() / 127.5 - 1
    curve = window_metrics(classifier, x, [v["caption"] for v in videos], real, window_frames=8)
    assert list(curve[0]["per_attribute"]) == ["shape", "direction", "background", "colour_kept"]
    assert all(w["per_attribute"]["colour_kept"] >= 0.9 for w in curve) and curve[0]["per_attribute"]["colour_kept"] == 1.0
    recoloured = x.clone()
    recoloured[:, :, 16:] = recoloured[:, :, 16:].roll(1, dims=1)  # channels rotated in the last window: every colour changes
    changed = window_metrics(classifier, recoloured, [v["caption"] for v in videos], real, window_frames=8)[2]["per_attribute"]["colour_kept"]
    assert changed < curve[2]["per_attribute"]["colour_kept"] - 0.5


def test_stream_demo_refuses_a_folder_trained_on_another_world(tmp_path):
    """A finished stage is reused, so a folder whose adversarial stage trained on another world's clips is refused."""
    from apt.toy.stream_demo import check_folder_world

    check_folder_world(tmp_path, "runs/data/toy-freecol-16f", "free-colour")  # nothing there yet
    (tmp_path / "apt").mkdir()
    (tmp_path / "apt" / "config.yaml").write_text("stage: stream_apt\ndata:\n  shards: runs/data/toy-free-16f\n")
    check_folder_world(tmp_path, "runs/data/toy-free-16f", "free-shape")
    with pytest.raises(ValueError, match=r"toy-free-16f, not on the free-colour world's runs/data/toy-freecol-16f"):
        check_folder_world(tmp_path, "runs/data/toy-freecol-16f", "free-colour")
    # the same world with other distribution-matching scores (the causal teacher's here)
    with pytest.raises(ValueError, match=r"distribution matching used the causal teacher, not assets/bidir"):
        check_folder_world(tmp_path, "runs/data/toy-free-16f", "free-shape", "assets/bidir")
    (tmp_path / "apt" / "config.yaml").write_text("stage: stream_apt\ndata:\n  shards: runs/data/toy-free-16f\nstream:\n  dmd_teacher: assets/bidir\n")
    check_folder_world(tmp_path, "runs/data/toy-free-16f", "free-shape", "assets/bidir")
    # the same world and scores on another chain (the free-colour demo's has a clean cache; earlier versions had not)
    with pytest.raises(ValueError, match=r"trained with model.clean_context=false, not true as the free-shape world's chain is"):
        check_folder_world(tmp_path, "runs/data/toy-free-16f", "free-shape", "assets/bidir", True)
    (tmp_path / "apt" / "config.yaml").write_text("stage: stream_apt\ndata:\n  shards: runs/data/toy-free-16f\nmodel:\n  clean_context: true\n")
    check_folder_world(tmp_path, "runs/data/toy-free-16f", "free-shape", "", True)


def test_stream_demo_picks_the_checkpoint_by_validation_accuracy_at_4x(monkeypatch):
    """The bar's measure decides (accuracy at 4x the training length); the distance only breaks ties."""
    from apt.toy import stream_demo

    scores = {"a": (0.80, 40.0), "b": (0.84, 50.0), "c": (0.84, 45.0), "d": (0.70, 30.0)}

    def fake_windows(candidates, **kw):
        assert kw["starts"] == [3 * kw["train_frames"]]
        return [[{"attribute_accuracy": scores[c][0], "distance": scores[c][1]}] for c in candidates]

    monkeypatch.setattr(stream_demo, "validation_windows", fake_windows)
    best, selection = stream_demo.pick_checkpoint(list(scores), train_frames=8, n=4, classifier_path="unused")
    assert best == "c"
    assert [s["val_attribute_accuracy_4x"] for s in selection] == [0.80, 0.84, 0.84, 0.70]


def test_stream_rows_refuse_a_row_count_above_the_report_count(tmp_path):
    from apt.toy.stream_report import evaluate_stream_rows

    with pytest.raises(ValueError, match=r"row_samples must be between 1 and num_samples=16, got \{'causal-teacher': 32\}"):
        evaluate_stream_rows([], out_dir=tmp_path, num_samples=16, train_frames=8, row_samples={"causal-teacher": 32})


def test_paired_speed_times_every_row_round_robin(monkeypatch):
    """Call k of every row runs before call k + 1 of any (a slow spell of the machine lands on all rows alike), and
    each figure is a median: "b" costs twice "a"'s time, on a machine that slows down 1.5x call after call."""
    from types import SimpleNamespace

    from apt.toy import stream_report

    calls, clock = [], {"slow": 1.0}

    def fake_video(gen, prompt, seed, *, steps, cfg_scale, frames, first_only=False):
        calls.append((gen.name, frames, first_only))
        clock["slow"] *= 1.5  # the machine slows down call after call
        fake_time[0] += gen.cost * frames * clock["slow"]

    fake_time = [0.0]
    monkeypatch.setattr(stream_report, "make_video", fake_video)
    monkeypatch.setattr(stream_report.time, "perf_counter", lambda: fake_time[0])

    def gen(name, cost, chunk):
        return SimpleNamespace(name=name, cost=cost, text_encoder=SimpleNamespace(encode=lambda p: None),
                               config=SimpleNamespace(model=SimpleNamespace(causal_chunk_frames=chunk)))

    speed = stream_report.paired_speed({"a": (gen("a", 1.0, 2), "p", 1, 1.0), "b": (gen("b", 2.0, 0), "p", 1, 1.0)}, train_frames=8, calls=4)
    firsts = [c for c in calls if c[2]]
    assert [c[0] for c in firsts] == ["a", "b"] * 5  # the warm-up, then 4 rounds
    assert [(c[0], c[1]) for c in calls if not c[2]] == [("a", 32), ("b", 8)] * 3  # a stream 4x long; a whole clip 1x
    # "b" is called right after "a" in each round, when the machine is 1.5x slower: 2 x 1.5 = 3x "a"'s time
    assert speed["b"]["first_chunk_seconds"] / speed["a"]["first_chunk_seconds"] == pytest.approx(3.0)
    assert speed["a"]["fps"] > 0 and speed["b"]["fps"] > 0
