"""Streaming end to end at tiny size: AAPT's three stages through the CLI (the streaming demo's --quick chain),
its report and bar, ``python -m apt stream`` with a prompt switch, and the streaming session."""

from __future__ import annotations

import json

import pytest
import torch

from apt.checkpoint import latest_checkpoint
from apt.cli import main
from apt.inference import load_generator
from apt.streaming import StreamSession

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def stream_demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo-stream")
    assert main(["demo", "--stream", "--quick", "--out", str(out)]) == 0
    return out


def test_stream_demo_quick_writes_the_report(stream_demo):
    report = json.loads((stream_demo / "report.json").read_text())
    names = [r["name"] for r in report["rows"]]
    assert names == ["teacher-forced-1step", "student-forced-1step", "causal-teacher"]  # no whole-clip APT run in a fresh folder
    for r in report["rows"]:
        for k in (1, 4, 16) if r["name"] != "causal-teacher" else (1, 4):  # the teacher's quality is measured to 4x
            assert 0 <= r[f"attribute_accuracy_{k}x"] <= 1 and r[f"distance_{k}x"] > 0
        assert r["first_chunk_seconds"] > 0 and r["fps"] > 0 and r["peak_bytes_16x"] > 0
    assert len(report["drift"]["student-forced-1step"]) == 16  # every 8-frame window of a 128-frame video
    assert [x["line"].split(" ")[0] for x in report["bar"]][:2] == ["student-forced", "student-forced"]
    assert report["whole_clip_seconds"] > 0 and "total_seconds" in report
    assert "round-robin" in report["timing"]  # every row's speed, and the whole clip's, timed in one loop
    ours = report["rows"][1]
    assert report["rows"][2]["attribute_accuracy_16x"] is None
    assert [r["num_samples"] for r in report["rows"]] == [16, 16, 8]  # the slow teacher on the first 8 of the 16 videos
    assert [r["nfe_per_chunk"] for r in report["rows"]] == [2, 2, 2 * 2 + 1]  # a clean cache's re-encode counts one more
    assert ours["peak_bytes_16x"] <= 1.1 * ours["peak_bytes_1x"]  # the rolling cache: memory does not grow with length
    for stage in ("teacher", "distill", "apt"):
        assert latest_checkpoint(stream_demo / stage) is not None
    assert (latest_checkpoint(stream_demo / "apt") / "discriminator.safetensors").exists()
    # the free-colour world's distribution matching scores with a bidirectional teacher (--quick: its own tiny one)
    from safetensors.torch import load_file

    from apt.config import config_from_yaml

    stage = config_from_yaml(stream_demo / "apt" / "config.yaml")
    assert stage.stream.dmd_teacher == str(stream_demo / "bidirectional")
    # ... on a chain with a clean cache, its stage with the clean_stream overlay (the cache split 2 + 1, D on windows)
    assert config_from_yaml(stream_demo / "teacher" / "config.yaml").model.clean_context and stage.model.clean_context
    assert (stage.model.sink_chunks, stage.model.window_chunks, stage.stream.d_context) == (2, 1, "windows")
    fake = load_file(str(latest_checkpoint(stream_demo / "apt") / "fake_score.safetensors"))
    assert fake.keys() == load_file(str(latest_checkpoint(stream_demo / "bidirectional") / "net_ema.safetensors")).keys()
    assert not any(k.startswith("recycle_embed") for k in fake)  # a bidirectional DiT, not the causal teacher


def test_a_run_streams_with_another_split_of_its_cache(stream_demo):
    teacher = stream_demo / "teacher"
    trained = load_generator(teacher)
    assert (trained.config.model.sink_chunks, trained.config.model.window_chunks) == (1, 2)
    other = load_generator(teacher, cache_layout=(2, 1))
    assert (other.net.config.sink_chunks, other.net.config.window_chunks) == (2, 1)
    assert torch.equal(other.net.final_proj.weight, trained.net.final_proj.weight)
    with pytest.raises(ValueError, match=r"cache layout \(2, 2\).*sink_chunks \+ window_chunks = 3"):
        load_generator(teacher, cache_layout=(2, 2))
    with pytest.raises(ValueError, match="causal"):
        load_generator(stream_demo / "bidirectional", cache_layout=(2, 1))


