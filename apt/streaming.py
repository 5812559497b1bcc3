"""Streaming inference: a causal DiT makes a video chunk by chunk with a rolling key/value cache.

    x_i = z_i - G^(z_i, T, c | x_{i-1}, cache)        one forward per chunk (AAPT, arXiv 2506.09350 §3.1)

Each chunk's noise z_i goes in with the previous chunk x_{i-1} recycled as input; the chunk's keys and
values join the cache (``apt.models.kv_cache``), whose fixed buffers hold the text, the sink chunk(s) and
a rolling window, so a stream of any length runs in constant memory. A many-step causal model (the
causal teacher) integrates each chunk with Euler steps; every step level k keeps its own cache of the
earlier chunks' keys and values at t_k, the noise level it was trained to see them at (all chunks of a
training clip share one t). Classifier-free guidance batches the negative prompt beside the prompt.

- ``stream_chunks``: yields the clean chunks of a batch of streams (evaluation, ``apt.inference.sample``).
- ``StreamSession``: one prompt and seed, decoded frames as they are made; ``set_prompt`` switches the
  prompt mid-stream and rebuilds the cache under the new one (LongLive's KV re-cache, arXiv 2509.22622):
  the stored inputs of the chunks still in view are replayed through the model.
- ``ChunkDecoder``: per-chunk VAE decode for latent models (Wan-layout VAEs keep their causal cache).

Nothing here imports Lightning or DeepSpeed. Legend: B batch, C channels, T frames, H/W height/width.
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch import nn

from apt.flow import timestep_schedule
from apt.models.backbone import TextCond
from apt.models.kv_cache import KVCache


def bare(net: nn.Module) -> nn.Module:
    """The DiT inside a wrapper (a DeepSpeed engine, a CUDA-graph or compile wrapper keep it in ``.module``)."""
    while not hasattr(net, "new_cache") and hasattr(net, "module"):
        net = net.module
    return net


def chunk_frames(net: nn.Module) -> int:
    cf = bare(net).config.causal_chunk_frames
    if not cf:
        raise ValueError("streaming needs a causal model (model.causal_chunk_frames > 0)")
    return cf


def cache_for(net: nn.Module, x_BCTHW: torch.Tensor, text: TextCond, *, inplace: bool) -> KVCache:
    """An empty cache for streaming the clips of ``x`` (batch, height, width, device) under ``text``, in ``net``'s dtype.
    ``inplace=False`` writes out of place, so autograd may keep the buffers of earlier chunks (training)."""
    B, _, _, H, W = x_BCTHW.shape
    return bare(net).new_cache(batch=B, height=H, width=W, text_tokens=text.emb_BLD.shape[1], device=x_BCTHW.device,
                               dtype=next(net.parameters()).dtype, inplace=inplace)


class ChunkStepper:
    """The caches of one batch of streams and the step that makes their next chunk (one or many Euler steps)."""

    def __init__(self, net: nn.Module, text: TextCond, *, height: int, width: int, steps: int = 1, shift: float = 1.0,
                 negative: TextCond | None = None, cfg_scale: float = 1.0, inplace: bool = True):
        self.net, self.steps, self.cfg_scale = net, steps, cfg_scale
        self.guided = negative is not None and cfg_scale != 1.0
        self.text = TextCond.cat([text, negative]) if self.guided else text
        self.batch = text.emb_BLD.shape[0]
        device, dtype = text.emb_BLD.device, next(net.parameters()).dtype
        self.ts = timestep_schedule(steps, shift=shift, device=device)
        width_B = self.batch * (2 if self.guided else 1)
        self.caches: list[KVCache] = [bare(net).new_cache(batch=width_B, height=height, width=width, text_tokens=self.text.emb_BLD.shape[1],
                                                          device=device, dtype=dtype, inplace=inplace) for _ in range(steps)]

    @property
    def chunks_made(self) -> int:
        return self.caches[0].chunks_written

    def velocity(self, x: torch.Tensor, k: int, prev: torch.Tensor) -> torch.Tensor:
        t_B = self.ts[k].expand(x.shape[0])
        if not self.guided:
            return self.net(x, t_B, self.text, prev, cache=self.caches[k])
        v = self.net(torch.cat([x, x]), torch.cat([t_B, t_B]), self.text, torch.cat([prev, prev]), cache=self.caches[k])
        v_cond, v_neg = v.chunk(2)
        return v_neg + self.cfg_scale * (v_cond - v_neg)

    def step(self, z: torch.Tensor, prev: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The next chunk from its noise z (B, C, chunk, H, W) and the previous chunk; also each level's input (for a re-cache)."""
        x, inputs = z, []
        for k in range(self.steps):
            if k and self.caches[k].clean_chunks < self.caches[0].clean_chunks:  # clean context: re-encoded once, by level 0
                self.caches[k].take_clean_chunk(self.caches[0])
            inputs.append(x)
            x = x + (self.ts[k + 1] - self.ts[k]).to(x.dtype) * self.velocity(x, k, prev)
        return x, inputs

    def replay(self, inputs: list[torch.Tensor], prev: torch.Tensor, made: torch.Tensor | None = None) -> None:
        """Write one chunk's keys and values again (every level) from its stored inputs; the outputs are dropped. Clean
        context: ``made`` (the chunk's clean frames) re-encodes it at once, for a chunk that the next replayed one does
        not follow (its recycled input is not these frames); None leaves that to the next step, as a stream does."""
        for k, x in enumerate(inputs):
            self.velocity(x, k, prev)
        if made is not None:
            width = self.text.emb_BLD.shape[0] // made.shape[0]  # CFG: the prompt and the negative prompt
            bare(self.net).reencode_last_chunk(made.repeat(width, 1, 1, 1, 1), self.text, prev.repeat(width, 1, 1, 1, 1), self.caches[0])
            for cache in self.caches[1:]:
                cache.take_clean_chunk(self.caches[0])

    def reset(self, text: TextCond, negative: TextCond | None = None) -> None:
        """Empty every cache (same buffers) and take a new text of the same token length."""
        self.text = TextCond.cat([text, negative]) if self.guided else text
        for cache in self.caches:
            if cache.text_tokens != self.text.emb_BLD.shape[1]:
                raise ValueError(f"the new prompt has {self.text.emb_BLD.shape[1]} text tokens, the cache {cache.text_tokens}")
            cache.reset()


