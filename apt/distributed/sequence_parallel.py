"""Ulysses sequence parallelism for the built-in DiT (DeepSpeed-Ulysses, arXiv 2309.14509).

The P ranks of a sequence-parallel (SP) group hold the same samples and split the token sequence:
each block runs on S/P tokens; around attention, an all-to-all turns "S/P tokens, all K heads" into
"all S tokens, K/P heads", the local kernel (``apt.models.attention.attention``, whatever backend is
selected) attends over the whole sequence, and a second all-to-all turns it back. Activation memory
per rank drops ~P-fold; attention stays exact.

- Attention: ``deepspeed.sequence.layer.DistributedAttention`` around the local kernel. It takes
  (B, S, K, E) with ``batch_dim_idx=0`` (scatter heads = dim 2, gather sequence = dim 1); the DiT's
  entry point is (B, K, S, E), so q/k/v are transposed in and the output back (a view swap; the
  all-to-all copies anyway). The key mask (B, 1, 1, S) covers the full sequence on every rank.
- Sequence split: the joint sequence (L text tokens, then N visual tokens) is cut into P contiguous
  chunks as it enters the first block; RoPE tables are cut the same way. A sequence that does not
  divide P is padded with zero tokens whose keys are masked out; the pad is dropped when gathering.
- Gathers: after the last block (the final layer needs every visual token) and after each readout
  layer of the discriminator (its heads read whole layers); the next block re-splits. The gather's
  backward sums the ranks' gradients for each chunk (reduce-scatter), so that averaging parameter
  gradients over the SP group (DDP / ZeRO do) gives exactly the single-device gradient.
- Heads must divide P (checked before any work: ``check_sequence_parallel``).

``apply_sequence_parallel`` patches the blocks' ``forward`` on the instance (parameter names and
hooks unchanged); model files stay free of distributed code. Diffusers adapters go through diffusers'
own context-parallel hooks instead (``apt.distributed.context_parallel``).

Training (``train.sequence_parallel: P``): ``sequence_parallel_mesh`` groups P consecutive ranks; the
ranks of a group read the same samples and draw the same noise (``data_parallel_rank``);
``apt.distributed.parallelize`` applies it after the engines / FSDP units exist; gradients are averaged
over the whole world as without SP, which gives the single-device gradient (the gathers' backward).
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from apt.distributed.process_group import skip_deepspeed_inference_comm_op
from apt.models.attention import attention, pad_key_mask, sequence_parallel_attention


def check_sequence_parallel(num_heads: int, sp_size: int) -> None:
    """Raise ValueError before any work when heads cannot be split over the SP group."""
    if sp_size < 1:
        raise ValueError(f"sequence-parallel size must be >= 1, got {sp_size}")
    if num_heads % sp_size:
        raise ValueError(
            f"Ulysses sequence parallelism splits attention heads over the group: {num_heads} heads do not divide "
            f"{sp_size} ranks; choose a sequence-parallel size that divides {num_heads}"
        )


def init_deepspeed_comm() -> None:
    """DistributedAttention talks through ``deepspeed.comm``; wrap the existing torch process group."""
    import deepspeed.comm as ds_dist

    if not ds_dist.is_initialized():
        skip_deepspeed_inference_comm_op()
        backend = dist.get_backend() if dist.is_initialized() else None
        ds_dist.init_distributed(dist_backend=backend, auto_mpi_discovery=False)


class UlyssesAttention:
    """``attention(q, k, v, mask)`` for q/k/v (B, K, S/P, E) local chunks; returns (B, K, S/P, E)."""

    def __init__(self, group: dist.ProcessGroup | None = None):
        from deepspeed.sequence.layer import DistributedAttention

        init_deepspeed_comm()
        self.group = group or dist.group.WORLD
        self.dist_attention = DistributedAttention(self._local, self.group, scatter_idx=2, gather_idx=1)

    @staticmethod
    def _local(q_BSKE: torch.Tensor, k_BSKE: torch.Tensor, v_BSKE: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        out_BKSE = attention(q_BSKE.transpose(1, 2), k_BSKE.transpose(1, 2), v_BSKE.transpose(1, 2), mask)
        return out_BKSE.transpose(1, 2)

    def __call__(self, q_BKSE, k_BKSE, v_BKSE, mask_B11S=None) -> torch.Tensor:
        out_BSKE = self.dist_attention(q_BKSE.transpose(1, 2), k_BKSE.transpose(1, 2), v_BKSE.transpose(1, 2), 0, mask=mask_B11S)
        return out_BSKE.transpose(1, 2)


class _GatherSequence(torch.autograd.Function):
    """(B, S_pad/P, D) chunks -> (B, S, D) on every rank; backward: sum over ranks, keep own chunk."""

    @staticmethod
    def forward(ctx, x_local: torch.Tensor, group, S: int) -> torch.Tensor:
        ctx.group, ctx.S, ctx.chunk = group, S, x_local.shape[1]
        parts = [torch.empty_like(x_local) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x_local.contiguous(), group=group)
        return torch.cat(parts, dim=1)[:, :S]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        P, rank = dist.get_world_size(ctx.group), dist.get_rank(ctx.group)
        grad = F.pad(grad, (0, 0, 0, ctx.chunk * P - ctx.S)).contiguous()
        if dist.get_backend(ctx.group) == "gloo":  # gloo has no reduce-scatter
            dist.all_reduce(grad, group=ctx.group)
            out = grad[:, rank * ctx.chunk : (rank + 1) * ctx.chunk].contiguous()
        else:
            out = torch.empty_like(grad[:, : ctx.chunk]).contiguous()
            dist.reduce_scatter_tensor(out.transpose(0, 1), grad.transpose(0, 1).contiguous(), group=ctx.group)
        return out, None, None


def gather_sequence(x_local: torch.Tensor, group, length: int | None = None) -> torch.Tensor:
    """(B, S_pad/P, ...) chunks -> the first ``length`` (default: all) tokens on every rank; the backward
    sums the ranks' gradients for each chunk."""
    return _GatherSequence.apply(x_local, group, x_local.shape[1] * dist.get_world_size(group) if length is None else length)


