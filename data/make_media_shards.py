"""Videos/images + captions -> WebDataset pixel shards, with a report of everything skipped.

    python data/make_media_shards.py --source clips/ --out shards/raw720 \
        --frames 49 --fps 24 --height 720 --width 1280
    python data/make_media_shards.py --source list.jsonl --out shards/img1024 --frames 1 --height 1024 --width 1024

--source: a folder (captions in sidecar <name>.txt / <name>.json) or a .jsonl/.csv list with
path + caption. Policy (apt.data.media_shards.MediaPolicy): resample to --fps by nearest frame,
--frames frames from --start, resize to cover --height x --width, centre crop. Corrupt,
unsupported, too-short or caption-less files are skipped and listed in OUT/report.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from apt.data.media_shards import MediaPolicy, write_media_shards  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--source", required=True, help="media folder, or a .jsonl / .csv list with path + caption")
    p.add_argument("--out", required=True, help="output directory for media-%%06d.tar shards")
    p.add_argument("--frames", type=int, default=49, help="frames per clip (1 = images; default 49)")
    p.add_argument("--fps", type=float, default=24.0, help="output frame rate (default 24)")
    p.add_argument("--height", type=int, default=720)
    p.add_argument("--width", type=int, default=1280)
    p.add_argument("--start", type=float, default=0.0, help="clip start in the source video, seconds")
    p.add_argument("--samples-per-shard", type=int, default=256)
    p.add_argument("--overwrite", action="store_true", help="replace shards already in --out")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    policy = MediaPolicy(frames=args.frames, fps=args.fps, height=args.height, width=args.width, start_seconds=args.start)
    report = write_media_shards(args.source, args.out, policy, samples_per_shard=args.samples_per_shard, overwrite=args.overwrite, progress=not args.no_progress)
    print(json.dumps({"written": report["written"], "skipped": report["num_skipped"], "shards": len(report["shards"]), "report": os.path.join(args.out, "report.json")}))
    return report


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
