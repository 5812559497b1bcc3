"""Activation-checkpointing policies for the DiT blocks (``model.checkpoint_policy``).

With ``model.gradient_checkpointing`` on, each block's forward runs again in backward to rebuild
its activations. ``full`` recomputes everything (least memory). The selective policies keep the
outputs of the expensive ops and recompute only the cheap ones (norms, activations, RoPE,
elementwise), trading memory for compute (PyTorch selective activation checkpointing,
``torch.utils.checkpoint.create_selective_checkpoint_contexts``; as torchtitan's "op" SAC):

- ``attention``: keep the SDPA outputs (at 47k tokens attention is ~64% of a block's FLOPs; the
  output is B x S x D per block, cheap to keep);
- ``attention_and_matmul``: also keep every matmul output (QKV, projection, MLP: ~9 D values per
  token per block more): the backward recomputes no matmul at all.

The gradients are the same as without checkpointing (tests/test_perf.py states the tolerance).
"""

from __future__ import annotations

import functools

import torch
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

CHECKPOINT_POLICIES = ("full", "attention", "attention_and_matmul")

_aten = torch.ops.aten
ATTENTION_OPS = tuple(
    getattr(_aten, name).default
    for name in (
        "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
        "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_fused_attention_overrideable",
    )
    if hasattr(_aten, name)
)
MATMUL_OPS = (_aten.mm.default, _aten.addmm.default, _aten.bmm.default, _aten.baddbmm.default, _aten._scaled_mm.default)


def _policy(save: frozenset, ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in save else CheckpointPolicy.PREFER_RECOMPUTE


def checkpoint_kwargs(policy: str) -> dict:
    """Extra ``torch.utils.checkpoint.checkpoint`` arguments for ``policy`` ({} for ``full``)."""
    if policy == "full":
        return {}
    if policy not in CHECKPOINT_POLICIES:
        raise ValueError(f"checkpoint policy must be one of {', '.join(CHECKPOINT_POLICIES)}, got {policy!r}")
    save = frozenset(ATTENTION_OPS + (MATMUL_OPS if policy == "attention_and_matmul" else ()))
    return {"context_fn": functools.partial(create_selective_checkpoint_contexts, functools.partial(_policy, save))}
