"""Unmasked attention for padded text (perf.text_padding) and the optional attention kernels
(perf.attention_backend fa3 | fa3_fp8 | sage), checked on CPU through their emulations.

Tolerances: the text-padding modes are exact (same keys, same math; only the summation order of
kernels on other shapes differs): 1e-5 in float32. The quantised kernels' error bounds against the
exact bf16 path are stated per kernel below (relative Frobenius error of the attention output).
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

import apt.models.attention as attention_module
from apt.config import ConfigError, check_perf
from apt.models import TextCond, build_dit
from apt.models.attention import TextKeyPadding, attention, attention_backend, pad_key_mask, text_key_layout
from apt.models.attention_kernels import EMULATIONS, _int8_per_block, _online_softmax_pv, check_kernel
from apt.perf import PerfConfig, apply_perf
from apt.perf.bench import randomize_zero_init, relative_error
from tests.conftest import GPU

FP32_TOL = dict(atol=1e-5, rtol=1e-5)
# Relative error vs the exact attention of the bf16-rounded inputs (random unit-scale q, k, v, head
# dim 64, 300 tokens: near-uniform attention, the hardest case for a relative error; measured on this
# test's data: fa3 0.0017 (bf16 output rounding), fa3_fp8 0.052, sage 0.012).
KERNEL_BOUNDS = {"fa3": 0.004, "fa3_fp8": 0.08, "sage": 0.02}


def tiny_dit(seed: int = 0, **perf) -> torch.nn.Module:
    torch.manual_seed(seed)
    net = build_dit("tiny")
    randomize_zero_init(net)
    net = net.eval()
    if perf:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the kernels' CPU emulation warning
            net = apply_perf(net, PerfConfig(**perf))
    return net


def inputs(mask_rows: list[list[int]], seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    B, L = len(mask_rows), len(mask_rows[0])
    x = torch.randn(B, 3, 4, 16, 16, generator=g)
    emb = torch.randn(B, L, 32, generator=g)
    return x, torch.rand(B, generator=g), TextCond(emb, torch.tensor(mask_rows).bool())


def masks_seen(net, x, t, text) -> list:
    seen = []
    real = attention_module._unpadded_attention

    def spy(q, k, v, mask):
        seen.append(mask)
        return real(q, k, v, mask)

    attention_module._unpadded_attention = spy
    try:
        with torch.no_grad():
            out = net(x, t, text)
    finally:
        attention_module._unpadded_attention = real
    return out, seen


# -- text padding: exact ----------------------------------------------------------------------------
@pytest.mark.parametrize("rows, mode, expect", [
    ([[1, 1, 1, 1, 1], [1, 1, 1, 1, 1]], "trim", "none"),      # no padding: no mask
    ([[1, 1, 1, 0, 0]], "trim", "none"),                        # batch 1: padded tokens trimmed
    ([[1, 0, 1, 1, 0]], "trim", "none"),                        # batch 1, padding not at the end
    ([[1, 1, 1, 0, 0], [1, 0, 0, 0, 0]], "trim", "dense"),      # mixed lengths: dense mask of the kept columns
    ([[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 0, 0]], "varlen", "lengths"),  # runs of one length, no mask
    ([[1, 1, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 0]], "varlen", "lengths"),  # CFG-like: two runs
    ([[1, 0, 1, 0, 0], [1, 1, 1, 0, 0]], "varlen", "dense"),    # not prefix form: dense fallback
    ([[1, 1, 1, 0, 0], [0, 0, 0, 0, 0]], "varlen", "lengths"),  # an empty prompt attends to the visual tokens only
])
def test_text_padding_modes_equal_the_masked_forward(rows, mode, expect):
    x, t, text = inputs(rows)
    ref, ref_masks = masks_seen(tiny_dit(), x, t, text)
    assert all(isinstance(m, torch.Tensor) and m.shape[-1] == 5 + 32 for m in ref_masks)  # mask mode: always dense
    out, seen = masks_seen(tiny_dit(text_padding=mode), x, t, text)
    torch.testing.assert_close(out, ref, **FP32_TOL)
    kept = max(sum(r) for r in rows) if expect != "dense" or mode == "trim" else None
    if expect == "none":
        assert seen and all(m is None for m in seen)
    elif expect == "dense":
        assert all(isinstance(m, torch.Tensor) for m in seen)
        assert kept is None or all(m.shape[-1] == kept + 32 for m in seen)
    else:  # each run of consecutive equal lengths attends unmasked (one call per run and block)
        lengths = [sum(r) for r in rows]
        runs = 1 + sum(a != b for a, b in zip(lengths, lengths[1:]))
        assert len(seen) == runs * 3 and all(m is None for m in seen)


def test_trimmed_text_sets_the_visual_token_offset_and_the_discriminator_agrees():
    """D taps block outputs and slices the visual tokens after the (now shorter) text: same logits."""
    from apt.discriminator import Discriminator

    x, t, text = inputs([[1, 1, 0, 0, 0]])
    logits = []
    for mode in ("mask", "trim"):
        net = tiny_dit(text_padding=mode) if mode != "mask" else tiny_dit()
        torch.manual_seed(3)
        D = Discriminator(net, fractions=[0.5, 1.0], num_heads=2).eval()
        with torch.no_grad():
            logits.append(D(x, t, text))
        assert net._num_text_tokens == (5 if mode == "mask" else 2)
    torch.testing.assert_close(logits[1], logits[0], **FP32_TOL)


def test_varlen_gradients_equal_the_masked_path():
    x, t, text = inputs([[1, 1, 1, 1, 0], [1, 1, 0, 0, 0]])
    nets = [tiny_dit().train(), tiny_dit(text_padding="varlen").train()]
    for net in nets:
        net(x, t, text).square().mean().backward()
    for (name, p), q in zip(nets[0].named_parameters(), nets[1].parameters()):
        torch.testing.assert_close(q.grad, p.grad, atol=5e-5, rtol=1e-4, msg=name)


def test_grouped_attention_equals_dense_masked_sdpa():
    torch.manual_seed(0)
    q, k, v = (torch.randn(3, 2, 4 + 10, 8) for _ in range(3))
    lengths = (2, 4, 2)
    mask = torch.ones(3, 1, 1, 14, dtype=torch.bool)
    for b, n in enumerate(lengths):
        mask[b, ..., n:4] = False
    out = attention(q, k, v, TextKeyPadding(4, lengths, mask))
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, attn_mask=mask), **FP32_TOL)


def test_layout_is_read_once_per_mask_and_pad_key_mask():
    from apt.models.attention import TextLayoutCache

    cache, mask = TextLayoutCache(), torch.tensor([[True, True, False]])
    keep, m = text_key_layout(mask, 4, "trim", cache=cache)
    assert keep == slice(0, 2) and m is None and cache.get(mask, ("trim", 4)) is not None
    mask[0, 2] = True  # an in-place change invalidates the cached layout
    assert cache.get(mask, ("trim", 4)) is None and text_key_layout(mask, 4, "trim", cache=cache)[0] == slice(0, 3)
    # sequence parallelism pads the sequence: the pad keys are masked even where no mask was needed
    assert pad_key_mask(None, 5, 5, device=torch.device("cpu")) is None
    padded = pad_key_mask(None, 5, 8, device=torch.device("cpu"))
    assert padded.shape == (1, 1, 1, 8) and padded[..., :5].all() and not padded[..., 5:].any()
    with pytest.raises(ValueError, match="text padding mode"):
        text_key_layout(mask, 4, "squeeze")


# -- optional kernels: emulated numerics -----------------------------------------------------------------
def test_online_softmax_without_rounding_is_exact_attention():
    """The flash-style loop the emulations share (running max, +offset, rescaling) is exact attention
    when nothing is rounded, for any key block size."""
    torch.manual_seed(0)
    s, v = torch.randn(2, 3, 10, 37), torch.randn(2, 3, 37, 8)
    ref = torch.softmax(s * 0.6931471805599453, dim=-1) @ v  # s is in log2 units
    for block, offset in ((7, 0.0), (64, 8.0)):
        out = _online_softmax_pv(s, v, block=block, p_offset=offset, p_round=lambda p: p, pv_round=lambda x: x)
        torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-5)


def test_int8_block_quantisation_error_is_half_a_step():
    x = torch.randn(1, 2, 300, 16) * torch.logspace(-2, 1, 300)[None, None, :, None]
    q = _int8_per_block(x, 64)
    blocks = torch.nn.functional.pad(x, (0, 0, 0, 84)).reshape(1, 2, 6, 64, 16)
    step = (blocks.abs().amax(dim=(3, 4)) / 127).repeat_interleave(64, dim=2)[:, :, :300, None]
    assert torch.all((q - x).abs() <= step / 2 * (1 + 1e-5))


@pytest.mark.parametrize("name", ["fa3", "fa3_fp8", "sage"])
def test_kernel_emulation_error_bound_vs_the_bf16_path(name):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 2, 300, 64).bfloat16() for _ in range(3))
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float())  # the bf16 path, exact in fp32
    err = relative_error(EMULATIONS[name](q, k, v, 64**-0.5), ref)
    assert 0 <= err < KERNEL_BOUNDS[name], err
    if name != "fa3":
        assert err > 1e-3  # the quantisation is really applied


@pytest.mark.parametrize("name", ["fa3", "fa3_fp8", "sage"])
def test_kernel_backend_in_the_dit_and_one_compiled_graph(name):
    """The custom op runs inside a compiled block without a graph break (fullgraph), and the DiT's
    output stays within a few times the kernel's bound of the plain float32 DiT."""
    x, t, text = inputs([[1, 1, 1, 0, 0]])
    with torch.no_grad():
        ref = tiny_dit()(x, t, text)
        net = tiny_dit(attention_backend=name, text_padding="trim")
        out = net(x, t, text)
        err = relative_error(out, ref)
        assert 0 < err < 3 * KERNEL_BOUNDS[name], err
    block = net.blocks[0]
    g = torch.Generator().manual_seed(0)
    h, c = torch.randn(1, 3 + 32, 32, generator=g), torch.randn(1, 32, generator=g)
    rope = net._tables("rope", 2, 4, 4, 3, h)
    with torch.no_grad(), attention_backend(name):
        eager = block(h, c, rope, None)
        compiled = torch.compile(block, backend="eager", fullgraph=True)(h, c, rope, None)
    torch.testing.assert_close(compiled, eager, **FP32_TOL)


