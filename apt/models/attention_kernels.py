"""Optional attention kernels (FlashAttention-3 bf16 / FP8, SageAttention) and their CPU emulations.

Each kernel is a ``torch.library`` custom op (``apt::fa3_attention``, ``apt::fa3_fp8_attention``,
``apt::sage_attention``): ``torch.compile`` sees one opaque node instead of a graph break. The CUDA
implementation calls the optional extra's kernel (imported on first use); the CPU implementation is
an emulation of the kernel's numerics, so equivalence tests and the toy-quality measurement run
without a GPU. Both take q, k, v of shape (B, K, S, E), no mask, and return (B, K, S, E) in q's
dtype. All three are forward-only (the wheels ship no backward): inference, not training.

Kernels and what the emulation reproduces:

- ``fa3`` (extra ``fa3``: the ``fa3-fwd`` wheel, FlashAttention-3 forward, Hopper sm90 only):
  exact attention, bf16 in and out, fp32 accumulation. Emulation: q, k, v rounded to bf16,
  attention in fp32, output rounded to bf16.
- ``fa3_fp8`` (same wheel, FP8 path of FlashAttention-3, arXiv 2407.08608 §3.3): q, k, v in
  float8_e4m3fn with one scale per (sample, head) (``descale`` = amax / 448), both GEMMs in FP8
  with fp32 accumulation, and the softmax numerator P = exp2(s - running max + 8) converted to e4m3
  for the P V GEMM (the kernel's +8 offset puts P in [0, 256] to use the e4m3 range; the row sum
  uses the unrounded P). Emulation: the same quantisations and the same online softmax over key
  blocks of 224 (the kernel's tile at head dim 128); not reproduced: the kernel's accumulation
  order inside a tile and its key-block order.
- ``sage`` (extra ``sage``: ``sageattention`` 1.0.x, Triton, sm80+; SageAttention, arXiv
  2410.02367): keys smoothed (the per-(sample, head) mean over tokens subtracted: softmax is
  invariant to it), q (pre-multiplied by scale * log2 e) and k quantised to INT8 with one scale per
  block of 128 queries / 64 keys, P V in fp16 with fp16 accumulation inside each 64-key block.
  Emulation: the same steps (INT8 products are exact in fp32), each block's P V rounded to fp16.

Error bounds against the exact bf16 path are stated and checked in tests/test_attention_kernels.py.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0
LOG2E = 1.4426950408889634
FA3_FP8_BLOCK_N = 224  # FlashAttention-3's key tile for FP8 at head dim 128 (hopper/tile_size.h)
FA3_FP8_P_OFFSET = 8.0  # exp2(s - max + 8): P in [0, 256] before the e4m3 conversion
SAGE_BLOCK_Q, SAGE_BLOCK_K = 128, 64

KERNELS = ("fa3", "fa3_fp8", "sage")
EXTRAS = {"fa3": ("fa3", "fa3_fwd_interface", "fa3-fwd"), "fa3_fp8": ("fa3", "fa3_fwd_interface", "fa3-fwd"), "sage": ("sage", "sageattention", "sageattention")}


# -- availability ----------------------------------------------------------------------------------
def check_kernel(name: str, device: torch.device, dtype: torch.dtype, head_dim: int) -> None:
    """Raise a clear error when kernel ``name`` cannot run here: extra missing, GPU too old, dtype, head dim.
    On CPU nothing is needed (the CPU implementation is the emulation)."""
    device = torch.device(device)
    if device.type != "cuda":
        return
    extra, module, wheel = EXTRAS[name]
    try:
        __import__(module)
    except ImportError as e:
        raise RuntimeError(
            f"attention backend '{name}' needs the optional extra '{extra}' (wheel {wheel}): pip install 'apt-toolkit[{extra}]' "
            f"(offline: docs/performance.md, 'GPU sweep'); the import failed: {e}"
        ) from None
    major, minor = torch.cuda.get_device_capability(device)
    if name in ("fa3", "fa3_fp8") and major != 9:
        raise RuntimeError(f"attention backend '{name}' (FlashAttention-3) runs on Hopper GPUs (sm90) only; this GPU is sm{major}{minor}")
    if name == "sage" and major < 8:
        raise RuntimeError(f"attention backend 'sage' needs an Ampere or newer GPU (sm80+); this GPU is sm{major}{minor}")
    if name == "fa3" and dtype != torch.bfloat16:
        raise RuntimeError(f"attention backend 'fa3' needs bf16 activations (the fa3-fwd wheel has no fp16/fp32 kernels), got {dtype}")
    if name == "sage" and head_dim not in (64, 96, 128):
        raise RuntimeError(f"attention backend 'sage' supports head dims 64, 96 and 128, got {head_dim}")
    if name.startswith("fa3") and (head_dim % 8 or head_dim > 256):
        raise RuntimeError(f"attention backend '{name}' supports head dims that are multiples of 8 up to 256, got {head_dim}")


# -- shared numerics -------------------------------------------------------------------------------
def _e4m3_per_head(x_BKSE: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x / s rounded to e4m3, s) with one scale s = amax / 448 per (sample, head): shape (B, K)."""
    scale_BK = (x_BKSE.detach().abs().amax(dim=(2, 3)).float() / E4M3_MAX).clamp(min=1e-12)
    q = (x_BKSE.float() / scale_BK[:, :, None, None]).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)
    return q, scale_BK


