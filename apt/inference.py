"""Load the product of any stage from its checkpoint and generate: the EMA network, Euler steps.

Which weights a stage ships: teacher -> ``net_ema`` (25 steps + CFG by default), distill ->
``net_ema`` (1 step), apt -> ``generator_ema`` (1 step; also works zero-shot at 2).
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from apt.checkpoint import CheckpointError, latest_checkpoint, list_checkpoints, verify_checkpoint
from apt.config import MANY_STEP_STAGES, Config, PerfConfig, config_from_yaml
from apt.flow import euler_sample
from apt.media import to_uint8
from apt.models import factory
from apt.perf import apply_perf
from apt.streaming import bare, stream_sample
from apt.text import TextEncoder

PRODUCT = {"teacher": "net_ema", "distill": "net_ema", "apt": "generator_ema",
           "stream_teacher": "net_ema", "stream_distill": "net_ema", "stream_apt": "generator_ema"}



def seeded_noise(shape: tuple[int, ...], seeds: list[int]) -> torch.Tensor:
    """One z per seed, so a sample does not depend on the batch it is generated in."""
    return torch.stack([torch.randn(*shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds])


@torch.no_grad()
def sample(net, text_encoder: TextEncoder, config: Config, prompts: list[str], seeds: list[int], *, steps: int, cfg_scale: float, frames: int | None = None, device="cpu") -> torch.Tensor:
    """Euler sampling (``steps`` = 1: the one-step generator) from seeded noise, with CFG when cfg_scale != 1.
    A causal network streams the clip chunk by chunk with its key/value cache (``apt.streaming``)."""
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    c = config
    z = seeded_noise((c.data.channels, c.data.frames if frames is None else frames, c.data.height, c.data.width), seeds).to(device)
    text = text_encoder.encode(prompts).to(device)
    negative = text_encoder.encode([c.flow.negative_prompt] * len(prompts), allow_empty=True).to(device) if cfg_scale != 1.0 else None
    if getattr(getattr(bare(net), "config", None), "causal_chunk_frames", 0):
        return stream_sample(net, z, text, steps=steps, shift=c.flow.sample_shift, negative=negative, cfg_scale=cfg_scale)
    return euler_sample(net, z, text, steps=steps, shift=c.flow.sample_shift, negative=negative, cfg_scale=cfg_scale)


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory (has config.yaml) or a run directory (its latest checkpoint), verified
    (``apt.checkpoint.verify_checkpoint``): a damaged file is named, with the run's newest intact checkpoint."""
    p = Path(path)
    if (p / "config.yaml").exists() and any(p.glob("*.safetensors")):
        return verified(p)
    latest = latest_checkpoint(p)
    for d in (p, latest):
        if d is not None and any(d.glob("*_partitions")):  # apt.distributed.sharded_checkpoint, ZeRO-3
            raise FileNotFoundError(f"{d} is a ZeRO-3 checkpoint (EMA in per-rank partitions); `python -m apt consolidate {d}` writes a directory to sample from")
    if latest is None:
        raise FileNotFoundError(f"no checkpoint at {path} (expected a checkpoint dir with config.yaml + *.safetensors, or a run dir)")
    return verified(latest)


def verified(ckpt: Path) -> Path:
    try:
        verify_checkpoint(ckpt)
    except CheckpointError as e:
        for older in reversed([q for q in list_checkpoints(ckpt.parent.parent) if q.name < ckpt.name]):
            try:
                verify_checkpoint(older)
            except CheckpointError:
                continue
            raise CheckpointError(f"{e}; the newest intact checkpoint of this run is {older}") from None
        raise
    return ckpt


