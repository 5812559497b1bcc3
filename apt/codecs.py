"""Latent codecs: diffusers VAEs from local directories, with each family's latent normalisation.

``LatentCodec.load(vae_dir)`` reads ``config.json``'s ``_class_name`` and applies the matching
convention (what each diffusers pipeline does before its transformer sees the latents):

| VAE class               | used by     | encode: latent -> model space           | compression (t, s) |
| ----------------------- | ----------- | --------------------------------------- | ------------------ |
| AutoencoderKL           | SD3, FLUX   | (z - shift_factor) * scaling_factor     | 1, 2^(levels-1)    |
| AutoencoderKLWan        | Wan         | (z - latents_mean) / latents_std        | 4, 8               |
| AutoencoderKLCogVideoX  | CogVideoX   | z * scaling_factor                      | 4, 8               |
| AutoencoderKLLTXVideo   | LTX-Video   | (z - mean) * scaling_factor / std       | 8, 32              |
| AutoencoderKLHunyuanVideo | HunyuanVideo | z * scaling_factor                   | 4, 8               |

Pixels are (B, 3, T, H, W) in [-1, 1]; latents (B, C, T', H', W'). Video VAEs are causal: the
first frame is encoded alone, so T = k * stride + 1 frames give k + 1 latent frames
(``check_frames``). Encoding uses the posterior mean (deterministic shards).

Memory: ``enable_tiling()`` switches on the VAEs' own spatial tiling (and, where they have it,
frame batching: CogVideoX decodes 2 latent frames at a time, LTX/Hunyuan frame-wise above 16
frames, Wan is causal frame by frame). Peak activation memory is then set by the tile, not the
clip: diffusers' default tiles are 256x256 px (Wan/CogVideoX/LTX/Hunyuan) and 512x512 px
(AutoencoderKL), so decoding a 1280x720 49-frame clip needs about the memory of one
256x256-px tile batch (single-digit GiB at bf16 for these VAEs — an estimate from the tile
size, not measured here) plus the output clip (3 x 49 x 720 x 1280 x 2 bytes = 0.27 GiB).
``decode(..., batch_size=1)`` also decodes one sample at a time.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

CODEC_FAMILIES = {
    "AutoencoderKL": ("sd3", "flux"),
    "AutoencoderKLWan": ("wan",),
    "AutoencoderKLCogVideoX": ("cogvideox",),
    "AutoencoderKLLTXVideo": ("ltx",),
    "AutoencoderKLHunyuanVideo": ("hunyuan",),
}


class LatentCodec(nn.Module):
    """A frozen diffusers VAE with its family's normalisation: pixels [-1, 1] <-> model latents."""

    def __init__(self, vae: nn.Module, *, name: str = ""):
        super().__init__()
        self.kind = type(vae).__name__
        if self.kind not in CODEC_FAMILIES:
            raise ValueError(f"unsupported VAE class {self.kind} ({name}); supported: {', '.join(CODEC_FAMILIES)}")
        self.vae = vae.eval().requires_grad_(False)
        self.name = name or self.kind
        self.chunk_frames = 0  # Wan: decode in chunks of this many latent frames (perf.vae_chunk_frames; apply_perf)
        cfg = vae.config
        self.latent_channels = cfg.latent_channels if "latent_channels" in cfg else cfg.z_dim
        if self.kind == "AutoencoderKL":
            self.temporal_stride, self.spatial_factor = 1, 2 ** (len(cfg.block_out_channels) - 1)
        elif self.kind == "AutoencoderKLWan":
            self.temporal_stride, self.spatial_factor = cfg.scale_factor_temporal, cfg.scale_factor_spatial
        elif self.kind == "AutoencoderKLCogVideoX":
            self.temporal_stride, self.spatial_factor = int(cfg.temporal_compression_ratio), 2 ** (len(cfg.block_out_channels) - 1)
        else:
            self.temporal_stride, self.spatial_factor = vae.temporal_compression_ratio, vae.spatial_compression_ratio

    @classmethod
    def load(cls, vae_dir: str | Path, *, dtype: torch.dtype = torch.float32) -> "LatentCodec":
        import json

        import diffusers

        d = Path(vae_dir)
        if not (d / "config.json").exists() and (d / "vae" / "config.json").exists():
            d = d / "vae"
        if not (d / "config.json").exists():
            raise ValueError(f"{vae_dir} is not a diffusers VAE directory (no config.json)")
        name = json.loads((d / "config.json").read_text()).get("_class_name")
        if name not in CODEC_FAMILIES:
            raise ValueError(f"{vae_dir} holds a {name or 'non-diffusers'} model, not a VAE apt supports ({', '.join(CODEC_FAMILIES)})")
        vae = getattr(diffusers, name).from_pretrained(str(d), local_files_only=True, torch_dtype=dtype)
        return cls(vae, name=str(vae_dir))

    # -- normalisation --------------------------------------------------------------------------
    def _mean_std(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.kind == "AutoencoderKLLTXVideo":
            mean, std = self.vae.latents_mean, self.vae.latents_std
        else:
            mean, std = torch.tensor(self.vae.config.latents_mean), torch.tensor(self.vae.config.latents_std)
        shape = (1, -1, 1, 1, 1)
        return mean.to(like).view(shape), std.to(like).view(shape)

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        cfg = self.vae.config
        if self.kind == "AutoencoderKL":
            return (z - (cfg.shift_factor or 0.0)) * cfg.scaling_factor
        if self.kind == "AutoencoderKLWan":
            mean, std = self._mean_std(z)
            return (z - mean) / std
        if self.kind == "AutoencoderKLLTXVideo":
            mean, std = self._mean_std(z)
            return (z - mean) * cfg.scaling_factor / std
        return z * cfg.scaling_factor

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        cfg = self.vae.config
        if self.kind == "AutoencoderKL":
            return z / cfg.scaling_factor + (cfg.shift_factor or 0.0)
        if self.kind == "AutoencoderKLWan":
            mean, std = self._mean_std(z)
            return z * std + mean
        if self.kind == "AutoencoderKLLTXVideo":
            mean, std = self._mean_std(z)
            return z * std / cfg.scaling_factor + mean
        return z / cfg.scaling_factor

    # -- checks ---------------------------------------------------------------------------------
    def latent_frames(self, num_frames: int) -> int:
        return 1 if self.temporal_stride == 1 else (num_frames - 1) // self.temporal_stride + 1

    def check_frames(self, num_frames: int) -> None:
        """Causal video VAEs take k * stride + 1 frames (Wan, CogVideoX, Hunyuan: 4k+1; LTX: 8k+1)."""
        s = self.temporal_stride
        if s > 1 and (num_frames - 1) % s:
            lo = (num_frames - 1) // s * s + 1
            raise ValueError(f"{num_frames} frames does not fit the {self.kind} (temporal stride {s}): use {s}k+1 frames, e.g. {lo} or {lo + s}")
        if self.kind == "AutoencoderKLCogVideoX" and self.latent_frames(num_frames) % 2 == 0:
            # Its decoder runs in batches of 2 latent frames after an odd first batch: an even latent
            # count decodes to 4 frames per latent, not k * 4 + 1 (49 frames -> 13 latents is fine).
            raise ValueError(f"{num_frames} frames give {self.latent_frames(num_frames)} latent frames; the {self.kind} needs an odd count: use 8k+1 frames (e.g. 49)")
        if s == 1 and num_frames != 1:
            raise ValueError(f"{self.kind} is an image VAE: expected 1 frame, got {num_frames}")

    def check_resolution(self, height: int, width: int, patch_size: tuple[int, int, int] = (1, 1, 1)) -> None:
        """Pixels must divide by VAE factor x transformer patch size."""
        f = self.spatial_factor
        _, ph, pw = patch_size
        if height % (f * ph) or width % (f * pw):
            raise ValueError(
                f"resolution {height}x{width} is not divisible by VAE factor x patch size = {f}x{ph} by {f}x{pw} "
                f"(= {f * ph}x{f * pw}) of the {self.kind}"
            )

    def check_backbone(self, backbone) -> None:
        """The VAE's latent channels must be the transformer's input channels."""
        want = backbone.config.in_channels
        if self.latent_channels != want:
            raise ValueError(
                f"VAE {self.name} has {self.latent_channels} latent channels but the transformer "
                f"{getattr(backbone, 'model_class', type(backbone).__name__)} expects in_channels={want}"
            )

    # -- encode / decode ------------------------------------------------------------------------
    def apply_perf(self, perf) -> None:
        """The decode speed switches of a ``PerfConfig`` (``perf.vae_*``, ``apt.perf.vae``): chunked decode,
        folded conv padding, channels-last layout, compile. Wan VAEs only; elsewhere they warn and do nothing."""
        from apt.perf.vae import apply_vae_perf

        apply_vae_perf(self.vae, perf)
        if perf.vae_chunk_frames and self.kind != "AutoencoderKLWan":
            import warnings

            warnings.warn(f"perf.vae_chunk_frames ignored: the {self.kind} is not a Wan VAE", stacklevel=2)
        self.chunk_frames = perf.vae_chunk_frames if self.kind == "AutoencoderKLWan" else 0

    def enable_tiling(self) -> None:
        if hasattr(self.vae, "enable_tiling"):
            self.vae.enable_tiling()

    @torch.no_grad()
    def encode(self, pixels_BCTHW: torch.Tensor, *, sample: bool = False, generator: torch.Generator | None = None) -> torch.Tensor:
        """Pixels in [-1, 1] (B, 3, T, H, W) -> normalised latents (B, C, T', H', W')."""
        if pixels_BCTHW.ndim != 5 or pixels_BCTHW.shape[1] != 3:
            raise ValueError(f"expected pixels (B, 3, T, H, W), got {tuple(pixels_BCTHW.shape)}")
        B, _, T, H, W = pixels_BCTHW.shape
        self.check_frames(T)
        self.check_resolution(H, W)
        x = pixels_BCTHW.to(self.vae.dtype)
        if self.kind == "AutoencoderKL":
            x = x[:, :, 0]
        dist = self.vae.encode(x).latent_dist
        z = dist.sample(generator) if sample else dist.mode()
        if self.kind == "AutoencoderKL":
            z = z.unsqueeze(2)
        return self.normalize(z.float())

    @torch.no_grad()
    def decode(self, latents_BCTHW: torch.Tensor, *, batch_size: int = 0) -> torch.Tensor:
        """Normalised latents -> pixels in [-1, 1] (B, 3, T, H, W); ``batch_size`` > 0 decodes in chunks."""
        if batch_size and latents_BCTHW.shape[0] > batch_size:
            return torch.cat([self.decode(z, batch_size=0) for z in latents_BCTHW.split(batch_size)])
        if latents_BCTHW.shape[1] != self.latent_channels:
            raise ValueError(f"latents have {latents_BCTHW.shape[1]} channels but the VAE {self.name} has {self.latent_channels}")
        z = self.denormalize(latents_BCTHW.float()).to(self.vae.dtype)
        kwargs = {}
        if self.kind == "AutoencoderKLLTXVideo" and self.vae.config.timestep_conditioning:
            kwargs["temb"] = torch.zeros(z.shape[0], device=z.device, dtype=z.dtype)  # decode_timestep 0
        if self.kind == "AutoencoderKL":
            x = self.vae.decode(z[:, :, 0], return_dict=False)[0].unsqueeze(2)
        elif self.chunk_frames:
            from apt.perf.vae import decode_latents

            x = decode_latents(self.vae, z, chunk_frames=self.chunk_frames)
        else:
            x = self.vae.decode(z, return_dict=False, **kwargs)[0]
        return x.float().clamp(-1, 1)


def check_codec_fits(codec: LatentCodec, backbone, *, num_frames: int, height: int, width: int) -> None:
    """All codec/transformer/data geometry checks in one call (errors name the mismatch)."""
    codec.check_backbone(backbone)
    codec.check_frames(num_frames)
    codec.check_resolution(height, width, backbone.config.patch_size)
    lt = codec.latent_frames(num_frames)
    pt = backbone.config.patch_size[0]
    if lt % pt:
        raise ValueError(f"{num_frames} frames give {lt} latent frames, not divisible by the transformer's temporal patch {pt}")
