"""Tiny random configs of every supported diffusers family and its VAE (tests, smoke runs, docs).

Milliseconds per forward on CPU; built offline from configs (as diffusers' own tests'
``get_init_dict``). ``write_tiny_family(family, root)`` saves ``root/transformer`` and
``root/vae`` with ``save_pretrained`` so they load through the real loading code.
"""

from __future__ import annotations

from pathlib import Path

import torch

TEXT_DIM = 64  # the width of apt's toy-t5 text encoder
POOLED_DIM = 8

TINY_TRANSFORMERS: dict[str, dict] = {
    "sd3": dict(sample_size=16, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
                joint_attention_dim=TEXT_DIM, caption_projection_dim=16, pooled_projection_dim=POOLED_DIM, out_channels=4, pos_embed_max_size=16),
    "flux": dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
                 joint_attention_dim=TEXT_DIM, pooled_projection_dim=POOLED_DIM, axes_dims_rope=(4, 6, 6), guidance_embeds=True),  # as FLUX.1-dev
    "wan": dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4, text_dim=TEXT_DIM,
                freq_dim=32, ffn_dim=32, num_layers=2, rope_max_seq_len=32),
    "cogvideox": dict(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, time_embed_dim=8, text_embed_dim=TEXT_DIM,
                      num_layers=2, sample_width=8, sample_height=8, sample_frames=9, patch_size=2, temporal_compression_ratio=4,
                      max_text_seq_length=32),
    "ltx": dict(in_channels=8, out_channels=8, patch_size=1, patch_size_t=1, num_attention_heads=2, attention_head_dim=8,
                cross_attention_dim=16, num_layers=2, caption_channels=TEXT_DIM),
    "hunyuan": dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=10, num_layers=1, num_single_layers=1,
                    num_refiner_layers=1, patch_size=1, patch_size_t=1, guidance_embeds=True, text_embed_dim=TEXT_DIM,
                    pooled_projection_dim=POOLED_DIM, rope_axes_dim=(2, 4, 4)),
}

TINY_VAES: dict[str, tuple[str, dict]] = {
    "sd3": ("AutoencoderKL", dict(block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                                  latent_channels=4, norm_num_groups=4, layers_per_block=1, shift_factor=0.1, scaling_factor=1.5)),
    "wan": ("AutoencoderKLWan", dict(base_dim=8, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True],
                                     latents_mean=[0.1, -0.1, 0.0, 0.2], latents_std=[1.5, 2.0, 1.0, 0.5])),
    "cogvideox": ("AutoencoderKLCogVideoX", dict(block_out_channels=(8, 8, 8, 8), latent_channels=4, layers_per_block=1, norm_num_groups=2,
                                                 temporal_compression_ratio=4)),
    "ltx": ("AutoencoderKLLTXVideo", dict(latent_channels=8, block_out_channels=(8, 8, 8, 8), decoder_block_out_channels=(8, 8, 8, 8),
                                          layers_per_block=(1, 1, 1, 1, 1), decoder_layers_per_block=(1, 1, 1, 1, 1),
                                          spatio_temporal_scaling=(True, True, False, False), decoder_spatio_temporal_scaling=(True, True, False, False),
                                          decoder_inject_noise=(False,) * 5, upsample_residual=(False,) * 4, upsample_factor=(1,) * 4)),
    "hunyuan": ("AutoencoderKLHunyuanVideo", dict(latent_channels=4, block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4)),
}
TINY_VAES["flux"] = TINY_VAES["sd3"]

# Pixel geometry the tiny VAE + transformer accept: (frames, height, width).
TINY_PIXELS = {"sd3": (1, 32, 32), "flux": (1, 32, 32), "wan": (5, 32, 32), "cogvideox": (9, 32, 32), "ltx": (9, 64, 64), "hunyuan": (5, 32, 32)}


def tiny_transformer(family: str, seed: int = 0):
    import diffusers

    from apt.models.adapters import ADAPTERS

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return getattr(diffusers, ADAPTERS[family].model_class)(**TINY_TRANSFORMERS[family])


def tiny_vae(family: str, seed: int = 0):
    import diffusers

    name, cfg = TINY_VAES[family]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return getattr(diffusers, name)(**cfg)


def write_tiny_family(family: str, root: str | Path, *, seed: int = 0) -> dict[str, str]:
    """Save a tiny transformer and VAE of ``family`` under root/transformer and root/vae."""
    root = Path(root)
    tiny_transformer(family, seed).save_pretrained(str(root / "transformer"))
    tiny_vae(family, seed).save_pretrained(str(root / "vae"))
    return {"transformer": str(root / "transformer"), "vae": str(root / "vae")}
