"""Command line: ``python -m apt <verb> ...``.

    fit RECIPE [OVERLAY ...] [key=value ...] [--dry-run]   train any stage from a recipe
    sample CHECKPOINT --prompt TEXT [--steps N] [--out DIR] generate images/clips
    stream CHECKPOINT --prompt TEXT --frames N [--out DIR]  stream a causal run's video chunk by chunk
    demo [--quick] [--text-terms] [--stream]                teacher -> distill -> APT -> report (--stream: the streaming demo)
    export CHECKPOINT --out DIR [--transformer-only]        EMA generator -> a diffusers pipeline dir (prompt= works);
            [--lora | --merge]                              in-house networks: safetensors + target/kwargs; LoRA runs:
                                                            adapters for load_lora_weights, or --merge into a full model
    consolidate CHECKPOINT --out DIR                        sharded (DeepSpeed) checkpoint -> safetensors
"""

from __future__ import annotations

import argparse
import sys

from apt.config import ConfigError
from apt.errors import RunFailure
from apt.preemption import Preempted


def _split_fit_args(items: list[str]) -> tuple[list[str], list[str]]:
    overlays = [a for a in items if "=" not in a]
    overrides = [a for a in items if "=" in a]
    return overlays, overrides


def _flags_last(argv: list[str]) -> list[str]:
    """``fit``: ``--dry-run`` may come anywhere (argparse would stop collecting key=value pairs at it)."""
    if argv[:1] == ["fit"] and "--dry-run" in argv:
        return [a for a in argv if a != "--dry-run"] + ["--dry-run"]
    return argv