def test_stream_command_writes_frames_as_they_come_and_switches_prompts(stream_demo, tmp_path, capsys):
    out = tmp_path / "stream"
    assert main(["stream", str(stream_demo / "apt"), "--prompt", "a red circle moving left on a black background",
                 "--prompt", "a blue square moving up on a gray background", "--switch-at", "9", "--frames", "19", "--out", str(out)]) == 0
    assert sorted(p.name for p in (out / "frames").glob("*.png")) == [f"{i:06d}.png" for i in range(19)]
    assert (out / "stream.gif").exists()
    from apt.eval.video_io import read_video

    assert read_video(str(out / "stream.mp4")).shape[0] == 19  # written frame by frame as the PNGs
    printed = capsys.readouterr().out
    assert "latency to the first frame" in printed and "frames per second" in printed
    assert "19 frames (10 chunks)" in printed  # 2-frame chunks, counted across the prompt switch
    assert main(["stream", str(stream_demo / "apt"), "--prompt", "a red circle moving left on a black background", "--prompt", "x",
                 "--frames", "4", "--out", str(out)]) == 2  # a second prompt needs its --switch-at
    other = tmp_path / "other-split"
    assert main(["stream", str(stream_demo / "apt"), "--prompt", "a red circle moving left on a black background", "--frames", "12",
                 "--cache-layout", "1", "2", "--out", str(other)]) == 0
    assert len(list((other / "frames").glob("*.png"))) == 12
    assert main(["stream", str(stream_demo / "apt"), "--prompt", "a red circle moving left on a black background", "--frames", "4",
                 "--cache-layout", "3", "3", "--out", str(other)]) == 2
    assert "cache layout (3, 3)" in capsys.readouterr().err


def test_stream_to_dir_long_streams_progress_and_frame_size(stream_demo, tmp_path, monkeypatch, capsys):
    """Past GIF_MAX_FRAMES no GIF is held (memory stays flat however long the stream), progress lines come every
    progress_every seconds, the mp4 plays at --fps, and only small frames are enlarged for viewing."""
    import apt.sample
    from apt.eval.video_io import read_video, video_info
    from apt.media import display_scale
    from apt.sample import stream_to_dir

    monkeypatch.setattr(apt.sample, "GIF_MAX_FRAMES", 6)
    prompt = ["a red circle moving left on a black background"]
    r = stream_to_dir(str(stream_demo / "apt"), prompt, frames=7, switch_at=[], seed=0, out=str(tmp_path / "a"), fps=12, progress_every=1e-9)
    assert r["gif"] is None and not (tmp_path / "a" / "stream.gif").exists()
    assert read_video(str(tmp_path / "a" / "stream.mp4")).shape[0] == 7 and video_info(str(tmp_path / "a" / "stream.mp4")).fps == 12.0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[stream]")]
    assert len(lines) == 4 and lines[-1].startswith("[stream] 7/7 frames")  # one per 2-frame chunk
    r = stream_to_dir(str(stream_demo / "apt"), prompt, frames=6, switch_at=[], seed=0, out=str(tmp_path / "b"), progress_every=0)
    assert r["gif"] == str(tmp_path / "b" / "stream.gif") and (tmp_path / "b" / "stream.gif").exists()
    assert "[stream]" not in capsys.readouterr().out
    assert r["frame_shape"] == [128, 128, 3]  # 16 x 16 toy frames, enlarged 8x
    assert (display_scale(16, 16, target=128), display_scale(480, 832, target=128), display_scale(60, 104, target=128)) == (8, 1, 1)
    with pytest.raises(ValueError, match="--fps must be > 0"):
        stream_to_dir(str(stream_demo / "apt"), prompt, frames=2, switch_at=[], seed=0, out=str(tmp_path / "c"), fps=0)


