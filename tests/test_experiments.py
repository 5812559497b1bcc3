"""The demo-tuning diagnostics in experiments/ (docs/log/demo_tuning.md), each run on tiny or shipped checkpoints.

Their own marker tier, ``experiments``: ``make test`` runs it with everything else, ``make test-fast`` leaves it out.
"""

import math

import numpy as np
import pytest
import torch
from eval_helpers import load_experiment

from apt.cli import main
from tests.conftest import apt_args, losses

pytestmark = pytest.mark.experiments


# ----------------------------------------------------------------- on the shipped teacher (assets/demo_teacher)


def test_toy_validate_script_ranks_the_teacher_above_its_one_step_mean() -> None:
    """experiments/toy_validate.py on the shipped teacher: 25 steps with CFG 2 score far better than one
    step (the blurry conditional mean), on the validation prompts that training logs."""
    validate = load_experiment("toy_validate")
    (one,) = validate.main(["assets/demo_teacher", "--num-samples", "32"])
    (full,) = validate.main(["assets/demo_teacher", "--num-samples", "32", "--steps", "25", "--cfg", "2"])
    assert full["steps"] == 25 and set(full["per_attribute"]) == {"shape", "colour", "direction", "background"}
    assert full["val_distance"] < one["val_distance"] / 2, (full, one)
    assert full["val_attribute_accuracy"] > one["val_attribute_accuracy"] + 0.2, (full, one)


def test_toy_gap_script_splits_the_distance() -> None:
    """experiments/toy_gap.py: mean + covariance terms add up to the distance; re-drawing only fixes misaligned
    samples (never adds any), and a model with nothing misaligned keeps its distance exactly."""
    gap = load_experiment("toy_gap")
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
    """experiments/toy_noise_scale.py: the wrapped network's one-step sample is s z - net(s z); scale 1 scores
    exactly what experiments/toy_validate.py scores; another scale changes the samples."""
    from apt.toy.report import NoiseScaled

    noise = load_experiment("toy_noise_scale")
    net = lambda x, t, text: 0.5 * x + t.view(-1, 1)  # noqa: E731 (any map of x)
    z, t = torch.randn(3, 4), torch.ones(3)
    torch.testing.assert_close(z - NoiseScaled(net, 0.7)(z, t, None), 0.7 * z - net(0.7 * z, t, None))
    validate = load_experiment("toy_validate")
    (plain,) = validate.main(["assets/demo_teacher", "--num-samples", "32"])
    rows = noise.main(["assets/demo_teacher", "--scales", "1.0", "0.5", "--val-samples", "32", "--report-samples", "32"])
    assert rows[0]["val_distance"] == plain["val_distance"] and rows[0]["val_attribute_accuracy"] == plain["val_attribute_accuracy"]
    assert rows[1]["val_distance"] != rows[0]["val_distance"] and rows[1]["report_distance"] != rows[0]["report_distance"]
    gap = load_experiment("toy_gap")
    (split,) = gap.main(["assets/demo_teacher", "--num-samples", "32", "--redraws", "0", "--noise-scale", "0.5"])
    assert split["noise_scale"] == 0.5 and split["distance"] == rows[1]["val_distance"]  # the same samples
    with pytest.raises(SystemExit):
        gap.main(["assets/demo_teacher", "--steps", "2", "--noise-scale", "0.5"])
    (report,) = gap.main(["assets/demo_teacher", "--num-samples", "32", "--redraws", "0", "--noise-scale", "0.5", "--split", "report"])
    assert report["split"] == "report" and report["distance"] == rows[1]["report_distance"]  # the report's prompts and seeds


