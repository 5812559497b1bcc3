"""``python -m apt demo --stream``: streaming APT on the toy world, end to end on CPU.

long-clip shards -> causal teacher and teacher-forced one-step generator (shipped, made by
recipes/demo/stream_teacher.yaml and stream_distill.yaml) -> adversarial training with student forcing
(recipes/demo/stream_apt.yaml; in the free-colour world on a chain with a clean cache, ``model.clean_context`` and the
clean_stream overlay, with distribution matching scored by a shipped bidirectional teacher, ``stream.dmd_teacher``)
-> the streaming table and bar (``runs/demo-stream/report.json``, ``apt.toy.stream_report``). The student-forced
checkpoint is picked on a validation set (prompts and seeds disjoint from the report's) by the bar's measure: the
attribute accuracy of the window ending a video 4x the training length (ties: the nearer distance). The whole-clip APT
row comes from ``python -m apt demo`` when its report exists (``runs/demo/report.json``), or ``apt_whole``.
A finished stage is skipped, so an interrupted demo continues where it stopped.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import yaml

from apt.checkpoint import list_checkpoints
from apt.toy.demo import run_stage

WHOLE_CLIP_TEACHER = "assets/demo_teacher"
WORLDS = {
    # world: shipped causal teacher, shipped teacher-forced one-step generator, shards (path, frames, clips, seed); and
    # for the free-colour world a shipped bidirectional teacher of the distribution matching's scores (stream.dmd_teacher)
    # and a chain trained with a clean cache (model.clean_context; its adversarial stage adds the clean_stream overlay)
    "free-shape": {"teacher": "assets/demo_stream_free_teacher", "distilled": "assets/demo_stream_free_distilled",
                   "train": ("runs/data/toy-free-8f", 8, 20000, 2), "rollout": ("runs/data/toy-free-16f", 16, 10000, 3)},
    "free-colour": {"teacher": "assets/demo_stream_colour_clean_teacher", "distilled": "assets/demo_stream_colour_clean_distilled",
                    "score_teacher": "assets/demo_stream_colour_bidir_teacher", "clean_context": True,
                    "train": ("runs/data/toy-freecol-8f", 8, 20000, 2), "rollout": ("runs/data/toy-freecol-16f", 16, 10000, 3)},
    "long": {"teacher": "assets/demo_stream_teacher", "distilled": "assets/demo_stream_distilled",
             "train": ("runs/data/toy-long-8f", 8, 20000, 2), "rollout": ("runs/data/toy-long-16f", 16, 10000, 3)},
}
DEFAULT_WORLD = "free-colour"
"""The world whose captions leave the colour out, so a stream must keep it from its own context (docs/streaming.md)."""
VAL_PROMPT_SEED, VAL_NOISE_SEED = 4242, 40_000
REPORT_SAMPLES = 512
TEACHER_REPORT_SAMPLES = 128
VALIDATION_SAMPLES = 512
"""Videos per report row and per validation candidate: at 128 a row's accuracy has a standard error of about 4
points, the size of the gains the bar's first two lines measure; at 512 about 2 (docs/log/streaming.md). The causal
teacher's row (50 network evaluations per chunk, a quality reference outside the bar's accuracy lines) keeps 128."""


def ensure_long_shards(quick: bool, keys: tuple[str, ...], world: str = DEFAULT_WORLD) -> dict[str, str]:
    from apt.toy.shards import write_toy_shards

    out = {}
    for key in keys:
        path, frames, n, seed = WORLDS[world][key]
        if quick:
            path, n = path + "-quick", 128
        if not (Path(path) / "manifest.json").exists():
            print(f"[demo-stream] writing {n} {world}-world clips of {frames} frames to {path}")
            write_toy_shards(path, num_samples=n, frames=frames, seed=seed, world=world, progress=False)
        out[key] = path
    return out


VALIDATION_DRAW = (VAL_PROMPT_SEED, VAL_NOISE_SEED, VAL_PROMPT_SEED)
"""The validation split's seeds: (prompts, first noise seed, real clips of the distance's statistics)."""


def validation_split(n: int, *, train_frames: int, world: str = DEFAULT_WORLD, draw: tuple[int, int, int] = VALIDATION_DRAW) -> tuple[list[str], list[int]]:
    """The validation prompts (in ``world``'s captions) and noise seeds, disjoint from the report's."""
    from apt.toy.long_world import world_prompts
    from apt.toy.world import eval_prompts

    return world_prompts(eval_prompts(n, seed=draw[0], frames=train_frames), world), [draw[1] + i for i in range(n)]


def validation_windows(candidates: list, *, train_frames: int, n: int, classifier_path: str, world: str = DEFAULT_WORLD,
                       starts: list[int], weights: str | None = None, cache_layout: tuple[int, int] | None = None,
                       draw: tuple[int, int, int] = VALIDATION_DRAW, steps: int = 1, cfg_scale: float = 1.0,
                       frames: int | None = None) -> list[list[dict]]:
    """``window_metrics`` of each candidate's videos on the validation split (prompts and seeds disjoint from the
    report's), 4x the training length or as long as the last window of ``starts`` needs, for the windows starting
    there; ``weights``: which of a checkpoint's weight files (None = the product, e.g. generator_ema); ``cache_layout``:
    stream with another (sink, window) split (``apt.inference.load_generator``); ``draw``: another split's seeds (a probe's; e.g. the report's); ``steps`` and
    ``cfg_scale``: the sampler (one step, no guidance for a one-step generator; e.g. 25 and 3 for the causal teacher);
    ``frames``: the videos' length (a seed's noise depends on it: the report's windows come from its 16x-long videos)."""
    from apt.inference import load_generator
    from apt.toy.classifier import load_toy_classifier
    from apt.toy.drift import long_real_stats, window_metrics
    from apt.toy.stream_report import generate_videos

    classifier = load_toy_classifier(classifier_path)
    real = long_real_stats(classifier, frames=train_frames, n=n, seed=draw[2])
    prompts, seeds = validation_split(n, train_frames=train_frames, world=world, draw=draw)
    if frames is not None and frames < max(starts) + train_frames:
        raise ValueError(f"videos of {frames} frames hold no {train_frames}-frame window starting at frame {max(starts)}")
    out, frames = [], frames or max(4 * train_frames, max(starts) + train_frames)
    for ckpt in candidates:
        x = generate_videos(load_generator(ckpt, weights=weights, cache_layout=cache_layout), prompts, seeds, frames=frames, steps=steps,
                            cfg_scale=cfg_scale, batch=128)
        out.append(window_metrics(classifier, x, prompts, real, window_frames=train_frames, starts=starts))
    return out


def pick_checkpoint(candidates: list, *, train_frames: int, n: int, classifier_path: str, world: str = DEFAULT_WORLD) -> tuple[str, list[dict]]:
    """The candidate whose window at 4x the training length has the highest attribute accuracy (the bar's measure;
    ties: the nearer distance to the real windows), on the validation split."""
    selection = []
    for ckpt, (m,) in zip(candidates, validation_windows(candidates, train_frames=train_frames, n=n, classifier_path=classifier_path,
                                                         world=world, starts=[3 * train_frames])):
        selection.append({"checkpoint": str(ckpt), "val_distance_4x": m["distance"], "val_attribute_accuracy_4x": m["attribute_accuracy"]})
        print(f"[demo-stream] validation {ckpt}: distance {m['distance']:.2f}, attribute accuracy {m['attribute_accuracy']:.3f} at 4x", flush=True)
    return max(selection, key=lambda s: (s["val_attribute_accuracy_4x"], -s["val_distance_4x"]))["checkpoint"], selection


def check_folder_world(out_dir: Path, rollout_shards: str, world: str, score_teacher: str = "", clean_context: bool = False) -> None:
    """A finished stage is reused: refuse a folder whose adversarial stage trained on another world's clips, with
    other distribution-matching scores (``stream.dmd_teacher``; an earlier version of the demo used the causal teacher's),
    or on another chain (``model.clean_context``; earlier versions used the default cache)."""
    saved = out_dir / "apt" / "config.yaml"
    if not saved.exists():
        return
    config = yaml.safe_load(saved.read_text())
    used = (config.get("data") or {}).get("shards")
    if used and Path(used) != Path(rollout_shards):
        raise ValueError(f"{out_dir} holds a streaming demo trained on {used}, not on the {world} world's {rollout_shards}: "
                         "pass --out DIR for this world, or move that folder")
    scores = (config.get("stream") or {}).get("dmd_teacher") or ""
    if Path(scores or ".") != Path(score_teacher or "."):
        raise ValueError(f"{out_dir} holds a streaming demo whose distribution matching used {scores or 'the causal teacher'}, not "
                         f"{score_teacher or 'the causal teacher'}: pass --out DIR, or move that folder")
    clean = bool((config.get("model") or {}).get("clean_context"))
    if clean != clean_context:
        raise ValueError(f"{out_dir} holds a streaming demo trained with model.clean_context={str(clean).lower()}, not "
                         f"{str(clean_context).lower()} as the {world} world's chain is: pass --out DIR, or move that folder")


def whole_clip_checkpoint(apt_whole: str | None, *, quick: bool = False) -> str | None:
    """The bidirectional APT generator: ``apt_whole``, or the one ``python -m apt demo`` picked (runs/demo/report.json);
    none for ``--quick`` (its tiny models are not compared with the full demo's generator)."""
    if apt_whole or quick:
        return apt_whole
    report = Path("runs/demo/report.json")
    if report.exists():
        return json.loads(report.read_text()).get("apt_checkpoint")
    return None


def run_stream_demo(out: str | None = None, *, quick: bool = False, apt_whole: str | None = None, world: str = DEFAULT_WORLD) -> dict:
    """The streaming demo into ``out`` (default ``runs/demo-stream``, ``runs/demo-stream-long`` for the long world: a
    finished stage is reused, so each world keeps its own folder)."""
    from apt.config import config_from_yaml
    from apt.inference import load_generator, resolve_checkpoint
    from apt.toy.stream_report import (
        check_stream_bar,
        evaluate_stream_rows,
        print_stream_table,
    )

    t_start = time.perf_counter()
    out_dir = Path(out or ("runs/demo-stream" if world == DEFAULT_WORLD else f"runs/demo-stream-{world}"))
    overlays = ["tiny"] if quick else []
    stage_seconds: dict[str, float | None] = {}
    if world not in WORLDS:
        raise ValueError(f"unknown streaming world {world!r}; choose from {', '.join(WORLDS)}")
    teacher, distilled, score_teacher = WORLDS[world]["teacher"], WORLDS[world]["distilled"], WORLDS[world].get("score_teacher", "")
    clean = WORLDS[world].get("clean_context", False)
    chain = ["model.clean_context=true"] if clean else []  # the teacher-forced stages of --quick's own chain
    if quick:  # tiny models of our own through every stage (the shipped ones are the demo flavour)
        from apt.toy.demo import ensure_shards

        shards = {**ensure_long_shards(True, ("train", "rollout"), world), "video": ensure_shards(True)["video"]}
        bidirectional = str(run_stage("recipes/demo/teacher.yaml", out_dir / "bidirectional", [f"data.shards={shards['video']}", "data.image_shards=''"], overlays, stage_seconds))
        teacher = str(run_stage("recipes/demo/stream_teacher.yaml", out_dir / "teacher", [f"data.shards={shards['train']}", f"stream.init={bidirectional}", *chain],
                                overlays, stage_seconds))
        distilled = str(run_stage("recipes/demo/stream_distill.yaml", out_dir / "distill", [f"data.shards={shards['train']}", f"distill.teacher={teacher}", *chain],
                                  overlays, stage_seconds))
        score_teacher = bidirectional if score_teacher else ""
    else:
        for asset in (teacher, distilled, *([score_teacher] if score_teacher else [])):
            if not (Path(asset) / "net_ema.safetensors").exists():
                raise FileNotFoundError(f"shipped streaming asset missing: {asset}/net_ema.safetensors (made by recipes/demo/stream_*.yaml; {asset}/README.md)")
        shards = ensure_long_shards(False, ("rollout",), world)
    check_folder_world(out_dir, shards["rollout"], world, score_teacher, clean)
    quick_apt = ["apt.d_warmup_steps=1"] if quick else []
    scores = [f"stream.dmd_teacher={score_teacher}"] if score_teacher else []
    ours = run_stage("recipes/demo/stream_apt.yaml", out_dir / "apt", [f"apt.generator={distilled}", f"apt.teacher={teacher}", f"data.shards={shards['rollout']}",
                                                                        *scores, *quick_apt], overlays + (["clean_stream"] if clean else []), stage_seconds)
    train_seconds = time.perf_counter() - t_start

    # Every causal row streams with the stage's cache layout (the earlier stages train on clips that fit the cache, where
    # any split of it is the same function: apt.inference.load_generator).
    stage = config_from_yaml(resolve_checkpoint(ours) / "config.yaml").model
    layout = (stage.sink_chunks, stage.window_chunks)
    t_gen = load_generator(teacher, cache_layout=layout)
    train_frames = t_gen.config.data.frames
    best, selection = pick_checkpoint(list_checkpoints(ours), train_frames=train_frames, n=16 if quick else VALIDATION_SAMPLES,
                                      classifier_path=t_gen.config.eval.classifier or "assets/toy_classifier", world=world)
    rows = []
    whole = whole_clip_checkpoint(apt_whole, quick=quick)
    if whole:
        rows.append(("whole-clip-apt", load_generator(whole), 1, 1.0, 16, 16))
    rows += [("teacher-forced-1step", load_generator(distilled, cache_layout=layout), 1, 1.0, 128, 16),
             ("student-forced-1step", load_generator(best), 1, 1.0, 128, 16),
             # flow.sample_steps Euler steps with CFG per chunk: 50 network evaluations; 16x-long videos would take most of
             # the demo's time, so its quality is measured to 4x (its speed and memory at every length).
             ("causal-teacher", t_gen, t_gen.config.flow.sample_steps, t_gen.config.flow.cfg_scale, 128, 4)]
    # Without a whole-clip APT row, the bar's latency line needs the time of a whole training-length clip from the same
    # network at one step: the bidirectional teacher, timed beside the rows.
    ref = None if whole else load_generator(out_dir / "bidirectional" if quick else WHOLE_CLIP_TEACHER)
    report = evaluate_stream_rows(rows, out_dir=out_dir, num_samples=16 if quick else REPORT_SAMPLES, train_frames=train_frames,
                                  timing_calls=3 if quick else 20, world=world, row_samples={"causal-teacher": 8 if quick else TEACHER_REPORT_SAMPLES},
                                  whole_clip_reference=ref)
    if not whole:
        report["whole_clip_note"] = ("no whole-clip APT generator (run `python -m apt demo` first): its row is missing, and the time of a "
                                     "training-length clip made whole in one step is the bidirectional teacher's network at one step (same shapes)")
    report["stream_checkpoint"], report["stream_selection"] = best, selection
    report["train_seconds"] = round(train_seconds, 1)
    report["total_seconds"] = round(time.perf_counter() - t_start, 1)
    report["stage_seconds"] = {**stage_seconds, "evaluation": round(report["total_seconds"] - train_seconds, 1)}
    report["torch_threads"] = torch.get_num_threads()
    report["bar"] = check_stream_bar(report)
    (out_dir / "report.json").write_text(json.dumps(report, indent=1))
    print_stream_table(report)
    if report.get("whole_clip_note"):
        print(f"[demo-stream] {report['whole_clip_note']}")
    if quick:
        print("[demo-stream] --quick: tiny models trained for seconds, a smoke test of the chain; the bar above is for the full demo")
    print(f"[demo-stream] report: {out_dir / 'report.json'}; total {report['total_seconds']:.0f} s")
    return report
