"""Performance switches prove they change no math (STYLE.md): each fast path against the plain one,
with the tolerance stated in the test; plus the analytic FLOP counts against FlopCounterMode."""

from __future__ import annotations

import warnings
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from apt.config import ConfigError, check_perf, load_config
from apt.models import TextCond, build_dit, readout_layers
from apt.models.attention import attention, attention_backend, get_attention_backend
from apt.models.dit import DiTConfig
from apt.models.flops import apt_step_flops, count_flops, dit_forward_flops, visual_tokens
from apt.models.layers import RMSNorm, apply_rope, rms_norm_rope, rope_3d
from apt.perf import PerfConfig, apply_perf, perf_from_overrides
from apt.perf.bench import randomize_zero_init, relative_error
from apt.perf.fp8 import E4M3_MAX, FP8Linear, convert_to_fp8, fake_quantize_e4m3, quantize_e4m3
from tests.conftest import GPU, random_text

FP32_TOL = dict(atol=1e-5, rtol=1e-5)  # same math, different kernel / summation order


def tiny_dit(seed: int = 0, flavour: str = "tiny"):
    torch.manual_seed(seed)
    net = build_dit(flavour)
    randomize_zero_init(net)  # a fresh DiT outputs exactly 0 (adaLN-Zero); make it a real function
    return net.eval()


def tiny_inputs(B: int = 2, T: int = 4, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, 3, T, 16, 16, generator=g)
    text = TextCond(torch.randn(B, 5, 32, generator=g), torch.tensor([[1, 1, 1, 0, 0]] + [[1] * 5] * (B - 1)).bool())
    return x, torch.rand(B, generator=g), text


# -- analytic FLOPs ------------------------------------------------------------------------------
@pytest.mark.parametrize("T,pad", [(4, None), (1, None), (8, 3)])
def test_dit_flops_match_flop_counter_exactly(T, pad):
    net = build_dit("tiny")
    x = torch.randn(2, 3, T, 16, 16)
    text = random_text(2, 5, 32, pad_from=pad)
    counted, _ = count_flops(lambda: net(x, torch.rand(2), text))
    analytic = dit_forward_flops(net.config, batch=2, frames=T, height=16, width=16, text_tokens=5)
    assert counted == analytic.total


def test_production_shape_flops_are_in_the_papers_range():
    """apt-8b at 1280x720x49 (latent 16 x 13 x 90 x 160): 46,800 visual tokens; ~1.5e15 FLOPs.

    The paper's ~1.7e15 counts all 7.88B parameters per token; the adaLN modulation (2B of them)
    acts once per sample, not per token.
    """
    from apt.models.registry import FLAVOURS

    c = FLAVOURS["apt-8b"]
    assert visual_tokens(c, frames=13, height=90, width=160) == 46_800
    f = dit_forward_flops(c, batch=1, frames=13, height=90, width=160, text_tokens=256)
    assert 1.4e15 < f.total < 1.7e15
    assert 0.6 < f.attention / f.total < 0.7  # attention dominates at 47k tokens


