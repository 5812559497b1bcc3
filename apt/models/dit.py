"""Built-in text-to-image/video flow transformer (Goku / Seaweed style DiT).

Full attention over space-time tokens with text tokens in the same sequence (single-stream joint
attention, as FLUX's single blocks / Goku), 3D RoPE on the visual tokens, QK RMSNorm, adaLN-Zero
timestep modulation (DiT, Peebles & Xie 2023). An image is a one-frame video: it is repeated to fill
one temporal patch on the way in and the patch's frames are averaged on the way out.

References: Goku (arXiv 2502.04896) §2 (full attention, 3D RoPE, QK-norm); APT (arXiv 2501.08316)
§3 (36-layer 8B MMDiT); DiT (arXiv 2212.09748) adaLN-Zero.

Causal mode (``DiTConfig.causal_chunk_frames`` > 0; AAPT, arXiv 2506.09350 §3.1): block-causal attention
over chunks of frames, the previous chunk recycled as input, and a chunk-by-chunk forward with a rolling
key/value cache (``apt.models.causal``, ``apt.models.kv_cache``). Positions: the additive sin-cos table
becomes spatial only (every chunk gets the table's first temporal row), and time is carried by the
temporal part of the 3D RoPE alone, at window-relative positions. An additive table is added to the
input, so a cached key carries its position through every layer and cannot be moved when the window
rolls; a RoPE key is stored unrotated and rotated at each step, so positions stay in the trained range
(0 .. sink + window) however long the stream runs. With the switch off the model is unchanged.

Legend: B batch, C channels, T/H/W frames/height/width, N visual tokens, L text tokens, S = L + N,
D width, P values per patch, K heads, E head dim.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torch.utils.checkpoint import checkpoint

from apt.models.attention import TextLayoutCache, attention, text_key_layout
from apt.models.backbone import TextCond, joined
from apt.models.causal import (
    block_causal_mask,
    clean_context_mask,
    rolling_mask,
    rolling_views,
    shift_chunks,
    step_mask,
    step_rope,
    text_self_mask,
)
from apt.models.checkpointing import checkpoint_kwargs
from apt.models.kv_cache import KVCache
from apt.models.layers import RMSNorm, apply_rope, rms_norm_rope, rope_3d, sincos_3d, timestep_embedding


@dataclass
class DiTConfig:
    """Shape of a DiT flavour (see ``apt.models.registry``)."""

    in_channels: int = 3
    patch_size: tuple[int, int, int] = (1, 4, 4)  # (pt, ph, pw)
    hidden_dim: int = 64
    depth: int = 4
    num_heads: int = 4
    mlp_ratio: float = 4.0
    text_dim: int = 64
    prediction: str = "velocity"  # "velocity" or "x0" (v derived as (x_t - x0_hat) / max(t, min_t))
    min_t: float = 0.05
    abs_pos_embed: bool = True  # fixed 3D sin-cos table at unit scale (docs/design.md §5)
    rope_theta: float = 10000.0
    causal_chunk_frames: int = 0
    """0: bidirectional (full attention). > 0: block-causal streaming over chunks of this many input frames
    (a multiple of the temporal patch), with the previous chunk recycled as input (AAPT §3.1)."""
    sink_chunks: int = 1
    """Causal mode: the first chunks every later chunk attends to (the attention sink)."""
    window_chunks: int = 2
    """Causal mode: how many chunks before the current one it attends to (the rolling window). A full forward of a
    clip longer than sink_chunks + window_chunks + 1 chunks computes each chunk as a stream would."""
    clean_context: bool = False
    """Causal mode: earlier chunks are seen as their clean frames encoded at t = 0 (the clean key/value cache of
    CausVid and Self Forcing), not as the keys and values of the forward that made them. A full forward runs the
    clean pass first; a stream re-encodes each chunk once the next one arrives (one more forward per chunk)."""

    def __post_init__(self):
        self.patch_size = tuple(self.patch_size)
        if self.prediction not in ("velocity", "x0"):
            raise ValueError(f"model.prediction must be 'velocity' or 'x0', got {self.prediction!r}")
        if self.hidden_dim % self.num_heads:
            raise ValueError(f"hidden_dim {self.hidden_dim} not divisible by num_heads {self.num_heads}")
        if (self.hidden_dim // self.num_heads) % 2:
            raise ValueError(f"head dim {self.hidden_dim // self.num_heads} must be even for RoPE")
        if self.causal_chunk_frames < 0 or self.causal_chunk_frames % self.patch_size[0]:
            raise ValueError(f"causal_chunk_frames={self.causal_chunk_frames} must be 0 (off) or a multiple of the temporal patch {self.patch_size[0]}")
        if self.clean_context and not self.causal_chunk_frames:
            raise ValueError("clean_context needs causal mode (causal_chunk_frames > 0)")
        if self.causal_chunk_frames and (self.sink_chunks < 1 or self.window_chunks < 0):
            raise ValueError(f"causal mode needs sink_chunks >= 1 and window_chunks >= 0, got {self.sink_chunks} and {self.window_chunks}")

    @property
    def max_chunks(self) -> int:
        """Chunks in one view of the cache: the sink, the window and the current chunk (the clip length the causal
        stages train on; a full forward of a longer clip computes each chunk as the stream does)."""
        return self.sink_chunks + self.window_chunks + 1


class Attention(nn.Module):
    """Multi-head self-attention over the joint sequence with QK RMSNorm and RoPE."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = RMSNorm(dim // num_heads)
        self.k_norm = RMSNorm(dim // num_heads)
        self.proj = nn.Linear(dim, dim)
        self.fused_qk_norm_rope = False  # perf switch, set by apt.perf.apply_perf

    def forward(self, x_BSD: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None, mask_B11S: torch.Tensor | None,
                kv: tuple["CacheStep | CleanContext | RollingViews", int] | None = None):
        q, k, v = rearrange(self.qkv(x_BSD), "b s (three k e) -> three b k s e", three=3, k=self.num_heads)
        if kv is not None and isinstance(kv[0], CacheStep):
            return self.proj(rearrange(self._cached(q, k, v, rope, mask_B11S, *kv), "b k s e -> b s (k e)"))
        if kv is not None and isinstance(kv[0], RollingViews):
            return self.proj(rearrange(kv[0].attend(kv[1], self.q_norm(q), self.k_norm(k), v), "b k s e -> b s (k e)"))
        if self.fused_qk_norm_rope:
            q = rms_norm_rope(q, self.q_norm.weight, *rope, eps=self.q_norm.eps)
            k = rms_norm_rope(k, self.k_norm.weight, *rope, eps=self.k_norm.eps)
        else:
            q, k = apply_rope(self.q_norm(q), *rope), apply_rope(self.k_norm(k), *rope)
        if kv is not None:  # a full forward with clean context: record the clean pass, or attend to it
            k, v = kv[0].join(kv[1], k, v)
        out_BKSE = attention(q, k, v, mask_B11S)
        return self.proj(rearrange(out_BKSE, "b k s e -> b s (k e)"))

    def _cached(self, q, k, v, rope, mask, step: "CacheStep", layer: int) -> torch.Tensor:
        """One streaming step: store this step's keys (normed, not rotated) and values in the cache, then attend
        over the whole buffer with every key rotated to its window-relative position (``apt.models.kv_cache``)."""
        k = self.k_norm(k)
        for buffer_start, token_start, count in step.writes:
            step.cache.write(layer, buffer_start, k[:, :, token_start : token_start + count], v[:, :, token_start : token_start + count])
        keys, values = step.cache.k[layer], step.cache.v[layer]
        if step.clean_text:  # a clean re-encode: the text at t = 0 in place of the cached text (at the stream's t)
            cache, L = step.cache, step.cache.text_tokens
            if cache.clean_text_k[layer] is None:  # the first re-encode computes it (its sequence starts with the text)
                cache.clean_text_k[layer], cache.clean_text_v[layer] = k[:, :, :L], v[:, :, :L]
            keys = torch.cat([cache.clean_text_k[layer], keys[:, :, L:]], dim=2)
            values = torch.cat([cache.clean_text_v[layer], values[:, :, L:]], dim=2)
        return attention(apply_rope(self.q_norm(q), *rope), apply_rope(keys, step.cos_kv, step.sin_kv), values, mask)


@dataclass
class CacheStep:
    """What every layer needs for one cached step: the cache, where this step's tokens go, the keys' RoPE tables."""

    cache: KVCache
    writes: list[tuple[int, int, int]]  # (first buffer slot, first token of the step's sequence, count)
    cos_kv: torch.Tensor
    sin_kv: torch.Tensor
    clean_text: bool = False  # attend to the text at t = 0 (the cache's, or this step's own), not the cached text (a clean re-encode)


class CleanContext:
    """The clean pass of a full forward with ``DiTConfig.clean_context``: every layer's keys and values of the clean
    chunks, recorded while that pass runs, then put between the text and the chunks of the noisy pass. Keys are stored
    rotated (``join``), or normed and not yet rotated when a clip longer than the cache goes through ``RollingViews``."""

    def __init__(self, text_tokens: int):
        self.text_tokens, self.recording = text_tokens, True
        self.k: dict[int, torch.Tensor] = {}
        self.v: dict[int, torch.Tensor] = {}

    def join(self, layer: int, k_BKSE: torch.Tensor, v_BKSE: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        L = self.text_tokens
        if self.recording:
            self.k[layer], self.v[layer] = k_BKSE[:, :, L:], v_BKSE[:, :, L:]
            return k_BKSE, v_BKSE
        return (torch.cat([k_BKSE[:, :, :L], self.k[layer], k_BKSE[:, :, L:]], dim=2),
                torch.cat([v_BKSE[:, :, :L], self.v[layer], v_BKSE[:, :, L:]], dim=2))


class RollingViews:
    """A full causal forward of a clip longer than the cache (more than sink + window + 1 chunks), computed in one
    forward as its stream computes it: chunk i attends to the text, the sink chunks and chunks i - W .. i, each key
    rotated to the window-relative position it has in the cache while chunk i is made, the query at min(i, s + W).
    Every chunk's keys and values are gathered into its V = s + W + 1 views (``apt.models.causal.rolling_views``) and
    the chunks attend as a batch. With a clean context, the clean pass records its chunks' keys (normed, not rotated)
    and values in ``clean``, and the noisy pass's chunk i sees the clean chunks before it and its own tokens."""

    GATHER_LIMIT = 2**27
    """Elements of one group's gathered keys (values the same): 512 MB in float32, 256 MB in bf16."""

    def __init__(self, text_mask_BL: torch.Tensor, num_chunks: int, chunk_tokens: int, *, sink_chunks: int, window_chunks: int,
                 cos_PE: torch.Tensor, sin_PE: torch.Tensor, clean: "CleanContext | None" = None):
        self.text_tokens, self.chunk_tokens, self.clean = text_mask_BL.shape[1], chunk_tokens, clean
        clean_chunks = num_chunks - 1 if clean is not None and not clean.recording else 0
        self.index, position, used = rolling_views(num_chunks, sink_chunks=sink_chunks, window_chunks=window_chunks,
                                                   clean_chunks=clean_chunks, device=text_mask_BL.device)
        cos, sin = cos_PE.unflatten(0, (-1, chunk_tokens)), sin_PE.unflatten(0, (-1, chunk_tokens))  # (positions, n, E)
        self.cos_k, self.sin_k = cos[position], sin[position]  # (C, V, n, E)
        current = position.gather(1, used.sum(1, keepdim=True) - 1)[:, 0]  # the chunk itself, its last view
        self.cos_q, self.sin_q = cos[current], sin[current]  # (C, n, E)
        self.text_mask = text_self_mask(text_mask_BL)
        self.mask = rolling_mask(text_mask_BL, used, chunk_tokens)

    def attend(self, layer: int, q_BKSE: torch.Tensor, k_BKSE: torch.Tensor, v_BKSE: torch.Tensor) -> torch.Tensor:
        """Attention of [text, chunks] with q and k normed, not rotated (text tokens are never rotated). The gathered
        keys and values hold V copies of the window; chunks attend in groups of at most ``GATHER_LIMIT`` elements."""
        L, n = self.text_tokens, self.chunk_tokens
        B, K, _, E = q_BKSE.shape
        C, V = self.index.shape
        text_out = attention(q_BKSE[:, :, :L], k_BKSE[:, :, :L], v_BKSE[:, :, :L], self.text_mask)
        k_pool, v_pool = k_BKSE[:, :, L:], v_BKSE[:, :, L:]
        if self.clean is not None and self.clean.recording:
            self.clean.k[layer], self.clean.v[layer] = k_pool, v_pool
        elif self.clean is not None:
            k_pool, v_pool = torch.cat([self.clean.k[layer], k_pool], dim=2), torch.cat([self.clean.v[layer], v_pool], dim=2)
        k_pool, v_pool = k_pool.unflatten(2, (-1, n)), v_pool.unflatten(2, (-1, n))
        queries = apply_rope(q_BKSE[:, :, L:].unflatten(2, (C, n)), self.cos_q, self.sin_q)  # (B, K, C, n, E)
        mask = self.mask.unflatten(0, (B, C))

        def fold(x: torch.Tensor) -> torch.Tensor:  # (B, K, chunks, tokens, E) -> (B chunks, K, tokens, E)
            return x.transpose(1, 2).flatten(0, 1)

        group = max(1, self.GATHER_LIMIT // (B * K * (L + V * n) * E))
        outs = []
        for a in range(0, C, group):
            index = self.index[a : a + group]
            g = index.shape[0]
            keys = apply_rope(k_pool[:, :, index], self.cos_k[a : a + g], self.sin_k[a : a + g])  # (B, K, g, V, n, E)
            keys = torch.cat([k_BKSE[:, :, None, :L].expand(B, K, g, L, E), keys.flatten(3, 4)], dim=3)
            values = torch.cat([v_BKSE[:, :, None, :L].expand(B, K, g, L, E), v_pool[:, :, index].flatten(3, 4)], dim=3)
            out = attention(fold(queries[:, :, a : a + g]), fold(keys), fold(values), mask[:, a : a + g].flatten(0, 1))
            outs.append(out.unflatten(0, (B, g)).transpose(1, 2).flatten(2, 3))
        return torch.cat([text_out, *outs], dim=2)


class DiTBlock(nn.Module):
    """adaLN-Zero transformer block: x + g1 * attn(mod(x)), then x + g2 * mlp(mod(x))."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))
        self.modulation = nn.Linear(dim, 6 * dim)
        nn.init.zeros_(self.modulation.weight)  # adaLN-Zero: every block starts as the identity
        nn.init.zeros_(self.modulation.bias)

    def forward(self, x_BSD, c_BD, rope, mask_B11S, kv=None):
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(F.silu(c_BD))[:, None].chunk(6, dim=-1)
        x_BSD = x_BSD + gate1 * self.attn(self.norm1(x_BSD) * (1 + scale1) + shift1, rope, mask_B11S, kv)
        return x_BSD + gate2 * self.mlp(self.norm2(x_BSD) * (1 + scale2) + shift2)


class DiT(nn.Module):
    """Text-conditioned flow transformer implementing the backbone protocol (``apt.models.backbone``)."""

    def __init__(self, config: DiTConfig):
        super().__init__()
        self.config = c = config
        self.hidden_dim = c.hidden_dim
        pt, ph, pw = c.patch_size
        patch_values = c.in_channels * pt * ph * pw
        self.patch_embed = nn.Linear(patch_values, c.hidden_dim)
        self.text_proj = nn.Sequential(nn.LayerNorm(c.text_dim), nn.Linear(c.text_dim, c.hidden_dim))
        self.time_mlp = nn.Sequential(nn.Linear(256, c.hidden_dim), nn.SiLU(), nn.Linear(c.hidden_dim, c.hidden_dim))
        self.pooled_text_mlp = nn.Sequential(nn.Linear(c.text_dim, c.hidden_dim), nn.SiLU(), nn.Linear(c.hidden_dim, c.hidden_dim))
        self._blocks = nn.ModuleList([DiTBlock(c.hidden_dim, c.num_heads, c.mlp_ratio) for _ in range(c.depth)])
        self.final_norm = nn.LayerNorm(c.hidden_dim, elementwise_affine=False, eps=1e-6)
        self.final_modulation = nn.Linear(c.hidden_dim, 2 * c.hidden_dim)
        self.final_proj = nn.Linear(c.hidden_dim, patch_values)
        for layer in (self.final_modulation, self.final_proj):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        if c.causal_chunk_frames:  # input recycling; zero-initialised so the causal model starts as the bidirectional one
            self.recycle_embed = nn.Linear(patch_values, c.hidden_dim)
            nn.init.zeros_(self.recycle_embed.weight)
            nn.init.zeros_(self.recycle_embed.bias)
        self.gradient_checkpointing = False
        self.checkpoint_policy = "full"  # full | attention | attention_and_matmul (apt.models.checkpointing)
        self.text_padding = "mask"  # perf switch (apt.perf.apply_perf): mask | trim | varlen (apt.models.attention.text_key_layout)
        self._text_layout = TextLayoutCache()
        self._num_text_tokens = 0  # set per forward; lets visual_tokens() slice block outputs
        self._table_cache: dict[tuple, torch.Tensor | tuple[torch.Tensor, torch.Tensor]] = {}

    def _tables(self, kind: str, T: int, H: int, W: int, L: int, like: torch.Tensor):
        """Position tables depend only on the token grid: computed once per (grid, text length, device)."""
        key = (kind, T, H, W, L, like.device, like.dtype)
        if key not in self._table_cache:
            c = self.config
            if kind == "sincos":
                self._table_cache[key] = sincos_3d(c.hidden_dim, T, H, W, device=like.device, dtype=like.dtype)
            else:
                self._table_cache[key] = rope_3d(c.hidden_dim // c.num_heads, T, H, W, num_text=L, theta=c.rope_theta, device=like.device)
        return self._table_cache[key]

    # -- backbone protocol -------------------------------------------------------------------
    @property
    def blocks(self) -> nn.ModuleList:
        return self._blocks

    def visual_tokens(self, block_output: torch.Tensor) -> torch.Tensor:
        """Block outputs are (B, L + N, D) with the L text tokens first."""
        return block_output[:, self._num_text_tokens :]

    # -- shapes --------------------------------------------------------------------------------
    def check_input_shape(self, shape: tuple[int, ...]) -> None:
        """Raise ValueError naming the mismatch if a (B, C, T, H, W) shape cannot be patchified."""
        if len(shape) != 5:
            raise ValueError(f"expected a (B, C, T, H, W) tensor, got shape {tuple(shape)}")
        _, C, T, H, W = shape
        pt, ph, pw = self.config.patch_size
        if C != self.config.in_channels:
            raise ValueError(f"input has {C} channels but the model expects {self.config.in_channels}")
        if H % ph or W % pw:
            raise ValueError(f"resolution {H}x{W} is not divisible by the patch size {ph}x{pw}")
        if T != 1 and T % pt:
            raise ValueError(f"{T} frames is not divisible by the temporal patch size {pt} (images: 1 frame)")
        cf = self.config.causal_chunk_frames
        if cf and T % cf:
            raise ValueError(f"{T} frames is not a whole number of the causal model's {cf}-frame chunks")

    def forward(self, x_BCTHW: torch.Tensor, t_B: torch.Tensor, text: TextCond, prev_BCTHW: torch.Tensor | None = None,
                cache: KVCache | None = None) -> torch.Tensor:
        """Predict the velocity v = eps - x0 at noise level t (t=1 is pure noise).

        Causal mode only: ``prev_BCTHW`` is the recycled input (the previous chunk of every chunk; default: x's own
        chunks shifted by one, i.e. x taken as clean), and with ``cache`` x is the next chunk of a stream."""
        c = self.config
        if c.causal_chunk_frames:
            return self._forward_causal(x_BCTHW, t_B, text, prev_BCTHW, cache)
        if prev_BCTHW is not None or cache is not None:
            raise ValueError("prev_BCTHW and cache need a causal model (DiTConfig.causal_chunk_frames > 0)")
        B, C, T, H, W = x_BCTHW.shape
        pt, ph, pw = c.patch_size
        is_image = T == 1 and pt > 1
        x_in = x_BCTHW.expand(B, C, pt, H, W) if is_image else x_BCTHW
        Tp, Hp, Wp = x_in.shape[2] // pt, H // ph, W // pw

        tokens_BNP = rearrange(x_in, "b c (t pt) (h ph) (w pw) -> b (t h w) (pt ph pw c)", pt=pt, ph=ph, pw=pw)
        h_BND = self.patch_embed(tokens_BNP)
        if c.abs_pos_embed:
            h_BND = h_BND + self._tables("sincos", Tp, Hp, Wp, 0, h_BND)

        N = h_BND.shape[1]
        keep, mask_B11S = text_key_layout(text.mask_BL, N, self.text_padding, cache=self._text_layout)  # padded text trimmed / unmasked
        emb_BLD, mask_BL = text.emb_BLD[:, keep], text.mask_BL.bool()[:, keep]
        text_BLD = self.text_proj(emb_BLD.to(h_BND.dtype))
        L = text_BLD.shape[1]
        self._num_text_tokens = L
        pooled_BD = (emb_BLD * mask_BL[..., None]).sum(1) / mask_BL.sum(1, keepdim=True).clamp(min=1)
        c_BD = self.time_mlp(timestep_embedding(t_B * 1000.0, 256).to(h_BND.dtype)) + self.pooled_text_mlp(pooled_BD.to(h_BND.dtype))

        x_BSD = torch.cat([text_BLD, h_BND], dim=1)
        rope = self._tables("rope", Tp, Hp, Wp, L, h_BND)
        for block in self._blocks:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                x_BSD = checkpoint(block, x_BSD, c_BD, rope, mask_B11S, use_reentrant=False, **checkpoint_kwargs(self.checkpoint_policy))
            else:
                x_BSD = block(x_BSD, c_BD, rope, mask_B11S)

        shift, scale = self.final_modulation(F.silu(c_BD))[:, None].chunk(2, dim=-1)
        out_BNP = self.final_proj(self.final_norm(x_BSD[:, L:]) * (1 + scale) + shift)
        out = rearrange(out_BNP, "b (t h w) (pt ph pw c) -> b c (t pt) (h ph) (w pw)", t=Tp, h=Hp, w=Wp, pt=pt, ph=ph, pw=pw)
        if is_image:
            out = out.mean(dim=2, keepdim=True)
        if c.prediction == "x0":
            t = t_B.to(out.dtype).clamp(min=c.min_t)[:, None, None, None, None]
            return (x_BCTHW - out) / t
        return out

    # -- causal mode (AAPT §3.1) -----------------------------------------------------------------
    def new_cache(self, *, batch: int, height: int, width: int, text_tokens: int, device=None, dtype: torch.dtype = torch.float32,
                  inplace: bool = True) -> KVCache:
        """An empty rolling key/value cache for streaming ``batch`` videos of height x width with ``text_tokens`` text tokens."""
        c = self.config
        if not c.causal_chunk_frames:
            raise ValueError("a key/value cache needs a causal model (DiTConfig.causal_chunk_frames > 0)")
        pt, ph, pw = c.patch_size
        self.check_input_shape((batch, c.in_channels, c.causal_chunk_frames, height, width))
        return KVCache(depth=c.depth, batch=batch, num_heads=c.num_heads, head_dim=c.hidden_dim // c.num_heads, text_tokens=text_tokens,
                       chunk_tokens=(c.causal_chunk_frames // pt) * (height // ph) * (width // pw), sink_chunks=c.sink_chunks,
                       window_chunks=c.window_chunks, device=device, dtype=dtype, inplace=inplace)

    def _forward_causal(self, x_BCTHW: torch.Tensor, t_B: torch.Tensor, text: TextCond, prev_BCTHW: torch.Tensor | None, cache: KVCache | None) -> torch.Tensor:
        c = self.config
        self.check_input_shape(x_BCTHW.shape)
        cf, num_chunks = c.causal_chunk_frames, x_BCTHW.shape[2] // c.causal_chunk_frames
        if prev_BCTHW is None:
            if cache is not None and cache.chunks_written > 0:
                raise ValueError(f"streaming chunk {cache.chunks_written} needs prev_BCTHW (the chunk made before it)")
            prev_BCTHW = shift_chunks(x_BCTHW, cf)
        elif prev_BCTHW.shape != x_BCTHW.shape:
            raise ValueError(f"prev_BCTHW has shape {tuple(prev_BCTHW.shape)}, x has {tuple(x_BCTHW.shape)}")
        prev_BCTHW = prev_BCTHW.to(x_BCTHW.dtype)

        if cache is not None:
            if num_chunks != 1:
                raise ValueError(f"a cached step takes one {cf}-frame chunk, got {x_BCTHW.shape[2]} frames")
            reencoded = None
            if c.clean_context:
                if cache.clean_chunks < cache.chunks_written:  # the previous chunk, now that it is made (it is this chunk's recycled input)
                    reencoded = self.reencode_last_chunk(prev_BCTHW, text, cache.recycled, cache)
                cache.recycled = prev_BCTHW
            return joined(self._causal_step(x_BCTHW, t_B, text, prev_BCTHW, cache), reencoded)

        rolling = num_chunks > c.max_chunks  # longer than the cache: every chunk sees what its stream's step sees
        context, clean = None, None
        if c.clean_context and num_chunks > 1:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                raise ValueError("model.clean_context does not support gradient checkpointing yet")
            # The clean pass: chunk j's clean frames are chunk j + 1's recycled input (the last chunk is seen by none).
            context = CleanContext(text.emb_BLD.shape[1])
            clean = self._causal_full(prev_BCTHW[:, :, cf:], torch.zeros_like(t_B), text, prev_BCTHW[:, :, :-cf], context, rolling)
            context.recording = False
        return joined(self._causal_full(x_BCTHW, t_B, text, prev_BCTHW, context, rolling), clean)

    def reencode_last_chunk(self, x_BCTHW: torch.Tensor, text: TextCond, prev_BCTHW: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Clean context: replace the cached keys and values of the chunk made last by those of its clean frames ``x`` (with
        its recycled input ``prev``) at t = 0. A stream's next step does this itself (its recycled input is those frames);
        a re-cache that replays chunks which were not consecutive calls it directly. Returns the last block's output
        (used by nothing but ``apt.models.backbone.joined``)."""
        if not self.config.clean_context or cache.chunks_written == 0:
            raise ValueError("a re-encode needs a clean-context model (model.clean_context) and a chunk in the cache")
        hidden = self._causal_step(x_BCTHW, torch.zeros(x_BCTHW.shape[0], device=x_BCTHW.device), text, prev_BCTHW, cache, reencode=True)
        cache.clean_chunks = cache.chunks_written
        return hidden

    def _causal_inputs(self, x_BCTHW: torch.Tensor, t_B: torch.Tensor, text: TextCond, prev_BCTHW: torch.Tensor):
        """Tokens of the noisy chunks plus the recycled previous chunks (AAPT §3.1) with a spatial-only position table;
        the text tokens; the conditioning vector."""
        c = self.config
        pt, ph, pw = c.patch_size
        Tp, Hp, Wp = x_BCTHW.shape[2] // pt, x_BCTHW.shape[3] // ph, x_BCTHW.shape[4] // pw

        def patchify(v: torch.Tensor) -> torch.Tensor:
            return rearrange(v, "b c (t pt) (h ph) (w pw) -> b (t h w) (pt ph pw c)", pt=pt, ph=ph, pw=pw)

        h_BND = self.patch_embed(patchify(x_BCTHW)) + self.recycle_embed(patchify(prev_BCTHW))
        if c.abs_pos_embed:
            h_BND = h_BND + self._tables("sincos", 1, Hp, Wp, 0, h_BND).repeat(Tp, 1)
        text_BLD = self.text_proj(text.emb_BLD.to(h_BND.dtype))
        mask_BL = text.mask_BL.bool()
        pooled_BD = (text.emb_BLD * mask_BL[..., None]).sum(1) / mask_BL.sum(1, keepdim=True).clamp(min=1)
        c_BD = self.time_mlp(timestep_embedding(t_B * 1000.0, 256).to(h_BND.dtype)) + self.pooled_text_mlp(pooled_BD.to(h_BND.dtype))
        return h_BND, text_BLD, mask_BL, c_BD, (Tp, Hp, Wp)

    def _causal_full(self, x_BCTHW, t_B, text, prev_BCTHW, context: CleanContext | None, rolling: bool) -> torch.Tensor:
        """The whole clip under the block-causal mask; with a clean context that has been recorded, chunk i attends to
        the clean pass's chunks before it and to its own tokens. ``rolling`` (a clip longer than the cache): through
        ``RollingViews``, as the stream computes it. The clean pass itself returns its last block's output."""
        c = self.config
        h_BND, text_BLD, mask_BL, c_BD, (Tp, Hp, Wp) = self._causal_inputs(x_BCTHW, t_B, text, prev_BCTHW)
        L, num_chunks = text_BLD.shape[1], x_BCTHW.shape[2] // c.causal_chunk_frames
        n = h_BND.shape[1] // num_chunks
        views = None
        if rolling:
            cos_PE, sin_PE = self._tables("rope", c.max_chunks * (Tp // num_chunks), Hp, Wp, 0, h_BND)
            views = RollingViews(mask_BL, num_chunks, n, sink_chunks=c.sink_chunks, window_chunks=c.window_chunks, cos_PE=cos_PE, sin_PE=sin_PE,
                                 clean=context)
            rope, mask = None, None
        else:
            if context is not None and not context.recording:
                mask = clean_context_mask(mask_BL, num_chunks, n, sink_chunks=c.sink_chunks, window_chunks=c.window_chunks)
            else:
                mask = block_causal_mask(mask_BL, num_chunks, n, sink_chunks=c.sink_chunks, window_chunks=c.window_chunks)
            rope = self._tables("rope", Tp, Hp, Wp, L, h_BND)
        x_BSD = torch.cat([text_BLD, h_BND], dim=1)
        self._num_text_tokens = L
        for i, block in enumerate(self._blocks):
            holder = views if views is not None else context  # what the attention reads besides this pass's tokens
            kv = None if holder is None else (holder, i)
            if context is None and self.gradient_checkpointing and torch.is_grad_enabled():
                x_BSD = checkpoint(block, x_BSD, c_BD, rope, mask, kv, use_reentrant=False, **checkpoint_kwargs(self.checkpoint_policy))
            else:
                x_BSD = block(x_BSD, c_BD, rope, mask, kv)
        if context is not None and context.recording:
            return x_BSD
        return self._causal_output(x_BSD, L, c_BD, x_BCTHW, t_B, (Tp, Hp, Wp))

    def _causal_step(self, x_BCTHW, t_B, text, prev_BCTHW, cache: KVCache, *, reencode: bool = False) -> torch.Tensor:
        """One chunk against the cache: its keys and values go into its slot, then it attends over the buffer. A clean
        re-encode (``reencode``) writes the chunk made last again, from its clean frames at t = 0 and under the text's keys
        at t = 0 (the first re-encode computes them beside the chunk, the cache keeps them), as that chunk saw the cache;
        it commits nothing and returns its last block's output."""
        c = self.config
        h_BND, text_BLD, mask_BL, c_BD, (Tp, Hp, Wp) = self._causal_inputs(x_BCTHW, t_B, text, prev_BCTHW)
        B, L, n = h_BND.shape[0], text_BLD.shape[1], h_BND.shape[1]
        if (cache.k[0].shape[0], cache.text_tokens, cache.chunk_tokens) != (B, L, n):
            raise ValueError(f"cache made for batch {cache.k[0].shape[0]}, {cache.text_tokens} text tokens, {cache.chunk_tokens} tokens per chunk; "
                             f"got batch {B}, {L} text tokens, {n} tokens per chunk")
        chunk = cache.chunks_written - 1 if reencode else cache.chunks_written
        written = cache.chunks_written
        cache.chunks_written = chunk  # a re-encode sees the cache as its chunk did
        try:
            # The first step also computes the text's keys and values; the first re-encode, the text's at t = 0.
            with_text = not cache.has_clean_text if reencode else not cache.has_text
            if with_text and not reencode:
                cache.set_text_mask(mask_BL)
            table_cos, table_sin = self._tables("rope", c.max_chunks * Tp, Hp, Wp, 0, h_BND)
            cos_kv, sin_kv, cos_q, sin_q = step_rope(cache, table_cos, table_sin)
            start = cache.token_start(chunk)
            if with_text:
                ident = (cos_q.new_ones(L, cos_q.shape[1]), sin_q.new_zeros(L, sin_q.shape[1]))
                rope = (torch.cat([ident[0], cos_q]), torch.cat([ident[1], sin_q]))
                writes = [(start, L, n)] if reencode else [(0, 0, L), (start, L, n)]
                x_BSD, first = torch.cat([text_BLD, h_BND], dim=1), L
            else:
                rope, x_BSD, writes, first = (cos_q, sin_q), h_BND, [(start, 0, n)], 0
            kv = CacheStep(cache, writes, cos_kv, sin_kv, clean_text=reencode)
            mask = step_mask(cache, with_text)
            self._num_text_tokens = first
            for i, block in enumerate(self._blocks):
                x_BSD = block(x_BSD, c_BD, rope, mask, (kv, i))
        finally:
            cache.chunks_written = written
        if reencode:
            return x_BSD
        cache.commit()
        return self._causal_output(x_BSD, first, c_BD, x_BCTHW, t_B, (Tp, Hp, Wp))

    def _causal_output(self, x_BSD, first: int, c_BD, x_BCTHW, t_B, grid: tuple[int, int, int]) -> torch.Tensor:
        c = self.config
        pt, ph, pw = c.patch_size
        shift, scale = self.final_modulation(F.silu(c_BD))[:, None].chunk(2, dim=-1)
        out_BNP = self.final_proj(self.final_norm(x_BSD[:, first:]) * (1 + scale) + shift)
        out = rearrange(out_BNP, "b (t h w) (pt ph pw c) -> b c (t pt) (h ph) (w pw)", t=grid[0], h=grid[1], w=grid[2], pt=pt, ph=ph, pw=pw)
        if c.prediction == "x0":
            t = t_B.to(out.dtype).clamp(min=c.min_t)[:, None, None, None, None]
            return (x_BCTHW - out) / t
        return out