def test_kernel_backend_errors():
    q = torch.randn(1, 2, 8, 16)
    with attention_backend("fa3_fp8"), pytest.raises(ValueError, match="takes no dense mask"):
        attention(q, q, q, torch.ones(1, 1, 1, 8, dtype=torch.bool))
    with attention_backend("sage"), pytest.raises(RuntimeError, match="forward-only"):
        attention(q.requires_grad_(), q, q)
    with pytest.raises(ConfigError, match="text_padding=trim or varlen"):
        check_perf(PerfConfig(attention_backend="fa3"))
    with pytest.raises(ConfigError, match="perf.text_padding"):
        check_perf(PerfConfig(text_padding="pack"))
    try:
        import fa3_fwd_interface  # noqa: F401
    except ImportError:  # the extra is missing: a CUDA model gets a clear error naming it, before any work
        with pytest.raises(RuntimeError, match=r"optional extra 'fa3' \(wheel fa3-fwd\)"):
            check_kernel("fa3", torch.device("cuda"), torch.bfloat16, 128)
    check_kernel("sage", torch.device("cpu"), torch.float32, 24)  # CPU: emulation, nothing needed


def test_inference_tensors_are_not_cached():
    from apt.models.attention import TextLayoutCache

    cache = TextLayoutCache()
    with torch.inference_mode():
        mask = torch.tensor([[True, False]])
        text_key_layout(mask, 4, "trim", cache=cache)
        assert cache.get(mask, ("trim", 4)) is None


