"""Exponential moving average of a network's weights (the EMA generator is APT's product).

The EMA copy starts synced with the network (a deep copy at init), so early samples are not
dominated by the random init, and buffers are copied, not averaged.
"""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model, parameter by parameter."""
    ema_params = [p for p in ema.parameters()]
    model_params = [p.detach().to(ema_params[0].dtype) for p in model.parameters()]
    if len(ema_params) != len(model_params):
        raise ValueError("EMA and model have different parameter lists")
    torch._foreach_lerp_(ema_params, model_params, 1.0 - decay)
    for b_ema, b in zip(ema.buffers(), model.buffers()):
        b_ema.copy_(b)
