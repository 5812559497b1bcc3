"""Block-causal attention over chunks of frames: the masks, input recycling, one cached step's tables, and the views
through which one forward computes a clip longer than the cache as its stream would.

AAPT (arXiv 2506.09350 §3.1) makes a bidirectional video DiT autoregressive: visual tokens attend to the
text and to the visual tokens of the current and earlier frames (block-causal attention); text tokens
attend to the text only, or the future frames would leak into the past through them. With a rolling
window (``apt.models.kv_cache``) chunk i sees the sink chunks 0 .. s - 1 and chunks i - W .. i.

Input recycling (AAPT §3.1): chunk i's input is its noise channel-concatenated with the previous chunk
(the clean frames made at step i - 1; zeros before the first chunk). A linear layer on the concatenation
is the sum of one linear per part; the recycled part's layer starts at zero, so the causal model starts
from the bidirectional model's function.

Legend: B batch, C channels, T frames, L text tokens, N visual tokens, n tokens per chunk, S = L + N.
"""

from __future__ import annotations

import torch

from apt.models.kv_cache import KVCache, window_position


def shift_chunks(x_BCTHW: torch.Tensor, chunk_frames: int) -> torch.Tensor:
    """The recycled input of a clean clip: chunk i - 1 at chunk i's place, zeros at chunk 0's."""
    return torch.cat([torch.zeros_like(x_BCTHW[:, :, :chunk_frames]), x_BCTHW[:, :, :-chunk_frames]], dim=2)


def text_self_mask(text_mask_BL: torch.Tensor) -> torch.Tensor:
    """Mask (B, 1, L, L) of the text queries: the real text tokens and themselves (an empty prompt still has a finite
    output)."""
    L = text_mask_BL.shape[1]
    return (text_mask_BL.bool()[:, None, :] | torch.eye(L, dtype=torch.bool, device=text_mask_BL.device)[None])[:, None]


def block_causal_mask(text_mask_BL: torch.Tensor, num_chunks: int, chunk_tokens: int, *, sink_chunks: int, window_chunks: int) -> torch.Tensor:
    """Boolean attention mask (B, 1, S, S) over [text, chunk 0, chunk 1, ...] (True = attend).

    Text queries: the real text tokens and themselves (an empty prompt still has a finite output).
    Visual queries in chunk i: the real text tokens, the sink chunks and chunks i - W .. i."""
    B, L = text_mask_BL.shape
    device = text_mask_BL.device
    chunk_N = torch.arange(num_chunks, device=device).repeat_interleave(chunk_tokens)
    q, k = chunk_N[:, None], chunk_N[None, :]
    visual_NN = (k <= q) & ((k < sink_chunks) | (k >= q - window_chunks))
    N = chunk_N.numel()
    text_keys_BL, text_rows = text_mask_BL.bool(), text_self_mask(text_mask_BL)[:, 0]
    top = torch.cat([text_rows, text_rows.new_zeros(B, L, N)], dim=2)
    bottom = torch.cat([text_keys_BL[:, None, :].expand(B, N, L), visual_NN[None].expand(B, N, N)], dim=2)
    return torch.cat([top, bottom], dim=1)[:, None]


