"""Chunked video-VAE decode (perf switch ``perf.vae_chunk_frames``).

diffusers' ``AutoencoderKLWan.decode`` runs its causal decoder one latent frame at a time, carrying
a cache of the last frames of every causal conv, and grows the output with ``torch.cat`` per frame
(quadratic copying, two copies of the clip at the peak). ``decode_latents(..., chunk_frames=k)``
runs the same decoder on the first latent frame alone (it is decoded to one pixel frame, the
others to four) and then on chunks of k latent frames, with the same cache, writing each chunk
into a preallocated output (or yielding it: ``iter_decode`` streams pixel frames, e.g. to an
encoder, before the whole clip is decoded). The causal convs see the same inputs either way, so
the result equals ``vae.decode`` up to float rounding (tests/test_perf.py).

Overlap with the DiT: the one-step DiT produces all latent frames at once, so one clip's decode
cannot start before its DiT forward ends; overlap needs several clips in flight (decode clip i on a
side stream while the DiT runs clip i + 1) or a frame-causal generator (AAPT). Not implemented
here yet; see docs/performance.md.

Faster decode without changing the decoder's math (``apply_vae_perf``, switches ``perf.vae_*``):

- ``vae_fold_padding``: each causal conv pads its input with ``F.pad`` (a full copy) after
  concatenating the cached frames (another copy). Here only the causal time padding is explicit
  (usually covered by the cache: then nothing is padded), and the symmetric spatial padding is done
  by the convolution itself; the nearest-exact upsampling runs in the activations' dtype instead of
  a float32 round trip (nearest copies values: exact in any dtype). Two full-size copies fewer per
  conv; zero padding inside the convolution gives the same sums, so the output equals the plain
  decode up to the convolution algorithm's summation order (tests/test_perf.py).
- ``vae_channels_last``: conv weights (and so activations) in channels-last 3D (NDHWC), the layout
  cuDNN's fastest 3D convolution kernels use; the ``(b, t) -> batch`` reshapes around the 2D
  resampling convs become views in this layout. Same math.
- ``vae_compile``: ``torch.compile`` of the decoder (norms, activations and residual adds fused;
  one graph per first / later chunk shape).

Legend: B batch, C channels, T frames (latent T_z = (T - 1) / 4 + 1), H/W height/width.
"""

from __future__ import annotations

import warnings
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn


def _is_wan_vae(vae: nn.Module) -> bool:
    # No "_feat_map": diffusers creates it in clear_cache(), so a VAE that has not decoded yet lacks it.
    wan_layout = all(hasattr(vae, a) for a in ("clear_cache", "post_quant_conv", "decoder"))
    return wan_layout and getattr(vae.config, "patch_size", None) is None  # Wan 2.2's patched VAE differs


def iter_decode(vae: nn.Module, z_BCTHW: torch.Tensor, *, chunk_frames: int) -> Iterator[torch.Tensor]:
    """Yield decoded pixel chunks (B, 3, t, H, W) in [-1, 1], in order: 1 frame, then 4 * chunk_frames each."""
    if chunk_frames < 1:
        raise ValueError(f"chunk_frames must be >= 1, got {chunk_frames}")
    if not _is_wan_vae(vae):
        raise ValueError(f"chunked decode supports diffusers AutoencoderKLWan (Wan 2.1 layout), not {type(vae).__name__}")
    vae.clear_cache()
    try:
        x = vae.post_quant_conv(z_BCTHW)
        T = x.shape[2]
        vae._conv_idx = [0]
        yield vae.decoder(x[:, :, :1], feat_cache=vae._feat_map, feat_idx=vae._conv_idx, first_chunk=True).clamp(-1.0, 1.0)
        for i in range(1, T, chunk_frames):
            vae._conv_idx = [0]
            yield vae.decoder(x[:, :, i : i + chunk_frames], feat_cache=vae._feat_map, feat_idx=vae._conv_idx).clamp(-1.0, 1.0)
    finally:
        vae.clear_cache()