@pytest.mark.gpu
@GPU
@pytest.mark.parametrize("mode", ["trim", "varlen"])
def test_cuda_graph_with_trimmed_text_matches_the_masked_eager_forward(mode):
    """The mask is read on the host before capture; each mask pattern gets its own graph."""
    ref_net, graph_net = tiny_dit().cuda(), apply_perf(tiny_dit().cuda(), PerfConfig(cuda_graphs=True, text_padding=mode))
    with torch.inference_mode():
        for rows in ([[1, 1, 1, 0, 0], [1, 0, 0, 0, 0]], [[1, 1, 0, 0, 0], [1, 1, 1, 1, 1]]):
            x, t, text = inputs(rows)
            x, t, text = x.cuda(), t.cuda(), text.to("cuda")
            for _ in range(2):
                torch.testing.assert_close(graph_net(x, t, text), ref_net(x, t, text), atol=1e-4, rtol=1e-4)


@pytest.mark.gpu
@GPU
@pytest.mark.parametrize("name", ["fa3", "fa3_fp8", "sage"])
def test_gpu_kernel_matches_its_emulation(name):
    """The real kernel against its CPU emulation (run on the GPU's inputs): the emulation's error bound
    holds for the kernel, and the two agree to a fraction of it (accumulation order differs)."""
    from apt.models.attention_kernels import OPS

    try:
        check_kernel(name, torch.device("cuda"), torch.bfloat16, 128)
    except RuntimeError as e:
        pytest.skip(str(e))
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 1000, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    with torch.no_grad():
        real = OPS[name](q, k, v, 128**-0.5)
    emulated = EMULATIONS[name](q, k, v, 128**-0.5)
    assert relative_error(real, ref) < KERNEL_BOUNDS[name]
    assert relative_error(real, emulated) < KERNEL_BOUNDS[name] / 2
