"""Tiny end-to-end runs on CPU through the CLI: artifacts, step counts, exact resume, clear failures."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from apt.checkpoint import latest_checkpoint, list_checkpoints
from apt.cli import main
from apt.lit.checkpoint_io import SafetensorsCheckpointIO
from apt.methods.apt import SampleNoise
from tests.conftest import apt_args, fit_args, losses

pytestmark = pytest.mark.integration


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


def test_teacher_stage_starts_from_a_checkpoint(toy_shards, tmp_path, capsys):
    """model.init: the teacher stage fine-tunes a trained network (its net and EMA start from that net_ema); a missing
    init is refused before any work, a causal one by name when the network is built."""
    from apt.config import load_config
    from apt.lit.teacher import TeacherModule
    from tests.conftest import write_tiny_init

    (tmp_path / "init").mkdir(), (tmp_path / "causal").mkdir()
    init_dir = write_tiny_init(tmp_path / "init")  # weights moved 0.05 off the DiT's own init
    init = load_file(str(init_dir / "net_ema.safetensors"))
    module = TeacherModule(load_config("recipes/demo/teacher.yaml", ["tiny"], [f"model.init={init_dir}"]))
    for net in (module.net, module.net_ema):
        state = net.state_dict()
        assert state.keys() == init.keys() and all(torch.equal(state[k], init[k]) for k in init)
    scratch = TeacherModule(load_config("recipes/demo/teacher.yaml", ["tiny"], [])).net.state_dict()
    assert max((scratch[k] - init[k]).abs().max().item() for k in init) > 0.1
    video = [f"data.image_shards={toy_shards['image']}", "train.max_steps=1"]
    run = tmp_path / "tuned"
    assert main(fit_args("recipes/demo/teacher.yaml", run, toy_shards["video"], *video, f"model.init={init_dir}")) == 0
    tuned = load_file(str(latest_checkpoint(run) / "net.safetensors"))
    assert 0 < max((tuned[k] - init[k]).abs().max().item() for k in init) < 0.01  # one warm-up step away from the init
    assert main(fit_args("recipes/demo/teacher.yaml", tmp_path / "missing", toy_shards["video"], *video, f"model.init={tmp_path / 'nowhere'}")) == 2
    assert f"model.init: no weights at {tmp_path / 'nowhere'}" in capsys.readouterr().err
    causal = write_tiny_init(tmp_path / "causal", causal_chunk_frames=2, sink_chunks=1, window_chunks=2)
    with pytest.raises(ValueError, match=r"weights net_ema in .*causal do not fit model flavour 'tiny'"):
        TeacherModule(load_config("recipes/demo/teacher.yaml", ["tiny"], [f"model.init={causal}"]))


def test_teacher_accumulates_micro_batches_and_clips(toy_shards, tmp_path):
    """train.accumulate_grad_batches=2: each optimiser step consumes two batches (the checkpoint's data position
    says so); optim.grad_clip reaches Lightning's clipping (a tiny clip moves the weights less than none)."""
    from apt.checkpoint import STATE_FILE

    runs = {}
    for clip in ("0", "1e-9"):
        run = tmp_path / f"clip{clip}"
        assert main(fit_args("recipes/demo/teacher.yaml", run, toy_shards["video"], f"data.image_shards={toy_shards['image']}",
                         "train.accumulate_grad_batches=2", f"optim.grad_clip={clip}")) == 0
        state = torch.load(latest_checkpoint(run) / STATE_FILE, weights_only=False)
        assert state["global_step"] == 2 and state["apt"]["batches_consumed"] == 4  # a step: 2 x (video + image) batches
        runs[clip] = load_file(str(latest_checkpoint(run) / "net.safetensors"))
    assert any(not torch.equal(runs["0"][k], runs["1e-9"][k]) for k in runs["0"])  # the clip changed the updates (AdamW's eps)


def test_distillation_lr_follows_the_cosine_schedule(tiny_distilled):
    """recipes/demo/distill.yaml decays optim.lr on a cosine to 0 at train.max_steps (the tiny overlay: 2 steps)."""
    from apt.checkpoint import load_trainer_state
    from apt.config import config_from_yaml
    from apt.lit.base import lr_factor

    c = config_from_yaml(Path(tiny_distilled) / "config.yaml")
    assert c.optim.schedule == "cosine" and c.train.max_steps == 2
    for ckpt in list_checkpoints(tiny_distilled):
        step = int(ckpt.name.split("-")[1])
        lr = load_trainer_state(ckpt)["optimizer_states"][0]["param_groups"][0]["lr"]  # weights_only=True: no pickle
        assert lr == pytest.approx(c.optim.lr * lr_factor(step, c.optim.warmup_steps, c.train.max_steps, "cosine"))
    assert lr == pytest.approx(0.0, abs=1e-12)  # the last checkpoint: the schedule's end


