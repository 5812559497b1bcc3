"""FLUX.1 (``FluxTransformer2DModel``: double-stream MMDiT blocks, then single-stream blocks).

Conventions (checked against diffusers' FluxPipeline and a tiny model in tests/test_adapters.py):

- layout: packed tokens. Latents (B, C, H, W) are packed into 2x2 patches
  (B, H/2 * W/2, 4C) with position ids (0, row, col), as ``FluxPipeline._pack_latents``;
  ``in_channels`` of the transformer is 4x the VAE's latent channels.
- timestep: ``t`` itself (the transformer multiplies by 1000 inside; the pipeline passes
  ``sigma * 1000 / 1000``). Guidance-distilled checkpoints (``guidance_embeds``, FLUX.1-dev) also
  take a guidance value: ``guidance_scale`` (default 3.5, the pipeline's), fixed per adapter.
- output: flow velocity ``eps - x0``, unpacked back to (B, C, 1, H, W).
- text (``FluxAdapter.text``, run by ``apt.text_pipeline``): T5 (``joint_attention_dim``, 4096)
  over ``max_sequence_length`` (512) tokens, run without a mask, all attended; text position ids all
  zero; ``pooled_projections`` (768) = CLIP-L's pooled output over 77 tokens (``TextCond.pooled_BP``;
  zeros, with a warning, when a TextCond carries none).
- blocks: ``transformer_blocks`` then ``single_transformer_blocks``; in diffusers >= 0.32 both
  return (encoder, hidden); a joint [text, image] sequence (older single blocks) is sliced.
"""

from __future__ import annotations

import torch
from torch import nn

from apt.models.adapters.base import AdapterConfig, DiffusersAdapter, PipelineText
from apt.models.backbone import TextCond


def pack_latents(x_BCHW: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/2 * W/2, 4C), FluxPipeline._pack_latents."""
    B, C, H, W = x_BCHW.shape
    x = x_BCHW.view(B, C, H // 2, 2, W // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(B, (H // 2) * (W // 2), C * 4)


def unpack_latents(x_BNP: torch.Tensor, H: int, W: int) -> torch.Tensor:
    """(B, H/2 * W/2, 4C) -> (B, C, H, W), FluxPipeline._unpack_latents."""
    B, _, P = x_BNP.shape
    x = x_BNP.view(B, H // 2, W // 2, P // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(B, P // 4, H, W)


def image_ids(h: int, w: int, device=None, dtype=None) -> torch.Tensor:
    """(h * w, 3) position ids (0, row, col), FluxPipeline._prepare_latent_image_ids."""
    ids = torch.zeros(h, w, 3, device=device, dtype=dtype)
    ids[..., 1] = torch.arange(h, device=device, dtype=dtype)[:, None]
    ids[..., 2] = torch.arange(w, device=device, dtype=dtype)[None, :]
    return ids.reshape(h * w, 3)


class FluxAdapter(DiffusersAdapter):
    family = "flux"
    model_class = "FluxTransformer2DModel"
    pipeline_class = "FluxPipeline"
    text = PipelineText(
        encoders=("text_encoder", "text_encoder_2"), max_length=512, attention_mask=False, pooled=True,
        summary="T5 (512 tokens, no mask; all attended); pooled = CLIP-L pooled output (77 tokens)",
    )
    visual_index = 1

    def __init__(self, model: nn.Module, *, guidance_scale: float = 3.5):
        super().__init__(model)
        self.guidance_scale = guidance_scale

    @classmethod
    def describe(cls, mc) -> AdapterConfig:
        if mc.patch_size != 1:
            raise ValueError(f"FLUX adapter supports patch_size 1 (2x2 packing), got {mc.patch_size}")
        return AdapterConfig(
            family=cls.family, num_heads=mc.num_attention_heads, in_channels=mc.in_channels // 4, patch_size=(1, 2, 2),
            text_dim=mc.joint_attention_dim, pooled_dim=mc.pooled_projection_dim, video=False,
        )

    def block_lists(self) -> list[nn.ModuleList]:
        return [self.model.transformer_blocks, self.model.single_transformer_blocks]

    def _forward(self, x_BCTHW: torch.Tensor, t_B: torch.Tensor, text: TextCond) -> torch.Tensor:
        dtype = self.dtype
        B, _, _, H, W = x_BCTHW.shape
        tokens = pack_latents(x_BCTHW[:, :, 0].to(dtype))
        L = text.emb_BLD.shape[1]
        self._num_visual_tokens, self._num_text_tokens = tokens.shape[1], L
        guidance = None
        if self.model.config.guidance_embeds:
            guidance = torch.full((B,), self.guidance_scale, device=x_BCTHW.device, dtype=torch.float32)
        out = self.model(
            hidden_states=tokens,
            encoder_hidden_states=self.masked_text(text, dtype),
            pooled_projections=self.pooled(text, dtype),
            timestep=t_B.to(dtype),
            img_ids=image_ids(H // 2, W // 2, device=x_BCTHW.device, dtype=dtype),
            txt_ids=torch.zeros(L, 3, device=x_BCTHW.device, dtype=dtype),
            guidance=guidance,
            return_dict=False,
        )[0]
        return unpack_latents(out, H, W).unsqueeze(2).to(x_BCTHW.dtype)