class Generator:
    """A stage's sampling network plus its text encoder, ready to generate clips."""

    def __init__(self, config: Config, net: torch.nn.Module, text_encoder: TextEncoder, device: str = "cpu", perf: PerfConfig | None = None):
        self.config, self.net, self.text_encoder, self.device = config, net.to(device).eval(), text_encoder, device
        self.perf = perf or config.perf  # the VAE's switches (perf.vae_*) apply when the codec is loaded
        self._codec = None

    @property
    def num_frames(self) -> int:
        return self.config.data.frames

    @property
    def height(self) -> int:
        return self.config.data.height

    @property
    def width(self) -> int:
        return self.config.data.width

    @property
    def default_steps(self) -> int:
        return self.config.flow.sample_steps if self.config.stage in MANY_STEP_STAGES else 1

    @property
    def default_cfg_scale(self) -> float:
        return self.config.flow.cfg_scale if self.config.stage in MANY_STEP_STAGES else 1.0

    def codec(self):
        """The run's latent codec (``model.vae``), loaded once; None for pixel-space models."""
        if self.config.model.vae and self._codec is None:
            from apt.codecs import LatentCodec

            self._codec = LatentCodec.load(self.config.model.vae)
            self._codec.apply_perf(self.perf)
        return None if self._codec is None else self._codec.to(self.device)

    def generate_tensor(self, prompts: list[str], seeds: list[int], *, steps: int | None = None, cfg_scale: float | None = None, frames: int | None = None) -> torch.Tensor:
        """Samples in [-1, 1], (B, C, T, H, W) (decoded to pixels when the run has a VAE).

        Runs under ``torch.inference_mode`` (no autograd bookkeeping at all: on the demo's 1.1M-parameter
        DiT a batch-1 forward on CPU takes 4.0 ms against 4.5 ms under ``no_grad``, ``experiments/batch1_timing.py``).
        The Generator owns its network, so the inference tensors it caches (position tables, text embeddings)
        never meet autograd; the result is cloned out of inference mode so callers may use it as any other
        tensor. The training modules sample under ``no_grad`` instead (``apt.lit.base``): their networks'
        caches must stay usable by the backward pass."""
        cfg_scale = self.default_cfg_scale if cfg_scale is None else cfg_scale
        with torch.inference_mode():
            x = sample(self.net, self.text_encoder, self.config, prompts, seeds, steps=self.default_steps if steps is None else steps, cfg_scale=cfg_scale, frames=frames, device=self.device)
            if self.config.model.vae:
                x = self.codec().decode(x, batch_size=1)
        return x.clone()

    def generate(self, prompts: list[str], seeds: list[int], steps: int | None = None, **kw) -> torch.Tensor:
        """uint8 (B, T, H, W, 3)."""
        return torch.from_numpy(to_uint8(self.generate_tensor(prompts, seeds, steps=steps, **kw)))


def load_generator(checkpoint: str | Path, *, device: str = "cpu", weights: str | None = None, perf: PerfConfig | None = None,
                   cache_layout: tuple[int, int] | None = None) -> Generator:
    """``perf``: speed switches (``apt.perf``); None = the run's own ``config.perf``.

    ``cache_layout``: stream a causal run with another split of its rolling cache, (sink_chunks, window_chunks) of the
    same sum, e.g. (2, 1) for a run trained with (1, 2). The network is the same function on clips of up to
    sink + window + 1 chunks (every chunk sees all earlier ones at the same positions); only which chunks stay in view
    past that length changes (``apt.models.kv_cache``)."""
    ckpt = resolve_checkpoint(checkpoint)
    config = config_from_yaml(ckpt / "config.yaml")
    if cache_layout is not None:
        config = with_cache_layout(config, *cache_layout, source=str(ckpt))
    text_encoder = TextEncoder.load(config.text.encoder, max_length=config.text.max_length)
    net = factory.load_backbone(config, str(ckpt), weights or PRODUCT[config.stage], text_dim=text_encoder.dim)
    net = apply_perf(net.to(device).eval(), perf or config.perf)
    return Generator(config, net, text_encoder, device, perf=perf or config.perf)


def with_cache_layout(config: Config, sink_chunks: int, window_chunks: int, *, source: str = "the run") -> Config:
    """``config`` with its causal model's cache split as (sink_chunks, window_chunks); the sum must stay (positions trained).
    The bounds of each part are ``DiTConfig``'s to check, when the network is built."""
    m = config.model
    if not m.causal_chunk_frames:
        raise ValueError(f"a cache layout needs a causal run; {source} has model.causal_chunk_frames=0")
    if sink_chunks + window_chunks != m.sink_chunks + m.window_chunks:
        raise ValueError(f"cache layout ({sink_chunks}, {window_chunks}) for {source}: need "
                         f"sink_chunks + window_chunks = {m.sink_chunks + m.window_chunks} (its model.sink_chunks + model.window_chunks)")
    config = copy.deepcopy(config)
    config.model.sink_chunks, config.model.window_chunks = sink_chunks, window_chunks
    return config


def load_discriminator(checkpoint: str | Path) -> tuple[torch.nn.Module, TextEncoder]:
    """An APT checkpoint's discriminator (eval mode) and text encoder, for probing what D has learned."""
    from safetensors.torch import load_file

    from apt.methods.apt import build_discriminator

    ckpt = resolve_checkpoint(checkpoint)
    if not (ckpt / "discriminator.safetensors").exists():
        raise FileNotFoundError(f"{ckpt} has no discriminator.safetensors (an APT stage's checkpoint has one)")
    config = config_from_yaml(ckpt / "config.yaml")
    text_encoder = TextEncoder.load(config.text.encoder, max_length=config.text.max_length)
    D = build_discriminator(factory.build_backbone(config, text_dim=text_encoder.dim), config.apt)  # architecture only
    D.load_state_dict(load_file(str(ckpt / "discriminator.safetensors")))
    return D.eval(), text_encoder
