"""Data: WebDataset shards and loaders (pixel, media and latent shards). The toy world, the demo's dataset,
is ``apt.toy.world``; its shard writer ``apt.toy.shards.write_toy_shards``."""

from apt.data.shards import eval_loader, pixels_to_tensor, resolve_shards, tensor_to_pixels, train_loader

__all__ = ["eval_loader", "pixels_to_tensor", "resolve_shards", "tensor_to_pixels", "train_loader"]