def test_the_guides_api_example_runs(stream_demo, tmp_path, monkeypatch):
    """docs/streaming.md's Python example, as printed, on the quick chain's run: 64 frames into an mp4."""
    import re
    from pathlib import Path

    from apt.eval.video_io import read_video

    guide = (Path(__file__).resolve().parents[1] / "docs" / "streaming.md").read_text()
    (example,) = re.findall(r"```python\n(from apt\.eval\.video_io import VideoStreamWriter\n.*?)```", guide, re.S)
    assert '"runs/demo-stream/apt"' in example
    monkeypatch.chdir(tmp_path)
    exec(example.replace('"runs/demo-stream/apt"', repr(str(stream_demo / "apt"))), {})
    assert read_video(str(tmp_path / "stream.mp4")).shape[0] == 64


def test_teacher_forced_stages_train_on_clips_longer_than_the_cache(stream_demo, tmp_path):
    """Causal adaptation and distillation on 16-frame clips with the cache split 2 + 1 (4 chunks): one forward per clip
    in which every chunk sees what a stream shows it (``apt.models.dit.RollingViews``)."""
    from apt.toy.stream_demo import ensure_long_shards
    from tests.conftest import losses

    shards = ensure_long_shards(True, ("rollout",))["rollout"]
    long_clips = [f"data.shards={shards}", "data.frames=16", "model.sink_chunks=2", "model.window_chunks=1", "train.max_steps=2",
                  "train.log_every_steps=1", "model.clean_context=true"]  # the quick chain's (free-colour world)
    for recipe, init in (("stream_teacher", f"stream.init={stream_demo / 'teacher'}"), ("stream_distill", f"distill.teacher={stream_demo / 'teacher'}")):
        run = tmp_path / recipe
        assert main(["fit", f"recipes/demo/{recipe}.yaml", "tiny", f"run_dir={run}", init, *long_clips]) == 0, recipe
        assert latest_checkpoint(run).name == "step-000002"
        logged = losses(run, "loss")
        assert len(logged) == 2 and all(0 < v < 10 for v in logged.values()), (recipe, logged)


