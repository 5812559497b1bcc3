"""Attention kernel entry point for every built-in block: one function, swappable backends.

``attention(q, k, v, mask)`` with q, k, v of shape (B, K, S, E) and an optional boolean key mask
(B, 1, 1, S) (True = attend). The default is ``torch.nn.functional.scaled_dot_product_attention``,
which picks flash / memory-efficient / cuDNN / math kernels itself.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