@torch.no_grad()
def stream_chunks(net: nn.Module, z_BCTHW: torch.Tensor, text: TextCond, *, steps: int = 1, shift: float = 1.0,
                  negative: TextCond | None = None, cfg_scale: float = 1.0) -> Iterator[torch.Tensor]:
    """The clean chunks (B, C, chunk, H, W) of ``z``'s streams, in order: one chunk of noise per forward (per step)."""
    cf = chunk_frames(net)
    B, C, T, H, W = z_BCTHW.shape
    bare(net).check_input_shape(z_BCTHW.shape)
    stepper = ChunkStepper(net, text, height=H, width=W, steps=steps, shift=shift, negative=negative, cfg_scale=cfg_scale)
    prev = torch.zeros_like(z_BCTHW[:, :, :cf])
    for i in range(T // cf):
        prev, _ = stepper.step(z_BCTHW[:, :, i * cf : (i + 1) * cf], prev)
        yield prev


def stream_sample(net: nn.Module, z_BCTHW: torch.Tensor, text: TextCond, **kw) -> torch.Tensor:
    """``stream_chunks`` concatenated: the whole video (B, C, T, H, W)."""
    return torch.cat(list(stream_chunks(net, z_BCTHW, text, **kw)), dim=2)


class ChunkDecoder:
    """Latent chunks -> pixel frames in [-1, 1], one chunk at a time.

    Pixel-space models: the identity. A Wan-layout VAE (``apt.perf.vae``): its causal decoder with the conv cache
    kept between chunks, so the frames equal a whole-clip decode (the first latent frame gives one pixel frame,
    every later one four). Other VAEs decode each chunk on its own (no temporal context across chunk borders)."""

    def __init__(self, codec=None):
        self.codec, self.first = codec, True
        vae = getattr(codec, "vae", None)
        from apt.perf.vae import _is_wan_vae

        self.wan = vae is not None and _is_wan_vae(vae)
        if self.wan:
            vae.clear_cache()

    @torch.no_grad()
    def __call__(self, x_BCTHW: torch.Tensor) -> torch.Tensor:
        if self.codec is None:
            return x_BCTHW
        if not self.wan:
            return self.codec.decode(x_BCTHW)
        vae = self.codec.vae
        z = vae.post_quant_conv(self.codec.denormalize(x_BCTHW.float()).to(vae.dtype))
        frames = []
        for i in range(z.shape[2]):
            vae._conv_idx = [0]
            frames.append(vae.decoder(z[:, :, i : i + 1], feat_cache=vae._feat_map, feat_idx=vae._conv_idx, first_chunk=self.first))
            self.first = False
        return torch.cat(frames, dim=2).float().clamp(-1.0, 1.0)


class StreamSession:
    """One stream (batch 1): a prompt, a seed, frames as they are made. The prompt can change mid-stream.

    ``generator`` is an ``apt.inference.Generator`` of a causal run (its network, text encoder, config and codec).
    Noise: chunk i draws from a torch.Generator seeded with ``seed``, so a stream is reproducible.
    """

    def __init__(self, generator, prompt: str, *, seed: int = 0, steps: int | None = None, cfg_scale: float | None = None):
        g, c = generator, generator.config
        self.gen, self.cf = g, chunk_frames(g.net)
        self.steps = steps or g.default_steps
        self.cfg_scale = g.default_cfg_scale if cfg_scale is None else cfg_scale
        self.rng = torch.Generator().manual_seed(int(seed))
        self.shape = (1, c.data.channels, self.cf, c.data.height, c.data.width)
        self.decoder = ChunkDecoder(g.codec())
        self.prompt = prompt
        text, negative = self._encode(prompt)
        self.stepper = ChunkStepper(g.net, text, height=c.data.height, width=c.data.width, steps=self.steps, shift=c.flow.sample_shift,
                                    negative=negative, cfg_scale=self.cfg_scale)
        self.prev = torch.zeros(self.shape, device=g.device)
        # Inputs (each level's, the recycled chunk) of the chunks still in view (sink + window), for a re-cache when the
        # prompt changes; with a clean context also their frames, to re-encode them.
        self.clean = bare(g.net).config.clean_context
        self.kept: dict[int, tuple[list[torch.Tensor], torch.Tensor, torch.Tensor | None]] = {}
        self.made = 0  # chunks streamed (the caches count from the last prompt switch, which replays the chunks in view)

    def _encode(self, prompt: str) -> tuple[TextCond, TextCond | None]:
        g = self.gen
        if not prompt.strip():
            raise ValueError("the prompt is empty")
        text = g.text_encoder.encode([prompt]).to(g.device)
        negative = None
        if self.cfg_scale != 1.0:
            negative = g.text_encoder.encode([g.config.flow.negative_prompt], allow_empty=True).to(g.device)
        return text, negative

    @property
    def chunks_made(self) -> int:
        """Chunks streamed so far, across prompt switches."""
        return self.made

    @torch.inference_mode()
    def next_chunk(self) -> torch.Tensor:
        """The next chunk, decoded: (1, 3, frames, H', W') in [-1, 1]."""
        z = torch.randn(self.shape, generator=self.rng).to(self.prev.device)
        cache = self.stepper.caches[0]
        slot = cache.chunk_slot(cache.chunks_written)
        x, inputs = self.stepper.step(z, self.prev)
        self.kept = {j: v for j, v in self.kept.items() if cache.chunk_slot(j) != slot}
        self.kept[cache.chunks_written - 1] = (inputs, self.prev, x if self.clean else None)
        self.prev, self.made = x, self.made + 1
        return self.decoder(x)

    def frames(self, num_frames: int) -> Iterator[torch.Tensor]:
        """Decoded frames (3, H', W') one by one, each as soon as its chunk is made, until ``num_frames``."""
        made = 0
        while made < num_frames:
            chunk = self.next_chunk()[0]
            for f in range(chunk.shape[1]):
                if made < num_frames:
                    yield chunk[:, f]
                    made += 1

    @torch.inference_mode()
    def set_prompt(self, prompt: str) -> None:
        """Switch to ``prompt`` from the next chunk on: reset the caches and replay the chunks still in view (sink, then
        window, in time order) under the new text, so that later chunks see the past as made under the new prompt. Clean
        context: every replayed chunk but the last is re-encoded from its frames at once (the next replayed chunk need not
        follow it); the last one is re-encoded by the next step, as in a stream."""
        text, negative = self._encode(prompt)
        if text.emb_BLD.shape[1] != self.stepper.caches[0].text_tokens:  # new buffers for a longer or shorter prompt
            c = self.gen.config
            self.stepper = ChunkStepper(self.gen.net, text, height=c.data.height, width=c.data.width, steps=self.steps,
                                        shift=c.flow.sample_shift, negative=negative, cfg_scale=self.cfg_scale)
        else:
            self.stepper.reset(text, negative)
        order = sorted(self.kept)
        for j in order:
            inputs, prev, made = self.kept[j]
            self.stepper.replay(inputs, prev, None if j == order[-1] else made)
        self.kept = {i: self.kept[j] for i, j in enumerate(sorted(self.kept))}  # renumbered as replayed
        self.prompt = prompt
