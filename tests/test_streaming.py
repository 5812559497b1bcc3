"""Streaming generation and the streaming stages' pieces: the chunk sampler, student forcing (the rollout is the
inference path; how far gradients reach), teacher forcing, the per-chunk discriminator on windows, AAPT's
relativistic loss with approximate R2 inside ``apt_step``, the streaming session and its prompt switch."""

from __future__ import annotations

import copy
from unittest import mock

import pytest
import torch

from apt.config import AptConfig
from apt.ema import ema_update
from apt.losses import d_loss_relativistic, g_loss_relativistic
from apt.methods.apt import AptProgress, SampleNoise, apt_step
from apt.methods.dmd import DistributionMatching, WholeClipWindows, dmd_loss
from apt.methods.streaming import (
    ChunkDiscriminator,
    StudentForcing,
    TeacherForced,
    TeacherForcing,
    teacher_forced_stream,
    windows,
)
from apt.methods.update import OptimizerUpdate
from apt.models import build_dit
from apt.models.causal import shift_chunks
from apt.models.dit import DiT
from apt.models.kv_cache import KVCache
from apt.streaming import ChunkStepper, stream_sample
from tests.conftest import random_text

CF = 2


def causal_tiny(seed: int = 0, **kw):
    torch.manual_seed(seed)
    net = build_dit("tiny", causal_chunk_frames=CF, sink_chunks=1, window_chunks=2, **kw)
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.05)
    return net


def chunk_d(window_frames: int = 8, seed: int = 1):
    a = AptConfig(readout_fractions=[0.5, 1.0])
    return ChunkDiscriminator(causal_tiny(seed), fractions=list(a.readout_fractions), num_heads=2, window_frames=window_frames), a


@pytest.mark.parametrize("clean", [False, True], ids=["own-forward", "clean-context"])
def test_student_forcing_rolls_out_exactly_as_inference(clean):
    G = causal_tiny(clean_context=clean).eval()
    z, text = torch.randn(2, 3, 16, 16, 16), random_text(2, 4, 32)
    with torch.no_grad():
        rolled = StudentForcing()(G, z, text)
        streamed = stream_sample(G, z, text)
    torch.testing.assert_close(rolled, streamed, rtol=0, atol=1e-6)
    # The first chunks equal one block-causal forward on G's own outputs recycled (what "as at inference" means).
    with torch.no_grad():
        x = rolled[:, :, :8]
        full = z[:, :, :8] - G(z[:, :, :8], torch.ones(2), text, shift_chunks(x, CF))
    torch.testing.assert_close(full, x, rtol=0, atol=1e-5)


