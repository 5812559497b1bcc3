"""WebDataset shards: the sample schema and the train / eval loaders (the toy-shard writer is ``apt.toy.shards``).

Schema (one tar member group per sample, key = zero-padded sample index):
    pixels.npy   uint8 (T, H, W, C) clip (T = 1 for images)
    json         {"caption", "labels": {attribute: value}, "frames", "height", "width", "fps",
                  "index", "seed"}

Loaders yield dicts: x float32 (B, C, T, H, W) in [-1, 1], caption list[str], labels list[dict],
key list[str]. The train loader is an infinite resampled stream that is a pure function of
(shards, seed, rank, batch size, workers), so resume is exact: rebuild it with `skip_batches=k`
and it yields the batches k, k+1, ... of the uninterrupted stream (docs/design.md §2, "Data and exact resume").
Corrupt samples are skipped, counted by reason and bounded (``apt.data.faults``: rate-limited warnings,
a stop with one line when too many are corrupt; each batch carries the running counts under
``data_faults``); an empty caption is a user error and raises.

Shape legend: B batch, C channels, T frames, H height, W width.
"""

from __future__ import annotations

import functools
import glob
import io
import json
import os
from collections.abc import Callable, Iterator, Sequence

import braceexpand
import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from apt.data.faults import FAULTS_KEY, DataFaults

_SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")


# ---------------------------------------------------------------- tensors <-> pixels