def _int8_per_block(x_BKSE: torch.Tensor, block: int) -> torch.Tensor:
    """Dequantised INT8 values, one scale amax / 127 per block of ``block`` tokens, round half away from 0."""
    B, K, S, E = x_BKSE.shape
    pad = (-S) % block
    x = F.pad(x_BKSE.float(), (0, 0, 0, pad)).reshape(B, K, -1, block, E)
    scale = (x.abs().amax(dim=(3, 4), keepdim=True) / 127.0).clamp(min=1e-30)
    q = torch.trunc(x / scale + 0.5 * torch.sign(x)).clamp(-127, 127)
    return (q * scale).reshape(B, K, -1, E)[:, :, :S]


def _online_softmax_pv(s_BKQS: torch.Tensor, v_BKSE: torch.Tensor, *, block: int, p_round, p_offset: float, pv_round) -> torch.Tensor:
    """Flash-style forward over key blocks: running max m, P = exp2(s - m + offset) rounded by
    ``p_round``, block product P V rounded by ``pv_round``, fp32 rescaling, division by the row sum
    of the unrounded P. ``s`` is already in log2 units (scale * log2 e applied)."""
    S = s_BKQS.shape[-1]
    m = torch.full(s_BKQS.shape[:-1], -math.inf, dtype=torch.float32, device=s_BKQS.device)
    row_sum = torch.zeros_like(m)
    acc = torch.zeros(*s_BKQS.shape[:-1], v_BKSE.shape[-1], dtype=torch.float32, device=s_BKQS.device)
    for start in range(0, S, block):
        s = s_BKQS[..., start : start + block]
        m_new = torch.maximum(m, s.amax(-1))
        p = torch.exp2(s - (m_new - p_offset)[..., None])
        alpha = torch.exp2(m - m_new)
        row_sum = row_sum * alpha + p.sum(-1)
        acc = acc * alpha[..., None] + pv_round(p_round(p) @ v_BKSE[:, :, start : start + block])
        m = m_new
    return acc / row_sum[..., None]