@pytest.mark.parametrize("clean", [False, True], ids=["own-forward", "clean-context"])
def test_teacher_forcing_equals_a_stream_fed_the_real_chunks(clean):
    """The ablation's fakes: chunk i from its noise with the real chunk i - 1 recycled and the real past in the cache, on
    a clip of 8 chunks (twice the cache: the sink and the rolling window in play), as one forward."""
    from apt.streaming import cache_for

    G = causal_tiny(clean_context=clean).eval()
    z, x_real, text = torch.randn(2, 3, 16, 16, 16), torch.randn(2, 3, 16, 16, 16), random_text(2, 4, 32)
    with torch.no_grad():
        forced = TeacherForcing()(G, z, text, x_real)
        cache, prev, chunks = cache_for(G, z, text, inplace=True), torch.zeros_like(z[:, :, :CF]), []
        for i in range(16 // CF):
            chunks.append(z[:, :, i * CF:(i + 1) * CF] - G(z[:, :, i * CF:(i + 1) * CF], torch.ones(2), text, prev, cache=cache))
            prev = x_real[:, :, i * CF:(i + 1) * CF]  # the real chunk, not the one just made
        rolled = StudentForcing()(G, z, text, x_real)
    torch.testing.assert_close(forced, torch.cat(chunks, dim=2), rtol=0, atol=1e-5)
    assert (forced[:, :, CF:] - rolled[:, :, CF:]).abs().max() > 1e-3  # student forcing ignores the real clip
    torch.testing.assert_close(forced[:, :, :CF], rolled[:, :, :CF], rtol=0, atol=1e-5)  # chunk 0 has no past either way
    with pytest.raises(ValueError, match=r"teacher forcing needs the real clips shaped like the noise \(2, 3, 16, 16, 16\), got None"):
        TeacherForcing()(G, z, text)


@pytest.mark.parametrize("clean", [False, True], ids=["own-forward", "clean-context"])
def test_student_forcing_gradient_reach(clean):
    G = causal_tiny(clean_context=clean)
    text = random_text(1, 4, 32)

    def grad_wrt_first_noise(**kw):
        z = torch.randn(1, 3, 8, 16, 16, requires_grad=True)
        x = StudentForcing(**kw)(G, z, text)
        x[:, :, 6:].sum().backward()  # the last chunk only
        return z.grad[:, :, :2].abs().sum()

    assert grad_wrt_first_noise(detach_context=True) == 0  # the last chunk's gradient stops at its own forward
    assert grad_wrt_first_noise(detach_context=False) > 0  # through the cache and the recycled chunks
    for part, carries in ((slice(0, 6), False), (slice(6, 8), True)):  # grad_chunks=1: only the last chunk carries gradient
        G.zero_grad(set_to_none=True)
        StudentForcing(grad_chunks=1)(G, torch.randn(1, 3, 8, 16, 16), text)[:, :, part].sum().backward()
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in G.parameters()) == carries


def test_teacher_forcing_recycles_the_clean_clip_and_tiles_for_cfg():
    net = causal_tiny().eval()
    x0, x_t, t, text = torch.randn(2, 3, 6, 16, 16), torch.randn(2, 3, 6, 16, 16), torch.rand(2), random_text(2, 4, 32)
    tf = TeacherForced(net, x0)
    with torch.no_grad():
        torch.testing.assert_close(tf(x_t, t, text), net(x_t, t, text, shift_chunks(x0, CF)), rtol=0, atol=0)
        both = tf(torch.cat([x_t, x_t]), torch.cat([t, t]), random_text(4, 4, 32))
    assert both.shape[0] == 4
    assert tf.config.prediction == "x0"


def test_chunk_discriminator_one_logit_per_chunk_per_window():
    D, _ = chunk_d(window_frames=8)
    D.eval()
    x, t, text = torch.randn(2, 3, 16, 16, 16), torch.rand(2), random_text(2, 4, 32)
    with torch.no_grad():
        logits = D(x, t, text)
        assert logits.shape == (2, 8)  # 2 windows x 4 chunks per sample
        y = x.clone()
        y[:, :, 14:] += 1.0  # the last chunk of the second window
        other = D(y, t, text)
    torch.testing.assert_close(other[:, :7], logits[:, :7], rtol=0, atol=1e-6)  # windows judged apart, chunks causal
    assert (other[:, 7] - logits[:, 7]).abs().max() > 0
    # Window w of sample b is judged alone, as a clip of its own.
    with torch.no_grad():
        alone = D(windows(x, 8)[1:2], t[:1], text[0:1])
    torch.testing.assert_close(alone[0], logits[0, 4:], rtol=0, atol=1e-6)