def test_distill_levels_script_starts_at_the_one_step_generator() -> None:
    """experiments/distill_levels.py: row k = 0 is the student's one-step sample (what experiments/toy_validate.py scores);
    later rows start the student from the teacher's own trajectory, which on the shipped teacher (its
    one-step x_hat is the blurry conditional mean) is far better; k outside the grid is refused."""
    levels = load_experiment("distill_levels")
    rows = levels.main(["assets/demo_teacher", "assets/demo_teacher", "--steps", "4", "--cfg", "3", "--split", "validation", "--num-samples", "32"])
    assert [r["teacher_steps"] for r in rows] == [0, 1, 2, 3] and [r["t"] for r in rows] == [1.0, 0.75, 0.5, 0.25]
    (one,) = load_experiment("toy_validate").main(["assets/demo_teacher", "--num-samples", "32"])
    assert rows[0]["distance"] == one["val_distance"] and rows[0]["attribute_accuracy"] == one["val_attribute_accuracy"]
    # The report's split: the same prompts and seeds in both scripts, other ones than validation's.
    (report_row,) = levels.main(["assets/demo_teacher", "assets/demo_teacher", "--steps", "1", "--split", "report", "--num-samples", "32"])
    (report,) = load_experiment("toy_validate").main(["assets/demo_teacher", "--num-samples", "32", "--split", "report"])
    assert report["split"] == "report" and report["val_distance"] == report_row["distance"] != one["val_distance"]
    assert rows[3]["distance"] < rows[0]["distance"] / 2 and rows[3]["ambiguous_shape"] < rows[0]["ambiguous_shape"]
    from apt.inference import load_generator

    gen = load_generator("assets/demo_teacher")
    with pytest.raises(ValueError, match="k must be in"):
        levels.handoff_samples(gen, gen, ["a red circle moving left on a black background"], [0], k=4, steps=4, cfg_scale=3.0)


def test_d_probe_auc_and_cross_validated_linear_probe() -> None:
    """experiments/d_probe.py's AUC against a hand count (ties count half), and its linear probe: ~1 on a feature
    that separates the classes, ~0.5 on features that do not, None when a class is too small to split."""
    probe = load_experiment("d_probe")
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
    """experiments/toy_distance_vs_n.py: the fit recovers d_inf and k of an exact d_inf + k / N; the distance at the
    smallest N is the report split's distance (toy_validate --split report) of the same row; too few real
    clips for the floor is refused."""
    vs_n = load_experiment("toy_distance_vs_n")
    d_inf, k = vs_n.fit_limit([1000, 2000, 5000], [1.5 + 4000 / n for n in (1000, 2000, 5000)])
    assert d_inf == pytest.approx(1.5) and k == pytest.approx(4000)
    with pytest.raises(ValueError, match="needs 20 real clips"):
        vs_n.distances_by_n({"a": np.zeros((10, 2))}, np.zeros((19, 2)), [5, 10])
    rows = vs_n.main(["--teacher", "assets/demo_teacher", "--distilled", "assets/demo_teacher", "--apt", "assets/demo_teacher", "--sizes", "16", "32"])
    by_row = {r["row"]: r for r in rows}
    (report,) = load_experiment("toy_validate").main(["assets/demo_teacher", "--steps", "25", "--cfg", "3", "--split", "report", "--num-samples", "16"])
    assert by_row["teacher-25step-cfg"]["distance"][0] == pytest.approx(report["val_distance"], abs=0.01)
    assert by_row["real-vs-real floor"]["distance"][1] < by_row["real-vs-real floor"]["distance"][0]  # less bias at more samples
    bar = by_row["bar ratios"]
    assert bar["apt_over_teacher"][0] == pytest.approx(by_row["apt-1step"]["distance"][0] / by_row["teacher-25step-cfg"]["distance"][0], abs=1e-3)


# ----------------------------------------------------------------- on tiny runs of the demo chain


def test_batch1_timing_script_reports_both_modes_and_both_estimators(tiny_teacher):
    out = load_experiment("batch1_timing").main([str(tiny_teacher), str(tiny_teacher), "--repeats", "1", "--rounds", "1"])
    assert set(out["forward"]) == {"batch1_ms", "batch2_ms"} and all(v > 0 for m in out["forward"].values() for v in m.values())
    (speedup,) = out["measurements"][0]["speedups"].values()
    assert speedup["median_call"] > 1 and speedup["median_turn_mean"] > 1  # the teacher's 25 CFG steps vs one step