def pixels_to_tensor(pixels: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 (B, T, H, W, C) -> float32 (B, C, T, H, W) in [-1, 1]; a single (T, H, W, C) clip gives
    (C, T, H, W)."""
    p = torch.as_tensor(np.asarray(pixels))
    if p.dtype != torch.uint8 or p.ndim not in (4, 5):
        raise ValueError(
            f"pixels must be uint8 (T, H, W, C) or (B, T, H, W, C), got {p.dtype} {tuple(p.shape)}"
        )
    x = p.float() / 127.5 - 1.0
    return x.permute(3, 0, 1, 2) if p.ndim == 4 else x.permute(0, 4, 1, 2, 3)


def tensor_to_pixels(x: torch.Tensor) -> np.ndarray:
    """float (B, C, T, H, W) in [-1, 1] -> uint8 (B, T, H, W, C) (clamped, rounded); (C, T, H, W)
    gives (T, H, W, C)."""
    if x.ndim not in (4, 5):
        raise ValueError(f"x must be (C, T, H, W) or (B, C, T, H, W), got {tuple(x.shape)}")
    p = ((x.detach().float().cpu() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return (p.permute(1, 2, 3, 0) if x.ndim == 4 else p.permute(0, 2, 3, 4, 1)).numpy()


# ---------------------------------------------------------------- reading


def resolve_shards(path_or_pattern: str | os.PathLike | Sequence[str]) -> list[str]:
    """Shard paths from a directory (its *.tar, sorted), a brace pattern ("d/toy-{000000..000009}.tar"),
    a glob, a single file, or a list of those. Raises FileNotFoundError naming what is missing."""
    if isinstance(path_or_pattern, (list, tuple)):
        if not path_or_pattern:
            raise ValueError("empty list of shard paths")
        return [u for p in path_or_pattern for u in resolve_shards(p)]
    spec = os.fspath(path_or_pattern)
    if os.path.isdir(spec):
        urls = sorted(u for u in glob.glob(os.path.join(spec, "*")) if u.endswith(_SHARD_SUFFIXES))
        if not urls:
            raise FileNotFoundError(f"no .tar shards in directory {spec}")
        return urls
    if "{" in spec:
        urls = list(braceexpand.braceexpand(spec))
        missing = [u for u in urls if not os.path.isfile(u)]
        if missing:
            raise FileNotFoundError(
                f"{len(missing)} of {len(urls)} shards of {spec} do not exist, first: {missing[0]}"
            )
        return urls
    if any(ch in spec for ch in "*?["):
        urls = sorted(glob.glob(spec))
        if not urls:
            raise FileNotFoundError(f"no shards match {spec}")
        return urls
    if not os.path.exists(spec):
        raise FileNotFoundError(f"shard path does not exist: {spec}")
    if not spec.endswith(_SHARD_SUFFIXES):
        raise ValueError(f"not a shard (expected {'/'.join(_SHARD_SUFFIXES)}): {spec}")
    return [spec]


def _decode(src: Iterator[dict], counter: DataFaults) -> Iterator[dict]:
    """Raw tar samples -> dict(pixels uint8 THWC, caption, labels, key); skips and counts corrupt ones."""
    for raw in src:
        key, url = raw.get("__key__", "?"), raw.get("__url__", "?")
        reason = "missing_member"  # what failed, for the counts (apt.data.faults.REASONS)
        try:
            pixels_npy, meta_json = raw["pixels.npy"], raw["json"]
            reason = "bad_array"
            pixels_THWC = np.load(io.BytesIO(pixels_npy), allow_pickle=False)
            reason = "bad_json"
            meta = json.loads(meta_json)
            reason = "bad_shape"
            if pixels_THWC.dtype != np.uint8 or pixels_THWC.ndim != 4:
                raise ValueError(
                    f"pixels must be uint8 (T, H, W, C), got {pixels_THWC.dtype} {pixels_THWC.shape}"
                )
        except Exception as e:  # noqa: BLE001 - any undecodable sample is corrupt
            counter.skip(reason, url, f"sample {key} in {url}: {type(e).__name__}: {e}")
            continue
        counter.ok()
        caption = meta.get("caption")
        if not isinstance(caption, str) or not caption.strip():
            raise ValueError(f"sample {key} in shard {url} has an empty caption")
        yield {"pixels": pixels_THWC, "caption": caption, "labels": meta.get("labels", {}), "key": key}


def _collate(samples: list[dict]) -> dict:
    shapes = {s["pixels"].shape for s in samples}
    if len(shapes) != 1:
        raise ValueError(
            f"samples in one batch have different pixel shapes {sorted(shapes)}: "
            f"keys {[s['key'] for s in samples]}"
        )
    return {
        "x": pixels_to_tensor(np.stack([s["pixels"] for s in samples])),
        "caption": [s["caption"] for s in samples],
        "labels": [s["labels"] for s in samples],
        "key": [s["key"] for s in samples],
    }


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


def _stream_seed(rank: int, worker: int) -> int:
    """Seed for webdataset's ResampledShards: distinct per (rank, logical dataloader worker)."""
    return rank * 100_003 + worker


class _TrainStream(IterableDataset):
    """Infinite stream of batches for one rank; each worker draws its own seeded shard sequence."""

    def __init__(
        self, urls: list[str], batch_size: int, seed: int, rank: int, skip_batches: int, shuffle_buffer: int,
        decode: Callable | None = None, collate: Callable | None = None, faults: dict | None = None,
    ) -> None:
        super().__init__()
        self.urls, self.batch_size, self.seed, self.rank = urls, batch_size, seed, rank
        self.skip_batches, self.shuffle_buffer = skip_batches, shuffle_buffer
        self.decode, self.collate = decode or _decode, collate or _collate
        self.faults = faults or {}  # DataFaults bounds

    def __iter__(self) -> Iterator[dict]:
        physical, num_workers = _worker()
        # The DataLoader interleaves workers round robin, batch j from worker j % num_workers, and
        # always starts at worker 0. On resume after k batches, physical worker p therefore plays
        # the stream of worker (p + k) % num_workers, which made ceil((k - w) / num_workers) of them.
        k = self.skip_batches
        worker = (physical + k) % num_workers
        skip = max(0, -(-(k - worker) // num_workers))
        counter = DataFaults(**self.faults, source=os.path.dirname(self.urls[0]), worker=worker)
        pipeline = wds.DataPipeline(
            wds.ResampledShards(
                self.urls,
                seed=self.seed,
                worker_seed=functools.partial(_stream_seed, self.rank, worker),
                deterministic=True,
            ),
            wds.tarfile_to_samples(handler=counter),
            wds.shuffle(
                self.shuffle_buffer,
                initial=self.shuffle_buffer,
                seed=wds.utils.make_seed(self.seed, self.rank, worker),
            ),
            functools.partial(self.decode, counter=counter),
            wds.slice(skip * self.batch_size, None),
            wds.batched(self.batch_size, collation_fn=self.collate, partial=False),
            functools.partial(_with_faults, counter=counter),
        )
        return iter(pipeline)


def _with_faults(batches: Iterator[dict], counter: DataFaults) -> Iterator[dict]:
    """Each batch carries its worker's running skip counts (``apt.data.faults``)."""
    for batch in batches:
        batch[FAULTS_KEY] = counter.snapshot()
        yield batch


def train_loader(
    shards: str | Sequence[str],
    batch_size: int,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 0,
    skip_batches: int = 0,
    shuffle_buffer: int = 1000,
    *,
    decode: Callable | None = None,
    collate: Callable | None = None,
    max_consecutive_skipped: int | None = 10000,
    max_skipped_fraction: float | None = 0.1,
) -> DataLoader:
    """Infinite, shuffled, resampled training batches for `rank`, deterministic in (seed, rank).

    `decode(samples, counter)` / `collate(samples)` default to the pixel shards' (latent shards pass theirs).
    Corrupt samples are skipped within the bounds `max_consecutive_skipped` / `max_skipped_fraction`
    (``apt.data.faults``; None = unbounded), else ``DataFaultError``.

    `skip_batches=k` resumes exactly after k consumed batches (same num_workers required).
    Shard order is resampled with replacement (webdataset ResampledShards, so `shardshuffle` does not
    apply) and samples pass through a seeded shuffle buffer of `shuffle_buffer` samples.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} not in [0, world_size={world_size})")
    if batch_size < 1 or skip_batches < 0 or num_workers < 0:
        raise ValueError(
            "need batch_size >= 1, skip_batches >= 0, num_workers >= 0; "
            f"got {batch_size}, {skip_batches}, {num_workers}"
        )
    urls = resolve_shards(shards)
    faults = {"max_consecutive": max_consecutive_skipped, "max_fraction": max_skipped_fraction}
    stream = _TrainStream(urls, batch_size, seed, rank, skip_batches, shuffle_buffer, decode, collate, faults)
    # Batching happens inside the stream (one batch per worker step), so the DataLoader must not batch.
    return DataLoader(stream, batch_size=None, num_workers=num_workers, persistent_workers=num_workers > 0)


def _every_nth(src: Iterator[dict], rank: int, world_size: int) -> Iterator[dict]:
    for i, sample in enumerate(src):
        if i % world_size == rank:
            yield sample


def eval_loader(
    shards: str | Sequence[str], batch_size: int, rank: int = 0, world_size: int = 1
) -> wds.DataPipeline:
    """One deterministic pass in shard order; rank r keeps samples r, r + world_size, ...

    Every rank reads every shard (eval sets are small) so that the split is exact at the sample
    level whatever the shard count: over all ranks each sample appears exactly once.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} not in [0, world_size={world_size})")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    urls = resolve_shards(shards)
    counter = DataFaults(source=os.path.dirname(urls[0]))  # one finite pass: unbounded
    return wds.DataPipeline(
        wds.SimpleShardList(urls),
        wds.tarfile_to_samples(handler=counter),
        functools.partial(_decode, counter=counter),
        functools.partial(_every_nth, rank=rank, world_size=world_size),
        wds.batched(batch_size, collation_fn=_collate, partial=True),
    )
