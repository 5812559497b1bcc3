"""apt.text.TextEncoder: the per-caption cache."""

import torch

from apt.text import TextEncoder


def test_uncached_encoding_equals_the_cached_one_and_stores_nothing():
    te = TextEncoder.load("toy-t5")
    captions = ["a red circle moving left on a black background", "a blue square moving up on a white background"]
    fresh = te.encode(captions, cache=False)
    assert te._cache == {}
    cached = te.encode(captions)
    assert set(te._cache) == set(captions)
    assert torch.equal(fresh.emb_BLD, cached.emb_BLD) and torch.equal(fresh.mask_BL, cached.mask_BL)
