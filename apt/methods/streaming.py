"""The streaming stages' pieces (AAPT, arXiv 2506.09350 §3.2-3.4): teacher forcing, student forcing, a per-chunk D.

AAPT's three stages, each reusing a method of its own:

    1. causal adaptation   ``flow_matching.teacher_loss`` on the causal model, teacher-forced: every chunk of the
                           noised clip gets the CLEAN previous chunk as recycled input (``TeacherForced``).
    2. distillation        ``consistency.consistency_loss`` per chunk, student and causal teacher teacher-forced alike.
    3. adversarial         ``apt.apt_step`` with ``generate=StudentForcing(...)``: G rolls out exactly as at
                           inference, one forward per chunk, its own previous chunks as context (student forcing),
                           and D = ``ChunkDiscriminator`` gives one logit per chunk on windows of the training length.

``stream.forcing: teacher`` swaps the rollout for ``TeacherForcing``, the ablation that shows what student forcing
buys: the same stage, but every chunk made from the real clip's past, so G never sees its own chunks.

How far the student-forcing gradient reaches is configurable (``stream.grad_chunks``, ``stream.detach_context``):
only the last k chunks of a rollout carry gradient (Self Forcing, arXiv 2506.08009 §3.2, keeps the last 21
frames), and each chunk's gradient stops at its own forward (the cache and the recycled chunk detached) or
flows back through them into earlier chunks.

Legend: B batch, C channels, T frames, H/W height/width, N tokens, n tokens per chunk, D width, K readout heads.
"""

from __future__ import annotations

import torch
from torch import nn

from apt.discriminator import Discriminator
from apt.models.backbone import TextCond
from apt.models.causal import shift_chunks
from apt.streaming import bare, cache_for, chunk_frames


