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


def test_toy_validate_script_ranks_the_teacher_above_its_one_step_mean() -> None:
    """eval/toy_validate.py on the shipped teacher: 25 steps with CFG 2 score far better than one
    step (the blurry conditional mean), on the validation prompts that training logs."""
    from eval_helpers import load_eval_script

    validate = load_eval_script("toy_validate")
    (one,) = validate.main(["assets/demo_teacher", "--num-samples", "32"])
    (full,) = validate.main(["assets/demo_teacher", "--num-samples", "32", "--steps", "25", "--cfg", "2"])
    assert full["steps"] == 25 and set(full["per_attribute"]) == {"shape", "colour", "direction", "background"}
    assert full["val_distance"] < one["val_distance"] / 2, (full, one)
    assert full["val_attribute_accuracy"] > one["val_attribute_accuracy"] + 0.2, (full, one)


def test_correct_mask_is_per_sample_and_skips_unset_attributes() -> None:
    prompts = ["a red circle on a black background", "a blue square on a gray background"]  # images: no direction
    preds = {"shape": ["circle", "circle"], "colour": ["red", "blue"], "direction": ["left", "up"], "background": ["black", "gray"]}
    ok, per_attribute = toy_metrics.correct_mask(preds, prompts)
    assert ok.tolist() == [True, False]
    assert per_attribute == {"shape": 0.5, "colour": 1.0, "background": 1.0}


def test_toy_gap_script_splits_the_distance() -> None:
    """eval/toy_gap.py: mean + covariance terms add up to the distance; re-drawing only fixes misaligned
    samples (never adds any), and a model with nothing misaligned keeps its distance exactly."""
    from eval_helpers import load_eval_script

    gap = load_eval_script("toy_gap")
    (one,) = gap.main(["assets/demo_teacher", "--num-samples", "32", "--redraws", "3"])
    assert one["floor"] > 0 and one["mean_term"] + one["cov_term"] == pytest.approx(one["distance"], abs=0.02)
    assert 0 < one["attribute_accuracy"] < 1
    assert one["still_misaligned"] < 1 - one["attribute_accuracy"], one
    (full,) = gap.main(["assets/demo_teacher", "--num-samples", "32", "--steps", "25", "--cfg", "3", "--redraws", "3"])
    assert full["attribute_accuracy"] == 1.0 and full["still_misaligned"] == 0 and full["aligned_distance"] == full["distance"], full
    assert full["distance"] < one["distance"]
    # The one-step conditional mean is a blur: no high frequencies, no distractor, shapes between classes.
    assert one["high_frequency_share"] < full["high_frequency_share"] / 2 < one["real_high_frequency_share"]
    assert one["distractor_visible"] < full["distractor_visible"] < one["real_distractor_visible"]
    assert one["ambiguous_shape"] > 0.5 > one["real_ambiguous_shape"] == full["real_ambiguous_shape"]
    assert one["still_unconfident"] < one["ambiguous_shape"] and one["confident_distance"] < one["distance"]


def test_toy_noise_scale_script_samples_from_scaled_noise() -> None:
    """eval/toy_noise_scale.py: the wrapped network's one-step sample is s z - net(s z); scale 1 scores
    exactly what eval/toy_validate.py scores; another scale changes the samples."""
    from eval_helpers import load_eval_script

    from apt.toy.report import NoiseScaled

    noise = load_eval_script("toy_noise_scale")
    net = lambda x, t, text: 0.5 * x + t.view(-1, 1)  # noqa: E731 (any map of x)
    z, t = torch.randn(3, 4), torch.ones(3)
    torch.testing.assert_close(z - NoiseScaled(net, 0.7)(z, t, None), 0.7 * z - net(0.7 * z, t, None))
    validate = load_eval_script("toy_validate")
    (plain,) = validate.main(["assets/demo_teacher", "--num-samples", "32"])
    rows = noise.main(["assets/demo_teacher", "--scales", "1.0", "0.5", "--val-samples", "32", "--report-samples", "32"])
    assert rows[0]["val_distance"] == plain["val_distance"] and rows[0]["val_attribute_accuracy"] == plain["val_attribute_accuracy"]
    assert rows[1]["val_distance"] != rows[0]["val_distance"] and rows[1]["report_distance"] != rows[0]["report_distance"]
    gap = load_eval_script("toy_gap")
    (split,) = gap.main(["assets/demo_teacher", "--num-samples", "32", "--redraws", "0", "--noise-scale", "0.5"])
    assert split["noise_scale"] == 0.5 and split["distance"] == rows[1]["val_distance"]  # the same samples
    with pytest.raises(SystemExit):
        gap.main(["assets/demo_teacher", "--steps", "2", "--noise-scale", "0.5"])
    (report,) = gap.main(["assets/demo_teacher", "--num-samples", "32", "--redraws", "0", "--noise-scale", "0.5", "--split", "report"])
    assert report["split"] == "report" and report["distance"] == rows[1]["report_distance"]  # the report's prompts and seeds


