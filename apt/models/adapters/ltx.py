"""LTX-Video (``LTXVideoTransformer3DModel``).

Conventions (checked against diffusers' LTXPipeline and a tiny model in tests/test_adapters.py):

- layout: packed tokens (B, T/pt * H/p * W/p, C * pt * p * p), as ``LTXPipeline._pack_latents``;
  the transformer gets the latent grid size for its 3D RoPE.
- RoPE scale: ``rope_interpolation_scale = (vae_temporal / frame_rate, vae_spatial, vae_spatial)``
  as the pipeline computes it; the adapter holds ``frame_rate`` (default 24, apt's video recipes;
  the pipeline's default is 25) and the LTX VAE factors (8 temporal, 32 spatial).
- timestep: ``t * 1000``.
- output: flow velocity ``eps - x0`` (FlowMatchEulerDiscreteScheduler), unpacked to BCTHW.
- text: T5 embeddings (``caption_channels``, 4096) with ``encoder_attention_mask`` = TextCond's mask.
- blocks: ``transformer_blocks`` (LTXVideoTransformerBlock) return the visual tokens as a tensor.
"""

from __future__ import annotations

import torch

from apt.models.adapters.base import AdapterConfig, DiffusersAdapter
from apt.models.backbone import TextCond


def pack_latents(x: torch.Tensor, p: int, pt: int) -> torch.Tensor:
    B, C, T, H, W = x.shape
    x = x.reshape(B, C, T // pt, pt, H // p, p, W // p, p)
    return x.permute(0, 2, 4, 6, 1, 3, 5, 7).flatten(4, 7).flatten(1, 3)


def unpack_latents(x: torch.Tensor, T: int, H: int, W: int, p: int, pt: int) -> torch.Tensor:
    """Inverse of pack_latents; T/H/W are the post-patch grid sizes."""
    B = x.shape[0]
    x = x.reshape(B, T, H, W, -1, pt, p, p)
    return x.permute(0, 4, 1, 5, 2, 6, 3, 7).flatten(6, 7).flatten(4, 5).flatten(2, 3)


class LTXAdapter(DiffusersAdapter):
    family = "ltx"
    model_class = "LTXVideoTransformer3DModel"
    visual_index = None

    def __init__(self, model, *, frame_rate: float = 24.0, vae_temporal_compression: int = 8, vae_spatial_compression: int = 32):
        super().__init__(model)
        self.rope_interpolation_scale = (vae_temporal_compression / frame_rate, vae_spatial_compression, vae_spatial_compression)

    @classmethod
    def describe(cls, mc) -> AdapterConfig:
        p, pt = mc.patch_size, mc.patch_size_t
        return AdapterConfig(
            family=cls.family, num_heads=mc.num_attention_heads, in_channels=mc.in_channels // (p * p * pt),
            patch_size=(pt, p, p), text_dim=mc.caption_channels,
        )

    def _forward(self, x_BCTHW: torch.Tensor, t_B: torch.Tensor, text: TextCond) -> torch.Tensor:
        dtype = self.dtype
        B, C, T, H, W = x_BCTHW.shape
        pt, p, _ = self.config.patch_size
        tokens = pack_latents(x_BCTHW.to(dtype), p, pt)
        self._num_visual_tokens, self._num_text_tokens = tokens.shape[1], text.emb_BLD.shape[1]
        out = self.model(
            hidden_states=tokens,
            encoder_hidden_states=self.masked_text(text, dtype),
            timestep=t_B * 1000.0,
            encoder_attention_mask=text.mask_BL.to(dtype),
            num_frames=T // pt,
            height=H // p,
            width=W // p,
            rope_interpolation_scale=self.rope_interpolation_scale,
            return_dict=False,
        )[0]
        return unpack_latents(out, T // pt, H // p, W // p, p, pt).to(x_BCTHW.dtype)
