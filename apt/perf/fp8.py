"""FP8 (e4m3) matmuls for linear layers, with dynamic scaling (perf switch ``perf.fp8``).

    s_x = amax(|x|) / 448,  s_w = amax(|w|) / 448,  y = (q(x / s_x) @ q(w / s_w)^T) * s_x * s_w + b

Options (``perf.fp8_scaling``, ``perf.fp8_fast_accum``):

- ``scaling="row"``: one scale per row instead of per tensor: s_x per token (amax over its
  features), s_w per output channel; an outlier then costs precision in its own row only
  (``torch._scaled_mm`` with (M, 1) and (1, N) scales on Hopper).
- ``fast_accum=True``: ``torch._scaled_mm(use_fast_accum=True)``. Hopper's FP8 tensor cores keep
  fewer accumulator bits than fp32 (about 14 significant bits, DeepSeek-V3 report, arXiv
  2412.19437 §3.3.2); without fast accumulation cuBLAS adds partial sums into fp32 at intervals.
  The CPU emulation is a model of that, not the hardware's exact rounding: products of each
  32-wide slice of K summed exactly, and the running sum truncated to 14 significant bits after
  each slice. The GPU sweep (eval/gpu_sweep.py) measures the real kernel.

where q rounds to float8_e4m3fn (3 mantissa bits, max 448). On GPUs with FP8 tensor cores
(compute capability >= 8.9: Ada, Hopper) the product runs in ``torch._scaled_mm`` (fp32
accumulation, bf16 out). Elsewhere it is emulated: x and w are quantised to e4m3 and back, then
multiplied in their own dtype, so the numerical effect can be measured on CPU (slower than the plain
path; not a speed-up).

Error bound of one quantisation (``fake_quantize_e4m3``), per element: |q(x) - x| <= max(|x| / 16,
s / 1024) (half a step: relative 2^-4 for e4m3 normals, absolute 2^-10 * s in the subnormal range).

Converted layers: the ``nn.Linear`` layers inside the transformer blocks except the adaLN
modulation (one row per sample: no FP8 gain, and it scales everything after it). Patch embedding,
text projection and output projection stay in the model dtype.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

E4M3 = torch.float8_e4m3fn
E4M3_MAX = float(torch.finfo(E4M3).max)  # 448


def fp8_matmul_supported(device: torch.device | str) -> bool:
    """True where ``torch._scaled_mm`` runs e4m3 x e4m3: CUDA compute capability >= 8.9."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available() or not hasattr(torch, "_scaled_mm"):
        return False
    return torch.cuda.get_device_capability(device) >= (8, 9)


def e4m3_scale(x: torch.Tensor) -> torch.Tensor:
    """Per-tensor scale s = amax(|x|) / 448 (float32 scalar tensor, no host sync)."""
    return (x.detach().abs().amax().float() / E4M3_MAX).clamp(min=1e-12)


