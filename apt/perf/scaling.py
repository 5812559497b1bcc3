"""Scaling model for one-step inference on N GPUs: sequence-parallel DiT + VAE decode split in tiles.

A model, not a measurement: it rests on single-GPU stage times (the paper's figures until we have
our own) and on a link bandwidth, and gives a lower bound (no kernel-efficiency loss from
smaller per-GPU shapes, no launch or synchronisation overhead).

    T(N)       = T_text + T_dit(N) + T_vae(N)                     (text encoding replicated)
    T_dit(N)   = T_dit(1) / N + layers * T_a2a(N)
    T_a2a(N)   = bytes(N) * (N - 1) / N / bandwidth
    bytes(N)   = 4 * S * D * 2 / N                                 (Ulysses, bf16, per GPU per layer)
    T_vae(N)   = T_vae(1) * (H_z / g_h + 2 h)(W_z / g_w + 2 h) / (H_z W_z),   g_h * g_w = N

Ulysses (DeepSpeed-Ulysses, arXiv 2309.14509) keeps the sequence split S / N everywhere except
attention, where an all-to-all regroups q, k, v from "S / N tokens, all heads" to "all tokens,
K / N heads" and a fourth one brings the output back: 4 all-to-alls of S / N x D values per GPU per
layer, of which (N - 1) / N leave the GPU. Every matmul (linear and attention) is split N ways, so
compute divides by N (heads must divide by N: 24 / 8 = 3 for apt-8b).

The VAE decode is split into a g_h x g_w grid of spatial tiles, each extended by a halo of h
latent pixels on every side (recomputed, then cut; diffusers' Wan tiled decode overlaps tiles by 8
latent pixels = 64 pixels and blends). Wan's decoder has a global attention layer in its mid block,
so tiles are an approximation (like diffusers' own tiling), not exact. Splitting by frames instead
is worse here: 13 latent frames over 8 GPUs, plus the causal cache the next chunk needs.
"""

from __future__ import annotations

import math

NVLINK4_GBPS_PER_DIRECTION = 450.0  # H100 SXM: 900 GB/s NVLink 4 per GPU, both directions together


def ulysses_bytes_per_gpu_per_layer(seq_len: int, width: int, num_gpus: int, *, bytes_per_value: int = 2) -> float:
    """4 all-to-alls (q, k, v in; output back) of S / N x D values each."""
    return 4 * seq_len * width * bytes_per_value / num_gpus


def tile_grid(num_gpus: int, height: int, width: int) -> tuple[int, int]:
    """The g_h x g_w factorisation of num_gpus whose tiles are closest to square."""
    best = None
    for g_h in range(1, num_gpus + 1):
        if num_gpus % g_h:
            continue
        g_w = num_gpus // g_h
        aspect = abs(math.log((height / g_h) / (width / g_w)))
        if best is None or aspect < best[0]:
            best = (aspect, g_h, g_w)
    return best[1], best[2]


def multi_gpu_estimate(
    *, num_gpus: int, text_s: float, dit_s: float, vae_s: float, seq_len: int, width: int, layers: int,
    latent_hw: tuple[int, int], halo: int = 8, bandwidth_gbps: float = NVLINK4_GBPS_PER_DIRECTION,
) -> dict[str, float]:
    """Stage times on ``num_gpus`` GPUs from single-GPU stage times (seconds), per the formula above."""
    n = num_gpus
    a2a_bytes = ulysses_bytes_per_gpu_per_layer(seq_len, width, n)
    a2a_s = a2a_bytes * (n - 1) / n / (bandwidth_gbps * 1e9)
    dit = dit_s / n + layers * a2a_s
    H, W = latent_hw
    g_h, g_w = tile_grid(n, H, W)
    tile_fraction = (H / g_h + 2 * halo) * (W / g_w + 2 * halo) / (H * W) if n > 1 else 1.0
    vae = vae_s * tile_fraction
    return {
        "num_gpus": n, "text_s": text_s, "dit_s": dit, "dit_compute_s": dit_s / n, "dit_comm_s": layers * a2a_s,
        "a2a_bytes_per_gpu_per_layer": a2a_bytes, "vae_s": vae, "vae_tile_grid": f"{g_h}x{g_w}", "vae_tile_fraction": tile_fraction,
        "total_s": text_s + dit + vae,
    }