@pytest.fixture(scope="module")
def tiny_apt_run(tiny_teacher, tiny_distilled, toy_shards, tmp_path_factory):
    """One APT update of the tiny chain: a checkpoint with a discriminator to probe."""
    run = tmp_path_factory.mktemp("apt_probe")
    assert main(apt_args(run, toy_shards["video"], tiny_distilled, tiny_teacher, "train.max_steps=1")) == 0
    return run


def test_d_text_probe_scores_true_against_swapped_captions(tiny_apt_run):
    from apt.toy.world import parse_caption

    probe = load_experiment("d_text_probe")
    prompts = ["a red circle moving left on a black background", "a blue square moving up on a gray background"]
    for attribute in ("shape", "colour", "direction", "background"):
        for p, q in zip(prompts, probe.swapped_captions(prompts, attribute)):
            a, b = parse_caption(p).to_dict(), parse_caption(q).to_dict()
            assert [k for k in a if a[k] != b[k]] == [attribute], (p, q)
    rows = probe.main([str(tiny_apt_run), "--num-samples", "8"])
    assert [r["t"] for r in rows] == [0.05, 0.2, 0.4, 0.6, 0.8]
    for r in rows:
        assert 0.0 <= r["share_true_higher"] <= 1.0 and math.isfinite(r["d_true_caption"]) and math.isfinite(r["d_swapped_caption"]), r


def test_d_probe_splits_the_samples_logits_by_what_they_show(tiny_apt_run):
    """experiments/d_probe.py: the logit is the checkpoint's D averaged over the timesteps; each property's two group
    means recombine to the mean over all samples; the AUCs are probabilities."""
    from apt.inference import load_discriminator, load_generator
    from apt.toy.report import generate_seeded
    from apt.toy.world import eval_prompts

    probe = load_experiment("d_probe")
    row = probe.main([str(tiny_apt_run), "--num-samples", "24", "--num-real", "12", "--timesteps", "0.3", "0.7"])
    D, text_encoder = load_discriminator(tiny_apt_run)
    gen = load_generator(tiny_apt_run)
    prompts = eval_prompts(24, seed=777, frames=gen.num_frames)
    x = generate_seeded(gen, prompts, [50_000 + i for i in range(24)], steps=1)
    with torch.no_grad():
        logits = torch.stack([D(x, torch.full((24,), t), text_encoder.encode(prompts)) for t in (0.3, 0.7)]).mean(0)
    assert row["d_fake"] == pytest.approx(logits.mean().item(), abs=2e-3)
    shares = {"ambiguous_shape": row["ambiguous_shape"], "distractor_visible": 1 - row["distractor_visible"], "misaligned": row["misaligned"]}
    for name, share in shares.items():
        more, less = row["d_fake_by"][name]["more_real"], row["d_fake_by"][name]["less_real"]
        recombined = (more or 0.0) * (1 - share) + (less or 0.0) * share
        assert recombined == pytest.approx(row["d_fake"], abs=2e-3), (name, row)
        assert row["auc_logit"][name] is None or 0.0 <= row["auc_logit"][name] <= 1.0
        assert len(row["auc_logit_per_t"][name]) == 2