@pytest.mark.parametrize("checkpointing, policy", [(False, "full"), (True, "full"), (True, "attention"), (True, "attention_and_matmul")])
def test_apt_step_flops_match_flop_counter_on_tiny(checkpointing, policy):
    """One D step + one G step counted by FlopCounterMode vs ``apt_step_flops`` (hardware FLOPs).

    Tolerance 1% (measured 0.09%): the analytic model follows autograd's skipped input gradients
    and D's unused velocity output layer-by-layer, except for a few small per-sample matmuls.
    """
    from apt.discriminator import Discriminator
    from apt.losses import approximate_r1, d_loss_nonsaturating, g_loss_nonsaturating

    G, backbone = tiny_dit(0), tiny_dit(1)
    D = Discriminator(backbone, fractions=[16 / 36, 26 / 36, 1.0], num_heads=2)
    for net in (G, backbone):
        net.train().gradient_checkpointing, net.checkpoint_policy = checkpointing, policy
    x, _, text = tiny_inputs()
    B = x.shape[0]

    def step():
        with torch.no_grad():
            fake = torch.randn_like(x) - G(torch.randn_like(x), torch.ones(B), text)
        logits = D(torch.cat([x, x + 0.01 * torch.randn_like(x), fake]), torch.rand(B).repeat(3), text.repeat(3))
        real, pert, fake_l = logits.split(B)
        (d_loss_nonsaturating(real, fake_l) + approximate_r1(real, pert, weight=100.0)).backward()
        D.requires_grad_(False)
        fake = torch.randn_like(x) - G(torch.randn_like(x), torch.ones(B), text)
        g_loss_nonsaturating(D(fake, torch.rand(B), text)).backward()
        D.requires_grad_(True)

    counted, _ = count_flops(step)
    analytic = apt_step_flops(G.config, batch=B, frames=4, height=16, width=16, text_tokens=5, readout_layers=D.layers,
                              checkpointing=checkpointing, checkpoint_policy=policy)
    assert analytic["model"] < analytic["hardware"]
    assert abs(analytic["hardware"] - counted) / counted < 0.01, (analytic, counted)