def _split(x: torch.Tensor, dim: int, S_pad: int, rank: int, P: int) -> torch.Tensor:
    pad = S_pad - x.shape[dim]
    if pad:
        widths = [0, 0] * (x.ndim - 1 - dim) + [0, pad]
        x = F.pad(x, widths)
    chunk = S_pad // P
    return x.narrow(dim, rank * chunk, chunk)


def apply_sequence_parallel(backbone: nn.Module, group: dist.ProcessGroup | None = None, *, gather_after: Iterable[int] = ()) -> None:
    """Run the blocks of a built-in DiT sequence-parallel over ``group`` (the last block and the blocks
    in ``gather_after`` return whole sequences). A no-op for a group of one."""
    group = group or dist.group.WORLD
    P, rank = dist.get_world_size(group), dist.get_rank(group)
    check_sequence_parallel(backbone.config.num_heads, P)
    if P == 1:
        return
    ulysses = UlyssesAttention(group)
    gather = set(gather_after) | {len(backbone.blocks) - 1}
    for i, block in enumerate(backbone.blocks):
        block.forward = _sequence_parallel_forward(block.forward, gather=i in gather, group=group, P=P, rank=rank, ulysses=ulysses)


def _sequence_parallel_forward(forward, *, gather: bool, group, P: int, rank: int, ulysses: UlyssesAttention):
    def sp_forward(x_BSD, c_BD, rope, mask_B11S):
        S = rope[0].shape[0]  # the RoPE tables always span the whole (unpadded) sequence; the mask may be None
        S_pad = -(-S // P) * P
        if x_BSD.shape[1] == S:  # entering the SP region: keep this rank's chunk
            x_BSD = _split(x_BSD, 1, S_pad, rank, P)
        rope_local = tuple(_split(t, 0, S_pad, rank, P) for t in rope)
        mask_pad = pad_key_mask(mask_B11S, S, S_pad, device=x_BSD.device)  # pad keys are never attended
        with sequence_parallel_attention(ulysses):
            out = forward(x_BSD, c_BD, rope_local, mask_pad)
        return gather_sequence(out, group, S) if gather else out

    return sp_forward


def data_parallel_rank(global_rank: int, world_size: int, sp_size: int) -> tuple[int, int]:
    """(rank, world size) of the data: the ``sp_size`` consecutive ranks of a sequence-parallel group
    read the same samples and draw the same noise (``apt.methods.apt.SampleNoise``)."""
    assert world_size % sp_size == 0, (world_size, sp_size)  # checked with the config (train.sequence_parallel)
    return global_rank // sp_size, world_size // sp_size


def sequence_parallel_mesh(sp_size: int, device_type: str) -> DeviceMesh:
    """Mesh (data_parallel, ring, ulysses) = (world / P, 1, P): the ulysses groups are P consecutive
    ranks. The ring dimension (size 1) is what diffusers' ``ContextParallelConfig`` expects of a mesh."""
    world = dist.get_world_size()
    return init_device_mesh(device_type, (world // sp_size, 1, sp_size), mesh_dim_names=("data_parallel", "ring", "ulysses"))