def test_ablations_script_trains_each_variant_with_its_one_change(tiny_teacher, tiny_distilled, toy_shards, tmp_path):
    from apt.config import load_config

    ablations = load_experiment("ablations")
    out = tmp_path / "ablations"
    results = ablations.main(["--distilled", str(tiny_distilled), "--teacher", str(tiny_teacher), "--shards", toy_shards["video"],
                              "--out", str(out), "--steps", "2", "--num-samples", "16", "--overlay", "tiny"])
    assert [r["variant"] for r in results] == list(ablations.VARIANTS)
    changed = {"full": {}, "aR1_off": {"use_r1": False}, "heads_at_last_layer_only": {"readout_fractions": [1.0]},
               "D_backbone_frozen": {"train_d_backbone": False}}
    for name, change in changed.items():
        a = load_config(str(out / name / "config.yaml")).apt
        assert (a.use_r1, list(a.readout_fractions), a.train_d_backbone) == (
            change.get("use_r1", True), change.get("readout_fractions", [16 / 36, 26 / 36, 1.0]), change.get("train_d_backbone", True)), name
        d_losses = losses(out / name, "loss_d")
        assert len(d_losses) == a.d_warmup_steps + 2, name  # every iteration logged: D-only warm-up + 2 generator updates
    for r in results:
        assert math.isfinite(r["distance"]) and 0.0 <= r["attribute_accuracy"] <= 1.0 and math.isfinite(r["d_gap_last20"]), r
    assert (out / "ablations.md").read_text().count("\n|") == len(results) + 1


# ----------------------------------------------------------------- streaming (free-colour world, shipped causal models)


def test_stream_probe_follow_and_drift_on_the_shipped_generator() -> None:
    """experiments/stream_probe.py: a stream started from a real chunk keeps that colour far above chance (1/7) at
    first, and the validation drift reports colour kept 1.0 on the first window (its own reference)."""
    probe = load_experiment("stream_probe")
    (follow,) = probe.main(["follow", "assets/demo_stream_colour_distilled", "-n", "32"])
    kept = follow["kept_by_first_frame"]
    assert sorted(kept) == list(range(0, 25, 4)) and all(0.0 <= v <= 1.0 for v in kept.values())
    assert kept[0] > 0.5, kept
    (every,) = probe.main(["follow", "assets/demo_stream_colour_distilled", "-n", "32", "--every-chunk"])
    assert every["every_chunk"] and every["kept_by_first_frame"][24] > kept[24] + 0.2  # fed real chunks, it keeps the colour
    (drift,) = probe.main(["drift", "assets/demo_stream_colour_distilled", "-n", "16"])
    first, late = drift["windows"]
    assert (first["first_frame"], late["first_frame"]) == (0, 24) and first["per_attribute"]["colour_kept"] == 1.0
    with pytest.raises(FileNotFoundError, match="generator.safetensors"):  # --weights reaches the loader: this folder has net_ema only
        probe.main(["drift", "assets/demo_stream_colour_distilled", "-n", "16", "--weights", "generator"])
    (report,) = probe.main(["drift", "assets/demo_stream_colour_distilled", "-n", "16", "--split", "report"])
    assert report["windows"][0]["distance"] != first["distance"]  # the report's draw of prompts and seeds, not validation's
    with pytest.raises(ValueError, match="makes the report's 128-frame videos; --frames 32 would draw other noise"):
        probe.main(["drift", "assets/demo_stream_colour_distilled", "-n", "16", "--split", "report", "--frames", "32"])
    (short,) = probe.main(["drift", "assets/demo_stream_colour_distilled", "-n", "16", "--frames", "8", "--starts", "0"])
    assert [w["first_frame"] for w in short["windows"]] == [0]  # 8-frame videos: other noise than the 32-frame ones
    with pytest.raises(ValueError, match="videos of 8 frames hold no 8-frame window starting at frame 24"):
        probe.main(["drift", "assets/demo_stream_colour_distilled", "-n", "16", "--frames", "8"])
    (split,) = probe.main(["drift", "assets/demo_stream_colour_distilled", "-n", "16", "--cache-layout", "2", "1"])
    same = split["windows"][0]  # the first window fits the cache: any split of it is the same function
    assert same["per_attribute"] == first["per_attribute"] and same["distance"] == pytest.approx(first["distance"], abs=0.05)
    with pytest.raises(ValueError, match="sink_chunks \\+ window_chunks = 3"):
        probe.main(["drift", "assets/demo_stream_colour_distilled", "-n", "16", "--cache-layout", "1", "1"])
    # --steps / --cfg: the causal teacher's sampler (a multi-step model's drift); its first window beats one step
    (teacher,) = probe.main(["drift", "assets/demo_stream_colour_teacher", "-n", "16", "--steps", "4", "--cfg", "3"])
    (one_step,) = probe.main(["drift", "assets/demo_stream_colour_teacher", "-n", "16"])
    assert teacher["windows"][0]["distance"] < one_step["windows"][0]["distance"], (teacher, one_step)
    (by_window,) = probe.main(["drift", "assets/demo_stream_colour_distilled", "-n", "16", "--starts", "0", "8", "24"])
    assert [w["first_frame"] for w in by_window["windows"]] == [0, 8, 24] and by_window["windows"][0] == first
    (longer,) = probe.main(["drift", "assets/demo_stream_colour_distilled", "-n", "16", "--starts", "0", "56"])  # 64-frame videos
    assert [w["first_frame"] for w in longer["windows"]] == [0, 56] and 0 <= longer["windows"][1]["attribute_accuracy"] <= 1
    (sharper,) = probe.main(["drift", "assets/demo_stream_colour_distilled", "-n", "16", "--first-steps", "4"])  # only the start differs
    assert sharper["windows"][0]["distance"] != first["distance"]
    with pytest.raises(SystemExit):
        probe.main(["drift", "assets/demo_stream_colour_teacher", "-n", "16", "--steps", "4", "--first-steps", "2"])


