"""How a method's step updates a network: the ``NetUpdate`` protocol and its plain-torch form.

A step (``apt.methods.apt.apt_step``) says *when* a network learns from a loss; the runner decides
*how*: Lightning's manual optimisation (single device, DDP, FSDP2), a DeepSpeed engine
(``apt.distributed.engines.EngineUpdate``) or a bare optimiser (benchmarks, unit tests). All three
implement ``zero_grad -> backward (once per micro-batch) -> step``.
"""

from __future__ import annotations

from typing import Callable, Iterable, Protocol

import torch


class NetUpdate(Protocol):
    """How one network is updated from a loss."""

    def zero_grad(self) -> None: ...

    def backward(self, loss: torch.Tensor) -> None: ...

    def step(self) -> torch.Tensor:
        """Apply the accumulated gradient; return its global norm."""
        ...


def grad_norm(params: Iterable[torch.nn.Parameter]) -> torch.Tensor:
    """Global L2 norm of the gradients present (0 when none); FSDP2's sharded gradients are reduced to the full norm."""
    grads = [p.grad for p in params if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads) if grads else torch.tensor(0.0)
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP2: sharded (DTensor) gradients


class OptimizerUpdate:
    """``NetUpdate`` over a torch optimiser. ``backward`` defaults to ``loss.backward()``; Lightning passes
    ``manual_backward`` so that its precision and strategy hooks (DDP, FSDP2) see every backward.
    ``max_norm`` > 0 clips the gradient's global norm before the step (``optim.grad_clip``)."""

    def __init__(self, optimizer: torch.optim.Optimizer, net: torch.nn.Module, backward: Callable[[torch.Tensor], None] | None = None,
                 *, max_norm: float = 0.0):
        self.optimizer, self.net, self.max_norm = optimizer, net, max_norm
        self._backward = backward or torch.Tensor.backward

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def backward(self, loss: torch.Tensor) -> None:
        self._backward(loss)

    def step(self) -> torch.Tensor:
        norm = grad_norm(self.net.parameters())
        if self.max_norm > 0:
            clip_to_norm(self.net.parameters(), self.max_norm, norm)
        self.optimizer.step()
        return norm


@torch.no_grad()
def clip_to_norm(params: Iterable[torch.nn.Parameter], max_norm: float, norm: torch.Tensor) -> None:
    """Scale the gradients by min(1, max_norm / (norm + 1e-6)), as ``torch.nn.utils.clip_grad_norm_`` and
    DeepSpeed's ``gradient_clipping`` do; one Python float, so FSDP2's sharded gradients scale alike."""
    coef = min(1.0, max_norm / (float(norm) + 1e-6))
    if coef < 1.0:
        for p in params:
            if p.grad is not None:
                p.grad.mul_(coef)


def check_finite(name: str, value: torch.Tensor, where: str) -> None:
    """Stop with a clear message instead of training on (and checkpointing) NaN/Inf."""
    if not torch.isfinite(value).all():
        raise FloatingPointError(
            f"{name} is not finite at {where}; check the input data and learning rate. No checkpoint was written for this step."
        )
