"""apt.text.TextEncoder: the per-caption cache, and the encoder on the GPU."""

import pytest
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


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_encoder_on_the_gpu_gives_cpu_embeddings_equal_to_the_cpu_encoder():
    """A LightningModule moves its encoder to the GPU; the tokenizer's ids must follow it (an H100
    `apt fit` failed in the embedding lookup before they did)."""
    captions = ["a red circle moving left on a black background"]
    cpu = TextEncoder.load("toy-t5").encode(captions, cache=False)
    gpu_te = TextEncoder.load("toy-t5").cuda()
    out = gpu_te.encode(captions, cache=False)
    assert out.emb_BLD.device.type == "cpu"
    torch.testing.assert_close(out.emb_BLD, cpu.emb_BLD, atol=1e-4, rtol=1e-4)
