"""Named model flavours: the one registry that holds tiny, demo and production shapes.

YAML names a flavour (``model.flavour: demo``); code here builds it. ``apt-8b`` has the APT
paper's shape (36 layers, width 3072, 24 heads); it is single-stream, so the MLP ratio 6.5 brings
it to the paper's ~8B parameters (the paper's MMDiT spreads a similar budget over two streams).
"""

from __future__ import annotations

from dataclasses import replace

from apt.models.dit import DiT, DiTConfig

FLAVOURS: dict[str, DiTConfig] = {
    # Tests: milliseconds per forward on CPU.
    "tiny": DiTConfig(patch_size=(2, 4, 4), hidden_dim=32, depth=3, num_heads=2, mlp_ratio=2.0, text_dim=32, prediction="x0"),
    # The CPU demo teacher (docs/design.md §5: predict x0 at small width; unit-scale sin-cos positions).
    "demo": DiTConfig(patch_size=(2, 4, 4), hidden_dim=96, depth=6, num_heads=4, mlp_ratio=4.0, text_dim=64, prediction="x0"),
    # The APT paper's shape (arXiv 2501.08316 §4: 36 layers, width 3072, ~8B), for a 16-channel
    # latent VAE with 8x spatial / 4x temporal compression and a T5-XXL text encoder.
    "apt-8b": DiTConfig(
        in_channels=16, patch_size=(1, 2, 2), hidden_dim=3072, depth=36, num_heads=24, mlp_ratio=6.5,
        text_dim=4096, prediction="velocity", abs_pos_embed=False,
    ),
}


def build_dit(flavour: str, **overrides) -> DiT:
    """Build a DiT by flavour name, with optional field overrides (e.g. ``text_dim=...``)."""
    if flavour not in FLAVOURS:
        raise ValueError(f"unknown model flavour {flavour!r}; choose from {sorted(FLAVOURS)}")
    return DiT(replace(FLAVOURS[flavour], **overrides))
