"""Tiny end-to-end runs on CPU through the CLI: artifacts, step counts, exact resume, clear failures."""

import csv
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from apt.checkpoint import latest_checkpoint, list_checkpoints
from apt.lit.checkpoint_io import SafetensorsCheckpointIO
from apt.cli import main
from tests.conftest import fit_args

pytestmark = pytest.mark.integration


def losses(run_dir, key) -> dict[int, float]:
    """{step: value} over every logger version of a run (a resumed run writes a new version)."""
    out = {}
    for f in sorted(Path(run_dir, "logs").glob("version_*/metrics.csv")):
        for row in csv.DictReader(open(f)):
            if row.get(key):
                out[int(row["step"])] = float(row[key])
    return out


def test_teacher_artifacts(tiny_teacher):
    run = Path(tiny_teacher)
    assert (run / "config.yaml").exists()
    ckpts = list_checkpoints(run)
    assert [p.name for p in ckpts] == ["step-000001", "step-000002"]
    for name in ("net.safetensors", "net_ema.safetensors", "trainer_state.pt", "config.yaml"):
        assert (ckpts[-1] / name).exists()
    assert not any(k.startswith("text_encoder") for k in load_file(str(ckpts[-1] / "net.safetensors")))
    assert len(losses(run, "loss")) == 2