# -- attention backend ---------------------------------------------------------------------------
def test_attention_backend_is_applied_and_scoped(monkeypatch):
    """apply_perf(attention_backend='math') restricts SDPA to the math kernel during the model's
    forward only (checked through the global SDPA flags that ``sdpa_kernel`` sets)."""
    seen = []
    real_sdpa = F.scaled_dot_product_attention

    def spy(*args, **kwargs):
        seen.append((get_attention_backend(), torch.backends.cuda.math_sdp_enabled(), torch.backends.cuda.flash_sdp_enabled()))
        return real_sdpa(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    net = apply_perf(tiny_dit(), PerfConfig(attention_backend="math"))
    net(*tiny_inputs())
    assert seen and all(s == ("math", True, False) for s in seen)
    assert get_attention_backend() == "auto" and torch.backends.cuda.flash_sdp_enabled()


def test_attention_backend_restored_after_an_error():
    net = apply_perf(tiny_dit(), PerfConfig(attention_backend="math"))
    x, t, text = tiny_inputs()
    with pytest.raises(RuntimeError):
        net(x[:, :2], t, text)  # wrong channel count
    assert get_attention_backend() == "auto"


@pytest.mark.parametrize("backend", ["math", "flash"])  # the two SDPA kernels that run on CPU
def test_attention_backend_matches_auto(backend):
    x, t, text = tiny_inputs()
    ref = tiny_dit()(x, t, text)
    out = apply_perf(tiny_dit(), PerfConfig(attention_backend=backend))(x, t, text)
    torch.testing.assert_close(out, ref, **FP32_TOL)


def test_attention_backend_errors():
    with pytest.raises(ValueError, match="unknown attention backend"):
        with attention_backend("fastest"):
            pass
    with pytest.raises(ConfigError, match="perf.attention_backend"):
        apply_perf(tiny_dit(), PerfConfig(attention_backend="fastest"))
    q = torch.randn(1, 2, 4, 8)
    with attention_backend("efficient"), pytest.raises(RuntimeError):
        attention(q, q, q)  # a CUDA-only kernel: SDPA refuses on CPU rather than silently falling back


# -- torch.compile ---------------------------------------------------------------------------------
def test_compile_wraps_each_block_and_keeps_parameter_names():
    net = tiny_dit()
    keys = list(net.state_dict())
    apply_perf(net, PerfConfig(compile=True, compile_backend="eager"))
    assert all(block._compiled_call_impl is not None for block in net.blocks)
    assert list(net.state_dict()) == keys


@pytest.mark.parametrize("text_padding", ["mask", "trim"])
def test_compiled_block_is_one_graph(text_padding):
    """No graph break inside a block (fullgraph=True): attention's dispatch is traceable (it once read
    a ContextVar, which Dynamo cannot trace: every compiled block broke its graph there)."""
    net = apply_perf(tiny_dit(), PerfConfig(text_padding=text_padding))
    x, t, text = tiny_inputs()
    seen = []
    net.blocks[0].register_forward_pre_hook(lambda m, args: seen.append(args))
    with torch.no_grad():
        net(x, t, text)
        args = seen[0]
        compiled = torch.compile(net.blocks[0], backend="eager", fullgraph=True)
        torch.testing.assert_close(compiled(*args), net.blocks[0](*args), **FP32_TOL)


@pytest.mark.integration
def test_compile_aot_eager_matches_plain_forward_and_backward():
    """backend='aot_eager' runs the graphs Dynamo + AOTAutograd capture (forward and joint backward)
    without Inductor's code generation: it proves the blocks trace without changing the math; it
    does not test Inductor's kernels (those need a GPU session or a C++ toolchain and minutes)."""
    x, t, text = tiny_inputs()
    plain, fast = tiny_dit(), apply_perf(tiny_dit(), PerfConfig(compile=True, compile_backend="aot_eager"))
    for net in (plain, fast):
        net.train().gradient_checkpointing = True
    out_p, out_f = plain(x, t, text), fast(x, t, text)
    torch.testing.assert_close(out_f, out_p, **FP32_TOL)
    out_p.square().mean().backward()
    out_f.square().mean().backward()
    for (name, p), q in zip(plain.named_parameters(), fast.parameters()):
        torch.testing.assert_close(q.grad, p.grad, atol=5e-5, rtol=1e-4, msg=name)


# -- CUDA graphs -----------------------------------------------------------------------------------
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without CUDA")
def test_cuda_graphs_without_cuda_warns_in_apply_perf_and_errors_in_the_wrapper():
    from apt.perf.cuda_graph import CUDAGraphForward

    net = tiny_dit()
    with pytest.warns(UserWarning, match="cuda_graphs ignored"):
        out = apply_perf(net, PerfConfig(cuda_graphs=True))
    assert out is net
    with pytest.raises(RuntimeError, match="needs CUDA"):
        CUDAGraphForward(tiny_dit())


@pytest.mark.gpu
@GPU
def test_cuda_graph_replay_matches_eager():
    x, t, text = tiny_inputs()
    x, t, text = x.cuda(), t.cuda(), text.to("cuda")
    ref_net = tiny_dit().cuda()
    graph_net = apply_perf(tiny_dit().cuda(), PerfConfig(cuda_graphs=True))
    with torch.no_grad():
        ref = ref_net(x, t, text)
        for _ in range(2):  # capture, then replay with new input values
            torch.testing.assert_close(graph_net(x, t, text), ref, atol=1e-4, rtol=1e-4)
        x2 = torch.randn_like(x)
        torch.testing.assert_close(graph_net(x2, t, text), ref_net(x2, t, text), atol=1e-4, rtol=1e-4)


# -- fused QK-norm + RoPE ------------------------------------------------------------------------
def test_fused_qk_norm_rope_matches_unfused():
    """float32: equal to rounding (1e-6). bf16: the fused path rounds once instead of twice, so
    they differ by at most 2 bf16 ulps of unit-scale values (2 * 2^-8 ~ 8e-3)."""
    cos, sin = rope_3d(16, 2, 3, 3, num_text=4, theta=10000.0, device="cpu")
    norm = RMSNorm(16)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.1 * torch.randn(16))
    x = torch.randn(2, 3, 22, 16)
    torch.testing.assert_close(rms_norm_rope(x, norm.weight, cos, sin, eps=norm.eps), apply_rope(norm(x), cos, sin), atol=1e-6, rtol=1e-6)
    xb, nb = x.bfloat16(), norm.bfloat16()
    fused, unfused = rms_norm_rope(xb, nb.weight, cos, sin, eps=nb.eps), apply_rope(nb(xb), cos, sin)
    assert fused.dtype == unfused.dtype == torch.bfloat16
    assert (fused.float() - unfused.float()).abs().max() <= 2 * 2**-8 * max(1.0, unfused.float().abs().max().item())