def test_chunk_discriminator_streamed_context_sees_the_first_chunk():
    """d_context="stream": the clip chunk by chunk with D's own cache (sink + rolling window, as G streams). On a clip of
    the training length it is the windowed D; past it, every chunk is judged with the first chunk (the sink) in view,
    and gradients reach it through the cache."""
    D, _ = chunk_d(window_frames=8)
    D.eval()
    x, t, text = torch.randn(2, 3, 16, 16, 16), torch.rand(2), random_text(2, 4, 32)
    Ds = copy.deepcopy(D)
    Ds.context = "stream"
    with torch.no_grad():
        windowed, streamed = D(x, t, text), Ds(x, t, text)
        assert streamed.shape == (2, 8)
        torch.testing.assert_close(streamed[:, :4], windowed[:, :4], rtol=0, atol=1e-5)  # the first window: the same function
        y = x.clone()
        y[:, :, :2] += 1.0  # the first chunk only
        other_w, other_s = D(y, t, text), Ds(y, t, text)
    torch.testing.assert_close(other_w[:, 4:], windowed[:, 4:], rtol=0, atol=1e-6)  # the second window never sees it
    assert (other_s[:, 7] - streamed[:, 7]).abs().min() > 1e-4  # the last chunk, 6 chunks later, sees it through the sink
    with torch.no_grad():
        torch.testing.assert_close(streamed, cached_logits(Ds, x, t, text), rtol=0, atol=1e-5)  # one forward = its cached stream
    x.requires_grad_(True)
    Ds(x, t, text)[:, 7].sum().backward()
    assert x.grad[:, :, :2].abs().sum() > 0  # the sink's chunk, as the cache would carry it
    with pytest.raises(ValueError, match="'windows' or 'stream'"):
        ChunkDiscriminator(causal_tiny(), fractions=[0.5, 1.0], num_heads=2, window_frames=8, context="all")


@pytest.mark.parametrize("context", ["windows", "stream"])
def test_a_clean_context_d_reads_the_noisy_pass_at_a_readout_layer_before_the_last(context):
    """A D whose deepest readout layer is not the last block stops its backbone there; with a clean context the clean
    pass (or re-encode) runs first, so D must run every block and read the noisy pass, as a D reading the last block too."""
    backbone = causal_tiny(1, clean_context=True)
    shallow = ChunkDiscriminator(backbone, fractions=[0.5], num_heads=2, window_frames=8, context=context).eval()
    both = ChunkDiscriminator(copy.deepcopy(backbone), fractions=[0.5, 1.0], num_heads=2, window_frames=8, context=context).eval()
    x, t, text = torch.randn(2, 3, 16, 16, 16), torch.rand(2), random_text(2, 4, 32)
    with torch.no_grad():
        layer = shallow.layers[0]
        if context == "windows":
            a, b = shallow.hidden_states(x[:, :, :8], t, text)[layer], both.hidden_states(x[:, :, :8], t, text)[layer]
        else:
            a, b = streamed_features(shallow, x, t, text, layer), streamed_features(both, x, t, text, layer)
            torch.testing.assert_close(shallow.hidden_states(x, t, text)[layer], a, rtol=0, atol=1e-5)  # D's one forward
        logits = both(x, t, text)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    if context == "stream":
        torch.testing.assert_close(logits, cached_logits(both, x, t, text), rtol=0, atol=1e-5)


