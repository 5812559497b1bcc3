"""Wan 2.1 / 2.2 text-to-video (``WanTransformer3DModel``).

Conventions (checked against diffusers' WanPipeline and a tiny model in tests/test_adapters.py):

- layout: (B, C, T, H, W), as apt's.
- timestep: ``t * 1000``.
- output: flow velocity ``eps - x0`` (Wan is trained with flow matching; the pipeline's UniPC
  scheduler uses ``prediction_type="flow_prediction"``).
- text (``WanAdapter.text``, run by ``apt.text_pipeline``): UMT5 (``text_dim``, 4096) over the
  cleaned prompt, padded to ``max_sequence_length`` (512) tokens and run with its mask; the rows past
  the prompt are zeroed, and the transformer takes all 512 rows with no mask (its text embedder turns
  the zero rows into non-zero tokens, so the padded length matters). Image-to-video variants
  (``image_dim``) are not supported.
- blocks: ``blocks`` (WanTransformerBlock) return the visual tokens (B, N, D) as a tensor (text
  enters by cross-attention only).
"""

from __future__ import annotations

import torch
from torch import nn

from apt.models.adapters.base import AdapterConfig, DiffusersAdapter, PipelineText
from apt.models.backbone import TextCond


class WanAdapter(DiffusersAdapter):
    family = "wan"
    model_class = "WanTransformer3DModel"
    pipeline_class = "WanPipeline"
    text = PipelineText(
        encoders=("text_encoder",), max_length=512, attention_mask=False, pooled=False,
        summary="UMT5 over the cleaned prompt, 512 tokens, run with its mask; rows past the prompt zeroed; "
                "the transformer attends to all 512 rows (no mask)",
    )
    visual_index = None

    @classmethod
    def describe(cls, mc) -> AdapterConfig:
        if mc.image_dim is not None:
            raise ValueError("Wan image-to-video transformers (image_dim set) are not supported; use a text-to-video checkpoint")
        return AdapterConfig(
            family=cls.family, num_heads=mc.num_attention_heads, in_channels=mc.in_channels, patch_size=tuple(mc.patch_size),
            text_dim=mc.text_dim,
        )

    def block_lists(self) -> list[nn.ModuleList]:
        return [self.model.blocks]

    def _forward(self, x_BCTHW: torch.Tensor, t_B: torch.Tensor, text: TextCond) -> torch.Tensor:
        dtype = self.dtype
        out = self.model(
            hidden_states=x_BCTHW.to(dtype),
            timestep=t_B * 1000.0,
            encoder_hidden_states=self.masked_text(text, dtype),
            return_dict=False,
        )[0]
        return out.to(x_BCTHW.dtype)
