"""The EMA generator under ZeRO-3, partitioned like the generator: no whole copy on any rank.

ZeRO-3 keeps, for each parameter, one flat slice per rank (``param.ds_tensor``: ``ceil(numel / W)``
elements starting at ``rank * ceil(numel / W)`` of the flattened parameter, zero-padded at the end;
deepspeed 0.19 ``Init._partition_param``). ``PartitionedEma`` holds the fp32 EMA of exactly that
slice, so the update is a local lerp with G's partition (no ``GatheredParameters``), and gathers the
whole EMA only for a call that needs it (sampling). Buffers are not partitioned by ZeRO-3 and stay
whole in the EMA module. Checkpoints store the partitions per rank (``apt.distributed.sharded_checkpoint``);
``python -m apt consolidate`` joins them (``join_partitions``).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.distributed as dist
from torch import nn


class PartitionedEma:
    """This rank's fp32 partitions of ``ema``'s parameters, laid out as ZeRO-3 lays out ``generator``'s.

    ``ema`` (a whole copy of G, made before the engine) is emptied: its parameters keep their names
    and shapes for sampling and saving, but hold no storage outside ``gathered()``.
    """

    def __init__(self, ema: nn.Module, generator: nn.Module):
        self.module = ema
        self.names = [name for name, _ in ema.named_parameters()]
        self.shapes = [tuple(e.shape) for e in ema.parameters()]
        g_params = list(generator.parameters())
        if len(g_params) != len(self.names):
            raise ValueError("EMA and generator have different parameter lists")
        self.parts: list[torch.Tensor] = []
        self.valid: list[int] = []  # elements of each partition inside the parameter (the rest is padding)
        for e, g in zip(ema.parameters(), g_params):
            if not hasattr(g, "ds_tensor") or g.ds_numel != e.numel():
                raise ValueError("the generator is not ZeRO-3 partitioned like its EMA (ds_tensor / ds_numel)")
            n, start = g.ds_tensor.numel(), g.ds_tensor.numel() * dist.get_rank(group=g.ds_process_group)
            valid = max(0, min(n, e.numel() - start))
            part = torch.zeros(n, dtype=torch.float32, device=e.device)
            part[:valid] = e.detach().reshape(-1)[start : start + valid]
            self.parts.append(part)
            self.valid.append(valid)
            e.data = torch.empty(0, dtype=e.dtype, device=e.device)  # the whole copy is released
        self.groups = [g.ds_process_group for g in g_params]

    def numel(self) -> int:
        """Elements this rank holds (padding included)."""
        return sum(p.numel() for p in self.parts)

    @torch.no_grad()
    def update(self, generator: nn.Module, decay: float) -> None:
        """ema <- decay * ema + (1 - decay) * G on this rank's partitions; buffers copied whole."""
        g_params = list(generator.parameters())
        ema = [p[:v] for p, v in zip(self.parts, self.valid)]
        g = [p.ds_tensor[:v].detach().float() for p, v in zip(g_params, self.valid)]
        torch._foreach_lerp_(ema, g, 1.0 - decay)
        for b_ema, b in zip(self.module.buffers(), generator.buffers()):
            b_ema.copy_(b)

    @contextlib.contextmanager
    def gathered(self) -> Iterator[nn.Module]:
        """Collective: the EMA module with whole fp32 parameters on every rank, released after."""
        params = list(self.module.parameters())
        try:
            for e, part, group, shape in zip(params, self.parts, self.groups, self.shapes):
                chunks = [torch.empty_like(part) for _ in range(dist.get_world_size(group=group))]
                dist.all_gather(chunks, part, group=group)
                e.data = torch.cat(chunks)[: torch.Size(shape).numel()].view(shape)
            yield self.module
        finally:
            for e in params:
                e.data = torch.empty(0, dtype=e.dtype, device=e.device)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """This rank's partitions by parameter name (flat, padded as ZeRO-3 pads)."""
        return dict(zip(self.names, self.parts))

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if sorted(state) != sorted(self.names):
            raise ValueError(f"EMA partitions: expected {len(self.names)} parameters, the file has {len(state)} (a checkpoint of another model?)")
        for name, part in zip(self.names, self.parts):
            if state[name].shape != part.shape:
                raise ValueError(f"EMA partition {name}: {tuple(state[name].shape)} in the file, {tuple(part.shape)} here")
            part.copy_(state[name])

    def layout(self) -> dict:
        """What ``join_partitions`` needs: the whole shape of every parameter."""
        return {"params": {name: list(shape) for name, shape in zip(self.names, self.shapes)}}


def join_partitions(layout: dict, ranks: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Whole parameters from every rank's partitions (rank order), padding dropped."""
    whole = {}
    for name, shape in layout["params"].items():
        flat = torch.cat([r[name] for r in ranks])
        whole[name] = flat[: torch.Size(shape).numel()].view(shape).clone()
    return whole
