"""LightningDataModule over WebDataset shards; rebuilt at resume to skip the batches already consumed.

With ``data.image_shards`` set, every step gets a video batch and an image batch (joint image-video
training: an image is a one-frame video), delivered as ``{"video": batch, "image": batch}``. The APT stage
with ``train.accumulate_grad_batches`` = k > 1 gets lists of k batches (its step accumulates over them).
"""

from __future__ import annotations

import lightning as L
from lightning.pytorch.utilities import CombinedLoader

from apt.config import ADVERSARIAL_STAGES, Config
from apt.data.latent_shards import is_latent_shards, latent_train_loader
from apt.data.shards import resolve_shards, train_loader
from apt.distributed.sequence_parallel import data_parallel_rank


class ShardDataModule(L.LightningDataModule):
    def __init__(self, config: Config):
        super().__init__()
        self.config = config
        self.shards = resolve_shards(config.data.shards)
        self.image_shards = resolve_shards(config.data.image_shards) if config.data.image_shards else None

    def _loader(self, shards: list[str], batch_size: int, seed: int):
        c = self.config
        # Pre-encoded latent shards (data/encode_latents.py) have their own loader, same signature.
        loader = latent_train_loader if is_latent_shards(shards) else train_loader
        # The ranks of a sequence-parallel group read the same samples.
        rank, world_size = data_parallel_rank(self.trainer.global_rank, self.trainer.world_size, c.train.sequence_parallel)
        return loader(
            shards,
            batch_size=batch_size,
            seed=seed,
            rank=rank,
            world_size=world_size,
            num_workers=c.data.num_workers,
            skip_batches=self.trainer.lightning_module.batches_consumed,
            max_consecutive_skipped=c.data.max_consecutive_skipped,  # corrupt data bounded (apt.data.faults)
            max_skipped_fraction=c.data.max_skipped_fraction,
        )

    def train_dataloader(self):
        c = self.config
        video = self._loader(self.shards, c.data.batch_size, c.train.seed)
        if c.stage in ADVERSARIAL_STAGES and c.train.accumulate_grad_batches > 1:
            # APT steps by hand (two networks): its step takes a list of micro-batches per update.
            return MicroBatches(video, c.train.accumulate_grad_batches)
        if self.image_shards is None:
            return video
        image = self._loader(self.image_shards, c.data.image_batch_size, c.train.seed + 1)
        return CombinedLoader({"video": video, "image": image}, mode="min_size")


class MicroBatches:
    """Groups of ``k`` consecutive batches of a loader, one group per update (``train.accumulate_grad_batches``)."""

    def __init__(self, loader, k: int):
        self.loader, self.k = loader, k

    def __iter__(self):
        batches = iter(self.loader)
        while True:
            yield [next(batches) for _ in range(self.k)]


def batch_parts(batch: dict) -> list[dict]:
    """The per-modality batches of a training step (one, or video + image)."""
    return [batch["video"], batch["image"]] if "video" in batch else [batch]