def test_fused_qk_norm_rope_switch_matches_plain_dit():
    x, t, text = tiny_inputs()
    ref = tiny_dit()(x, t, text)
    net = apply_perf(tiny_dit(), PerfConfig(fused_qk_norm_rope=True))
    assert all(block.attn.fused_qk_norm_rope for block in net.blocks)
    torch.testing.assert_close(net(x, t, text), ref, **FP32_TOL)


# -- FP8 -------------------------------------------------------------------------------------------
def test_e4m3_quantisation_error_bound():
    """|q(x) - x| <= max(|x| / 16, s / 1024) per element, s = amax / 448 (half an e4m3 step)."""
    x = torch.randn(4096) * torch.logspace(-4, 1, 4096)
    q = fake_quantize_e4m3(x)
    s = x.abs().max() / E4M3_MAX
    assert torch.all((q - x).abs() <= torch.maximum(x.abs() / 16, s / 1024) * (1 + 1e-6))
    assert q.abs().max() <= x.abs().max()  # the largest value maps to 448 * s exactly


def test_fp8_linear_emulation_matches_scaled_mm_and_bounds_the_error():
    """The emulated path and ``torch._scaled_mm`` (the GPU path's exact call, which PyTorch also runs
    on CPU) agree to float32 rounding; vs the float32 layer the relative error of random data is
    ~3% (e4m3 keeps 3 mantissa bits; bound asserted: 6%)."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(64, 48)
    x = torch.randn(3, 7, 64)
    ref = layer(x)
    emulated, real = torch.nn.Linear(64, 48), torch.nn.Linear(64, 48)
    emulated.load_state_dict(layer.state_dict())
    real.load_state_dict(layer.state_dict())
    convert_to_fp8(emulated, emulate=True, filter=lambda n, m: isinstance(m, torch.nn.Linear))
    convert_to_fp8(real, emulate=False, filter=lambda n, m: isinstance(m, torch.nn.Linear))
    assert isinstance(emulated, FP8Linear) and emulated.emulate and not real.emulate
    with torch.no_grad():
        out_e, out_r = emulated(x), real(x)
    torch.testing.assert_close(out_r, out_e, atol=1e-4, rtol=1e-4)
    assert relative_error(out_e, ref) < 0.06


def test_fp8_effect_on_a_small_dit():
    """Demo-width DiT (width 96, 6 blocks, default-init random weights, velocity output) with FP8
    block matmuls: relative output error vs float32 measured 0.4% (asserted < 2%); one FP8 layer
    alone is ~4%, the residual stream carries the rest exactly. The effect on trained checkpoints
    is for the toy benchmark to measure."""

    def demo(seed=0):
        torch.manual_seed(seed)
        net = build_dit("demo", prediction="velocity")
        randomize_zero_init(net)
        return net.eval()

    x, t, _ = tiny_inputs()
    text = random_text(2, 5, 64)
    with torch.no_grad():
        ref = demo()(x, t, text)
        with pytest.warns(UserWarning, match="emulating"):
            net = apply_perf(demo(), PerfConfig(fp8=True))
        assert sum(isinstance(m, FP8Linear) for m in net.modules()) == 4 * len(net.blocks)
        err = relative_error(net(x, t, text), ref)
    assert 0 < err < 0.02, err


def test_quantize_scale_is_per_tensor_and_saturates():
    x = torch.tensor([1e-3, -2.0, 4.0])
    q, s = quantize_e4m3(x)
    assert q.dtype == torch.float8_e4m3fn and s.numel() == 1
    assert q.float().abs().max() == E4M3_MAX


@pytest.mark.gpu
@GPU
def test_fp8_scaled_mm_on_gpu_matches_emulation():
    from apt.perf.fp8 import fp8_matmul_supported

    if not fp8_matmul_supported("cuda"):
        pytest.skip("GPU has no FP8 matmul (needs compute capability >= 8.9)")
    torch.manual_seed(0)
    layer = torch.nn.Linear(256, 512).cuda().bfloat16()
    emulated = torch.nn.Linear(256, 512).cuda().bfloat16()
    emulated.load_state_dict(layer.state_dict())
    convert_to_fp8(layer, emulate=False, filter=lambda n, m: isinstance(m, torch.nn.Linear))
    convert_to_fp8(emulated, emulate=True, filter=lambda n, m: isinstance(m, torch.nn.Linear))
    x = torch.randn(4, 100, 256, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        assert relative_error(layer(x), emulated(x)) < 1e-2  # bf16 output rounding + accumulation order


# -- chunked VAE decode ----------------------------------------------------------------------------
def build_tiny_wan_vae():
    """A Wan-layout VAE (8x spatial, 4x temporal, causal decoder) at width 4."""
    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)
    return AutoencoderKLWan(base_dim=4, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1, latents_mean=[0.0] * 4, latents_std=[1.0] * 4).eval()


@pytest.fixture(scope="module")
def tiny_wan_vae():
    """Shared by the tests that decode first (importing diffusers, ~5 s on a cold start, happens in setup)."""
    return build_tiny_wan_vae()


@pytest.mark.parametrize("chunk_frames", [1, 2, 3])
def test_chunked_vae_decode_matches_decode(tiny_wan_vae, chunk_frames):
    """Same causal decoder, same cache, chunks of k latent frames: equal to vae.decode to float32
    rounding (5e-5: the convolutions see inputs of other lengths, so oneDNN may sum in another
    order; 1.2e-5 was seen on some latents); 4 latent frames -> 13 pixel frames."""
    from apt.perf.vae import decode_latents, iter_decode

    vae = tiny_wan_vae
    z = torch.randn(1, 4, 4, 4, 4, generator=torch.Generator().manual_seed(chunk_frames))
    with torch.no_grad():
        ref = vae.decode(z).sample
        out = decode_latents(vae, z, chunk_frames=chunk_frames)
        sizes = [c.shape[2] for c in iter_decode(vae, z, chunk_frames=chunk_frames)]
    assert out.shape == ref.shape == (1, 3, 13, 32, 32)
    torch.testing.assert_close(out, ref, atol=5e-5, rtol=1e-5)
    assert sizes[0] == 1 and sum(sizes) == 13


def test_chunked_vae_decode_on_a_vae_that_has_not_decoded_yet():
    """The Wan-layout check must not depend on state diffusers creates at the first decode (an H100
    run of eval/benchmark_inference.py fell back to the plain decode on its first call)."""
    from apt.perf.vae import decode_latents

    vae = build_tiny_wan_vae()  # not the shared fixture: that one has decoded already
    z = torch.randn(1, 4, 3, 4, 4)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("error")
        out = decode_latents(vae, z, chunk_frames=1)
        ref = vae.decode(z).sample
    torch.testing.assert_close(out, ref, atol=5e-5, rtol=1e-5)


def test_chunked_vae_decode_rejects_other_vaes():
    from diffusers import AutoencoderKL

    from apt.perf.vae import decode_latents, iter_decode

    vae = AutoencoderKL(block_out_channels=(8,), norm_num_groups=4, latent_channels=4).eval()
    with pytest.raises(ValueError, match="AutoencoderKLWan"):
        next(iter_decode(vae, torch.randn(1, 4, 2, 4, 4), chunk_frames=1))
    with pytest.warns(UserWarning, match="vae_chunk_frames ignored"), torch.no_grad():
        decode_latents(vae, torch.randn(1, 4, 4, 4), chunk_frames=2)


@pytest.mark.parametrize("switches", [
    dict(vae_fold_padding=True), dict(vae_channels_last=True), dict(vae_fold_padding=True, vae_channels_last=True, vae_chunk_frames=2),
])
def test_fast_vae_decode_matches_decode(switches):
    """Folded conv padding, channels-last 3D layout and compile change no math: equal to the plain
    decode to float32 rounding (5e-5, as the chunked decode: the convolutions may sum in another
    order; measured max abs difference on CPU: 0 with folded padding, 4.4e-6 with channels-last),
    through the plain and the chunked decode and the codec."""
    from apt.codecs import LatentCodec
    from apt.perf.vae import apply_vae_perf, decode_latents

    plain, fast = build_tiny_wan_vae(), build_tiny_wan_vae()
    perf = PerfConfig(**switches)
    assert apply_vae_perf(fast, perf) is fast
    convs = [m for m in fast.modules() if isinstance(m, torch.nn.Conv3d)]
    assert all(type(m).__name__ == ("FoldedCausalConv3d" if perf.vae_fold_padding else "WanCausalConv3d") for m in convs)
    assert all(m.weight.is_contiguous(memory_format=torch.channels_last_3d) for m in convs) == perf.vae_channels_last
    z = torch.randn(1, 4, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = plain.decode(z).sample
        torch.testing.assert_close(fast.decode(z).sample, ref, atol=5e-5, rtol=1e-5)
        torch.testing.assert_close(decode_latents(fast, z, chunk_frames=2), ref, atol=5e-5, rtol=1e-5)
        codec = LatentCodec(fast)
        codec.apply_perf(replace(perf, vae_fold_padding=False, vae_channels_last=False, vae_compile=False))  # the codec keeps the chunking
        assert codec.chunk_frames == perf.vae_chunk_frames
        torch.testing.assert_close(codec.decode(codec.normalize(z)), ref.clamp(-1, 1), atol=5e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="already applied"):
        apply_vae_perf(fast, perf)


@pytest.mark.integration
def test_compiled_vae_decoder_matches_decode():
    """vae_compile: Dynamo traces the whole Wan decoder (cache lists and all) without changing the math
    (backend eager: the traced graphs run as captured; ~30 s of tracing on CPU, 2 latent frames)."""
    from apt.perf.vae import apply_vae_perf

    plain, fast = build_tiny_wan_vae(), build_tiny_wan_vae()
    apply_vae_perf(fast, PerfConfig(vae_fold_padding=True, vae_compile=True, compile_backend="eager"))
    z = torch.randn(1, 4, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(fast.decode(z).sample, plain.decode(z).sample, atol=5e-5, rtol=1e-5)


def test_fast_vae_switches_warn_on_other_vaes():
    from diffusers import AutoencoderKL

    from apt.perf.vae import apply_vae_perf

    vae = AutoencoderKL(block_out_channels=(8,), norm_num_groups=4, latent_channels=4).eval()
    with pytest.warns(UserWarning, match="not a Wan-layout VAE"):
        assert apply_vae_perf(vae, PerfConfig(vae_channels_last=True)) is vae


# -- config and the single entry point -------------------------------------------------------------
def test_perf_config_in_recipe_config_and_overrides():
    c = load_config(None, [], ["perf.fused_qk_norm_rope=true", "perf.vae_chunk_frames=2"])
    assert c.perf.fused_qk_norm_rope and c.perf.vae_chunk_frames == 2 and not c.perf.compile
    assert perf_from_overrides(["compile=true"]).compile
    with pytest.raises(ConfigError, match="did you mean 'perf.compile'"):
        perf_from_overrides(["compil=true"])
    with pytest.raises(ConfigError, match="perf.vae_chunk_frames"):
        load_config(None, [], ["perf.vae_chunk_frames=-1"])


def test_default_perf_is_the_plain_path_and_apply_once():
    x, t, text = tiny_inputs()
    ref = tiny_dit()(x, t, text)
    net = apply_perf(tiny_dit(), PerfConfig())
    assert torch.equal(net(x, t, text), ref)  # bit-identical
    with pytest.raises(ValueError, match="already applied"):
        apply_perf(net, PerfConfig())


def test_all_cpu_switches_together_match_plain():
    """The exact switches that run on CPU without compiling, together: fused QK-norm + math SDPA."""
    x, t, text = tiny_inputs()
    ref = tiny_dit()(x, t, text)
    net = apply_perf(tiny_dit(), PerfConfig(attention_backend="math", fused_qk_norm_rope=True))
    torch.testing.assert_close(net(x, t, text), ref, **FP32_TOL)


def test_readout_layers_used_by_step_flops_are_the_discriminators():
    assert readout_layers(36, [16 / 36, 26 / 36, 1.0]) == [15, 25, 35]
    c = DiTConfig(depth=36, hidden_dim=64, num_heads=4, text_dim=64)
    full = apt_step_flops(c, batch=1, frames=4, height=16, width=16, text_tokens=4, readout_layers=[15, 25, 35])
    half = apt_step_flops(c, batch=1, frames=4, height=16, width=16, text_tokens=4, readout_layers=[17])
    assert half["d_step"] < full["d_step"] and half["model"] < full["model"]
    assert apt_step_flops(c, batch=1, frames=4, height=16, width=16, text_tokens=4, readout_layers=[35], checkpointing=True)["hardware"] > full["hardware"]


@pytest.mark.integration
def test_load_generator_applies_perf(tiny_teacher):
    """load_generator(perf=...) goes through apply_perf: the same samples as the plain generator."""
    from apt.inference import load_generator

    plain = load_generator(tiny_teacher)
    fast = load_generator(tiny_teacher, perf=PerfConfig(attention_backend="math", fused_qk_norm_rope=True))
    assert fast.net._apt_perf.fused_qk_norm_rope and all(b.attn.fused_qk_norm_rope for b in fast.net.blocks)
    kw = dict(steps=2, cfg_scale=1.0)
    torch.testing.assert_close(fast.generate_tensor(["a red circle"], [0], **kw), plain.generate_tensor(["a red circle"], [0], **kw), **FP32_TOL)


# -- FP8 options: row-wise scales, fast accumulation ------------------------------------------------------
def test_fp8_row_scaling_emulation_matches_scaled_mm_and_its_error_vs_per_tensor():
    """Row-wise scales: emulation equals ``torch._scaled_mm`` with (M, 1) / (1, N) scales (the GPU
    path's call) to float32 rounding. Error vs per-tensor scaling (one 64 -> 48 layer, random data,
    measured): the same without outliers (3.5% vs 3.6%); e4m3 spans 15 binades, so per-tensor scaling
    only loses when some tokens are ~10^4 x the rest: then 4.9% vs 3.5% on the ordinary tokens."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(64, 48)
    x = torch.randn(64, 64)
    small = torch.ones(64, dtype=torch.bool)
    small[::16] = False
    errors = {}
    for outlier in (1.0, 1e4):
        xo = x.clone()
        xo[~small] *= outlier
        ref = layer(xo)
        out = {}
        for scaling, emulate in (("tensor", True), ("row", True), ("row", False)):
            m = torch.nn.Linear(64, 48)
            m.load_state_dict(layer.state_dict())
            convert_to_fp8(m, emulate=emulate, scaling=scaling, filter=lambda n, mod: isinstance(mod, torch.nn.Linear))
            with torch.no_grad():
                out[scaling, emulate] = m(xo)
        torch.testing.assert_close(out["row", False], out["row", True], atol=1e-4 * outlier, rtol=1e-4)
        errors[outlier] = {s: relative_error(out[s, True][small], ref[small]) for s in ("tensor", "row")}
    assert abs(errors[1.0]["row"] - errors[1.0]["tensor"]) < 0.01
    assert errors[1e4]["row"] < 0.85 * errors[1e4]["tensor"], errors


