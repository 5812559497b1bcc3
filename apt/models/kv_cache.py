"""Rolling key/value cache of a block-causal DiT: fixed-size buffers, an attention sink and a window.

A streaming generator makes one chunk of frames per forward pass; every block attends to the keys and
values of the text, of the first ``sink_chunks`` chunks (the attention sink: StreamingLLM, arXiv
2309.17453; Rolling Forcing and LongLive keep the first chunk(s) of the video) and of the last
``window_chunks`` chunks before the current one (the rolling window of Self Forcing, arXiv 2506.08009,
and AAPT, arXiv 2506.09350 §3.1). Each layer's buffer has a fixed number of slots,

    [ text (L) | sink chunks (s n) | ring of window_chunks + 1 chunks ((W + 1) n) ]

so memory does not grow with the length of the video and the step has fixed shapes (CUDA graphs can
capture it). The ring holds the W past chunks and the current one: chunk i goes into ring slot
(i - s) mod (W + 1), overwriting chunk i - W - 1, which has just left the window.

Keys are stored before RoPE. The model rotates them at every step by their *window-relative* temporal
position (LongLive's re-based positions): the sink at 0 .. s - 1, the window after it, the current chunk
at min(i, s + W). Distances to the sink then stay within the trained range however long the stream runs.

Writes are in place for inference (``inplace=True``). Training rollouts that carry gradient through the
cache use ``inplace=False``: each write makes a new buffer of the same shape, so tensors that autograd
saved from an earlier step are never modified.

Legend: B batch, K heads, E head dim, L text tokens, n tokens per chunk, s sink chunks, W window chunks.
"""

from __future__ import annotations

import torch


def window_position(j: int, i: int, *, sink_chunks: int, window_chunks: int) -> int:
    """Temporal position (in chunks) of visible chunk j while chunk i is generated: the sink keeps 0 .. s - 1,
    the window is re-based to follow it, so chunk i sits at min(i, s + W)."""
    if j < sink_chunks:
        return j
    return j - max(0, i - sink_chunks - window_chunks)