def resume_command(argv: list[str]) -> str:
    """The command that continues a stopped run: the same arguments with resume=auto."""
    import shlex

    args = [a for a in argv if not a.startswith("resume=")] + ["resume=auto"]
    return "python -m apt " + " ".join(shlex.quote(a) for a in args)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m apt", description="apt: Adversarial Post-Training toolkit (one-step generators from flow transformers).")
    verbs = parser.add_subparsers(dest="verb", metavar="VERB")

    fit = verbs.add_parser("fit", help="train a stage (teacher | distill | apt) from a recipe YAML")
    fit.add_argument("recipe", help="recipe YAML, e.g. recipes/demo/teacher.yaml")
    fit.add_argument("rest", nargs="*", metavar="OVERLAY|key=value", help="overlay names (recipes/overlays/NAME.yaml) and key=value overrides")
    fit.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")

    sample = verbs.add_parser("sample", help="generate with a checkpoint (one step for distilled/APT models)")
    sample.add_argument("checkpoint", help="checkpoint directory or run directory (latest checkpoint)")
    sample.add_argument("--prompt", action="append", required=True, help="text prompt (repeatable)")
    sample.add_argument("--steps", type=int, default=None, help="sampling steps (default: 1 for distill/apt, flow.sample_steps for a teacher)")
    sample.add_argument("--cfg-scale", type=float, default=None, help="CFG scale (default: 1 for one-step models, flow.cfg_scale for a teacher)")
    sample.add_argument("--seed", type=int, default=0, help="seed of the first sample; prompt i uses seed + i")
    sample.add_argument("--frames", type=int, default=None, help="frames to generate (1 = an image; default: the checkpoint's)")
    sample.add_argument("--out", default="samples", help="output directory")

    stream = verbs.add_parser("stream", help="stream a causal (stream_*) run's video chunk by chunk, frames written as they are made")
    stream.add_argument("checkpoint", help="checkpoint directory or run directory of a stream_teacher / stream_distill / stream_apt run")
    stream.add_argument("--prompt", action="append", required=True, help="text prompt; repeat it with --switch-at to change prompts mid-stream")
    stream.add_argument("--switch-at", type=int, action="append", default=[], help="frame index where the next --prompt takes over (one per extra prompt)")
    stream.add_argument("--frames", type=int, required=True, help="frames to stream (any number: the cache has a fixed size)")
    stream.add_argument("--seed", type=int, default=0)
    stream.add_argument("--steps", type=int, default=None, help="Euler steps per chunk (default: 1, or flow.sample_steps for a causal teacher)")
    stream.add_argument("--cfg-scale", type=float, default=None, help="CFG scale (default: 1, or flow.cfg_scale for a causal teacher)")
    stream.add_argument("--out", default="stream", help="output directory (frames/NNNNNN.png and stream.mp4 as they come, stream.gif at the end "
                                                        "for streams of at most 512 frames)")
    stream.add_argument("--fps", type=float, default=8.0, help="playback rate of stream.mp4 and stream.gif")
    stream.add_argument("--cache-layout", type=int, nargs=2, metavar=("SINK", "WINDOW"), default=None,
                        help="split the rolling cache as SINK chunks + WINDOW chunks (same sum as the run's model.sink_chunks + "
                             "model.window_chunks; docs/streaming.md)")

    demo = verbs.add_parser("demo", help="the embedded demo: teacher -> distillation -> APT (image, video) -> evaluation table")
    demo.add_argument("--out", default=None, help="demo output directory (default runs/demo; with --text-terms runs/demo-text-terms; with --stream "
                                                  "runs/demo-stream, runs/demo-stream-WORLD for a --world other than free-colour)")
    demo.add_argument("--quick", action="store_true", help="a few steps of everything (smoke test, numbers meaningless)")
    demo.add_argument("--stream", action="store_true",
                      help="streaming APT (AAPT): student-forced training of the shipped causal models, then the long-video table (runs/demo-stream)")
    demo.add_argument("--world", default=None, choices=["free-shape", "free-colour", "long"],
                      help="with --stream: the streaming toy world (default free-colour: captions without the colour; docs/streaming.md)")
    demo.add_argument("--whole-clip", default=None, help="with --stream: the whole-clip APT checkpoint of its first row (default: runs/demo's pick)")
    demo.add_argument("--text-terms", action="store_true",
                      help="NOT the paper's objective: stage 1 at CFG 5 and two text-alignment terms in both APT stages (docs/demo.md)")

    export = verbs.add_parser("export", help="write the EMA generator of a diffusers-based run as a complete diffusers pipeline (README: the exact call)")
    export.add_argument("checkpoint", help="checkpoint directory or run directory (latest checkpoint)")
    export.add_argument("--out", required=True, help="output directory (loads with the stock pipeline class's from_pretrained)")
    export.add_argument("--transformer-only", action="store_true", help="write the transformer alone (save_pretrained), not a pipeline")
    export.add_argument("--weights", default=None, help="weights to export (default: the stage's EMA product)")
    export.add_argument("--lora", action="store_true", help="LoRA run: write the EMA adapters (diffusers: for the pipeline's load_lora_weights)")
    export.add_argument("--merge", action="store_true", help="LoRA run: fold the EMA adapters into the base and write a full model")

    consolidate = verbs.add_parser("consolidate", help="merge a sharded DeepSpeed checkpoint into single safetensors files")
    consolidate.add_argument("rest", nargs=argparse.REMAINDER, help="arguments of apt.distributed.consolidate (see its --help)")

    argv = list(sys.argv[1:] if argv is None else argv)
    args, unknown = parser.parse_known_args(_flags_last(argv))
    if args.verb is None:
        parser.print_help()
        return 0
    if unknown:
        parser.error(f"unrecognised arguments: {' '.join(unknown)}")
    try:
        if args.verb == "fit":
            from apt.train import fit_from_args

            overlays, overrides = _split_fit_args(args.rest)
            return fit_from_args(args.recipe, overlays, overrides, dry_run=args.dry_run)
        if args.verb == "sample":
            from apt.sample import sample_to_dir

            for p in sample_to_dir(args.checkpoint, args.prompt, steps=args.steps, cfg_scale=args.cfg_scale, seed=args.seed, frames=args.frames, out=args.out):
                print(p)
            return 0
        if args.verb == "stream":
            from apt.sample import GIF_MAX_FRAMES, stream_to_dir

            r = stream_to_dir(args.checkpoint, args.prompt, frames=args.frames, switch_at=args.switch_at, seed=args.seed, out=args.out,
                              steps=args.steps, cfg_scale=args.cfg_scale, fps=args.fps,
                              cache_layout=None if args.cache_layout is None else tuple(args.cache_layout))
            gif = r["gif"] or f"no GIF past {GIF_MAX_FRAMES} frames"
            print(f"{r['frames']} frames ({r['chunks']} chunks) -> {r['out']}/frames, {r['out']}/stream.mp4, {gif}")
            print(f"latency to the first frame {r['first_frame_seconds'] * 1e3:.1f} ms; {r['fps']:.1f} frames per second (writing the files included)")
            return 0
        if args.verb == "export":
            from apt.export_lora import export_route

            print(export_route(args.checkpoint, args.out, lora=args.lora, merge=args.merge, weights=args.weights,
                               transformer_only=args.transformer_only))
            return 0
        if args.verb == "consolidate":
            from apt.distributed.consolidate import main as consolidate_main

            return consolidate_main(args.rest)
        if args.verb == "demo":
            if args.stream:
                if args.text_terms:
                    parser.error("--stream and --text-terms are separate demos")
                from apt.toy.stream_demo import DEFAULT_WORLD, run_stream_demo

                run_stream_demo(args.out, quick=args.quick, apt_whole=args.whole_clip, world=args.world or DEFAULT_WORLD)
                return 0
            if args.world:
                parser.error("--world picks the world of the streaming demo (--stream)")
            from apt.toy.demo import run_demo

            run_demo(args.out, quick=args.quick, text_terms=args.text_terms)
            return 0
    except Preempted as e:
        print(f"{e}; resume with: {resume_command(argv)}", file=sys.stderr)
        return e.exit_code
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (FloatingPointError, RunFailure) as e:  # not finite; corrupt data (apt.data.faults); a checkpoint not written
        print(f"error: {_last_line(e)}", file=sys.stderr)
        return 1
    return 1


def _last_line(e: Exception) -> str:
    """An error raised in a DataLoader worker arrives with the worker's traceback in its message; its last line is ours."""
    lines = [line for line in str(e).strip().splitlines() if line.strip()]
    last = lines[-1] if lines else type(e).__name__
    return last.split(f"{type(e).__name__}: ", 1)[-1]


if __name__ == "__main__":
    sys.exit(main())
