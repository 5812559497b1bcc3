"""Production configs of the supported families (as in their public config.json) and the
computed memory of an APT run per GPU (docs/byo_model.md; computed, not measured).

``parameter_count(family)`` builds the transformer on the meta device (no memory, no weights)
and counts its parameters; ``apt_memory_gib`` applies the byte counts below.
"""

from __future__ import annotations

import torch

PRODUCTION = {
    # recipe -> (family, transformer config overrides on top of the diffusers class defaults)
    "sd3": ("sd3", dict(attention_head_dim=64, caption_projection_dim=2432, in_channels=16, joint_attention_dim=4096, num_attention_heads=38,
                        num_layers=38, out_channels=16, patch_size=2, pooled_projection_dim=2048, pos_embed_max_size=192, qk_norm="rms_norm",
                        sample_size=128)),  # SD3.5 Large
    "flux": ("flux", dict(guidance_embeds=True)),  # FLUX.1-dev
    "wan": ("wan", dict()),  # Wan2.1-T2V-14B (the class defaults)
    "cogvideox": ("cogvideox", dict(num_attention_heads=48, num_layers=42, use_rotary_positional_embeddings=True, sample_height=60,
                                    sample_width=90)),  # CogVideoX-5b
    "ltx": ("ltx", dict()),  # LTX-Video 0.9 (2B, the class defaults)
    "hunyuan": ("hunyuan", dict()),  # HunyuanVideo (13B, the class defaults)
}


def production_adapter(name: str):
    """The adapter around a production-size transformer on the meta device (shapes only)."""
    import diffusers

    from apt.models.adapters import ADAPTERS

    family, overrides = PRODUCTION[name]
    cls = ADAPTERS[family]
    with torch.device("meta"):
        model = getattr(diffusers, cls.model_class)(**overrides)
    return cls(model)


def readout_head_params(dim: int, num_heads: int = 3, mlp_ratio: float = 4.0) -> int:
    """apt.discriminator: per head query + 2 LayerNorms + MHA (4 D^2 + 4 D) + MLP; then norm + proj."""
    hidden = int(dim * mlp_ratio)
    per_head = dim + 2 * 2 * dim + (4 * dim * dim + 4 * dim) + (dim * hidden + hidden + hidden * dim + dim)
    return num_heads * per_head + 2 * num_heads * dim + num_heads * dim + 1


def apt_memory_gib(num_params: int, head_params: int) -> dict[str, float]:
    """Weights + gradients + optimiser state + EMA of G and D, in GiB, for two precision set-ups.

    pure bf16 (the paper trains in bf16): G and D params, grads and RMSProp square_avg in bf16
    (2 + 2 + 2 bytes each), EMA of G in bf16 (2 bytes).
    mixed (fp32 master): fp32 params, grads and square_avg (4 + 4 + 4) + a bf16 working copy (2)
    for G and D, EMA of G in fp32 (4 bytes).
    Activations, the frozen text encoder and the VAE are not included.
    """
    G, D = num_params, num_params + head_params
    gib = 1024**3
    return {"pure_bf16": (6 * G + 2 * G + 6 * D) / gib, "mixed_fp32_master": (14 * G + 4 * G + 14 * D) / gib}