def cached_logits(D, x, t, text):
    """D's per-chunk logits through D's own cache, one cached step per chunk."""
    from apt.streaming import cache_for

    cache, prev, out = cache_for(D.backbone, x, text, inplace=True), torch.zeros_like(x[:, :, :CF]), []
    for i in range(x.shape[2] // CF):
        out.append(D.logit(D.readout(x[:, :, i * CF : (i + 1) * CF], t, text, prev_BCTHW=prev, cache=cache)))
        prev = x[:, :, i * CF : (i + 1) * CF]
    return torch.stack(out, dim=1)


def streamed_features(D, x, t, text, layer):
    """Layer ``layer``'s visual tokens of every chunk of D's streamed readout."""
    from apt.streaming import cache_for

    cache, prev, out = cache_for(D.backbone, x, text, inplace=True), torch.zeros_like(x[:, :, :CF]), []
    for i in range(x.shape[2] // CF):
        out.append(D.hidden_states(x[:, :, i * CF : (i + 1) * CF], t, text, prev_BCTHW=prev, cache=cache)[layer])
        prev = x[:, :, i * CF : (i + 1) * CF]
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("rollout", [StudentForcing(), TeacherForcing()], ids=["student-forcing", "teacher-forcing"])
def test_apt_step_relativistic_with_r2_on_per_chunk_logits(rollout):
    """D's step on the fakes of either forcing: teacher forcing's are made from the micro-batch's own real clips."""
    G, (D, a) = causal_tiny(), chunk_d(window_frames=8)
    a.gan_loss, a.r2_lambda, a.r1_sigma, a.d_warmup_steps = "relativistic", 10.0, 0.1, 10  # D step only, lr 0
    x, text = torch.randn(2, 3, 8, 16, 16), random_text(2, 4, 32)
    metrics = apt_step(G, D, [(x, text)], update_g=OptimizerUpdate(torch.optim.SGD(G.parameters(), lr=0.0), G),
                       update_d=OptimizerUpdate(torch.optim.SGD(D.parameters(), lr=0.0), D), update_ema=lambda d: None, a=a,
                       progress=AptProgress(), step_seed=5, generate=rollout)
    noise = SampleNoise(5, range(2))
    with torch.no_grad():
        fake = rollout(G, noise.randn(x.shape[1:], "cpu"), text, x)
        t = noise.timesteps(D, "cpu")
        real_p = x + a.r1_sigma * noise.randn(x.shape[1:], "cpu")
        fake_p = fake + a.r1_sigma * noise.randn(x.shape[1:], "cpu")
        d_real, d_fake, d_rp, d_fp = (D(v, t, text) for v in (x, fake, real_p, fake_p))
    assert d_real.shape == (2, 4)
    torch.testing.assert_close(metrics["r2"], a.r2_lambda * (d_fake - d_fp).pow(2).mean(), rtol=1e-4, atol=1e-7)
    expected = d_loss_relativistic(d_real, d_fake) + a.r1_lambda * (d_real - d_rp).pow(2).mean() + metrics["r2"]
    torch.testing.assert_close(metrics["loss_d"], expected, rtol=1e-4, atol=1e-6)


def test_apt_step_relativistic_g_step_trains_g_through_the_rollout():
    G, (D, a) = causal_tiny(), chunk_d(window_frames=8)
    a.gan_loss = "relativistic"
    G0 = copy.deepcopy(G.state_dict())
    G_ema = copy.deepcopy(G)
    x, text = torch.randn(2, 3, 8, 16, 16), random_text(2, 4, 32)
    metrics = apt_step(G, D, [(x, text)], update_g=OptimizerUpdate(torch.optim.Adam(G.parameters(), lr=1e-3), G),
                       update_d=OptimizerUpdate(torch.optim.Adam(D.parameters(), lr=1e-3), D), update_ema=lambda d: ema_update(G_ema, G, d),
                       a=a, progress=AptProgress(), step_seed=3, generate=StudentForcing(grad_chunks=2))
    assert "loss_g" in metrics and torch.isfinite(metrics["loss_g"])
    assert any(not torch.equal(v, G0[k]) for k, v in G.state_dict().items())
    assert g_loss_relativistic(torch.zeros(3), torch.zeros(3)) == pytest.approx(torch.nn.functional.softplus(torch.zeros(())).item())


@pytest.mark.parametrize("clean", [False, True], ids=["own-forward", "clean-context"])
def test_many_step_causal_sampling_keeps_one_cache_per_step_level(clean):
    net = causal_tiny(clean_context=clean).eval()
    text, negative = random_text(1, 4, 32), random_text(1, 1, 32)
    stepper = ChunkStepper(net, text, height=16, width=16, steps=3, negative=negative, cfg_scale=2.0)
    prev = torch.zeros(1, 3, 2, 16, 16)
    with torch.no_grad():
        for _ in range(5):
            prev, inputs = stepper.step(torch.randn(1, 3, 2, 16, 16), prev)
    assert len(stepper.caches) == 3 and len(inputs) == 3
    assert all(c.chunks_written == 5 and c.k[0].shape[0] == 2 for c in stepper.caches)  # CFG: prompt and negative batched
    assert torch.isfinite(prev).all()


def test_many_step_clean_context_stream_re_encodes_each_chunk_once():
    """Every step level of a clean-context stream sees the same clean past: level 0 re-encodes the chunk, the other levels
    copy it, and the stream equals one where every level re-encodes it itself."""
    net = causal_tiny(clean_context=True).eval()
    text, z = random_text(1, 4, 32), torch.randn(1, 3, 12, 16, 16)
    calls, step = [], DiT._causal_step

    def counted(self, *args, **kw):
        calls.append(kw.get("reencode", False))
        return step(self, *args, **kw)

    with torch.no_grad(), mock.patch.object(DiT, "_causal_step", counted):
        shared = stream_sample(net, z, text, steps=3)
    assert calls.count(True) == 5 and calls.count(False) == 18  # 5 re-encodes (chunks 0-4), 6 chunks x 3 levels
    with torch.no_grad(), mock.patch.object(KVCache, "take_clean_chunk", lambda self, other: None):
        own = stream_sample(net, z, text, steps=3)
    torch.testing.assert_close(shared, own, rtol=0, atol=1e-5)


# -- distribution matching on the rollouts (stream.dmd_weight > 0, apt.methods.dmd) --------------------------------------
@pytest.mark.parametrize("clean", [False, True], ids=["own-forward", "clean-context"])
def test_teacher_forced_stream_is_the_block_causal_forward_and_streams_past_it(clean):
    net = causal_tiny(clean_context=clean).eval()
    x0, text = torch.randn(2, 3, 8, 16, 16), random_text(2, 4, 32)
    x_t, t = torch.randn_like(x0), torch.tensor([0.3, 0.8])
    with torch.no_grad():
        streamed = teacher_forced_stream(net, x_t, t, text, x0)
        whole = TeacherForced(net, x0)(x_t, t, text)
    torch.testing.assert_close(streamed, whole, rtol=0, atol=1e-5)
    long0 = torch.cat([x0, torch.randn_like(x0)], dim=2)  # 8 chunks: past one block-causal forward
    long_t = torch.cat([x_t, x_t], dim=2)
    with torch.no_grad():
        out = teacher_forced_stream(net, long_t, t, text, long0)
        cache, chunks = net.new_cache(batch=2, height=16, width=16, text_tokens=4), []
        for i in range(0, 16, CF):  # a cached stream written at t, chunk i with the clean chunk i - 1 recycled
            chunks.append(net(long_t[:, :, i : i + CF], t, text, shift_chunks(long0, CF)[:, :, i : i + CF], cache=cache))
    torch.testing.assert_close(out[:, :, :8], whole, rtol=0, atol=1e-5)  # the past never sees the future
    torch.testing.assert_close(out, torch.cat(chunks, dim=2), rtol=0, atol=1e-5)


def test_dmd_loss_gradient_is_the_normalised_score_difference():
    real, fake = causal_tiny(1).eval(), causal_tiny(2).eval()
    x = torch.randn(2, 3, 8, 16, 16, requires_grad=True)
    text, t, eps = random_text(2, 4, 32), torch.tensor([0.2, 0.7]), torch.randn(2, 3, 8, 16, 16)
    dmd_loss(x, real, fake, text, None, cfg_scale=1.0, t_B=t, eps=eps).backward()
    with torch.no_grad():
        x_t = (1 - t.view(-1, 1, 1, 1, 1)) * x + t.view(-1, 1, 1, 1, 1) * eps
        x0_real = x_t - t.view(-1, 1, 1, 1, 1) * teacher_forced_stream(real, x_t, t, text, x)
        x0_fake = x_t - t.view(-1, 1, 1, 1, 1) * teacher_forced_stream(fake, x_t, t, text, x)
        g = (x0_fake - x0_real) / (x - x0_real).abs().mean(dim=(1, 2, 3, 4), keepdim=True)
    torch.testing.assert_close(x.grad, g / x.numel(), rtol=1e-4, atol=1e-9)
    x.grad = None
    dmd_loss(x, real, real, text, None, cfg_scale=1.0, t_B=t, eps=eps).backward()  # fake == real: nothing to move
    assert x.grad.abs().max() == 0


def bidirectional_tiny(seed: int = 0):
    torch.manual_seed(seed)
    net = build_dit("tiny")
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.05)
    return net


def test_whole_clip_windows_average_the_overlapping_windows_of_a_bidirectional_net():
    net, read = bidirectional_tiny().eval(), WholeClipWindows(8)
    assert read.starts(16) == [0, 4, 8] and read.starts(8) == [0] and read.starts(10) == [0, 2]  # the last window ends the clip
    x_t, text, t = torch.randn(2, 3, 16, 16, 16), random_text(2, 4, 32), torch.tensor([0.3, 0.8])
    with torch.no_grad():
        out = read(net, x_t, t, text, torch.zeros_like(x_t))
        a, b, c = (net(x_t[:, :, s : s + 8], t, text) for s in (0, 4, 8))
        torch.testing.assert_close(read(net, x_t[:, :, :8], t, text, x_t[:, :, :8]), a, rtol=0, atol=1e-6)  # one window: the whole clip
    torch.testing.assert_close(out[:, :, :4], a[:, :, :4], rtol=0, atol=1e-6)
    torch.testing.assert_close(out[:, :, 4:8], (a[:, :, 4:] + b[:, :, :4]) / 2, rtol=0, atol=1e-6)
    torch.testing.assert_close(out[:, :, 8:12], (b[:, :, 4:] + c[:, :, :4]) / 2, rtol=0, atol=1e-6)
    torch.testing.assert_close(out[:, :, 12:], c[:, :, 4:], rtol=0, atol=1e-6)
    later = x_t.clone()
    later[:, :, 12:] += 1.0  # frames 12-15 lie in the last window only: the first window's frames cannot see them
    with torch.no_grad():
        changed = read(net, later, t, text, torch.zeros_like(x_t))
    torch.testing.assert_close(changed[:, :, :4], out[:, :, :4], rtol=0, atol=1e-6)
    assert (changed[:, :, 8:12] - out[:, :, 8:12]).abs().max() > 1e-3  # the window 8-15 sees them
    with pytest.raises(ValueError, match="a rollout of 6 frames is shorter than the score's 8-frame window"):
        read(net, x_t[:, :, :6], t, text, x_t[:, :, :6])


@pytest.mark.parametrize("scores", ["causal", "bidirectional"])
def test_apt_step_with_distribution_matching_trains_g_and_the_fake_score_not_the_teacher(scores):
    G, (D, a) = causal_tiny(), chunk_d(window_frames=8)
    a.gan_loss, a.d_warmup_steps = "relativistic", 0
    teacher_net = causal_tiny if scores == "causal" else bidirectional_tiny
    teacher, fake = teacher_net(3).requires_grad_(False), teacher_net(3)
    read = {} if scores == "causal" else {"read": WholeClipWindows(8)}
    before = {n: copy.deepcopy(m.state_dict()) for n, m in (("G", G), ("teacher", teacher), ("fake", fake))}
    dmd = DistributionMatching(teacher, fake, OptimizerUpdate(torch.optim.Adam(fake.parameters(), lr=1e-3), fake), weight=1.0,
                               cfg_scale=3.0, fake_steps=2, negative=lambda n: random_text(n, 4, 32), **read)
    x, text = torch.randn(2, 3, 16, 16, 16), random_text(2, 4, 32)
    metrics = apt_step(G, D, [(x, text)], update_g=OptimizerUpdate(torch.optim.Adam(G.parameters(), lr=1e-3), G),
                       update_d=OptimizerUpdate(torch.optim.Adam(D.parameters(), lr=1e-3), D), update_ema=lambda d: None, a=a,
                       progress=AptProgress(), step_seed=3, generate=StudentForcing(), extra=dmd)
    assert metrics["loss_dmd"] > 0 and metrics["loss_fake_score"] > 0 and metrics["loss_g"] > metrics["loss_dmd"]
    changed = {n: any(not torch.equal(v, before[n][k]) for k, v in m.state_dict().items()) for n, m in (("G", G), ("teacher", teacher), ("fake", fake))}
    assert changed == {"G": True, "teacher": False, "fake": True}