def test_stream_probe_frames_writes_a_grid_and_colours_by_window(tmp_path) -> None:
    """frames: one PNG per checkpoint, a row per stream and a column per frame; one colour per 8-frame window."""
    from PIL import Image

    probe = load_experiment("stream_probe")
    (r,) = probe.main(["frames", "assets/demo_stream_colour_distilled", "--out", str(tmp_path), "-n", "3", "--frames", "16"])
    assert r["window_starts"] == [0, 8] and len(r["colours"]) == 3 and all(len(c) == 2 for c in r["colours"])
    width, height = Image.open(r["png"]).size
    assert (width, height) == (2 + 16 * (16 * 3 + 2), 2 + 3 * (16 * 3 + 2))


def test_stream_probe_d_switch_is_causal(tmp_path) -> None:
    """d-switch on a D built from the shipped causal teacher (heads untrained): the recolouring starts at frame 8, so
    the logits of chunks 0-3 are the real clip's in both contexts; the streamed D's later chunks see the change."""
    import shutil

    from safetensors.torch import save_file

    from apt.config import config_from_yaml
    from apt.methods.streaming import ChunkDiscriminator
    from apt.models import factory
    from apt.text import TextEncoder

    shutil.copy("assets/demo_stream_colour_teacher/config.yaml", tmp_path / "config.yaml")
    c = config_from_yaml(tmp_path / "config.yaml")
    backbone = factory.load_backbone(c, "assets/demo_stream_colour_teacher", "net_ema", text_dim=TextEncoder.load(c.text.encoder, max_length=c.text.max_length).dim)
    torch.manual_seed(0)
    D = ChunkDiscriminator(backbone, fractions=list(c.apt.readout_fractions), num_heads=backbone.config.num_heads, window_frames=8)
    save_file({k: v.contiguous() for k, v in D.state_dict().items()}, str(tmp_path / "discriminator.safetensors"))
    probe = load_experiment("stream_probe")
    for context in ("windows", "stream"):
        for r in probe.main(["d-switch", str(tmp_path), "--context", context, "-n", "8"]):
            assert r["real"].shape == r["recoloured"].shape == (8, 8)
            torch.testing.assert_close(r["recoloured"][:, :4], r["real"][:, :4], rtol=0, atol=1e-5)
            assert (r["recoloured"][:, 4:] - r["real"][:, 4:]).abs().max() > 0