def test_distill_levels_script_starts_at_the_one_step_generator() -> None:
    """eval/distill_levels.py: row k = 0 is the student's one-step sample (what eval/toy_validate.py scores);
    later rows start the student from the teacher's own trajectory, which on the shipped teacher (its
    one-step x_hat is the blurry conditional mean) is far better; k outside the grid is refused."""
    from eval_helpers import load_eval_script

    levels = load_eval_script("distill_levels")
    rows = levels.main(["assets/demo_teacher", "assets/demo_teacher", "--steps", "4", "--cfg", "3", "--split", "validation", "--num-samples", "32"])
    assert [r["teacher_steps"] for r in rows] == [0, 1, 2, 3] and [r["t"] for r in rows] == [1.0, 0.75, 0.5, 0.25]
    (one,) = load_eval_script("toy_validate").main(["assets/demo_teacher", "--num-samples", "32"])
    assert rows[0]["distance"] == one["val_distance"] and rows[0]["attribute_accuracy"] == one["val_attribute_accuracy"]
    # The report's split: the same prompts and seeds in both scripts, other ones than validation's.
    (report_row,) = levels.main(["assets/demo_teacher", "assets/demo_teacher", "--steps", "1", "--split", "report", "--num-samples", "32"])
    (report,) = load_eval_script("toy_validate").main(["assets/demo_teacher", "--num-samples", "32", "--split", "report"])
    assert report["split"] == "report" and report["val_distance"] == report_row["distance"] != one["val_distance"]
    assert rows[3]["distance"] < rows[0]["distance"] / 2 and rows[3]["ambiguous_shape"] < rows[0]["ambiguous_shape"]
    from apt.inference import load_generator

    gen = load_generator("assets/demo_teacher")
    with pytest.raises(ValueError, match="k must be in"):
        levels.handoff_samples(gen, gen, ["a red circle moving left on a black background"], [0], k=4, steps=4, cfg_scale=3.0)


def test_d_probe_auc_and_cross_validated_linear_probe() -> None:
    """eval/d_probe.py's AUC against a hand count (ties count half), and its linear probe: ~1 on a feature
    that separates the classes, ~0.5 on features that do not, None when a class is too small to split."""
    from eval_helpers import load_eval_script

    probe = load_eval_script("d_probe")
    scores, positive = np.array([0.1, 0.4, 0.4, 0.9]), np.array([False, True, False, True])
    # pairs (positive, negative): (0.4, 0.1) win, (0.4, 0.4) tie, (0.9, 0.1) win, (0.9, 0.4) win -> 3.5 / 4
    assert probe.auc(scores, positive) == pytest.approx(0.875)
    assert probe.auc(scores, np.zeros(4, dtype=bool)) is None
    g = torch.Generator().manual_seed(0)
    labels = torch.rand(400, generator=g) < 0.3
    noise = torch.randn(400, 8, generator=g)
    separable = noise.clone()
    separable[:, 3] += 4.0 * labels
    assert probe.probe_auc(separable, labels.numpy()) > 0.97
    assert abs(probe.probe_auc(noise, labels.numpy()) - 0.5) < 0.1
    assert probe.probe_auc(noise[:20], np.arange(20) < 3) is None


def test_distance_vs_n_fits_the_limit_and_starts_at_the_report_set() -> None:
    """eval/toy_distance_vs_n.py: the fit recovers d_inf and k of an exact d_inf + k / N; the distance at the
    smallest N is the report split's distance (toy_validate --split report) of the same row; too few real
    clips for the floor is refused."""
    from eval_helpers import load_eval_script

    vs_n = load_eval_script("toy_distance_vs_n")
    d_inf, k = vs_n.fit_limit([1000, 2000, 5000], [1.5 + 4000 / n for n in (1000, 2000, 5000)])
    assert d_inf == pytest.approx(1.5) and k == pytest.approx(4000)
    with pytest.raises(ValueError, match="needs 20 real clips"):
        vs_n.distances_by_n({"a": np.zeros((10, 2))}, np.zeros((19, 2)), [5, 10])
    rows = vs_n.main(["--teacher", "assets/demo_teacher", "--distilled", "assets/demo_teacher", "--apt", "assets/demo_teacher", "--sizes", "16", "32"])
    by_row = {r["row"]: r for r in rows}
    (report,) = load_eval_script("toy_validate").main(["assets/demo_teacher", "--steps", "25", "--cfg", "3", "--split", "report", "--num-samples", "16"])
    assert by_row["teacher-25step-cfg"]["distance"][0] == pytest.approx(report["val_distance"], abs=0.01)
    assert by_row["real-vs-real floor"]["distance"][1] < by_row["real-vs-real floor"]["distance"][0]  # less bias at more samples
    bar = by_row["bar ratios"]
    assert bar["apt_over_teacher"][0] == pytest.approx(by_row["apt-1step"]["distance"][0] / by_row["teacher-25step-cfg"]["distance"][0], abs=1e-3)
