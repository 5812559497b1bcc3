"""Causal mode of the built-in DiT (AAPT §3.1): block-causal attention, input recycling, the rolling
key/value cache. Exactness: a cached chunk-by-chunk stream equals one block-causal forward; future
frames never change past outputs; the cache stops growing once the window is full."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from apt.models import build_dit
from apt.models.backbone import TextCond
from apt.models.causal import block_causal_mask, shift_chunks
from apt.models.kv_cache import KVCache
from tests.conftest import random_text

CF = 2  # frames per chunk of the tiny causal model (its temporal patch)


def causal_tiny(sink: int = 1, window: int = 2, seed: int = 0, clean: bool = False):
    torch.manual_seed(seed)
    net = build_dit("tiny", causal_chunk_frames=CF, sink_chunks=sink, window_chunks=window, clean_context=clean)
    for p in net.parameters():  # past the zero inits, so every path carries signal
        torch.nn.init.normal_(p, std=0.05)
    return net.eval()


def stream(net, x, t, text, prev, cache=None):
    """Chunk by chunk through a cache; returns the outputs concatenated over time."""
    B, _, T, H, W = x.shape
    cache = cache or net.new_cache(batch=B, height=H, width=W, text_tokens=text.emb_BLD.shape[1])
    outs = [net(x[:, :, i : i + CF], t, text, prev[:, :, i : i + CF], cache=cache) for i in range(0, T, CF)]
    return torch.cat(outs, dim=2), cache


def test_causal_switch_off_is_the_bidirectional_model_and_loads_the_shipped_teacher():
    # Recorded with the code before causal mode existed (same seed, inputs and tiny flavour).
    torch.manual_seed(0)
    net = build_dit("tiny")
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.05)
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(2, 3, 4, 16, 16, generator=g), torch.tensor([0.3, 0.9])
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, 3:] = False
    text = TextCond(torch.randn(2, 5, 32, generator=g), mask)
    with torch.no_grad():
        out = net(x, t, text)
    torch.testing.assert_close(out.double().sum().item(), -56.40908394561848, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(out.flatten()[:3].tolist(), [-5.218098163604736, -2.57368803024292, -1.634594440460205], rtol=1e-5, atol=1e-6)
    assert not any("recycle" in k for k in net.state_dict())
    build_dit("demo").load_state_dict(load_file("assets/demo_teacher/net_ema.safetensors"))  # strict: unchanged keys
    with pytest.raises(ValueError, match="causal model"):
        net(x, t, text, prev_BCTHW=x)


def test_causal_model_holds_the_bidirectional_weights_plus_a_zero_recycling_layer():
    bidirectional, causal = build_dit("tiny").state_dict(), build_dit("tiny", causal_chunk_frames=CF).state_dict()
    assert set(causal) - set(bidirectional) == {"recycle_embed.weight", "recycle_embed.bias"}
    assert set(bidirectional) <= set(causal)
    net = build_dit("tiny", causal_chunk_frames=CF)
    assert not net.recycle_embed.weight.any() and not net.recycle_embed.bias.any()


def test_recycled_input_has_no_effect_at_init():
    net = causal_tiny()
    torch.nn.init.zeros_(net.recycle_embed.weight)
    torch.nn.init.zeros_(net.recycle_embed.bias)
    x, t, text = torch.randn(2, 3, 6, 16, 16), torch.rand(2), random_text(2, 4, 32)
    with torch.no_grad():
        torch.testing.assert_close(net(x, t, text, torch.randn_like(x)), net(x, t, text, torch.randn_like(x)), rtol=0, atol=0)


@pytest.mark.parametrize("clean", [False, True], ids=["own-forward", "clean-context"])
@pytest.mark.parametrize("sink,window", [(1, 2), (2, 1), (1, 0)])
def test_cached_stream_equals_one_block_causal_forward(sink, window, clean):
    net = causal_tiny(sink, window, clean=clean)
    T = CF * (sink + window + 1)
    x, prev, t = torch.randn(2, 3, T, 16, 16), torch.randn(2, 3, T, 16, 16), torch.rand(2)
    text = random_text(2, 5, 32, pad_from=3)
    with torch.no_grad():
        full = net(x, t, text, prev)
        streamed, _ = stream(net, x, t, text, prev)
    torch.testing.assert_close(streamed, full, rtol=0, atol=1e-5)


def test_splits_of_one_cache_size_agree_on_short_clips_and_differ_past_them():
    """(sink, window) = (1, 2) and (2, 1): the same function on clips of up to 4 chunks (what the earlier stages train
    on); past that, (2, 1) keeps chunk 1 in view instead of chunk i - 2."""
    a, b = causal_tiny(1, 2), causal_tiny(2, 1)
    b.load_state_dict(a.state_dict())
    x, prev, t, text = torch.randn(2, 3, 16, 16, 16), torch.randn(2, 3, 16, 16, 16), torch.rand(2), random_text(2, 4, 32)
    with torch.no_grad():
        torch.testing.assert_close(a(x[:, :, :8], t, text, prev[:, :, :8]), b(x[:, :, :8], t, text, prev[:, :, :8]), rtol=0, atol=0)
        sa, _ = stream(a, x, t, text, prev)
        sb, _ = stream(b, x, t, text, prev)
    torch.testing.assert_close(sa[:, :, :8], sb[:, :, :8], rtol=0, atol=1e-6)
    assert (sa[:, :, 8:] - sb[:, :, 8:]).abs().max() > 1e-4  # 100x the agreement above


@pytest.mark.parametrize("frames", [8, 16], ids=["within-the-cache", "past-the-cache"])
def test_an_empty_prompt_streams_finite_and_equal(frames):
    net = causal_tiny()
    x, t = torch.randn(1, 3, frames, 16, 16), torch.rand(1)
    text = TextCond(torch.zeros(1, 1, 32), torch.zeros(1, 1, dtype=torch.bool))  # what the encoder gives ""
    with torch.no_grad():
        full = net(x, t, text)
        streamed, _ = stream(net, x, t, text, shift_chunks(x, CF))
    assert torch.isfinite(full).all()
    torch.testing.assert_close(streamed, full, rtol=0, atol=1e-5)


@pytest.mark.parametrize("clean", [False, True], ids=["own-forward", "clean-context"])
def test_future_frames_never_change_past_outputs(clean):
    net = causal_tiny(clean=clean)
    x, prev, t, text = torch.randn(2, 3, 8, 16, 16), torch.randn(2, 3, 8, 16, 16), torch.rand(2), random_text(2, 4, 32)
    x2, prev2 = x.clone(), prev.clone()
    x2[:, :, 4:] += torch.randn_like(x2[:, :, 4:])
    prev2[:, :, 4:] += 1.0
    with torch.no_grad():
        a, b = net(x, t, text, prev), net(x2, t, text, prev2)
        sa, _ = stream(net, torch.cat([x, x], 2), t, text, torch.cat([prev, prev], 2))
        sb, _ = stream(net, torch.cat([x, x2], 2), t, text, torch.cat([prev, prev2], 2))
    torch.testing.assert_close(a[:, :, :4], b[:, :, :4], rtol=0, atol=0)
    assert (a[:, :, 4:] - b[:, :, 4:]).abs().max() > 1e-3
    torch.testing.assert_close(sa[:, :, :12], sb[:, :, :12], rtol=0, atol=0)  # a long stream too


def test_clean_input_recycles_its_own_chunks_by_default():
    net = causal_tiny()
    x, t, text = torch.randn(2, 3, 6, 16, 16), torch.rand(2), random_text(2, 4, 32)
    with torch.no_grad():
        torch.testing.assert_close(net(x, t, text), net(x, t, text, shift_chunks(x, CF)), rtol=0, atol=0)
    assert torch.equal(shift_chunks(x, CF)[:, :, 2:4], x[:, :, 0:2]) and not shift_chunks(x, CF)[:, :, :2].any()


def test_cache_stops_growing_once_the_window_is_full():
    net = causal_tiny(sink=1, window=2)
    B, n_chunks = 2, 12
    x, t, text = torch.randn(B, 3, CF * n_chunks, 16, 16), torch.rand(B), random_text(B, 4, 32)
    cache = net.new_cache(batch=B, height=16, width=16, text_tokens=4)
    nbytes, shapes, visible, positions = cache.nbytes(), [k.shape for k in cache.k], [], []
    prev = torch.zeros_like(x[:, :, :CF])
    with torch.no_grad():
        for i in range(n_chunks):
            positions.append(max(p for p in cache.step_positions() if p is not None))
            prev = net(x[:, :, CF * i : CF * (i + 1)], t, text, prev, cache=cache)
            visible.append(len(cache.visible_chunks()))
            assert torch.isfinite(prev).all()
    assert cache.nbytes() == nbytes and [k.shape for k in cache.k] == shapes
    assert visible == [1, 2, 3, 4] + [4] * (n_chunks - 4)  # sink + window + current, then constant
    assert positions == [0, 1, 2, 3] + [3] * (n_chunks - 4)  # RoPE positions never leave the trained range
    assert cache.visible_chunks() == [0, n_chunks - 3, n_chunks - 2, n_chunks - 1]


def test_kv_cache_bookkeeping_sink_ring_and_positions():
    cache = KVCache(depth=1, batch=1, num_heads=1, head_dim=2, text_tokens=3, chunk_tokens=2, sink_chunks=2, window_chunks=3)
    for i in range(20):
        positions = cache.step_positions()
        held = dict(zip(range(cache.chunk_slots), cache.chunk_in_slot))
        held[cache.chunk_slot(i)] = i
        expected_visible = sorted({j for j in range(i + 1) if j < 2 or j >= i - 3})
        assert sorted(j for j in held.values() if j is not None) == expected_visible
        for slot, j in held.items():
            if j is not None:
                assert positions[slot] == (j if j < 2 else j - max(0, i - 5))
        assert positions[cache.chunk_slot(i)] == min(i, 5)
        cache.commit()


@pytest.mark.parametrize("clean", [False, True], ids=["own-forward", "clean-context"])
@pytest.mark.parametrize("sink,window", [(1, 2), (2, 1), (3, 0), (1, 0)])
def test_a_full_forward_longer_than_the_cache_equals_its_stream_with_gradients(sink, window, clean):
    """Past sink + window + 1 chunks one forward computes every chunk as its cached step does (``RollingViews``: each
    chunk's own views of the sink and window at their window-relative positions), values and gradients."""
    net = causal_tiny(sink, window, clean=clean).train()
    T = CF * 9
    x, prev, t = torch.randn(2, 3, T, 16, 16), torch.randn(2, 3, T, 16, 16), torch.rand(2)
    text = random_text(2, 5, 32, pad_from=3)
    weight = torch.randn(2, 3, T, 16, 16)

    def grads(out):
        net.zero_grad()
        (out * weight).sum().backward()
        return {k: p.grad.clone() for k, p in net.named_parameters() if p.grad is not None}

    full = net(x, t, text, prev)
    cache = net.new_cache(batch=2, height=16, width=16, text_tokens=5, inplace=False)
    streamed, _ = stream(net, x, t, text, prev, cache)
    torch.testing.assert_close(full, streamed, rtol=0, atol=1e-5)
    g_full, g_stream = grads(full), grads(streamed)
    assert g_full.keys() == g_stream.keys() and "recycle_embed.weight" in g_full
    for k in g_full:  # float32 sums over every token in a different order: compare to the gradient's own scale
        assert (g_full[k] - g_stream[k]).abs().max() <= 1e-5 * g_full[k].abs().max() + 1e-8, k


@pytest.mark.parametrize("clean", [False, True], ids=["own-forward", "clean-context"])
def test_a_long_full_forward_in_groups_of_chunks_is_the_same_function(clean, monkeypatch):
    """The gathered views hold V copies of the window: past ``RollingViews.GATHER_LIMIT`` elements the chunks attend in
    groups (here one chunk at a time), with the same result."""
    from apt.models.dit import RollingViews

    net = causal_tiny(2, 1, clean=clean)
    x, t, text = torch.randn(2, 3, 14, 16, 16), torch.rand(2), random_text(2, 5, 32, pad_from=3)
    with torch.no_grad():
        whole = net(x, t, text)
        monkeypatch.setattr(RollingViews, "GATHER_LIMIT", 1)
        grouped = net(x, t, text)
    torch.testing.assert_close(grouped, whole, rtol=0, atol=1e-6)


def test_a_long_full_forward_checkpoints_and_never_lets_the_future_reach_the_past():
    net = causal_tiny(sink=2, window=1)
    x, t, text = torch.randn(1, 3, 14, 16, 16, requires_grad=True), torch.rand(1), random_text(1, 4, 32)
    out = net(x, t, text)
    out[:, :, 8:10].sum().backward()  # chunk 4 (past the cache's 4 chunks)
    seen = x.grad.abs().sum(dim=(0, 1, 3, 4)).reshape(7, 2).sum(1)
    assert (seen[:5] > 0).all() and (seen[5:] == 0).all()
    net.gradient_checkpointing = True
    x.grad = None
    again = net(x, t, text)
    again[:, :, 8:10].sum().backward()
    torch.testing.assert_close(again, out, rtol=0, atol=0)
    torch.testing.assert_close(x.grad.abs().sum(dim=(0, 1, 3, 4)).reshape(7, 2).sum(1), seen, rtol=1e-5, atol=0)


def test_full_forward_shapes_and_streams_need_prev():
    net = causal_tiny(sink=1, window=1)
    x, t, text = torch.randn(1, 3, 8, 16, 16), torch.rand(1), random_text(1, 4, 32)
    with pytest.raises(ValueError, match="whole number"):
        build_dit("tiny", patch_size=(1, 4, 4), causal_chunk_frames=2)(x[:, :, :3], t, text)
    cache = net.new_cache(batch=1, height=16, width=16, text_tokens=4)
    with torch.no_grad():
        net(x[:, :, :2], t, text, cache=cache)
        with pytest.raises(ValueError, match="needs prev_BCTHW"):
            net(x[:, :, 2:4], t, text, cache=cache)
    with pytest.raises(ValueError, match="multiple of the temporal patch"):
        build_dit("tiny", causal_chunk_frames=3)


def test_block_causal_mask_text_sees_text_only():
    mask = block_causal_mask(torch.tensor([[True, True, False]]), 4, 2, sink_chunks=1, window_chunks=1)[0, 0]
    L = 3
    assert not mask[:L, L:].any()  # text queries never see visual keys
    assert mask[2, 2] and not mask[0, 2]  # a padded text token sees itself only among padding
    chunk = lambda q, k: bool(mask[L + 2 * q, L + 2 * k])  # noqa: E731
    assert [chunk(3, k) for k in range(4)] == [True, False, True, True]  # sink, (evicted), previous, itself
    assert [chunk(1, k) for k in range(4)] == [True, True, False, False]


def test_gradients_flow_through_a_functional_cache():
    net = causal_tiny()
    x, t, text = torch.randn(1, 3, 4, 16, 16), torch.ones(1), random_text(1, 4, 32)
    cache = net.new_cache(batch=1, height=16, width=16, text_tokens=4, inplace=False)
    a = net(x[:, :, :2], t, text, cache=cache)
    b = net(x[:, :, 2:], t, text, a, cache=cache)
    b.sum().backward()  # through the recycled chunk and the cached keys/values of chunk 0
    assert net.recycle_embed.weight.grad is not None and net.recycle_embed.weight.grad.abs().sum() > 0


def test_clean_context_reads_the_clean_previous_chunks_not_the_noisy_ones():
    """With model.clean_context the earlier chunks are seen through their clean frames (the recycled inputs of the
    chunks after them) at t = 0: the noisy input of an earlier chunk no longer reaches a later chunk's output, its
    clean frames do; the first chunk is the same function as without the switch."""
    own, clean = causal_tiny(), causal_tiny(clean=True)
    clean.load_state_dict(own.state_dict())  # the switch adds no weights
    x, prev, t, text = torch.randn(2, 3, 6, 16, 16), torch.randn(2, 3, 6, 16, 16), torch.rand(2), random_text(2, 4, 32)
    x2 = x.clone()
    x2[:, :, :2] += 1.0  # chunk 0's noisy input
    with torch.no_grad():
        a, b = clean(x, t, text, prev), clean(x2, t, text, prev)
        torch.testing.assert_close(a[:, :, 2:], b[:, :, 2:], rtol=0, atol=1e-6)  # later chunks ignore chunk 0's noisy input
        assert (own(x, t, text, prev)[:, :, 2:] - own(x2, t, text, prev)[:, :, 2:]).abs().max() > 1e-3  # without the switch they do not
        torch.testing.assert_close(a[:, :, :2], own(x, t, text, prev)[:, :, :2], rtol=0, atol=1e-6)
        prev3 = prev.clone()
        prev3[:, :, 2:4] += 1.0  # chunk 0's clean frames reach chunk 2 through the clean pass, not only chunk 1 via recycling
        assert (clean(x, t, text, prev3)[:, :, 4:] - a[:, :, 4:]).abs().max() > 1e-3


def test_a_clean_stream_encodes_the_text_at_t0_once_and_equals_re_encoding_it_every_chunk():
    """The text attends to the text only, so its keys and values at t = 0 never change: the first re-encode computes
    them beside its chunk, later re-encodes run on the chunk's tokens alone. Past the window (6 chunks, sink 1 +
    window 1), the stream equals one whose every re-encode computes the text again."""
    net = causal_tiny(1, 1, clean=True)
    x, prev, t, text = torch.randn(2, 3, 12, 16, 16), torch.randn(2, 3, 12, 16, 16), torch.rand(2), random_text(2, 5, 32, pad_from=3)
    lengths = []
    hook = net.blocks[0].register_forward_pre_hook(lambda _, args: lengths.append(args[0].shape[1]))
    with torch.no_grad():
        kept, cache = stream(net, x, t, text, prev)
    hook.remove()
    L, n = 5, 16  # text tokens; tokens per chunk (16x16 frames, 4x4 patches, one temporal patch)
    # chunk 0 with the text; chunk 1's call: the first re-encode (text at t = 0 and chunk 0), then chunk 1; then chunks only
    assert lengths == [L + n, L + n, n] + [n, n] * 4
    assert cache.has_clean_text

    def forget_clean_text(module, args, kwargs):
        cache.clean_text_k, cache.clean_text_v = [None] * len(cache.k), [None] * len(cache.k)

    cache = net.new_cache(batch=2, height=16, width=16, text_tokens=5)
    hook = net.register_forward_pre_hook(forget_clean_text, with_kwargs=True)
    with torch.no_grad():
        again, _ = stream(net, x, t, text, prev, cache)
    hook.remove()
    torch.testing.assert_close(kept, again, rtol=0, atol=1e-6)


def test_a_run_config_builds_the_clean_context_model():
    from apt.config import load_config
    from apt.models.factory import build_backbone

    c = load_config("recipes/demo/stream_teacher.yaml", ["tiny"], ["model.clean_context=true"])
    assert build_backbone(c, text_dim=32).config.clean_context
    assert not build_backbone(load_config("recipes/demo/stream_teacher.yaml", ["tiny"], []), text_dim=32).config.clean_context


def test_loading_a_causal_checkpoint_under_the_other_clean_context_is_refused(tmp_path):
    from safetensors.torch import save_file

    from apt.config import load_config, save_config
    from apt.models.factory import build_backbone, load_backbone

    clean = load_config("recipes/demo/stream_distill.yaml", ["tiny"], ["model.clean_context=true"])
    save_config(clean, tmp_path / "config.yaml")
    save_file(build_backbone(clean, text_dim=32).state_dict(), str(tmp_path / "net_ema.safetensors"))
    assert load_backbone(clean, str(tmp_path), "net_ema", text_dim=32).config.clean_context
    default = load_config("recipes/demo/stream_distill.yaml", ["tiny"], [])
    with pytest.raises(ValueError, match="was trained with model.clean_context=true; this run has model.clean_context=false"):
        load_backbone(default, str(tmp_path), "net_ema", text_dim=32)


def test_clean_context_refuses_gradient_checkpointing():
    net = causal_tiny(clean=True).train()
    net.gradient_checkpointing = True
    x, t, text = torch.randn(1, 3, 4, 16, 16), torch.rand(1), random_text(1, 4, 32)
    with pytest.raises(ValueError, match="clean_context does not support gradient checkpointing"):
        net(x, t, text)
    with pytest.raises(ValueError, match="clean_context needs causal mode"):
        build_dit("tiny", clean_context=True)


def test_a_clean_context_checkpoint_streams_through_a_session_and_switches_prompts(tmp_path):
    from safetensors.torch import save_file

    from apt.config import load_config, save_config
    from apt.inference import load_generator
    from apt.models.factory import build_backbone
    from apt.streaming import StreamSession, stream_sample
    from apt.text import TextEncoder

    c = load_config("recipes/demo/stream_distill.yaml", ["tiny"], ["model.clean_context=true"])
    save_config(c, tmp_path / "config.yaml")
    net = build_backbone(c, text_dim=TextEncoder.load(c.text.encoder).dim)
    torch.manual_seed(0)
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.05)
    save_file(net.state_dict(), str(tmp_path / "net_ema.safetensors"))
    gen = load_generator(tmp_path)
    assert gen.net.config.clean_context
    session = StreamSession(gen, "a circle moving left on a black background", seed=3)
    frames = torch.cat([session.next_chunk() for _ in range(6)], dim=2)
    # The session is the batched stream of the same noise (each chunk's re-encode included).
    g = torch.Generator().manual_seed(3)
    shape = (1, c.data.channels, CF, c.data.height, c.data.width)
    z = torch.cat([torch.randn(shape, generator=g) for _ in range(6)], dim=2)
    with torch.no_grad():
        x = stream_sample(gen.net, z, gen.text_encoder.encode(["a circle moving left on a black background"]))
    torch.testing.assert_close(frames, x, rtol=0, atol=1e-5)  # a pixel-space model: the decoded chunks are the chunks

    # A prompt switch re-caches the chunks in view. Under the same prompt before anything has left the window (chunk 3,
    # sink 1 + window 2): the stream goes on as if nothing happened (chunks 0-1 re-encoded at once, chunk 2 by the next step).
    prompt, other = "a circle moving left on a black background", "a square moving up on a gray background"

    def chunks(gen, switch_to, n=6, at=3, **sampler):
        s = StreamSession(gen, prompt, seed=5, **sampler)
        out = []
        for i in range(n):
            if i == at and switch_to:
                s.set_prompt(switch_to)
            out.append(s.next_chunk())
        return out, s

    (plain, _), (same, _), (switched, _) = chunks(gen, None), chunks(gen, prompt), chunks(gen, other)
    for a, b in zip(plain, same):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    assert (plain[3] - switched[3]).abs().max() > 1e-4  # the new prompt from the next chunk on
    (plain2, _), (same2, _) = chunks(gen, None, steps=2, cfg_scale=3.0), chunks(gen, prompt, steps=2, cfg_scale=3.0)  # levels, CFG
    for a, b in zip(plain2, same2):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    # Past the window (sink 2 + window 1, switch at chunk 5): the ring holds chunks 3 and 4, so the replay is 0, 1, 3, 4;
    # chunk 1 is re-encoded from its own frames, not from chunk 3's recycled input, so the sink's clean keys survive.
    split = load_generator(tmp_path, cache_layout=(2, 1))
    s = StreamSession(split, prompt, seed=5)
    for _ in range(5):
        s.next_chunk()
    cache = s.stepper.caches[0]
    L, n = cache.text_tokens, cache.chunk_tokens
    sink_before = [k[:, :, L : L + 2 * n].clone() for k in cache.k]
    s.set_prompt(prompt)
    assert sorted(s.kept) == [0, 1, 2, 3] and s.stepper.chunks_made == 4 and s.chunks_made == 5
    for before, after in zip(sink_before, s.stepper.caches[0].k):
        torch.testing.assert_close(after[:, :, L : L + 2 * n], before, rtol=0, atol=1e-6)
    assert s.next_chunk().shape == plain[0].shape