def test_fp8_fast_accumulation_model():
    """The CPU model of Hopper's fast FP8 accumulation: running sum truncated to 14 significant bits
    after each 32-wide slice of K. Its extra error over exact accumulation is at most
    (K / 32) * 2^-13 of the running magnitude; at K = 1024 on random data it is 8.4e-4 relative
    (measured), against ~3e-2 for the e4m3 rounding of the inputs themselves."""
    from apt.perf.fp8 import _truncate_significand, fast_accum_matmul

    assert _truncate_significand(torch.tensor([1.0 + 2**-20, -(1.0 + 2**-12)]), 14).tolist() == [1.0, -(1.0 + 2**-12)]
    torch.manual_seed(0)
    a, b = torch.randn(16, 1024), torch.randn(8, 1024)
    exact, fast = a @ b.T, fast_accum_matmul(a, b)
    err = relative_error(fast, exact)
    assert 1e-6 < err < (1024 / 32) * 2**-13, err


def test_fp8_options_in_the_dit_and_config_checks():
    x, t, text = tiny_inputs()
    with torch.no_grad():
        ref = tiny_dit()(x, t, text)
        for scaling, fast in (("row", False), ("tensor", True), ("row", True)):
            with pytest.warns(UserWarning, match="emulating"):
                net = apply_perf(tiny_dit(), PerfConfig(fp8=True, fp8_scaling=scaling, fp8_fast_accum=fast))
            assert all(m.scaling == scaling and m.fast_accum == fast for m in net.modules() if isinstance(m, FP8Linear))
            assert 0 < relative_error(net(x, t, text), ref) < 0.05
    with pytest.raises(ConfigError, match="set perf.fp8=true"):
        check_perf(PerfConfig(fp8_scaling="row"))
    with pytest.raises(ConfigError, match="perf.fp8_scaling"):
        check_perf(PerfConfig(fp8=True, fp8_scaling="block"))


