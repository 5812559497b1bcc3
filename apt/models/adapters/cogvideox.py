"""CogVideoX 1.0 / 1.5 (``CogVideoXTransformer3DModel``, expert-AdaLN joint-attention DiT).

Conventions (checked against diffusers' CogVideoXPipeline and a tiny model in
tests/test_adapters.py):

- layout: (B, T, C, H, W); apt's (B, C, T, H, W) is permuted on the way in and out.
- prediction: CogVideoX is a DDPM **v-prediction** model (``CogVideoXDDIMScheduler``: scaled-linear
  betas, SNR shift, zero terminal SNR), not a flow model. The adapter maps apt's rectified-flow
  state to the variance-preserving one and back:

      x_t = (1 - t) x0 + t eps,   s = sqrt((1 - t)^2 + t^2)
      x_vp = x_t / s = sqrt(a) x0 + sqrt(1 - a) eps   with   a = (1 - t)^2 / s^2
      k = the (fractional) DDPM timestep with alphas_cumprod[k] = a (interpolated table)
      v_ddpm = model(x_vp, k)   (= sqrt(a) eps - sqrt(1 - a) x0)
      v = eps_hat - x0_hat = (sqrt(1 - a) - sqrt(a)) x_vp + (sqrt(a) + sqrt(1 - a)) v_ddpm

  One Euler step of this velocity between two table timesteps is exactly a DDIM step (tested).
  At t = 1 (zero terminal SNR) x0_hat = -v_ddpm. The schedule comes from
  ``<model dir>/../scheduler/scheduler_config.json`` when present, else CogVideoX-2b's
  (scaled_linear 0.00085-0.012, snr_shift_scale 3, zero terminal SNR); pass ``scheduler_config``
  to override (CogVideoX-5b uses snr_shift_scale 1).
- text (``CogVideoXAdapter.text``, run by ``apt.text_pipeline``): T5 (``text_embed_dim``, 4096)
  over ``max_sequence_length`` tokens, run without a mask, all attended; the count must be the
  transformer's ``max_text_seq_length`` (226). A shorter TextCond (apt's own toy convention) is
  zero-padded to it.
- positions: 3D RoPE computed as the pipeline does when ``use_rotary_positional_embeddings``
  (1.0: crop region of the base grid; 1.5: ``grid_type="slice"``); 1.5 needs T divisible by
  ``patch_size_t``.
- blocks: ``transformer_blocks`` (CogVideoXBlock) return (hidden, encoder).
"""

from __future__ import annotations

import json

import torch

from apt.models.adapters.base import AdapterConfig, DiffusersAdapter, PipelineText
from apt.models.backbone import TextCond

COGVIDEOX_SCHEDULER = {
    "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "num_train_timesteps": 1000,
    "prediction_type": "v_prediction", "rescale_betas_zero_snr": True, "snr_shift_scale": 3.0, "timestep_spacing": "trailing",
}


def resize_crop_region_for_grid(src: tuple[int, int], tgt_width: int, tgt_height: int):
    """diffusers.pipelines.cogvideo.pipeline_cogvideox.get_resize_crop_region_for_grid."""
    h, w = src
    if h / w > tgt_height / tgt_width:
        resize_height, resize_width = tgt_height, int(round(tgt_height / h * w))
    else:
        resize_width, resize_height = tgt_width, int(round(tgt_width / w * h))
    crop_top, crop_left = int(round((tgt_height - resize_height) / 2.0)), int(round((tgt_width - resize_width) / 2.0))
    return (crop_top, crop_left), (crop_top + resize_height, crop_left + resize_width)


