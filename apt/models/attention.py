"""Attention kernel entry point for every built-in block: one function, swappable backends.

``attention(q, k, v, mask)`` with q, k, v of shape (B, K, S, E) and an optional boolean key mask
(B, 1, 1, S) (True = attend). The default backend ``auto`` calls
``torch.nn.functional.scaled_dot_product_attention`` as is: PyTorch picks flash / memory-efficient /
cuDNN / math kernels itself. Any other backend (``math | flash | efficient | cudnn``) restricts SDPA
to that one kernel with ``torch.nn.attention.sdpa_kernel``; it is selected with the
``attention_backend(name)`` context manager (``apt.perf.apply_perf`` scopes it to one model's
forward). On CPU, ``math`` and ``flash`` (PyTorch's CPU flash kernel) run; ``efficient`` and
``cudnn`` are CUDA kernels.

The optional kernels ``fa3 | fa3_fp8 | sage`` (``apt.models.attention_kernels``: FlashAttention-3
bf16 and FP8, SageAttention; extras ``fa3`` / ``sage``) are forward-only custom ops, emulated on CPU.
They take no dense mask: use them with the DiT's ``text_padding`` ``trim`` or ``varlen``.

The mask argument is one of:

- ``None``: every key is valid (the fast kernels run unmasked);
- a boolean key mask (B, 1, 1, S), True = attend;
- ``TextKeyPadding``: the joint sequence is [L text tokens | N visual tokens] and sample b's first
  ``lengths[b]`` text tokens are valid. Consecutive samples of the same length form a group that
  attends, unmasked, to the keys [its valid text | all visual] (keys gathered, queries untouched):
  no dense mask, the same result as masking (exact up to summation order).
"""

from __future__ import annotations

import contextlib
import weakref
from typing import Callable, Iterator, NamedTuple

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

SDPA_BACKENDS: dict[str, SDPBackend] = {
    "math": SDPBackend.MATH,
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
}
KERNEL_BACKENDS = ("fa3", "fa3_fp8", "sage")  # apt.models.attention_kernels (optional extras)
ATTENTION_BACKENDS = ("auto", *SDPA_BACKENDS, *KERNEL_BACKENDS)


class TextKeyPadding(NamedTuple):
    """Key padding of a joint [text | visual] sequence as per-sample valid text lengths (prefix form)."""

    num_text: int  # L: text tokens in the sequence (the longest valid length of the batch)
    lengths: tuple[int, ...]  # valid text tokens of each sample, <= num_text
    mask_B11S: torch.Tensor  # the same padding as a dense key mask (for code that needs one)

_backend = "auto"  # read by attention(); set through attention_backend() / set_attention_backend()
# Set by sequence_parallel_attention(). A module global, not a ContextVar: torch.compile cannot trace
# ContextVar.get, and every compiled block broke its graph there.
_sequence_parallel: Callable | None = None


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | TextKeyPadding | None = None) -> torch.Tensor:
    global _sequence_parallel
    distributed = _sequence_parallel
    if distributed is not None:  # Ulysses: all-to-all around this same function (apt.distributed.sequence_parallel)
        _sequence_parallel = None
        try:
            return distributed(q, k, v, mask)
        finally:
            _sequence_parallel = distributed
    if isinstance(mask, TextKeyPadding):
        return _grouped_by_text_length(q, k, v, mask)
    return _unpadded_attention(q, k, v, mask)


def _unpadded_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if _backend in KERNEL_BACKENDS:
        if mask is not None:
            raise ValueError(
                f"attention backend '{_backend}' takes no dense mask; set perf.text_padding=trim (no mask when no text token "
                "is padding, padding trimmed at batch 1) or varlen (mixed lengths grouped, no mask)"
            )
        from apt.models.attention_kernels import kernel_attention

        return kernel_attention(_backend, q, k, v)
    if _backend == "auto":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    if _backend == "flash" and mask is not None and q.is_cuda:
        # CUDA flash attention takes no mask. An all-True text mask (no padding) is dropped, at the
        # cost of one host sync; real padding cannot go to this kernel.
        if not bool(mask.all()):
            raise ValueError("attention backend 'flash' cannot take a padding mask on CUDA; use 'efficient', 'cudnn' or 'auto'")
        mask = None
    with sdpa_kernel([SDPA_BACKENDS[_backend]]):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def _grouped_by_text_length(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pad: TextKeyPadding) -> torch.Tensor:
    """Per run of consecutive samples with the same valid text length n: unmasked attention over the
    keys [first n text tokens | visual tokens]. Slices only (no index tensors: nothing is copied from
    the host, so this also runs inside a CUDA-graph capture)."""
    L, outs, start = pad.num_text, [], 0
    for b in range(1, len(pad.lengths) + 1):
        if b < len(pad.lengths) and pad.lengths[b] == pad.lengths[start]:
            continue
        n, rows = pad.lengths[start], slice(start, b)
        keys = [t[rows] if n == L else torch.cat([t[rows, :, :n], t[rows, :, L:]], dim=2) for t in (k, v)]
        outs.append(_unpadded_attention(q[rows], *keys, None))
        start = b
    return outs[0] if len(outs) == 1 else torch.cat(outs)


