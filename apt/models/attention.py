"""Attention kernel entry point for every built-in block: one function, swappable backends.

``attention(q, k, v, mask)`` with q, k, v of shape (B, K, S, E) and an optional boolean key mask
(B, 1, 1, S) (True = attend). The default backend ``auto`` calls
``torch.nn.functional.scaled_dot_product_attention`` as is: PyTorch picks flash / memory-efficient /
cuDNN / math kernels itself. Any other backend (``math | flash | efficient | cudnn``) restricts SDPA
to that one kernel with ``torch.nn.attention.sdpa_kernel``; it is selected with the
``attention_backend(name)`` context manager (``apt.perf.apply_perf`` scopes it to one model's
forward). On CPU, ``math`` and ``flash`` (PyTorch's CPU flash kernel) run; ``efficient`` and
``cudnn`` are CUDA kernels.
"""

from __future__ import annotations

import contextlib
from contextvars import ContextVar
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

SDPA_BACKENDS: dict[str, SDPBackend] = {
    "math": SDPBackend.MATH,
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
}
ATTENTION_BACKENDS = ("auto", *SDPA_BACKENDS)

_backend = "auto"  # read by attention(); set through attention_backend() / set_attention_backend()
_sequence_parallel: ContextVar[Callable | None] = ContextVar("apt_sequence_parallel", default=None)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    distributed = _sequence_parallel.get()
    if distributed is not None:  # Ulysses: all-to-all around this same function (apt.distributed.sequence_parallel)
        token = _sequence_parallel.set(None)
        try:
            return distributed(q, k, v, mask)
        finally:
            _sequence_parallel.reset(token)
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
    token = _sequence_parallel.set(fn)
    try:
        yield
    finally:
        _sequence_parallel.reset(token)

