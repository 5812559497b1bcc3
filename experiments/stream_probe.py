"""Probes of a streaming run on the free-colour toy world: does a stream keep its colour, and can D see a change?

    # the demo's validation split (N = 128, prompts and seeds disjoint from the report's): attribute accuracy,
    # distance and colour kept (and shape, direction) on the first window and the window ending a 4x-long video, one line
    # per checkpoint
    python experiments/stream_probe.py drift assets/demo_stream_colour_distilled runs/demo-stream/apt/checkpoints/step-000100
    python experiments/stream_probe.py drift runs/demo-stream/apt/checkpoints/step-000100 --weights generator  # raw G, not EMA
    python experiments/stream_probe.py drift assets/demo_stream_colour_distilled --cache-layout 2 1  # another split of its cache
    python experiments/stream_probe.py drift runs/demo-stream/apt/checkpoints/step-000100 --split report -n 2048  # the report's draw
    # (its prompts, seeds and 128-frame videos: the first 512 are the demo table's)
    python experiments/stream_probe.py drift runs/demo-stream/apt/checkpoints/step-000100 --starts 0 2 4 8 16 24  # where it falls
    python experiments/stream_probe.py drift runs/demo-stream/apt/checkpoints/step-000100 --first-steps 4  # a sharper first chunk
    python experiments/stream_probe.py drift assets/demo_stream_colour_teacher --cache-layout 3 0 --steps 25 --cfg 3  # the teacher
    # streams whose first chunk is a real clip's (the cache written as teacher forcing would): how often each later
    # window still shows that colour. Separates "keeps a colour it is shown" from "commits to a colour"
    python experiments/stream_probe.py follow assets/demo_stream_colour_teacher --steps 25 --cfg 3
    # teacher forcing at inference: every chunk recycles the real clip's previous chunk (against the above: is the
    # drift the model's own errors read back, i.e. exposure bias?)
    python experiments/stream_probe.py follow assets/demo_stream_colour_distilled --every-chunk
    # D of a stream_apt checkpoint on real 16-frame clips and on the same clips with the object recoloured from
    # frame 8 on (a window boundary; --switch-at, --frames move it): per-chunk logits, how often the recoloured clip
    # scores lower after the change
    python experiments/stream_probe.py d-switch runs/demo-stream/apt/checkpoints/step-000100 --context stream
    # the streams themselves: a PNG per checkpoint (rows = validation streams, columns = frames) and, per stream,
    # the colour the classifier reads on each 8-frame window, so a change of colour can be seen and located
    python experiments/stream_probe.py frames assets/demo_stream_colour_distilled runs/demo-stream/apt --out runs/probe-frames

Everything is generated (toy world, shipped classifier); nothing is downloaded.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import sys
from pathlib import Path
from unittest import mock

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

CLASSIFIER = "assets/toy_classifier"


def first_chunk_with_steps(first_steps: int):
    """A patch of ``apt.streaming.stream_chunks`` (a context manager) under which one-step streams make their first
    chunk with ``first_steps`` Euler steps (a sharper start). The one-step chunks after it read the cache of the
    first step (t = 1), which holds the first chunk's keys exactly as a one-step stream writes them, so only the
    recycled first chunk differs."""
    import apt.streaming as streaming

    whole = streaming.stream_chunks

    @torch.no_grad()
    def chunks(net, z, text, *, steps=1, shift=1.0, negative=None, cfg_scale=1.0):
        if steps != 1:
            yield from whole(net, z, text, steps=steps, shift=shift, negative=negative, cfg_scale=cfg_scale)
            return
        cf, (_, _, T, H, W) = streaming.chunk_frames(net), z.shape
        first = streaming.ChunkStepper(net, text, height=H, width=W, steps=first_steps, shift=shift, negative=negative, cfg_scale=cfg_scale)
        prev, _ = first.step(z[:, :, :cf], torch.zeros_like(z[:, :, :cf]))
        yield prev
        rest = streaming.ChunkStepper(net, text, height=H, width=W, steps=1, shift=shift, negative=negative, cfg_scale=cfg_scale)
        rest.caches = first.caches[:1]
        for i in range(1, T // cf):
            prev, _ = rest.step(z[:, :, i * cf : (i + 1) * cf], prev)
            yield prev

    return mock.patch.object(streaming, "stream_chunks", chunks)


def drift(checkpoints: list[str], n: int, weights: str | None = None, cache_layout: tuple[int, int] | None = None,
          split: str = "validation", steps: int = 1, cfg: float = 1.0, starts: tuple[int, ...] = (0, 24),
          first_steps: int = 1, frames: int | None = None) -> list[dict]:
    from apt.toy.stream_demo import VALIDATION_DRAW, validation_windows
    from apt.toy.stream_report import LENGTHS, REAL_SEED, REPORT_NOISE_SEED, REPORT_PROMPT_SEED

    draw = VALIDATION_DRAW if split == "validation" else (REPORT_PROMPT_SEED, REPORT_NOISE_SEED, REAL_SEED)
    # The report's draw is its videos: a seed's noise depends on the video's length, so they are made as long as the
    # report's (16x); the first 512 then give the demo table's windows.
    if split == "report":
        if frames not in (None, max(LENGTHS) * 8):
            raise ValueError(f"--split report makes the report's {max(LENGTHS) * 8}-frame videos; --frames {frames} would draw other noise")
        frames = max(LENGTHS) * 8
    with first_chunk_with_steps(first_steps) if first_steps != 1 else contextlib.nullcontext():
        scored = validation_windows(checkpoints, train_frames=8, n=n, classifier_path=CLASSIFIER, world="free-colour",
                                    starts=list(starts), weights=weights, cache_layout=cache_layout, draw=draw, steps=steps, cfg_scale=cfg,
                                    frames=frames)
    out = []
    for ckpt, windows in zip(checkpoints, scored):
        print(ckpt, split, " | ".join(f"frames {w['first_frame']}-{w['first_frame'] + 7}: distance {w['distance']:.1f}, accuracy "
                                      f"{w['attribute_accuracy']:.3f}, colour kept {w['per_attribute']['colour_kept']:.2f}"
                                      f" (shape {w['per_attribute']['shape']:.2f}, direction {w['per_attribute']['direction']:.2f})"
                                      for w in windows), flush=True)
        out.append({"checkpoint": ckpt, "windows": windows})
    return out


def follow(checkpoint: str, steps: int, cfg: float, n: int, frames: int = 32, every_chunk: bool = False) -> dict:
    from apt.data.shards import pixels_to_tensor
    from apt.inference import load_generator
    from apt.streaming import ChunkStepper, chunk_frames
    from apt.toy.classifier import load_toy_classifier
    from apt.toy.long_world import make_long_sample
    from apt.toy.metrics import features_and_predictions

    classifier, g = load_toy_classifier(CLASSIFIER), load_generator(checkpoint)
    samples = [make_long_sample(i, seed=5, frames=frames if every_chunk else 8, free_colour=True) for i in range(n)]
    real = pixels_to_tensor(np.stack([s["pixels"] for s in samples]))
    colours = [s["attributes"].colour for s in samples]
    text = g.text_encoder.encode([s["caption"] for s in samples])
    negative = g.text_encoder.encode([g.config.flow.negative_prompt] * n, allow_empty=True) if cfg != 1.0 else None
    cf, (_, C, _, H, W) = chunk_frames(g.net), real.shape
    z = torch.randn(n, C, frames, H, W, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        stepper = ChunkStepper(g.net, text, height=H, width=W, steps=steps, shift=g.config.flow.sample_shift, negative=negative, cfg_scale=cfg)
        prev, chunks = torch.zeros_like(z[:, :, :cf]), []
        for i in range(frames // cf):
            if i == 0:  # the real chunk; every step level caches it noised to its own t, as teacher forcing shows it
                x = real[:, :, :cf]
                for k in range(steps):
                    t = stepper.ts[k]
                    stepper.velocity((1 - t) * x + t * z[:, :, :cf], k, prev)
            else:
                x, _ = stepper.step(z[:, :, i * cf : (i + 1) * cf], prev)
            chunks.append(x)
            prev = real[:, :, i * cf : (i + 1) * cf] if every_chunk else x  # teacher forcing at inference: the real chunk recycled
    video = torch.cat(chunks, dim=2)
    kept = {}
    for s in range(0, frames - 7, 4):
        predicted = features_and_predictions(classifier, [video[:, :, s : s + 8]], 64)[1]["colour"]
        kept[s] = round(float(np.mean([p == c for p, c in zip(predicted, colours)])), 2)
    context = "every chunk recycles the real clip's previous chunk" if every_chunk else "the first chunk is the real clip's"
    print(f"{checkpoint} ({steps} steps, CFG {cfg}, N = {n}; {context}): share of 8-frame windows showing the real clip's colour, by first frame: {kept}")
    return {"checkpoint": checkpoint, "steps": steps, "cfg": cfg, "every_chunk": every_chunk, "kept_by_first_frame": kept}


def stream_frames(checkpoints: list[str], out: str, n: int, frames: int = 32) -> list[dict]:
    from apt.inference import load_generator
    from apt.media import grid_image, save_png, to_uint8
    from apt.toy.classifier import load_toy_classifier
    from apt.toy.metrics import features_and_predictions
    from apt.toy.stream_demo import validation_split

    classifier = load_toy_classifier(CLASSIFIER)
    prompts, seeds = validation_split(n, train_frames=8, world="free-colour")  # the drift probe's first n
    result = []
    for i, ckpt in enumerate(checkpoints):
        x = load_generator(ckpt).generate_tensor(prompts, seeds, steps=1, cfg_scale=1.0, frames=frames)
        path = Path(out) / f"{i:02d}-{Path(ckpt).name}.png"
        save_png(grid_image(to_uint8(x), scale=3), path)
        starts = list(range(0, frames - 7, 8))
        colours = [features_and_predictions(classifier, [x[:, :, s : s + 8]], 64)[1]["colour"] for s in starts]
        by_stream = [[c[k] for c in colours] for k in range(n)]
        print(f"{ckpt} -> {path}: colour by 8-frame window (first frames {starts}), one stream per row")
        for prompt, seq in zip(prompts, by_stream):
            print(f"  {' '.join(f'{c:<8}' for c in seq)}  {prompt}")
        result.append({"checkpoint": ckpt, "png": str(path), "window_starts": starts, "colours": by_stream})
    return result


def d_switch(checkpoint: str, context: str, n: int, frames: int = 16, switch_at: int = 8) -> list[dict]:
    from safetensors.torch import load_file

    from apt.config import config_from_yaml
    from apt.data.shards import pixels_to_tensor
    from apt.inference import resolve_checkpoint
    from apt.methods.streaming import ChunkDiscriminator
    from apt.models import factory
    from apt.text import TextEncoder
    from apt.toy.long_world import free_colour_caption, render_long_clip
    from apt.toy.world import COLOURS, sample_attributes

    ckpt = resolve_checkpoint(checkpoint)
    c = config_from_yaml(ckpt / "config.yaml")
    encoder = TextEncoder.load(c.text.encoder, max_length=c.text.max_length)
    backbone = factory.build_backbone(c, text_dim=encoder.dim)
    D = ChunkDiscriminator(backbone, fractions=list(c.apt.readout_fractions), num_heads=backbone.config.num_heads,
                           timestep_shift=c.apt.d_timestep_shift, window_frames=8, context=context)
    D.load_state_dict(load_file(str(ckpt / "discriminator.safetensors")))
    D.eval()
    cf = D.chunk_frames
    if frames % cf or switch_at % cf or not 0 < switch_at < frames:
        raise ValueError(f"--frames {frames} and --switch-at {switch_at} must be multiples of the {cf}-frame chunk, 0 < switch-at < frames")
    real, switched, captions = [], [], []
    for i in range(n):
        rng = np.random.default_rng([9, i, 0x10])
        attrs = sample_attributes(rng, frames)
        state = rng.bit_generator.state
        clip = render_long_clip(attrs, rng, frames)
        rng.bit_generator.state = state  # the same clip (motion, background, distractor draws) in another colour
        other = render_long_clip(dataclasses.replace(attrs, colour=[k for k in COLOURS if k != attrs.colour][i % (len(COLOURS) - 1)]), rng, frames)
        recoloured = clip.copy()
        recoloured[switch_at:] = other[switch_at:]
        real.append(clip)
        switched.append(recoloured)
        captions.append(free_colour_caption(attrs))
    text = encoder.encode(captions)
    out = []
    for t in (0.0, 0.3):
        with torch.no_grad():
            d_real, d_switched = (D(pixels_to_tensor(np.stack(v)), torch.full((n,), t), text) for v in (real, switched))
        after = switch_at // cf
        lower = (d_switched[:, after:].mean(1) < d_real[:, after:].mean(1)).float().mean()
        print(f"{checkpoint} (D context {context}, t = {t}, N = {n}): mean logit per chunk, real {d_real.mean(0).numpy().round(2)}, "
              f"recoloured from frame {switch_at} {d_switched.mean(0).numpy().round(2)}; recoloured scored lower on frames "
              f"{switch_at}-{frames - 1} in {lower:.2f}")
        out.append({"t": t, "real": d_real, "recoloured": d_switched, "recoloured_lower": float(lower)})
    return out


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="probe", required=True)
    a = sub.add_parser("drift", help="validation drift of checkpoints (one-step, or a teacher with --steps / --cfg)")
    a.add_argument("checkpoints", nargs="+")
    a.add_argument("-n", type=int, default=128)
    a.add_argument("--weights", help="a checkpoint's weight file other than the product (e.g. generator: the raw G, not its EMA)")
    a.add_argument("--cache-layout", type=int, nargs=2, metavar=("SINK", "WINDOW"),
                   help="stream with another split of the cache (sink chunks, window chunks; same sum as the run's)")
    a.add_argument("--split", choices=["validation", "report"], default="validation",
                   help="the prompts and seeds: the demo's validation split, or its report's (not for choosing anything)")
    a.add_argument("--steps", type=int, default=1, help="sampling steps per chunk (a causal teacher: e.g. 25)")
    a.add_argument("--cfg", type=float, default=1.0, help="classifier-free guidance (a causal teacher: e.g. 3)")
    a.add_argument("--starts", type=int, nargs="+", default=[0, 24],
                   help="first frames of the 8-frame windows scored (0 and 24: the first window and the one ending a 4x video; "
                        "a start past 24 makes the videos long enough for it)")
    a.add_argument("--first-steps", type=int, default=1, help="one-step streams: make the first chunk with this many Euler steps")
    a.add_argument("--frames", type=int, default=None,
                   help="the videos' length (default 32, or as long as --starts needs; e.g. 8 for a bidirectional teacher's "
                        "own clip length: it makes a whole clip at once)")
    b = sub.add_parser("follow", help="streams from a real first chunk")
    b.add_argument("checkpoint")
    b.add_argument("--steps", type=int, default=1)
    b.add_argument("--cfg", type=float, default=1.0)
    b.add_argument("-n", type=int, default=64)
    b.add_argument("--every-chunk", action="store_true",
                   help="teacher forcing at inference: every chunk recycles the real clip's previous chunk (one-step models)")
    d = sub.add_parser("d-switch", help="D on clips recoloured at a window boundary")
    d.add_argument("checkpoint")
    d.add_argument("--context", choices=["windows", "stream"], default="stream")
    d.add_argument("-n", type=int, default=64)
    d.add_argument("--frames", type=int, default=16, help="clip length")
    d.add_argument("--switch-at", type=int, default=8, help="first recoloured frame (8: the boundary of 8-frame windows)")
    f = sub.add_parser("frames", help="PNG grids of validation streams and their colour by window")
    f.add_argument("checkpoints", nargs="+")
    f.add_argument("--out", default="runs/probe-frames", help="folder for the PNGs")
    f.add_argument("-n", type=int, default=12, help="streams (rows)")
    f.add_argument("--frames", type=int, default=32)
    args = p.parse_args(argv)
    if args.probe == "drift":
        if args.first_steps != 1 and args.steps != 1:
            p.error("--first-steps is for one-step streams (--steps 1)")
        return drift(args.checkpoints, args.n, args.weights, None if args.cache_layout is None else tuple(args.cache_layout), args.split,
                     args.steps, args.cfg, tuple(args.starts), args.first_steps, args.frames)
    if args.probe == "frames":
        return stream_frames(args.checkpoints, args.out, args.n, args.frames)
    if args.probe == "follow":
        if args.every_chunk and args.steps != 1:
            p.error("--every-chunk needs a one-step model (--steps 1): a many-step model's cache holds its own trajectory")
        return [follow(args.checkpoint, args.steps, args.cfg, args.n, every_chunk=args.every_chunk)]
    return d_switch(args.checkpoint, args.context, args.n, args.frames, args.switch_at)


if __name__ == "__main__":
    main()