def pad_key_mask(mask: torch.Tensor | TextKeyPadding | None, S: int, S_pad: int, *, device: torch.device) -> torch.Tensor | None:
    """The key mask of a sequence of S tokens padded to S_pad (the pad never attended); None if nothing is masked."""
    if isinstance(mask, TextKeyPadding):
        mask = mask.mask_B11S
    if S_pad == S:
        return mask
    if mask is None:
        mask = torch.ones(1, 1, 1, S, dtype=torch.bool, device=device)
    return F.pad(mask, (0, S_pad - S), value=False)


TEXT_PADDING_MODES = ("mask", "trim", "varlen")


class TextLayoutCache:
    """Remembers the host-side layout of the last text mask seen (the same tensor object, unmodified),
    so the DiT reads a mask back from the GPU once per mask, and never while a CUDA graph is being
    captured (``apt.perf.cuda_graph`` warms up on the same static mask before capturing)."""

    def __init__(self):
        self._entry: tuple | None = None

    def get(self, mask_BL: torch.Tensor, key: tuple):
        e = self._entry
        if e is not None and not mask_BL.is_inference() and e[0]() is mask_BL and e[1] == (mask_BL._version, key):
            return e[2]
        return None

    def put(self, mask_BL: torch.Tensor, key: tuple, value) -> None:
        if not mask_BL.is_inference():  # inference tensors have no version counter: an in-place change would go unseen
            self._entry = (weakref.ref(mask_BL), (mask_BL._version, key), value)


def text_key_layout(
    mask_BL: torch.Tensor, num_visual: int, mode: str, *, cache: TextLayoutCache | None = None,
) -> tuple[slice | torch.Tensor, torch.Tensor | TextKeyPadding | None]:
    """(text columns to keep, attention mask) for a joint [L text | N visual] sequence, per ``mode``:

    - ``mask``: keep every column, dense boolean key mask (B, 1, 1, L + N), always;
    - ``trim``: drop the text columns no sample attends to (at batch 1: every padded token; exact,
      since a padded token is never a key and its own output is never read); no mask if every kept
      token is valid, else the dense mask of the kept columns;
    - ``varlen``: as ``trim``, but mixed lengths (valid tokens first in each row) become a
      ``TextKeyPadding`` (samples grouped by length, no dense mask); other padding patterns keep the
      dense mask.

    ``trim`` and ``varlen`` read the mask on the host (one device-to-host copy of B x L booleans).
    """
    B, L = mask_BL.shape
    valid_BL = mask_BL.bool()

    def dense(m_BL: torch.Tensor) -> torch.Tensor:
        return torch.cat([m_BL, m_BL.new_ones(B, num_visual)], dim=1)[:, None, None, :]

    if mode == "mask":
        return slice(None), dense(valid_BL)
    if mode not in TEXT_PADDING_MODES:
        raise ValueError(f"text padding mode must be one of {', '.join(TEXT_PADDING_MODES)}, got {mode!r}")
    layout = cache.get(mask_BL, (mode, num_visual)) if cache is not None else None
    if layout is None:
        if valid_BL.is_cuda and torch.cuda.is_current_stream_capturing():
            return slice(None), dense(valid_BL)  # no host read inside a CUDA-graph capture: the exact dense path
        host = valid_BL.cpu()
        lengths = host.sum(1)
        prefix = bool((host == (torch.arange(L)[None] < lengths[:, None])).all())
        if prefix:
            keep = slice(0, int(lengths.max()) if B and L else 0)
        else:
            keep = host.any(0).nonzero()[:, 0].to(mask_BL.device)
        kept = host[:, keep.cpu() if isinstance(keep, torch.Tensor) else keep]
        kind = "none" if bool(kept.all()) else ("lengths" if prefix and mode == "varlen" else "dense")
        layout = (keep, kind, tuple(int(n) for n in lengths))
        if cache is not None:
            cache.put(mask_BL, (mode, num_visual), layout)
    keep, kind, lengths = layout
    if kind == "none":
        return keep, None
    kept_mask = dense(valid_BL[:, keep])
    if kind == "dense":
        return keep, kept_mask
    return keep, TextKeyPadding(max(lengths), lengths, kept_mask)


def get_attention_backend() -> str:
    return _backend


def set_attention_backend(name: str) -> None:
    """Process-wide backend for ``attention``; prefer the scoped ``attention_backend`` context."""
    global _backend
    if name not in ATTENTION_BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose from {', '.join(ATTENTION_BACKENDS)}")
    _backend = name


@contextlib.contextmanager
def attention_backend(name: str) -> Iterator[None]:
    """Use one SDPA backend inside the block, restoring the previous one after (also on error)."""
    previous = _backend
    set_attention_backend(name)
    try:
        yield
    finally:
        set_attention_backend(previous)


@contextlib.contextmanager
def sequence_parallel_attention(fn: Callable) -> Iterator[None]:
    """Route ``attention`` through ``fn(q, k, v, mask)`` inside the block (a sequence-parallel wrapper
    that calls ``attention`` again for the local kernel; ``apt.distributed.sequence_parallel``)."""
    global _sequence_parallel
    previous, _sequence_parallel = _sequence_parallel, fn
    try:
        yield
    finally:
        _sequence_parallel = previous