def test_distill_then_apt_resume_identically(tiny_teacher, tiny_distilled, toy_shards, tmp_path, capfd):
    assert (latest_checkpoint(tiny_distilled) / "net_ema.safetensors").exists()
    full, part = tmp_path / "full", tmp_path / "part"
    v = toy_shards["video"]
    capfd.readouterr()
    assert main(apt_args(full, v, tiny_distilled, tiny_teacher, "train.max_steps=3")) == 0
    out, err = capfd.readouterr()  # the count the user asked for, not Lightning's optimiser steps of both networks (7)
    assert f"[apt] done: 3 generator updates (train.max_steps=3); checkpoints in {full / 'checkpoints'}" in err
    assert "`Trainer.fit` stopped" not in out + err
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


def without_key_bias(key: str, w: torch.Tensor) -> torch.Tensor:
    """A readout head's ``nn.MultiheadAttention`` input bias without its key third: softmax ignores a shift shared by
    every key, so the key bias's gradient is float noise, which Adam's first steps turn into moves of about the learning
    rate whose sign depends on summation order (seen here: up to 3e-5 apart between 1 batch of 4 and 2 of 2 on one
    machine, equal on another)."""
    if key.endswith("attn.in_proj_bias"):
        q, _, v = w.chunk(3)
        return torch.cat([q, v])
    return w


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
        assert all(torch.allclose(without_key_bias(k, wa[k]), without_key_bias(k, wb[k]), rtol=1e-4, atol=1e-5) for k in wa), name
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


def _step_metric_at_weights(m, batch, key: str, weights: tuple[float, ...], metric: str) -> tuple[dict, SampleNoise]:
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

    broken = dict(ckpt)
    broken["state_dict"] = dict(ckpt["state_dict"])
    broken["state_dict"]["net.zzz"] = object()  # fails while writing, after some files are on disk
    with pytest.raises(AttributeError):  # object() has no .detach()
        io.save_checkpoint(broken, target)
    after = load_file(str(target / "net.safetensors"))
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert latest_checkpoint(tmp_path) == target
    assert io.load_checkpoint(target)["apt"]["batches_consumed"] == ckpt["apt"]["batches_consumed"]


def test_demo_quick_writes_the_report_and_side_by_side(tmp_path):
    """`python -m apt demo --quick`: every stage at tiny size, then the four-row report and its bar."""
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
    bar = {x["line"]: x for x in report["bar"]}  # the bar's lines, checked on this run's figures
    assert len(bar) == 9 and all(isinstance(x["met"], bool) for x in bar.values())
    assert bar["apt-1step distance / teacher's"]["value"] == round(rows["apt-1step"]["distance"] / rows["teacher-25step-cfg"]["distance"], 4)
    assert bar["demo wall time, seconds"]["value"] == report["total_seconds"]
    stages = report["stage_seconds"]  # every stage ran in this run, then the evaluation
    assert list(stages) == ["teacher", "distill", "apt_image", "apt_video", "evaluation"] and all(v > 0 for v in stages.values())
    assert sum(stages.values()) <= report["total_seconds"] + 0.5  # rounding: each figure to 0.1 s
    assert main(["demo", "--quick", "--out", str(out)]) == 0  # again: every stage already done, only the evaluation runs
    again = json.loads((out / "report.json").read_text())
    assert again["stage_seconds"]["evaluation"] > 0 and all(again["stage_seconds"][k] is None for k in list(stages)[:-1])
    assert "demo wall time, seconds" not in {x["line"] for x in again["bar"]}  # the total timed the evaluation only
    assert again["rows"][2]["distance"] == report["rows"][2]["distance"]  # the same checkpoints, the same samples
    assert (out / "side_by_side.png").stat().st_size > 0 and (out / "side_by_side.gif").stat().st_size > 0
    from PIL import Image

    from apt.toy import side_by_side as sbs

    png = np.asarray(Image.open(out / "side_by_side.png"))
    tile = 16 * sbs.SCALE  # 8 prompts in 2 columns of 4 groups; 4 rows of 4 frames each
    group_w, group_h = sbs.LABEL_MIN_WIDTH + 4 * (tile + sbs.PAD), sbs.TITLE_HEIGHT + 4 * (tile + sbs.PAD)
    assert png.shape == (2 * sbs.GAP + 4 * group_h + 3 * sbs.GAP, 2 * sbs.GAP + 2 * group_w + sbs.GAP, 3)
    y, x = sbs.GAP + sbs.TITLE_HEIGHT, sbs.GAP + sbs.LABEL_MIN_WIDTH  # the first prompt's teacher clip, frame 1
    for by in range(0, tile, sbs.SCALE):
        for bx in range(0, tile, sbs.SCALE):  # every source pixel an 8x8 square of one colour
            block = png[y + by : y + by + sbs.SCALE, x + bx : x + bx + sbs.SCALE]
            assert (block == block[0, 0]).all()