class TeacherForced(nn.Module):
    """net(x_t, t, c) with the clean clip's previous chunks recycled (teacher forcing), for the losses that call net(x, t, c).

    CFG batches the prompt and the negative prompt (``apt.flow.guided_velocity``), so the recycled clip is tiled
    to the batch of x."""

    def __init__(self, net: nn.Module, x0_BCTHW: torch.Tensor):
        super().__init__()
        self.net, self.prev = net, shift_chunks(x0_BCTHW, chunk_frames(net))

    @property
    def config(self):
        return bare(self.net).config

    def forward(self, x_BCTHW: torch.Tensor, t_B: torch.Tensor, text: TextCond) -> torch.Tensor:
        B = self.prev.shape[0]
        if x_BCTHW.shape[0] % B:
            raise ValueError(f"teacher forcing holds {B} clips; got a batch of {x_BCTHW.shape[0]}")
        return self.net(x_BCTHW, t_B, text, self.prev.repeat(x_BCTHW.shape[0] // B, 1, 1, 1, 1))


def teacher_forced_stream(net: nn.Module, x_t_BCTHW: torch.Tensor, t_B: torch.Tensor, text: TextCond, x0_BCTHW: torch.Tensor) -> torch.Tensor:
    """net's output on a noised clip of any length, teacher-forced as a stream sees it: chunk i of x_t with the clean
    chunk i - 1 of x0 recycled, the past at t. On up to sink + window + 1 chunks this is ``TeacherForced(net, x0)(x_t, t,
    text)`` (how the causal stages train); past that, every chunk sees the sink and the rolling window, as a cached
    stream written at t would show it (one forward: ``apt.models.dit.RollingViews``). Gradients reach the network (not x0)."""
    return TeacherForced(net, x0_BCTHW.detach())(x_t_BCTHW, t_B, text)


class StudentForcing:
    """``generate`` of ``apt_step`` for a causal G: roll out the whole clip as at inference,
    x_i = z_i - G^(z_i, T, c | x_{i-1}, cache), with the gradient reaching as configured.

    ``grad_chunks`` > 0: only the last ``grad_chunks`` chunks carry gradient (the earlier ones run without);
    0: every chunk. ``detach_context``: each chunk's gradient stops at its own forward (cache and recycled chunk
    detached); False: it flows back through the cache and the recycled chunk into the earlier chunks."""

    def __init__(self, *, grad_chunks: int = 0, detach_context: bool = True):
        self.grad_chunks, self.detach_context = grad_chunks, detach_context

    def __call__(self, G: nn.Module, z_BCTHW: torch.Tensor, text: TextCond, x_real_BCTHW: torch.Tensor | None = None) -> torch.Tensor:
        cf = chunk_frames(G)
        B, T = z_BCTHW.shape[0], z_BCTHW.shape[2]
        grad = torch.is_grad_enabled()
        # Out-of-place cache writes whenever autograd may hold a buffer from an earlier chunk.
        cache = cache_for(G, z_BCTHW, text, inplace=not grad)
        num_chunks = T // cf
        first_with_grad = 0 if self.grad_chunks == 0 else max(0, num_chunks - self.grad_chunks)
        t_B = torch.ones(B, device=z_BCTHW.device)
        prev, chunks = torch.zeros_like(z_BCTHW[:, :, :cf]), []
        for i in range(num_chunks):
            z = z_BCTHW[:, :, i * cf : (i + 1) * cf]
            with torch.set_grad_enabled(grad and i >= first_with_grad):
                x = z - G(z, t_B, text, prev, cache=cache)
            chunks.append(x)
            if self.detach_context:
                cache.detach()
                prev = x.detach()
            else:
                prev = x
        return torch.cat(chunks, dim=2)


class TeacherForcing:
    """``generate`` of ``apt_step`` for a causal G, the ablation of ``StudentForcing``: every chunk from its noise with
    the REAL clip's past as context, x_i = z_i - G^(z_i, T, c | real x_{i-1}, real past), as the teacher-forced stages
    train; one forward for the whole clip (``teacher_forced_stream``: the sink and rolling window of a stream past the
    cache). It equals a cached stream fed the real chunks instead of its own. Every chunk carries gradient."""

    def __call__(self, G: nn.Module, z_BCTHW: torch.Tensor, text: TextCond, x_real_BCTHW: torch.Tensor | None = None) -> torch.Tensor:
        if x_real_BCTHW is None or x_real_BCTHW.shape != z_BCTHW.shape:
            got = None if x_real_BCTHW is None else tuple(x_real_BCTHW.shape)
            raise ValueError(f"teacher forcing needs the real clips shaped like the noise {tuple(z_BCTHW.shape)}, got {got}")
        t_B = torch.ones(z_BCTHW.shape[0], device=z_BCTHW.device)
        return z_BCTHW - teacher_forced_stream(G, z_BCTHW, t_B, text, x_real_BCTHW)


def windows(x_BCTHW: torch.Tensor, window_frames: int) -> torch.Tensor:
    """Consecutive non-overlapping windows of ``window_frames`` frames, (B * W, C, window_frames, H, W), sample-major."""
    B, C, T, H, W = x_BCTHW.shape
    if T % window_frames:
        raise ValueError(f"{T} frames is not a whole number of {window_frames}-frame windows")
    n = T // window_frames
    return x_BCTHW.reshape(B, C, n, window_frames, H, W).transpose(1, 2).reshape(B * n, C, window_frames, H, W)


class ChunkDiscriminator(Discriminator):
    """AAPT's frame-level D (§3.3): the APT discriminator on the causal teacher, one logit per chunk.

    The readout heads (one learnable query each, at several depths) read each chunk's tokens on their own; the
    backbone is block-causal, so chunk i's tokens carry the context of the chunks before it. How D sees a clip
    longer than the training length (``context``):

    - ``"windows"``: cut into windows of ``window_frames`` (the training length) that D judges separately (AAPT
      §3.4: long rollouts judged on segments); a window's first chunk sees nothing before it.
    - ``"stream"``: the whole clip as D's stream would see it, with the sink and rolling window that G streams with
      (one forward; the backbone computes a clip longer than its cache as its cached stream would): every chunk is
      judged in the context it was made in, the clip's first chunk (the sink) included, so a chunk that contradicts
      the start of the stream is visible to D. Its view is still the training length (sink + window + current
      chunk). On a clip of at most that length both modes are the same function.

    Logits (B, chunks), sample-major (windows: window by window)."""

    def __init__(self, backbone: nn.Module, *, fractions: list[float], num_heads: int = 4, timestep_shift: float = 1.0, window_frames: int,
                 context: str = "windows"):
        super().__init__(backbone, fractions=fractions, num_heads=num_heads, timestep_shift=timestep_shift)
        self.chunk_frames = chunk_frames(backbone)
        if window_frames % self.chunk_frames:
            raise ValueError(f"D's window of {window_frames} frames is not a whole number of {self.chunk_frames}-frame chunks")
        if context not in ("windows", "stream"):
            raise ValueError(f"D's context must be 'windows' or 'stream', got {context!r}")
        self.window_frames, self.context = window_frames, context

    def forward(self, x_BCTHW: torch.Tensor, t_B: torch.Tensor, text: TextCond) -> torch.Tensor:
        B, T = x_BCTHW.shape[0], x_BCTHW.shape[2]
        if self.context == "windows":
            x_BCTHW = windows(x_BCTHW, self.window_frames)
            per_sample = torch.arange(B, device=t_B.device).repeat_interleave(x_BCTHW.shape[0] // B)
            t_B, text, T = t_B[per_sample], text[per_sample.to(text.mask_BL.device)], self.window_frames
        elif T % self.chunk_frames:
            raise ValueError(f"{T} frames is not a whole number of {self.chunk_frames}-frame chunks")
        # stream: one forward of the whole clip, in which each chunk sees what its cached step would (the sink and window)
        hidden = self.hidden_states(x_BCTHW, t_B, text)
        chunks = T // self.chunk_frames
        feats = [head(h.reshape(h.shape[0] * chunks, h.shape[1] // chunks, h.shape[2])) for head, h in zip(self.heads, (hidden[i] for i in self.layers))]
        return self.logit(torch.cat(feats, dim=-1)).reshape(B, -1)