def step_rope(cache: KVCache, cos_PE: torch.Tensor, sin_PE: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """RoPE tables of one cached step from the per-position chunk tables (positions x n rows, E): the keys' (slots, E),
    identity for text and empty slots, each chunk slot at its window-relative position; the current chunk's (n, E)."""
    n, L = cache.chunk_tokens, cache.text_tokens
    positions = cache.step_positions()
    rows = [torch.arange(p * n, (p + 1) * n, device=cos_PE.device) if p is not None else None for p in positions]
    identity = (torch.ones(1, cos_PE.shape[1], device=cos_PE.device), torch.zeros(1, cos_PE.shape[1], device=cos_PE.device))
    tables = []
    for table, fill in ((cos_PE, identity[0]), (sin_PE, identity[1])):
        parts = [fill.expand(L, -1)] + [table[r] if r is not None else fill.expand(n, -1) for r in rows]
        tables.append(torch.cat(parts))
    current = rows[cache.chunk_slot(cache.chunks_written)]
    return tables[0], tables[1], cos_PE[current], sin_PE[current]


def step_mask(cache: KVCache, with_text_queries: bool) -> torch.Tensor:
    """Mask (B, 1, queries, slots) of one cached step: the chunk's queries see every filled slot and the real text;
    text queries (the first step only) see the real text and themselves, as in ``block_causal_mask``."""
    keys_BS = cache.key_mask()
    B, S = keys_BS.shape
    chunk_rows = keys_BS[:, None].expand(B, cache.chunk_tokens, S)
    if not with_text_queries:
        return chunk_rows[:, None]
    L = cache.text_tokens
    eye = torch.zeros(L, S, dtype=torch.bool, device=keys_BS.device)
    eye[:, :L] = torch.eye(L, dtype=torch.bool, device=keys_BS.device)
    text_rows = torch.cat([cache.text_mask_BL, cache.text_mask_BL.new_zeros(B, S - L)], dim=1)[:, None] | eye[None]
    return torch.cat([text_rows, chunk_rows], dim=1)[:, None]


def clean_context_mask(text_mask_BL: torch.Tensor, num_chunks: int, chunk_tokens: int, *, sink_chunks: int, window_chunks: int) -> torch.Tensor:
    """Mask (B, 1, L + N, L + (num_chunks - 1) n + N) of the noisy pass of a forward with a clean context: queries
    [text, chunks], keys [text, clean chunks 0 .. num_chunks - 2, chunks]. Text sees the text only; chunk i sees the
    real text, the clean chunks before it that ``block_causal_mask`` shows it (sink and window) and its own tokens."""
    B, L = text_mask_BL.shape
    device = text_mask_BL.device
    chunk_N = torch.arange(num_chunks, device=device).repeat_interleave(chunk_tokens)
    clean_M = chunk_N[: (num_chunks - 1) * chunk_tokens]
    q, k = chunk_N[:, None], clean_M[None, :]
    clean_NM = (k < q) & ((k < sink_chunks) | (k >= q - window_chunks))
    own_NN = chunk_N[:, None] == chunk_N[None, :]
    N, M = chunk_N.numel(), clean_M.numel()
    text_keys_BL, text_rows = text_mask_BL.bool(), text_self_mask(text_mask_BL)[:, 0]
    top = torch.cat([text_rows, text_rows.new_zeros(B, L, M + N)], dim=2)
    bottom = torch.cat([text_keys_BL[:, None, :].expand(B, N, L), torch.cat([clean_NM, own_NN], dim=1)[None].expand(B, N, M + N)], dim=2)
    return torch.cat([top, bottom], dim=1)[:, None]


def rolling_views(num_chunks: int, *, sink_chunks: int, window_chunks: int, clean_chunks: int = 0, device=None):
    """What each chunk of a clip sees when the clip is streamed through the cache, as V = s + W + 1 views per chunk:
    the sink chunks and chunks i - W .. i, in time order (chunk i itself last). Returns (index, position, used), each
    (num_chunks, V): which chunk of the keys' pool a view reads, its window-relative position
    (``apt.models.kv_cache.window_position``), and whether chunk i has that view (early chunks see fewer).

    ``clean_chunks`` > 0: the noisy pass of a clean-context forward, whose pool is [the clean pass's chunks, this pass's
    chunks]; chunk i sees the clean chunks before it and its own (noisy) tokens."""
    s, W = sink_chunks, window_chunks
    index = torch.zeros(num_chunks, s + W + 1, dtype=torch.long)
    position, used = torch.zeros_like(index), torch.zeros(num_chunks, s + W + 1, dtype=torch.bool)
    for i in range(num_chunks):
        for view, j in enumerate(j for j in range(i + 1) if j < s or j >= i - W):
            index[i, view] = clean_chunks + i if clean_chunks and j == i else j
            position[i, view] = window_position(j, i, sink_chunks=s, window_chunks=W)
            used[i, view] = True
    return index.to(device), position.to(device), used.to(device)


def rolling_mask(text_mask_BL: torch.Tensor, used_CV: torch.Tensor, chunk_tokens: int) -> torch.Tensor:
    """Mask (B * C, 1, n, L + V n) of a clip's chunks attending as a batch to their own views (``rolling_views``):
    the real text and the views the chunk has."""
    B, L = text_mask_BL.shape
    C, V = used_CV.shape
    views_CK = used_CV.repeat_interleave(chunk_tokens, dim=1)
    keys = torch.cat([text_mask_BL.bool()[:, None].expand(B, C, L), views_CK[None].expand(B, C, V * chunk_tokens)], dim=2)
    return keys.flatten(0, 1)[:, None, None].expand(B * C, 1, chunk_tokens, L + V * chunk_tokens)
