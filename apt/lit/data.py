"""LightningDataModule over WebDataset shards; rebuilt at resume to skip the batches already consumed."""

from __future__ import annotations

import lightning as L

from apt.config import Config
from apt.data.shards import resolve_shards, train_loader


class ShardDataModule(L.LightningDataModule):
    def __init__(self, config: Config):
        super().__init__()
        self.config = config
        self.shards = resolve_shards(config.data.shards)

    def train_dataloader(self):
        c = self.config
        module = self.trainer.lightning_module
        return train_loader(
            self.shards,
            batch_size=c.data.batch_size,
            seed=c.train.seed,
            rank=self.trainer.global_rank,
            world_size=self.trainer.world_size,
            num_workers=c.data.num_workers,
            skip_batches=module.batches_consumed,
        )