# -- selective activation checkpointing --------------------------------------------------------------------
@pytest.mark.parametrize("policy", ["attention", "attention_and_matmul"])
def test_selective_checkpointing_same_gradients_and_fewer_recomputed_ops(policy):
    """Gradients equal the un-checkpointed model's (5e-5: same math); the backward recomputes no SDPA
    (policy attention) and no matmul either (attention_and_matmul), where full checkpointing
    recomputes every block's forward."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from apt.models.checkpointing import ATTENTION_OPS, MATMUL_OPS

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.attention = self.matmul = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.attention += func in ATTENTION_OPS
            self.matmul += func in MATMUL_OPS
            return func(*args, **(kwargs or {}))

    x, t, text = tiny_inputs()
    grads, counts = {}, {}
    for name in ("none", "full", policy):
        net = tiny_dit().train()
        net.gradient_checkpointing, net.checkpoint_policy = name != "none", ("full" if name == "none" else name)
        out = net(x, t, text)
        with Count() as c:
            out.square().mean().backward()
        grads[name], counts[name] = [p.grad for p in net.parameters()], (c.attention, c.matmul)
    for a, b in zip(grads[policy], grads["none"]):
        torch.testing.assert_close(a, b, atol=5e-5, rtol=1e-4)
    assert counts["none"][0] == 0 and counts["full"][0] == 3  # one SDPA recomputed per block (3 blocks)
    assert counts[policy][0] == 0
    if policy == "attention_and_matmul":
        assert counts[policy][1] == counts["none"][1] < counts["full"][1]
    else:
        assert counts["none"][1] < counts[policy][1] == counts["full"][1]


def test_checkpoint_policy_config():
    c = load_config(None, [], ["model.checkpoint_policy=attention"])
    assert c.model.checkpoint_policy == "attention"
    from apt.config import check_config

    c.model.checkpoint_policy = "most"
    with pytest.raises(ConfigError, match="model.checkpoint_policy"):
        check_config(c)
