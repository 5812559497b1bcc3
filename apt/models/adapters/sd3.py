"""Stable Diffusion 3 / 3.5 (``SD3Transformer2DModel``, MMDiT; arXiv 2403.03206).

Conventions (checked against diffusers' StableDiffusion3Pipeline and a tiny model in
tests/test_adapters.py):

- layout: 2D latents (B, C, H, W); apt's (B, C, 1, H, W) is squeezed/unsqueezed.
- timestep: ``t * 1000`` (the pipeline passes the scheduler's ``sigma * 1000``).
- output: flow velocity ``eps - x0`` (FlowMatchEulerDiscreteScheduler), returned as is.
- text (``SD3Adapter.text``, run by ``apt.text_pipeline``): CLIP-L and CLIP-G over 77 tokens each
  (no mask, penultimate hidden states), concatenated along the width and zero-padded to the T5 width
  (``joint_attention_dim``, 4096), then T5 over ``max_sequence_length`` (256) tokens (no mask):
  333 tokens, all attended. ``pooled_projections`` (2048) = CLIP-L + CLIP-G text projections
  (``TextCond.pooled_BP``; zeros, with a warning, when a TextCond carries none).
- blocks: ``transformer_blocks`` (JointTransformerBlock) return (encoder, hidden); the last
  block returns (None, hidden).
"""

from __future__ import annotations

import torch

from apt.models.adapters.base import AdapterConfig, DiffusersAdapter, PipelineText
from apt.models.backbone import TextCond


class SD3Adapter(DiffusersAdapter):
    family = "sd3"
    model_class = "SD3Transformer2DModel"
    pipeline_class = "StableDiffusion3Pipeline"
    text = PipelineText(
        encoders=("text_encoder", "text_encoder_2", "text_encoder_3"), max_length=256, attention_mask=False, pooled=True,
        summary="CLIP-L + CLIP-G (77 tokens each, no mask, penultimate layer, widths concatenated and zero-padded to T5's) "
                "then T5 (256 tokens, no mask): 333 tokens, all attended; pooled = CLIP-L + CLIP-G projections",
    )
    visual_index = 1

    @classmethod
    def describe(cls, mc) -> AdapterConfig:
        p = mc.patch_size
        return AdapterConfig(
            family=cls.family, num_heads=mc.num_attention_heads, in_channels=mc.in_channels, patch_size=(1, p, p),
            text_dim=mc.joint_attention_dim, pooled_dim=mc.pooled_projection_dim, video=False,
        )

    def _forward(self, x_BCTHW: torch.Tensor, t_B: torch.Tensor, text: TextCond) -> torch.Tensor:
        dtype = self.dtype
        x_BCHW = x_BCTHW[:, :, 0].to(dtype)
        p = self.config.patch_size[1]
        self._num_visual_tokens = (x_BCHW.shape[-2] // p) * (x_BCHW.shape[-1] // p)
        self._num_text_tokens = text.emb_BLD.shape[1]
        out = self.model(
            hidden_states=x_BCHW,
            encoder_hidden_states=self.masked_text(text, dtype),
            pooled_projections=self.pooled(text, dtype),
            timestep=t_B * 1000.0,
            return_dict=False,
        )[0]
        return out.unsqueeze(2).to(x_BCTHW.dtype)