# -- emulations (the CPU implementations) --------------------------------------------------------------
def emulate_fa3(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    q, k, v = (t.to(torch.bfloat16).float() for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, scale=scale)
    return out.to(torch.bfloat16)


def emulate_fa3_fp8(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    (q8, qs), (k8, ks), (v8, vs) = (_e4m3_per_head(t) for t in (q, k, v))
    s = (q8.float() @ k8.float().transpose(-1, -2)) * (qs * ks * scale * LOG2E)[:, :, None, None]
    out = _online_softmax_pv(
        s, v8.float(), block=FA3_FP8_BLOCK_N, p_offset=FA3_FP8_P_OFFSET,
        p_round=lambda p: p.to(E4M3).float(), pv_round=lambda x: x,
    )
    return (out * vs[:, :, None, None]).to(torch.bfloat16)


def emulate_sage(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    k = k.float() - k.float().mean(dim=2, keepdim=True)  # smooth K
    qd = _int8_per_block(q.float() * (scale * LOG2E), SAGE_BLOCK_Q)
    kd = _int8_per_block(k, SAGE_BLOCK_K)
    s = qd @ kd.transpose(-1, -2)  # INT8 x INT8 products summed: exact in fp32 at head dim <= 1024
    out = _online_softmax_pv(
        s, v.to(torch.float16).float(), block=SAGE_BLOCK_K, p_offset=0.0,
        p_round=lambda p: p.to(torch.float16).float(), pv_round=lambda x: x.to(torch.float16).float(),
    )
    return out.to(q.dtype)


EMULATIONS = {"fa3": emulate_fa3, "fa3_fp8": emulate_fa3_fp8, "sage": emulate_sage}


# -- CUDA kernels ------------------------------------------------------------------------------------
def _fa3_cuda(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    from fa3_fwd_interface import flash_attn_func

    # FlashAttention takes (B, S, K, E); the transposes are views (last dim stays contiguous).
    out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), softmax_scale=scale)
    return out.transpose(1, 2).to(q.dtype)


def _fa3_fp8_cuda(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    from fa3_fwd_interface import flash_attn_func

    (q8, qs), (k8, ks), (v8, vs) = (_e4m3_per_head(t) for t in (q, k, v))
    out = flash_attn_func(
        q8.transpose(1, 2), k8.transpose(1, 2), v8.transpose(1, 2), softmax_scale=scale,
        q_descale=qs.contiguous(), k_descale=ks.contiguous(), v_descale=vs.contiguous(),
    )
    return out.transpose(1, 2).to(q.dtype)


def _sage_cuda(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    from sageattention import sageattn

    k = k - k.mean(dim=2, keepdim=True)  # smoothing done here: sageattn(smooth_k=True) edits k in place
    return sageattn(q.contiguous(), k.contiguous(), v.contiguous(), tensor_layout="HND", sm_scale=scale, smooth_k=False).to(q.dtype)


CUDA_KERNELS = {"fa3": _fa3_cuda, "fa3_fp8": _fa3_fp8_cuda, "sage": _sage_cuda}


# -- custom ops ------------------------------------------------------------------------------------------
def _register(name: str):
    @torch.library.custom_op(f"apt::{name}_attention", mutates_args=(), device_types="cpu")
    def op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        return EMULATIONS[name](q, k, v, scale).to(q.dtype).contiguous()

    @op.register_kernel("cuda")
    def _(q, k, v, scale):
        return CUDA_KERNELS[name](q, k, v, scale).contiguous()

    @op.register_fake
    def _(q, k, v, scale):
        return torch.empty_like(q, memory_format=torch.contiguous_format)

    return op


OPS = {name: _register(name) for name in KERNELS}


def kernel_attention(name: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Unmasked attention of q, k, v (B, K, S, E) through kernel ``name`` (emulated on CPU)."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        raise RuntimeError(f"attention backend '{name}' is forward-only (inference): run it under torch.no_grad(), or train with an SDPA backend")
    if not torch.compiler.is_compiling():  # checked eagerly; a compiled graph was traced after a passing check
        check_kernel(name, q.device, q.dtype, q.shape[-1])
    return OPS[name](q, k, v, q.shape[-1] ** -0.5)
