"""Exponential moving average of a network's weights (the EMA generator is APT's product).

The EMA copy starts synced with the network (a deep copy at init), so early samples are not
dominated by the random init, and buffers are copied, not averaged. Under FSDP2 the EMA is sharded
like the network (``apt.distributed.strategies.fully_shard_apt``): each rank lerps its own shards,
with no gather. ZeRO-3 keeps its own partitions (``apt.distributed.zero3_ema``).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.tensor import DTensor


def local_shard(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of an FSDP2 (DTensor) parameter; any other tensor as it is."""
    return t.to_local() if isinstance(t, DTensor) else t


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model, parameter by parameter (shard by shard when sharded)."""
    ema_params = list(ema.parameters())
    model_params = list(model.parameters())
    if len(ema_params) != len(model_params):
        raise ValueError("EMA and model have different parameter lists")
    for e, p in zip(ema_params, model_params):
        if isinstance(e, DTensor) != isinstance(p, DTensor) or (isinstance(e, DTensor) and e.placements != p.placements):
            raise ValueError(f"EMA and model are sharded differently ({type(e).__name__} vs {type(p).__name__}); shard the EMA like the model")
    ema_local = [local_shard(e) for e in ema_params]
    model_local = [local_shard(p).detach().to(ema_local[0].dtype) for p in model_params]
    torch._foreach_lerp_(ema_local, model_local, 1.0 - decay)
    for b_ema, b in zip(ema.buffers(), model.buffers()):
        b_ema.copy_(b)
