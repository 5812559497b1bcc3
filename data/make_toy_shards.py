"""Write the toy world (apt.toy.world) as WebDataset shards plus a manifest.json.

    python data/make_toy_shards.py --out data/toy8 --num-samples 20000 --frames 8 --seed 0
    python data/make_toy_shards.py --out data/toy_img --num-samples 20000 --seed 0 --image
    python data/make_toy_shards.py --out runs/data/toy-long-8f --num-samples 20000 --frames 8 --seed 2 --world long

Samples are fully determined by (seed, index), so the same command always writes the same shards.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from apt.toy.shards import write_toy_shards  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="output directory for toy-%%06d.tar shards")
    p.add_argument("--num-samples", type=int, required=True)
    p.add_argument("--frames", type=int, default=8, help="frames per clip (ignored with --image)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image", action="store_true", help="the image variant (frames = 1, no motion)")
    p.add_argument("--world", default="demo", choices=["demo", "long", "free-shape", "free-colour"],
                   help="long: motion wraps around the frame (apt.toy.long_world); free-shape / free-colour: that world captioned without the shape / the colour")
    p.add_argument("--samples-per-shard", type=int, default=1000)
    p.add_argument("--overwrite", action="store_true", help="replace shards already in --out")
    args = p.parse_args(argv)
    manifest = write_toy_shards(
        args.out,
        args.num_samples,
        frames=1 if args.image else args.frames,
        seed=args.seed,
        samples_per_shard=args.samples_per_shard,
        overwrite=args.overwrite,
        world=args.world,
    )
    print(json.dumps({k: v for k, v in manifest.items() if k != "shards"}))
    return manifest


if __name__ == "__main__":
    main()