@pytest.mark.experiments
def test_step_profile_times_the_parts_of_an_iteration(stream_demo, tmp_path):
    """experiments/step_profile.py: a short stream_apt fit with the parts of every iteration timed, then unwrapped."""
    import importlib.util

    import apt.methods.streaming as streaming
    from apt.toy.stream_demo import ensure_long_shards

    spec = importlib.util.spec_from_file_location("step_profile", "experiments/step_profile.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rollout = streaming.StudentForcing.__call__
    shards = ensure_long_shards(True, ("rollout",))["rollout"]
    rows = module.main(["recipes/demo/stream_apt.yaml", "tiny", "clean_stream", f"data.shards={shards}", f"apt.generator={stream_demo / 'distill'}",
                        f"apt.teacher={stream_demo / 'teacher'}", "apt.d_warmup_steps=1", "stream.dmd_weight=1.0", "train.max_steps=2",
                        f"run_dir={tmp_path / 'run'}"])
    step = rows["apt_step (one iteration)"]
    assert step["calls"] == 3  # one D-only warm-up iteration, then 2 updates
    assert rows["rollout"]["calls"] >= 3 and rows["teacher-forced streams (DMD)"]["calls"] > 0 and rows["backward"]["calls"] > 0
    assert 0 < rows["rollout"]["seconds"] < step["seconds"]
    assert streaming.StudentForcing.__call__ is rollout  # unwrapped after the fit


@pytest.mark.parametrize("scores", ["causal", "bidirectional"])
def test_stream_apt_with_distribution_matching_resumes_identically(scores, stream_demo, tmp_path):
    """stream.dmd_weight > 0: the fake score is saved (the frozen teacher is not) and a resumed run continues exactly,
    the fake score's weights and optimiser included; with the causal teacher's scores or a bidirectional teacher's
    (``stream.dmd_teacher``)."""
    from safetensors.torch import load_file

    from apt.toy.stream_demo import ensure_long_shards
    from tests.conftest import losses

    shards = ensure_long_shards(True, ("rollout",))["rollout"]
    common = ["fit", "recipes/demo/stream_apt.yaml", "tiny", "clean_stream", f"data.shards={shards}", f"apt.generator={stream_demo / 'distill'}",
              f"apt.teacher={stream_demo / 'teacher'}", "apt.d_warmup_steps=1", "stream.dmd_weight=1.0"]
    if scores == "bidirectional":
        common.append(f"stream.dmd_teacher={stream_demo / 'bidirectional'}")
    full, part = tmp_path / "full", tmp_path / "part"
    assert main([*common, f"run_dir={full}", "train.max_steps=3"]) == 0
    assert main([*common, f"run_dir={part}", "train.max_steps=2"]) == 0
    assert main([*common, f"run_dir={part}", "train.max_steps=3", "resume=auto"]) == 0
    last = latest_checkpoint(full)
    assert last.name == "step-000003" and (last / "fake_score.safetensors").exists() and not (last / "teacher.safetensors").exists()
    for key in ("loss_dmd", "loss_fake_score", "loss_g", "loss_d"):
        a, b = losses(full, key), losses(part, key)
        assert a and a == b, key
    for name in ("generator", "generator_ema", "discriminator", "fake_score"):
        wa, wb = load_file(str(last / f"{name}.safetensors")), load_file(str(latest_checkpoint(part) / f"{name}.safetensors"))
        assert all(torch.equal(wa[k], wb[k]) for k in wa), name


def test_distribution_matching_teacher_is_refused_clearly(stream_demo, tmp_path, capsys):
    """stream.dmd_teacher: a missing path is refused before any work, a causal checkpoint by name."""
    from apt.config import load_config
    from apt.lit.stream import StreamAptModule
    from apt.toy.stream_demo import ensure_long_shards

    shards = ensure_long_shards(True, ("rollout",))["rollout"]
    common = ["recipes/demo/stream_apt.yaml", "tiny", "clean_stream", f"data.shards={shards}", f"apt.generator={stream_demo / 'distill'}",
              f"apt.teacher={stream_demo / 'teacher'}", "apt.d_warmup_steps=1"]
    assert main(["fit", *common, f"run_dir={tmp_path / 'run'}", f"stream.dmd_teacher={tmp_path / 'nowhere'}"]) == 2
    assert f"stream.dmd_teacher: no weights at {tmp_path / 'nowhere'}" in capsys.readouterr().err
    assert not (tmp_path / "run" / "checkpoints").exists()
    with pytest.raises(ValueError, match=r"net_ema in .*teacher are a causal model .* a bidirectional checkpoint is needed here"):
        StreamAptModule(load_config(common[0], ["tiny", "clean_stream"], [*common[3:], f"stream.dmd_teacher={stream_demo / 'teacher'}"]))


def test_session_prompt_switch_rebuilds_the_cache(stream_demo):
    gen = load_generator(stream_demo / "apt")
    torch.manual_seed(0)
    with torch.no_grad():  # past the zero inits of a 2-step run, so that the prompt shows in the output
        for p in gen.net.parameters():
            p.normal_(0.0, 0.05)
    prompt, other = "a red circle moving left on a black background", "a blue square moving up on a gray background"

    def chunks(switch_to: str | None, n: int = 6, at: int = 3):
        s = StreamSession(gen, prompt, seed=5)
        out = []
        for i in range(n):
            if i == at and switch_to:
                s.set_prompt(switch_to)
            out.append(s.next_chunk())
        return out

    plain, same, switched = chunks(None), chunks(prompt), chunks(other)
    # Nothing has left the window at chunk 3 (sink 2 + window 1): a re-cache under the same prompt rebuilds the same cache.
    for a, b in zip(plain, same):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    assert all(torch.equal(a, b) for a, b in zip(plain[:3], switched[:3]))
    assert (plain[3] - switched[3]).abs().max() > 1e-4  # the new prompt from the next chunk on
    frames = list(StreamSession(gen, prompt, seed=5).frames(7))
    assert len(frames) == 7 and frames[0].shape == (3, 16, 16)