class KVCache:
    """Per-layer key/value buffers (B, K, slots, E) and the bookkeeping of which chunk sits in which slot."""

    def __init__(self, *, depth: int, batch: int, num_heads: int, head_dim: int, text_tokens: int, chunk_tokens: int,
                 sink_chunks: int, window_chunks: int, device=None, dtype: torch.dtype = torch.float32, inplace: bool = True):
        if sink_chunks < 1 or window_chunks < 0:
            raise ValueError(f"need sink_chunks >= 1 and window_chunks >= 0, got {sink_chunks} and {window_chunks}")
        self.text_tokens, self.chunk_tokens = text_tokens, chunk_tokens
        self.sink_chunks, self.window_chunks = sink_chunks, window_chunks
        self.inplace = inplace
        self.chunk_slots = sink_chunks + window_chunks + 1
        self.slots = text_tokens + self.chunk_slots * chunk_tokens
        shape = (batch, num_heads, self.slots, head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(depth)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(depth)]
        self.text_mask_BL = torch.zeros(batch, text_tokens, dtype=torch.bool, device=device)
        self.has_text = False
        self.chunks_written = 0
        self.chunk_in_slot: list[int | None] = [None] * self.chunk_slots
        # Clean-context models (DiTConfig.clean_context): the last chunk's recycled input, to re-encode it once the next
        # chunk arrives, how many chunks hold their clean re-encode, and every layer's text keys and values at t = 0,
        # which every re-encode attends to (kept from the first one: text attends to text only, so they never change).
        self.recycled: torch.Tensor | None = None
        self.clean_chunks = 0
        self.clean_text_k: list[torch.Tensor | None] = [None] * depth
        self.clean_text_v: list[torch.Tensor | None] = [None] * depth

    # -- layout ---------------------------------------------------------------------------------
    def chunk_slot(self, i: int) -> int:
        """Which chunk slot chunk i goes to: the sink for the first s chunks, then the ring."""
        s = self.sink_chunks
        return i if i < s else s + (i - s) % (self.window_chunks + 1)

    def token_start(self, i: int) -> int:
        """First buffer slot of chunk i's tokens."""
        return self.text_tokens + self.chunk_slot(i) * self.chunk_tokens

    def position(self, j: int, i: int) -> int:
        """Temporal position (in chunks) of visible chunk j while chunk i is generated (``window_position``)."""
        return window_position(j, i, sink_chunks=self.sink_chunks, window_chunks=self.window_chunks)

    def step_positions(self) -> list[int | None]:
        """Per chunk slot, the position of the chunk it holds while the next chunk (the current one, already placed
        in its slot) is generated; None for slots not filled yet."""
        i = self.chunks_written
        held = list(self.chunk_in_slot)
        held[self.chunk_slot(i)] = i
        return [None if j is None else self.position(j, i) for j in held]

    def key_mask(self) -> torch.Tensor:
        """(B, slots) True where a key is visible to the current chunk: real text tokens and filled chunk slots."""
        filled = torch.tensor([p is not None for p in self.step_positions()], device=self.text_mask_BL.device)
        chunk_mask = filled.repeat_interleave(self.chunk_tokens)[None].expand(self.text_mask_BL.shape[0], -1)
        return torch.cat([self.text_mask_BL, chunk_mask], dim=1)

    # -- buffers --------------------------------------------------------------------------------
    def write(self, layer: int, start: int, k_BKnE: torch.Tensor, v_BKnE: torch.Tensor) -> None:
        """Store keys (before RoPE) and values of consecutive tokens from buffer slot ``start``."""
        end = start + k_BKnE.shape[2]
        if self.inplace:
            self.k[layer][:, :, start:end] = k_BKnE
            self.v[layer][:, :, start:end] = v_BKnE
        else:  # out of place: a new buffer, so autograd's saved tensors stay valid
            for bufs, new in ((self.k, k_BKnE), (self.v, v_BKnE)):
                old = bufs[layer]
                bufs[layer] = torch.cat([old[:, :, :start], new.to(old.dtype), old[:, :, end:]], dim=2)

    def set_text_mask(self, mask_BL: torch.Tensor) -> None:
        if mask_BL.shape != self.text_mask_BL.shape:
            raise ValueError(f"text mask {tuple(mask_BL.shape)} does not fit a cache made for {tuple(self.text_mask_BL.shape)}")
        self.text_mask_BL = mask_BL.to(self.text_mask_BL.device, torch.bool)
        self.has_text = True

    def commit(self) -> None:
        """The current chunk's keys and values are written in every layer: it joins the sink or the window."""
        i = self.chunks_written
        self.chunk_in_slot[self.chunk_slot(i)] = i
        self.chunks_written = i + 1

    def detach(self) -> None:
        """Cut the autograd graph behind the cached keys and values (a rollout's gradient stops here)."""
        self.k = [k.detach() for k in self.k]
        self.v = [v.detach() for v in self.v]
        if self.recycled is not None:
            self.recycled = self.recycled.detach()
        self.clean_text_k = [None if k is None else k.detach() for k in self.clean_text_k]
        self.clean_text_v = [None if v is None else v.detach() for v in self.clean_text_v]

    @property
    def has_clean_text(self) -> bool:
        return self.clean_text_k[-1] is not None

    def reset(self) -> None:
        """Forget the text and every chunk (buffers kept: same memory, same shapes)."""
        self.has_text = False
        self.chunks_written = 0
        self.chunk_in_slot = [None] * self.chunk_slots
        self.text_mask_BL = torch.zeros_like(self.text_mask_BL)
        self.recycled, self.clean_chunks = None, 0
        self.clean_text_k, self.clean_text_v = [None] * len(self.k), [None] * len(self.k)

    def take_clean_chunk(self, other: "KVCache") -> None:
        """Copy the clean re-encode of the last chunk from ``other``, a cache of the same layout and chunks that holds it
        (a many-step stream's caches share their chunks' clean keys and values; only their text differs). With no window,
        chunk i - 1's ring slot in ``other`` already holds chunk i; nothing reads chunk i - 1 there any more, and this
        cache's own step overwrites the slot before it attends."""
        i = self.chunks_written - 1
        if i < 0 or other.clean_chunks < self.chunks_written or other.slots != self.slots:
            raise ValueError(f"cannot take chunk {i}'s clean keys from a cache with {other.clean_chunks} clean chunks and {other.slots} slots")
        start = self.token_start(i)
        for layer in range(len(self.k)):
            self.write(layer, start, other.k[layer][:, :, start : start + self.chunk_tokens], other.v[layer][:, :, start : start + self.chunk_tokens])
        self.clean_chunks = self.chunks_written

    def visible_chunks(self) -> list[int]:
        """Indices of the chunks held (sink and window), in time order."""
        return sorted(j for j in self.chunk_in_slot if j is not None)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.k, *self.v))
