"""HunyuanVideo (``HunyuanVideoTransformer3DModel``: token refiner, dual-stream then single-stream blocks).

Conventions (checked against diffusers' HunyuanVideoPipeline and a tiny model in
tests/test_adapters.py):

- layout: (B, C, T, H, W), as apt's.
- timestep: ``t * 1000``; guidance-distilled checkpoints (``guidance_embeds``, the released
  model) also take ``guidance_scale * 1000`` (default 6.0, the pipeline's).
- output: flow velocity ``eps - x0`` (FlowMatchEulerDiscreteScheduler).
- text (``HunyuanVideoAdapter.text``, run by ``apt.text_pipeline``): the Llava-Llama encoder over
  the pipeline's prompt template (``DEFAULT_PROMPT_TEMPLATE``), ``max_sequence_length`` (256) tokens
  after the 95 template tokens it crops, run with its mask; the hidden state of the third-to-last
  layer (``text_embed_dim``, 4096) with ``encoder_attention_mask`` (TextCond's mask); plus
  ``pooled_projections`` (768) = CLIP-L's pooled output over 77 tokens (``TextCond.pooled_BP``).
- blocks: ``transformer_blocks`` then ``single_transformer_blocks``; both return (hidden, encoder).
"""

from __future__ import annotations

import torch
from torch import nn

from apt.models.adapters.base import AdapterConfig, DiffusersAdapter, PipelineText
from apt.models.backbone import TextCond


class HunyuanVideoAdapter(DiffusersAdapter):
    family = "hunyuan"
    model_class = "HunyuanVideoTransformer3DModel"
    pipeline_class = "HunyuanVideoPipeline"
    text = PipelineText(
        encoders=("text_encoder", "text_encoder_2"), max_length=256, attention_mask=True, pooled=True,
        summary="Llama over the pipeline's prompt template (256 tokens after the 95 it crops, with its mask; third-to-last "
                "layer); the transformer takes the mask; pooled = CLIP-L pooled output (77 tokens)",
    )
    visual_index = 0

    def __init__(self, model: nn.Module, *, guidance_scale: float = 6.0):
        super().__init__(model)
        self.guidance_scale = guidance_scale

    @classmethod
    def describe(cls, mc) -> AdapterConfig:
        if mc.image_condition_type is not None:
            raise ValueError("HunyuanVideo image-to-video transformers (image_condition_type set) are not supported")
        p = mc.patch_size
        return AdapterConfig(
            family=cls.family, num_heads=mc.num_attention_heads, in_channels=mc.in_channels, patch_size=(mc.patch_size_t, p, p),
            text_dim=mc.text_embed_dim, pooled_dim=mc.pooled_projection_dim,
        )

    def block_lists(self) -> list[nn.ModuleList]:
        return [self.model.transformer_blocks, self.model.single_transformer_blocks]

    def _forward(self, x_BCTHW: torch.Tensor, t_B: torch.Tensor, text: TextCond) -> torch.Tensor:
        dtype = self.dtype
        B = x_BCTHW.shape[0]
        guidance = None
        if self.model.config.guidance_embeds:
            guidance = torch.full((B,), self.guidance_scale * 1000.0, device=x_BCTHW.device, dtype=dtype)
        _, _, T, H, W = x_BCTHW.shape
        pt, p, _ = self.config.patch_size
        self._num_visual_tokens, self._num_text_tokens = (T // pt) * (H // p) * (W // p), text.emb_BLD.shape[1]
        # An empty prompt (the CFG null text) has no valid token; attention over nothing is NaN in the
        # token refiner, so its first (zero) token is kept valid (the pipeline always has template tokens).
        mask = text.mask_BL.clone()
        mask[:, 0] |= ~mask.any(dim=1)
        out = self.model(
            hidden_states=x_BCTHW.to(dtype),
            timestep=t_B * 1000.0,
            encoder_hidden_states=text.emb_BLD.to(dtype),  # masked in attention, as the pipeline passes them
            encoder_attention_mask=mask,
            pooled_projections=self.pooled(text, dtype),
            guidance=guidance,
            return_dict=False,
        )[0]
        return out.to(x_BCTHW.dtype)