def test_teacher_resume_continues_identically(toy_shards, tmp_path):
    common = [f"data.image_shards={toy_shards['image']}", "train.ckpt_every_steps=2"]
    full, part = tmp_path / "full", tmp_path / "part"
    assert main(fit_args("recipes/demo/teacher.yaml", full, toy_shards["video"], *common, "train.max_steps=4")) == 0
    assert main(fit_args("recipes/demo/teacher.yaml", part, toy_shards["video"], *common, "train.max_steps=2")) == 0
    # a fresh run refuses to overwrite a run that has checkpoints
    assert main(fit_args("recipes/demo/teacher.yaml", part, toy_shards["video"], *common, "train.max_steps=4")) == 2
    assert main(fit_args("recipes/demo/teacher.yaml", part, toy_shards["video"], *common, "train.max_steps=4", "resume=auto")) == 0
    a, b = losses(full, "loss"), losses(part, "loss")
    assert sorted(a) == sorted(b) == [0, 1, 2, 3]
    assert a == b
    wa = load_file(str(full / "checkpoints/step-000004/net_ema.safetensors"))
    wb = load_file(str(part / "checkpoints/step-000004/net_ema.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.fixture(scope="module")
def tiny_distilled(tiny_teacher, toy_shards, tmp_path_factory):
    run = tmp_path_factory.mktemp("distill")
    assert main(fit_args("recipes/demo/distill.yaml", run, toy_shards["video"], f"data.image_shards={toy_shards['image']}", f"distill.teacher={tiny_teacher}")) == 0
    return run


def test_distillation_lr_follows_the_cosine_schedule(tiny_distilled):
    """recipes/demo/distill.yaml decays optim.lr on a cosine to 0 at train.max_steps (the tiny overlay: 2 steps)."""
    from apt.checkpoint import STATE_FILE
    from apt.config import config_from_yaml
    from apt.lit.base import lr_factor

    c = config_from_yaml(Path(tiny_distilled) / "config.yaml")
    assert c.optim.schedule == "cosine" and c.train.max_steps == 2
    for ckpt in list_checkpoints(tiny_distilled):
        step = int(ckpt.name.split("-")[1])
        lr = torch.load(ckpt / STATE_FILE, weights_only=False)["optimizer_states"][0]["param_groups"][0]["lr"]
        assert lr == pytest.approx(c.optim.lr * lr_factor(step, c.optim.warmup_steps, c.train.max_steps, "cosine"))
    assert lr == pytest.approx(0.0, abs=1e-12)  # the last checkpoint: the schedule's end


def apt_args(run, shards, generator, teacher, *extra):
    return fit_args("recipes/demo/apt_video.yaml", run, shards, f"apt.generator={generator}", f"apt.teacher={teacher}", "apt.d_warmup_steps=1", *extra)


def test_distill_then_apt_resume_identically(tiny_teacher, tiny_distilled, toy_shards, tmp_path):
    assert (latest_checkpoint(tiny_distilled) / "net_ema.safetensors").exists()
    full, part = tmp_path / "full", tmp_path / "part"
    v = toy_shards["video"]
    assert main(apt_args(full, v, tiny_distilled, tiny_teacher, "train.max_steps=3")) == 0
    assert main(apt_args(part, v, tiny_distilled, tiny_teacher, "train.max_steps=2")) == 0
    assert main(apt_args(part, v, tiny_distilled, tiny_teacher, "train.max_steps=3", "resume=auto")) == 0
    # generator updates, not optimiser steps, name the checkpoints: warm-up (1 D step) + 3 x (D + G)
    assert [p.name for p in list_checkpoints(full)][-1] == "step-000003"
    for key in ("loss_d", "loss_g", "d_real", "d_fake", "r1", "grad_norm_d", "grad_norm_g"):
        a, b = losses(full, key), losses(part, key)
        assert a and a == b, key
    last = latest_checkpoint(full)
    for name in ("generator", "generator_ema", "discriminator"):
        wa, wb = load_file(str(last / f"{name}.safetensors")), load_file(str(latest_checkpoint(part) / f"{name}.safetensors"))
        assert all(torch.equal(wa[k], wb[k]) for k in wa), name


def test_apt_accumulation_on_the_trainer_path_equals_one_big_batch(tiny_teacher, tiny_distilled, toy_shards, tmp_path):
    """train.accumulate_grad_batches=2 micro-batches of 2 clips give the losses and weights of one batch of 4: the
    same 4 clips (the stream batches consecutive samples) and the same per-sample noise."""
    one, two = tmp_path / "one", tmp_path / "two"
    v = toy_shards["video"]
    assert main(apt_args(one, v, tiny_distilled, tiny_teacher, "train.max_steps=2", "data.batch_size=4")) == 0
    assert main(apt_args(two, v, tiny_distilled, tiny_teacher, "train.max_steps=2", "data.batch_size=2", "train.accumulate_grad_batches=2")) == 0
    for key in ("loss_d", "loss_g", "d_real", "d_fake", "r1"):
        a, b = losses(one, key), losses(two, key)
        assert a.keys() == b.keys() and a, key
        assert all(b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-6) for k in a), key
    for name in ("generator", "generator_ema", "discriminator"):
        wa, wb = (load_file(str(latest_checkpoint(r) / f"{name}.safetensors")) for r in (one, two))
        assert all(torch.allclose(wa[k], wb[k], rtol=1e-4, atol=1e-5) for k in wa), name
    state = torch.load(latest_checkpoint(two) / "trainer_state.pt", weights_only=False)
    assert state["apt"]["batches_consumed"] == 2 * 3  # warm-up + 2 updates, 2 micro-batches each


def test_apt_video_stage_starts_from_image_stage_ema(tiny_teacher, tiny_distilled, toy_shards, tmp_path):
    image_run = tmp_path / "image"
    assert main(fit_args("recipes/demo/apt_image.yaml", image_run, toy_shards["image"], f"apt.generator={tiny_distilled}", f"apt.teacher={tiny_teacher}", "apt.d_warmup_steps=0", "train.max_steps=1")) == 0
    from apt.config import load_config
    from apt.lit.apt import AptModule

    c = load_config("recipes/demo/apt_video.yaml", ["tiny"], [f"data.shards={toy_shards['video']}", f"apt.generator={image_run}", f"apt.teacher={tiny_teacher}"])
    m = AptModule(c)
    g_img = load_file(str(latest_checkpoint(image_run) / "generator_ema.safetensors"))
    teacher = load_file(str(latest_checkpoint(tiny_teacher) / "net_ema.safetensors"))
    assert all(torch.equal(m.generator.state_dict()[k], g_img[k]) for k in g_img)
    assert all(torch.equal(m.discriminator.backbone.state_dict()[k], teacher[k]) for k in teacher)


class _NoUpdate:
    """A NetUpdate that keeps the networks as they are: the step's losses can be recomputed by hand."""

    def zero_grad(self):
        pass

    def backward(self, loss):
        pass

    def step(self):
        return torch.zeros(())


def _step_metric_at_weights(m, batch, key: str, weights: tuple[float, ...], metric: str) -> tuple[dict, "SampleNoise"]:
    """`metric` of one apt_step (nothing updated) for each value of `apt.<key>`, all from the same rng state;
    also the step's noise streams, rewound to its start, to recompute its draws."""
    from apt.methods.apt import SampleNoise

    rng, out = m.rng.get_state(), {}
    for w in weights:
        setattr(m.config.apt, key, w)
        m.rng.set_state(rng)
        out[w] = m.run_step([batch], update_g=_NoUpdate(), update_d=_NoUpdate())[metric]
    m.rng.set_state(rng)
    return out, SampleNoise(int(torch.randint(0, 2**62, (1,), generator=m.rng)), range(batch["x"].shape[0]))


def test_mismatch_term_scores_real_clips_under_the_nearest_other_text(tiny_teacher, tiny_distilled, toy_shards):
    """apt.mismatch_weight adds w * mean softplus(D(x_real, t, nearest other text)) to the D loss, with the
    step's own timesteps; the paper's loss is unchanged at w = 0."""
    import torch.nn.functional as F

    from apt.config import load_config
    from apt.lit.apt import AptModule

    c = load_config("recipes/demo/apt_video.yaml", ["tiny"], [f"data.shards={toy_shards['video']}", f"apt.generator={tiny_distilled}",
                                                              f"apt.teacher={tiny_teacher}", "apt.d_warmup_steps=100"])
    m = AptModule(c)
    x = torch.rand(3, 3, c.data.frames, c.data.height, c.data.width) * 2 - 1
    batch = {"x": x, "caption": ["a red circle moving left on a black background", "a red square moving left on a black background",
                                 "a green triangle moving down on a white background"]}
    losses_d, noise = _step_metric_at_weights(m, batch, "mismatch_weight", (0.0, 2.0), "loss_d")
    noise.randn(x.shape[1:], "cpu")  # the fakes' z, drawn before the timesteps
    t = noise.timesteps(m.discriminator, "cpu")
    text = m.encode(batch["caption"])
    with torch.no_grad():
        mismatched = m.discriminator(x, t, text.nearest_other())
    torch.testing.assert_close(text.nearest_other().emb_BLD[:2], text.emb_BLD[[1, 0]])  # circle <-> square
    torch.testing.assert_close(losses_d[2.0] - losses_d[0.0], 2.0 * F.softplus(mismatched).mean(), rtol=1e-5, atol=1e-6)


def test_text_contrast_term_adds_the_logit_gap_to_the_g_loss(tiny_teacher, tiny_distilled, toy_shards):
    """apt.text_contrast_weight adds w * mean softplus(D(G(z), t, nearest other text) - D(G(z), t, text)) to the
    G loss, on the G step's own z and t; the G loss is unchanged at w = 0."""
    import torch.nn.functional as F

    from apt.config import load_config
    from apt.lit.apt import AptModule
    from apt.methods.apt import one_step

    c = load_config("recipes/demo/apt_video.yaml", ["tiny"], [f"data.shards={toy_shards['video']}", f"apt.generator={tiny_distilled}",
                                                              f"apt.teacher={tiny_teacher}", "apt.d_warmup_steps=0", "apt.mismatch_weight=1.0"])
    m = AptModule(c)
    x = torch.rand(2, 3, c.data.frames, c.data.height, c.data.width) * 2 - 1
    batch = {"x": x, "caption": ["a red circle moving left on a black background", "a red square moving left on a black background"]}
    losses_g, noise = _step_metric_at_weights(m, batch, "text_contrast_weight", (0.0, 3.0), "loss_g")
    noise.randn(x.shape[1:], "cpu"), noise.timesteps(m.discriminator, "cpu"), noise.randn(x.shape[1:], "cpu")  # the D step's draws
    text = m.encode(batch["caption"])
    with torch.no_grad():
        x_fake = one_step(m.generator, noise.randn(x.shape[1:], "cpu"), text)
        t = noise.timesteps(m.discriminator, "cpu")
        gap = m.discriminator(x_fake, t, text.nearest_other()) - m.discriminator(x_fake, t, text)
    torch.testing.assert_close(losses_g[3.0] - losses_g[0.0], 3.0 * F.softplus(gap).mean(), rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def tiny_apt_run(tiny_teacher, tiny_distilled, toy_shards, tmp_path_factory):
    """One APT update of the tiny chain: a checkpoint with a discriminator to probe."""
    run = tmp_path_factory.mktemp("apt_probe")
    assert main(apt_args(run, toy_shards["video"], tiny_distilled, tiny_teacher, "train.max_steps=1")) == 0
    return run


def test_d_text_probe_scores_true_against_swapped_captions(tiny_apt_run):
    from eval_helpers import load_eval_script

    from apt.data.toy import parse_caption

    probe = load_eval_script("d_text_probe")
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
    """eval/d_probe.py: the logit is the checkpoint's D averaged over the timesteps; each property's two group
    means recombine to the mean over all samples; the AUCs are probabilities."""
    from eval_helpers import load_eval_script

    from apt.data.toy import eval_prompts
    from apt.eval.toy_report import generate_seeded
    from apt.inference import load_discriminator, load_generator

    probe = load_eval_script("d_probe")
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
    from eval_helpers import load_eval_script

    from apt.config import load_config

    ablations = load_eval_script("ablations")
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


def test_nan_input_fails_clearly_without_checkpoint(tiny_teacher, toy_shards, tmp_path, capsys):
    bad = tmp_path / "bad_teacher"
    bad.mkdir()
    src = latest_checkpoint(tiny_teacher)
    w = load_file(str(src / "net_ema.safetensors"))
    w = {k: torch.full_like(v, float("nan")) if "patch_embed.weight" in k else v for k, v in w.items()}
    save_file(w, str(bad / "net_ema.safetensors"))
    run = tmp_path / "run"
    rc = main(fit_args("recipes/demo/distill.yaml", run, toy_shards["video"], f"data.image_shards={toy_shards['image']}", f"distill.teacher={bad}"))
    assert rc == 1
    assert "not finite" in capsys.readouterr().err
    assert list_checkpoints(run) == []


def test_sample_command_writes_media(tiny_distilled, tmp_path):
    out = tmp_path / "samples"
    assert main(["sample", str(tiny_distilled), "--prompt", "a red circle moving left on a black background", "--prompt", "a blue square moving up on a gray background", "--steps", "2", "--out", str(out)]) == 0
    names = sorted(p.name for p in out.iterdir())
    assert "grid.png" in names and any(n.endswith(".gif") for n in names)
    assert main(["sample", str(tiny_distilled), "--prompt", "a red circle on a black background", "--frames", "1", "--out", str(out / "img")]) == 0
    assert [p.suffix for p in (out / "img").iterdir()] == [".png"]


def test_interrupted_save_leaves_previous_checkpoint(tiny_teacher, tmp_path):
    io = SafetensorsCheckpointIO()
    src = latest_checkpoint(tiny_teacher)
    ckpt = io.load_checkpoint(src)
    target = tmp_path / "checkpoints" / "step-000001"
    io.save_checkpoint(dict(ckpt), target)
    before = load_file(str(target / "net.safetensors"))

    class Boom(Exception):
        pass

    broken = dict(ckpt)
    broken["state_dict"] = dict(ckpt["state_dict"])
    broken["state_dict"]["net.zzz"] = object()  # fails while writing, after some files are on disk
    with pytest.raises(Exception):
        io.save_checkpoint(broken, target)
    after = load_file(str(target / "net.safetensors"))
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert latest_checkpoint(tmp_path) == target
    assert io.load_checkpoint(target)["apt"]["batches_consumed"] == ckpt["apt"]["batches_consumed"]


def test_demo_quick_writes_the_report_and_side_by_side(tmp_path):
    """`python -m apt demo --quick`: every stage at tiny size, then the four-row report of issue 3's format."""
    import json

    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    rows = {r["name"]: r for r in report["rows"]}
    assert list(rows) == ["teacher-25step-cfg", "distilled-1step", "apt-1step", "apt-2step"]
    assert [rows[n]["nfe"] for n in rows] == [4, 1, 1, 2]  # the tiny overlay's teacher: 2 steps with CFG
    for r in rows.values():
        assert {"distance", "attribute_accuracy", "seconds_per_sample", "seconds_per_sample_batched"} <= set(r)
        assert math.isfinite(r["distance"]) and 0 <= r["attribute_accuracy"] <= 1 and r["seconds_per_sample"] > 0
    assert rows["teacher-25step-cfg"]["speedup_batch1"] == 1.0 == rows["teacher-25step-cfg"]["speedup_batch1_with_text"]
    assert report["text_encode_seconds"] > 0
    for r in list(rows.values())[1:]:  # a cost added to every row pulls each speed-up toward 1
        assert min(1.0, r["speedup_batch1"]) <= r["speedup_batch1_with_text"] <= max(1.0, r["speedup_batch1"])
    assert report["real_vs_real_floor"] > 0 and report["num_samples"] == 64
    assert report["apt_checkpoint"] in [str(p) for p in list_checkpoints(out / "apt_video")]
    bar = {x["line"]: x for x in report["bar"]}  # issue 3's lines, checked on this run's figures
    assert len(bar) == 9 and all(isinstance(x["met"], bool) for x in bar.values())
    assert bar["apt-1step distance / teacher's"]["value"] == round(rows["apt-1step"]["distance"] / rows["teacher-25step-cfg"]["distance"], 4)
    assert bar["demo wall time, seconds"]["value"] == report["total_seconds"]
    stages = report["stage_seconds"]  # every stage ran in this run, then the evaluation
    assert list(stages) == ["teacher", "distill", "apt_image", "apt_video", "evaluation"] and all(v > 0 for v in stages.values())
    assert sum(stages.values()) <= report["total_seconds"] + 0.5  # rounding: each figure to 0.1 s
    assert main(["demo", "--quick", "--out", str(out)]) == 0  # again: every stage already done, only the evaluation runs
    again = json.loads((out / "report.json").read_text())
    assert again["stage_seconds"]["evaluation"] > 0 and all(again["stage_seconds"][k] is None for k in list(stages)[:-1])
    assert again["rows"][2]["distance"] == report["rows"][2]["distance"]  # the same checkpoints, the same samples
    assert (out / "side_by_side.png").stat().st_size > 0 and (out / "side_by_side.gif").stat().st_size > 0
