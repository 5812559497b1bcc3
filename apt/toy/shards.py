"""The toy world as WebDataset shards (the demo's data): ``python data/make_toy_shards.py`` and ``apt demo`` call
``write_toy_shards``. The sample schema and the loaders are ``apt.data.shards``'."""

from __future__ import annotations

import glob
import json
import os
import tempfile

import webdataset as wds
from tqdm import tqdm

from apt.toy.world import FPS, SIZE, make_sample

SHARD_PATTERN = "toy-%06d.tar"
MANIFEST = "manifest.json"


def write_toy_shards(
    out_dir: str,
    num_samples: int,
    frames: int = 8,
    seed: int = 0,
    samples_per_shard: int = 1000,
    *,
    overwrite: bool = False,
    progress: bool = True,
    world: str = "demo",
) -> dict:
    """Render `num_samples` toy clips into WebDataset shards under `out_dir`; returns the manifest.

    Each shard is written under a ".part" name and renamed when complete; `manifest.json` is
    written last (atomically), so a directory with a manifest is complete. ``world``: ``demo``, or ``long`` /
    ``free-shape`` / ``free-colour`` (``apt.toy.long_world``: motion that wraps around the frame, for the streaming
    stages; the latter two captioned without the shape / the colour), recorded in the manifest.
    """
    make = make_sample
    if world != "demo":
        from functools import partial

        from apt.toy.long_world import WORLDS, make_long_sample

        if world not in WORLDS:
            raise ValueError(f"unknown toy world {world!r}; choose from {', '.join(WORLDS)}")
        make = partial(make_long_sample, free_shape=world == "free-shape", free_colour=world == "free-colour")
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    os.makedirs(out_dir, exist_ok=True)
    stale = sorted(glob.glob(os.path.join(out_dir, "*.tar")) + glob.glob(os.path.join(out_dir, MANIFEST)))
    if stale and not overwrite:
        raise FileExistsError(
            f"{out_dir} already holds {len(stale)} shard/manifest files; "
            "choose an empty directory or pass overwrite=True (--overwrite)"
        )
    for path in stale:
        os.remove(path)

    def _finish(part_name: str) -> None:
        os.replace(part_name, part_name[: -len(".part")])

    pattern = os.path.join(out_dir, SHARD_PATTERN + ".part")
    with wds.ShardWriter(pattern, maxcount=samples_per_shard, post=_finish, verbose=0, mtime=0.0) as sink:
        for index in tqdm(range(num_samples), desc=f"toy shards -> {out_dir}", disable=not progress):
            s = make(index, seed, frames)
            pixels_THWC = s["pixels"]
            meta = {
                "caption": s["caption"],
                "labels": s["attributes"].to_dict(),
                "frames": frames,
                "height": pixels_THWC.shape[1],
                "width": pixels_THWC.shape[2],
                "fps": FPS,
                "index": index,
                "seed": seed,
            }
            sink.write({"__key__": f"{index:09d}", "pixels.npy": pixels_THWC, "json": meta})
        num_shards = sink.shard
    manifest = {
        "num_samples": num_samples,
        "num_shards": num_shards,
        "samples_per_shard": samples_per_shard,
        "frames": frames,
        "height": SIZE,
        "width": SIZE,
        "fps": FPS,
        "seed": seed,
        **({"world": world} if world != "demo" else {}),
        "shards": [SHARD_PATTERN % i for i in range(num_shards)],
    }
    fd, tmp = tempfile.mkstemp(dir=out_dir, suffix=".json.part")
    with os.fdopen(fd, "w") as f:
        json.dump(manifest, f, indent=2)
    os.chmod(tmp, 0o644)  # mkstemp makes it owner-only; shards are meant to be shared
    os.replace(tmp, os.path.join(out_dir, MANIFEST))
    return manifest
