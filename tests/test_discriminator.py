import pytest
import torch

from apt.discriminator import Discriminator
from apt.models import build_dit
from apt.models.backbone import TextCond
from tests.conftest import random_text


def make_d(depth=6, fractions=(16 / 36, 26 / 36, 1.0)):
    return Discriminator(build_dit("tiny", depth=depth), fractions=list(fractions), num_heads=2)


@pytest.mark.parametrize("depth, expected", [(3, [0, 1, 2]), (6, [2, 3, 5]), (36, [15, 25, 35])])
def test_heads_tap_intended_layers(depth, expected):
    if depth == 36:
        with torch.device("meta"):
            d = Discriminator(build_dit("tiny", depth=36), fractions=[16 / 36, 26 / 36, 1.0], num_heads=2)
    else:
        d = make_d(depth)
    assert d.layers == expected
    assert len(d.heads) == len(expected)


def test_logits_shape_and_early_exit_matches_full_forward():
    torch.manual_seed(0)
    d = make_d(6, fractions=[0.5])  # only block index 2 is needed
    x, t, text = torch.randn(3, 3, 8, 16, 16), torch.rand(3), random_text(3, 4, 32)
    calls = []
    handles = [b.register_forward_pre_hook(lambda m, i, k=k: calls.append(k)) for k, b in enumerate(d.backbone.blocks)]
    logits = d(x, t, text)
    for h in handles:
        h.remove()
    assert logits.shape == (3,)
    assert calls == [0, 1, 2]  # blocks after the deepest readout are skipped


def test_d_depends_on_input():
    torch.manual_seed(0)
    d = make_d()
    for p in d.backbone.parameters():  # past adaLN-Zero's identity start
        torch.nn.init.normal_(p, std=0.05)
    t, text = torch.rand(2), random_text(2, 4, 32)
    assert not torch.allclose(d(torch.randn(2, 3, 8, 16, 16), t, text), d(torch.randn(2, 3, 8, 16, 16), t, text))


def test_timestep_ensemble_shift():
    d = make_d(3)
    d.timestep_shift = 12.0
    t = d.sample_t(4000, torch.Generator().manual_seed(0))
    assert t.min() >= 0 and t.max() <= 1 and t.mean() > 0.75


def test_logit_and_r1_stay_fp32_under_bf16_autocast():
    torch.manual_seed(0)
    d = make_d(3)
    x, t, text = torch.randn(2, 3, 4, 16, 16), torch.rand(2), random_text(2, 4, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = d(x, t, text)
    assert logits.dtype == torch.float32


def test_logit_is_fp32_with_bf16_parameters():
    """DeepSpeed bf16 (and the GPU train-step benchmark) hold D's parameters in bf16; the head must
    still compute the logit in fp32 (an H100 run of eval/benchmark_train_step.py failed here)."""
    torch.manual_seed(0)
    d = make_d(3)
    x, t, text = torch.randn(2, 3, 4, 16, 16), torch.rand(2), random_text(2, 4, 32)
    reference = d(x, t, text)
    d16 = d.to(torch.bfloat16)
    logits = d16(x.bfloat16(), t, TextCond(text.emb_BLD.bfloat16(), text.mask_BL))
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, reference, atol=0.1, rtol=0.1)


def test_nearest_other_text_is_the_most_similar_different_one():
    base = random_text(1, 4, 8, pad_from=3)
    near = TextCond(base.emb_BLD + 0.1 * torch.randn(1, 4, 8), base.mask_BL)
    far = TextCond(-base.emb_BLD, base.mask_BL)  # cosine -1 to base, a little above -1 to near
    text = TextCond.cat([base, near, far, base])  # sample 3 repeats sample 0's text
    picked = text.nearest_other()
    for i, j in enumerate([1, 0, 1, 1]):
        assert torch.equal(picked.emb_BLD[i], text.emb_BLD[j]), (i, j)
    same = TextCond.cat([base, base])  # no different text in the batch: the neighbour's
    assert torch.equal(same.nearest_other().emb_BLD, same.emb_BLD)
