import pytest
import torch
import torch.nn.functional as F

from apt.models import build_dit, readout_layers, tap_hidden_states
from apt.models.dit import Attention
from apt.models.layers import apply_rope, rope_3d
from tests.conftest import random_text


def test_tiny_forward_shapes_video_and_image():
    m = build_dit("tiny")
    text = random_text(2, 5, m.config.text_dim, pad_from=3)
    for T in (8, 1):
        x = torch.randn(2, 3, T, 16, 16)
        assert m(x, torch.rand(2), text).shape == x.shape


def test_shape_errors_name_the_problem():
    m = build_dit("tiny")
    with pytest.raises(ValueError, match="not divisible by the patch size"):
        m.check_input_shape((1, 3, 8, 15, 16))
    with pytest.raises(ValueError, match="temporal patch"):
        m.check_input_shape((1, 3, 3, 16, 16))
    with pytest.raises(ValueError, match="channels"):
        m.check_input_shape((1, 4, 8, 16, 16))


def test_production_flavour_parameter_count_on_meta():
    with torch.device("meta"):
        m = build_dit("apt-8b")
    n = sum(p.numel() for p in m.parameters())
    assert len(m.blocks) == 36 and m.hidden_dim == 3072
    assert 7.5e9 < n < 8.5e9, n


def test_rope_is_a_rotation_and_relative():
    cos, sin = rope_3d(24, 2, 3, 3, num_text=4, theta=10000.0, device="cpu")
    assert cos.shape == (4 + 18, 24)
    q = torch.randn(1, 1, 22, 24)
    torch.testing.assert_close(apply_rope(q, cos, sin).norm(dim=-1), q.norm(dim=-1))  # rotations keep norms
    torch.testing.assert_close(apply_rope(q, cos, sin)[..., :4, :], q[..., :4, :])  # text tokens unrotated
    # relative: <R_m q, R_n k> depends on m - n only (1D check along w with the same vectors)
    cos1, sin1 = rope_3d(24, 1, 1, 6, num_text=0, theta=10000.0, device="cpu")
    a, b = torch.randn(24), torch.randn(24)
    rot = lambda v, i: apply_rope(v.view(1, 1, 1, 24), cos1[i : i + 1], sin1[i : i + 1]).flatten()  # noqa: E731
    assert torch.dot(rot(a, 3), rot(b, 1)).item() == pytest.approx(torch.dot(rot(a, 4), rot(b, 2)).item(), rel=1e-4, abs=1e-5)


def test_attention_matches_plain_softmax_attention():
    torch.manual_seed(0)
    attn = Attention(32, 4)
    x = torch.randn(2, 10, 32)
    cos, sin = rope_3d(8, 1, 2, 3, num_text=4, theta=10000.0, device="cpu")
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[1, 2:4] = False
    out = attn(x, (cos, sin), mask[:, None, None, :])
    # plain reference
    q, k, v = attn.qkv(x).view(2, 10, 3, 4, 8).permute(2, 0, 3, 1, 4)
    q, k = apply_rope(attn.q_norm(q), cos, sin), apply_rope(attn.k_norm(k), cos, sin)
    scores = (q @ k.transpose(-1, -2)) / 8**0.5
    scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
    ref = attn.proj((F.softmax(scores, -1) @ v).transpose(1, 2).reshape(2, 10, 32))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_padding_tokens_do_not_change_the_output():
    torch.manual_seed(0)
    m = build_dit("tiny")
    for p in m.parameters():  # leave adaLN-Zero's identity start so attention matters
        if p.dim() > 1:
            torch.nn.init.normal_(p, std=0.1)
    x, t = torch.randn(1, 3, 2, 8, 8), torch.rand(1)
    short = random_text(1, 3, 32)
    long = random_text(1, 6, 32, pad_from=3)
    long.emb_BLD[:, :3] = short.emb_BLD
    torch.testing.assert_close(m(x, t, short), m(x, t, long), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("depth", [3, 6, 12, 36])
def test_readout_layers_follow_paper_proportions(depth):
    layers = readout_layers(depth, [16 / 36, 26 / 36, 1.0])
    assert layers[-1] == depth - 1
    if depth == 36:
        assert layers == [15, 25, 35]
    assert all(0 <= i < depth for i in layers)


def test_tap_hidden_states_visual_tokens_only():
    m = build_dit("tiny")
    text = random_text(2, 5, 32)
    with tap_hidden_states(m, [0, 2]) as hs:
        m(torch.randn(2, 3, 8, 16, 16), torch.rand(2), text)
    assert set(hs) == {0, 2}
    assert hs[0].shape == (2, 4 * 4 * 4, 32)  # (8/2)*(16/4)*(16/4) visual tokens, text removed
    with pytest.raises(IndexError):
        with tap_hidden_states(m, [3]):
            pass


def test_gradient_checkpointing_same_math():
    torch.manual_seed(0)
    m = build_dit("tiny")
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.05)
    x, t, text = torch.randn(2, 3, 8, 16, 16), torch.rand(2), random_text(2, 4, 32)
    loss = m(x, t, text).square().mean()
    g_ref = torch.autograd.grad(loss, list(m.parameters()))
    m.gradient_checkpointing = True
    loss2 = m(x, t, text).square().mean()
    g_ck = torch.autograd.grad(loss2, list(m.parameters()))
    torch.testing.assert_close(loss2, loss, atol=1e-5, rtol=1e-5)
    for a, b in zip(g_ck, g_ref):
        torch.testing.assert_close(a, b, atol=5e-5, rtol=1e-4)