class CogVideoXAdapter(DiffusersAdapter):
    family = "cogvideox"
    model_class = "CogVideoXTransformer3DModel"
    pipeline_class = "CogVideoXPipeline"
    text = PipelineText(
        encoders=("text_encoder",), max_length=226, attention_mask=False, pooled=False,
        summary="T5 (226 tokens = the transformer's max_text_seq_length, no mask; all attended)",
    )
    visual_index = 0

    def __init__(self, model, *, scheduler_config: dict | None = None):
        super().__init__(model)
        from diffusers import CogVideoXDDIMScheduler

        sched = CogVideoXDDIMScheduler.from_config({**COGVIDEOX_SCHEDULER, **(scheduler_config or {})})
        if sched.config.prediction_type != "v_prediction":
            raise ValueError(f"CogVideoX adapter expects a v_prediction scheduler, got {sched.config.prediction_type}")
        # A plain float64 attribute, not a buffer: a module-wide .to(bfloat16) must not round the table.
        self.alphas_cumprod = sched.alphas_cumprod.to(torch.float64).clone()

    @classmethod
    def pipeline_kwargs(cls, model_dir) -> dict:
        """The pipeline's own schedule (``../scheduler/scheduler_config.json``) when there is one."""
        sched_file = model_dir.parent / "scheduler" / "scheduler_config.json"
        if not sched_file.exists():
            return {}
        return {"scheduler_config": {k: v for k, v in json.loads(sched_file.read_text()).items() if not k.startswith("_")}}

    @classmethod
    def describe(cls, mc) -> AdapterConfig:
        p = mc.patch_size
        return AdapterConfig(
            family=cls.family, num_heads=mc.num_attention_heads, in_channels=mc.in_channels, patch_size=(mc.patch_size_t or 1, p, p),
            text_dim=mc.text_embed_dim, max_text_length=mc.max_text_seq_length,
        )

    # -- rectified flow <-> DDPM v-prediction ---------------------------------------------------------
    def ddpm_timestep(self, t_B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(fractional DDPM timestep k, alpha_bar a) for rectified-flow time t."""
        t = t_B.double()
        a = (1 - t) ** 2 / ((1 - t) ** 2 + t**2)
        table = self.alphas_cumprod.to(t.device).flip(0)  # increasing alpha_bar
        n = table.shape[0]
        a_c = a.clamp(float(table[0]), float(table[-1]))
        hi = torch.searchsorted(table, a_c).clamp(1, n - 1)
        lo = hi - 1
        frac = ((a_c - table[lo]) / (table[hi] - table[lo]).clamp(min=1e-30)).clamp(0, 1)
        k = (n - 1) - (lo.double() + frac)
        return k, a

    def flow_time(self, k: int | torch.Tensor) -> torch.Tensor:
        """Rectified-flow t whose alpha_bar equals the table's at integer timestep k (for tests/export)."""
        a = self.alphas_cumprod[torch.as_tensor(k)]
        return (1 - a).sqrt() / (a.sqrt() + (1 - a).sqrt())

    def rotary(self, T: int, H: int, W: int, device) -> tuple[torch.Tensor, torch.Tensor] | None:
        mc = self.model.config
        if not mc.use_rotary_positional_embeddings:
            return None
        from diffusers.models.embeddings import get_3d_rotary_pos_embed

        p, pt = mc.patch_size, mc.patch_size_t
        gh, gw = H // p, W // p
        base_w, base_h = mc.sample_width // p, mc.sample_height // p
        if pt is None:
            crops = resize_crop_region_for_grid((gh, gw), base_w, base_h)
            return get_3d_rotary_pos_embed(embed_dim=mc.attention_head_dim, crops_coords=crops, grid_size=(gh, gw), temporal_size=T, device=device)
        return get_3d_rotary_pos_embed(
            embed_dim=mc.attention_head_dim, crops_coords=None, grid_size=(gh, gw), temporal_size=T // pt,
            grid_type="slice", max_size=(base_h, base_w), device=device,
        )

    def _forward(self, x_BCTHW: torch.Tensor, t_B: torch.Tensor, text: TextCond) -> torch.Tensor:
        dtype = self.dtype
        B, C, T, H, W = x_BCTHW.shape
        mc = self.model.config
        k, a = self.ddpm_timestep(t_B)
        sa, s1a = a.sqrt().float().view(B, 1, 1, 1, 1), (1 - a).sqrt().float().view(B, 1, 1, 1, 1)
        scale = (sa + s1a).to(x_BCTHW.dtype)  # = 1 / s
        x_vp = x_BCTHW * scale
        emb = self.masked_text(text, dtype)
        emb = torch.nn.functional.pad(emb, (0, 0, 0, mc.max_text_seq_length - emb.shape[1]))
        p, pt = mc.patch_size, mc.patch_size_t or 1
        self._num_visual_tokens, self._num_text_tokens = (T // pt) * (H // p) * (W // p), emb.shape[1]
        ofs = None if mc.ofs_embed_dim is None else x_BCTHW.new_full((B,), 2.0)
        v_ddpm = self.model(
            hidden_states=x_vp.permute(0, 2, 1, 3, 4).to(dtype),
            encoder_hidden_states=emb,
            timestep=k.float(),
            ofs=ofs,
            image_rotary_emb=self.rotary(T, H, W, x_BCTHW.device),
            return_dict=False,
        )[0].permute(0, 2, 1, 3, 4).float()
        v = (s1a - sa) * x_vp.float() + (sa + s1a) * v_ddpm
        return v.to(x_BCTHW.dtype)
