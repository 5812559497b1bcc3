"""LTX-Video (``LTXVideoTransformer3DModel``).

Conventions (checked against diffusers' LTXPipeline and a tiny model in tests/test_adapters.py):

- layout: packed tokens (B, T/pt * H/p * W/p, C * pt * p * p), as ``LTXPipeline._pack_latents``;
  the transformer gets the latent grid size for its 3D RoPE.
- RoPE scale: ``rope_interpolation_scale = (vae_temporal / frame_rate, vae_spatial, vae_spatial)``
  as the pipeline computes it; the adapter holds ``frame_rate`` (default 24, apt's video recipes;
  the pipeline's default is 25: pass ``frame_rate=24`` to the pipeline) and the VAE's compression
  factors, read from the pipeline's ``vae/`` beside the transformer (8 temporal, 32 spatial when
  there is none: LTX-Video's).
- timestep: ``t * 1000``.
- output: flow velocity ``eps - x0`` (FlowMatchEulerDiscreteScheduler), unpacked to BCTHW.
- text (``LTXAdapter.text``, run by ``apt.text_pipeline``): T5 (``caption_channels``, 4096) over
  ``max_sequence_length`` (128) tokens, run without a mask; the transformer takes the tokenizer's
  mask as ``encoder_attention_mask`` (TextCond's mask), the embeddings as they are.
- blocks: ``transformer_blocks`` (LTXVideoTransformerBlock) return the visual tokens as a tensor.
"""

from __future__ import annotations

import json

import torch

from apt.models.adapters.base import AdapterConfig, DiffusersAdapter, PipelineText
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
    pipeline_class = "LTXPipeline"
    text = PipelineText(
        encoders=("text_encoder",), max_length=128, attention_mask=True, pooled=False,
        summary="T5 (128 tokens, run without a mask); the transformer takes the tokenizer's mask",
    )
    visual_index = None

    def __init__(self, model, *, frame_rate: float = 24.0, vae_temporal_compression: int = 8, vae_spatial_compression: int = 32):
        super().__init__(model)
        self.frame_rate = frame_rate
        self.rope_interpolation_scale = (vae_temporal_compression / frame_rate, vae_spatial_compression, vae_spatial_compression)

    @classmethod
    def pipeline_kwargs(cls, model_dir) -> dict:
        """The compression factors of the pipeline's VAE (``../vae/config.json``), as ``LTXPipeline`` reads them."""
        vae_file = model_dir.parent / "vae" / "config.json"
        if not vae_file.exists():
            return {}
        import diffusers

        config = json.loads(vae_file.read_text())
        if config.get("_class_name") != "AutoencoderKLLTXVideo":
            return {}
        with torch.device("meta"):  # the class computes the factors from its config; no memory, no weights
            vae = diffusers.AutoencoderKLLTXVideo.from_config(config)
        return {"vae_temporal_compression": vae.temporal_compression_ratio, "vae_spatial_compression": vae.spatial_compression_ratio}

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
            encoder_hidden_states=text.emb_BLD.to(dtype),  # masked in attention, as the pipeline passes them
            timestep=t_B * 1000.0,
            encoder_attention_mask=text.mask_BL.to(dtype),
            num_frames=T // pt,
            height=H // p,
            width=W // p,
            rope_interpolation_scale=self.rope_interpolation_scale,
            return_dict=False,
        )[0]
        return unpack_latents(out, T // pt, H // p, W // p, p, pt).to(x_BCTHW.dtype)