def quantize_e4m3(x: torch.Tensor, scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(q(x / s) as float8_e4m3fn, s)."""
    scale = e4m3_scale(x) if scale is None else scale
    return (x.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3), scale


def fake_quantize_e4m3(x: torch.Tensor) -> torch.Tensor:
    """x -> e4m3 -> x's dtype, with a per-tensor scale: the value an FP8 matmul sees."""
    q, scale = quantize_e4m3(x)
    return (q.float() * scale).to(x.dtype)


def quantize_e4m3_rows(x_MK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q(x / s) as float8_e4m3fn, s) with one scale per row: s (M, 1) = amax over the row / 448."""
    scale = (x_MK.detach().abs().amax(dim=-1, keepdim=True).float() / E4M3_MAX).clamp(min=1e-12)
    return (x_MK.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3), scale


FAST_ACCUM_SLICE = 32  # K elements per FP8 tensor-core step (wgmma k = 32 for e4m3)
FAST_ACCUM_BITS = 14  # significant bits the model keeps in the running sum


def _truncate_significand(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Round float32 values toward zero to ``bits`` significant bits (float32 has 24)."""
    drop = 24 - bits
    return (x.contiguous().view(torch.int32) & ~((1 << drop) - 1)).view(torch.float32)


def fast_accum_matmul(a_MK: torch.Tensor, b_NK: torch.Tensor) -> torch.Tensor:
    """a @ b^T in float32 with the fast-accumulation model: exact 32-wide slices, truncated running sum."""
    a, b = a_MK.float(), b_NK.float()
    acc = torch.zeros(a.shape[0], b.shape[0], dtype=torch.float32, device=a.device)
    for k in range(0, a.shape[1], FAST_ACCUM_SLICE):
        acc = _truncate_significand(acc + a[:, k : k + FAST_ACCUM_SLICE] @ b[:, k : k + FAST_ACCUM_SLICE].T, FAST_ACCUM_BITS)
    return acc


class FP8Linear(nn.Linear):
    """``nn.Linear`` whose matmul runs in FP8 (same parameters and state-dict keys).

    Made by ``convert_to_fp8`` (class swap in place). The quantised weight is cached while the
    weight is unchanged (``weight._version``), so inference quantises each weight once.
    """

    emulate: bool = True  # False: torch._scaled_mm (set by convert_to_fp8)
    scaling: str = "tensor"  # "tensor" | "row"
    fast_accum: bool = False

    def _quantize(self, x_MK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return quantize_e4m3_rows(x_MK) if self.scaling == "row" else quantize_e4m3(x_MK)

    def _weight_fp8(self) -> tuple[torch.Tensor, torch.Tensor]:
        key = (self.weight._version, self.weight.data_ptr(), self.weight.dtype, self.scaling)
        cache = getattr(self, "_fp8_cache", None)
        if cache is None or cache[0] != key or torch.is_grad_enabled():
            cache = (key, *self._quantize(self.weight))
            if not torch.is_grad_enabled():
                self._fp8_cache = cache
        return cache[1], cache[2]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.emulate and self.scaling == "tensor" and not self.fast_accum:
            return F.linear(fake_quantize_e4m3(x), fake_quantize_e4m3(self.weight), self.bias)
        x_MK = x.reshape(-1, x.shape[-1])
        if self.emulate:  # rounded values, products in float32 (fast accumulation: the model above)
            (x_q, x_s), (w_q, w_s) = self._quantize(x_MK), self._quantize(self.weight)
            acc = fast_accum_matmul(x_q, w_q) if self.fast_accum else x_q.float() @ w_q.float().T
            y = (acc * x_s * w_s.reshape(1, -1)).to(x.dtype)
            y = y if self.bias is None else y + self.bias.to(x.dtype)
            return y.reshape(*x.shape[:-1], self.out_features)
        if torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad):
            raise RuntimeError("FP8Linear with torch._scaled_mm is inference-only (no backward); use emulate=True to train through it")
        w_q, w_s = self._weight_fp8()
        x_q, x_s = self._quantize(x_MK)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        # row-major x (M, K) times column-major w^T (K, N); output in x's dtype. Row-wise scales are
        # (M, 1) and (1, N); their bias is added outside the kernel (not every row-wise kernel takes one).
        if self.scaling == "row":
            y = torch._scaled_mm(x_q, w_q.t(), scale_a=x_s, scale_b=w_s.t(), out_dtype=x.dtype, use_fast_accum=self.fast_accum)
            y = y if bias is None else y + bias
        else:
            y = torch._scaled_mm(x_q, w_q.t(), scale_a=x_s, scale_b=w_s, bias=bias, out_dtype=x.dtype, use_fast_accum=self.fast_accum)
        return y.reshape(*x.shape[:-1], self.out_features)


def default_fp8_filter(name: str, module: nn.Module) -> bool:
    """Linear layers inside ``blocks`` except adaLN modulation."""
    return isinstance(module, nn.Linear) and ("blocks." in name) and not name.endswith("modulation")


def convert_to_fp8(
    model: nn.Module, *, emulate: bool | None = None, filter=default_fp8_filter, scaling: str = "tensor", fast_accum: bool = False,
) -> int:
    """Swap the selected ``nn.Linear`` layers to ``FP8Linear`` in place; returns how many.

    ``emulate=None``: ``torch._scaled_mm`` where the model's device has FP8 matmuls, emulation
    elsewhere (with a warning: emulation measures the numerics, it is slower). ``emulate=False``
    forces ``torch._scaled_mm`` (PyTorch also runs it on CPU, slowly: the tests use that to check
    the GPU path's call). Layers whose dimensions are not multiples of 16 stay emulated.
    ``scaling`` ("tensor" | "row") and ``fast_accum``: the options in the module docstring.
    """
    if scaling not in ("tensor", "row"):
        raise ValueError(f"FP8 scaling must be 'tensor' or 'row', got {scaling!r}")
    device = next(model.parameters()).device
    if emulate is None:
        emulate = not fp8_matmul_supported(device)
        if emulate:
            warnings.warn(f"perf.fp8: no FP8 matmul on {device}; emulating e4m3 rounding (same numerics, slower)", stacklevel=2)
    count = 0
    for name, module in model.named_modules():
        if filter(name, module) and not isinstance(module, FP8Linear):
            module.__class__ = FP8Linear
            module.emulate = emulate or module.in_features % 16 != 0 or module.out_features % 16 != 0
            module.scaling, module.fast_accum = scaling, fast_accum
            count += 1
    return count
