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

Legend: B batch, C channels, T frames (latent T_z = (T - 1) / 4 + 1), H/W height/width.
"""

from __future__ import annotations

import warnings
from typing import Iterator

import torch
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