def decode_latents(vae: nn.Module, z_BCTHW: torch.Tensor, *, chunk_frames: int = 0) -> torch.Tensor:
    """Pixels (B, 3, T, H, W) in [-1, 1] from latents; ``chunk_frames`` 0 = the VAE's own ``decode``."""
    if chunk_frames == 0:
        return vae.decode(z_BCTHW).sample
    if not _is_wan_vae(vae):
        warnings.warn(f"perf.vae_chunk_frames ignored: {type(vae).__name__} is not a Wan-layout VAE", stacklevel=2)
        return vae.decode(z_BCTHW).sample
    T_z = z_BCTHW.shape[2]
    t_ratio = vae.config.scale_factor_temporal or 4
    out, start = None, 0
    for chunk in iter_decode(vae, z_BCTHW, chunk_frames=chunk_frames):
        if out is None:  # first latent frame -> one pixel frame; every later one -> t_ratio frames
            B, C, _, H, W = chunk.shape
            out = chunk.new_empty(B, C, (T_z - 1) * t_ratio + 1, H, W)
        out[:, :, start : start + chunk.shape[2]] = chunk
        start += chunk.shape[2]
    assert out is not None and start == out.shape[2], "decoded frame count differs from (T_z - 1) * 4 + 1"
    return out


# -- faster decode (perf.vae_fold_padding, vae_channels_last, vae_compile) -------------------------------
def _wan_module(name: str):
    from diffusers.models.autoencoders import autoencoder_kl_wan

    return getattr(autoencoder_kl_wan, name)


def _fold_padding_classes() -> tuple[type, type]:
    """Subclasses of diffusers' Wan causal conv and upsample with the copies removed (made on first use:
    diffusers is imported only when a VAE is sped up)."""
    global _FOLDED
    if _FOLDED is None:
        WanCausalConv3d, WanUpsample = _wan_module("WanCausalConv3d"), _wan_module("WanUpsample")

        class FoldedCausalConv3d(WanCausalConv3d):
            """Causal conv: cached frames concatenated (one copy), time padding only where the cache does not
            cover it, spatial zero padding inside the convolution."""

            def forward(self, x: torch.Tensor, cache_x: torch.Tensor | None = None) -> torch.Tensor:
                pad_w, _, pad_h, _, pad_t, _ = self._padding
                if cache_x is not None and pad_t > 0:
                    x = torch.cat([cache_x.to(x.device), x], dim=2)
                    pad_t -= cache_x.shape[2]
                if pad_t != 0:  # (negative: crop, as F.pad does)
                    x = F.pad(x, (0, 0, 0, 0, pad_t, 0))
                return F.conv3d(x, self.weight, self.bias, self.stride, (0, pad_h, pad_w), self.dilation, self.groups)

        class NativeDtypeUpsample(WanUpsample):
            """Nearest-exact upsampling in the input's dtype (the parent upcasts to float32 and back)."""

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                return nn.Upsample.forward(self, x)

        _FOLDED = (FoldedCausalConv3d, NativeDtypeUpsample)
    return _FOLDED


_FOLDED: tuple[type, type] | None = None


def _to_channels_last(vae: nn.Module) -> None:
    for m in vae.modules():
        if isinstance(m, (nn.Conv3d, nn.Conv2d)):
            fmt = torch.channels_last_3d if isinstance(m, nn.Conv3d) else torch.channels_last
            m.weight.data = m.weight.data.contiguous(memory_format=fmt)

    def to_ndhwc(_module, args):
        return (args[0].contiguous(memory_format=torch.channels_last_3d), *args[1:])

    vae.decoder.register_forward_pre_hook(to_ndhwc)
    vae.post_quant_conv.register_forward_pre_hook(to_ndhwc)


def apply_vae_perf(vae: nn.Module, perf) -> nn.Module:
    """Apply ``perf.vae_fold_padding``, ``vae_channels_last`` and ``vae_compile`` (a ``PerfConfig``) to a
    diffusers ``AutoencoderKLWan`` in place; returns it. Other VAEs: warns and leaves them unchanged."""
    wanted = perf.vae_fold_padding or perf.vae_channels_last or perf.vae_compile
    if not wanted:
        return vae
    if not _is_wan_vae(vae):
        warnings.warn(f"perf.vae_fold_padding / vae_channels_last / vae_compile ignored: {type(vae).__name__} is not a Wan-layout VAE", stacklevel=2)
        return vae
    if getattr(vae, "_apt_vae_perf", False):
        raise ValueError("apply_vae_perf was already applied to this VAE")
    if perf.vae_fold_padding:
        conv_cls, up_cls = _fold_padding_classes()
        WanCausalConv3d, WanUpsample = _wan_module("WanCausalConv3d"), _wan_module("WanUpsample")
        for m in vae.modules():
            if type(m) is WanCausalConv3d:
                m.__class__ = conv_cls
            elif type(m) is WanUpsample:
                m.__class__ = up_cls
    if perf.vae_channels_last:
        _to_channels_last(vae)
    if perf.vae_compile:
        vae.decoder.compile(backend=perf.compile_backend)
    vae._apt_vae_perf = True
    return vae
