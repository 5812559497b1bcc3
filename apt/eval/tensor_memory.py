"""Peak bytes of the tensors an operation allocates, on any device (CPU included, where torch keeps no statistics).

``PeakTensorMemory`` is a ``TorchDispatchMode``: every tensor an op returns is counted once per storage (views share
their base's) until the storage is freed, so ``peak`` is the largest total of live storages created inside the block:
activations, caches, outputs. Tensors that existed before the block (the weights) are not counted. On CUDA it agrees
with ``torch.cuda.max_memory_allocated`` minus what was allocated before, up to the caching allocator's rounding.
It slows every op down: time a run without it.
"""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class PeakTensorMemory(TorchDispatchMode):
    """``with PeakTensorMemory() as m: fn()`` then ``m.peak`` (bytes) and ``m.live`` (bytes still held at the end)."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._seen: set[int] = set()

    def _track(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        key, nbytes = storage.data_ptr(), storage.nbytes()
        if nbytes == 0 or key in self._seen:
            return
        self._seen.add(key)
        self.live += nbytes
        self.peak = max(self.peak, self.live)

        def free(key: int = key, nbytes: int = nbytes) -> None:
            self.live -= nbytes
            self._seen.discard(key)

        weakref.finalize(storage, free)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._track(t)
        return out
