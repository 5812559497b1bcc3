"""Toy metrics: Fréchet distance in classifier features, attribute accuracy, the shipped classifier."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from apt.toy import metrics as toy_metrics
from apt.toy import world
from apt.toy.classifier import (
    ToyClassifier,
    ToyClassifierConfig,
    load_toy_classifier,
    save_toy_classifier,
)

FRAMES = 8


def _random_classifier() -> ToyClassifier:
    """An untrained classifier with a small feature space: fast and enough for the arithmetic."""
    torch.manual_seed(0)
    return ToyClassifier(ToyClassifierConfig(feature_dim=32)).eval()


@pytest.fixture(scope="module")
def shipped() -> ToyClassifier:
    return load_toy_classifier()


@pytest.fixture(scope="module")
def real_set() -> tuple[torch.Tensor, list[str]]:
    xs, captions = zip(*toy_metrics.real_batches(FRAMES, n=200, seed=123, batch_size=100), strict=True)
    return torch.cat(xs), [c for cs in captions for c in cs]


def test_distance_to_itself_is_zero_and_batching_does_not_matter(real_set) -> None:
    clf = _random_classifier()
    x, prompts = real_set[0][:100], real_set[1][:100]
    stats = toy_metrics.real_stats(clf, FRAMES, n=100, seed=123, chunk=32)
    whole = toy_metrics.evaluate_samples(clf, x, prompts, stats, chunk=32)
    pieces = toy_metrics.evaluate_samples(clf, iter(x.split(7)), prompts, stats, chunk=32)
    assert whole == pieces
    assert abs(whole["distance"]) < 1e-6 and whole["n"] == 100


def test_real_stats_cache(tmp_path, real_set) -> None:
    clf = _random_classifier()
    path = str(tmp_path / "real.npz")
    a = toy_metrics.real_stats(clf, FRAMES, n=50, seed=1, cache_path=path)
    b = toy_metrics.real_stats(clf, FRAMES, n=50, seed=1, cache_path=path)
    assert np.array_equal(a.sum_DD, b.sum_DD) and a.sum_DD.dtype == np.float64
    with pytest.raises(ValueError, match="real.npz"):
        toy_metrics.real_stats(clf, FRAMES, n=60, seed=1, cache_path=path)


def test_prompt_count_must_match(real_set) -> None:
    clf = _random_classifier()
    x, prompts = real_set
    stats = toy_metrics.real_stats(clf, FRAMES, n=20, seed=1)
    with pytest.raises(ValueError, match="200 samples for 199 prompts"):
        toy_metrics.evaluate_samples(clf, x, prompts[:-1], stats)


def test_save_load_round_trip(tmp_path) -> None:
    clf = _random_classifier()
    save_toy_classifier(clf, str(tmp_path))
    x = torch.rand(2, 3, 1, 16, 16) * 2 - 1
    assert torch.equal(load_toy_classifier(str(tmp_path)).features(x), clf.features(x))
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_toy_classifier(str(tmp_path / "nowhere"))


def test_shipped_classifier_reads_real_clips(shipped: ToyClassifier, real_set) -> None:
    x, prompts = real_set
    stats = toy_metrics.real_stats(shipped, FRAMES, n=200, seed=123)
    right = toy_metrics.evaluate_samples(shipped, x, prompts, stats)
    assert right["attribute_accuracy"] >= 0.99
    assert set(right["per_attribute"]) == {"shape", "colour", "direction", "background"}
    shuffled = [prompts[i] for i in np.random.default_rng(0).permutation(len(prompts))]
    wrong = toy_metrics.evaluate_samples(shipped, x, shuffled, stats)
    assert wrong["attribute_accuracy"] < 0.1
    assert wrong["distance"] == pytest.approx(right["distance"])  # the distance ignores prompts


def test_shipped_classifier_on_images(shipped: ToyClassifier) -> None:
    x, prompts = next(toy_metrics.real_batches(1, n=100, seed=7, batch_size=100))
    stats = toy_metrics.real_stats(shipped, 1, n=100, seed=8)
    scores = toy_metrics.evaluate_samples(shipped, x, prompts, stats)
    assert scores["attribute_accuracy"] >= 0.97 and "direction" not in scores["per_attribute"]


@pytest.mark.filterwarnings("ignore:Matrix is singular")  # the blank set has zero covariance
def test_real_vs_real_floor_is_small_but_positive(shipped: ToyClassifier) -> None:
    floor = toy_metrics.real_vs_real_floor(shipped, FRAMES, n=200, seed=3)
    blank = toy_metrics.evaluate_samples(
        shipped,
        torch.full((200, 3, FRAMES, 16, 16), -1.0),
        world.eval_prompts(200, seed=0, frames=FRAMES),
        toy_metrics.real_stats(shipped, FRAMES, n=200, seed=3),
    )
    assert 0 < floor < blank["distance"] / 5


def test_correct_mask_is_per_sample_and_skips_unset_attributes() -> None:
    prompts = ["a red circle on a black background", "a blue square on a gray background"]  # images: no direction
    preds = {"shape": ["circle", "circle"], "colour": ["red", "blue"], "direction": ["left", "up"], "background": ["black", "gray"]}
    ok, per_attribute = toy_metrics.correct_mask(preds, prompts)
    assert ok.tolist() == [True, False]
    assert per_attribute == {"shape": 0.5, "colour": 1.0, "background": 1.0}

